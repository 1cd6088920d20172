"""What keeps a training workdir consistent across runs: one run at a time, and a resume whose
config changes only where that is safe. `common/trainer.py` applies both in `Trainer.fit`.

One run at a time: `WorkdirLock` holds an exclusive `fcntl.flock` on `workdir/.lock` (process 0
only, while the run trains), so a second run on the same workdir stops before it restores, writes a
checkpoint or touches the log, naming the pid and host that hold it. The kernel releases the lock
when the holder exits, even when it is killed, so nothing stale is left to clean up. Such locks are
reliable on local disks and on NFS mounts that support locking (Linux emulates flock with NFS byte
range locks); on mounts without lock support (some FUSE and object-store mounts, e.g. gcsfuse) they
only exclude runs on the same machine.

A resume whose config differs: `check_resumed_config` compares the trainer and optimizer configs
stored in the checkpoint with the resumed run's. Settings that only change how the run is watched,
saved or laid out (`RESUMABLE_CHANGES`) are logged; anything that changes what is trained (learning
rate, schedule, batch size, seed, optimizer, parameter averaging) is refused unless forced, since it
would silently make the run another experiment than the one its log and checkpoints describe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

#: Fields a resumed run may change freely (each change is logged): how often the run logs, evaluates
#: and checkpoints, how long it runs, and its mesh (checkpoints restore onto any mesh).
RESUMABLE_CHANGES = {
    "trainer": ("total_steps", "mesh", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "async_checkpoints", "max_nonfinite_streak", "progress", "fallback_to_previous_checkpoint",
                "allow_config_change"),
    "optim": (),
}


class WorkdirInUseError(RuntimeError):
    """Another run holds the workdir's lock."""


class ConfigChangeError(ValueError):
    """A resumed run's config differs from its checkpoint's where that changes what is trained."""


class WorkdirLock:
    """An exclusive lock on `workdir/.lock`, held until `release` (or the process ends)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 512, 0).decode(errors="replace").strip() or "a process that has not said"
            os.close(self._fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):  # not held by another: a file system error
                raise
            raise WorkdirInUseError(
                f"Another run is training in {self.path.parent} ({holder}); two runs in one workdir would "
                f"overwrite each other's checkpoints and log. Wait for it to finish or stop it, or use another "
                f"workdir. (Its lock, {self.path}, goes away with that process, even if it is killed.)"
            ) from None
        os.ftruncate(self._fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(self._fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@contextlib.contextmanager
def one_run_in(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `workdir`'s `WorkdirLock` (process 0) for the body; a collective: when the lock is
    taken, every process raises `WorkdirInUseError`, so none is left waiting for the others."""
    lock = problem = None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir)
        except WorkdirInUseError as err:
            problem = str(err)
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(problem is not None)):
        problem = problem or f"Another run is training in {workdir} (process 0 names it in its log)."
    if problem is not None:
        raise WorkdirInUseError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _as_json(value: Any) -> Any:
    """Config values as a checkpoint's JSON gives them back (tuples as lists, ...)."""
    return json.loads(json.dumps(value))


def check_resumed_config(saved: Mapping[str, Mapping[str, Any]] | None, current: Mapping[str, Mapping[str, Any]], *,
                         step: int, where: str, allow_changes: bool) -> None:
    """Compares `current` ({"trainer": {...}, "optim": {...}}) with the config `saved` in the checkpoint of
    `step` (in `where`). Changes in `RESUMABLE_CHANGES` are logged; others raise `ConfigChangeError`,
    or with `allow_changes` are logged as a warning. A `trainer.total_steps` below `step` always raises.
    The schedule length (`optim.total_steps`) may change with the run's length where a recipe ties the
    two (optim.total_steps = trainer.total_steps // accum_steps before and after)."""
    trainer = current["trainer"]
    if trainer["total_steps"] < step:
        raise ConfigChangeError(
            f"total_steps={trainer['total_steps']} is below step {step}, where the checkpoint in {where} already "
            f"is: set total_steps >= {step}, or train from scratch in another workdir.")
    if saved is None:
        log.warning("Step %d in %s holds no config (saved by an older version): changes cannot be checked.",
                    step, where)
        return
    current, saved = _as_json(dict(current)), _as_json(dict(saved))
    allowed, refused = [], []
    for section, fields in current.items():
        before = saved.get(section, {})
        for name in sorted(set(fields) & set(before)):
            if fields[name] == before[name]:
                continue
            change = f"{section}.{name}: {before[name]!r} -> {fields[name]!r}"
            ok = name in RESUMABLE_CHANGES.get(section, ()) or (
                (section, name) == ("optim", "total_steps") and _schedule_follows_run(saved) and
                _schedule_follows_run(current))
            (allowed if ok else refused).append(change)
    if allowed:
        log.info("Resuming step %d of %s with changed settings: %s", step, where, "; ".join(allowed))
    if refused and allow_changes:
        log.warning("Resuming step %d of %s with a changed training config (allow_config_change=True): %s",
                    step, where, "; ".join(refused))
    elif refused:
        raise ConfigChangeError(
            f"Step {step} in {where} was trained with another config; resuming would silently change the run:\n  "
            + "\n  ".join(refused)
            + "\nResume with the saved values, train in another workdir, or set trainer.allow_config_change=True "
            "(e.g. --config.trainer.allow_config_change=True) to resume with the new ones anyway. A resume may "
            "change freely: " + ", ".join(f"{s}.{n}" for s, names in RESUMABLE_CHANGES.items() for n in names)
            + ", and optim.total_steps where it follows trainer.total_steps.")


def _schedule_follows_run(config: Mapping[str, Mapping[str, Any]]) -> bool:
    optim = config["optim"]
    return optim["total_steps"] == config["trainer"]["total_steps"] // optim.get("accum_steps", 1)
