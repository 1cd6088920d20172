"""Optimizer: schedule values, decay mask, decay/clipping behaviour, gradient accumulation (MultiSteps)."""

import dataclasses
import math

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from common.config import dataclass_from
from common.optim import OptimConfig, decay_mask, make_optimizer, make_schedule, update_applied


def _clip_like_params():
    """Flax-style names from a CLIP model, with realistic ranks."""
    f = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
    return {
        "visual": {
            "conv1": {"kernel": f(4, 4, 3, 8)},
            "ln_pre": {"scale": f(8), "bias": f(8)},
            "class_embedding": f(8),
            "positional_embedding": f(5, 8),
            # nn.DenseGeneral attention projections: 3-D kernels and 2-D (heads, head_dim) biases.
            "transformer": {"resblocks_0": {"attn": {"query": {"kernel": f(8, 2, 4), "bias": f(2, 4)}}}},
            "proj": f(8, 6),
        },
        "token_embedding": {"embedding": f(50, 8)},
        "ln_final": {"scale": f(8), "bias": f(8)},
        "LayerNorm_0": {"scale": f(8), "bias": f(8)},
        "logit_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32),
        "logit_bias": jnp.asarray(-10.0, jnp.float32),
        "mlp": {"c_fc": {"kernel": f(8, 32), "bias": f(32)}},
    }


DECAYED = {"visual/conv1/kernel", "visual/transformer/resblocks_0/attn/query/kernel", "visual/proj", "mlp/c_fc/kernel"}


def _by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in flat}


