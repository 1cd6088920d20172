"""common/layers.py: masked attention against a NumPy softmax, scanned against unscanned
stacks on the same weights, and LayerNorm statistics in fp32 under bf16 inputs."""
import math
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from common import layers
from common.layers import LayerNorm, MultiHeadAttention, Transformer, attend

B, LQ, LK, D, HEADS = 2, 5, 7, 16, 4


def _numpy_attention(params: dict, xq: np.ndarray, xkv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Brute-force multi-head attention in float64: softmax over allowed keys only."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
    q = np.einsum("bld,dhk->blhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.broadcast_to(mask, scores.shape)
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    return np.einsum("bqhd,hdo->bqo", out, p["out"]["kernel"]) + p["out"]["bias"]


def _random_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random boolean mask whose every query row keeps at least its first key."""
    mask = rng.random(shape) < 0.5
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize(
    "mask_shape",
    [(LQ, LK), (B, 1, 1, LK), (B, HEADS, LQ, LK), (1, HEADS, LQ, LK)],
    ids=["pattern", "padding", "full", "per-head"],
)
def test_masked_attention_equals_numpy_softmax(mask_shape):
    rng = np.random.default_rng(0)
    xq = rng.normal(size=(B, LQ, D)).astype(np.float32)
    xkv = rng.normal(size=(B, LK, D)).astype(np.float32)
    mask = _random_mask(rng, mask_shape)
    attn = MultiHeadAttention(HEADS, qkv_std=0.5, out_std=0.5)
    params = attn.init(jax.random.key(0), xq, xkv)["params"]
    # Non-zero biases so every projection is exercised.
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
    got = attn.apply({"params": params}, xq, xkv, jnp.asarray(mask))
    want = _numpy_attention(params, xq, xkv, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    unmasked = attn.apply({"params": params}, xq, xkv)
    assert not np.allclose(np.asarray(unmasked), want, atol=1e-3), "the mask changed nothing"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_attend_equals_jax_dot_product_attention_in_values_and_gradients(dtype):
    """`attend` normalises after the product with v; jax's XLA attention before. Same values and
    gradients, masks with a fully masked query row (both average v evenly) included."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(B, n, HEADS, 8)), dtype) for n in (LQ, LK, LK))
    heads_major = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (B, H, Lk, Dh), as attend takes k and v
    mask = _random_mask(rng, (B, 1, LQ, LK))
    mask[1, 0, 2] = False  # one query row that may attend nowhere
    mask = jnp.asarray(mask)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)

    def ours(q, k, v):
        return attend(q, heads_major(k), heads_major(v), mask, 8**-0.5)

    def jaxs(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=8**-0.5)

    got, want = ours(q, k, v), jaxs(q, k, v)
    assert got.dtype == dtype and got.shape == (B, LQ, HEADS, 8)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(got[1, 2], np.float32), np.asarray(v[1].mean(0), np.float32), **tol)
    cotangent = jnp.asarray(rng.normal(size=got.shape), dtype)
    grads = [jax.vjp(f, q, k, v)[1](cotangent) for f in (ours, jaxs)]
    for g_ours, g_jax in zip(*grads):
        np.testing.assert_allclose(np.asarray(g_ours, np.float32), np.asarray(g_jax, np.float32), **tol)
    assert float(jnp.abs(grads[0][0]).max()) > 1e-3, "the gradient vanished"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lq,lk", [(1, 12), (2, 40)])
