"""The DALL·E transformer: parameter counts, causality under every mask schedule, scan parity, loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.masks import attention_mask
from dalle_jax.transformer import DALLE, dalle_loss, text_stream_ids
from dalle_jax.variants import DALLEConfig, decode_variant

TINY = decode_variant("tiny")


def _params_count(config: DALLEConfig) -> int:
    model = DALLE(config)
    text = jnp.zeros((1, config.text_len), jnp.int32)
    codes = jnp.zeros((1, config.image_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), text, codes))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _expected_count(c: DALLEConfig) -> int:
    """Embeddings, positions, start vector, blocks (attention 4 D^2 + 4 D, MLP 8 D^2 + 5 D, 2 LayerNorms), heads."""
    d = c.width
    block = 4 * d * d + 4 * d + 2 * c.mlp_ratio * d * d + c.mlp_ratio * d + d + 4 * d
    embeddings = (c.text_tokens + c.image_vocab) * d + (c.text_len + c.image_h + c.image_w + 1) * d
    heads = (d + 1) * (c.text_tokens + c.image_vocab) + 2 * d
    return embeddings + c.layers * block + heads


def test_12b_parameter_count_from_shapes():
    config = decode_variant("12B")
    assert (config.layers, config.width, config.heads, config.width // config.heads) == (64, 3968, 62, 64)
    count = _params_count(config)
    assert count == _expected_count(config)
    assert 12.0e9 < count < 12.5e9  # "a 12-billion parameter" transformer


def _random_inputs(config, seed, batch=2):
    rng = np.random.default_rng(seed)
    text = rng.integers(1, config.text_vocab, (batch, config.text_len)).astype(np.int32)
    text[:, config.text_len // 2:] = 0  # padded tail
    codes = rng.integers(0, config.image_vocab, (batch, config.image_len)).astype(np.int32)
    return jnp.asarray(text), jnp.asarray(codes)


@pytest.mark.parametrize("attention", ["sparse", "dense", "row", "column", "conv"])
def test_outputs_depend_only_on_earlier_tokens(attention):
    config = dataclasses.replace(TINY, attention=attention)
    model = DALLE(config)
    text, codes = _random_inputs(config, 0)
    params = model.init(jax.random.key(1), text, codes)
    base_text, base_image = model.apply(params, text, codes)
    # Changing image token j changes no prediction of tokens <= j.
    j = config.image_len // 2
    changed = codes.at[:, j].set((codes[:, j] + 1) % config.image_vocab)
    text_logits, image_logits = model.apply(params, text, changed)
    np.testing.assert_allclose(text_logits, base_text, atol=1e-6)
    np.testing.assert_allclose(image_logits[:, : j + 1], base_image[:, : j + 1], atol=1e-6)
    assert not np.allclose(image_logits[:, j + 1:], base_image[:, j + 1:], atol=1e-6)


def test_receptive_field_follows_the_schedule():
    """With a single conv layer, prediction of token p reads only its causal window of earlier tokens."""
    config = dataclasses.replace(TINY, attention="conv", layers=1)
    model = DALLE(config)
    text, codes = _random_inputs(config, 2, batch=1)
    params = model.init(jax.random.key(3), text, codes)
    _, base = model.apply(params, text, codes)
    mask = attention_mask("conv", text_len=config.text_len, image_h=config.image_h, image_w=config.image_w,
                          kernel=config.conv_kernel)
    j = 10  # the image token changed; it sits in input slot text_len + j + 1
    changed = codes.at[:, j].set((codes[:, j] + 7) % config.image_vocab)
    _, image_logits = model.apply(params, text, changed)
    moved = np.abs(np.asarray(image_logits - base)).max(-1)[0] > 1e-6  # (N,)
    sees = mask[config.text_len:, config.text_len + j + 1]  # slot text_len + p predicts image token p
    np.testing.assert_array_equal(moved, sees)


def test_scanned_and_rematted_stack_equal_the_plain_one():
    text, codes = _random_inputs(TINY, 4)
    plain = DALLE(TINY)
    params = nn.unbox(plain.init(jax.random.key(5), text, codes)["params"])
    scanned = DALLE(TINY, scan_layers=True, remat=True)
    blocks = [params["transformer"][f"resblocks_{i}"] for i in range(TINY.layers)]
    stacked = dict(params, transformer={"resblocks": jax.tree.map(lambda *x: jnp.stack(x), *blocks)})
    for a, b in zip(plain.apply({"params": params}, text, codes), scanned.apply({"params": stacked}, text, codes)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_loss_weights_text_one_eighth_and_image_seven_eighths():
    text, codes = _random_inputs(TINY, 6)
    text_logits = jax.random.normal(jax.random.key(7), (2, TINY.text_len, TINY.text_tokens))
    image_logits = jax.random.normal(jax.random.key(8), (2, TINY.image_len, TINY.image_vocab))
    loss, metrics = dalle_loss(text_logits, image_logits, text, codes, TINY.text_vocab)

    def ce(logits, targets):
        logits = np.asarray(logits, np.float64)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.take_along_axis(log_p, np.asarray(targets)[..., None], -1).mean()

    stream = np.where(np.asarray(text) == 0, TINY.text_vocab + np.arange(TINY.text_len), np.asarray(text))
    expected = ce(text_logits, stream) / 8 + 7 * ce(image_logits, codes) / 8
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["text_loss"], ce(text_logits, stream), rtol=1e-5)


def test_padding_tokens_are_distinct_per_position():
    ids = text_stream_ids(jnp.array([[5, 0, 0], [0, 7, 0]]), 100)
    np.testing.assert_array_equal(ids, [[5, 101, 102], [100, 7, 102]])


def test_bad_shapes_and_names_are_refused():
    text, codes = _random_inputs(TINY, 9)
    with pytest.raises(ValueError, match="Expected text"):
        DALLE(TINY).init(jax.random.key(0), text[:, :-1], codes)
    with pytest.raises(ValueError, match="Unknown DALL·E variant"):
        decode_variant("13B")
    with pytest.raises(ValueError, match="attention"):
        decode_variant("tiny", attention="strided")
