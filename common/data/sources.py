"""Random-access sources of captioned images for the grain pipelines in `pipeline.py`.

Every source is a grain `RandomAccessDataSource`: `len(source)` and
`source[i] -> ImageTextRecord`, a pure function of `i`, so grain can shuffle
globally, shard by host and resume anywhere. Records stay undecoded here
(bytes, a file path or a uint8 array); decoding, and deciding that a record is
bad, happens in the pipeline, which skips and counts bad records instead of
failing (DESIGN.md principle 7). A source therefore never raises for one bad
record: a member or file it cannot read becomes `data=None` (missing image),
an unreadable caption becomes `caption=None`.

* `TarShardSource`: webdataset / img2dataset tar shards (`KEY.jpg|jpeg|png|webp`
  with `KEY.txt` or `KEY.json` holding a "caption"). Shards are indexed once
  (member offsets from the tar headers, optionally cached next to an index
  directory) and members are read by offset: no sequential scan at run time.
* `ImageFolderSource`: image files plus `captions.tsv` (`relative/path<TAB>caption`)
  or a JSON-lines file with image and caption fields.
* `TfdsSource`: a tfds dataset prepared as ArrayRecord (or Parquet), read
  through `tfds.data_source` without TensorFlow.
* `ShapesSource`: the built-in shapes dataset, rendered on access.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any, SupportsIndex

import numpy as np
from tqdm import tqdm

from common.data.shapes import ShapesConfig, ShapesDataset

log = logging.getLogger(__name__)

# img2dataset's output formats; the first one present is a key's image.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's `base_plus_ext`: the key is the member path up to the first "." of its basename.
_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_NO_CAPTION, _TXT_CAPTION, _JSON_CAPTION = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ImageTextRecord:
    """One undecoded example of a source."""

    index: int  # position in the source, 0 .. len(source) - 1
    key: str  # where it comes from, for logs: "shard-00003.tar:000001234", a file path, ...
    data: bytes | str | np.ndarray | None  # encoded image, image file path, uint8 (H, W[, C]); None: missing
    caption: str | tuple[str, ...] | None  # one caption, several (one is drawn per epoch), or None: missing


def _check_index(index: SupportsIndex, length: int) -> int:
    i = int(index)
    if not 0 <= i < length:
        raise IndexError(f"Record index {i} is out of range for a source of {length} records.")
    return i


def _caption_from_json(raw: bytes, field: str) -> str | None:
    try:
        value = json.loads(raw.decode("utf-8")).get(field)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------
# webdataset / img2dataset tar shards
# --------------------------------------------------------------------------


def index_tar_shard(path: str) -> dict[str, np.ndarray]:
    """The records of one uncompressed tar shard, from its member headers.

    Returns {"keys": bytes (N,), "image": int64 (N, 2) [offset, size] (-1 when
    the key has no image member), "caption": int64 (N, 2), "caption_kind":
    int8 (N,) (0 none, 1 .txt, 2 .json)}, in member order. Keys with neither
    an image nor a caption member (e.g. only `.npy`) are not records. A shard
    whose headers break off part way keeps the records indexed before the
    damage, with a warning.
    """
    entries: dict[str, list] = {}  # key -> [image ext, image, caption kind, caption]
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": no compression, so member offsets are file offsets
            for member in tar:  # reads headers only; member data is seeked over
                match = _TAR_KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                entry = entries.setdefault(key, [None, (-1, -1), _NO_CAPTION, (-1, -1)])
                span = (member.offset_data, member.size)
                if ext in TAR_IMAGE_EXTENSIONS and (
                        entry[0] is None or TAR_IMAGE_EXTENSIONS.index(ext) < TAR_IMAGE_EXTENSIONS.index(entry[0])):
                    entry[0], entry[1] = ext, span
                elif ext == "txt" or (ext == "json" and entry[2] != _TXT_CAPTION):
                    entry[2], entry[3] = (_TXT_CAPTION if ext == "txt" else _JSON_CAPTION), span
    except tarfile.ReadError as err:
        log.warning("Tar shard %s is damaged or not an uncompressed tar (%s); indexed the %d keys before "
                    "the damage. Random access needs uncompressed .tar shards (gunzip .tar.gz ones).",
                    path, err, len(entries))
    records = [(k, e) for k, e in entries.items() if e[0] is not None or e[2] != _NO_CAPTION]
    return {
        "keys": np.array([k.encode("utf-8") for k, _ in records], dtype="S"),
        "image": np.array([e[1] for _, e in records], np.int64).reshape(-1, 2),
        "caption": np.array([e[3] for _, e in records], np.int64).reshape(-1, 2),
        "caption_kind": np.array([e[2] for _, e in records], np.int8),
    }


def _cached_index(path: str, index_dir: str | None) -> dict[str, np.ndarray]:
    """`index_tar_shard(path)`, read from / written to `index_dir` when given.

    A cached index is used only while the shard's size and mtime are those it
    was built from; it is written atomically, so concurrent hosts sharing a
    directory at worst index the same shard twice.
    """
    if index_dir is None:
        return index_tar_shard(path)
    stat = os.stat(path)
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8")).hexdigest()[:12]
    cache = os.path.join(index_dir, f"{os.path.basename(path)}.{digest}.index.npz")
    if os.path.exists(cache):
        with np.load(cache) as stored:
            if int(stored["source_size"]) == stat.st_size and int(stored["source_mtime_ns"]) == stat.st_mtime_ns:
                return {k: stored[k] for k in ("keys", "image", "caption", "caption_kind")}
    index = index_tar_shard(path)
    os.makedirs(index_dir, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns, **index)
    tmp = f"{cache}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, cache)
    return index


def _expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(shards, (str, os.PathLike)):
        spec = os.fspath(shards)
        if os.path.isdir(spec):
            paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        else:
            paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    else:
        paths = [os.fspath(p) for p in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise FileNotFoundError(
            f"Expected webdataset tar shards, found {'none' if not paths else 'missing files ' + str(missing[:5])} "
            f"for {shards!r}. Pass a directory of .tar files, a glob such as 'data/shard-*.tar', or a list of "
            "paths (e.g. the output of img2dataset --output_format webdataset).")
    return paths


class TarShardSource:
    """Records of webdataset / img2dataset tar shards, read by member offset.

    Args:
      shards: a directory (every `*.tar` in it), a glob, or a list of shard paths;
        record order is shard order, then member order.
      index_dir: where to cache each shard's member index (None: index at
        every start; indexing reads only tar headers).
      caption_field: the field of `KEY.json` holding the caption, used when a
        key has no `KEY.txt`.
      num_threads: shards indexed in parallel.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *, index_dir: str | None = None,
                 caption_field: str = "caption", num_threads: int = 8):
        self.paths = _expand_shards(shards)
        self.caption_field = caption_field
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            indices = list(tqdm(pool.map(lambda p: _cached_index(p, index_dir), self.paths), total=len(self.paths),
                                desc="indexing tar shards", unit="shard", disable=None))
        self._shard = np.concatenate([np.full(len(ix["keys"]), s, np.int32) for s, ix in enumerate(indices)])
        self._keys = np.concatenate([ix["keys"] for ix in indices])  # (N,) bytes
        self._image = np.concatenate([ix["image"] for ix in indices])  # (N, 2) offset, size
        self._caption = np.concatenate([ix["caption"] for ix in indices])  # (N, 2)
        self._caption_kind = np.concatenate([ix["caption_kind"] for ix in indices])  # (N,)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.paths)} shards from {self.paths[0]!r}, {len(self)} records)"

    def __getitem__(self, index: SupportsIndex) -> ImageTextRecord:
        i = _check_index(index, len(self))
        path = self.paths[self._shard[i]]
        (image_offset, image_size), (caption_offset, caption_size) = self._image[i], self._caption[i]
        data, caption = None, None
        try:
            with open(path, "rb") as f:
                if image_offset >= 0:
                    f.seek(image_offset)
                    data = f.read(image_size)
                if caption_offset >= 0:
                    f.seek(caption_offset)
                    raw = f.read(caption_size)
                    if self._caption_kind[i] == _TXT_CAPTION:
                        caption = raw.decode("utf-8", errors="replace")
                    else:
                        caption = _caption_from_json(raw, self.caption_field)
        except OSError as err:  # the shard vanished or cannot be read since indexing: a missing record
            log.debug("Cannot read record %d from %s: %s", i, path, err)
        return ImageTextRecord(i, f"{path}:{self._keys[i].decode('utf-8')}", data, caption)


