"""DALL·E sampling: the KV-cache program equals full recomputation, prompts are kept, filters and guidance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.sample import filter_logits, sample_image_tokens
from dalle_jax.transformer import DALLE
from dalle_jax.variants import decode_variant

CONFIG = dataclasses.replace(decode_variant("tiny"), image_h=4, image_w=4, text_len=6, layers=3)


@pytest.fixture(scope="module")
def model_and_params():
    model = DALLE(CONFIG)
    text = jnp.ones((1, CONFIG.text_len), jnp.int32)
    codes = jnp.zeros((1, CONFIG.image_len), jnp.int32)
    return model, model.init(jax.random.key(0), text, codes)["params"]


def _text(batch=2):
    text = np.random.default_rng(1).integers(1, CONFIG.text_vocab, (batch, CONFIG.text_len)).astype(np.int32)
    text[:, 4:] = 0
    return jnp.asarray(text)


@pytest.mark.parametrize("options", [dict(), dict(guidance_scale=3.0, top_k=20), dict(top_p=0.8, temperature=0.7)])
def test_cache_gives_the_tokens_of_full_recomputation(model_and_params, options):
    model, params = model_and_params
    rng = jax.random.key(2)
    cached = sample_image_tokens(model, params, _text(), rng, **options)
    full = sample_image_tokens(model, params, _text(), rng, use_cache=False, **options)
    assert cached.shape == (2, CONFIG.image_len) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, full)
    assert len(np.unique(np.asarray(cached))) > 1  # not a constant


def test_image_prompt_is_kept_and_completion_matches(model_and_params):
    model, params = model_and_params
    prompt = jnp.asarray(np.arange(8).reshape(1, 8).repeat(2, 0) % CONFIG.image_vocab, jnp.int32)  # two rows
    out = sample_image_tokens(model, params, _text(), jax.random.key(3), prompt=prompt)
    np.testing.assert_array_equal(out[:, :8], prompt)
    full = sample_image_tokens(model, params, _text(), jax.random.key(3), prompt=prompt, use_cache=False)
    np.testing.assert_array_equal(out, full)


def test_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    assert np.isfinite(filter_logits(logits, top_p=0.75)).sum() == 2  # 0.5 + 0.3 reaches 0.75
    assert np.isfinite(filter_logits(logits, top_p=0.5)).sum() == 1
    np.testing.assert_allclose(filter_logits(logits, temperature=2.0), logits / 2)


def test_bad_arguments(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match="text ids"):
        sample_image_tokens(model, params, _text()[:, :3], jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        sample_image_tokens(model, params, _text(), jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        sample_image_tokens(model, params, _text(), jax.random.key(0),
                            prompt=jnp.zeros((2, CONFIG.image_len), jnp.int32))
