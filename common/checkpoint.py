"""Checkpoints: sharded train state + JSON metadata, async, atomic, keep-N.

A thin layer over `orbax.checkpoint.CheckpointManager` (modern `ocp.args`
API). Each step directory holds two items:

  state/     the pytree of arrays (params, optimizer state, step, RNG), written
             by every host through `StandardSave`; restored straight onto the
             shardings of an abstract target, so a run saved on one mesh
             resumes on another (e.g. saved FSDP over (8,), restored on (2, 4)).
  metadata/  a JSON dict (config, step, data-iterator state, ...).
  checksums/ a JSON dict: one checksum per array of `state` (`common.checksums.array_checksums`).

Atomicity comes from orbax: on local and mounted file systems a step is written
into `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every file
is on disk (on GCS, where renames are not atomic, a `commit_success.txt` file
marks the commit instead). A process killed mid-save therefore leaves the
previous step as the latest; the debris is ignored, and replaced by the next
save of that step.

Integrity is checked on restore. Every save records a checksum of each array,
computed on the devices from the global array (each device hashes its shard,
the sums meet in an all-reduce), so it does not depend on the mesh: a restore
onto another mesh recomputes and compares it. A step whose files are missing,
truncated or altered raises `CheckpointCorruptError` naming the step, the
fault and the previous step; `restore(fall_back=True)` moves such a step aside
(`<step>.damaged`) and restores the newest intact one instead.

    with CheckpointManager(workdir / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(step, state, {"config": cfg.to_dict(), "data": it_state})
        ...
        target = abstract_like(jax.eval_shape(init_fn, rng), state_shardings)
        state, metadata = ckpt.restore(target=target)
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_policies

from common.checksums import array_checksums

log = logging.getLogger(__name__)

_STATE = "state"
_METADATA = "metadata"
_CHECKSUMS = "checksums"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_DAMAGED_SUFFIX = ".damaged"
_MAX_LISTED = 20  # keys listed per kind of mismatch before "... and N more"


class CheckpointNotFoundError(FileNotFoundError):
    """No committed checkpoint (or not the requested step) in the directory."""


class CheckpointMismatchError(ValueError):
    """The restore target does not match the tree or shapes on disk."""


class CheckpointCorruptError(RuntimeError):
    """A committed step cannot be read back as it was written (files missing, truncated or altered)."""

    def __init__(self, directory: str, step: int, problem: str, previous: int | None):
        self.step, self.problem, self.previous = step, problem, previous
        if previous is None:
            advice = (f"There is no earlier checkpoint: restore the files of step {step} from a copy, or move "
                      f"{directory} away to start from scratch.")
        else:
            advice = (f"The previous checkpoint is step {previous}: restore it with restore({previous}), or let "
                      f"restore(fall_back=True) (the trainer: fallback_to_previous_checkpoint=True, e.g. "
                      f"--config.trainer.fallback_to_previous_checkpoint=True) move step {step} aside to "
                      f"{step}{_DAMAGED_SUFFIX} and resume from step {previous}.")
        super().__init__(f"Step {step} in {directory} is damaged: {problem}. {advice}")


def abstract_like(tree: Any, shardings: Any) -> Any:
    """Abstract restore target: `jax.ShapeDtypeStruct` leaves carrying shardings.

    Args:
      tree: pytree whose leaves have `.shape` and `.dtype` (`jax.eval_shape`
        output, or concrete arrays); Python / NumPy scalars are allowed and
        take JAX's default dtype (as `jax.eval_shape` would give them).
      shardings: one `jax.sharding.Sharding` for every leaf, or a pytree of
        shardings whose structure is a prefix of `tree`'s (as jit's
        `out_shardings`): a sharding stands for every leaf below it, also for
        none, as in an empty optimizer-state node of a frozen parameter.
    """
    def leaf(x, sharding):
        if not hasattr(x, "shape"):
            x = _as_array(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    def subtree(sharding, sub):
        return jax.tree.map(lambda x: leaf(x, sharding), sub)

    if isinstance(shardings, jax.sharding.Sharding):
        return subtree(shardings, tree)
    return jax.tree.map(subtree, shardings, tree)


def _write_replicated_arrays_whole() -> None:
    """In a single process, has orbax write each replicated array whole, from one device.

    orbax's default for jax.Arrays on CPU and TPU ("replica parallel") cuts a replicated array into one
    slice per device, so that the hosts holding copies share the writing. Within one process that shares
    nothing, and each slice is a small XLA program compiled and run on its device: four saves of the tiny
    demo over 8 CPU devices spent 37 s of its 207 s slicing. The files are the same either way. Only
    orbax's own handler is replaced (copied, with that one setting off), once; a handler someone else
    registered, and every multi-process run, keep theirs. Restoring is unaffected.
    """
    global _REPLICATED_WHOLE
    if _REPLICATED_WHOLE or jax.process_count() > 1:
        return
    _REPLICATED_WHOLE = True
    current = ocp.type_handlers.get_type_handler(jax.Array)
    ours = type(current) is ocp.type_handlers.ArrayHandler
    if not ours or getattr(current, "_use_replica_parallel", None) is not True:
        return  # someone else's handler, or an orbax whose handler no longer has this setting
    handler = copy.copy(current)
    handler._use_replica_parallel = False
    # orbax warns on every override; this one is deliberate, so its warning is not shown to users.
    absl_log, quiet = logging.getLogger("absl"), lambda record: "overriding" not in record.getMessage()
    absl_log.addFilter(quiet)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.removeFilter(quiet)


_REPLICATED_WHOLE = False


class CheckpointManager:
    """Saves and restores `(state, metadata)` pairs under `directory/<step>`.

    All hosts must call `save` and `restore` (orbax coordinates the writes).
    Saves are asynchronous by default: `save` returns once the arrays are
    copied off the devices (so the caller may donate them), and the files are
    written in the background; `wait_until_finished` blocks until committed.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        """Opens (creating if needed) a checkpoint directory.

        Args:
          directory: where step directories live; local path or any path
            orbax/etils understand (e.g. gs://).
          max_to_keep: keep only the latest N committed steps; None keeps all.
          save_interval_steps: `save` writes only when `step` is a multiple of
            this (or when forced, or when a preemption was signalled).
          async_save: write files in a background thread.
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        self.directory = os.fspath(directory)
        if "://" not in self.directory:
            # orbax's tensorstore backend refuses relative paths.
            self.directory = os.path.abspath(self.directory)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for name, save_args, restore_args in (
            (_STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
            (_METADATA, ocp.args.JsonSave, ocp.args.JsonRestore),
            (_CHECKSUMS, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            registry.add(name, save_args)
            registry.add(name, restore_args)
        options = ocp.CheckpointManagerOptions(
            # Save on the interval, and on any step once the runtime signals a
            # preemption (multi-host agreement is handled by orbax).
            save_decision_policy=ocp_policies.AnySavePolicy([
                ocp_policies.FixedIntervalPolicy(save_interval_steps),
                ocp_policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=ocp_policies.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            # Leave `<step>.orbax-checkpoint-tmp` debris alone: it is ignored, and
            # replaced when that step is saved again. Sweeping it at start-up
            # would delete the in-flight save of a training job whenever another
            # process (an evaluator) opens the same directory.
            cleanup_tmp_directories=False,
            create=True,
        )
        _write_replicated_arrays_whole()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def save(self, step: int, state: Any, metadata: dict, force: bool = False) -> bool:
        """Saves `state` (pytree of arrays) and `metadata` (JSON dict) as `step`.

        Python and NumPy scalar leaves (e.g. an int `step` field) are stored as
        0-d arrays and come back as `jax.Array`s. Returns whether a checkpoint
        was started: False when `step` is off the save interval (unless
        `force`) or not newer than the latest saved step.
        """
        state = jax.tree_util.tree_map_with_path(_savable_leaf, state)
        try:
            json.dumps(metadata, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"Checkpoint metadata must be JSON-serializable (dicts, lists, str, "
                f"numbers, bool, None); {e}. Convert it first, e.g. "
                f"ConfigDict.to_dict(), bytes.decode(), int(np_scalar)."
            ) from e
        items = {
            _STATE: ocp.args.StandardSave(state),
            _METADATA: ocp.args.JsonSave(metadata),
            _CHECKSUMS: ocp.args.JsonSave(array_checksums(state)),
        }
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None = None, *, target: Any, fall_back: bool = False) -> tuple[Any, dict]:
        """Restores `(state, metadata)` of `step` (default: the latest).

        Args:
          step: which step; None for the latest. Pending async saves are waited
            for first.
          target: abstract pytree of `jax.ShapeDtypeStruct` with shardings (see
            `abstract_like`), with the tree structure and shapes of the saved
            state. Arrays are read directly into these shardings, whatever mesh
            the checkpoint was written from; a target dtype that differs from
            the stored one is cast to (e.g. fp32 params restored as bf16; such
            arrays are not compared with their checksums).
          fall_back: with `step=None`, a damaged latest step is moved aside to
            `<step>.damaged` (kept for inspection, no longer listed) with a
            warning, and the previous step is tried, down to the oldest.

        Raises:
          CheckpointNotFoundError: no committed checkpoint / no such step.
          CheckpointMismatchError: tree structure or shapes differ from disk.
          CheckpointCorruptError: files of the step are missing, unreadable or
            differ from their checksums (and `fall_back` found no intact step).
          TypeError: a target leaf is not abstract or has no sharding.
        """
        target = jax.tree_util.tree_map_with_path(_abstract_leaf, target)
        while True:
            resolved = self._resolve_step(step)
            try:
                return self._restore_step(resolved, target)
            except CheckpointCorruptError as err:
                if not fall_back or step is not None or err.previous is None:
                    raise
                aside = self._set_aside(resolved)
                log.warning("Step %d in %s is damaged: %s. Moved it to %s; trying step %d.",
                            resolved, self.directory, err.problem, aside, err.previous)

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        """Reads one step and checks its arrays against their checksums."""
        problem, restored = None, None
        try:
            items = self._manager.item_metadata(step)
        except Exception as e:  # whatever fails to read is damage, named below
            items, problem = {}, f"its description cannot be read ({_first_line(e)})"
        stored = items.get(_STATE)
        if problem is None and stored is None:
            problem = f"the description of its arrays ({_STATE}/_METADATA) is missing or unreadable"
        if problem is None:
            self._check_matches(step, target, stored.tree)
            args = {_STATE: ocp.args.StandardRestore(target), _METADATA: ocp.args.JsonRestore()}
            if _CHECKSUMS in items:
                args[_CHECKSUMS] = ocp.args.JsonRestore()
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # tensorstore and orbax raise many types for bad files
                problem = f"its files cannot be read ({_first_line(e)})"
        problem = _agreed_problem(problem)  # every process raises, or none does
        if problem is None:
            if _CHECKSUMS in items:
                problem = _checksum_problem(restored[_STATE], restored[_CHECKSUMS], stored.tree, target)
            else:
                log.warning("Step %d in %s has no array checksums (saved by an older version): not verified.",
                            step, self.directory)
        if problem is not None:
            earlier = [s for s in self.all_steps() if s < step]
            raise CheckpointCorruptError(self.directory, step, problem, earlier[-1] if earlier else None)
        return restored[_STATE], restored[_METADATA]

    def _set_aside(self, step: int) -> str:
        """Renames a damaged step to `<step>.damaged` (process 0) so it is neither listed nor in the
        way of saving that step again; returns the new path."""
        root = self._manager.directory
        aside = root / f"{step}{_DAMAGED_SUFFIX}"
        if jax.process_index() == 0:
            n = 1
            while aside.exists():
                aside, n = root / f"{step}{_DAMAGED_SUFFIX}.{n}", n + 1
            (root / str(step)).rename(aside)
        multihost_utils.sync_global_devices(f"checkpoint: step {step} set aside")
        self._manager.reload()
        return os.fspath(aside)

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default: latest), without reading arrays."""
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
        return restored[_METADATA]

    def latest_step(self) -> int | None:
        """The newest committed (or in-flight async) step, None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed (or in-flight async) steps, ascending."""
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True once the runtime has signalled a preemption (all hosts agree).

        `save` already saves on such a step; the training loop should then stop.
        """
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        """Blocks until every started save is committed (re-raising its error)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _resolve_step(self, step: int | None) -> int:
        # A step still being written by an async save is listed but unreadable.
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None and steps:
            return steps[-1]
        if step in steps:
            return step
        root = self._manager.directory  # an etils Path: local or gs://
        names = [p.name for p in root.iterdir()] if root.is_dir() else []
        debris = sorted(n for n in names if _TMP_MARKER in n)
        if steps:
            found = f"its committed steps are {steps}"
        elif debris:
            found = f"it holds no committed checkpoint, only interrupted saves {debris}"
        else:
            found = "it is empty (no checkpoint has been saved there)"
        wanted = "a checkpoint" if step is None else f"step {step}"
        raise CheckpointNotFoundError(
            f"Cannot restore {wanted} from {self.directory}: {found}. Check the "
            f"directory (e.g. --workdir) or start from scratch."
        )

    def _check_matches(self, step: int, target: Any, stored: Any) -> None:
        want = ocp.tree.to_flat_dict(target, sep=".")
        have = ocp.tree.to_flat_dict(stored, sep=".")
        problems = []
        only_disk = sorted(set(have) - set(want))
        only_target = sorted(set(want) - set(have))
        shapes = [
            f"{k}: checkpoint {tuple(have[k].shape)}, target {_stored_shape(want[k])}"
            for k in sorted(set(want) & set(have))
            if tuple(have[k].shape) != _stored_shape(want[k])
        ]
        for title, items in (
            ("in the checkpoint but not in the target", only_disk),
            ("in the target but not in the checkpoint", only_target),
            ("shape differs", shapes),
        ):
            if items:
                listed = items[:_MAX_LISTED]
                if len(items) > _MAX_LISTED:
                    listed.append(f"... and {len(items) - _MAX_LISTED} more")
                problems.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(listed))
        if problems:
            raise CheckpointMismatchError(
                f"Step {step} in {self.directory} does not match the restore target:\n"
                + "\n".join(problems)
                + "\nBuild the target from the model/optimizer config the checkpoint "
                f"was written with (see restore_metadata({step}))."
            )