def test_few_queries_attend_through_the_projections_with_the_same_values_and_gradients(lq, lk, dtype, monkeypatch):
    """One query (an attention pool, a last block's class row) against many positions goes through the
    key and value kernels instead of projecting every position: the NumPy softmax's values, and the
    values and gradients of the projecting path forced on the same weights."""
    assert layers.projects_through_the_query(lq, lk, D, HEADS)
    assert not layers.projects_through_the_query(lk, lk, D, HEADS), "self-attention projects its keys"
    rng = np.random.default_rng(4)
    xq, xkv = (jnp.asarray(rng.normal(size=(B, n, D)), dtype) for n in (lq, lk))
    mask = _random_mask(rng, (B, 1, lq, lk))
    mask[1, 0, lq - 1] = False  # one query row that may attend nowhere: it averages the values evenly
    mask = jnp.asarray(mask)
    attn = MultiHeadAttention(HEADS, qkv_std=0.5, out_std=0.5, dtype=dtype)
    params = nn.meta.unbox(attn.init(jax.random.key(0), xq, xkv)["params"])
    params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), params)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)

    def run(params, xq, xkv):
        return attn.apply({"params": params}, xq, xkv, mask)

    def dots(fn):  # the dot_generals' output shapes
        jaxpr = jax.make_jaxpr(fn)(params, xq, xkv).jaxpr
        return [eqn.outvars[0].aval.shape for eqn in _all_eqns(jaxpr) if eqn.primitive.name == "dot_general"]

    got = run(params, xq, xkv)
    if dtype == jnp.float32:
        with np.errstate(invalid="ignore"):  # NaN in the row that may attend nowhere
            want = _numpy_attention(params, np.asarray(xq), np.asarray(xkv), np.asarray(mask))
        np.testing.assert_allclose(np.asarray(got)[0], want[0], **tol)
        np.testing.assert_allclose(np.asarray(got)[1, : lq - 1], want[1, : lq - 1], **tol)
    assert (B, lk, HEADS, D // HEADS) not in dots(lambda *a: run(*a)), "the keys and values were projected"
    cotangent = jnp.asarray(rng.normal(size=got.shape), dtype)
    through, vjp_through = jax.vjp(run, params, xq, xkv)
    monkeypatch.setattr(layers, "projects_through_the_query", lambda *shape: False)
    assert (B, lk, HEADS, D // HEADS) in dots(lambda *a: run(*a))  # a fresh function: traces are cached
    projected, vjp_projected = jax.vjp(lambda *a: run(*a), params, xq, xkv)
    grads_through, grads_projected = vjp_through(cotangent), vjp_projected(cotangent)
    grads_projected[0]["key"]["bias"] = jnp.zeros_like(grads_projected[0]["key"]["bias"])  # exactly 0 through the query
    pairs = [(("output",), through, projected)] + [
        (a[0], a[1], b[1])
        for a, b in zip(*(jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads_through, grads_projected)))
    ]
    for path, a, b in pairs:  # relative to the largest entry: bf16 rounds each path differently (~0.7 % each)
        scale = float(jnp.abs(b.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b, np.float32) / scale,
                                   err_msg=jax.tree_util.keystr(path), **tol)


def test_attention_rejects_non_boolean_mask():
    x = jnp.zeros((1, 3, D))
    attn = MultiHeadAttention(HEADS, qkv_std=0.5, out_std=0.5)
    with pytest.raises(ValueError, match="must be boolean"):
        attn.init(jax.random.key(0), x, x, jnp.ones((3, 3), jnp.int32))


def test_bf16_attention_softmax_runs_in_fp32():
    x = jnp.zeros((1, 3, D), jnp.bfloat16)
    attn = MultiHeadAttention(HEADS, qkv_std=0.5, out_std=0.5, dtype=jnp.bfloat16)
    params = attn.init(jax.random.key(0), x, x)["params"]
    jaxpr = jax.make_jaxpr(lambda p: attn.apply({"params": p}, x, x, jnp.tril(jnp.ones((3, 3), bool))))(params)
    exps = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "exp"]
    assert exps, "no softmax exp found in the attention jaxpr"
    assert all(eqn.invars[0].aval.dtype == jnp.float32 for eqn in exps), [e.invars[0].aval for e in exps]


