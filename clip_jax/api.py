"""`clip_jax.load`: a CLIP model, its weights and its pre-processing in one object.

    model = clip_jax.load("ViT-B/32")                      # random init of a named variant
    model = clip_jax.load("/ckpts/ViT-B-32.pt")            # OpenAI / open_clip / HF weights, architecture inferred
    model = clip_jax.load("/ckpts/ViT-B-32.pt", image_size=384)  # position grid resized: 7x7 -> 12x12 patches
    feats = model.encode_image(np.stack([model.preprocess(img)]))
    text = model.encode_text(model.tokenize(["a photo of a cat."]))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clip_jax import resize, text, weights
from clip_jax.model import CLIP, dummy_inputs
from clip_jax.variants import CLIPConfig, decode_variant, known_variants
from common.images import clip_preprocess
from common.layers import convolution_jit
from common.tokenizers import clip_bpe


@dataclasses.dataclass(eq=False)
class CLIPBundle:
    """A CLIP module with its variables; methods are jitted once per input shape."""

    model: CLIP
    variables: dict  # {"params": ..., "batch_stats": ... for ModifiedResNets}
    config: CLIPConfig
    source: str  # "random-init", "openai", "hf"

    def __post_init__(self):
        # Host (numpy) weights go to the default device once here; left on the host they would be
        # copied to the device again by every call (~25 ms per ViT-B/16 call on a CPU).
        self.variables = jax.tree.map(lambda x: jax.device_put(x) if isinstance(x, np.ndarray) else x,
                                      self.variables)

    @property
    def params(self) -> Any:
        return self.variables["params"]

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @functools.cached_property
    def _jit_images(self):
        """jax.jit, or for a ModifiedResNet tower `convolution_jit` (XLA's own convolutions on a CPU)."""
        return convolution_jit if self.config.vision.is_resnet else jax.jit

    @functools.cached_property
    def _encode_image(self):
        return self._jit_images(lambda v, x: self.model.apply(v, x, method=CLIP.encode_image))

    @functools.cached_property
    def _encode_text(self):
        # length: static, one of text.bucket_length's few values, so at most a handful of programs per batch shape.
        return jax.jit(lambda v, t, length: self.model.apply(v, t[:, :length], method=CLIP.encode_text),
                       static_argnums=2)

    @functools.cached_property
    def _logits(self):
        return self._jit_images(lambda v, x, t, length: self.model.apply(v, x, t[:, :length]), static_argnums=3)

    def _checked_images(self, images: Any) -> jax.Array:
        images = jnp.asarray(images)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"encode_image expects NHWC images of shape (B, {s}, {s}, 3), uint8 pixels or "
                             f"preprocessed floats; found {tuple(images.shape)}. Use .preprocess(pil_image) on each "
                             "image first, or common.data.transforms.CenterCrop.")
        return images

    def _checked_tokens(self, token_ids: Any) -> tuple[jax.Array, int]:
        """(token ids on the device, the length bucket that keeps every end-of-text token)."""
        on_host = not isinstance(token_ids, jax.Array)
        token_ids = np.asarray(token_ids) if on_host else token_ids
        if token_ids.ndim != 2 or token_ids.shape[1] != self.context_length or not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise ValueError(f"encode_text expects integer token ids of shape (B, {self.context_length}); found "
                             f"{token_ids.dtype} {tuple(token_ids.shape)}. Use .tokenize(texts).")
        # Out-of-vocabulary ids would embed as NaN; checked where it costs no device round trip.
        vocab = self.config.text.vocab_size
        if on_host and token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab):
            raise ValueError(f"encode_text expects token ids in [0, {vocab}), found ids from {token_ids.min()} to "
                             f"{token_ids.max()}. Use .tokenize(texts), whose vocabulary this model shares.")
        # The bucket is read before the copy to the device, where the ids are already on the host.
        return jnp.asarray(token_ids), text.bucket_length(token_ids, self.context_length)

    def encode_image(self, images: Any) -> jax.Array:
        """images: (B, S, S, 3) uint8 RGB (normalised on the device) or float, already preprocessed
        (see `preprocess`) -> (B, embed_dim)."""
        return self._encode_image(self.variables, self._checked_images(images))

    def encode_text(self, token_ids: Any) -> jax.Array:
        """token_ids: int (B, context_length) from `tokenize` -> (B, embed_dim).

        Runs the batch only up to its longest end-of-text position, rounded up to a length
        bucket (`clip_jax.text.bucket_length`): the features of the full pass, for a fraction of
        the work on short captions. A jax.Array costs one scalar copied back to pick the bucket.
        Ids outside the vocabulary are refused when given as numpy (a jax.Array is not copied back to check).
        """
        return self._encode_text(self.variables, *self._checked_tokens(token_ids))

    def logits(self, images: Any, token_ids: Any) -> tuple[jax.Array, jax.Array]:
        """(logits_per_image, logits_per_text), as OpenAI's `model(image, text)`; text bucketed as `encode_text`."""
        return self._logits(self.variables, self._checked_images(images), *self._checked_tokens(token_ids))

    def preprocess(self, pil_image) -> np.ndarray:
        """PIL image -> float32 (S, S, 3), exactly OpenAI's CLIP transform."""
        return clip_preprocess(pil_image, size=self.image_size)

    def tokenize(self, texts: str | Sequence[str], truncate: bool = False) -> np.ndarray:
        return clip_bpe.tokenize(texts, context_length=self.context_length, truncate=truncate)

    def save_openai(self, path: str | os.PathLike) -> Path:
        """Exports an OpenAI-format state dict (.pt or .safetensors) that runs in PyTorch."""
        return weights.save_openai_state_dict(jax.device_get(self.variables), self.config, path)


