"""One deterministic, resumable grain pipeline for training and evaluation, for every task.

`make_pipeline(source, transform, ...)` returns a `RecordIterator` of host-local
batches: dicts of the fields the transform leaves, stacked (images stay uint8;
tasks normalise on the device). What each host does:

    records [start, stop) of this host   contiguous, so hosts are disjoint and their union is the source
    -> shuffle (train)                   grain's index shuffle, re-seeded every epoch
    -> repeat(num_epochs)
    -> transform                         the task's steps (transforms.py); randomness from
                                         rng((seed, epoch, record index)) only
    -> threads -> drop skipped records   counted by reason, following records fill the batch
    -> batch -> worker processes (optional)

Every step is a pure function of the position in that sequence, so the
iterator state is just grain's position plus counters; `get_state()` is a
JSON dict that the trainer stores in checkpoint metadata, and `set_state`
continues with bitwise the same batches as a run that never stopped
(DESIGN.md principle 7).

Training batches are always full. Evaluation (`pad_last_batch=True`, one
pass) serves every record of the host's shard exactly once: the last batch is
padded, a bool `valid` field marks real rows, and every host yields the same
number of batches, ceil(ceil(N / hosts) / host batch), the last ones all
invalid if it needs them, so collectives line up across hosts and no shape
changes (nothing recompiles).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from common.data.transforms import COUNTS, SkipRecord, Transform, compose

log = logging.getLogger(__name__)

_SHUFFLE_STREAM = 0x5348  # separates the shuffle seed from other uses of the user's seed


class _SkipLogger:
    """Logs skipped records: the first `first` of each reason, then one line per reason every `interval_s`."""

    def __init__(self, first: int = 5, interval_s: float = 60.0):
        self.first, self.interval_s = first, interval_s
        self._seen: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle (grain worker processes)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __call__(self, skip: SkipRecord) -> None:
        with self._lock:
            self._seen[skip.reason] += 1
            seen, now = self._seen[skip.reason], time.monotonic()
            if seen > self.first and now - self._last.get(skip.reason, 0.0) < self.interval_s:
                return
            self._last[skip.reason] = now
        log.warning("Skipping a record (%s, %d so far in this process%s): %s", skip.reason, seen,
                    "; further ones logged once a minute" if seen == self.first else "", skip.detail)


@dataclasses.dataclass(frozen=True)
class _Skipped:
    reason: str


@dataclasses.dataclass(frozen=True)
class _Apply:
    """(position, record) -> transformed record or `_Skipped`; a pure function of both.

    position = epoch * epoch_length + position in the epoch's order.
    """

    transform: Transform
    seed: int
    epoch_length: int
    skip_log: _SkipLogger

    def __call__(self, position: int, record: dict[str, Any]) -> dict[str, Any] | _Skipped:
        rng = np.random.default_rng((self.seed, position // self.epoch_length, record["index"]))
        try:
            return self.transform(record, rng)
        except SkipRecord as skip:
            self.skip_log(skip)
            return _Skipped(skip.reason)


class _DropSkipped(grain.IterDataset):
    """Drops `_Skipped` markers; each example carries the counts of those dropped just before it.

    The counts travel with the data, so they are exact for the consumed
    position even when this runs in grain worker processes. Skips after the
    last example of a finite pass come as a last element without a record,
    (None, counts).
    """

    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self) -> grain.DatasetIterator:
        return _DropSkippedIterator(self._parent.__iter__(), self._max_consecutive)


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __next__(self) -> tuple[dict[str, Any] | None, Counter]:
        skipped: Counter[str] = Counter()
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if skipped:
                    return None, skipped
                raise
            if not isinstance(element, _Skipped):
                return element, skipped
            skipped[element.reason] += 1
            if skipped.total() >= self._max_consecutive:
                raise RuntimeError(
                    f"The last {skipped.total()} records in a row (a whole epoch of this host's shard) were all "
                    f"skipped: {dict(skipped)}. The source is unusable as configured: check the paths, the field "
                    "names and the logged reasons.")

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def _collate(examples: Sequence[tuple[dict[str, Any] | None, Counter]]) -> dict[str, Any]:
    """Stacks the examples' fields (None: only trailing skips); sums the counts that came with them."""
    counts = sum((Counter(e.get(COUNTS, {})) for e, _ in examples if e is not None), Counter())
    skipped = sum((s for _, s in examples), Counter())
    fields = [{k: v for k, v in e.items() if k != COUNTS} for e, _ in examples if e is not None]
    if not fields:
        return {"fields": None, "skipped": skipped, "counts": counts}
    names = set(fields[0])
    other = next((f for f in fields if set(f) != names), None)
    if other is not None:
        raise ValueError(f"Records of one batch have different fields, {sorted(names)} and {sorted(other)}; end "
                         "the transform with transforms.Select(...) of the fields the task reads.")
    return {"fields": {k: np.stack([f[k] for f in fields]) for k in fields[0]}, "skipped": skipped, "counts": counts}


