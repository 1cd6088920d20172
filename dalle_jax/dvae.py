"""The DALL·E discrete VAE: encoder, decoder, Gumbel-softmax relaxation, logit-Laplace likelihood.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.1 and appendix A. The
architecture follows OpenAI's `dall-e` package (dall_e/encoder.py, dall_e/decoder.py,
dall_e/utils.py) layer for layer, so its published weights load without change
(`dalle_jax.dvae_weights`): parameter names mirror the reference's module names
(`input`, `group_1_block_1/conv_1`, `output`), with NHWC activations and HWIO kernels.

  Encoder  (B, H, W, 3) pixels mapped to (eps, 1 - eps)  ->  (B, H/8, W/8, vocab) logits
  Decoder  (B, H/8, W/8, vocab) one-hot (or relaxed) codes, or (B, H/8, W/8) int codes
           ->  (B, H, W, 6) logit-Laplace statistics: mu (first 3 channels), ln b (last 3)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from common.layers import conv_general_dilated

Dtype = Any

#: Pixels are squeezed into (eps, 1 - eps) before encoding so that logit(x) stays finite in the
#: logit-Laplace likelihood (paper appendix A.3; dall_e/utils.py `logit_laplace_eps`).
LOGIT_LAPLACE_EPS = 0.1

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
# The encoder's last conv maps to code logits; its input dimension keeps `conv_in` (fsdp) so that,
# under FSDP+TP, the (2048, 8192) kernel is split over both mesh axes, never one axis twice.
LOGITS_AXES = ("conv_h", "conv_w", "conv_in", "vocab")


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """dVAE sizes. Defaults are OpenAI's released model: 256x256 images -> 32x32 codes of 8192.

    Attributes:
      group_count: resolution groups; every group but the last halves (encoder) or doubles
        (decoder) the resolution, so codes are `2 ** (group_count - 1)` times smaller than images.
        The reference fixes 4.
      n_hid: width of the first encoder group (the last decoder group); group g has
        `n_hid * 2 ** g` channels in the encoder, mirrored in the decoder.
      n_blk_per_group: residual blocks per group.
      vocab_size: number of discrete codes.
      n_init: decoder width right after its code embedding (1x1 conv from one-hot codes).
      channels: image channels (the decoder predicts two statistics per channel).
    """

    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    n_init: int = 128
    channels: int = 3

    def __post_init__(self):
        checks = [
            (self.group_count >= 1, "group_count >= 1"),
            (self.n_hid >= 4 and self.n_hid % 4 == 0, "n_hid a positive multiple of 4 (blocks use width / 4)"),
            (self.n_blk_per_group >= 1, "n_blk_per_group >= 1"),
            (self.vocab_size >= 2, "vocab_size >= 2"),
            (self.n_init >= 1, "n_init >= 1"),
            (self.channels >= 1, "channels >= 1"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid DVAEConfig: expected {rule}, found {self}")

    @property
    def downsample(self) -> int:
        """Image pixels per code along each side (8 for the released model)."""
        return 2 ** (self.group_count - 1)

    @property
    def n_layers(self) -> int:
        """Residual blocks per network; each block's residual branch is scaled by 1 / n_layers**2."""
        return self.group_count * self.n_blk_per_group