def test_schedule_matches_closed_form():
    peak, warmup, total, ratio = 3e-4, 100, 1100, 0.1
    schedule = make_schedule(OptimConfig(learning_rate=peak, warmup_steps=warmup, total_steps=total, end_lr_ratio=ratio))
    end = peak * ratio

    def expected(t):
        if t < warmup:
            return peak * t / warmup
        progress = min(t - warmup, total - warmup) / (total - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    assert float(schedule(0)) == 0.0
    for t in [0, 1, 50, warmup, 350, warmup + (total - warmup) // 2, 900, total, total + 500]:
        np.testing.assert_allclose(float(schedule(t)), expected(t), rtol=1e-5, atol=1e-12, err_msg=f"step {t}")
    np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(warmup + (total - warmup) // 2)), (peak + end) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(total)), end, rtol=1e-5)


def test_config_from_configdict_and_errors():
    cd = ml_collections.ConfigDict({"learning_rate": 1e-3, "warmup_steps": 10, "total_steps": 20, "accum_steps": 2})
    cfg = dataclass_from(OptimConfig, cd)
    assert cfg == OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=20, accum_steps=2)
    assert isinstance(make_optimizer(cd), optax.MultiSteps)
    with pytest.raises(ValueError, match=r"unknown OptimConfig fields \['learning_rat'\]"):
        dataclass_from(OptimConfig, {"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        OptimConfig(warmup_steps=10, total_steps=10)  # the cosine needs at least one step


def test_decay_mask_on_clip_params():
    params = _clip_like_params()
    mask = _by_path(decay_mask(params))
    assert set(mask) == set(_by_path(params))
    assert {path for path, decayed in mask.items() if decayed} == DECAYED
    # Logically partitioned (boxed) parameters, as model code creates them, get the same mask.
    boxed = jax.tree_util.tree_map(lambda x: nn.Partitioned(x, (None,) * x.ndim), params)
    boxed_mask = _by_path(decay_mask(boxed))
    assert {path.removesuffix("/value") for path, decayed in boxed_mask.items() if decayed} == DECAYED
    # Configurable: with no excluded names only the ndim rule remains, so 2-D embeddings and 2-D
    # attention biases are decayed.
    mask = _by_path(decay_mask(_clip_like_params(), no_decay_names=()))
    assert {path for path, decayed in mask.items() if decayed} == DECAYED | {
        "visual/positional_embedding",
        "token_embedding/embedding",
        "visual/transformer/resblocks_0/attn/query/bias",
    }


def test_decay_shrinks_only_decayed_leaves():
    params = _clip_like_params()
    lr, wd = 0.1, 0.5
    tx = make_optimizer(OptimConfig(learning_rate=lr, warmup_steps=0, total_steps=10, weight_decay=wd, end_lr_ratio=1.0))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = _by_path(optax.apply_updates(params, updates))
    old = _by_path(params)
    for path in old:
        if path in DECAYED:  # decoupled decay: p <- p - lr * wd * p
            np.testing.assert_allclose(new[path], old[path] * (1 - lr * wd), rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(new[path], old[path], err_msg=path)


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))}
    grads = {"w": jnp.full((4, 4), 100.0), "b": jnp.full((4,), -50.0)}
    clip = 0.5
    # With b1 = b2 = 0 Adam's first step is -lr * g / (|g| + eps), so with eps = 1 the update keeps the
    # gradient's scale and shows whether clipping happened first.
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=0, total_steps=10, end_lr_ratio=1.0, b1=0.0, b2=0.0,
                      eps=1.0, weight_decay=0.0, grad_clip_norm=clip)
    norm = math.sqrt(16 * 100.0**2 + 4 * 50.0**2)
    for grad_clip_norm, scale in ((clip, clip / norm), (None, 1.0)):
        tx = make_optimizer(dataclasses.replace(cfg, grad_clip_norm=grad_clip_norm))
        updates, _ = tx.update(grads, tx.init(params), params)
        for name, g in grads.items():
            c = np.asarray(g) * scale
            np.testing.assert_allclose(updates[name], -c / (np.abs(c) + 1.0), rtol=1e-5, err_msg=name)
        if grad_clip_norm is not None:
            assert float(optax.tree.norm(updates)) < clip
        else:
            assert float(optax.tree.norm(updates)) > 4 * clip


def test_multisteps_updates_every_k_steps():
    k = 3
    params = {"w": jnp.ones((2, 2))}
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=100, weight_decay=0.0, accum_steps=k)
    tx = make_optimizer(cfg)
    update = jax.jit(tx.update)
    state = tx.init(params)
    single = make_optimizer(dataclasses.replace(cfg, accum_steps=1))
    grads = [{"w": jnp.full((2, 2), g)} for g in (1.0, 2.0, 6.0)]
    for step in range(2 * k):
        updates, state = update(grads[step % k], state, params)
        changed = bool(jnp.any(updates["w"] != 0))
        assert changed == (step % k == k - 1), f"step {step}"
    # The applied update equals one plain step on the mean gradient.
    mean = {"w": jnp.full((2, 2), 3.0)}
    expected, _ = single.update(mean, single.init(params), params)
    state = tx.init(params)
    for g in grads:
        updates, state = update(g, state, params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_accumulation_with_frozen_parameters_keeps_no_accumulator_for_them():
    """accum_steps and frozen together: the frozen leaves get neither moments nor a gradient sum, the
    trained ones update every k-th micro-batch exactly as an optimizer over them alone would, and
    update_applied reports the same steps."""
    k = 2
    params = {"frozen": {"w": jnp.ones((64, 32))}, "head": {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}}
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, accum_steps=k, frozen=("frozen",))
    tx = make_optimizer(cfg)
    state = tx.init(params)
    sizes = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    trained = sizes(params["head"])
    assert sizes(state) <= 3 * trained + 16  # two moments, the accumulator, a few counters
    alone = make_optimizer(dataclasses.replace(cfg, frozen=()))
    alone_state = alone.init(params["head"])
    rng = np.random.default_rng(0)
    for step in range(2 * k):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        expected, alone_state = jax.jit(alone.update)(grads["head"], alone_state, params["head"])
        assert not np.any(np.asarray(updates["frozen"]["w"]))
        for name in ("w", "b"):
            np.testing.assert_allclose(updates["head"][name], expected[name], rtol=1e-6, atol=1e-7)
        assert bool(update_applied(state)) == (step % k == k - 1), step
    assert update_applied(make_optimizer(dataclasses.replace(cfg, accum_steps=1)).init(params)) is True
