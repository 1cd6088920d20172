"""webdataset / img2dataset tar shards as a random-access record source, read by member offset.

Each shard's member headers are indexed once (optionally cached next to it); a record is then two
seeks and reads, so grain can shuffle globally and resume anywhere (see `common.data.sources`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import os
import re
import tarfile
import zipfile
from collections.abc import Sequence
from typing import SupportsIndex

import numpy as np
from tqdm import tqdm

from common.data.source_utils import (
    Record,
    Unreadable,
    caption_from_json,
    check_index,
    expand_paths,
)
from common.images import MAX_IMAGE_BYTES

log = logging.getLogger("common.data.sources")

# img2dataset's output formats; the first one present is a key's image.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's `base_plus_ext`: the key is the member path up to the first "." of its basename.
_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_NO_CAPTION, _TXT_CAPTION, _JSON_CAPTION = 0, 1, 2




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
        try:
            with np.load(cache) as stored:  # allow_pickle=False: arrays only
                if int(stored["source_size"]) == stat.st_size and int(stored["source_mtime_ns"]) == stat.st_mtime_ns:
                    index = {k: stored[k] for k in ("keys", "image", "caption", "caption_kind")}
                    n = len(index["keys"])
                    found = [index[k].shape for k in ("image", "caption", "caption_kind")]
                    if found != [(n, 2), (n, 2), (n,)]:
                        raise ValueError(f"{n} keys but arrays of shapes {found}")
                    return index
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("Tar index cache %s is damaged (%s: %s); rebuilding it from %s.", cache,
                        type(err).__name__, err, path)
    index = index_tar_shard(path)
    os.makedirs(index_dir, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns, **index)
    tmp = f"{cache}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, cache)
    return index


class TarShardSource:
    """Records {image: bytes, caption: str} of webdataset / img2dataset tar shards, read by member offset.

    Args:
      shards: a directory (every `*.tar` in it), a glob, or a list of shard paths;
        record order is shard order, then member order.
      index_dir: where to cache each shard's member index (None: index at
        every start; indexing reads only tar headers).
      caption_field: the field of `KEY.json` holding the caption, used when a
        key has no `KEY.txt`.
      num_threads: shards indexed in parallel.
      max_member_bytes: a larger image or caption member is not read: the
        field is `Unreadable("image_too_large" / "caption_too_large")`.

    A key without an image member, or a member that cannot be read, has image
    None; one without a readable caption has caption None.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *, index_dir: str | None = None,
                 caption_field: str = "caption", num_threads: int = 8, max_member_bytes: int = MAX_IMAGE_BYTES):
        self.paths = expand_paths(shards, ".tar", "e.g. the output of img2dataset --output_format webdataset")
        self.caption_field, self.max_member_bytes = caption_field, max_member_bytes
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

    def __getitem__(self, index: SupportsIndex) -> Record:
        i = check_index(index, len(self))
        path = self.paths[self._shard[i]]
        (image_offset, image_size), (caption_offset, caption_size) = self._image[i], self._caption[i]
        key = f"{path}:{self._keys[i].decode('utf-8')}"
        data, caption = None, None
        try:
            with open(path, "rb") as f:
                if image_offset >= 0:
                    data = self._member(f, key, "image", image_offset, image_size)
                if caption_offset >= 0:
                    raw = self._member(f, key, "caption", caption_offset, caption_size)
                    if isinstance(raw, Unreadable):
                        caption = raw
                    elif self._caption_kind[i] == _TXT_CAPTION:
                        caption = raw.decode("utf-8", errors="replace")
                    else:
                        caption = caption_from_json(raw, self.caption_field)
        except OSError as err:  # the shard vanished or cannot be read since indexing: a missing record
            log.debug("Cannot read record %d from %s: %s", i, path, err)
        return {"index": i, "key": key, "image": data, "caption": caption}

    def _member(self, f: io.BufferedReader, key: str, field: str, offset: int, size: int) -> bytes | Unreadable:
        if size > self.max_member_bytes:
            return Unreadable(f"{field}_too_large", f"{key}: the {field} member has {size} bytes, more than "
                                                    f"max_member_bytes={self.max_member_bytes}")
        f.seek(offset)
        return f.read(size)