class Conv2d(nn.Module):
    """A 'same'-padded convolution with the reference's initialization (dall_e/utils.py Conv2d).

    Weights ~ N(0, 1 / (in_features * kernel_size**2)), zero bias. Integer inputs to a 1x1 conv are
    read as code indices: `kernel[0, 0][codes] + bias` equals the conv of their one-hot encoding
    without building the (B, h, w, vocab) one-hot tensor.
    """

    in_features: int
    features: int
    kernel_size: int
    axes: tuple[str, str, str, str] = CONV_AXES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        std = 1.0 / math.sqrt(self.in_features * k * k)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=std), self.axes),
            (k, k, self.in_features, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[-1:]),
            (self.features,),
            self.param_dtype,
        )
        if jnp.issubdtype(x.dtype, jnp.integer):
            if k != 1:
                raise ValueError(f"integer (code) inputs need a 1x1 conv, found kernel size {k}")
            kernel, bias = (jnp.asarray(a, self.dtype) for a in (kernel, bias))
            return jnp.take(kernel[0, 0], x, axis=0) + bias  # (..., features)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class ResidualBlock(nn.Module):
    """`id_path(x) + post_gain * res_path(x)` with post_gain = 1 / n_layers**2.

    res_path is relu -> conv(in, out/4) -> relu -> conv(out/4, out/4) -> relu -> conv(out/4, out/4)
    -> relu -> conv(out/4, out); id_path is a 1x1 conv when widths differ, else the identity. The
    encoder's kernel sizes are (3, 3, 3, 1) (dall_e/encoder.py EncoderBlock), the decoder's
    (1, 3, 3, 3) (dall_e/decoder.py DecoderBlock).
    """

    in_features: int
    features: int
    n_layers: int
    kernel_sizes: tuple[int, int, int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, upsample: bool = False) -> jax.Array:
        """`upsample`: the block of `upsample_nearest(x)`, computed with its leading 1x1 convs (and the
        relu before them) at the resolution of `x`: they act per pixel, so they commute with
        nearest-neighbour upsampling, at a quarter of the cost (the decoder's first block of a group)."""

        def conv(n_in, n_out, k, name):
            return Conv2d(n_in, n_out, k, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        if upsample and self.kernel_sizes[0] != 1:
            raise ValueError(f"upsample needs a leading 1x1 conv, found kernel sizes {self.kernel_sizes}")
        grow = upsample_nearest if upsample else (lambda a: a)
        identity = x if self.in_features == self.features else conv(self.in_features, self.features, 1, "id_path")(x)
        hid = self.features // 4
        widths = (self.in_features, hid, hid, hid, self.features)
        h = x
        for i, k in enumerate(self.kernel_sizes):
            h = conv(widths[i], widths[i + 1], k, f"conv_{i + 1}")(nn.relu(h))
            if i == 0:
                h = grow(h)
        return grow(identity) + (1.0 / self.n_layers**2) * h


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2 (torch `Upsample(scale_factor=2, mode="nearest")`)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _check_nhwc(x: jax.Array, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(
            f"{what}: expected (batch, height, width, {channels}) with height and width multiples of "
            f"{multiple}, found shape {tuple(x.shape)}"
        )


class Encoder(nn.Module):
    """Images -> code logits (dall_e/encoder.py Encoder).

    7x7 input conv to n_hid; `group_count` groups of residual blocks with widths n_hid * (1, 2, 4,
    8, ...), each but the last followed by a 2x2 max-pool; relu and a 1x1 conv to vocab logits
    (kept in float32, as the reference does with `use_float16=False`).
    """

    config: DVAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) mapped pixels (see `map_pixels`) -> (B, H/f, W/f, vocab) float32 logits."""
        cfg = self.config
        _check_nhwc(x, cfg.channels, cfg.downsample, "Encoder input")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2d(cfg.channels, cfg.n_hid, 7, name="input", **kw)(x)
        width = cfg.n_hid
        for g in range(cfg.group_count):
            out = cfg.n_hid * 2**g
            for b in range(cfg.n_blk_per_group):
                block = ResidualBlock(width, out, cfg.n_layers, (3, 3, 3, 1), name=f"group_{g + 1}_block_{b + 1}", **kw)
                x, width = block(x), out
            if g < cfg.group_count - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(x)
        to_logits = Conv2d(
            width, cfg.vocab_size, 1, axes=LOGITS_AXES, dtype=jnp.float32, param_dtype=self.param_dtype, name="output"
        )
        return to_logits(x)


class Decoder(nn.Module):
    """Codes -> logit-Laplace statistics (dall_e/decoder.py Decoder).

    1x1 conv from one-hot codes to n_init (float32, as the reference); `group_count` groups of
    residual blocks with widths n_hid * (..., 8, 4, 2, 1), each but the last followed by 2x nearest
    upsampling; relu and a 1x1 conv to 2 * channels statistics.
    """

    config: DVAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """(B, h, w, vocab) one-hot or relaxed codes, or (B, h, w) int codes -> (B, h*f, w*f, 2C) float32.

        Channels [:C] are the logit-Laplace location mu, [C:] its log-scale ln b.
        """
        cfg = self.config
        is_codes = jnp.issubdtype(z.dtype, jnp.integer)
        if z.ndim != (3 if is_codes else 4) or (not is_codes and z.shape[-1] != cfg.vocab_size):
            raise ValueError(
                f"Decoder input: expected int codes (batch, h, w) or one-hot codes (batch, h, w, {cfg.vocab_size}), "
                f"found shape {tuple(z.shape)} of dtype {z.dtype}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2d(cfg.vocab_size, cfg.n_init, 1, dtype=jnp.float32, param_dtype=self.param_dtype, name="input")(z)
        width = cfg.n_init
        for g in range(cfg.group_count):
            out = cfg.n_hid * 2 ** (cfg.group_count - 1 - g)
            for b in range(cfg.n_blk_per_group):
                block = ResidualBlock(width, out, cfg.n_layers, (1, 3, 3, 3), name=f"group_{g + 1}_block_{b + 1}", **kw)
                # Every group but the first starts with the previous one's 2x nearest upsampling, which the
                # block applies after its 1x1 convs (the same values, a quarter of their cost).
                x, width = block(x, upsample=g > 0 and b == 0), out
        x = nn.relu(x)
        stats = Conv2d(width, 2 * cfg.channels, 1, name="output", **kw)(x)
        return stats.astype(jnp.float32)


class DVAE(nn.Module):
    """Encoder and decoder together; params are `{"encoder": ..., "decoder": ...}`.

    Calling the module runs the training-time path of the paper (sec. 2.1): encoder logits, a
    Gumbel-softmax sample of the codes (rng stream "gumbel"), and the decoder on that relaxed sample.
    """

    config: DVAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype, self.param_dtype)
        self.decoder = Decoder(self.config, self.dtype, self.param_dtype)

    def __call__(self, x: jax.Array, temperature: jax.Array | float, hard: bool = False) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, C) mapped pixels -> ((B, h, w, vocab) logits, (B, H, W, 2C) statistics)."""
        logits = self.encoder(x)
        z = gumbel_softmax(self.make_rng("gumbel"), logits, temperature, hard=hard)
        return logits, self.decoder(z)

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)


