"""CLIP in JAX/Flax: encoders, weights in every common format, zero-shot and retrieval evaluation."""

from clip_jax.api import CLIPBundle, load
from clip_jax.model import CLIP
from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig, decode_variant, known_variants

__all__ = ["CLIP", "CLIPBundle", "CLIPConfig", "TextConfig", "VisionConfig", "decode_variant", "known_variants", "load"]
