"""Deterministic, resumable grain pipelines of image-text batches for CLIP-style training.

`make_image_text_pipeline(source, ...)` returns an `ImageTextIterator` of
host-local batches

    {"image": float32 (b, S, S, 3), CLIP-normalised, "text": int32 (b, L)}

with b = global_batch_size / shard_count. What each host does:

    records [start, stop) of this host   contiguous, so hosts are disjoint and their union is the source
    -> shuffle (train)                   grain's index shuffle, re-seeded every epoch
    -> repeat(num_epochs)
    -> prepare                           caption check, decode, augment or CLIP eval transform, tokenize;
                                         randomness from rng((seed, epoch, record index)) only
    -> threads -> drop bad records       counted by reason, following records fill the batch
    -> batch (always full) -> worker processes (optional)

Every step is a pure function of the position in that sequence, so the
iterator state is just grain's position plus counters; `get_state()` is a
JSON dict that the trainer stores in checkpoint metadata, and `set_state`
continues with bitwise the same batches as a run that never stopped
(DESIGN.md principle 7).

Training augmentation is open_clip's (`open_clip/transform.py`,
`image_transform(is_train=True)`): torchvision `RandomResizedCrop(size,
scale=(0.9, 1.0), interpolation=BICUBIC)` with ratio (3/4, 4/3), then RGB,
ToTensor, Normalize(CLIP_MEAN, CLIP_STD). Evaluation is OpenAI CLIP's
`clip_preprocess` (resize shorter side, center crop), bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from common.data.shapes import ShapesConfig, ShapesDataset
from common.data.sources import ImageTextRecord, ShapesSource
from common.images import ImageDecodeError, center_crop, decode_image, normalize_rgb, resize_shorter_side
from common.tokenizers.clip_bpe import DEFAULT_CONTEXT_LENGTH, ClipTokenizer, default_tokenizer
from common.tokenizers.sentencepiece import SentencePieceTokenizer

log = logging.getLogger(__name__)

# Why a record is skipped; counters and `stats()` use these names.
SKIP_REASONS = ("missing_image", "corrupt_image", "missing_caption", "empty_caption")
_SHUFFLE_STREAM = 0x5348  # separates the shuffle seed from other uses of the user's seed


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """RandomResizedCrop of CLIP training (open_clip's `AugmentationCfg` defaults)."""

    scale: tuple[float, float] = (0.9, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w / h, sampled log-uniformly

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"Expected 0 < scale[0] <= scale[1] <= 1, found scale={self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"Expected 0 < ratio[0] <= ratio[1], found ratio={self.ratio}.")


def random_resized_crop_box(width: int, height: int, cfg: AugmentConfig,
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the crop; torchvision `RandomResizedCrop.get_params`, step for step.

    Ten tries at an area fraction in `scale` and a log-uniform aspect ratio
    in `ratio`; if none fits, the central crop with the ratio clamped to
    `ratio` (the whole image when its ratio is inside).
    """
    area = width * height
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(cfg.ratio):
        w, h = width, int(round(width / min(cfg.ratio)))
    elif in_ratio > max(cfg.ratio):
        w, h = int(round(height * max(cfg.ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """torchvision `F.resized_crop` on PIL: crop the sampled box, resize to (size, size) bicubic."""
    top, left, h, w = random_resized_crop_box(img.width, img.height, cfg, rng)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------
# Tokenizers: (caption, context_length) -> (int32 (L,), truncated)
# --------------------------------------------------------------------------

TextTokenizer = Callable[[str, int], tuple[np.ndarray, bool]]


@dataclasses.dataclass(frozen=True)
class ClipTextTokenizer:
    """`clip.tokenize(text, context_length, truncate=True)`: an over-long caption keeps EOT last."""

    tokenizer: ClipTokenizer

    def __call__(self, text: str, context_length: int) -> tuple[np.ndarray, bool]:
        ids = self.tokenizer.tokenize(text, context_length, truncate=True)[0]
        return ids, len(self.tokenizer.encode(text)) + 2 > context_length


@dataclasses.dataclass(frozen=True)
class SentencePieceTextTokenizer:
    """`SentencePieceTokenizer.encode_batch` with truncation (DALL·E-style text), pad-filled."""

    tokenizer: SentencePieceTokenizer
    add_bos: bool = False
    add_eos: bool = False

    def __call__(self, text: str, context_length: int) -> tuple[np.ndarray, bool]:
        ids = self.tokenizer.encode_batch([text], context_length, truncate=True, add_bos=self.add_bos,
                                          add_eos=self.add_eos)[0]
        budget = context_length - int(self.add_bos) - int(self.add_eos)
        return ids, len(self.tokenizer.encode(text)) > budget


def resolve_tokenizer(tokenizer: str | ClipTokenizer | SentencePieceTokenizer | TextTokenizer) -> TextTokenizer:
    """"clip" (the bundled CLIP BPE), a tokenizer object, or a `(text, context_length) -> (ids, truncated)`."""
    if tokenizer == "clip":
        return ClipTextTokenizer(default_tokenizer())
    if isinstance(tokenizer, ClipTokenizer):
        return ClipTextTokenizer(tokenizer)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return SentencePieceTextTokenizer(tokenizer)
    if callable(tokenizer):
        return tokenizer
    raise ValueError(f"Expected tokenizer 'clip', a ClipTokenizer, a SentencePieceTokenizer or a callable "
                     f"(text, context_length) -> (int ids (L,), truncated), found {tokenizer!r}.")


# --------------------------------------------------------------------------
# Per-record preparation
# --------------------------------------------------------------------------


class _SkipLogger:
    """Logs skipped records: the first `first` of each reason, then one line per reason every `interval_s`."""

    def __init__(self, first: int = 5, interval_s: float = 60.0):
        self.first, self.interval_s = first, interval_s
        self._seen = dict.fromkeys(SKIP_REASONS, 0)
        self._last = dict.fromkeys(SKIP_REASONS, 0.0)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle (grain worker processes)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __call__(self, reason: str, record: ImageTextRecord, detail: str) -> None:
        with self._lock:
            self._seen[reason] += 1
            seen, now = self._seen[reason], time.monotonic()
            if seen > self.first and now - self._last[reason] < self.interval_s:
                return
            self._last[reason] = now
        log.warning("Skipping record %s (%s, %d so far in this process%s): %s", record.key, reason, seen,
                    "; further ones logged once a minute" if seen == self.first else "", detail)


def _to_pil(data: bytes | str | np.ndarray) -> Image.Image:
    """Encoded bytes or an image file path (decoded strictly), or a uint8 (H, W[, C]) array."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(data[..., 0] if data.shape[-1:] == (1,) else data)
    return decode_image(data)


@dataclasses.dataclass(frozen=True)
class _Skipped:
    reason: int  # index into SKIP_REASONS


@dataclasses.dataclass(frozen=True)
class _PrepareExample:
    """(position, record) -> example dict or `_Skipped`; a pure function of both.

    position = epoch * epoch_length + position in the epoch's order; all
    randomness comes from rng((seed, epoch, record.index)).
    """

    image_size: int
    context_length: int
    tokenizer: TextTokenizer
    augment: AugmentConfig | None  # None: the CLIP evaluation transform
    seed: int
    epoch_length: int
    skip_log: _SkipLogger

    def _skip(self, reason: str, record: ImageTextRecord, detail: str) -> _Skipped:
        self.skip_log(reason, record, detail)
        return _Skipped(SKIP_REASONS.index(reason))

    def __call__(self, position: int, record: ImageTextRecord) -> dict[str, np.ndarray] | _Skipped:
        rng = np.random.default_rng((self.seed, position // self.epoch_length, record.index))
        caption = record.caption
        if isinstance(caption, tuple):  # several captions: one per epoch in training, the first in eval
            caption = caption[int(rng.integers(len(caption)))] if self.augment is not None else caption[0]
        if caption is None:
            return self._skip("missing_caption", record, "no caption")
        if not caption.strip():
            return self._skip("empty_caption", record, f"caption {caption!r}")
        if record.data is None:
            return self._skip("missing_image", record, "no image")
        try:
            img = _to_pil(record.data)
        except OSError as err:  # the file is gone or unreadable; bad bytes raise ImageDecodeError
            return self._skip("missing_image", record, f"{type(err).__name__}: {err}")
        except (ImageDecodeError, ValueError, TypeError) as err:
            return self._skip("corrupt_image", record, f"{type(err).__name__}: {err}")
        try:
            if self.augment is None:
                img = center_crop(resize_shorter_side(img, self.image_size), self.image_size)
            else:
                img = random_resized_crop(img, self.image_size, self.augment, rng)
            rgb = np.asarray(img.convert("RGB"), np.uint8)  # (S, S, 3), normalised per batch
        except (OSError, ValueError, TypeError) as err:  # an image mode PIL cannot resample or convert
            return self._skip("corrupt_image", record, f"{type(err).__name__}: {err}")
        ids, truncated = self.tokenizer(caption, self.context_length)
        ids = np.asarray(ids)
        if ids.shape != (self.context_length,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Expected the tokenizer to return integer ids of shape ({self.context_length},), "
                             f"found {ids.dtype} {ids.shape} for caption {caption!r}.")
        return {"image": rgb, "text": ids.astype(np.int32), "truncated": np.int32(truncated),
                "index": np.int64(record.index)}


class _DropSkipped(grain.IterDataset):
    """Drops `_Skipped` markers; each example carries the counts of those dropped just before it.

    The counts travel with the data, so they are exact for the consumed
    position even when this runs in grain worker processes.
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

    def __next__(self) -> dict[str, np.ndarray]:
        skipped = np.zeros(len(SKIP_REASONS), np.int32)
        while True:
            element = next(self._parent)
            if not isinstance(element, _Skipped):
                return {**element, "skipped": skipped}
            skipped[element.reason] += 1
            if skipped.sum() >= self._max_consecutive:
                raise RuntimeError(
                    f"The last {int(skipped.sum())} records in a row (a whole epoch of this host's shard) were "
                    f"all skipped: {dict(zip(SKIP_REASONS, skipped.tolist()))}. The source is unusable as "
                    "configured: check the paths, the caption field names and the logged reasons.")

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def _collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples; uint8 images become CLIP-normalised float32 here, 4x less to buffer before."""
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["image"] = normalize_rgb(batch["image"])  # (b, S, S, 3) float32
    return batch


# --------------------------------------------------------------------------
# The iterator the trainer consumes
# --------------------------------------------------------------------------


class ImageTextIterator:
    """Host-local batches with `get_state()` / `set_state()` and skip statistics.

    `get_state()` is a JSON dict: grain's position, the counters, and the
    settings that decide which record lands where (`pipeline`); `set_state`
    refuses a state from a pipeline whose settings differ, since its position
    would point at other records.
    """

    def __init__(self, dataset: grain.IterDataset, settings: dict[str, Any], host_batch_size: int,
                 return_index: bool):
        self._iterator = iter(dataset)
        self._settings = settings
        self._host_batch_size = host_batch_size
        self._return_index = return_index
        self._batches = 0
        self._skipped = np.zeros(len(SKIP_REASONS), np.int64)
        self._truncated = 0

    def __iter__(self) -> ImageTextIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._skipped += np.asarray(batch["skipped"]).sum(0)
        self._truncated += int(np.asarray(batch["truncated"]).sum())
        self._batches += 1
        out = {"image": np.asarray(batch["image"]), "text": np.asarray(batch["text"])}
        if self._return_index:
            out["index"] = np.asarray(batch["index"])
        return out

    def stats(self) -> dict[str, Any]:
        """Batches and examples served, records skipped by reason, captions truncated.

        Counts cover the records up to the last example served (skips travel
        with the next good example), and the same counts come back after
        `set_state`.
        """
        skipped = {r: int(n) for r, n in zip(SKIP_REASONS, self._skipped)}
        return {"batches": self._batches, "examples": self._batches * self._host_batch_size,
                "skipped": skipped, "skipped_total": sum(skipped.values()),
                "truncated_captions": self._truncated}

    def get_state(self) -> dict[str, Any]:
        stats = self.stats()
        return {"grain": self._iterator.get_state(), "batches": stats["batches"], "skipped": stats["skipped"],
                "truncated_captions": stats["truncated_captions"], "pipeline": dict(self._settings)}

    def set_state(self, state: dict[str, Any]) -> None:
        differ = {k: (state.get("pipeline", {}).get(k), v) for k, v in self._settings.items()
                  if state.get("pipeline", {}).get(k) != v}
        if differ:
            raise ValueError(
                "Cannot resume this data pipeline from a state saved by a different one: (saved, now) = "
                f"{differ}. Resume with the same source, seed, batch size, shard layout and workers, or start "
                "the data afresh (drop data_state from the checkpoint metadata).")
        self._iterator.set_state(state["grain"])
        self._batches = int(state["batches"])
        self._skipped = np.array([state["skipped"][r] for r in SKIP_REASONS], np.int64)
        self._truncated = int(state["truncated_captions"])

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


def make_image_text_pipeline(
    source: Any,
    *,
    global_batch_size: int,
    image_size: int,
    tokenizer: str | ClipTokenizer | SentencePieceTokenizer | TextTokenizer = "clip",
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    train: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    augment: AugmentConfig | None = AugmentConfig(),
    read_options: grain.ReadOptions | None = None,
    return_index: bool = False,
) -> ImageTextIterator:
    """Host-local batches of `source` (any `sources.py` source; see the module docstring).

    Args:
      source: random access `len(source)`, `source[i] -> ImageTextRecord`.
      global_batch_size: examples per step over all hosts; each host gets
        global_batch_size / shard_count, always full (bad records are replaced
        by the next good ones; with finite `num_epochs` the last partial batch
        is dropped).
      image_size: side S of the square output images.
      tokenizer: "clip", a ClipTokenizer or SentencePieceTokenizer, or a
        callable `(text, context_length) -> (int ids (context_length,), truncated)`.
        Over-long captions are truncated and counted, never fatal.
      train: shuffle and augment (`augment`); False keeps source order and
        uses CLIP's evaluation transform.
      seed: seeds the per-epoch shuffle and the augmentation.
      num_epochs: None repeats forever (train by steps). With a finite count
        the iterator ends after the last full batch; hosts skip different
        numbers of bad records, so they may end a batch apart: multi-host
        training should run by steps.
      shard_index, shard_count: this host's shard (default: jax.process_index(),
        jax.process_count()); hosts read contiguous, disjoint record ranges.
      worker_count: grain worker processes for decoding (0: threads in this process).
      augment: the training crop; None trains on the evaluation transform.
      read_options: grain's per-process threads and prefetch buffer.
      return_index: add "index": int64 (b,) source indices, for debugging and tests.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"Expected 0 <= shard_index < shard_count, found {shard_index} and {shard_count}.")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                         f"{shard_count} data-loading processes, each of which loads an equal share; pick a "
                         f"multiple of {shard_count}.")
    if image_size < 1 or context_length < 2:
        raise ValueError(f"Expected image_size >= 1 and context_length >= 2, found {image_size}, {context_length}.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"Expected 0 <= seed < 2**32, found {seed}.")
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
    ds = ds.map_with_index(_PrepareExample(
        image_size=image_size, context_length=context_length, tokenizer=resolve_tokenizer(tokenizer),
        augment=augment if train else None, seed=seed, epoch_length=stop - start, skip_log=_SkipLogger()))
    read_options = read_options or grain.ReadOptions(num_threads=16, prefetch_buffer_size=max(128, 2 * host_batch_size))
    it = _DropSkipped(ds.to_iter_dataset(read_options), max_consecutive=stop - start)
    it = it.batch(host_batch_size, drop_remainder=True, batch_fn=_collate)
    if worker_count > 0:
        _allow_grain_workers_without_absl()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    settings = {"num_records": num_records, "shard_index": shard_index, "shard_count": shard_count,
                "host_batch_size": host_batch_size, "seed": seed, "train": train, "num_epochs": num_epochs,
                "worker_count": worker_count}
    return ImageTextIterator(it, settings, host_batch_size, return_index)


def shapes_pipeline(split: str = "train", num_examples: int = 10_000, image_size: int = 64,
                    global_batch_size: int = 64, *, config: ShapesConfig | None = None,
                    **kwargs: Any) -> ImageTextIterator:
    """The built-in shapes dataset as an image-text pipeline, for smoke runs and the demo.

    Images are rendered at `config.image_size` (default: `image_size`);
    `train` defaults to `split == "train"`; other keyword arguments go to
    `make_image_text_pipeline`.
    """
    config = config or ShapesConfig(image_size=image_size)
    kwargs.setdefault("train", split == "train")
    return make_image_text_pipeline(ShapesSource(ShapesDataset(split, num_examples, config)),
                                    global_batch_size=global_batch_size, image_size=image_size, **kwargs)