def _all_eqns(jaxpr, skip: tuple[str, ...] = ()):
    """Every equation of `jaxpr`, including those of nested jaxprs (pjit, custom_jvp, ...), but for
    the equations of the primitives named in `skip` and what they nest."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in skip:
            continue
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub, skip)


def _stack_layers(params: dict, layers: int) -> dict:
    """Unscanned `resblocks_{i}` parameters -> one `resblocks` tree with a leading layer axis."""
    blocks = [params[f"resblocks_{i}"] for i in range(layers)]
    return {"resblocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


@pytest.mark.parametrize("per_layer_mask", [False, True], ids=["shared-mask", "per-layer-masks"])
@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scanned_stack_equals_unscanned(per_layer_mask, remat):
    layers, length = 3, 6
    x = jax.random.normal(jax.random.key(1), (B, length, D))
    causal = np.tril(np.ones((length, length), bool))
    if per_layer_mask:  # causal, full, then a band of width 2, as DALL·E alternates masks by layer
        band = causal & np.triu(np.ones((length, length), bool), -1)
        mask = jnp.asarray(np.stack([causal, np.ones_like(causal), band]))
    else:
        mask = jnp.asarray(causal)
    kwargs = dict(width=D, layers=layers, heads=HEADS, mlp_dim=2 * D, act="quick_gelu", remat=remat,
                  per_layer_mask=per_layer_mask)
    unscanned = Transformer(**kwargs)
    params = nn.meta.unbox(unscanned.init(jax.random.key(0), x, mask)["params"])
    want = unscanned.apply({"params": params}, x, mask)
    got = Transformer(**kwargs, scan_layers=True).apply({"params": _stack_layers(params, layers)}, x, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    if per_layer_mask:  # each layer really used its own mask
        shared = Transformer(**{**kwargs, "per_layer_mask": False}).apply({"params": params}, x, jnp.asarray(causal))
        assert not np.allclose(np.asarray(shared), np.asarray(want), atol=1e-3)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "per-example"])
@pytest.mark.parametrize("stack", ["unrolled", "remat", "scanned"])
def test_rows_equal_the_full_stack_at_those_positions(mask_kind, stack):
    """`rows`: each example's output at one position (class token, end-of-text) equals the full
    stack's output there, for every mask shape; unrolled, the last block's queries, output
    projection and MLP really run for those rows alone (XLA's FLOP count drops)."""
    layers, length = 3, 6
    rng = np.random.default_rng(2)
    x = jax.random.normal(jax.random.key(1), (B, length, D))
    mask = {"none": None, "causal": jnp.asarray(np.tril(np.ones((length, length), bool))),
            "padding": jnp.asarray(_random_mask(rng, (B, 1, 1, length))),
            "per-example": jnp.asarray(_random_mask(rng, (B, HEADS, length, length)))}[mask_kind]
    rows = jnp.asarray([length - 1, 2], jnp.int32)  # a different position per example
    kwargs = dict(width=D, layers=layers, heads=HEADS, mlp_dim=2 * D, act="quick_gelu", remat=stack == "remat")
    unscanned = Transformer(**kwargs)
    params = nn.meta.unbox(unscanned.init(jax.random.key(0), x, mask)["params"])
    full = np.asarray(unscanned.apply({"params": params}, x, mask))
    want = full[np.arange(B), np.asarray(rows)]  # (B, D)
    if stack == "scanned":
        model, variables = Transformer(**kwargs, scan_layers=True), {"params": _stack_layers(params, layers)}
    else:
        model, variables = unscanned, {"params": params}
    got = model.apply(variables, x, mask, rows=rows)
    assert got.shape == (B, D)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(want, full[:, 0], atol=1e-3)  # the rows really pick different positions
    if stack == "unrolled":
        flops = lambda f: jax.jit(f).lower(x).compile().cost_analysis()["flops"]  # noqa: E731
        every_row = flops(lambda x: unscanned.apply({"params": params}, x, mask)[:, 0])
        assert flops(lambda x: unscanned.apply({"params": params}, x, mask, rows=rows)) < 0.9 * every_row
    if stack == "scanned":  # the loop runs layers - 1 blocks; after it, no MLP over every position
        jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x, mask, rows=rows))(x).jaxpr
        assert [e.params["length"] for e in _all_eqns(jaxpr) if e.primitive.name == "scan"] == [layers - 1]
        wide = [e for e in _all_eqns(jaxpr, skip=("scan",)) if e.primitive.name == "dot_general"
                and e.outvars[0].aval.shape[:2] == (B, length) and e.outvars[0].aval.shape[-1] == 2 * D]
        assert not wide, "the last block's MLP ran over every position"


def test_per_layer_mask_needs_one_mask_per_layer():
    x = jnp.zeros((1, 4, D))
    model = Transformer(D, 3, HEADS, 2 * D, "gelu", per_layer_mask=True)
    with pytest.raises(ValueError, match=r"one per layer"):
        model.init(jax.random.key(0), x, jnp.ones((2, 4, 4), bool))


