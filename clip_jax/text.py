"""CLIP's text encoder (OpenAI clip/model.py `CLIP.encode_text`).

Token + positional embeddings, a causally masked transformer, `ln_final`, then the
activation at the end-of-text token, which has the highest id in CLIP's BPE vocabulary,
projected by a bias-free `text_projection` (Radford et al. 2021, section 2.4).

Length buckets: under the causal mask nothing after the end-of-text token reaches it, so a
batch run only up to its longest end-of-text position gives the features of the full
context-length pass. `bucket_length` rounds that up to one of a few lengths, so a caller
compiles a handful of programs rather than one per batch (OpenAI always runs all 77).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.variants import TextConfig
from common.layers import Dtype, LayerNorm, Transformer, partitioned


# Captions are short: ImageNet prompts need <= ~20 positions, web alt text ~25; 77 is the context.
LENGTH_BUCKETS = (8, 16, 24, 32, 48)


def bucket_length(token_ids: np.ndarray | jax.Array, context_length: int,
                  buckets: tuple[int, ...] = LENGTH_BUCKETS) -> int:
    """The shortest of `buckets` (or `context_length`) that keeps every row's end-of-text token.

    token_ids (B, L) -> int. Reading a jax.Array's end-of-text positions copies one scalar to the host.
    """
    if not token_ids.shape[0]:
        return context_length
    eot = np.argmax(token_ids, axis=-1) if isinstance(token_ids, np.ndarray) else jnp.argmax(token_ids, axis=-1)
    needed = int(eot.max()) + 1  # positions up to and including the last end-of-text token
    return min([b for b in buckets if b >= needed] + [context_length])


class TextTransformer(nn.Module):
    config: TextConfig
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, texts: jax.Array) -> jax.Array:
        """texts (B, L) int token ids, L <= context_length -> text features (B, embed_dim), not normalised.

        Sequences shorter than the context use the first L positional embeddings; with the
        causal mask this equals zero-padding them to the full context.
        """
        cfg = self.config
        if texts.ndim != 2 or texts.shape[1] > cfg.context_length:
            raise ValueError(f"expected token ids of shape (batch, <= {cfg.context_length}), found {texts.shape}")
        length = texts.shape[1]
        x = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embedding",
        )(texts)  # (B, L, width)
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(0.01), ("pos", "embed")),
            (cfg.context_length, cfg.width),
            self.param_dtype,
        )
        x = x + positional_embedding[:length].astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # (L, L), True = may attend
        x = Transformer(
            cfg.width,
            cfg.layers,
            cfg.heads,
            cfg.mlp_dim,
            cfg.act,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            name="transformer",
        )(x, causal, rows=jnp.argmax(texts, axis=-1))  # (B, width) at the end-of-text token: the first
        # position of the highest id, as torch.argmax
        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(x)
        text_projection = self.param(
            "text_projection",
            partitioned(nn.initializers.normal(cfg.width**-0.5), ("embed", None)),
            (cfg.width, self.embed_dim),
            self.param_dtype,
        )
        return x @ text_projection.astype(self.dtype)
