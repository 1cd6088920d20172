"""Training the DALL·E transformer on the shared trainer: `DALLETask`.

Batches are {"text": int32 (B, text_len) caption ids, PAD_ID-padded, "codes":
int (B, image_h, image_w) or (B, image_len) dVAE codes}, as the array_record
shards of precomputed tokens give them. With a frozen dVAE encoder given to the
task, batches may carry {"image": uint8 (B, H, W, 3)} instead, encoded on the
device at every step (so the images can be augmented); the encoder's
parameters then live in the "frozen_dvae" collection of the train state, never
updated. The loss is the paper's 1/8 text + 7/8 image cross-entropy
(dalle_jax/transformer.py).

Caption dropout: each caption is replaced by the empty one (all padding)
with probability `caption_dropout`, so the same model also learns the
unconditional distribution that classifier-free guidance (Ho & Salimans 2021)
contrasts with the conditional one at sampling time (dalle_jax/sample.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dalle_jax.api import encode_to_codes
from dalle_jax.dvae import DVAEConfig
from dalle_jax.transformer import DALLE, PAD_ID, dalle_loss
from dalle_jax.variants import DALLEConfig


def drop_captions(text: jax.Array, rng: jax.Array, rate: float) -> jax.Array:
    """(B, T) caption ids with each row replaced by the empty caption (all PAD_ID) with probability `rate`."""
    drop = jax.random.bernoulli(rng, rate, (text.shape[0], 1))  # (B, 1)
    return jnp.where(drop, PAD_ID, text)


class DALLETask:
    """The DALL·E transformer as a `common.trainer.Task`."""

    def __init__(self, config: DALLEConfig, *, caption_dropout: float = 0.0, dtype: Any = jnp.float32,
                 remat: bool = False, scan_layers: bool = False,
                 dvae_encoder: tuple[DVAEConfig, Any] | None = None):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"Expected 0 <= caption_dropout < 1, found {caption_dropout}.")
        self.config, self.caption_dropout = config, caption_dropout
        self.model = DALLE(config, dtype=dtype, remat=remat, scan_layers=scan_layers)
        self.dvae_encoder = dvae_encoder  # (config, encoder params) to encode images on the fly

    def init(self, rng: jax.Array) -> dict:
        text = jnp.zeros((1, self.config.text_len), jnp.int32)
        codes = jnp.zeros((1, self.config.image_len), jnp.int32)
        variables = dict(self.model.init(rng, text, codes))
        if self.dvae_encoder is not None:
            variables["frozen_dvae"] = self.dvae_encoder[1]
        return variables

    def _inputs(self, batch: Any, model_state: Any) -> tuple[jax.Array, jax.Array]:
        text = batch["text"].astype(jnp.int32)  # (B, T)
        if "codes" in batch:
            codes = batch["codes"]
        elif self.dvae_encoder is not None:
            images = batch["image"].astype(jnp.float32) / 255.0  # (B, H, W, 3)
            codes = encode_to_codes(model_state["frozen_dvae"], images, config=self.dvae_encoder[0])  # (B, h, w)
        else:
            raise ValueError(f"A DALL·E batch needs 'codes', or 'image' with a dVAE encoder; found {sorted(batch)}.")
        return text, codes.astype(jnp.int32).reshape(text.shape[0], -1)  # (B, N)

    def _loss(self, params: Any, text: jax.Array, codes: jax.Array) -> tuple[jax.Array, dict]:
        text_logits, image_logits = self.model.apply({"params": params}, text, codes)
        return dalle_loss(text_logits, image_logits, text, codes, self.config.text_vocab)

    def loss(self, params, model_state, batch, rng, update):
        text, codes = self._inputs(batch, model_state)
        if self.caption_dropout:
            text = drop_captions(text, rng, self.caption_dropout)
        loss, metrics = self._loss(params, text, codes)
        return loss, metrics, None

    def eval_metrics(self, params, model_state, batch):
        loss, metrics = self._loss(params, *self._inputs(batch, model_state))
        return {"loss": loss, **metrics}
