"""Write datasets to disk: image folders and webdataset tar shards of captioned images,
array_record shards of precomputed fields.

For the first two, a dataset is any random-access sequence of dicts with
`image` (uint8 (H, W, 3), (H, W, 1) or (H, W)), `caption` (str) and any number
of JSON-serialisable labels, such as `common.data.shapes.ShapesDataset`:

* `write_image_folder`: `root/<class>/<key>.png` (torchvision ImageFolder /
  tfds `ImageFolder` style) plus `captions.tsv` (`relative/path<TAB>caption`)
  and `labels.jsonl` (one JSON object per image).
* `write_tar_shards`: `shard-00000.tar`, ... in the webdataset / img2dataset
  layout: each example is the members `<key>.png|jpg`, `<key>.txt` (caption)
  and `<key>.json` (caption and labels), with `key` the zero-padded index.

`write_array_records` stores any records of arrays, strings and numbers (e.g.
caption token ids and int16 dVAE codes) for `sources.ArrayRecordSource`.

Outputs are byte-for-byte reproducible (tar headers carry no time or owner),
and every file is written under a temporary name and renamed into place, so an
interrupted run never leaves a half-written shard that looks complete; a write
that fails removes its temporary file. Names taken from the data (class
folders, file prefixes) must be single path components, so nothing is written
outside the output directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax.serialization import msgpack_serialize
from PIL import Image
from tqdm import tqdm

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
KEY_DIGITS = 9  # img2dataset's key width: up to a billion examples


def example_key(index: int) -> str:
    """The zero-padded key of example `index`, shared by both layouts."""
    return f"{index:0{KEY_DIGITS}d}"


def encode_image(image: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG (lossless) or JPEG bytes."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"Expected image_format in {tuple(IMAGE_FORMATS)}, found {image_format!r}.")
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
        raise ValueError("Expected a uint8 image of shape (H, W), (H, W, 1) or (H, W, 3), "
                         f"found {image.dtype} {image.shape}.")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    options = {"quality": jpeg_quality} if image_format == "jpg" else {}
    Image.fromarray(image).save(buf, format=IMAGE_FORMATS[image_format], **options)
    return buf.getvalue()


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def example_metadata(example: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Everything but the image, JSON-ready: `{"key", "caption", <labels>...}`."""
    caption = example.get("caption")
    if not isinstance(caption, str):
        raise ValueError(f"Expected example {key} to have a str 'caption', found {type(caption).__name__}.")
    meta = {"key": key}
    meta.update((k, _json_value(v)) for k, v in example.items() if k != "image")
    return meta


