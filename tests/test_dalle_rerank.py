"""CLIP reranking of generated candidates: the best-matching candidates come first, whatever their order."""

import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.rerank import clip_scores, rerank, to_clip_pixels
from tests.helpers.fake_clip import CODE_STEP, FakeClip


def _bundle():
    # Code c images point along direction c; "red" points along code 3, "dark" along code 0.
    table = np.eye(4, dtype=np.float32)
    return FakeClip(table, {"red": table[3], "dark": table[0]}, image_size=16)


def _candidates(codes):
    """(C, N, 32, 32, 3) in [0, 1]: solid images whose red channel encodes each code."""
    codes = np.asarray(codes)
    images = np.zeros((*codes.shape, 32, 32, 3), np.float32)
    images[..., 0] = (CODE_STEP * codes / 255.0)[..., None, None]
    return jnp.asarray(images)


def test_rerank_keeps_the_matching_candidates_best_first():
    bundle = _bundle()
    images = _candidates([[1, 3, 0, 2, 3], [3, 0, 2, 0, 1]])
    indices, scores = rerank(bundle, images, bundle.tokenize(["red", "dark"]), keep=2)
    assert sorted(np.asarray(indices[0]).tolist()) == [1, 4]  # both code-3 images for "red"
    assert sorted(np.asarray(indices[1]).tolist()) == [1, 3]  # both code-0 images for "dark"
    np.testing.assert_allclose(scores, 1.0, atol=1e-5)
    all_scores = clip_scores(bundle, images, bundle.tokenize(["red", "dark"]))
    assert all_scores.shape == (2, 5) and float(all_scores[0, 0]) == pytest.approx(0.0, abs=1e-5)
    assert bundle.image_calls[-1][0] == (10, 16, 16, 3)  # one batch, at CLIP's size


def test_pixels_are_resized_and_quantised():
    pixels = to_clip_pixels(jnp.full((2, 32, 32, 3), 0.6), 16)
    assert pixels.shape == (2, 16, 16, 3) and pixels.dtype == jnp.uint8
    assert int(pixels.min()) == int(pixels.max()) == 153  # round(0.6 * 255)


def test_bad_requests_are_refused():
    bundle = _bundle()
    images = _candidates([[1, 3]])
    with pytest.raises(ValueError, match="keep"):
        rerank(bundle, images, bundle.tokenize(["red"]), keep=3)
    with pytest.raises(ValueError, match="one caption per"):
        rerank(bundle, images, bundle.tokenize(["red", "dark"]), keep=1)
    with pytest.raises(ValueError, match="square"):
        to_clip_pixels(jnp.zeros((1, 8, 4, 3)), 16)
