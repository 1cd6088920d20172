"""The one sharded training loop that CLIP, the dVAE and the DALL·E transformer share.

A model family plugs in through a small `Task` (init, loss, eval_metrics); the mesh is made
first (`common.sharding.make_mesh`) and given to the task and to the `Trainer`. The loop:
  * creates the train state already sharded (`jax.eval_shape` -> logical rules
    -> `jax.jit(create, out_shardings=...)`), so nothing is ever materialised on
    one device;
  * runs one jitted `train_step(state, batch) -> (state, metrics)` with in/out
    shardings and the state donated;
  * never lets a non-finite loss or gradient reach the parameters: the update
    is dropped, counted, and after `max_nonfinite_streak` in a row the run
    stops with `NonFiniteError`, its last checkpoint intact;
  * checkpoints the state *and* the data-iterator state every N steps and on
    SIGTERM, so a resumed run replays exactly the batches it would have seen:
    a run killed at step k and restarted reaches bitwise the same parameters
    as one never killed, and its log holds every step exactly once;
  * resumes on another mesh or process count (fsdp on 8 devices -> data
    parallel on 4, 2 processes -> 1): the arrays are read into the new
    shardings with the same values; the per-host data positions carry over when
    the process count is unchanged, and otherwise the run warns, naming both
    layouts, and continues from the same step with its input pipeline afresh;
  * guards the workdir (`common/run_guard.py`): one run at a time, and a
    resume that changes what is trained (learning rate, batch size, ...) is
    refused unless forced; a damaged checkpoint (`common/checkpoint.py`
    verifies checksums) is reported with the previous one, or skipped with
    `fallback_to_previous_checkpoint`;
  * optionally keeps an exponential moving average of the parameters
    (`ema_decay`), which evaluation then uses;
  * runs named `evaluators` every `eval_every` steps and at the end, writing
    their metrics to the same log (big_vision's `config.evals`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from common import checkpoint as ckpt
from common import metrics as metrics_lib
from common import memory, optim, run_guard, sharding
from common.config import dataclass_from
from common.layers import cpu_compiler_options
from common.train_step import (  # noqa: F401  (the trainer's public names, defined there)
    Batch,
    Metrics,
    Task,
    TrainState,
    abstract_train_state,
    create_train_state,
    eval_step,
    init_state,
    jit_train_step,
    train_step,
)

log = logging.getLogger(__name__)

# A named evaluation: (evaluation params, model_state) -> metrics. The arguments are the trainer's
# sharded arrays (the parameter average when `ema_decay > 0`); every process calls it at the same
# point, so it may run collectives, and it must never fetch a non-fully-addressable array whole.
Evaluator = Callable[[Any, Any], Mapping[str, float]]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class DataIterator(Protocol):
    """A host-local batch iterator whose position can be checkpointed."""

    def __next__(self) -> Batch: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Loop settings; model and data settings live with the task.

    Gradient accumulation: with `optim.accum_steps = k` every train step feeds
    one micro-batch of `global_batch_size` and the optimizer applies the
    averaged update every k steps (optax.MultiSteps), so `total_steps` counts
    micro-batches and the schedule counts updates (total_steps / k).

    Parameter averaging (Polyak averaging, as the DALL·E dVAE's 0.999): with
    `ema_decay = d > 0` every applied update moves the average by
    `ema <- d * ema + (1 - d) * params` (optax.incremental_update) with the
    parameters after that update; micro-batches in between leave it alone, so
    the decay is per update, not per step. Evaluators see the average.
    """

    total_steps: int = 1000
    global_batch_size: int = 64
    mesh: Mapping[str, int] | str = "data_parallel"  # sizes or a preset of common/sharding.py, read by the driver
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # run the evaluators every this many steps; 0: only at the end
    ema_decay: float = 0.0  # parameter average per optimizer update, used for evaluation; 0: none
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_nonfinite_streak: int = 10  # consecutive skipped steps before the run stops
    progress: bool = True
    fallback_to_previous_checkpoint: bool = False  # resume from the newest intact checkpoint if the latest is damaged
    allow_config_change: bool = False  # resume even if learning rate, schedule, batch size, ... changed

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"invalid TrainerConfig: expected 0 <= ema_decay < 1 (0 disables averaging), "
                             f"found {self.ema_decay}")


