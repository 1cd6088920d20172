"""A CLIP bundle whose answers are known by construction, for evaluation tests.

Images are solid colours whose red channel is `CODE_STEP * code`; `encode_image`
reads `code` back from uint8 pixels (or from CLIP-normalised floats) and returns
row `code` of an image-feature table the test chooses. `encode_text` is a bag of words: the sum
of the vectors of the (single-token) words in the prompt, times the product of
their scales. Both are jnp functions, so they run on sharded batches, and they
record what they were given.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from common.images import CLIP_MEAN, CLIP_STD
from common.tokenizers.clip_bpe import tokenize

CODE_STEP = 20  # red-channel levels per code: codes 0 .. 12
VOCAB_SIZE = 49408


def code_image(code: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    """An RGB image that `FakeClip.encode_image` decodes to `code`."""
    return Image.new("RGB", size, (CODE_STEP * code, 0, 0))


def word_id(word: str) -> int:
    tokens = tokenize([word])[0]
    if tokens[2] != tokens.max():  # [SOT, word, EOT, 0, ...]
        raise ValueError(f"{word!r} is not a single CLIP BPE token.")
    return int(tokens[1])


class FakeClip:
    context_length = 77  # CLIP BPE ids, as every CLIP bundle's

    def __init__(self, image_table: np.ndarray, word_vectors: Mapping[str, np.ndarray],
                 word_scales: Mapping[str, float] | None = None, image_size: int = 16):
        self.image_size = image_size
        self.image_table = jnp.asarray(image_table, jnp.float32)  # (codes, D)
        vectors = np.zeros((VOCAB_SIZE, self.image_table.shape[1]), np.float32)
        scales = np.ones((VOCAB_SIZE,), np.float32)
        for word, vector in word_vectors.items():
            vectors[word_id(word)] = vector
        for word, scale in (word_scales or {}).items():
            scales[word_id(word)] = scale
        self._vectors, self._scales = jnp.asarray(vectors), jnp.asarray(scales)
        self.image_calls: list[tuple[tuple[int, ...], int]] = []  # (shape, devices holding the batch)
        self.text_calls: list[tuple[int, ...]] = []

    def tokenize(self, texts):
        return tokenize(texts)

    def encode_image(self, images: jax.Array) -> jax.Array:
        self.image_calls.append((tuple(images.shape), len(images.sharding.device_set)))
        red = images[..., 0].mean(axis=(1, 2))
        red = red / 255 if images.dtype == jnp.uint8 else red * CLIP_STD[0] + CLIP_MEAN[0]  # (B,) in [0, 1]
        code = jnp.clip(jnp.round(red * 255 / CODE_STEP), 0, len(self.image_table) - 1).astype(jnp.int32)
        return self.image_table[code]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        self.text_calls.append(tuple(tokens.shape))
        return self._vectors[tokens].sum(axis=1) * self._scales[tokens].prod(axis=1, keepdims=True)
