"""Evaluation datasets for zero-shot classification: tfds data dirs and image folders.

Three ways in, all ending in the same stream of `Record`s (encoded image +
class index), decoded with PIL by `common.images.decode_image` as OpenAI CLIP
decodes its inputs (so the TFRecord and ArrayRecord paths give identical pixels):

* tfds, ArrayRecord preparation, no TensorFlow: `builder.as_data_source(split)`
  (`tfds build NAME --file_format array_record`).
* tfds, TFRecord preparation (tfds' default), TensorFlow needed (the `tf`
  extra, tensorflow-cpu): `builder.as_dataset(split)` with image decoding skipped.
* An image-folder tree, one sub-folder per class.

Class spaces. Every ImageNet variant in tfds labels its images with the 1,000
ILSVRC2012 classes; ImageNet-A and ImageNet-R contain only 200 of them, and are
evaluated, as in Hendrycks et al. and the CLIP paper, with a 200-way classifier
(equivalently, the 1000-way logits restricted to those classes). Labels are
mapped through WordNet ids, never assumed to line up. CIFAR class names are the
tfds label names with "_" -> " ".

Corrupt images are counted and skipped, never fatal (DESIGN.md principle 7):
`batches` keeps their slot as a row with status `STATUS_CORRUPT`, so every
host runs the same number of fixed-size batches whatever it skips.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib.resources
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from common.images import ImageDecodeError, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
_WNID = re.compile(r"n\d{8}")

# Row status in a batch from `batches`.
STATUS_OK, STATUS_PADDING, STATUS_CORRUPT = 1, 0, -1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one evaluation set is found and labelled.

    tfds_name: tfds builder name (append "/config" or ":version" on the
      command line to pick another).
    split: the split reported for it (the CLIP paper's evaluation split).
    classes: "imagenet", "imagenet_a", "imagenet_r" (WordNet-id class spaces)
      or "tfds" (class names from the tfds label feature).
    download: how to obtain the source files, for the missing-data message.
    """

    tfds_name: str
    split: str
    classes: str
    download: str


_AUTOMATIC = "nothing to download by hand: `tfds build` fetches the files (the building machine needs network)"
DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        "imagenet2012", "validation", "imagenet",
        "download ILSVRC2012_img_val.tar (https://image-net.org/download-images, registration "
        "needed) into {data_dir}/downloads/manual/; the train tar is optional"),
    "imagenet_v2": DatasetSpec("imagenet_v2", "test", "imagenet", _AUTOMATIC),
    "imagenet_a": DatasetSpec("imagenet_a", "test", "imagenet_a", _AUTOMATIC),
    "imagenet_r": DatasetSpec("imagenet_r", "test", "imagenet_r", _AUTOMATIC),
    "imagenet_sketch": DatasetSpec("imagenet_sketch", "test", "imagenet", _AUTOMATIC),
    "cifar10": DatasetSpec("cifar10", "test", "tfds", _AUTOMATIC),
    "cifar100": DatasetSpec("cifar100", "test", "tfds", _AUTOMATIC),
}


class DatasetNotFoundError(FileNotFoundError):
    """The requested evaluation data is not where it was looked for."""


# --------------------------------------------------------------------------
# Class spaces
# --------------------------------------------------------------------------


