"""Training the DALL·E transformer on the shared trainer: `DALLETask`.

Batches are {"text": int32 (B, text_len) caption ids, PAD_ID-padded, "codes":
int (B, image_h, image_w) or (B, image_len) dVAE codes}, as the array_record
shards of precomputed tokens give them (or a frozen dVAE on the fly). The
loss is the paper's 1/8 text + 7/8 image cross-entropy (dalle_jax/transformer.py).

Caption dropout: each caption is replaced by the empty one (all padding)
with probability `caption_dropout`, so the same model also learns the
unconditional distribution that classifier-free guidance (Ho & Salimans 2021)
contrasts with the conditional one at sampling time (dalle_jax/sample.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dalle_jax.transformer import DALLE, PAD_ID, dalle_loss
from dalle_jax.variants import DALLEConfig


def drop_captions(text: jax.Array, rng: jax.Array, rate: float) -> jax.Array:
    """(B, T) caption ids with each row replaced by the empty caption (all PAD_ID) with probability `rate`."""
    drop = jax.random.bernoulli(rng, rate, (text.shape[0], 1))  # (B, 1)
    return jnp.where(drop, PAD_ID, text)


class DALLETask:
    """The DALL·E transformer as a `common.trainer.Task`."""

    def __init__(self, config: DALLEConfig, *, caption_dropout: float = 0.0, dtype: Any = jnp.float32,
                 remat: bool = False, scan_layers: bool = False):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"Expected 0 <= caption_dropout < 1, found {caption_dropout}.")
        self.config, self.caption_dropout = config, caption_dropout
        self.model = DALLE(config, dtype=dtype, remat=remat, scan_layers=scan_layers)

    def init(self, rng: jax.Array) -> dict:
        text = jnp.zeros((1, self.config.text_len), jnp.int32)
        codes = jnp.zeros((1, self.config.image_len), jnp.int32)
        return dict(self.model.init(rng, text, codes))

    def _inputs(self, batch: Any) -> tuple[jax.Array, jax.Array]:
        text = batch["text"].astype(jnp.int32)  # (B, T)
        codes = batch["codes"].astype(jnp.int32).reshape(text.shape[0], -1)  # (B, N)
        return text, codes

    def _loss(self, params: Any, text: jax.Array, codes: jax.Array) -> tuple[jax.Array, dict]:
        text_logits, image_logits = self.model.apply({"params": params}, text, codes)
        return dalle_loss(text_logits, image_logits, text, codes, self.config.text_vocab)

    def loss(self, params, model_state, batch, rng, update):
        text, codes = self._inputs(batch)
        if self.caption_dropout:
            text = drop_captions(text, rng, self.caption_dropout)
        loss, metrics = self._loss(params, text, codes)
        return loss, metrics, None

    def eval_metrics(self, params, model_state, batch):
        loss, metrics = self._loss(params, *self._inputs(batch))
        return {"loss": loss, **metrics}