def _checksum_problem(state: Any, saved: dict[str, int], stored: Any, target: Any) -> str | None:
    """Which restored arrays differ from the checksums saved with them (None: all match). Arrays
    restored into another dtype than the stored one are cast, so they are not compared."""
    now = array_checksums(state)
    stored_dtypes = {k: np.dtype(v.dtype) for k, v in ocp.tree.to_flat_dict(stored, sep=".").items()}
    target_dtypes = {k: np.dtype(_stored_struct(v).dtype) for k, v in ocp.tree.to_flat_dict(target, sep=".").items()}
    compared = [k for k in now if stored_dtypes.get(k) == target_dtypes.get(k)]
    problems = [(f"{len(keys)} array(s) {why}: " + ", ".join(keys[:_MAX_LISTED])
                 + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""))
                for why, keys in (
                    ("differ from the checksums saved with them (the files changed after the save)",
                     sorted(k for k in compared if k in saved and saved[k] != now[k])),
                    ("have no saved checksum (the checksums file was altered)", sorted(set(compared) - set(saved))),
                ) if keys]
    return "; ".join(problems) or None


def _first_line(error: BaseException) -> str:
    """The innermost cause's type and first line: what went wrong, without orbax's and
    tensorstore's chained tracebacks and specs."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {text[:300]}"


def _agreed_problem(problem: str | None) -> str | None:
    """`problem` made the same on every process: if any process failed to read its part, all fail."""
    if jax.process_count() == 1:
        return problem
    failed = multihost_utils.process_allgather(np.int32(problem is not None))  # (P,)
    if problem is None and failed.any():
        problem = f"process {int(np.argmax(failed))} could not read its part of the arrays (see its log)"
    return problem


def _as_array(x: Any) -> np.ndarray:
    """A Python/NumPy scalar as a 0-d array of JAX's default dtype for it."""
    return np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(np.result_type(x)))


def _stored_struct(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """Shape and dtype on disk: typed PRNG keys are stored as their uint32 key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, x)
    return x


def _stored_shape(x: jax.ShapeDtypeStruct) -> tuple[int, ...]:
    return tuple(_stored_struct(x).shape)


def _savable_leaf(path, x: Any) -> Any:
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return _as_array(x)
    raise TypeError(
        f"State leaf {jax.tree_util.keystr(path)} is a {type(x).__name__}; the state "
        f"holds arrays and numeric scalars only. Put strings, configs and other "
        f"Python objects in `metadata`, or mark dataclass fields static "
        f"(flax.struct.field(pytree_node=False))."
    )


def _abstract_leaf(path, x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) or sharding is None:
        raise TypeError(
            f"Restore target leaf {jax.tree_util.keystr(path)} is {x!r}; expected a "
            f"jax.ShapeDtypeStruct (or jax.Array) with a sharding. Build the target "
            f"with abstract_like(jax.eval_shape(init_fn, ...), shardings)."
        )
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