def _gather_from_processes(value: Any) -> list[Any]:
    """A JSON-serializable `value` from every process, in process order.

    A collective: every process must call it at the same point.
    """
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(raw.size))  # (P,)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded)  # (P, longest)
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]


def _describe_layout(layout: Mapping[str, Any]) -> str:
    mesh = ", ".join(f"{axis}={size}" for axis, size in layout["mesh"].items())
    return f"mesh ({mesh}) over {layout['processes']} process(es)"


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: rely on orbax's preemption sync only
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: checkpointing and stopping after this step.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    history: list[dict[str, float]]
    evaluations: dict[str, dict[str, float]]  # evaluator name -> its latest metrics, with their "step"
    preempted: bool
    nonfinite_total: int
    seconds: float
    examples_per_second: float


class Trainer:
    """Runs a `Task` on a mesh: init or resume, train, evaluate, checkpoint.

    `mesh` is the one the task was built with (make it first: `sharding.make_mesh(cfg.mesh)`).
    """

    def __init__(
        self,
        task: Task,
        cfg: TrainerConfig | Any,
        optim_cfg: optim.OptimConfig | Any,
        workdir: str | Path,
        *,
        mesh: jax.sharding.Mesh,
    ):
        memory.tune_host_malloc()  # XLA's per-step host temporaries stay mapped instead of faulting in every step
        self.task = task
        self.cfg = dataclass_from(TrainerConfig, cfg)
        self.optim_cfg = dataclass_from(optim.OptimConfig, optim_cfg)
        self.workdir = Path(workdir)
        self.mesh = mesh
        sharding.check_batch_divisible(self.cfg.global_batch_size, self.mesh)
        self.tx = optim.make_optimizer(self.optim_cfg)
        # Shapes and shardings only: the random init runs on first use of `state`, so a run that resumes
        # (or restores for evaluation) never compiles, runs or holds the memory of an init it overwrites.
        self._abstract_state, self.state_shardings = abstract_train_state(task, self.tx, self.mesh,
                                                                          ema=self.cfg.ema_decay > 0)
        self._state: TrainState | None = None
        self.checkpoints = ckpt.CheckpointManager(
            self.workdir / "checkpoints",
            max_to_keep=self.cfg.keep_checkpoints,
            save_interval_steps=self.cfg.checkpoint_every,
            async_save=self.cfg.async_checkpoints,
        )
        self._train_step = None
        self._eval_step = None

    @property
    def state(self) -> TrainState:
        """The sharded train state: the checkpoint's once restored, else the seed's init (made on first use)."""
        if self._state is None:
            self._state, _ = init_state(self.task, self.tx, self.cfg.seed, self.mesh, ema=self.cfg.ema_decay > 0)
        return self._state

    @state.setter
    def state(self, value: TrainState) -> None:
        self._state = value

    # -- compiled steps -------------------------------------------------------
    def _batch_shardings(self, batch: Batch) -> Any:
        return jax.tree.map(lambda x: sharding.batch_sharding(self.mesh, np.ndim(x)), batch)

    def compiled_train_step(self, batch: Batch) -> Callable:
        if self._train_step is None:
            self._train_step = jit_train_step(self.task, self.tx, self.mesh, self.state_shardings,
                                              self._batch_shardings(batch), ema_decay=self.cfg.ema_decay)
        return self._train_step

    def compiled_eval_step(self, batch: Batch) -> Callable:
        """`eval_step` on the mesh: `(params, model_state, batch) -> (metrics, real rows)`."""
        if self._eval_step is None:
            # Eval never donates: the state lives on.
            self._eval_step = jax.jit(
                functools.partial(eval_step, task=self.task),
                in_shardings=(self.state_shardings.params, self.state_shardings.model_state,
                              self._batch_shardings(batch)),
                out_shardings=sharding.replicated(self.mesh),
                compiler_options=cpu_compiler_options(),
            )
        return self._eval_step

    # -- checkpoints ----------------------------------------------------------
    def restore_if_any(self, data: DataIterator | None) -> int:
        """Loads the latest checkpoint (state + data position); returns its step or 0."""
        return self._restore(data)[0]

    def _restore(self, data: DataIterator | None) -> tuple[int, dict]:
        """(step, metadata) of the checkpoint loaded into the state and `data`; (0, {}) if none."""
        if self.checkpoints.latest_step() is None:
            return 0, {}
        # The arrays are read straight into this run's shardings, whatever mesh wrote them.
        self.state, meta = self.checkpoints.restore(target=self._abstract_state,
                                                    fall_back=self.cfg.fallback_to_previous_checkpoint)
        step = int(jax.device_get(self.state.step))
        saved, now = meta.get("layout"), self._layout()
        if saved is not None and saved != now:
            log.info("Step %d in %s was saved on %s; restored onto %s.", step, self.checkpoints.directory,
                     _describe_layout(saved), _describe_layout(now))
        states = meta.get("data_state")  # one per process, in process order
        if data is not None and states is not None:
            if len(states) == jax.process_count():
                data.set_state(states[jax.process_index()])
            else:
                log.warning(
                    "Step %d in %s holds the input positions of %d process(es), each reading its own shard of "
                    "every batch; this run has %d. The data cannot continue bitwise under another process count, "
                    "so the input pipeline starts afresh in the new layout, while the model, optimizer state and "
                    "step continue from step %d. (Saved on %s; now %s.) Resume with %d process(es) to continue "
                    "the data exactly.", step, self.checkpoints.directory, len(states), jax.process_count(), step,
                    _describe_layout(saved) if saved else f"{len(states)} process(es)", _describe_layout(now),
                    len(states))
        log.info("Resumed from %s at step %d", self.checkpoints.directory, step)
        return step, meta

    def _layout(self) -> dict[str, Any]:
        """Where the state lives: the mesh's axis sizes and the process count (checkpoint metadata)."""
        return {"mesh": dict(self.mesh.shape), "processes": jax.process_count()}

    def _config_record(self) -> dict[str, Any]:
        return {"trainer": dataclasses.asdict(self.cfg), "optim": dataclasses.asdict(self.optim_cfg)}

    def save(self, data: DataIterator | None, *, force: bool = False,
             writer: metrics_lib.MetricWriter | None = None) -> bool:
        """Checkpoints the state, each host's data position, the configs and, when a `writer` is given,
        the length of its log once flushed (so a resume drops what is logged after this point)."""
        step = int(jax.device_get(self.state.step))
        # Every host reads its own shard, so every host's iterator state is kept;
        # orbax writes the JSON metadata from process 0 only, whose log length is the one kept.
        meta = {"step": step, "data_state": _gather_from_processes(data.get_state()) if data is not None else None,
                "config": self._config_record(), "log_bytes": writer.bytes_written if writer is not None else None,
                "layout": self._layout()}
        return self.checkpoints.save(step, self.state, meta, force=force)

    # -- evaluation -----------------------------------------------------------
    @property
    def eval_params(self) -> Any:
        """The parameters evaluators see: the average when `ema_decay > 0`."""
        return self.state.params if self.state.ema_params is None else self.state.ema_params

    def metrics_evaluator(self, batches: Callable[[], Iterator[Batch]]) -> Evaluator:
        """An evaluator averaging the task's `eval_metrics` over one pass of `batches()`, each batch
        weighted by its real rows, so a padded last batch (`valid`) counts each example once."""

        def evaluate(params: Any, model_state: Any) -> dict[str, float]:
            totals: dict[str, float] = {}
            count = 0
            for host_batch in batches():
                batch = sharding.shard_batch(host_batch, self.mesh)
                metrics, rows = jax.device_get(self.compiled_eval_step(batch)(params, model_state, batch))
                if rows:  # an all-padding batch has no (finite) means
                    for k, v in metrics.items():
                        totals[k] = totals.get(k, 0.0) + float(v) * int(rows)
                    count += int(rows)
            return {k: v / count for k, v in totals.items()}

        return evaluate

    def _run_evaluators(self, evaluators: Mapping[str, Evaluator], step: int, writer: metrics_lib.MetricWriter,
                        evaluations: dict[str, dict[str, float]]) -> None:
        for name, evaluator in evaluators.items():
            ev = {k: float(v) for k, v in evaluator(self.eval_params, self.state.model_state).items()}
            evaluations[name] = {"step": step, **ev}
            writer.write_scalars(step, {f"{name}/{k}": v for k, v in ev.items()})
            log.info("%s at step %d: %s", name, step, ev)

    # -- the loop -------------------------------------------------------------
    def fit(self, data: DataIterator, evaluators: Mapping[str, Evaluator] | None = None) -> TrainResult:
        """Trains to `total_steps` (resuming from the latest checkpoint); runs `evaluators` every
        `eval_every` steps and once at the end, unless the run was preempted.

        Raises:
          run_guard.WorkdirInUseError: another run is training in this workdir.
          run_guard.ConfigChangeError: the checkpoint was trained with another learning rate, schedule,
            batch size, ... (unless `allow_config_change`), or `total_steps` is below its step.
          checkpoint.CheckpointCorruptError: the latest checkpoint is damaged (unless
            `fallback_to_previous_checkpoint` finds an intact one).
        """
        with run_guard.one_run_in(self.workdir):
            return self._fit(data, dict(evaluators or {}))

    def _fit(self, data: DataIterator, evaluators: dict[str, Evaluator]) -> TrainResult:
        cfg = self.cfg
        start, meta = self._restore(data)
        if meta:
            run_guard.check_resumed_config(meta.get("config"), self._config_record(), step=start,
                                           where=self.checkpoints.directory, allow_changes=cfg.allow_config_change)
        # Drop what a killed run logged after its checkpoint: this run logs those steps again.
        writer = metrics_lib.MetricWriter(self.workdir, resume_step=start,
                                          resume_bytes=meta.get("log_bytes") if meta else 0)
        history: list[dict[str, float]] = []
        evaluations: dict[str, dict[str, float]] = {}
        bar = metrics_lib.progress_bar(cfg.total_steps, "train", enabled=None if cfg.progress else False, initial=start)
        t0, examples = time.perf_counter(), 0
        logged = (0, t0)  # (examples, time) at the last log
        preempted = False
        step = start
        try:
            with _Preemption() as preemption, sharding.use_mesh(self.mesh):
                while step < cfg.total_steps:
                    host_batch = next(data)
                    batch = sharding.shard_batch(host_batch, self.mesh)
                    self.state, step_metrics = self.compiled_train_step(batch)(self.state, batch)
                    step += 1
                    examples += cfg.global_batch_size
                    bar.update(1)
                    last = step == cfg.total_steps
                    if step % cfg.log_every == 0 or last:
                        record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                        now = time.perf_counter()  # after device_get: the steps so far have run
                        record["examples_per_second"] = examples / (now - t0)
                        if hasattr(data, "stats"):  # records the pipelines of all hosts skipped (corrupt, ...)
                            record["data_skipped"] = sum(_gather_from_processes(data.stats()["skipped_total"]))
                        history.append({"step": step, **record})
                        writer.write_scalars(step, record)
                        metrics_lib.set_postfix_metrics(bar, {"loss": record["loss"]},  # rate since the last log
                                                        examples_per_second=(examples - logged[0]) / (now - logged[1]))
                        logged = (examples, now)
                        self._check_finite()
                    if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                        self._run_evaluators(evaluators, step, writer, evaluations)
                    # Hosts agree on a SIGTERM at log and checkpoint boundaries (a host that stopped alone
                    # would wait forever in the next collective); orbax's own signal is already global.
                    boundary = step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last
                    if boundary and any(_gather_from_processes(preemption.requested)):
                        preempted = True
                    preempted = preempted or self.checkpoints.reached_preemption(step)
                    if step % cfg.checkpoint_every == 0 or last or preempted:
                        self._check_finite()
                        self.save(data, force=last or preempted, writer=writer)
                    if preempted:
                        break
                seconds = time.perf_counter() - t0
                if not preempted:  # the final evaluation, also when there was nothing left to train
                    self._run_evaluators(evaluators, step, writer, evaluations)
        finally:
            bar.close()
            self.checkpoints.wait_until_finished()
            writer.close()
        if history and writer.enabled:  # process 0 wrote the log; the others have none to plot
            metrics_lib.plot_curves(self.workdir / "metrics.jsonl", ["loss"], self.workdir / "loss.png")
        return TrainResult(
            state=self.state,
            step=step,
            history=history,
            evaluations=evaluations,
            preempted=preempted,
            nonfinite_total=int(jax.device_get(self.state.nonfinite_total)),
            seconds=seconds,
            examples_per_second=examples / seconds if seconds else 0.0,
        )

    def summary(self, result: TrainResult, data: DataIterator | None = None) -> dict[str, Any]:
        """The JSON-able facts of a `fit` that every task's run reports; each evaluator's latest
        metrics under its name."""
        h = result.history
        return {
            "steps": result.step,
            "first_loss": h[0]["loss"] if h else None,
            "final_loss": h[-1]["loss"] if h else None,
            "examples_per_second": result.examples_per_second,
            "nonfinite_steps": result.nonfinite_total,
            "preempted": result.preempted,
            "mesh": dict(self.mesh.shape),
            "data": data.stats() if hasattr(data, "stats") else None,
            **result.evaluations,
        }

    def _check_finite(self) -> None:
        streak = int(jax.device_get(self.state.nonfinite_streak))
        if streak >= self.cfg.max_nonfinite_streak:
            last_good = self.checkpoints.latest_step()
            raise NonFiniteError(
                f"{streak} consecutive steps had a non-finite loss or gradient (limit "
                f"max_nonfinite_streak={self.cfg.max_nonfinite_streak}); those updates were skipped. "
                f"The last checkpoint (step {last_good}) in {self.checkpoints.directory} is intact. "
                "Lower the learning rate, check the data for bad values, or enable gradient clipping."
            )

    def close(self) -> None:
        self.checkpoints.close()


