"""The trainer's pure, compiled half: its state, one training and one evaluation step, and their
sharded construction. `common.trainer.Trainer` drives them (data, checkpoints, logging, faults).

A step is a pure function of (state, batch): the same inputs give bitwise the same state, on any
mesh shape, which is what exact resume and the presets' equal loss curves rest on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import optax

from common import checkpoint as ckpt
from common import optim, sharding
from common.layers import cpu_compiler_options

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class Task(Protocol):
    """What a model family gives the trainer.

    `init(rng)` returns flax variables ({"params": ..., other collections})
    with logically annotated leaves. `loss(params, model_state, batch, rng,
    update)` returns `(loss, metrics, new_model_state)`; `update` counts the
    optimizer updates applied so far (what schedules should follow: under
    gradient accumulation several steps share one), and `new_model_state` is
    None unless the task updates non-trainable collections (BatchNorm
    statistics). `eval_metrics(params, model_state, batch)` returns a dict of
    means over the batch's real rows: those where `batch["valid"]` is True
    when an evaluation pipeline padded its last batch.
    """

    def init(self, rng: jax.Array) -> Mapping[str, Any]: ...

    def loss(
        self, params: Any, model_state: Any, batch: Batch, rng: jax.Array, update: jax.Array
    ) -> tuple[jax.Array, Metrics, Any]: ...

    def eval_metrics(self, params: Any, model_state: Any, batch: Batch) -> Metrics: ...


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # train steps (micro-batches) taken, skipped ones included
    update: jax.Array  # optimizer updates applied: step / accum_steps, less the skipped ones
    params: Any
    opt_state: Any
    model_state: Any  # non-trainable collections (e.g. batch_stats); {} when none
    ema_params: Any  # the parameter average when ema_decay > 0, else None
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_total: jax.Array
    nonfinite_streak: jax.Array


def _where(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_step(state: TrainState, batch: Batch, *, task: Task, tx: optax.GradientTransformation,
               ema_decay: float = 0.0) -> tuple[TrainState, Metrics]:
    """One micro-batch. Pure: the same state and batch give bitwise the same result."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        loss, metrics, new_model_state = task.loss(params, state.model_state, batch, rng, state.update)
        return loss, (metrics, new_model_state)

    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A bad step leaves params and optimizer moments untouched. A conditional (rather than selecting
    # between old and new values) lets XLA update the donated buffers in place without copying them.
    new_params, new_opt_state = jax.lax.cond(ok, apply, lambda p, o: (p, o), state.params, state.opt_state)
    if new_model_state is None:
        new_model_state = state.model_state
    # Under accumulation (optax.MultiSteps) most steps only add to the gradient sum.
    applied = ok & optim.update_applied(new_opt_state)
    ema_params = state.ema_params
    if ema_decay > 0:
        ema_params = _where(applied, optax.incremental_update(new_params, ema_params, 1.0 - ema_decay), ema_params)
    # ... and its statistics and the parameter average.
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    state = state.replace(
        step=state.step + 1,
        update=state.update + applied.astype(jnp.int32),
        ema_params=ema_params,
        params=new_params,
        opt_state=new_opt_state,
        model_state=_where(ok, new_model_state, state.model_state),
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
        nonfinite_streak=streak,
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))
    return state, metrics


def eval_step(params: Any, model_state: Any, batch: Batch, *, task: Task) -> tuple[Metrics, jax.Array]:
    """The task's eval metrics of one batch and the number of real rows they average."""
    rows = jnp.sum(batch["valid"]) if "valid" in batch else jnp.asarray(jax.tree.leaves(batch)[0].shape[0])
    return task.eval_metrics(params, model_state, batch), rows


def create_train_state(task: Task, tx: optax.GradientTransformation, rng: jax.Array, *,
                       ema: bool = False) -> TrainState:
    """The initial state, with logical boxes still on (so shardings can be derived)."""
    init_rng, step_rng = jax.random.split(rng)
    variables = dict(task.init(init_rng))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        update=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=variables,
        ema_params=params if ema else None,  # same logical axes, hence the same shardings
        rng=jax.random.key_data(step_rng),
        nonfinite_total=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def init_state(task: Task, tx: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh, *,
               ema: bool = False) -> tuple[TrainState, Any]:
    """(state, shardings): the train state born sharded on `mesh`."""
    create = functools.partial(create_train_state, task, tx, ema=ema)
    return sharding.init_sharded(create, jax.random.key(seed), mesh=mesh)


def abstract_train_state(task: Task, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
                         ema: bool = False) -> tuple[TrainState, Any]:
    """(state, shardings) as `init_state` makes them, the state's leaves `jax.ShapeDtypeStruct`s carrying
    their shardings: nothing is allocated (what a memory plan compiles against)."""
    abstract, shardings = sharding.abstract_sharded(functools.partial(create_train_state, task, tx, ema=ema),
                                                    jax.random.key(0), mesh=mesh)
    return ckpt.abstract_like(abstract, shardings), shardings


def jit_train_step(task: Task, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, state_shardings: Any,
                   batch_shardings: Any, *, ema_decay: float = 0.0) -> Callable:
    """`train_step` jitted with the state's and the batch's shardings, metrics replicated, the state donated.
    Call (or lower) it inside `sharding.use_mesh(mesh)`, where the model's logical constraints apply."""
    return jax.jit(
        functools.partial(train_step, task=task, tx=tx, ema_decay=ema_decay),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=cpu_compiler_options(),  # on a CPU, XLA's own convolutions (common.layers)
    )
