"""CLIP's ModifiedResNet image encoder (OpenAI clip/model.py `ModifiedResNet`).

Differences from a torchvision ResNet (Radford et al. 2021, section 2.4):
  * a 3-convolution stem with an average pool instead of a max pool;
  * anti-aliased downsampling: strided blocks average-pool before conv3 and in the shortcut,
    and every convolution has stride 1 (Zhang 2019, "Making CNNs shift-invariant again");
  * the global average pool is replaced by `AttentionPool2d`, one multi-head attention
    layer whose query is the mean token.
BatchNorm runs in inference mode from the `batch_stats` collection (torch `.eval()`).
Images are NHWC.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.variants import VisionConfig
from common.layers import Dtype, MultiHeadAttention, conv_general_dilated, partitioned, torch_default_kernel_init

EXPANSION = 4  # Bottleneck output channels over `planes`


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
    """torch.nn.AvgPool2d(stride) on NHWC; identity when stride == 1."""
    if stride == 1:
        return x
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")


class _ConvBN(nn.Module):
    """Bias-free conv (stride 1, torch-style symmetric padding) followed by BatchNorm.

    Named submodules `conv` and `bn`; `zero_scale` zero-initialises the BN scale, as OpenAI
    does for each Bottleneck's last BN so blocks start as identities. `rgb_input` leaves the
    kernel's input axis unsharded (3 channels).
    """

    features: int
    kernel_size: int
    zero_scale: bool = False
    stride: int = 1
    rgb_input: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    train_batchnorm: bool = False  # batch statistics (and running-average updates) instead of stored ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=partitioned(
                torch_default_kernel_init(), ("conv_h", "conv_w", None if self.rgb_input else "conv_in", "conv_out")
            ),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_general_dilated=conv_general_dilated,  # 1x1 convs as matmuls
            name="conv",
        )(x)
        scale_init = nn.initializers.zeros_init() if self.zero_scale else nn.initializers.ones_init()
        # In training mode the statistics are over the global batch: on a sharded batch XLA
        # reduces across devices, i.e. synchronised BatchNorm.
        return nn.BatchNorm(
            use_running_average=not self.train_batchnorm,
            momentum=0.9,  # torch momentum 0.1
            epsilon=1e-5,
            scale_init=partitioned(scale_init, ("norm",)),
            bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avgpool] -> 1x1 (x4 channels), with an [avgpool] -> 1x1 shortcut."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    train_batchnorm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv_bn = lambda features, kernel, name, **kw: _ConvBN(  # noqa: E731
            features, kernel, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            train_batchnorm=self.train_batchnorm, **kw
        )
        out = nn.relu(conv_bn(self.planes, 1, "conv1")(x))
        out = nn.relu(conv_bn(self.planes, 3, "conv2")(out))
        out = _avg_pool(out, self.stride)
        out = conv_bn(self.planes * EXPANSION, 1, "conv3", zero_scale=True)(out)
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
            identity = conv_bn(self.planes * EXPANSION, 1, "downsample")(_avg_pool(x, self.stride))
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling: the mean token, with positional embeddings, attends to all tokens."""

    spatial_dim: int
    num_heads: int
    out_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, S, S, C) -> (B, out_features)."""
        batch, height, width, channels = x.shape
        if (height, width) != (self.spatial_dim, self.spatial_dim):
            raise ValueError(
                f"attention pool expects a {self.spatial_dim}x{self.spatial_dim} grid, found {height}x{width}"
            )
        x = x.reshape(batch, height * width, channels)  # (B, HW, C)
        mean = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
        x = jnp.concatenate([mean, x], axis=1)  # (B, HW + 1, C)
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(channels**-0.5), ("pos", "embed")),
            (height * width + 1, channels),
            self.param_dtype,
        )
        x = x + positional_embedding.astype(x.dtype)
        std = channels**-0.5  # OpenAI: c_proj.in_features ** -0.5 for q, k, v and c
        # Only the mean token's output is kept, so only it is used as a query (and then the keys and values
        # are never projected: MultiHeadAttention attends through their kernels).
        out = MultiHeadAttention(
            self.num_heads, std, std, self.out_features, self.dtype, self.param_dtype, name="attn"
        )(x[:, :1], x)  # (B, 1, out_features)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    config: VisionConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each Bottleneck in the backward pass
    train_batchnorm: bool = False  # see _ConvBN; apply with mutable=["batch_stats"]

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) float -> image features (B, embed_dim), not normalised."""
        cfg = self.config
        size, width = cfg.image_size, cfg.width
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected images of shape (batch, {size}, {size}, 3) (NHWC), found {images.shape}")
        conv_bn = lambda features, name, **kw: _ConvBN(  # noqa: E731
            features, 3, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            train_batchnorm=self.train_batchnorm, **kw
        )
        x = images.astype(self.dtype)
        conv1_stride = 2 if cfg.stem_stride == 4 else 1
        x = nn.relu(conv_bn(width // 2, "conv1", stride=conv1_stride, rgb_input=True)(x))  # (B, H/2, W/2, width/2) at 4
        x = nn.relu(conv_bn(width // 2, "conv2")(x))
        x = nn.relu(conv_bn(width, "conv3")(x))
        x = _avg_pool(x, min(cfg.stem_stride, 2))  # (B, H/4, W/4, width) with OpenAI's stem_stride 4
        block = nn.remat(Bottleneck) if self.remat else Bottleneck
        for stage, depth in enumerate(cfg.layers):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                x = block(
                    width * 2**stage, stride, self.dtype, self.param_dtype, self.train_batchnorm,
                    name=f"layer{stage + 1}_{i}",
                )(x)  # stage 4: (B, H/32, W/32, 32 width) with stem_stride 4
        return AttentionPool2d(
            size // cfg.total_stride, cfg.heads, self.embed_dim, self.dtype, self.param_dtype, name="attnpool"
        )(x)