# --------------------------------------------------------------------------
# Image folders with a captions file
# --------------------------------------------------------------------------


class ImageFolderSource:
    """Image files listed, with captions, in a TSV or JSON-lines file.

    Args:
      root: the folder image paths are relative to (absolute paths are kept).
      captions_file: `*.tsv` lines `path<TAB>caption` (as `write_image_folder`
        writes), or `*.jsonl` objects with `image_field` and `caption_field`;
        default `root/captions.tsv`, else `root/captions.jsonl`.
      image_field, caption_field: JSON-lines field names.

    A line that cannot be parsed is a record with neither image nor caption;
    a listed file that does not exist is found, skipped and counted when read.
    """

    def __init__(self, root: str | os.PathLike, *, captions_file: str | os.PathLike | None = None,
                 image_field: str = "image", caption_field: str = "caption"):
        self.root = os.fspath(root)
        if captions_file is None:
            found = [p for p in ("captions.tsv", "captions.jsonl") if os.path.isfile(os.path.join(self.root, p))]
            if not found:
                raise FileNotFoundError(
                    f"Expected a captions file in {self.root!r}: captions.tsv (`relative/path<TAB>caption` lines) "
                    "or captions.jsonl (objects with image and caption fields); found neither. Pass "
                    "captions_file= to use another file.")
            captions_file = os.path.join(self.root, found[0])
        self.captions_file = os.fspath(captions_file)
        if not self.captions_file.endswith((".tsv", ".jsonl")):
            raise ValueError(f"Expected a captions file ending in .tsv or .jsonl, found {self.captions_file!r}.")
        with open(self.captions_file, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\r\n") for line in f if line.strip()]
        parse = self._parse_tsv if self.captions_file.endswith(".tsv") else self._parse_jsonl
        self._entries = [parse(line, image_field, caption_field) for line in lines]
        if not self._entries:
            raise ValueError(f"Captions file {self.captions_file!r} lists no images.")

    @staticmethod
    def _parse_tsv(line: str, image_field: str, caption_field: str) -> tuple[str | None, str | None]:
        path, tab, caption = line.partition("\t")
        return path or None, caption if tab else None

    @staticmethod
    def _parse_jsonl(line: str, image_field: str, caption_field: str) -> tuple[str | None, str | None]:
        try:
            obj = json.loads(line)
        except ValueError:
            return None, None
        if not isinstance(obj, dict):
            return None, None
        path, caption = obj.get(image_field), obj.get(caption_field)
        return (path if isinstance(path, str) and path else None,
                caption if isinstance(caption, str) else None)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.captions_file!r}, {len(self)} records)"

    def __getitem__(self, index: SupportsIndex) -> ImageTextRecord:
        i = _check_index(index, len(self))
        path, caption = self._entries[i]
        full = os.path.join(self.root, path) if path is not None else None
        return ImageTextRecord(i, full or f"{self.captions_file} entry {i}", full, caption)


