"""Record transforms: the per-example steps a task composes for `pipeline.make_pipeline`.

A transform is a callable `(record: dict, rng: np.random.Generator) -> dict`. It
returns a new record (never mutates its input) and raises `SkipRecord(reason,
detail)` when the record cannot serve the task; the pipeline then skips it,
counts it by reason and fills the batch with the next one. A transform needs
only the fields it reads: a record without a caption passes every step but
`Tokenize`, so the dVAE trains from a caption-less image folder. All randomness
comes from `rng`, which the pipeline derives from (seed, epoch, record index).

Images: `DecodeImage` gives a PIL image in its own mode ("P", "RGBA", "I;16", ...)
and the geometric steps (`CenterCrop`, `RandomResizedCrop`, `DalleAugment`)
resample it in that mode and return uint8 RGB (S, S, 3), converting to RGB
after resampling as OpenAI CLIP does; images stay uint8 on the host and tasks
normalise them on the device.

A transform may count events that are not failures (captions truncated) in
the record's `COUNTS` field, a {name: int} dict that the pipeline sums into
`stats()["counts"]`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from common.data.sources import Unreadable
from common.images import MAX_IMAGE_BYTES, ImageDecodeError, clip_center_crop, decode_image
from common.tokenizers.clip_bpe import ClipTokenizer, default_tokenizer
from common.tokenizers.sentencepiece import SentencePieceTokenizer

Record = dict[str, Any]
Transform = Callable[[Record, np.random.Generator], Record]
COUNTS = "counts"  # the record field holding a transform's event counts


class SkipRecord(Exception):
    """Raised by a transform for a record the task cannot use; `reason` names the counter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def field_value(record: Record, field: str) -> Any:
    """`record[field]` (None when absent); a field the source would not read skips the record by its reason."""
    value = record.get(field)
    if isinstance(value, Unreadable):
        raise SkipRecord(value.reason, value.detail)
    return value


def count(record: Record, name: str) -> Record:
    """`record` with one more `name` event in its `COUNTS` field."""
    counts = dict(record.get(COUNTS, {}))
    counts[name] = counts.get(name, 0) + 1
    return {**record, COUNTS: counts}


@dataclasses.dataclass(frozen=True)
class Compose:
    """Applies `transforms` in order, sharing one rng."""

    transforms: tuple[Transform, ...]

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        for transform in self.transforms:
            record = transform(record, rng)
        return record


def compose(transform: Transform | Sequence[Transform]) -> Transform:
    """One transform from a transform or a sequence of them."""
    return Compose(tuple(transform)) if isinstance(transform, (list, tuple)) else transform


@dataclasses.dataclass(frozen=True)
class Select:
    """Keeps only `fields` (and `COUNTS`); a record lacking one of them is skipped as "missing_<field>",
    one the source would not read by the reason it gave."""

    fields: tuple[str, ...]

    def __init__(self, *fields: str):
        object.__setattr__(self, "fields", fields)

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        for field in self.fields:
            if field_value(record, field) is None:
                raise SkipRecord(f"missing_{field}", f"no {field!r} in {record.get('key')}")
        return {k: record[k] for k in (*self.fields, COUNTS) if k in record}


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeImage:
    """`image` (encoded bytes, a file path or a uint8 (H, W[, C]) array) -> a loaded PIL image.

    Skips "missing_image" (None, or a file that is gone or unreadable),
    "corrupt_image" (bytes that do not decode; `common.images.decode_image` is
    strict), "image_too_large" (over `max_bytes` encoded, or PIL's pixel limit)
    and "special_file" (a path to a FIFO, device or directory, never read).
    """

    field: str = "image"
    max_bytes: int = MAX_IMAGE_BYTES

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        data = field_value(record, self.field)
        if data is None:
            raise SkipRecord("missing_image", f"no image in {record.get('key')}")
        try:
            if isinstance(data, np.ndarray):
                if data.dtype != np.uint8:
                    raise ImageDecodeError(f"Expected a uint8 image array, found {data.dtype} {data.shape}.")
                img = Image.fromarray(data[..., 0] if data.shape[-1:] == (1,) else data)
            else:
                img = decode_image(data, max_bytes=self.max_bytes)
        except OSError as err:  # the file is gone or unreadable; bad bytes raise ImageDecodeError
            raise SkipRecord("missing_image", f"{record.get('key')}: {type(err).__name__}: {err}") from err
        except ImageDecodeError as err:
            raise SkipRecord(err.reason, f"{record.get('key')}: {err}") from err
        except (ValueError, TypeError) as err:
            raise SkipRecord("corrupt_image", f"{record.get('key')}: {type(err).__name__}: {err}") from err
        return {**record, self.field: img}


