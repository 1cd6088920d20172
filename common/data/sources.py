"""Random-access sources of records for the grain pipeline in `pipeline.py`.

Every source has `len(source)` and `source[i] -> record`, a pure function of
`i`, so grain can shuffle globally, shard by host and resume anywhere. A
record is a plain dict

    {"index": int, "key": str, <optional fields>}

with `index` its position in the source, `key` where it comes from (for logs)
and whichever of these the source has: `image` (encoded bytes, an image file
path or a uint8 (H, W[, C]) array; None: listed but unreadable), `caption`
(str, a tuple of str, or None), `label` (int), or any named array (e.g.
`text_ids`, int16 `codes`). Records stay undecoded here; decoding, and
deciding that a record is bad, happens in the task's transforms
(`transforms.py`), which skip and count bad records instead of failing
(DESIGN.md principle 7). A source therefore never raises for one bad record;
a field it would not read (a tar member over `max_member_bytes`) is an
`Unreadable(reason, detail)`, which the transforms skip and count by reason.

Paths that lead outside a dataset's root (`..`, absolute paths, symlinks) are
read, but logged once per source: a warning with their count and the first one.

* `TarShardSource` (in `tar_shards.py`): webdataset / img2dataset tar shards
  (`KEY.jpg|jpeg|png|webp` with `KEY.txt` or `KEY.json` holding a "caption"), read by member offset.
* `ImageFolderSource`: image files with a captions file, or one sub-folder per class.
* `TfdsSource`: a prepared tfds split, features mapped to record fields.
* `ArrayRecordSource`: array_record shards of precomputed fields (`writers.write_array_records`).
* `ShapesSource`: the built-in shapes dataset, rendered on access.
* `ListSource`: records given in memory.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, SupportsIndex

import numpy as np
import tensorflow_datasets as tfds
from flax.serialization import msgpack_restore

from common.data.shapes import ShapesConfig, ShapesDataset
from common.data.source_utils import (  # noqa: F401
    DatasetNotFoundError,
    Record,
    Unreadable,
    caption_from_json,
    check_index,
    expand_paths,
    warn_outside_root,
)
from common.data.tar_shards import TAR_IMAGE_EXTENSIONS, TarShardSource, index_tar_shard  # noqa: F401
from common.images import MAX_IMAGE_BYTES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


# --------------------------------------------------------------------------
# Image folders: a captions file, or one sub-folder per class
# --------------------------------------------------------------------------

ClassSpace = Callable[[Sequence[str]], tuple[Mapping[str, int], tuple[str, ...]]]


def folder_class_space(folders: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
    """Sorted folder names are classes 0, 1, ..., named by the folder with "_" replaced by " "."""
    return {f: i for i, f in enumerate(folders)}, tuple(f.replace("_", " ") for f in folders)


class ImageFolderSource:
    """Image files, captioned by a TSV / JSON-lines file or labelled by their class sub-folder.

    With a captions file (`captions_file`, else `root/captions.tsv` or
    `root/captions.jsonl` when present), its lines are the records {image:
    path, caption}: `*.tsv` lines `path<TAB>caption` (as `write_image_folder`
    writes), or `*.jsonl` objects with `image_field` and `caption_field`. A
    line that cannot be parsed is a record with neither; a listed file that
    does not exist is found, skipped and counted when read.

    Without one (or with `classes=True`, which ignores any captions file), every
    image file under `root` (sorted paths, any depth) is a record {image: path};
    those under `root/<class folder>/` also get `label`.
    `class_space(sorted folder names) -> ({folder: label}, classnames)` decides
    the labels (default `folder_class_space`); `classnames` is exposed as
    `source.classnames` (empty with a captions file). `outside_root` counts the
    images that resolve outside `root` (logged once, see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, *, captions_file: str | os.PathLike | None = None,
                 image_field: str = "image", caption_field: str = "caption",
                 class_space: ClassSpace = folder_class_space, classes: bool = False):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DatasetNotFoundError(f"Image folder {self.root!r} does not exist. Expected a directory of images "
                                       "with a captions.tsv, or with one sub-folder of images per class.")
        if classes and captions_file is not None:
            raise ValueError("Pass either captions_file or classes=True (labels from class sub-folders), not both.")
        if captions_file is None and not classes:
            found = [p for p in ("captions.tsv", "captions.jsonl") if os.path.isfile(os.path.join(self.root, p))]
            captions_file = os.path.join(self.root, found[0]) if found else None
        self.captions_file = captions_file and os.fspath(captions_file)
        self.classnames: tuple[str, ...] = ()
        if self.captions_file is None:
            self._field, self._entries = "label", self._class_folder_entries(class_space)
        else:
            self._field, self._entries = "caption", self._caption_entries(image_field, caption_field)
        if not self._entries:
            where = self.captions_file or f"no captions file, no {'/'.join(IMAGE_EXTENSIONS)} files"
            raise DatasetNotFoundError(f"Image folder {self.root!r} lists no images ({where}).")
        listed = [os.path.join(self.root, path) for path, _ in self._entries if path is not None]
        self.outside_root = warn_outside_root(self.root, listed, "images")

    def _caption_entries(self, image_field: str, caption_field: str) -> list[tuple[str | None, str | None]]:
        if not self.captions_file.endswith((".tsv", ".jsonl")):
            raise ValueError(f"Expected a captions file ending in .tsv or .jsonl, found {self.captions_file!r}.")
        # Lines end at "\n" only (a "\r" inside a caption stays in it; "\r\n" endings are stripped).
        with open(self.captions_file, encoding="utf-8", errors="replace", newline="\n") as f:
            lines = [line.rstrip("\r\n") for line in f if line.strip()]
        if self.captions_file.endswith(".tsv"):
            return [(path or None, caption if tab else None) for path, tab, caption in
                    (line.partition("\t") for line in lines)]
        entries = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            path, caption = (obj.get(image_field), obj.get(caption_field)) if isinstance(obj, dict) else (None, None)
            entries.append((path if isinstance(path, str) and path else None,
                            caption if isinstance(caption, str) else None))
        return entries

    def _class_folder_entries(self, class_space: ClassSpace) -> list[tuple[str, int | None]]:
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        folder_label, self.classnames = class_space(folders)
        entries = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            relative = os.path.relpath(dirpath, self.root)
            label = None if relative == "." else int(folder_label[relative.split(os.sep)[0]])
            entries += [(os.path.normpath(os.path.join(relative, f)), label) for f in sorted(filenames)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]  # relative to root, as caption lists are
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.captions_file or self.root!r}, {len(self)} records)"

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = check_index(index, len(self))
        path, value = self._entries[i]
        full = os.path.join(self.root, path) if path is not None else None
        record = {"index": i, "key": full or f"{self.captions_file} entry {i}", "image": full}
        if value is not None or self._field == "caption":
            record[self._field] = value
        return record


