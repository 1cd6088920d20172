"""The DALL·E transformer: one decoder-only stream of caption tokens then image tokens.

Ramesh et al. 2021, section 2.2 and appendix B.1. The stream is the
`text_len` caption tokens, each padding position replaced by that position's
own padding token, followed by the `image_h * image_w` dVAE codes in raster
order. Input slot p holds token p - 1 (slot 0 a learned start vector), so the
output at slot p predicts token p. Each token carries a learned position:
text positions one embedding each, image tokens the sum of a row and a column
embedding. Every layer is a pre-norm residual block (common/layers.py) whose
mask comes from `dalle_jax.masks` by the layer's kind (row, column, conv or
dense), so the per-layer schedule survives `scan_layers`: the masks enter the
scan as a stacked input, one per layer.

The loss is cross-entropy in fp32, weighted 1/8 on the text tokens and 7/8
on the image tokens, each a mean over the tokens of its kind in the batch
(section 2.2: the paper is primarily interested in image modelling).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.layers import Dtype, LayerNorm, Transformer, partitioned
from dalle_jax.masks import attention_mask, layer_kinds
from dalle_jax.variants import DALLEConfig

TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 1.0 / 8.0, 7.0 / 8.0
PAD_ID = 0  # the caption tokenizer's padding id (common/tokenizers/sentencepiece.py)


def text_stream_ids(text: jax.Array, text_vocab: int) -> jax.Array:
    """int (B, T) caption ids, PAD_ID where padded -> stream ids with padding at T position p = text_vocab + p."""
    positions = jnp.arange(text.shape[-1])
    return jnp.where(text == PAD_ID, text_vocab + positions, text)


def layer_masks(config: DALLEConfig) -> jax.Array:
    """bool (L, L) when every layer shares one mask kind, else (layers, L, L): layer i's mask."""
    kinds = layer_kinds(config.layers, config.attention)
    build = lambda kind: attention_mask(kind, text_len=config.text_len, image_h=config.image_h,  # noqa: E731
                                        image_w=config.image_w, kernel=config.conv_kernel, xp=jnp)
    unique = {kind: build(kind) for kind in dict.fromkeys(kinds)}
    if len(unique) == 1:
        return unique[kinds[0]]
    return jnp.stack([unique[kind] for kind in kinds])


class DALLE(nn.Module):
    """text (B, text_len) int caption ids (PAD_ID = padding), codes (B, image_h * image_w) int
    -> (text logits (B, text_len, text_vocab + text_len), image logits (B, image_len, image_vocab)), fp32.

    decode=True gives every attention layer a key/value cache over the whole stream, for
    `decode_slots` (dalle_jax/sample.py); the parameters are the same.
    """

    config: DALLEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    decode: bool = False

    def setup(self):
        cfg = self.config
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = lambda rows: nn.Embed(  # noqa: E731
            rows, cfg.width, embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")), **dtypes)
        position = lambda name, rows: self.param(  # noqa: E731
            name, partitioned(nn.initializers.normal(0.01), ("pos", "embed")), (rows, cfg.width), self.param_dtype)
        self.text_embedding = embed(cfg.text_tokens)
        self.image_embedding = embed(cfg.image_vocab)
        self.text_positions = position("text_positions", cfg.text_len)
        self.image_row_positions = position("image_row_positions", cfg.image_h)
        self.image_column_positions = position("image_column_positions", cfg.image_w)
        self.start = position("start", 1)  # the input of slot 0
        self.masks = layer_masks(cfg)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio * cfg.width, "gelu",
                                       remat=self.remat, scan_layers=self.scan_layers,
                                       per_layer_mask=self.masks.ndim == 3,
                                       cache_length=cfg.seq_len if self.decode else 0, **dtypes)
        self.ln_final = LayerNorm(**dtypes)
        head = lambda features: nn.Dense(  # noqa: E731
            features, kernel_init=partitioned(nn.initializers.normal(cfg.width**-0.5), ("embed", "vocab")),
            bias_init=partitioned(nn.initializers.zeros_init(), ("vocab",)), **dtypes)
        self.to_text_logits = head(cfg.text_tokens)
        self.to_image_logits = head(cfg.image_vocab)

    def embed_text(self, text: jax.Array) -> jax.Array:
        """(B, T) caption ids -> (B, T, D) token + position embeddings."""
        x = self.text_embedding(text_stream_ids(text, self.config.text_vocab))
        return x + self.text_positions.astype(self.dtype)

    def embed_image(self, codes: jax.Array, first: int | jax.Array = 0) -> jax.Array:
        """(B, n) codes at raster positions first .. first + n - 1 -> (B, n, D)."""
        cfg = self.config
        table = (self.image_row_positions[:, None] + self.image_column_positions[None, :]).reshape(
            cfg.image_len, cfg.width)  # (N, D): row + column embedding of each raster position
        positions = jax.lax.dynamic_slice_in_dim(table, first, codes.shape[1])
        return self.image_embedding(codes) + positions.astype(self.dtype)

    def start_slot(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.start.astype(self.dtype), (batch, 1, self.config.width))  # (B, 1, D)

    def __call__(self, text: jax.Array, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        if text.shape[1:] != (cfg.text_len,) or codes.shape[1:] != (cfg.image_len,) or text.shape[0] != codes.shape[0]:
            raise ValueError(f"Expected text (B, {cfg.text_len}) and codes (B, {cfg.image_len}), found "
                             f"{text.shape} and {codes.shape}.")
        x = jnp.concatenate([self.start_slot(text.shape[0]), self.embed_text(text),
                             self.embed_image(codes[:, :-1])], axis=1)  # (B, L, D): slot p holds token p - 1
        x = self._blocks(nn.with_logical_constraint(x, ("batch", "length", "embed")), self.masks)
        text_logits = self.to_text_logits(x[:, : cfg.text_len])  # (B, T, V_text)
        image_logits = self.to_image_logits(x[:, cfg.text_len:])  # (B, N, V_image)
        return text_logits.astype(jnp.float32), image_logits.astype(jnp.float32)

    def decode_slots(self, x: jax.Array, first_slot: int | jax.Array) -> jax.Array:
        """Slot inputs x (B, n, D) at slots first_slot .. first_slot + n - 1, through the cache
        (decode=True; the slots before must have been decoded already) -> image logits (B, n, V_image) fp32
        of the image tokens those slots predict (slot p predicts image token p - text_len)."""
        rows = jax.lax.dynamic_slice_in_dim(self.masks, first_slot, x.shape[1], axis=-2)  # (..., n, L)
        return self.to_image_logits(self._blocks(x, rows)).astype(jnp.float32)

    def _blocks(self, x: jax.Array, masks: jax.Array) -> jax.Array:
        return self.ln_final(self.transformer(x, masks))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy in fp32: logits (..., V), integer targets (...)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1))


def dalle_loss(text_logits: jax.Array, image_logits: jax.Array, text: jax.Array, codes: jax.Array,
               text_vocab: int) -> tuple[jax.Array, dict[str, Any]]:
    """1/8 text + 7/8 image cross-entropy (module docstring); the text targets include the padding tokens."""
    text_loss = cross_entropy(text_logits, text_stream_ids(text, text_vocab))
    image_loss = cross_entropy(image_logits, codes)
    loss = TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * image_loss
    return loss, {"text_loss": text_loss, "image_loss": image_loss}
