"""Optimizer for every model here: AdamW, linear warmup + cosine decay, masked weight decay,
global-norm clipping, gradient accumulation (optax.MultiSteps) and frozen parts.

Defaults follow CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sec. 2.5 and table 19): AdamW (Loshchilov & Hutter 2019) with decoupled weight decay
applied to "all weights that are not gains or biases", a cosine learning-rate schedule, b1=0.9,
b2=0.98, eps=1e-6, weight decay 0.2, 2000 warmup steps. DALL·E (Ramesh et al. 2021, appendix B.2)
uses the same recipe with b2=0.96, eps=1e-8, weight decay 4.5e-2, clipping at norm 4 and 5000
warmup steps; its experiment configs override these fields.

Decay follows PyTorch's ``AdamW``: the decoupled decay is scaled by the scheduled learning rate.

Frozen parts (``OptimConfig.frozen``, e.g. a locked image tower for LiT, Zhai et al. 2022) get no
update and no optimizer state (``optax.multi_transform`` with ``set_to_zero``), and are left out of
the clipped global norm, as PyTorch leaves out parameters with ``requires_grad=False``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from common.config import dataclass_from

#: Lowercase substrings of a parameter path that exclude it from weight decay. Together with the
#: ``ndim < 2`` rule this skips biases, norm gains (flax ``scale``; modules named LayerNorm, norm*,
#: ln_*), embedding tables (``nn.Embed``'s ``embedding``, ``token_embedding``,
#: ``positional_embedding``, ``class_embedding``, ``pos_embed``) and the contrastive temperature
#: and bias (``logit_scale``, ``logit_bias``, ``temperature``).
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = ("bias", "scale", "norm", "ln_", "embed", "logit_", "temperature")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyperparameters. Steps count optimizer updates, not micro-batches."""

    learning_rate: float = 5e-4  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 2000  # linear warmup from 0 to learning_rate
    total_steps: int = 100_000  # warmup + cosine decay; the rate stays at the final value afterwards
    end_lr_ratio: float = 0.0  # final learning rate = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2  # decoupled, multiplied by the scheduled learning rate
    grad_clip_norm: float | None = 1.0  # clip the (accumulated) gradient's global norm; None: no clipping
    accum_steps: int = 1  # micro-batches per update when accumulating with optax.MultiSteps
    no_decay_names: tuple[str, ...] = DEFAULT_NO_DECAY_NAMES  # see decay_mask
    frozen: tuple[str, ...] = ()  # parameter path prefixes ("visual", "text/transformer/resblocks_0") never updated

    def __post_init__(self):
        checks = [
            (self.learning_rate > 0, "learning_rate > 0"),
            (self.total_steps > 0, "total_steps > 0"),
            (0 <= self.warmup_steps < self.total_steps, "0 <= warmup_steps < total_steps"),
            (0.0 <= self.end_lr_ratio <= 1.0, "0 <= end_lr_ratio <= 1"),
            (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "0 <= b1, b2 < 1"),
            (self.eps > 0, "eps > 0"),
            (self.weight_decay >= 0, "weight_decay >= 0"),
            (self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm > 0 or None"),
            (self.accum_steps >= 1, "accum_steps >= 1"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid OptimConfig: expected {rule}, found {self}")
        object.__setattr__(self, "no_decay_names", tuple(self.no_decay_names))
        object.__setattr__(self, "frozen", tuple(self.frozen))


def make_schedule(cfg: OptimConfig | Mapping[str, Any] | Any) -> optax.Schedule:
    """Learning rate per optimizer update: linear 0 -> peak over ``warmup_steps``, then a half cosine
    from peak to ``peak * end_lr_ratio`` at ``total_steps``, constant after that.

    lr(t) = peak * t / W                                         for t < W
    lr(t) = end + (peak - end) * (1 + cos(pi * (t - W) / (T - W))) / 2   for W <= t <= T
    """
    cfg = dataclass_from(OptimConfig, cfg)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/").lower()


def decay_mask(params: Any, no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES) -> Any:
    """Which parameters get weight decay: a pytree of bools shaped like ``params``.

    A leaf is decayed iff it has ``ndim >= 2`` (weight matrices, conv kernels) and its lowercased
    ``/``-joined path (e.g. ``visual/conv1/kernel``) contains none of ``no_decay_names``. The ndim
    rule alone excludes 1-D biases, norm gains and scalars such as ``logit_scale``; the names exclude
    2-D embedding tables (``token_embedding/embedding``, ``positional_embedding``) and the 2-D
    ``(heads, head_dim)`` biases of ``nn.DenseGeneral`` attention projections, following CLIP's
    "all weights that are not gains or biases" plus the common practice of not decaying embeddings.
    Works on flax ``Partitioned``-boxed trees too (the box adds a harmless ``value`` path entry).
    """
    names = tuple(n.lower() for n in no_decay_names)

    def rule(path, leaf):
        name = _path_name(path)
        return jnp.ndim(leaf) >= 2 and not any(n in name for n in names)

    return jax.tree_util.tree_map_with_path(rule, params)


def frozen_mask(params: Any, frozen: Sequence[str]) -> Any:
    """Which parameters are frozen: a pytree of bools shaped like ``params``.

    A leaf is frozen iff its ``/``-joined path (e.g. ``visual/transformer/resblocks_0/attn/query/kernel``)
    is one of the ``frozen`` prefixes or lies under one. A prefix that matches no parameter is an error
    (a typo would otherwise train what was meant to be frozen). Works on flax-boxed trees too.
    """
    prefixes = tuple(p.strip("/") for p in frozen)
    matched: set[str] = set()

    def rule(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        hits = [p for p in prefixes if name == p or name.startswith(p + "/")]
        matched.update(hits)
        return bool(hits)

    mask = jax.tree_util.tree_map_with_path(rule, params)
    unmatched = [p for p in prefixes if p not in matched]
    if unmatched:
        names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"frozen prefixes {unmatched} match no parameter; expected '/'-joined path prefixes "
                         f"such as {sorted({n.rsplit('/', 2)[0] for n in names})[:6]}.")
    return mask


def make_optimizer(cfg: OptimConfig | Mapping[str, Any] | Any) -> optax.GradientTransformation:
    """``clip_by_global_norm -> AdamW(schedule, masked decay)`` on the trainable parameters (zero updates
    and no state for ``frozen`` ones), wrapped in ``optax.MultiSteps`` when ``accum_steps > 1``.

    With ``MultiSteps`` the step function is called once per micro-batch: gradients are averaged in
    the optimizer state and an update is applied every ``accum_steps`` calls (zeros in between), so
    clipping and the schedule see the accumulated gradient and count real updates. With frozen
    parameters it wraps the trained group only: frozen ones get no gradient accumulator either (a
    locked LiT image tower would otherwise keep a zero-filled copy of itself). `update_applied` tells
    whether a step's updates were applied.
    """
    cfg = dataclass_from(OptimConfig, cfg)
    adamw = optax.adamw(
        learning_rate=make_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=functools.partial(decay_mask, no_decay_names=cfg.no_decay_names),
    )
    tx = adamw if cfg.grad_clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    if cfg.frozen:
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda f: "frozen" if f else "trained", frozen_mask(params, cfg.frozen))
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def update_applied(opt_state: Any) -> jax.Array | bool:
    """Whether the step that produced `opt_state` (of a `make_optimizer` optimizer) applied an update:
    always without accumulation; under ``optax.MultiSteps``, on every ``accum_steps``-th micro-batch."""
    is_multisteps = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_multisteps) if is_multisteps(x)]
    if not found:
        return True
    return jnp.logical_and(found[0].mini_step == 0, found[0].gradient_step > 0)  # optax.MultiSteps.has_updated