def restore_eval_variables(task: Any, run: Mapping[str, Any] | None, workdir: str | Path,
                           mesh: jax.sharding.Mesh) -> dict:
    """{"params": the evaluation parameters (the average, if kept), **the model state (e.g. BatchNorm's
    "batch_stats")} of the latest checkpoint of a run of `task` in `workdir`. `run` holds the run's
    "trainer" and "optim" configs, which shape its state; None reads them from the checkpoint's metadata
    (every checkpoint records them), so `task` alone (the run's model) must be known."""
    workdir = Path(workdir)
    if run is None:
        if not (workdir / "checkpoints").is_dir():
            raise FileNotFoundError(f"{workdir} is not a training workdir: it has no checkpoints/ folder.")
        manager = ckpt.CheckpointManager(workdir / "checkpoints")
        try:
            if manager.latest_step() is None:
                raise FileNotFoundError(f"{workdir} has no checkpoint yet: train it first.")
            run = manager.restore_metadata()["config"]
        finally:
            manager.close()
    trainer = Trainer(task, run["trainer"], run["optim"], workdir, mesh=mesh)
    try:
        if trainer.restore_if_any(None) == 0:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet: train it first.")
        return {"params": trainer.eval_params, **trainer.state.model_state}
    finally:
        trainer.close()


def restore_eval_params(task: Any, run: Mapping[str, Any] | None, workdir: str | Path, mesh: jax.sharding.Mesh) -> Any:
    """The evaluation parameters alone of `restore_eval_variables`."""
    return restore_eval_variables(task, run, workdir, mesh)["params"]