# --------------------------------------------------------------------------
# tfds: ArrayRecord / Parquet by random access, TFRecord through TensorFlow
# --------------------------------------------------------------------------


def _feature(example: Any, path: str) -> Any:
    for part in path.split("/"):
        example = example[part]
    return example


def _as_captions(value: Any) -> str | tuple[str, ...] | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        captions = tuple(c for c in (_as_captions(v) for v in value) if isinstance(c, str))
        return captions or None
    return None


def _field_value(field: str, value: Any) -> Any:
    """A tfds feature value as a record field: image bytes (None if empty), captions, ints, arrays."""
    if field == "image":
        return bytes(value) if isinstance(value, (bytes, np.bytes_)) and len(value) else None
    if field == "caption":
        return _as_captions(value)
    value = np.asarray(value)
    return int(value) if value.ndim == 0 and np.issubdtype(value.dtype, np.integer) else value


def import_tensorflow(what: str) -> Any:
    """TensorFlow for reading TFRecord files, kept off the accelerators JAX uses."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            f"{what} is prepared as TFRecord, which needs TensorFlow to read. Install the `tf` extra "
            "(pip install 'clip-dalle-jax[tf]', i.e. tensorflow-cpu), or rebuild it for reading without "
            "TensorFlow: `tfds build NAME --data_dir DIR --file_format array_record`.") from err
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow was initialised earlier in this process; its choice stands.
        pass
    return tf


class TfdsSource:
    """A prepared tfds split; `fields` maps record fields to features ("/" reaches into nested ones).

    Args:
      name: tfds builder name, optionally "name/config:version".
      split: a split, optionally sliced or combined ("train[:90%]", "test[2:]").
      data_dir: tfds data dir (None: tfds' default).
      fields: {record field: feature}; default {"image": "image", "caption":
        "caption"}. `image` stays encoded (decoded by PIL like every other
        source); `caption` may be a sequence of captions (training draws one
        per epoch); other fields become ints or arrays.
      download: what to fetch by hand, for the not-prepared message ("{data_dir}"
        is filled in).

    ArrayRecord and Parquet preparations are read by random access through
    `tfds.data_source`, without TensorFlow. TFRecord, tfds' default, has no
    random access: it is read through TensorFlow (the `tf` extra) in chunks of
    `TFRECORD_CHUNK` consecutive records, so reading in order (evaluation) is
    sequential; `sequential` is then True and the pipeline refuses to shuffle it.
    `classnames` are the names of a ClassLabel `label` feature ("_" -> " ").
    """

    TFRECORD_CHUNK = 256

    def __init__(self, name: str, *, split: str, data_dir: str | None = None,
                 fields: Mapping[str, str] | None = None,
                 download: str = "put any files the tfds catalog says to download by hand in "
                                 "{data_dir}/downloads/manual/"):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.fields = dict(fields or {"image": "image", "caption": "caption"})
        builder = tfds.builder(name, data_dir=data_dir)
        root = os.fspath(builder.data_dir_root)
        if not builder.is_prepared():
            raise DatasetNotFoundError(
                f"tfds dataset {name!r} (split {split!r}) is not prepared in data_dir {root!r}: no "
                f"{os.path.join(os.fspath(builder.data_dir), 'dataset_info.json')}. To prepare it (network "
                f"needed): {download.format(data_dir=root)}; then run `tfds build {name} --data_dir {root} "
                "--file_format array_record` (read without TensorFlow), or drop --file_format for tfds' "
                "TFRecord default (read with the `tf` extra), and pass the same data_dir.")
        info = builder.info
        unknown = [s for s in re.split(r"\+", split) if s.split("[", 1)[0].strip() not in info.splits]
        if unknown:
            raise DatasetNotFoundError(f"Split {split!r} of {name} is not prepared in {builder.data_dir}; "
                                       f"prepared splits: {sorted(info.splits)}.")
        for feature in self.fields.values():
            try:
                _feature(info.features, feature)
            except (KeyError, TypeError):
                raise ValueError(f"{name} has no feature {feature!r}; its features are {list(info.features.keys())}. "
                                 "Map record fields to its features with fields={field: feature}.") from None
        label = _feature(info.features, self.fields["label"]) if "label" in self.fields else None
        self.classnames = tuple(n.replace("_", " ") for n in getattr(label, "names", ()))
        self.file_format = str(info.file_format.value if info.file_format else "tfrecord")
        self.sequential = self.file_format not in ("array_record", "parquet")
        if self.sequential:
            import_tensorflow(f"{name} in {builder.data_dir}")
            spans = tfds.core.ReadInstruction.from_spec(split).to_absolute(info.splits)
            self._spans = [(s.splitname, s.from_ or 0, info.splits[s.splitname].num_examples if s.to is None else s.to)
                           for s in spans]  # [from, to) of each split read, concatenated in this order
        self._length = info.splits[split].num_examples
        self._data = None
        self._chunks: collections.OrderedDict[int, list[dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # readers open lazily in each process (grain workers)
        return {**self.__dict__, "_data": None, "_chunks": collections.OrderedDict(), "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {self.file_format}, {len(self)} records)"

    def _decoders(self) -> dict[str, Any]:
        decoders: dict[str, Any] = {}
        if "image" in self.fields:  # kept encoded
            node = decoders
            *parents, leaf = self.fields["image"].split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = tfds.decode.SkipDecoding()
        return decoders

    def _tfrecord_chunk(self, chunk: int) -> list[dict]:
        """Examples chunk * TFRECORD_CHUNK onwards, read in stored order through tf.data."""
        start, stop = chunk * self.TFRECORD_CHUNK, min((chunk + 1) * self.TFRECORD_CHUNK, len(self))
        instruction, offset = None, 0
        for split, lo, hi in self._spans:  # the part of each span inside [start, stop)
            a, b = max(start - offset, 0), min(stop - offset, hi - lo)
            if a < b:
                part = tfds.core.ReadInstruction(split, from_=lo + a, to=lo + b, unit="abs")
                instruction = part if instruction is None else instruction + part
            offset += hi - lo
        ds = tfds.builder(self.name, data_dir=self.data_dir).as_dataset(instruction, decoders=self._decoders(), shuffle_files=False)
        return list(tfds.as_numpy(ds))

    def _example(self, i: int) -> dict:
        if not self.sequential:
            if self._data is None:
                self._data = tfds.builder(self.name, data_dir=self.data_dir).as_data_source(self.split, decoders=self._decoders())
            return self._data[i]
        chunk = i // self.TFRECORD_CHUNK
        with self._lock:  # grain's reader threads ask for neighbouring records at once
            if chunk not in self._chunks:
                self._chunks[chunk] = self._tfrecord_chunk(chunk)
                while len(self._chunks) > 2:
                    self._chunks.popitem(last=False)
            return self._chunks[chunk][i - chunk * self.TFRECORD_CHUNK]

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = check_index(index, len(self))
        example = self._example(i)
        record = {"index": i, "key": f"{self.name}/{self.split}[{i}]"}
        record.update((field, _field_value(field, _feature(example, feature)))
                      for field, feature in self.fields.items())
        return record


# --------------------------------------------------------------------------
# array_record shards of precomputed fields
# --------------------------------------------------------------------------


class ArrayRecordSource:
    """Records written by `writers.write_array_records`: msgpack dicts of arrays, strings and numbers.

    Args:
      paths: a directory (every `*.array_record` in it), a glob, or a list of
        files; record order is file order, then write order. Lists come back
        as tuples (several captions).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        # array_record comes with tensorflow-datasets on Linux only.
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths = expand_paths(paths, ".array_record", "as common.data.writers.write_array_records writes")
        self._data = ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files from {self.paths[0]!r}, {len(self)} records)"

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = check_index(index, len(self))
        fields = msgpack_restore(self._data[i])
        record = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return {**record, "index": i, "key": f"array_record[{i}]"}