# --------------------------------------------------------------------------
# tfds through ArrayRecord, no TensorFlow
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


class TfdsSource:
    """A tfds split with an image feature and a text feature, by random access.

    Args:
      name: tfds builder name, optionally "name/config:version".
      split: a split, optionally sliced ("train[:90%]").
      data_dir: tfds data dir (None: tfds' default).
      image_feature: the encoded image feature (kept undecoded, decoded by PIL
        like every other source).
      text_feature: the caption feature; "/" reaches into nested features
        ("captions/text"). A sequence of captions gives one record with all
        of them; training draws one per epoch.

    The dataset must be prepared as ArrayRecord (`tfds build NAME --file_format
    array_record`): TFRecord files have no random access, so grain could not
    shuffle or shard them.
    """

    def __init__(self, name: str, *, split: str, data_dir: str | None = None, image_feature: str = "image",
                 text_feature: str = "caption"):
        import tensorflow_datasets as tfds

        from clip_jax.eval_data import DatasetNotFoundError  # one error type for missing tfds data

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_feature, self.text_feature = image_feature, text_feature
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            root = builder.data_dir_root
            raise DatasetNotFoundError(
                f"tfds dataset {name!r} (split {split!r}) is not prepared in data_dir {root!r}. Prepare it "
                f"(network needed) with `tfds build {name} --data_dir {root} --file_format array_record`, after "
                f"putting any files the tfds catalog says to download by hand in {root}/downloads/manual/; then "
                "pass the same data_dir. ArrayRecord is read without TensorFlow.")
        file_format = str(builder.info.file_format.value if builder.info.file_format else "tfrecord")
        if file_format not in ("array_record", "parquet"):
            raise ValueError(
                f"{name} in {builder.data_dir} is prepared as {file_format}, which has no random access, so it "
                f"cannot be shuffled and sharded by grain. Rebuild it: `tfds build {name} --data_dir "
                f"{builder.data_dir_root} --file_format array_record`.")
        features = builder.info.features
        for feature in (image_feature, text_feature):
            try:
                _feature(features, feature)
            except (KeyError, TypeError):
                raise ValueError(f"{name} has no feature {feature!r}; its features are {list(features.keys())}. "
                                 "Pass image_feature= / text_feature= with the right names.") from None
        self._length = builder.info.splits[split].num_examples
        self._data = None

    def _data_source(self) -> Any:
        if self._data is None:  # opened lazily, so the source pickles into grain worker processes
            import tensorflow_datasets as tfds

            decoders: dict[str, Any] = {}
            node = decoders
            *parents, leaf = self.image_feature.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = tfds.decode.SkipDecoding()
            builder = tfds.builder(self.name, data_dir=self.data_dir)
            self._data = builder.as_data_source(self.split, decoders=decoders)
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"

    def __getitem__(self, index: SupportsIndex) -> ImageTextRecord:
        i = _check_index(index, len(self))
        example = self._data_source()[i]
        image = _feature(example, self.image_feature)
        data = bytes(image) if isinstance(image, (bytes, np.bytes_)) and len(image) else None
        return ImageTextRecord(i, f"{self.name}/{self.split}[{i}]", data,
                               _as_captions(_feature(example, self.text_feature)))


