"""CLIP / SigLIP contrastive losses: parity with a torch reference, and sharded == single device.

The torch reference transcribes the papers' pseudo-code (CLIP figure 3, SigLIP
algorithm 1) in float64 with autograd; the sharded losses run on 8 devices under
the three mesh presets and are compared, loss, metrics and gradients, with the
plain implementation on one device.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import losses
from common import sharding as sh

B, D = 32, 8
TOL = dict(rtol=1e-5, atol=1e-6)
KINDS = ("softmax", "sigmoid")
PRESETS = ("data_parallel", "fsdp", "fsdp_tp")


def _inputs(kind, seed=0, logit_scale=None):
    """Unnormalised features whose pairs are correlated (so accuracies are neither 0 nor 1), and
    a temperature away from its initial value."""
    rng = np.random.default_rng(seed)
    images = 3.0 * rng.normal(size=(B, D)).astype(np.float32)
    texts = (0.5 * images + 2.0 * rng.normal(size=(B, D))).astype(np.float32)
    if logit_scale is None:
        logit_scale = 2.0 if kind == "softmax" else math.log(5.0)
    bias = np.float32(-3.0) if kind == "sigmoid" else None
    return images, texts, np.float32(logit_scale), bias


def _loss_fn(kind, mesh=None):
    """(images, texts, logit_scale, logit_bias) -> (loss, metrics); the bias is ignored for softmax."""

    def fn(images, texts, scale, bias):
        return losses.contrastive_loss(kind, images, texts, scale, bias if kind == "sigmoid" else None, mesh=mesh)

    return fn


def _value_and_grads(kind, images, texts, scale, bias, mesh=None):
    """Loss, metrics and gradients w.r.t. all four inputs, in one jit (under the mesh, if any)."""
    f = jax.jit(jax.value_and_grad(_loss_fn(kind, mesh), argnums=(0, 1, 2, 3), has_aux=True))
    bias = np.float32(0.0) if bias is None else bias
    if mesh is None:
        (loss, metrics), grads = f(images, texts, scale, bias)
    else:
        rows = NamedSharding(mesh, P(("data", "fsdp"), None))
        with sh.use_mesh(mesh):
            (loss, metrics), grads = f(jax.device_put(images, rows), jax.device_put(texts, rows), scale, bias)
    return float(loss), jax.tree.map(np.asarray, metrics), [np.asarray(g) for g in grads]


def _torch_reference(kind, images, texts, scale, bias):
    """CLIP figure 3 / SigLIP algorithm 1 in float64: (loss, grads, i2t accuracy, t2i accuracy)."""
    x = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (images, texts, scale, bias or 0.0)]
    img, txt, t, b = x
    img_n, txt_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    labels = torch.arange(B)
    if kind == "softmax":
        logits = torch.clamp(t.exp(), max=100.0) * img_n @ txt_n.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        logits = t.exp() * img_n @ txt_n.T + b
        z = 2 * torch.eye(B, dtype=torch.float64) - 1
        loss = -F.logsigmoid(z * logits).sum() / B
    loss.backward()
    grads = [np.zeros(()) if a.grad is None else a.grad.numpy() for a in x]  # softmax: no bias
    i2t = (logits.argmax(1) == labels).double().mean().item()
    t2i = (logits.argmax(0) == labels).double().mean().item()
    return loss.item(), grads, i2t, t2i


def _assert_grads_close(grads, expected, **tol):
    for name, g, e in zip(("images", "texts", "logit_scale", "logit_bias"), grads, expected):
        np.testing.assert_allclose(g, e, err_msg=f"gradient w.r.t. {name}", **tol)


@pytest.fixture(scope="module")
def single_device():
    """The plain loss on one device, per kind: (inputs, loss, metrics, grads)."""
    out = {}
    for kind in KINDS:
        inputs = _inputs(kind)
        out[kind] = (inputs, *_value_and_grads(kind, *inputs))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_reference(kind, single_device):
    inputs, loss, metrics, grads = single_device[kind]
    ref_loss, ref_grads, ref_i2t, ref_t2i = _torch_reference(kind, *inputs)
    assert 0 < ref_i2t < 1 and 0 < ref_t2i < 1 and ref_i2t != ref_t2i, "inputs must make accuracies informative"
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    _assert_grads_close(grads, ref_grads, **TOL)
    assert np.abs(ref_grads[2]) > 1e-3  # the temperature is learnable here (not clamped)
    assert metrics["i2t_accuracy"] == ref_i2t and metrics["t2i_accuracy"] == ref_t2i


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_equals_single_device(kind, preset, single_device):
    inputs, loss, metrics, grads = single_device[kind]
    mesh = sh.make_mesh(preset)
    sharded_loss, sharded_metrics, sharded_grads = _value_and_grads(kind, *inputs, mesh=mesh)
    np.testing.assert_allclose(sharded_loss, loss, **TOL)
    _assert_grads_close(sharded_grads, grads, **TOL)
    assert sharded_metrics.keys() == metrics.keys()
    for name in metrics:
        np.testing.assert_allclose(sharded_metrics[name], metrics[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_is_not_the_local_only_loss(kind, single_device):
    """A loss that never looked across devices (each device's own rows only) is far off: the
    equality test above would catch an implementation that forgot to gather or to ring."""
    inputs, loss, _, grads = single_device[kind]
    images, texts, scale, bias = inputs
    per_device = [
        _value_and_grads(kind, images[i : i + B // 8], texts[i : i + B // 8], scale, bias) for i in range(0, B, B // 8)
    ]
    local_loss = np.mean([l for l, _, _ in per_device])
    local_grad = np.concatenate([g[0] for _, _, g in per_device]) / 8
    assert abs(local_loss - loss) > 0.05 * abs(loss)
    assert np.max(np.abs(local_grad - grads[0])) > 1e3 * TOL["atol"]


def _array_shapes(hlo: str) -> set[tuple[int, ...]]:
    return {tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", hlo)}


def _compiled_shapes(kind, mesh, sharded):
    f = _loss_fn(kind, mesh if sharded else None)
    rows = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    with sh.use_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)).lower(rows, rows, scalar, scalar)
    return _array_shapes(lowered.compile().as_text())  # per-device shapes, after partitioning


def test_sharded_sigmoid_holds_no_global_batch_array():
    """The compiled per-device program of the ring (forward and backward) has no array with a
    dimension of the global batch B: no (B, B) or (B, b) logits, not even gathered features; and
    apart from features (..., D) nothing larger than one (b, b) block of logits (the backward pass
    recomputes each block rather than stacking all N - 1 of them)."""
    mesh = sh.make_mesh("data_parallel")
    local = B // 8
    ring = _compiled_shapes("sigmoid", mesh, sharded=True)
    assert (local, local) in ring
    assert not [s for s in ring if B in s], sorted(ring)
    assert not [s for s in ring if s and s[-1] != D and math.prod(s) > local * local], sorted(ring)
    # The check can fail: the gathering softmax loss holds (b, B) logits on each device.
    assert (local, B) in _compiled_shapes("softmax", mesh, sharded=True)


@pytest.mark.parametrize("kind", KINDS)
def test_large_logit_scale(kind):
    """A runaway temperature: the softmax clamps it at 100 (and stops its gradient); the sigmoid
    loss, unclamped as in SigLIP, stays finite and matches the float64 reference."""
    inputs = _inputs(kind, seed=1, logit_scale=10.0)  # exp(10) ~ 22026
    loss, _, grads = _value_and_grads(kind, *inputs, mesh=sh.make_mesh("fsdp"))
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    ref_loss, ref_grads, _, _ = _torch_reference(kind, *inputs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, e in zip(grads, ref_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())
    if kind == "softmax":
        clamped, _, _ = _value_and_grads(kind, *inputs[:2], np.float32(math.log(100.0)), None)
        np.testing.assert_allclose(loss, clamped, rtol=1e-6)
        assert grads[2] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_computed_in_fp32(kind):
    images, texts, scale, bias = _inputs(kind, seed=2)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (images, texts, scale)]
    mesh = sh.make_mesh("data_parallel")
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    with sh.use_mesh(mesh):
        loss, metrics = jax.jit(_loss_fn(kind, mesh))(jax.device_put(bf16[0], rows), jax.device_put(bf16[1], rows), bf16[2], bias)
    assert loss.dtype == jnp.float32 and metrics["logit_scale"].dtype == jnp.float32
    # Exactly the fp32 loss of the bf16-rounded inputs: nothing inside ran in bf16.
    rounded = [np.asarray(a, np.float32) for a in bf16]
    np.testing.assert_allclose(float(loss), _torch_reference(kind, *rounded, bias)[0], rtol=1e-5)
    np.testing.assert_allclose(float(loss), _torch_reference(kind, images, texts, scale, bias)[0], rtol=2e-2)


def test_dispatcher_and_errors():
    images, texts, scale, bias = _inputs("sigmoid")
    loss, _ = losses.contrastive_loss("sigmoid", images, texts, scale, bias)
    np.testing.assert_array_equal(loss, losses.sigmoid_loss(images, texts, scale, bias)[0])
    loss, _ = losses.contrastive_loss("softmax", images, texts, scale)
    np.testing.assert_array_equal(loss, losses.softmax_contrastive_loss(images, texts, scale)[0])
    with pytest.raises(ValueError, match="no logit_bias"):
        losses.contrastive_loss("softmax", images, texts, scale, bias)
    with pytest.raises(ValueError, match="needs a logit_bias"):
        losses.contrastive_loss("sigmoid", images, texts, scale)
    with pytest.raises(ValueError, match="Unknown contrastive loss kind 'infonce'"):
        losses.contrastive_loss("infonce", images, texts, scale)
    with pytest.raises(ValueError, match=r"same shape \(B, D\), got \(32, 8\) and \(16, 8\)"):
        losses.softmax_contrastive_loss(images, texts[:16], scale)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        losses.sigmoid_loss(images, texts, np.ones(1, np.float32), bias)
    with pytest.raises(sh.ShardingError, match="Global batch 12"):
        losses.sigmoid_loss(images[:12], texts[:12], scale, bias, mesh=sh.make_mesh("data_parallel"))