# --------------------------------------------------------------------------
# In memory: the shapes dataset, lists of records
# --------------------------------------------------------------------------


class ShapesSource:
    """`ShapesDataset` items as records: the rendered uint8 image, its caption, `shape_id` and `color_id`."""

    def __init__(self, dataset: ShapesDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"ShapesSource({self.dataset!r})"

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = check_index(index, len(self))
        item = self.dataset[i]
        return {"index": i, "key": f"shapes/{self.dataset.split}[{i}]", "image": item["image"],
                "caption": item["caption"], "shape_id": item["shape_id"], "color_id": item["color_id"]}


class ListSource:
    """The given records (dicts of fields), with `index` and `key` added."""

    def __init__(self, records: Sequence[Mapping[str, Any]], name: str = "list"):
        self.records, self.name = list(records), name

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ListSource({self.name!r}, {len(self)} records)"

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = check_index(index, len(self))
        return {"key": f"{self.name}[{i}]", **self.records[i], "index": i}


def source_from_config(data_cfg: Any):
    """The record source `config.data` names: shapes, tar (img2dataset shards), folder, tfds or array_record."""
    kind = data_cfg.source
    if kind == "shapes":
        return ShapesSource(ShapesDataset(
            data_cfg.split, data_cfg.num_examples, ShapesConfig(image_size=data_cfg.render_size)))
    if kind == "tar":
        return TarShardSource(data_cfg.shards, index_dir=data_cfg.get("index_dir"),
                              caption_field=data_cfg.get("caption_field", "caption"),
                              max_member_bytes=data_cfg.get("max_member_bytes", MAX_IMAGE_BYTES))
    if kind == "folder":
        return ImageFolderSource(data_cfg.root, captions_file=data_cfg.get("captions_file"))
    if kind == "tfds":
        return TfdsSource(data_cfg.name, split=data_cfg.split, data_dir=data_cfg.get("data_dir"),
                          fields=data_cfg.get("fields"))
    if kind == "array_record":
        return ArrayRecordSource(data_cfg.paths)
    raise ValueError(f"config.data.source={kind!r}; expected one of 'shapes', 'tar', 'folder', 'tfds', "
                     "'array_record'.")
