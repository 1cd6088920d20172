"""Checkpoints: sharded train state + JSON metadata, async, atomic, keep-N.

A thin layer over `orbax.checkpoint.CheckpointManager` (modern `ocp.args`
API). Each step directory holds two items:

  state/     the pytree of arrays (params, optimizer state, step, RNG), written
             by every host through `StandardSave`; restored straight onto the
             shardings of an abstract target, so a run saved on one mesh
             resumes on another (e.g. saved FSDP over (8,), restored on (2, 4)).
  metadata/  a JSON dict (config, step, data-iterator state, ...).

Atomicity comes from orbax: on local and mounted file systems a step is written
into `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every file
is on disk (on GCS, where renames are not atomic, a `commit_success.txt` file
marks the commit instead). A process killed mid-save therefore leaves the
previous step as the latest; the debris is ignored, and replaced by the next
save of that step.

    with CheckpointManager(workdir / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(step, state, {"config": cfg.to_dict(), "data": it_state})
        ...
        target = abstract_like(jax.eval_shape(init_fn, rng), state_shardings)
        state, metadata = ckpt.restore(target=target)
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

_STATE = "state"
_METADATA = "metadata"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_MAX_LISTED = 20  # keys listed per kind of mismatch before "... and N more"


class CheckpointNotFoundError(FileNotFoundError):
    """No committed checkpoint (or not the requested step) in the directory."""


class CheckpointMismatchError(ValueError):
    """The restore target does not match the tree or shapes on disk."""


def abstract_like(tree: Any, shardings: Any) -> Any:
    """Abstract restore target: `jax.ShapeDtypeStruct` leaves carrying shardings.

    Args:
      tree: pytree whose leaves have `.shape` and `.dtype` (`jax.eval_shape`
        output, or concrete arrays); Python / NumPy scalars are allowed and
        take JAX's default dtype (as `jax.eval_shape` would give them).
      shardings: one `jax.sharding.Sharding` for every leaf, or a pytree of
        shardings with the structure of `tree`.
    """
    def leaf(x, sharding):
        if not hasattr(x, "shape"):
            x = _as_array(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: leaf(x, shardings), tree)
    return jax.tree.map(leaf, tree, shardings)


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
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
            ),
            force=force,
        )

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict]:
        """Restores `(state, metadata)` of `step` (default: the latest).

        Args:
          step: which step; None for the latest. Pending async saves are waited
            for first.
          target: abstract pytree of `jax.ShapeDtypeStruct` with shardings (see
            `abstract_like`), with the tree structure and shapes of the saved
            state. Arrays are read directly into these shardings, whatever mesh
            the checkpoint was written from; a target dtype that differs from
            the stored one is cast to (e.g. fp32 params restored as bf16).

        Raises:
          CheckpointNotFoundError: no committed checkpoint / no such step.
          CheckpointMismatchError: tree structure or shapes differ from disk.
          TypeError: a target leaf is not abstract or has no sharding.
        """
        step = self._resolve_step(step)
        target = jax.tree_util.tree_map_with_path(_abstract_leaf, target)
        stored = self._manager.item_metadata(step)[_STATE].tree
        self._check_matches(step, target, stored)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(target),
                        _METADATA: ocp.args.JsonRestore(),
                    }
                ),
            )
        except ValueError as e:
            raise CheckpointMismatchError(
                f"Could not restore step {step} of {self.directory} into the given "
                f"target: {e}"
            ) from e
        return restored[_STATE], restored[_METADATA]

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


def _as_array(x: Any) -> np.ndarray:
    """A Python/NumPy scalar as a 0-d array of JAX's default dtype for it."""
    return np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(np.result_type(x)))


def _stored_shape(x: jax.ShapeDtypeStruct) -> tuple[int, ...]:
    """Shape on disk: typed PRNG keys are stored as their uint32 key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


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