@functools.cache
def data_lines(filename: str) -> tuple[str, ...]:
    """Non-empty lines of a file in clip_jax/data (see its NOTICE for sources)."""
    text = importlib.resources.files("clip_jax").joinpath("data", filename).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def imagenet_class_space(kind: str = "imagenet") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, CLIP class names) of "imagenet" (1000), "imagenet_a" or "imagenet_r" (200 each)."""
    synsets, names = data_lines("imagenet_synsets.txt"), data_lines("imagenet_classnames.txt")
    if kind == "imagenet":
        return synsets, names
    if kind not in ("imagenet_a", "imagenet_r"):
        raise ValueError(f"Unknown ImageNet class space {kind!r}; expected imagenet, imagenet_a or imagenet_r.")
    position = {wnid: i for i, wnid in enumerate(synsets)}
    subset = data_lines(f"{kind}_synsets.txt")
    return subset, tuple(names[position[wnid]] for wnid in subset)


def _spec(dataset: str) -> DatasetSpec:
    base = re.split(r"[/:]", dataset, maxsplit=1)[0]
    if base not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; supported: {sorted(DATASETS)}.")
    return DATASETS[base]


def _label_map(source_labels: Sequence[str], class_wnids: Sequence[str], where: str) -> np.ndarray:
    """Source label index -> index in `class_wnids`, -1 where a source class is outside it."""
    position = {wnid: i for i, wnid in enumerate(class_wnids)}
    if not all(_WNID.fullmatch(name) for name in source_labels):
        raise ValueError(f"Expected WordNet ids (n01440764, ...) as the label names of {where}, "
                         f"found {list(source_labels[:5])}...")
    return np.array([position.get(name, -1) for name in source_labels], np.int64)


# --------------------------------------------------------------------------
# Sources and records
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    """One undecoded example: encoded bytes, an image file path, or a decoded uint8 array."""

    data: bytes | str | np.ndarray
    label: int  # index into the source's classnames
    index: int  # position in the source, 0 .. num_examples - 1


@dataclasses.dataclass(frozen=True)
class EvalSource:
    """A labelled evaluation set: class names, size, and a reader of record ranges."""

    name: str
    split: str
    classnames: tuple[str, ...]
    num_examples: int
    description: str  # where the records come from, for logs and result files
    read: Callable[[int, int], Iterator[Record]]  # (start, stop) -> records start .. stop - 1

    def shard_bounds(self, shard_index: int = 0, num_shards: int = 1) -> tuple[int, int]:
        """Contiguous [start, stop) of one host's shard; sizes differ by at most one."""
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"Expected 0 <= shard_index < num_shards, found {shard_index}, {num_shards}.")
        return (self.num_examples * shard_index // num_shards,
                self.num_examples * (shard_index + 1) // num_shards)

    def records(self, shard_index: int = 0, num_shards: int = 1) -> Iterator[Record]:
        return self.read(*self.shard_bounds(shard_index, num_shards))


def open_source(dataset: str, *, split: str | None = None, data_dir: str | None = None,
                image_folder: str | None = None, reader: str = "auto") -> EvalSource:
    """The evaluation set `dataset` (a `DATASETS` key, optionally "/config" or ":version").

    With `image_folder`, the images come from that tree (see `image_folder_source`);
    otherwise from tfds in `data_dir` (tfds' default when None). `reader` is
    "auto" (by the prepared file format), "data_source" (ArrayRecord, no
    TensorFlow) or "tf" (TFRecord through TensorFlow).
    """
    spec = _spec(dataset)
    if image_folder is not None:
        return image_folder_source(image_folder, dataset=dataset, split=split or spec.split)
    return tfds_source(dataset, split=split or spec.split, data_dir=data_dir, reader=reader)


def image_folder_source(root: str, *, dataset: str | None = None, split: str = "folder") -> EvalSource:
    """Images under `root/<class folder>/...` (any depth), in sorted path order.

    Folder names decide the labels:
    * ImageNet WordNet ids (n01440764, ...): the dataset's ImageNet class space
      (the 200 classes for imagenet_a / imagenet_r, else all 1000) with CLIP's names;
    * integers, for an ImageNet-family dataset: ImageNet class indices (the
      layout of the ImageNetV2 tarballs, folders 0 .. 999);
    * anything else: sorted folder names are classes 0, 1, ..., named by the
      folder name with "_" replaced by " ".
    """
    if not os.path.isdir(root):
        raise DatasetNotFoundError(
            f"Image folder {root!r} for dataset {dataset or '(unnamed)'} does not exist. Expected a "
            "directory with one sub-folder of images per class (e.g. ImageNet val sorted into "
            "n01440764/, n01443537/, ...).")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DatasetNotFoundError(f"Image folder {root!r} has no class sub-folders; expected one per class.")
    kind = _spec(dataset).classes if dataset else "tfds"
    imagenet_kind = kind if kind != "tfds" else "imagenet"
    if all(_WNID.fullmatch(f) for f in folders):
        wnids, classnames = imagenet_class_space(imagenet_kind)
        folder_label = dict(zip(folders, _label_map(folders, wnids, f"image folder {root!r}")))
    elif kind != "tfds" and all(f.isdigit() for f in folders):
        all_wnids = imagenet_class_space("imagenet")[0]
        wnids, classnames = imagenet_class_space(kind)
        if max(int(f) for f in folders) >= len(all_wnids):
            raise ValueError(f"Integer class folders in {root!r} must be ImageNet indices 0..999.")
        as_wnids = [all_wnids[int(f)] for f in folders]
        folder_label = dict(zip(folders, _label_map(as_wnids, wnids, f"image folder {root!r}")))
    else:
        classnames = tuple(f.replace("_", " ") for f in folders)
        folder_label = {f: i for i, f in enumerate(folders)}
    outside = [f for f, label in folder_label.items() if label < 0]
    if outside:
        raise ValueError(f"Class folders {outside[:5]} in {root!r} are not classes of {dataset}; "
                         "remove them or pick the matching --dataset.")
    files = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            files += [(os.path.join(dirpath, f), int(folder_label[folder])) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DatasetNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}.")

    def read(start: int, stop: int) -> Iterator[Record]:
        for i in range(start, stop):
            yield Record(files[i][0], files[i][1], i)

    return EvalSource(dataset or os.path.basename(os.path.normpath(root)), split, classnames, len(files),
                      f"image folder {os.path.abspath(root)}", read)


def tfds_source(dataset: str, *, split: str, data_dir: str | None = None, reader: str = "auto",
                spec: DatasetSpec | None = None) -> EvalSource:
    """A prepared tfds dataset; see `open_source` for `reader`. Images stay encoded.

    `spec` describes a dataset outside `DATASETS` (its tfds_name is then the
    builder name); by default it is looked up by `dataset`.
    """
    import tensorflow_datasets as tfds

    if spec is None:
        spec = _spec(dataset)
        name = spec.tfds_name + dataset[len(re.split(r"[/:]", dataset, maxsplit=1)[0]):]
    else:
        name = spec.tfds_name
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotFoundError(_missing_message(dataset, name, spec, split, builder))
    info = builder.info
    base_split = split.split("[", 1)[0]
    if base_split not in info.splits:
        raise DatasetNotFoundError(f"Split {split!r} of {name} is not prepared in {builder.data_dir}; "
                                   f"prepared splits: {sorted(info.splits)}.")
    num_examples = info.splits[split].num_examples
    source_labels = info.features["label"].names
    if spec.classes == "tfds":
        classnames = tuple(n.replace("_", " ") for n in source_labels)
        label_map = np.arange(len(source_labels))
    else:
        wnids, classnames = imagenet_class_space(spec.classes)
        label_map = _label_map(source_labels, wnids, f"tfds {name}")

    def to_record(example: dict[str, Any], index: int) -> Record:
        label = int(label_map[int(example["label"])])
        if label < 0:
            raise ValueError(f"Record {index} of {name} {split} has label "
                             f"{source_labels[int(example['label'])]}, outside the {spec.classes} classes.")
        return Record(bytes(example["image"]), label, index)

    file_format = str(info.file_format.value if info.file_format else "tfrecord")
    if reader == "auto":
        reader = "data_source" if file_format in ("array_record", "parquet") else "tf"
    if reader == "data_source":
        if file_format not in ("array_record", "parquet"):
            raise ValueError(f"{name} in {builder.data_dir} is prepared as {file_format}, which has no random "
                             "access reader. Use --reader tf (needs tensorflow) or rebuild it with "
                             f"`tfds build {name} --data_dir DIR --file_format array_record`.")
        read = _data_source_reader(builder, split, to_record)
    elif reader == "tf":
        read = _tf_reader(builder, name, split, to_record)
    else:
        raise ValueError(f"Unknown reader {reader!r}; expected auto, data_source or tf.")
    return EvalSource(dataset, split, classnames, num_examples,
                      f"tfds {name} {split} ({file_format}, {reader}) in {builder.data_dir}", read)


def _data_source_reader(builder: Any, split: str, to_record: Callable) -> Callable[[int, int], Iterator[Record]]:
    """Random access into ArrayRecord/Parquet files; no TensorFlow."""
    import tensorflow_datasets as tfds

    data = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

    def read(start: int, stop: int) -> Iterator[Record]:
        for chunk in range(start, stop, 64):
            indices = list(range(chunk, min(chunk + 64, stop)))
            yield from map(to_record, data.__getitems__(indices), indices)

    return read


def _tf_reader(builder: Any, name: str, split: str, to_record: Callable) -> Callable[[int, int], Iterator[Record]]:
    """Sequential TFRecord reading through tf.data, files in their stored order."""
    import tensorflow_datasets as tfds

    tf = _import_tensorflow(name, builder.data_dir)

    def read(start: int, stop: int) -> Iterator[Record]:
        # tfds slices a plain split name itself; an already sliced one is skipped through.
        can_slice = "[" not in split
        ds = builder.as_dataset(f"{split}[{start}:{stop}]" if can_slice else split,
                                decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)
        if not can_slice:
            ds = ds.skip(start).take(stop - start)
        yield from map(to_record, tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)), range(start, stop))

    return read


