"""CLIP's Vision Transformer image encoder (OpenAI clip/model.py `VisionTransformer`).

Patchify with a bias-free strided conv, prepend a class token, add positional embeddings,
`ln_pre`, the transformer, `ln_post` on the class token, then a bias-free projection into
the joint embedding space (Radford et al. 2021, section 2.4). Images are NHWC.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.variants import VisionConfig
from common.layers import Dtype, LayerNorm, Transformer, partitioned, torch_default_kernel_init


class VisionTransformer(nn.Module):
    config: VisionConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) float -> image features (B, embed_dim), not normalised."""
        cfg = self.config
        size, patch, width = cfg.image_size, cfg.patch_size, cfg.width
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected images of shape (batch, {size}, {size}, 3) (NHWC), found {images.shape}")
        x = nn.Conv(
            width,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            use_bias=False,
            # RGB input: 3 channels are never sharded.
            kernel_init=partitioned(torch_default_kernel_init(), ("conv_h", "conv_w", None, "conv_out")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(images.astype(self.dtype))  # (B, grid, grid, width)
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)  # (B, grid**2, width), row-major patches as torch's flatten
        scale = width**-0.5
        class_embedding = self.param(
            "class_embedding", partitioned(nn.initializers.normal(scale), ("embed",)), (width,), self.param_dtype
        )
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(scale), ("pos", "embed")),
            ((size // patch) ** 2 + 1, width),
            self.param_dtype,
        )
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + positional_embedding.astype(self.dtype)  # (B, grid**2 + 1, width)
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_pre")(x)
        x = Transformer(
            width,
            cfg.layers,
            cfg.heads,
            cfg.mlp_dim,
            cfg.act,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            name="transformer",
        )(x)
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_post")(x[:, 0])  # (B, width)
        proj = self.param(
            "proj",
            partitioned(nn.initializers.normal(scale), ("embed", None)),  # output axis replicated
            (width, self.embed_dim),
            self.param_dtype,
        )
        return x @ proj.astype(self.dtype)
