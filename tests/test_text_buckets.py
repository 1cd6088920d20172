"""Text encoding up to the longest end-of-text position: the full 77-token features, a bounded number of programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clip_jax import CLIP, CLIPBundle, CLIPConfig, TextConfig, VisionConfig
from clip_jax.model import dummy_inputs
from clip_jax.text import LENGTH_BUCKETS, bucket_length

CFG = CLIPConfig(32, VisionConfig(32, 1, 64, 2, patch_size=16), TextConfig(64, 2, 2))  # context 77
# 1 word to 70: every bucket, the full context among them.
CAPTIONS = ["a", "a photo of a dog.", " ".join(["red"] * 12), " ".join(["cat"] * 20), " ".join(["owl"] * 28),
            " ".join(["big"] * 40), " ".join(["sky"] * 70)]


@pytest.fixture(scope="module")
def bundle():
    model = CLIP(CFG)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *dummy_inputs(CFG)))
    return CLIPBundle(model, variables, CFG, "random-init")


def _full_pass(bundle, tokens):
    return np.asarray(bundle.model.apply(bundle.variables, tokens, method=CLIP.encode_text))


def test_bucket_is_the_shortest_that_keeps_every_end_of_text():
    tokens = np.zeros((2, 77), np.int32)
    tokens[0, :3] = [49406, 5, 49407]  # end-of-text at position 2
    assert bucket_length(tokens, 77) == 8
    tokens[1, :17] = 7
    tokens[1, 17] = 49407  # position 17: needs 18 positions
    assert bucket_length(tokens, 77) == bucket_length(jnp.asarray(tokens), 77) == 24
    tokens[1, 60] = 49407  # the first highest id counts, as torch.argmax
    assert bucket_length(tokens, 77) == 24
    tokens[1, 17] = 0
    assert bucket_length(tokens, 77) == 77  # past the last bucket: the whole context
    assert bucket_length(tokens[:0], 77) == 77


def test_bucketed_features_equal_the_full_pass_with_few_programs(bundle):
    tokens = bundle.tokenize(CAPTIONS)  # (7, 77)
    lengths = {bucket_length(tokens[i:i + 1], 77) for i in range(len(CAPTIONS))}
    assert lengths == {*LENGTH_BUCKETS, 77}, lengths
    for i in range(len(CAPTIONS)):  # batches whose longest caption falls in every bucket
        batch = tokens[[0, i]]
        np.testing.assert_allclose(np.asarray(bundle.encode_text(batch)), _full_pass(bundle, batch),
                                   rtol=1e-5, atol=1e-5)
    # The same lengths again, as a device array: no new program per batch.
    for i in range(len(CAPTIONS)):
        bundle.encode_text(jnp.asarray(tokens[[i, 0]]))
    assert bundle._encode_text._cache_size() <= len(LENGTH_BUCKETS) + 1


def test_logits_use_the_buckets_too(bundle):
    tokens = bundle.tokenize(CAPTIONS[:3])
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    got = bundle.logits(images, tokens)[0]
    want = bundle.model.apply(bundle.variables, images, tokens)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_host_weights_are_placed_on_the_device_once(bundle):
    """A bundle built from numpy weights holds device arrays (otherwise every call copies them over)."""
    host = jax.tree.map(np.asarray, bundle.variables)
    placed = CLIPBundle(bundle.model, host, CFG, "random-init")
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed.variables))
    tokens = placed.tokenize(CAPTIONS[:2])
    np.testing.assert_array_equal(placed.encode_text(tokens), bundle.encode_text(tokens))