def gumbel_softmax(rng: jax.Array, logits: jax.Array, temperature: jax.Array | float, hard: bool = False) -> jax.Array:
    """softmax((logits + g) / temperature) over the last axis, g ~ Gumbel(0, 1) (Jang et al. 2017;
    Maddison et al. 2017). With `hard`, the forward value is the one-hot argmax while gradients flow
    through the relaxed sample (straight-through estimator)."""
    logits = logits.astype(jnp.float32)
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return one_hot + soft - jax.lax.stop_gradient(soft)


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """[0, 1] -> [eps, 1 - eps]: `(1 - 2 eps) x + eps` (dall_e/utils.py `map_pixels`)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """Inverse of `map_pixels`, clipped to [0, 1] (dall_e/utils.py `unmap_pixels`)."""
    return jnp.clip((x - eps) / (1 - 2 * eps), 0.0, 1.0)


def stats_to_pixels(stats: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """Decoder statistics (B, H, W, 2C) -> reconstruction (B, H, W, C) in [0, 1]:
    `unmap_pixels(sigmoid(mu))`, the reference's usage notebook (and paper appendix A.3)."""
    channels = stats.shape[-1] // 2
    return unmap_pixels(jax.nn.sigmoid(stats[..., :channels].astype(jnp.float32)), eps)


def logit_laplace_nll(x: jax.Array, stats: jax.Array) -> jax.Array:
    """Per-value negative log-likelihood of `x` in (0, 1) under the logit-Laplace distribution.

    Paper appendix A.3: f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b), i.e. a
    Laplace(mu, b) density on logit(x) times the Jacobian 1 / (x (1 - x)) of the logit. The
    decoder's first C channels are mu and the last C are ln b, so

      -ln f = ln 2 + ln b + ln x + ln(1 - x) + |logit(x) - mu| * exp(-ln b).

    Args:
      x: (B, H, W, C) targets strictly inside (0, 1); in training the mapped pixels
        `map_pixels(images)`, which lie in [eps, 1 - eps].
      stats: (B, H, W, 2C) decoder output.
    Returns:
      (B, H, W, C) float32 negative log-densities (nats).
    """
    channels = x.shape[-1]
    if stats.shape[-1] != 2 * channels or stats.shape[:-1] != x.shape[:-1]:
        expected = (*x.shape[:-1], 2 * channels)
        raise ValueError(f"logit_laplace_nll: expected stats of shape {expected}, found {stats.shape}")
    x = x.astype(jnp.float32)
    mu, log_b = stats[..., :channels].astype(jnp.float32), stats[..., channels:].astype(jnp.float32)
    log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
    return math.log(2.0) + log_b + log_x + log_1mx + jnp.abs(log_x - log_1mx - mu) * jnp.exp(-log_b)