def _import_tensorflow(name: str, where: str) -> Any:
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            f"{name} in {where} is prepared as TFRecord, which needs TensorFlow to read. Install the "
            "`tf` extra (pip install 'clip-dalle-jax[tf]', i.e. tensorflow-cpu), or rebuild it without "
            f"TensorFlow at read time: `tfds build {name} --data_dir DIR --file_format array_record`."
        ) from err
    # TensorFlow only reads files here; keep it off the accelerators JAX uses.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow was initialised earlier in this process; its choice stands.
        pass
    return tf


def _missing_message(dataset: str, name: str, spec: DatasetSpec, split: str, builder: Any) -> str:
    data_dir = os.fspath(builder.data_dir_root)
    return (
        f"Dataset {dataset!r} (split {split!r}) is not prepared in data_dir {data_dir!r}: "
        f"no {os.path.join(os.fspath(builder.data_dir), 'dataset_info.json')}.\n"
        "To prepare it:\n"
        f"  1. {spec.download.format(data_dir=data_dir)};\n"
        f"  2. run `tfds build {name} --data_dir {data_dir} --file_format array_record` (read without "
        "TensorFlow), or drop --file_format for tfds' TFRecord default (read with the `tf` extra).\n"
        "Then pass --data-dir to the same directory. Or pass --image-folder DIR with one sub-folder "
        "of images per class (ImageNet WordNet ids such as n01440764 map to ImageNet classes).")