class RecordIterator:
    """Host-local batches with `get_state()` / `set_state()` and skip statistics.

    `get_state()` is a JSON dict: grain's position, the counters, and the
    settings that decide which record lands where (`pipeline`); `set_state`
    refuses a state from a pipeline whose settings differ, since its position
    would point at other records.
    """

    def __init__(self, dataset: grain.IterDataset, settings: dict[str, Any], num_batches: int | None):
        self._iterator = iter(dataset)
        self._settings = settings
        self._host_batch_size = settings["host_batch_size"]
        self.num_batches = num_batches  # evaluation: the padded count every host yields; None: unbounded
        self._padding: dict[str, np.ndarray] | None = None  # one all-invalid row, shaped like the data
        self._batches = self._examples = 0
        self._skipped: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

    def __iter__(self) -> RecordIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._batches >= self.num_batches:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.num_batches is None:
                raise
            batch = {"fields": None, "skipped": Counter(), "counts": Counter()}
        self._skipped.update(batch["skipped"])
        out = batch["fields"]
        if self.num_batches is None and (out is None or len(next(iter(out.values()))) < self._host_batch_size):
            raise StopIteration  # the end of finitely many epochs: a partial batch is not served, its skips count
        self._counts.update(batch["counts"])
        if out is None:  # past the end of an evaluation pass: padding only
            if self._padding is None:
                raise RuntimeError(
                    f"Shard {self._settings['shard_index']} of {self._settings['shard_count']} gave no usable "
                    f"record ({dict(self._skipped)} skipped), so its padding batches have no shape. Check the source.")
            out = {k: v[:0] for k, v in self._padding.items()}
        rows = len(next(iter(out.values())))
        self._batches += 1
        self._examples += rows
        if self.num_batches is None:
            return out
        if self._padding is None:
            self._padding = {k: np.zeros_like(v[:1]) for k, v in out.items()}
        pad = self._host_batch_size - rows
        out = {k: np.concatenate([v, np.repeat(self._padding[k], pad, axis=0)]) if pad else v for k, v in out.items()}
        return {**out, "valid": np.arange(self._host_batch_size) < rows}

    def stats(self) -> dict[str, Any]:
        """Batches and examples (real rows) served, records skipped by reason, transform counts.

        Counts cover the records up to the last example served (skips travel
        with the next good example), and the same counts come back after
        `set_state`.
        """
        return {"batches": self._batches, "examples": self._examples, "skipped": dict(self._skipped),
                "skipped_total": self._skipped.total(), "counts": dict(self._counts)}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state(), **self.stats(), "pipeline": dict(self._settings)}

    def set_state(self, state: dict[str, Any]) -> None:
        differ = {k: (state.get("pipeline", {}).get(k), v) for k, v in self._settings.items()
                  if state.get("pipeline", {}).get(k) != v}
        if differ:
            raise ValueError(
                "Cannot resume this data pipeline from a state saved by a different one: (saved, now) = "
                f"{differ}. Resume with the same source, seed, batch size, shard layout and workers, or start "
                "the data afresh (drop data_state from the checkpoint metadata).")
        self._iterator.set_state(state["grain"])
        self._batches, self._examples = int(state["batches"]), int(state["examples"])
        self._skipped, self._counts = Counter(state["skipped"]), Counter(state["counts"])

    def close(self) -> None:
        """Stops grain's worker processes, if any."""
        self._iterator.close()


