"""Training logs a person can read and tools can parse: JSONL + TensorBoard, progress bars, plots.

Only process 0 writes (DESIGN.md, principle 3): on every other host a :class:`MetricWriter` and a
:func:`progress_bar` are silent no-ops, so the training loop calls them unconditionally.

``metrics.jsonl`` holds one JSON object per ``write_scalars`` call, ``{"step", "time", name: value}``.
It is opened in append mode so a resumed run continues the same file; a line cut short by
preemption is closed with a newline on reopening and skipped (with a warning) by :func:`read_jsonl`.
A resumed run logs every step exactly once across kill + resume: the trainer flushes the writer at
each checkpoint and records the file's length there (``bytes_written``), and the writer of the
resumed run (``resume_step``, ``resume_bytes``) first drops what the killed run wrote after that
checkpoint, since the resumed run writes those steps again.
TensorBoard event files come from ``tensorboardX`` (no TensorFlow needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorboardX
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

JSONL_NAME = "metrics.jsonl"
log = logging.getLogger(__name__)
_RESERVED = ("step", "time")


def _is_chief(enabled: bool | None) -> bool:
    return jax.process_index() == 0 if enabled is None else enabled


def _to_python_scalar(name: str, value: Any) -> float | int | bool:
    """A jax/numpy/python scalar (or size-1 array) as a JSON-serializable python number."""
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric {name!r}: expected a scalar, found an array of shape {array.shape}; reduce it first")
    return array.reshape(()).item()


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _logged_at_or_before(line: bytes, step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
        return False  # an unreadable line: a write cut short


def _rewind(path: Path, step: int, size: int | None) -> None:
    """Drops the records a run resuming at ``step`` writes again: the bytes past ``size`` (the file's
    length at that checkpoint), or, when that is unknown or no longer fits the file, every record past
    ``step`` and every unreadable line. Rewrites the file atomically (a temporary file, then a rename)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if size is not None and size <= len(data) and (size == 0 or data[size - 1 : size] == b"\n"):
        kept = data[:size]
    else:
        if size is not None:
            log.warning("%s is not the file the checkpoint of step %d saw (%d bytes then, %d now): keeping "
                        "its records up to step %d", path, step, size, len(data), step)
        kept = b"".join(line.rstrip(b"\n") + b"\n" for line in data.splitlines(keepends=True)
                        if _logged_at_or_before(line, step))
    if kept == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept)
    os.replace(tmp, path)
    log.info("Resuming at step %d: dropped %d line(s) of %s written after that checkpoint",
             step, len(data.splitlines()) - len(kept.splitlines()), path)