def _resampled(record: Record, field: str, resample: Callable[[Image.Image], Image.Image]) -> Record:
    """`record` with its PIL image resampled and converted to uint8 RGB; PIL errors skip it as corrupt."""
    try:
        rgb = np.asarray(resample(record[field]).convert("RGB"), np.uint8)  # (S, S, 3)
    except (OSError, ValueError, TypeError) as err:  # an image mode PIL cannot resample or convert
        raise SkipRecord("corrupt_image", f"{record.get('key')}: {type(err).__name__}: {err}") from err
    return {**record, field: rgb}


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    """OpenAI CLIP's evaluation transform up to normalisation: `common.images.clip_center_crop`, bit for bit."""

    size: int
    field: str = "image"

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        return _resampled(record, self.field, lambda img: clip_center_crop(img, self.size))


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """open_clip's training crop (`image_transform(is_train=True)`): torchvision
    `RandomResizedCrop(size, scale, ratio=(3/4, 4/3), interpolation=BICUBIC)`."""

    size: int
    scale: tuple[float, float] = (0.9, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w / h, sampled log-uniformly
    field: str = "image"

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"Expected 0 < scale[0] <= scale[1] <= 1, found scale={self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"Expected 0 < ratio[0] <= ratio[1], found ratio={self.ratio}.")

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop; torchvision `RandomResizedCrop.get_params`, step for step.

        Ten tries at an area fraction in `scale` and a log-uniform aspect ratio
        in `ratio`; if none fits, the central crop with the ratio clamped to
        `ratio` (the whole image when its ratio is inside).
        """
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        def crop(img: Image.Image) -> Image.Image:  # torchvision F.resized_crop on PIL
            top, left, h, w = self.box(img.width, img.height, rng)
            return img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BICUBIC)

        return _resampled(record, self.field, crop)


@dataclasses.dataclass(frozen=True)
class DalleAugment:
    """The dVAE's training augmentation, Ramesh et al. 2021 (arXiv:2102.12092), appendix A, Listing 1.

    With R = `size` and s = min(H, W), the listing does:
      1. a random s x s crop (`tf.image.random_crop`: every offset equally likely);
      2. an AREA resize to t x t, t uniform in [min(s, round(9/8 R)), min(s, round(12/8 R))];
      3. rint, clip to [0, 255], uint8;
      4. a random R x R crop;
      5. a random horizontal flip.
    PIL's BOX filter is area averaging. An image whose short side is below R
    (where the listing's last crop would fail) is resized up to R instead.
    """

    size: int
    field: str = "image"

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        def augment(img: Image.Image) -> Image.Image:
            s = min(img.size)
            left, top = int(rng.integers(0, img.width - s + 1)), int(rng.integers(0, img.height - s + 1))
            t_min = max(self.size, min(s, round(9 / 8 * self.size)))
            t_max = max(t_min, min(s, round(12 / 8 * self.size)))
            t = int(rng.integers(t_min, t_max + 1))
            img = img.crop((left, top, left + s, top + s)).resize((t, t), Image.Resampling.BOX)
            left, top = int(rng.integers(0, t - self.size + 1)), int(rng.integers(0, t - self.size + 1))
            img = img.crop((left, top, left + self.size, top + self.size))
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img

        return _resampled(record, self.field, augment)


# --------------------------------------------------------------------------
# Text: tokenizers are (caption, context_length) -> (int ids (L,), truncated)
# --------------------------------------------------------------------------

TextTokenizer = Callable[[str, int], tuple[np.ndarray, bool]]


@dataclasses.dataclass(frozen=True)
class ClipTextTokenizer:
    """`clip.tokenize(text, context_length, truncate=True)`: an over-long caption keeps EOT last.

    One truncating encode one token longer than the context tells both: the
    text was cut exactly when that row's extra last position holds a token (EOT),
    and truncation encodes only the pieces that can reach the context.
    """

    tokenizer: ClipTokenizer

    def __call__(self, text: str, context_length: int) -> tuple[np.ndarray, bool]:
        longer = self.tokenizer.tokenize(text, context_length + 1, truncate=True)[0]  # (context_length + 1,)
        eot = self.tokenizer.eot_token_id
        truncated = bool(longer[context_length] == eot)
        ids = longer[:context_length].copy()
        if truncated:
            ids[-1] = eot
        return ids, truncated


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


class Tokenize:
    """`src` caption -> `dst` int32 ids (context_length,); over-long captions are truncated and counted.

    A record with several captions uses one drawn from `rng` when
    `random_caption` (training: another one every epoch), else the first.
    Skips "missing_caption", "empty_caption" (whitespace only) and
    "bad_caption" (text the tokenizer refuses, such as a lone surrogate).
    """

    def __init__(self, tokenizer: str | ClipTokenizer | SentencePieceTokenizer | TextTokenizer, context_length: int,
                 *, src: str = "caption", dst: str = "text", random_caption: bool = False):
        if context_length < 2:
            raise ValueError(f"Expected context_length >= 2, found {context_length}.")
        self.tokenizer, self.context_length = resolve_tokenizer(tokenizer), context_length
        self.src, self.dst, self.random_caption = src, dst, random_caption

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        caption = field_value(record, self.src)
        if isinstance(caption, tuple):
            caption = caption[int(rng.integers(len(caption)))] if self.random_caption else caption[0]
        if caption is None:
            raise SkipRecord("missing_caption", f"no caption in {record.get('key')}")
        if not caption.strip():
            raise SkipRecord("empty_caption", f"{record.get('key')}: caption {caption!r}")
        try:
            ids, truncated = self.tokenizer(caption, self.context_length)
        except ValueError as err:  # UnicodeError too
            raise SkipRecord("bad_caption", f"{record.get('key')}: {err}") from err
        ids = np.asarray(ids)
        if ids.shape != (self.context_length,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Expected the tokenizer to return integer ids of shape ({self.context_length},), "
                             f"found {ids.dtype} {ids.shape} for caption {caption!r}.")
        record = {**record, self.dst: ids.astype(np.int32)}
        return count(record, "truncated_captions") if truncated else record
