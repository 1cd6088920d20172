"""What every record source shares: the record type, the two error kinds, index and path checks.

See `common.data.sources` for the record contract; the sources live there and in `tar_shards.py`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, SupportsIndex

log = logging.getLogger("common.data.sources")

Record = dict[str, Any]


class DatasetNotFoundError(FileNotFoundError):
    """The requested data is not where it was looked for."""


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """A record field the source listed but would not read; transforms skip the record, counted by `reason`."""

    reason: str
    detail: str


def warn_outside_root(root: str, paths: Sequence[str], what: str) -> int:
    """Logs once how many of `paths` resolve outside `root`, naming the first; returns that count.

    A path leaves the root through "..", an absolute path, a symlinked
    directory or a symlinked file. Each distinct directory is resolved once and
    each file costs one lstat, so listing a large dataset stays cheap.
    """
    real_root = os.path.realpath(root)
    real_dirs: dict[str, str] = {}
    first, count = None, 0
    for path in paths:
        directory, name = os.path.split(path)
        if directory not in real_dirs:
            real_dirs[directory] = os.path.realpath(directory)
        target = os.path.normpath(os.path.join(real_dirs[directory], name))
        if os.path.islink(target):
            target = os.path.realpath(target)
        if os.path.commonpath([real_root, target]) != real_root:
            first, count = first or (path, target), count + 1
    if count:
        log.warning("%d of the %d %s listed under %s resolve outside it (first: %s -> %s), through '..', an "
                    "absolute path or a symlink. They are read anyway; if that is not intended, fix the listing or "
                    "the links.", count, len(paths), what, root, first[0], first[1])
    return count


def check_index(index: SupportsIndex, length: int) -> int:
    i = int(index)
    if not 0 <= i < length:
        raise IndexError(f"Record index {i} is out of range for a source of {length} records.")
    return i


def caption_from_json(raw: bytes, field: str) -> str | None:
    try:
        value = json.loads(raw.decode("utf-8")).get(field)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def expand_paths(spec: str | os.PathLike | Sequence[str | os.PathLike], ext: str, hint: str) -> list[str]:
    """A directory (every `*{ext}` in it), a glob, one path or a list of paths -> existing files, sorted."""
    if isinstance(spec, (str, os.PathLike)):
        pattern = os.fspath(spec)
        if os.path.isdir(pattern):
            paths = sorted(glob.glob(os.path.join(pattern, f"*{ext}")))
        else:
            paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    else:
        paths = [os.fspath(p) for p in spec]
    missing = [p for p in paths if not os.path.exists(p)]
    special = [p for p in paths if os.path.exists(p) and not os.path.isfile(p)]
    if not paths or missing or special:
        found = ("none" if not paths else f"missing files {missing[:5]}" if missing else
                 f"paths that are not regular files (FIFOs, devices, directories) {special[:5]}")
        raise DatasetNotFoundError(
            f"Expected {ext} files, found {found} for {spec!r}. Pass a directory of {ext} files, a glob such as "
            f"'data/shard-*{ext}', or a list of paths ({hint}).")
    if isinstance(spec, (str, os.PathLike)):  # a directory or glob: its directory is the dataset's root
        root = pattern if os.path.isdir(pattern) else os.path.dirname(pattern)
        while glob.has_magic(root):
            root = os.path.dirname(root)
        warn_outside_root(root or os.curdir, paths, f"{ext} files")
    return paths
