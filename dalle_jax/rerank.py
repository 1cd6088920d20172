"""Reranking generated images with CLIP: score every candidate against its caption, keep the best.

Ramesh et al. 2021, section 2.6: "we rerank the samples drawn from the
transformer using a pretrained contrastive model ... the score is based on how
well the image matches the caption"; the paper draws 512 samples per caption
and keeps the top 32. The score is CLIP's cosine similarity between the
image and caption embeddings (Radford et al. 2021).

Candidates are resized to CLIP's input size on the device (bicubic with
antialiasing, `jax.image.resize`), rounded to uint8 pixels as if saved, and
encoded through the bundle's uint8 path, so no candidate leaves the device
before it is ranked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clip_jax.model import normalize


def to_clip_pixels(images: jax.Array, size: int) -> jax.Array:
    """float (B, H, W, 3) in [0, 1] -> uint8 (B, size, size, 3) (square images: resize, no crop needed)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"Expected square RGB images (B, H, H, 3) in [0, 1], found {images.shape}.")
    resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, 3), "bicubic",
                               antialias=True)
    return jnp.round(jnp.clip(resized, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def clip_scores(bundle: Any, images: jax.Array, text_ids: Any) -> jax.Array:
    """Cosine similarity float32 (C, N) of N candidates per caption: images (C, N, H, W, 3) in [0, 1],
    text_ids int (C, context_length) from `bundle.tokenize`."""
    captions, candidates = images.shape[:2]
    if len(text_ids) != captions:
        raise ValueError(f"Expected one caption per candidate group: {captions} groups, {len(text_ids)} captions.")
    pixels = to_clip_pixels(images.reshape(-1, *images.shape[2:]), bundle.image_size)  # (C N, S, S, 3)
    image_features = normalize(bundle.encode_image(pixels)).reshape(captions, candidates, -1)  # (C, N, E)
    text_features = normalize(bundle.encode_text(text_ids))  # (C, E)
    return jnp.einsum("cne,ce->cn", image_features.astype(jnp.float32), text_features.astype(jnp.float32))


def rerank(bundle: Any, images: jax.Array, text_ids: Any, keep: int) -> tuple[jax.Array, jax.Array]:
    """(indices int32 (C, keep), scores (C, keep)): each caption's `keep` best candidates, best first."""
    if not 1 <= keep <= images.shape[1]:
        raise ValueError(f"Expected 1 <= keep <= {images.shape[1]} candidates, found keep={keep}.")
    scores, indices = jax.lax.top_k(clip_scores(bundle, images, text_ids), keep)
    return indices.astype(jnp.int32), scores
