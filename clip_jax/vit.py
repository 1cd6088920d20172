"""CLIP's Vision Transformer image encoder (OpenAI clip/model.py `VisionTransformer`).

Patchify with a bias-free strided conv, prepend a class token, add positional embeddings,
`ln_pre`, the transformer, `ln_post` on the class token, then a bias-free projection into
the joint embedding space (Radford et al. 2021, section 2.4). Images are NHWC.

Patch dropout (FLIP, Li et al. 2023, section 3; open_clip's `PatchDropout`): a training-only
module (`patch_dropout > 0`) keeps a random subset of the patch tokens of each image, after the
positional embeddings are added and before `ln_pre`; the class token is always kept. The
randomness comes from the "patch_dropout" rng collection.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.variants import VisionConfig
from common.layers import Dtype, LayerNorm, Transformer, conv_general_dilated, partitioned, torch_default_kernel_init


class VisionTransformer(nn.Module):
    config: VisionConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    patch_dropout: float = 0.0  # fraction of patch tokens dropped, per example; training only

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
            conv_general_dilated=conv_general_dilated,  # patches as one matmul (3x XLA CPU's strided conv)
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
        if self.patch_dropout > 0:
            x = keep_random_patches(x, self.patch_dropout, self.make_rng("patch_dropout"))  # (B, 1 + kept, width)
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
        )(x, rows=jnp.zeros((batch,), jnp.int32))  # (B, width): the class token's output
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_post")(x)  # (B, width)
        proj = self.param(
            "proj",
            partitioned(nn.initializers.normal(scale), ("embed", None)),  # output axis replicated
            (width, self.embed_dim),
            self.param_dtype,
        )
        return x @ proj.astype(self.dtype)


def patches_kept(num_patches: int, patch_dropout: float) -> int:
    """How many of `num_patches` tokens patch dropout keeps: at least one (open_clip's rule)."""
    return max(1, int(num_patches * (1.0 - patch_dropout)))


def keep_random_patches(x: jax.Array, patch_dropout: float, rng: jax.Array) -> jax.Array:
    """x (B, 1 + N, D), class token first -> (B, 1 + K, D): the class token and K random patches per example.

    Each example draws its own subset (top-K of uniform noise, as open_clip), kept in raster order.
    """
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"patch_dropout must be in [0, 1) (a fraction of patches dropped), found {patch_dropout}")
    cls, patches = x[:, :1], x[:, 1:]
    keep = patches_kept(patches.shape[1], patch_dropout)
    noise = jax.random.uniform(rng, patches.shape[:2])  # (B, N)
    kept = jnp.sort(jax.lax.top_k(noise, keep)[1], axis=-1)  # (B, K) patch indices
    return jnp.concatenate([cls, jnp.take_along_axis(patches, kept[..., None], axis=1)], axis=1)
