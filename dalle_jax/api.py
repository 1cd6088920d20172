"""Public entry points of `dalle_jax`: `load_dvae` and the image tokenizer it returns."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.layers import convolution_jit
from dalle_jax.dvae import Decoder, DVAEConfig, Encoder, map_pixels, stats_to_pixels
from dalle_jax.dvae_weights import infer_config, params_from_state_dict, read_state_dict


@functools.partial(convolution_jit, static_argnames=("config", "dtype"))
def encode_to_codes(params: Any, images: jax.Array, *, config: DVAEConfig, dtype: Any = jnp.float32) -> jax.Array:
    """(B, H, W, C) images in [0, 1] -> (B, H/f, W/f) int32 codes: the argmax of the encoder's
    logits on `map_pixels(images)` (the reference usage notebook)."""
    logits = Encoder(config, dtype).apply({"params": params}, map_pixels(images.astype(jnp.float32)))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(convolution_jit, static_argnames=("config", "dtype"))
def decode_to_images(params: Any, codes: jax.Array, *, config: DVAEConfig, dtype: Any = jnp.float32) -> jax.Array:
    """(B, h, w) int codes -> (B, h*f, w*f, C) float32 images in [0, 1]: `unmap_pixels(sigmoid(mu))`."""
    return stats_to_pixels(Decoder(config, dtype).apply({"params": params}, codes))


@dataclasses.dataclass(frozen=True)
class PretrainedDVAE:
    """A loaded dVAE: images <-> discrete codes. Either half may be absent (None)."""

    config: DVAEConfig
    encoder_params: Any | None
    decoder_params: Any | None
    dtype: Any = jnp.float32

    def encode(self, images: Any) -> jax.Array:
        """(B, H, W, C) float images in [0, 1], H and W multiples of `config.downsample`
        -> (B, H/f, W/f) int32 codes in [0, vocab_size)."""
        if self.encoder_params is None:
            raise ValueError("this dVAE was loaded without an encoder; pass encoder_path to load_dvae")
        images = jnp.asarray(images)
        cfg, f = self.config, self.config.downsample
        bad_size = images.ndim != 4 or 0 in images.shape or images.shape[1] % f or images.shape[2] % f
        if bad_size or images.shape[-1] != cfg.channels:
            raise ValueError(
                f"encode: expected images (batch, height, width, {cfg.channels}) with height and width positive "
                f"multiples of {f}, found shape {images.shape}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"encode: expected float images in [0, 1], found dtype {images.dtype} (divide uint8 images by 255)"
            )
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"encode: expected pixel values in [0, 1], found range [{lo:.4g}, {hi:.4g}]")
        return encode_to_codes(self.encoder_params, images, config=cfg, dtype=self.dtype)

    def decode(self, codes: Any) -> jax.Array:
        """(B, h, w) integer codes in [0, vocab_size) -> (B, h*f, w*f, C) float32 images in [0, 1]."""
        if self.decoder_params is None:
            raise ValueError("this dVAE was loaded without a decoder; pass decoder_path to load_dvae")
        codes = jnp.asarray(codes)
        vocab = self.config.vocab_size
        if codes.ndim != 3 or 0 in codes.shape or not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(
                f"decode: expected integer codes (batch, h, w), found shape {codes.shape} of dtype {codes.dtype}"
            )
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"decode: expected codes in [0, {vocab}), found range [{lo}, {hi}]")
        return decode_to_images(self.decoder_params, codes.astype(jnp.int32), config=self.config, dtype=self.dtype)


def load_dvae(
    encoder_path: str | os.PathLike | None,
    decoder_path: str | os.PathLike | None,
    *,
    trust_pickle: bool = False,
    dtype: Any = None,
) -> PretrainedDVAE:
    """Loads a dVAE from OpenAI's `encoder.pkl` / `decoder.pkl`, torch state dicts or safetensors.

    The architecture (n_hid, n_init, groups, blocks per group, vocabulary) is read off the weights'
    names and shapes. OpenAI's `.pkl` files are pickled modules: reading them runs code from the file
    and needs `trust_pickle=True` (see `dalle_jax.dvae_weights`). Pass None for a half you don't need
    (e.g. only the encoder, to tokenize a dataset).

    Args:
      encoder_path, decoder_path: checkpoint files; at least one.
      trust_pickle: allow unpickling whole modules (only for files from a source you trust).
      dtype: compute dtype (default float32); parameters are always stored in float32.
    """
    if encoder_path is None and decoder_path is None:
        raise ValueError("load_dvae needs encoder_path, decoder_path or both")
    enc_sd = None if encoder_path is None else read_state_dict(encoder_path, trust_pickle=trust_pickle)
    dec_sd = None if decoder_path is None else read_state_dict(decoder_path, trust_pickle=trust_pickle)
    config = infer_config(enc_sd, dec_sd)

    def to_device(state_dict, part):
        if state_dict is None:
            return None
        return jax.tree.map(jnp.asarray, params_from_state_dict(state_dict, config, part))

    return PretrainedDVAE(
        config=config,
        encoder_params=to_device(enc_sd, "encoder"),
        decoder_params=to_device(dec_sd, "decoder"),
        dtype=np.dtype(dtype or jnp.float32).type,
    )