def _path_component(name: str, what: str) -> str:
    """`name` if it is one visible file name, which cannot reach outside the directory it is joined to."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r} cannot name a file or folder inside the output directory: expected one "
                         "path component without '/', '\\' or NUL that does not start with '.' (hidden, '..'). "
                         "Rename it.")
    return name


@contextlib.contextmanager
def _replaced_atomically(path: str) -> Iterator[str]:
    """Yields a temporary path to write; renames it to `path` on success and removes it on any failure."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _write_atomically(path: str, data: bytes) -> None:
    with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_image_folder(dataset: Sequence[Mapping[str, Any]], root: str | os.PathLike,
                       by: str | None = "shape") -> list[str]:
    """Writes one PNG per example into `root/<example[by]>/`, or into `root/` if `by` is None.

    Spaces in class names become underscores ("top left corner" ->
    "top_left_corner"); a class name that is not one visible path component
    ("../x", "a/b", ".hidden") is refused. Also writes `root/captions.tsv` and
    `root/labels.jsonl` (each line: key, path relative to `root`, caption and
    labels), in index order; a caption holding a tab, newline or carriage
    return, which would split its TSV line, is refused.

    Returns:
      The paths of the PNGs written, in index order.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    paths, captions, labels = [], [], []
    for index in tqdm(range(len(dataset)), desc=f"writing {root}", unit="img", disable=None):
        example = dataset[index]
        key = example_key(index)
        meta = example_metadata(example, key)
        if any(c in meta["caption"] for c in "\t\n\r"):
            raise ValueError(f"Caption of example {key} contains a tab, newline or carriage return, which "
                             f"captions.tsv cannot hold: {meta['caption']!r}. Replace them with spaces, or write "
                             "tar shards (write_tar_shards), which keep any caption.")
        folder = ""
        if by is not None:
            if not isinstance(example.get(by), str):
                raise ValueError(f"Expected every example to have a str label {by!r} to group by, "
                                 f"found {example.get(by)!r} in example {key}.")
            folder = _path_component(example[by].replace(" ", "_"), f"Label {by!r} of example {key}")
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        relative = os.path.join(folder, f"{key}.png")
        _write_atomically(os.path.join(root, relative), encode_image(example["image"], "png"))
        paths.append(os.path.join(root, relative))
        captions.append(f"{relative}\t{meta['caption']}\n")
        labels.append(json.dumps({"path": relative, **meta}, sort_keys=True) + "\n")
    _write_atomically(os.path.join(root, "captions.tsv"), "".join(captions).encode("utf-8"))
    _write_atomically(os.path.join(root, "labels.jsonl"), "".join(labels).encode("utf-8"))
    return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(dataset: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                     examples_per_shard: int = 1000, image_format: str = "png",
                     jpeg_quality: int = 95) -> list[str]:
    """Writes webdataset-style shards `out_dir/shard-00000.tar`, ... and returns their paths.

    Shard `s` holds examples `s * examples_per_shard` onwards, each as
    `<key>.<image_format>`, `<key>.txt` (the caption, UTF-8) and `<key>.json`
    (`example_metadata`: key, caption and every label).
    """
    if examples_per_shard < 1:
        raise ValueError(f"Expected examples_per_shard >= 1, found {examples_per_shard}.")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"Expected image_format in {tuple(IMAGE_FORMATS)}, found {image_format!r}.")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    num_shards = math.ceil(len(dataset) / examples_per_shard)
    paths = []
    progress = tqdm(total=len(dataset), desc=f"writing {out_dir}", unit="img", disable=None)
    for shard in range(num_shards):
        path = os.path.join(out_dir, f"shard-{shard:05d}.tar")
        with _replaced_atomically(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            start = shard * examples_per_shard
            for index in range(start, min(start + examples_per_shard, len(dataset))):
                example = dataset[index]
                key = example_key(index)
                meta = example_metadata(example, key)
                _add_member(tar, f"{key}.{image_format}",
                            encode_image(example["image"], image_format, jpeg_quality))
                _add_member(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                progress.update()
        paths.append(path)
    progress.close()
    return paths


def write_array_records(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike,
                        records_per_shard: int = 10_000, prefix: str = "records") -> list[str]:
    """Writes `out_dir/<prefix>-00000.array_record`, ... and returns their paths.

    Each record is a dict of numpy arrays (any dtype, e.g. int16 codes),
    strings, bytes, numbers, or tuples of strings (stored as lists), packed
    with msgpack (`flax.serialization`, which keeps dtype and shape) and
    written with group_size 1, so `sources.ArrayRecordSource` reads any one
    without its neighbours.
    """
    # array_record comes with tensorflow-datasets on Linux only.
    from array_record.python.array_record_module import ArrayRecordWriter

    if records_per_shard < 1:
        raise ValueError(f"Expected records_per_shard >= 1, found {records_per_shard}.")
    _path_component(prefix, "Shard prefix")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    writer = None
    try:
        for n, record in enumerate(tqdm(records, desc=f"writing {out_dir}", unit="record", disable=None)):
            if n % records_per_shard == 0:
                if writer is not None:
                    writer.close()
                    writer = None
                    os.replace(paths[-1] + ".tmp", paths[-1])
                paths.append(os.path.join(out_dir, f"{prefix}-{len(paths):05d}.array_record"))
                writer = ArrayRecordWriter(paths[-1] + ".tmp", "group_size:1")
            fields = {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}
            try:
                writer.write(msgpack_serialize(fields))
            except TypeError as err:
                raise TypeError(f"Cannot store record {n} ({sorted(record)}): {err}. Expected numpy arrays, "
                                "strings, bytes, numbers or tuples of strings.") from err
    except BaseException:  # the shard being written is incomplete: leave no temporary file behind
        if writer is not None:
            writer.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(paths[-1] + ".tmp")
        raise
    if writer is None:
        raise ValueError("Expected at least one record to write, found none.")
    writer.close()
    os.replace(paths[-1] + ".tmp", paths[-1])
    return paths
