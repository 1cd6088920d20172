"""Sampling image tokens from the DALL·E transformer: one compiled program per prompt length.

The caption (and, for image-to-image completion, the first `P` image tokens:
the top rows of an image) is run once through the key/value cache ("prefill");
then each image token is drawn from the logits of the previous slot and fed
back as one new slot, so a step costs one position instead of the whole
stream. The loop is a `lax.fori_loop` inside one `jax.jit`.

Drawing a token: logits / temperature, then optionally top-k (keep the k most
likely) and top-p (keep the smallest set whose probability reaches p, Holtzman
et al. 2020), then a categorical draw with the key `fold_in(rng, position)`.
Classifier-free guidance (Ho & Salimans 2021) runs every caption beside the
empty caption (all padding, which caption dropout trains for) and draws from
uncond + scale * (cond - uncond).

`sample_image_tokens(..., use_cache=False)` recomputes the whole stream per
token instead (the reference for the cache, and the benchmark's baseline):
the same keys give the same tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dalle_jax.transformer import DALLE


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """(B, V) fp32 logits -> logits with the excluded tokens at -inf (see the module docstring)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest prefix whose mass reaches top_p: its last logit is the threshold.
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)  # (B, 1)
        threshold = jnp.take_along_axis(sorted_logits, jnp.minimum(cutoff_index, logits.shape[-1] - 1), axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _check(model: DALLE, text: jax.Array, prompt: jax.Array, temperature: float, top_k: int, top_p: float,
           guidance_scale: float) -> None:
    cfg = model.config
    if text.ndim != 2 or text.shape[1] != cfg.text_len:
        raise ValueError(f"Expected text ids (B, {cfg.text_len}), found {text.shape}.")
    if prompt.ndim != 2 or prompt.shape[0] != text.shape[0] or prompt.shape[1] >= cfg.image_len:
        raise ValueError(f"Expected prompt codes (B, P) with P < {cfg.image_len} and B = {text.shape[0]}, "
                         f"found {prompt.shape}.")
    if temperature <= 0 or not 0 <= top_k <= cfg.image_vocab or not 0 < top_p <= 1 or guidance_scale < 0:
        raise ValueError(f"Expected temperature > 0, 0 <= top_k <= {cfg.image_vocab}, 0 < top_p <= 1 and "
                         f"guidance_scale >= 0, found {temperature}, {top_k}, {top_p}, {guidance_scale}.")


def sample_image_tokens(model: DALLE, params: Any, text: jax.Array, rng: jax.Array, *,
                        prompt: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, guidance_scale: float = 1.0, use_cache: bool = True) -> jax.Array:
    """Image codes int32 (B, image_len) for captions `text` (B, text_len); see the module docstring.

    prompt: int (B, P) codes of the first P raster positions, kept as given (image-to-image).
    guidance_scale: 1 samples the conditional model alone; other values mix in the unconditional one.
    """
    prompt = jnp.zeros((text.shape[0], 0), jnp.int32) if prompt is None else jnp.asarray(prompt, jnp.int32)
    text = jnp.asarray(text, jnp.int32)
    _check(model, text, prompt, temperature, top_k, top_p, guidance_scale)
    run = _sample_cached if use_cache else _sample_uncached
    return run(model, params, text, prompt, rng, temperature=temperature, top_k=top_k, top_p=top_p,
               guidance_scale=guidance_scale)


def _with_unconditional(text: jax.Array, guidance_scale: float) -> jax.Array:
    """Captions, followed by as many empty ones when guidance is on: (B or 2B, T)."""
    return text if guidance_scale == 1.0 else jnp.concatenate([text, jnp.zeros_like(text)])


def guided_logits(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 is the conditional model."""
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


def _draw(logits: jax.Array, rng: jax.Array, position: jax.Array, batch: int, guidance_scale: float,
          **filters: Any) -> jax.Array:
    """(B or 2B, V) logits of one position -> int32 (B,) tokens."""
    if guidance_scale != 1.0:
        logits = guided_logits(logits[:batch], logits[batch:], guidance_scale)
    return jax.random.categorical(jax.random.fold_in(rng, position), filter_logits(logits, **filters)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p", "guidance_scale"))
def _sample_cached(model: DALLE, params: Any, text: jax.Array, prompt: jax.Array, rng: jax.Array, *,
                   guidance_scale: float, **filters: Any) -> jax.Array:
    cfg, batch, num_prompt = model.config, text.shape[0], prompt.shape[1]
    decoder = model.clone(decode=True)
    stream_text = _with_unconditional(text, guidance_scale)  # (B', T)
    rows = stream_text.shape[0]
    prompt_rows = jnp.concatenate([prompt] * (rows // batch))  # (B', P)

    def embed(method, *args):
        return decoder.apply({"params": params}, *args, method=method)

    prefill = jnp.concatenate([embed(DALLE.start_slot, rows), embed(DALLE.embed_text, stream_text),
                               embed(DALLE.embed_image, prompt_rows, 0)], axis=1)  # (B', 1 + T + P, D)
    logits, variables = decoder.apply({"params": params}, prefill, 0, method=DALLE.decode_slots, mutable=["cache"])
    codes = jnp.zeros((batch, cfg.image_len), jnp.int32).at[:, :num_prompt].set(prompt)
    draw = functools.partial(_draw, rng=rng, batch=batch, guidance_scale=guidance_scale, **filters)

    def step(position, carry):
        codes, cache, last_logits = carry
        token = draw(last_logits, position=position)  # (B,)
        codes = codes.at[:, position].set(token)
        tokens = jnp.concatenate([token] * (rows // batch))[:, None]  # (B', 1)
        x = decoder.apply({"params": params}, tokens, position, method=DALLE.embed_image)  # (B', 1, D)
        logits, variables = decoder.apply({"params": params, **cache}, x, cfg.text_len + position + 1,
                                          method=DALLE.decode_slots, mutable=["cache"])
        return codes, variables, logits[:, 0]

    codes, _, last = jax.lax.fori_loop(num_prompt, cfg.image_len - 1, step, (codes, variables, logits[:, -1]))
    return codes.at[:, -1].set(draw(last, position=cfg.image_len - 1))


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p", "guidance_scale"))
def _sample_uncached(model: DALLE, params: Any, text: jax.Array, prompt: jax.Array, rng: jax.Array, *,
                     guidance_scale: float, **filters: Any) -> jax.Array:
    cfg, batch = model.config, text.shape[0]
    stream_text = _with_unconditional(text, guidance_scale)
    repeats = stream_text.shape[0] // batch
    codes = jnp.zeros((batch, cfg.image_len), jnp.int32).at[:, : prompt.shape[1]].set(prompt)
    draw = functools.partial(_draw, rng=rng, batch=batch, guidance_scale=guidance_scale, **filters)

    def step(position, codes):
        _, image_logits = model.apply({"params": params}, stream_text, jnp.concatenate([codes] * repeats))
        return codes.at[:, position].set(draw(image_logits[:, position], position=position))

    return jax.lax.fori_loop(prompt.shape[1], cfg.image_len, step, codes)