# --------------------------------------------------------------------------
# Decoding and batching
# --------------------------------------------------------------------------


class SkipLog:
    """Counts skipped (corrupt) records and keeps the first few reasons for the report."""

    def __init__(self, keep: int = 10) -> None:
        self.count = 0
        self.reasons: list[str] = []
        self._keep = keep

    def add(self, record: Record, error: Exception) -> None:
        self.count += 1
        if len(self.reasons) < self._keep:
            where = record.data if isinstance(record.data, str) else f"record {record.index}"
            self.reasons.append(f"{where}: {error}")


def decode_record(record: Record) -> Image.Image:
    """The record's image as PIL; raises `ImageDecodeError` for a corrupt one."""
    if isinstance(record.data, np.ndarray):
        if record.data.dtype != np.uint8:
            raise ImageDecodeError(f"Expected a uint8 image array, found {record.data.dtype}.")
        return Image.fromarray(record.data[..., 0] if record.data.shape[-1:] == (1,) else record.data)
    return decode_image(record.data)


def examples(records: Iterable[Record], preprocess: Callable[[Image.Image], np.ndarray] | None = None,
             skip_log: SkipLog | None = None) -> Iterator[tuple[Image.Image | np.ndarray, int]]:
    """(PIL image, or `preprocess(image)`, label) for each readable record; corrupt ones are skipped."""
    for record in records:
        try:
            image = decode_record(record)
        except ImageDecodeError as err:
            if skip_log is not None:
                skip_log.add(record, err)
            continue
        yield (image if preprocess is None else preprocess(image)), record.label


def batches(records: Iterable[Record], preprocess: Callable[[Image.Image], np.ndarray], *,
            batch_size: int, image_size: int, num_batches: int | None = None, num_threads: int = 8,
            prefetch: int = 2, skip_log: SkipLog | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches of preprocessed images, decoded on a thread pool, in record order.

    Yields {"image": float32 (B, S, S, 3), "label": int32 (B,), "index": int32 (B,),
    "status": int8 (B,)} with B = batch_size always: the last batch is padded
    (status STATUS_PADDING, index -1) and a corrupt record keeps its slot as a
    zero image with status STATUS_CORRUPT. With `num_batches`, fully padded
    batches are appended up to that count, so hosts with shards one record
    apart still run the same number of steps.
    """
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1, found {batch_size}.")

    def load(record: Record) -> np.ndarray | None:
        try:
            return preprocess(decode_record(record))
        except ImageDecodeError as err:
            if skip_log is not None:
                skip_log.add(record, err)
            return None

    def assemble(chunk: list[Record], images: list[np.ndarray | None]) -> dict[str, np.ndarray]:
        batch = _empty_batch(batch_size, image_size)
        for row, (record, image) in enumerate(zip(chunk, images)):
            batch["label"][row], batch["index"][row] = record.label, record.index
            if image is None:
                batch["status"][row] = STATUS_CORRUPT
            else:
                batch["image"][row], batch["status"][row] = image, STATUS_OK
        return batch

    records = iter(records)
    emitted = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        pending: collections.deque = collections.deque()
        while True:
            while len(pending) <= prefetch:
                chunk = [r for _, r in zip(range(batch_size), records)]
                if not chunk:
                    break
                pending.append((chunk, [pool.submit(load, r) for r in chunk]))
            if not pending:
                break
            chunk, futures = pending.popleft()
            yield assemble(chunk, [f.result() for f in futures])
            emitted += 1
    if num_batches is not None:
        if emitted > num_batches:
            raise ValueError(f"Expected at most {num_batches} batches, the records filled {emitted}.")
        for _ in range(num_batches - emitted):
            yield _empty_batch(batch_size, image_size)


def _empty_batch(batch_size: int, image_size: int) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((batch_size, image_size, image_size, 3), np.float32),
        "label": np.zeros((batch_size,), np.int32),
        "index": np.full((batch_size,), -1, np.int32),
        "status": np.full((batch_size,), STATUS_PADDING, np.int8),
    }