class MetricWriter:
    """Writes scalars to ``logdir/metrics.jsonl`` and TensorBoard, images to TensorBoard.

    Args:
      logdir: directory for ``metrics.jsonl`` and ``events.out.tfevents.*`` files (created if needed).
      enabled: write or not; ``None`` (default) writes only on ``jax.process_index() == 0``.
      resume_step: the step a run continues from (0: from scratch), or None to append to whatever is
        there. Records of an earlier run past that point are dropped first, as the run writes them
        again: those after byte ``resume_bytes`` (``bytes_written`` when that checkpoint was taken),
        or without it those whose step is past ``resume_step``. TensorBoard hides its events past
        ``resume_step`` likewise (``purge_step``).
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None, resume_step: int | None = None,
                 resume_bytes: int | None = None):
        self.logdir = Path(logdir)
        self.enabled = _is_chief(enabled)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        path = self.logdir / JSONL_NAME
        if resume_step is not None:
            _rewind(path, resume_step, resume_bytes)
        self._jsonl = path.open("a", encoding="utf-8")
        if _ends_mid_line(path):  # the previous run died mid-line; keep its records readable
            self._jsonl.write("\n")
        purge = None if resume_step is None else resume_step + 1
        self._tb = tensorboardX.SummaryWriter(logdir=str(self.logdir), flush_secs=30, purge_step=purge)

    def _check_open(self) -> None:
        if self._jsonl is None:
            raise RuntimeError(f"MetricWriter({self.logdir}) is closed; create a new one to keep logging")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs ``scalars`` (python, numpy or jax scalars) at ``step``; one JSONL line per call.
        Non-finite values are kept (JSON ``NaN``/``Infinity``, which Python's json reads back)."""
        if not self.enabled:
            return
        self._check_open()
        clash = [name for name in scalars if name in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields {_RESERVED}; rename them")
        values = {name: _to_python_scalar(name, value) for name, value in scalars.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=int(step), walltime=record["time"])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Logs ``(N, H, W, C)`` image batches (uint8, or floats in [0, 1], clipped) as TensorBoard grids."""
        if not self.enabled:
            return
        self._check_open()
        for name, batch in images.items():
            array = np.asarray(jax.device_get(batch))
            if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
                raise ValueError(f"image {name!r}: expected (N, H, W, C) with C in 1, 3, 4, found shape {array.shape}")
            if array.dtype != np.uint8:
                array = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
            self._tb.add_images(name, array, global_step=int(step), dataformats="NHWC")

    def flush(self) -> None:
        """Hands everything written so far to the operating system, so it survives a killed process."""
        if self._jsonl is not None:
            self._jsonl.flush()
            self._tb.flush()

    @property
    def bytes_written(self) -> int | None:
        """Length of ``metrics.jsonl`` once flushed (None when not writing): what a checkpoint records so
        that a run resumed from it can drop what was written later (``resume_bytes``)."""
        if self._jsonl is None:
            return None
        self.flush()
        return self._jsonl.tell()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def configure_logging() -> None:
    """Readable INFO logs for command-line entry points; orbax's per-file absl INFO lines are kept out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (or of ``<dir>/metrics.jsonl``); unreadable lines are
    skipped with one warning that counts them."""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL_NAME
    records, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s) (usually a write cut short by preemption)")
    return records


def progress_bar(
    iterable_or_total: Iterable[Any] | int | None = None,
    desc: str | None = None,
    *,
    enabled: bool | None = None,
    unit: str = "step",
    **tqdm_kwargs: Any,
) -> tqdm:
    """A tqdm bar (showing count, rate and ETA) over an iterable or up to a total, silent on every
    process but 0 unless ``enabled`` says otherwise. Update metrics with :func:`set_postfix_metrics`."""
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total
    else:
        iterable, total = iterable_or_total, tqdm_kwargs.pop("total", None)
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not _is_chief(enabled), dynamic_ncols=True, **tqdm_kwargs
    )


def set_postfix_metrics(bar: tqdm, metrics: Mapping[str, Any], *, examples_per_second: float | None = None) -> None:
    """Shows ``metrics`` after the bar, plus ``examples/s`` when given. Pass a rate measured after the
    step's results reached the host: the bar's own rate counts dispatches, which run ahead of the
    device (asynchronous dispatch) until something waits for a result."""
    if bar.disable:
        return
    shown = {name: f"{_to_python_scalar(name, value):.4g}" for name, value in metrics.items()}
    if examples_per_second is not None:
        shown["examples/s"] = f"{examples_per_second:.4g}"
    bar.set_postfix(shown, refresh=False)


def _ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average."""
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = smoothing * acc + (1 - smoothing) * v
        out[i] = acc / (1 - smoothing ** (i + 1))
    return out


def plot_curves(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    out_png: str | os.PathLike,
    *,
    x: str = "step",
    smoothing: float = 0.0,
    log_y: bool = False,
    title: str | None = None,
) -> Path:
    """Plots each metric in ``keys`` against ``x`` (one panel per key, shared x axis) into a PNG.

    ``source`` is a ``metrics.jsonl`` path (or its directory) or a list of records. With
    ``0 < smoothing < 1`` the raw curve is drawn faintly under its moving average. Returns the PNG path.
    """
    records = read_jsonl(source) if isinstance(source, (str, os.PathLike)) else list(source)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"expected 0 <= smoothing < 1, found {smoothing}")
    available = sorted({k for r in records for k in r} - {x})
    missing = [k for k in keys if not any(k in r and x in r for r in records)]
    if not keys or missing:
        raise ValueError(f"no records with {x!r} and metric(s) {missing or '(none requested)'}; available: {available}")
    figure = Figure(figsize=(7, 2.6 * len(keys)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        points = np.array(
            [(r[x], r[key]) for r in records if x in r and key in r and math.isfinite(r[key])], dtype=np.float64
        ).reshape(-1, 2)  # (N, 2)
        steps, values = points[:, 0], points[:, 1]
        if smoothing:
            ax.plot(steps, values, color="C0", alpha=0.25, linewidth=1)
            values = _ema(values, smoothing)
        ax.plot(steps, values, color="C0", linewidth=1.5)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
    axes[-1].set_xlabel(x)
    if title:
        figure.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out