def _allow_grain_workers_without_absl() -> None:
    """grain 0.2.18 reads an absl flag when starting workers, which fails unless absl parsed flags.

    Outside `absl.app.run` (pytest, notebooks, plain scripts) mark that one
    flag as given, at its default, as grain does for its own debug flags in
    workers (process_prefetch._parse_debug_flags).
    """
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


def make_pipeline(
    source: Any,
    transform: Transform | Sequence[Transform],
    *,
    global_batch_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
    pad_last_batch: bool = False,
) -> RecordIterator:
    """Host-local batches of `source` through `transform` (see the module docstring).

    Args:
      source: random access `len(source)`, `source[i] -> record dict` (sources.py).
      transform: `(record, rng) -> record`, or a sequence applied in order
        (transforms.py); it should end with `Select` of the fields to batch.
      global_batch_size: examples per step over all hosts; each host gets
        global_batch_size / shard_count.
      train: shuffle every epoch; False keeps source order.
      seed: seeds the per-epoch shuffle and the transforms' rng.
      num_epochs: None repeats forever (train by steps). With a finite count
        and no padding, the iterator ends after the last full batch (the
        records skipped after it still count in `stats()`); hosts skip
        different numbers of bad records, so they may end a batch apart.
      shard_index, shard_count: this host's shard (default: jax.process_index(),
        jax.process_count()); hosts read contiguous, disjoint record ranges.
      worker_count: grain worker processes for the transforms (0: threads in this process).
      read_options: grain's per-process threads and prefetch buffer.
      pad_last_batch: evaluation; needs num_epochs=1 (see the module docstring).
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"Expected 0 <= shard_index < shard_count, found {shard_index} and {shard_count}.")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                         f"{shard_count} data-loading processes, each of which loads an equal share; pick a "
                         f"multiple of {shard_count}.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"Expected 0 <= seed < 2**32, found {seed}.")
    if pad_last_batch and num_epochs != 1:
        raise ValueError(f"pad_last_batch serves one pass for evaluation; expected num_epochs=1, found {num_epochs}.")
    if train and getattr(source, "sequential", False):
        raise ValueError(f"{source!r} has no random access (TFRecord), so it cannot be shuffled for training. "
                         "Rebuild it: `tfds build NAME --data_dir DIR --file_format array_record`.")
    num_records = len(source)
    start, stop = num_records * shard_index // shard_count, num_records * (shard_index + 1) // shard_count
    if stop == start:
        raise ValueError(f"Shard {shard_index} of {shard_count} has no records: the source has only "
                         f"{num_records} ({source!r}).")
    host_batch_size = global_batch_size // shard_count

    ds = grain.MapDataset.source(source)[start:stop]
    if train:
        ds = ds.shuffle(seed=int(np.random.SeedSequence((seed, _SHUFFLE_STREAM)).generate_state(1)[0]))
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_Apply(compose(transform), seed, stop - start, _SkipLogger()))
    read_options = read_options or grain.ReadOptions(num_threads=16, prefetch_buffer_size=max(128, 2 * host_batch_size))
    it = _DropSkipped(ds.to_iter_dataset(read_options), max_consecutive=stop - start)
    it = it.batch(host_batch_size, drop_remainder=False, batch_fn=_collate)  # RecordIterator drops a partial one
    if worker_count > 0:
        _allow_grain_workers_without_absl()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    settings = {"num_records": num_records, "shard_index": shard_index, "shard_count": shard_count,
                "host_batch_size": host_batch_size, "seed": seed, "train": train, "num_epochs": num_epochs,
                "worker_count": worker_count, "pad_last_batch": pad_last_batch}
    num_batches = math.ceil(math.ceil(num_records / shard_count) / host_batch_size) if pad_last_batch else None
    return RecordIterator(it, settings, num_batches)