# --------------------------------------------------------------------------
# The built-in shapes dataset
# --------------------------------------------------------------------------


class ShapesSource:
    """`ShapesDataset` items as records: the rendered uint8 image and its caption."""

    def __init__(self, dataset: ShapesDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"ShapesSource({self.dataset!r})"

    def __getitem__(self, index: SupportsIndex) -> ImageTextRecord:
        i = _check_index(index, len(self))
        item = self.dataset[i]
        return ImageTextRecord(i, f"shapes/{self.dataset.split}[{i}]", item["image"], item["caption"])


def source_from_config(data_cfg: Any):
    """The record source `config.data` names: shapes, tar (img2dataset shards), folder or tfds."""
    kind = data_cfg.source
    if kind == "shapes":
        return ShapesSource(ShapesDataset(
            data_cfg.split, data_cfg.num_examples, ShapesConfig(image_size=data_cfg.render_size)))
    if kind == "tar":
        return TarShardSource(data_cfg.shards, index_dir=data_cfg.get("index_dir"),
                              caption_field=data_cfg.get("caption_field", "caption"))
    if kind == "folder":
        return ImageFolderSource(data_cfg.root, captions_file=data_cfg.get("captions_file"))
    if kind == "tfds":
        return TfdsSource(data_cfg.name, split=data_cfg.split, data_dir=data_cfg.get("data_dir"),
                          image_feature=data_cfg.get("image_feature", "image"),
                          text_feature=data_cfg.get("text_feature", "caption"))
    raise ValueError(f"config.data.source={kind!r}; expected one of 'shapes', 'tar', 'folder', 'tfds'.")
