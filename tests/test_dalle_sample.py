"""DALL·E sampling: the KV-cache program equals full recomputation, prompts are kept, filters and guidance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from dalle_jax import sample
from dalle_jax.sample import filter_logits, guided_logits, sample_image_tokens
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


@pytest.mark.parametrize("attention", ["sparse", "dense", "row", "column", "conv"])
def test_cached_logits_equal_the_full_forward_at_every_position(attention):
    config = dataclasses.replace(CONFIG, attention=attention)
    model = DALLE(config)
    text = _text()
    codes = jnp.asarray(np.random.default_rng(5).integers(0, config.image_vocab, (2, config.image_len)), jnp.int32)
    params = model.init(jax.random.key(6), text, codes)["params"]
    _, full = model.apply({"params": params}, text, codes)  # (B, N, V)
    decoder = model.clone(decode=True)
    apply = lambda method, *args, **kw: decoder.apply({"params": params}, *args, method=method, **kw)  # noqa: E731
    prefill = jnp.concatenate([apply(DALLE.start_slot, 2), apply(DALLE.embed_text, text)], axis=1)
    logits, cache = apply(DALLE.decode_slots, prefill, 0, mutable=["cache"])
    cached = [logits[:, -1]]
    for j in range(config.image_len - 1):
        x = apply(DALLE.embed_image, codes[:, j:j + 1], j)
        logits, cache = decoder.apply({"params": params, **cache}, x, config.text_len + j + 1,
                                      method=DALLE.decode_slots, mutable=["cache"])
        cached.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(cached, axis=1), full, atol=1e-4)


def test_one_compilation_per_shape(model_and_params):
    model, params = model_and_params
    sample._sample_cached.clear_cache()
    for seed in range(3):
        sample_image_tokens(model, params, _text(), jax.random.key(seed), top_k=5)
    assert sample._sample_cached._cache_size() == 1


def test_sharded_parameters_and_batch_give_the_same_tokens(model_and_params, n_devices):
    model, params = model_and_params
    text = _text(batch=8)
    single = sample_image_tokens(model, params, text, jax.random.key(9), guidance_scale=2.0)
    for preset in ("fsdp_tp",):  # parameters split over fsdp and tensor at once
        mesh = sharding.make_mesh(preset)
        init = lambda rng: model.init(rng, text, jnp.zeros((8, CONFIG.image_len), jnp.int32))  # noqa: E731
        _, shardings = sharding.init_sharded(init, jax.random.key(0), mesh=mesh)
        sharded_params = jax.device_put(params, shardings["params"])
        with sharding.use_mesh(mesh):
            tokens = sample_image_tokens(model, sharded_params, jax.device_put(text, sharding.batch_sharding(mesh, 2)),
                                         jax.random.key(9), guidance_scale=2.0)
        np.testing.assert_array_equal(tokens, single)


def _numpy_filter(logits, top_k, top_p):
    """Reference: keep the top-k, then the smallest most-likely set whose mass reaches top_p."""
    out = np.array(logits, np.float64)
    for row in out:
        order = np.argsort(-row, kind="stable")
        keep = set(order[:top_k]) if top_k else set(order)
        if top_p < 1.0:
            kept = [i for i in order if i in keep]
            p = np.exp(row[kept] - row[kept].max())
            p /= p.sum()
            count = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            keep = set(kept[:count])
        row[[i for i in range(len(row)) if i not in keep]] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (7, 0.6), (0, 0.3)])
def test_filters_equal_a_numpy_reference(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 40)).astype(np.float32) * 2
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(_numpy_filter(logits, top_k, top_p)))


def test_guidance_scale_one_is_conditional_sampling(model_and_params):
    cond, uncond = jnp.array([[1.0, 2.0]]), jnp.array([[5.0, -1.0]])
    np.testing.assert_array_equal(guided_logits(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(guided_logits(cond, uncond, 3.0), uncond + 3 * (cond - uncond))
