"""DALL·E attention masks against brute-force loops over (row, column) positions."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.masks import KINDS, attention_mask, layer_kinds

GRIDS = [(0, 4, 4), (3, 4, 4), (5, 3, 6), (2, 6, 3), (4, 7, 7)]


def _allowed(kind, q, k, text_len, h, w, kernel):
    """The definition, one pair at a time, in grid coordinates."""
    if k > q:
        return False
    if q < text_len or k < text_len:
        return True  # text is causal; image queries see all (earlier) text
    (rq, cq), (rk, ck) = divmod(q - text_len, w), divmod(k - text_len, w)
    if kind == "dense":
        return True
    if kind == "row":  # same row to the left, or the previous row from this column rightwards
        return (rk == rq and ck <= cq) or (rk == rq - 1 and ck >= cq)
    if kind == "column":
        return ck == cq
    half = kernel // 2
    return abs(rk - rq) <= half and abs(ck - cq) <= half


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text_len,h,w", GRIDS)
@pytest.mark.parametrize("kernel", [3, 5])
def test_mask_equals_brute_force(kind, text_len, h, w, kernel):
    mask = attention_mask(kind, text_len=text_len, image_h=h, image_w=w, kernel=kernel)
    length = text_len + h * w
    assert mask.shape == (length, length) and mask.dtype == bool
    expected = np.array([[_allowed(kind, q, k, text_len, h, w, kernel) for k in range(length)]
                         for q in range(length)])
    np.testing.assert_array_equal(mask, expected)


def _reach(first, second):
    """Keys reachable by attending through `second` then `first` (bool matrix product)."""
    return (second.astype(int) @ first.astype(int)) > 0


@pytest.mark.parametrize("text_len,h,w", GRIDS)
def test_row_and_column_together_reach_every_earlier_image_position(text_len, h, w):
    row, col = (attention_mask(k, text_len=text_len, image_h=h, image_w=w) for k in ("row", "column"))
    dense = attention_mask("dense", text_len=text_len, image_h=h, image_w=w)
    for a, b in ((row, col), (col, row)):
        np.testing.assert_array_equal(_reach(a, b), dense)
    # each alone misses some earlier image position once the grid has two rows
    if h > 1 and w > 1:
        assert not np.array_equal(row, dense) and not np.array_equal(col, dense)


def test_row_mask_is_sparse_and_left_only_row_would_not_suffice():
    h = w = 8
    row = attention_mask("row", text_len=0, image_h=h, image_w=w)
    col = attention_mask("column", text_len=0, image_h=h, image_w=w)
    assert row.sum(1).max() == w + 1 and col.sum(1).max() == h
    left_only = np.array([[k <= q and k // w == q // w for k in range(h * w)] for q in range(h * w)])
    assert not np.array_equal(_reach(left_only, col), np.tril(np.ones((h * w, h * w), bool)))


def test_conv_window_size_and_paper_kernel():
    mask = attention_mask("conv", text_len=2, image_h=32, image_w=32)
    image = mask[2:, 2:]
    # a query far from the borders sees its centred 11x11 window minus the future: 5 full rows + 6
    q = 16 * 32 + 16
    assert image[q].sum() == 5 * 11 + 6


def test_schedule_follows_the_paper():
    kinds = layer_kinds(64)
    assert len(kinds) == 64 and kinds[-1] == "conv"
    for i, kind in enumerate(kinds[:-1], start=1):
        assert kind == ("column" if (i - 2) % 4 == 0 else "row")
    assert layer_kinds(3, "dense") == ("dense",) * 3


@pytest.mark.parametrize("bad", [dict(kind="diagonal"), dict(kernel=4, kind="conv"), dict(image_h=0, kind="row")])
def test_bad_arguments_are_refused(bad):
    args = dict(text_len=2, image_h=3, image_w=3, kernel=3) | bad
    kind = args.pop("kind")
    with pytest.raises(ValueError):
        attention_mask(kind, **args)


def test_every_kind_is_causal():
    for kind, (t, h, w) in itertools.product(KINDS, GRIDS):
        mask = attention_mask(kind, text_len=t, image_h=h, image_w=w, kernel=3)
        assert not np.triu(mask, 1).any() and mask.diagonal().all()


@pytest.mark.parametrize("kind", KINDS)
def test_jax_numpy_build_equals_numpy(kind):
    args = dict(text_len=3, image_h=5, image_w=4, kernel=3)
    np.testing.assert_array_equal(np.asarray(attention_mask(kind, xp=jnp, **args)), attention_mask(kind, **args))