def test_layernorm_statistics_in_fp32_under_bf16():
    """Activations with a large mean: bf16 statistics would round the mean by up to 2 units
    against deviations of ~8, fp32 statistics are exact to bf16 output rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(1000.0 + 8.0 * rng.normal(size=(4, 64)), jnp.bfloat16)
    norm = LayerNorm(dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(0), x)
    got = norm.apply(params, x)
    assert got.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    tol = 2e-2  # bf16 output rounding of values up to ~3
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol)
    # The same formula with bf16 statistics misses by far more, so the check above can fail.
    mean16 = jnp.mean(x, -1, keepdims=True).astype(jnp.bfloat16)
    centred16 = x - mean16
    naive = centred16 * jax.lax.rsqrt(jnp.mean(jnp.square(centred16), -1, keepdims=True) + 1e-5)
    assert np.abs(np.asarray(naive, np.float64) - want).max() > 5 * tol


def _conv_primitives(x, kernel, *args, **kw) -> set[str]:
    """The primitives `common.layers.conv_general_dilated` traces to on these arguments."""
    from common.layers import conv_general_dilated

    return {e.primitive.name for e in jax.make_jaxpr(lambda a, b: conv_general_dilated(a, b, *args, **kw))(
        x, kernel).jaxpr.eqns}


def test_pointwise_convolutions_run_as_matmuls_with_the_convolutions_values():
    from common.layers import conv_general_dilated

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 8)), jnp.float32)
    nhwc = ("NHWC", "HWIO", "NHWC")

    kernel = jnp.asarray(rng.standard_normal((1, 1, 8, 12)), jnp.float32)
    for padding in ("SAME", "VALID", ((0, 0), (0, 0))):
        ours = conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=nhwc)
        ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=nhwc)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
        ops = _conv_primitives(x, kernel, (1, 1), padding, dimension_numbers=nhwc)
        assert "dot_general" in ops and "conv_general_dilated" not in ops
    # Anything else is the convolution itself, bitwise: strides, padding, dilation, 3x3 kernels, groups,
    # channels-first layouts.
    cases = [(kernel, dict(window_strides=(2, 1), padding="SAME", dimension_numbers=nhwc)),
             (kernel, dict(window_strides=(1, 1), padding=((1, 1), (0, 0)), dimension_numbers=nhwc)),
             (kernel, dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(2, 1), dimension_numbers=nhwc)),
             (jnp.ones((3, 3, 8, 12)), dict(window_strides=(1, 1), padding="SAME", dimension_numbers=nhwc)),
             (jnp.ones((1, 1, 4, 12)), dict(window_strides=(1, 1), padding="SAME", dimension_numbers=nhwc,
                                            feature_group_count=2)),
             (jnp.ones((1, 1, 6, 12)), dict(window_strides=(1, 1), padding="SAME",
                                            dimension_numbers=("NCHW", "HWIO", "NCHW")))]
    for kernel, kw in cases:
        np.testing.assert_array_equal(conv_general_dilated(x, kernel, **kw),
                                      jax.lax.conv_general_dilated(x, kernel, **kw))
        assert "conv_general_dilated" in _conv_primitives(x, kernel, **kw)


def test_patch_convolutions_run_as_matmuls_with_the_convolutions_values():
    """A kernel as large as its stride (the ViT's patch embedding) is a matmul over each patch: 2-D
    and 1-D, square and not, "VALID" dropping a remainder, "SAME" where nothing is padded."""
    from common.layers import conv_general_dilated

    rng = np.random.default_rng(1)

    def check(x, kernel, strides, padding, dn, matmul: bool):
        ours = conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)
        ref = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
        ops = _conv_primitives(x, kernel, strides, padding, dimension_numbers=dn)
        assert ("conv_general_dilated" not in ops) == matmul, (strides, padding, ops)

    nhwc = ("NHWC", "HWIO", "NHWC")
    x = jnp.asarray(rng.standard_normal((2, 9, 14, 5)), jnp.float32)
    # (4, 4) "VALID": 9 x 14 keeps 8 x 12; "SAME" would pad it
    for patch, padding, matmul in [((3, 7), "VALID", True), ((4, 4), "VALID", True),
                                   ((3, 7), "SAME", True), ((4, 4), "SAME", False),
                                   ((3, 7), ((0, 0), (0, 0)), True), ((3, 7), ((0, 3), (0, 0)), False)]:
        kernel = jnp.asarray(rng.standard_normal((*patch, 5, 6)), jnp.float32)
        check(x, kernel, patch, padding, nhwc, matmul)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 6)), jnp.float32)
    check(x, kernel, (3, 2), "VALID", nhwc, False)  # overlapping windows: the convolution
    x1 = jnp.asarray(rng.standard_normal((2, 10, 3)), jnp.float32)
    check(x1, jnp.asarray(rng.standard_normal((5, 3, 4)), jnp.float32), (5,), "VALID", ("NWC", "WIO", "NWC"), True)


def _conv_then_dot(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(-1, y.shape[-1]) @ m


def _conv_dot_args():
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (8, 56, 56, 64)), jax.random.normal(keys[1], (3, 3, 64, 64)) / 24,
            jax.random.normal(keys[2], (64, 64)) / 8)


def test_convolution_jit_keeps_convolutions_out_of_ynnpack_on_cpu():
    """On XLA's CPU backend a large 3x3 convolution compiles as XLA's own convolution, the dot still as a
    YNNPACK fusion (jax.jit gives both to YNNPACK on jaxlib 0.10); the values are jax.jit's."""
    from common.layers import convolution_jit

    args = _conv_dot_args()
    ours = convolution_jit(_conv_then_dot)
    fusions = [line for line in ours.lower(*args).compile().as_text().splitlines()
               if "ynn_fusion" in line and " fusion(" in line]
    assert any("dot_general" in line for line in fusions), fusions
    assert not any("conv_general_dilated" in line for line in fusions), fusions
    np.testing.assert_allclose(np.asarray(ours(*args)), np.asarray(jax.jit(_conv_then_dot)(*args)),
                               rtol=1e-5, atol=1e-4)


def test_convolution_jit_falls_back_to_jax_jit_when_xla_refuses_its_option(monkeypatch):
    from common import layers

    monkeypatch.setitem(layers._CPU_CONVOLUTION_OPTIONS, "xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_TYPE")
    layers._cpu_options_accepted.cache_clear()
    try:
        assert layers.cpu_compiler_options() is None
        args = _conv_dot_args()
        got = layers.convolution_jit(_conv_then_dot)(*args)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(_conv_then_dot)(*args)))
    finally:
        layers._cpu_options_accepted.cache_clear()