def _cast(variables: dict, dtype) -> dict:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
                        variables)


def load(name_or_path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32, seed: int = 0,
         act: str | None = None, vision_heads: int | None = None, text_heads: int | None = None,
         trust_torchscript: bool = False, image_size: int | None = None,
         context_length: int | None = None) -> CLIPBundle:
    """A CLIP bundle from a variant name (random init) or a checkpoint path (architecture inferred).

    dtype: compute dtype (e.g. jnp.bfloat16 on accelerators; default fp32).
    image_size, context_length: the bundle's input sizes; None keeps the variant's or the checkpoint's.
    A checkpoint's positional embeddings are resampled to them (`clip_jax.resize`: the ViT's grid
    bicubically, as open_clip's `resize_pos_embed`; text positions truncated or stretched), a variant
    is initialised at them.
    act ("quick_gelu" | "gelu"), vision_heads, text_heads: for OpenAI-format checkpoints
    whose heads/activation the weights cannot tell; refused where they do not apply.
    trust_torchscript: read TorchScript archives (OpenAI's .pt releases) with `torch.jit.load`,
    which runs the code stored in the archive. Off by default: they are read without running
    anything, and this is needed only for archives whose modules keep custom state.
    """
    dtype = jnp.float32 if dtype is None else dtype
    name = os.fspath(name_or_path)
    if name in known_variants() and not Path(name).exists():
        checkpoint_only = [k for k, v in (("act", act), ("vision_heads", vision_heads), ("text_heads", text_heads),
                                          ("trust_torchscript", trust_torchscript or None)) if v is not None]
        if checkpoint_only:
            raise TypeError(f"{checkpoint_only} only apply when loading a checkpoint, not the named variant {name!r}.")
        cfg = resize.resized_config(decode_variant(name), image_size=image_size, context_length=context_length)
        model = CLIP(cfg, dtype=dtype, param_dtype=param_dtype)
        variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), *dummy_inputs(cfg)))
        return CLIPBundle(model, variables, cfg, "random-init")
    if not Path(name).exists():
        raise FileNotFoundError(
            f"{name!r} is neither a known CLIP variant ({', '.join(known_variants())}) nor an existing path. "
            "Weights are never downloaded: pass the local path of an OpenAI .pt, open_clip checkpoint or "
            "Hugging Face CLIP directory."
        )
    cfg, variables, source = weights.load_variables(name, act=act, vision_heads=vision_heads, text_heads=text_heads,
                                                    trust_torchscript=trust_torchscript, image_size=image_size,
                                                    context_length=context_length)
    model = CLIP(cfg, dtype=dtype, param_dtype=param_dtype)
    return CLIPBundle(model, _cast(variables, param_dtype), cfg, source)