def test_convolution_jit_nests_inside_another_jit():
    from common.layers import convolution_jit

    args = _conv_dot_args()
    got = jax.jit(lambda *a: convolution_jit(_conv_then_dot)(*a) + 1)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(_conv_then_dot)(*args)) + 1, rtol=1e-5, atol=1e-4)


def test_a_decoding_step_reads_the_key_value_cache_in_place():
    """One cached decoding step (its cache donated, as the sampler's loop carries it) writes its
    key and value into the cache and attends over it without copying or transposing it: no op
    of the compiled step but the cache update produces a cache-sized array. A cache kept
    (B, L, H, Dh) was copied into attention's heads-major layout at every step."""
    batch, cache_length, width, heads = 2, 64, 32, 4
    attn = MultiHeadAttention(heads, qkv_std=0.5, out_std=0.5, cache_length=cache_length)
    x = jnp.ones((batch, 1, width))
    variables = attn.init(jax.random.key(0), x, x)
    mask = jnp.ones((1, cache_length), bool)

    def step(params, cache, x):
        return attn.apply({"params": params, "cache": cache}, x, x, mask, mutable=["cache"])

    assert variables["cache"]["cached_key"].shape == (batch, heads, cache_length, width // heads)
    hlo = jax.jit(step, donate_argnums=1).lower(variables["params"], variables["cache"], x).compile().as_text()
    cache_size = batch * cache_length * width
    makers = []  # (instruction name, opcode) of every op whose result is as large as a cache
    for line in hlo[hlo.index("ENTRY"):].splitlines():
        found = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]+)\]\S* (\S+)\(", line)
        if found and math.prod(int(d) for d in found.group(2).split(",")) == cache_size:
            makers.append((found.group(1), found.group(3)))
    assert any("dynamic-update-slice" in name for name, _ in makers), makers
    assert all("dynamic-update-slice" in name or op == "parameter" for name, op in makers), makers
    out, updated = step(variables["params"], variables["cache"], x)
    assert out.shape == (batch, 1, width)
    assert int(updated["cache"]["cache_index"]) == int(variables["cache"]["cache_index"]) + 1
