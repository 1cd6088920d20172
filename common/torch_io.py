"""Reading PyTorch checkpoint files into numpy without running code from them.

Shared by the CLIP and dVAE weight loaders:

* `load_torch_file`: `torch.save` files through `torch.load(weights_only=True)`, which
  rebuilds tensors and containers only (full unpickling only when a caller passes
  `trust_pickle=True`). When it fails, the file is inspected, never unpickled, to say
  what is wrong: empty, truncated, damaged, not a checkpoint, or pickling Python objects.
* `read_torchscript_state_dict`: TorchScript archives (OpenAI's CLIP releases) without
  `torch.jit.load`, which would run the TorchScript code stored in the archive (a
  module's `__setstate__`, tensor ops such as `torch.from_file` that touch local files).
  The archive is a zip (torch/csrc/jit/serialization/export_module.cpp):
  `<name>/data.pkl` pickles the module tree, each module an object of a class
  `__torch__.<qualified name>` whose state is a dict of its attributes, tensors among
  them; each tensor is `torch._utils._rebuild_tensor_v2` over a storage that is a
  persistent id ("storage", torch.<Type>Storage, key, device, numel) naming the raw
  bytes in `<name>/data/<key>`. A restricted unpickler rebuilds exactly that:
  module classes become inert placeholders that keep their state, tensors become
  numpy arrays, and any other global is refused.
* `load_safetensors`: safetensors files, with errors that name the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

StateDict = dict[str, np.ndarray]

# The largest data.pkl accepted: it holds only the module tree (tensor bytes are separate
# records), so a real one is far smaller.
MAX_PICKLE_BYTES = 64 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch.save's pre-1.6 format (torch/serialization.py)
_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class CheckpointFormatError(ValueError):
    """A file that is not a checkpoint we can read safely: empty, truncated, damaged, or of another kind."""


class PickledObjectsError(CheckpointFormatError):
    """A checkpoint that pickles Python objects beyond tensors: building them could run code from the file."""


def is_tensor(value: Any) -> bool:
    """A torch.Tensor, recognised without importing torch."""
    return hasattr(value, "detach") and hasattr(value, "numpy")


def tensor_to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (or array-like) as a numpy array; bfloat16, which numpy lacks, becomes float32."""
    if is_tensor(value):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def import_torch(path: str | os.PathLike):
    """torch, or an ImportError saying which file needs it and what needs no torch."""
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError as err:  # pragma: no cover - torch is in the test extra
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); safetensors files do not "
                          "(convert it to .safetensors on a machine that has PyTorch).") from err
    return torch


# -- torch.save files -----------------------------------------------------------------------------


def load_torch_file(path: str | os.PathLike, *, if_pickled: str, trust_pickle: bool = False) -> Any:
    """`torch.load` on CPU, `weights_only=True` unless `trust_pickle`; errors name the file and the fault.

    if_pickled: what the user can do when the file pickles Python objects (appended to that error).
    """
    torch = import_torch(path)
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001 - torch raises EOFError, OSError, RuntimeError, UnpicklingError, ...
        raise explain_unreadable(Path(path), err, if_pickled) from err


def explain_unreadable(path: Path, err: Exception, if_pickled: str) -> CheckpointFormatError:
    """Why `torch.load` failed on `path`, found by inspecting the file's bytes and pickle opcodes."""
    if path.stat().st_size == 0:
        return CheckpointFormatError(f"{path} is empty (0 bytes): probably an interrupted download or copy. "
                                     "Fetch the file again.")
    with open(path, "rb") as f:
        head = f.read(4)
    said = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else "(no message)"
    damaged = CheckpointFormatError(f"{path} is truncated or damaged: torch.load failed with {type(err).__name__}: "
                                    f"{said}. Fetch the file again.")
    if head == _ZIP_MAGIC:  # torch.save's format since PyTorch 1.6
        try:
            with zipfile.ZipFile(path) as zf:
                data = _read_entry(zf, _archive_prefix(zf, path) + "data.pkl", MAX_PICKLE_BYTES, path)
            found = _globals_in(pickletools.genops(io.BytesIO(data)))
        except zipfile.BadZipFile:
            return CheckpointFormatError(
                f"{path} is truncated or damaged: it begins like a zip archive (torch.save's format) but its "
                "table of contents, written last, is missing or unreadable. Fetch the file again.")
        except CheckpointFormatError as not_torch:
            return not_torch
        except ValueError:  # genops on a cut or garbled pickle
            return damaged
    elif head[:1] == _PICKLE_PROTO:  # torch.save's legacy format, or a plain pickle
        try:
            with open(path, "rb") as f:
                found, is_torch = _legacy_pickle_globals(f)
        except ValueError:
            return damaged
        if not is_torch:
            if found:
                return PickledObjectsError(_pickled_message(path, found, if_pickled))
            return CheckpointFormatError(f"{path} is a plain Python pickle, not a torch.save checkpoint, and holds "
                                         "no tensors. Save weights with torch.save(state_dict) or as .safetensors.")
    else:
        return CheckpointFormatError(
            f"{path} is not a PyTorch checkpoint: it starts with {head!r}, neither a zip archive (torch.save since "
            "PyTorch 1.6) nor a pickle (older torch.save). Is it the right file, and complete?")
    foreign = [name for name in found if not name.startswith(("torch.", "collections.OrderedDict", "_codecs."))]
    return PickledObjectsError(_pickled_message(path, foreign, if_pickled)) if foreign else damaged


def _pickled_message(path: Path, names: list[str], if_pickled: str) -> str:
    return (f"{path} pickles Python objects beyond tensors (e.g. {', '.join(names[:5])}). Unpickling them could "
            f"run arbitrary code from the file, so it is refused. {if_pickled}")


def _globals_in(ops: Iterable[tuple[Any, Any, Any]]) -> list[str]:
    """The globals ("module.name") that pickle opcodes reference, found without unpickling."""
    names, strings = set(), []
    for opcode, arg, _ in ops:
        if opcode.name in ("GLOBAL", "INST"):
            names.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":  # protocol 4+: module and name were pushed as strings just before
            names.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return sorted(names)


def _legacy_pickle_globals(f: io.BufferedIOBase) -> tuple[list[str], bool]:
    """(globals, whether it is a torch.save file) for a file that starts with a pickle.

    torch.save's legacy format is the pickles magic number, protocol, sys_info and object,
    then raw storage bytes; a plain pickle file is one pickle. `genops` stops at each STOP.
    """
    first = list(pickletools.genops(f))
    if not any(arg == _LEGACY_MAGIC for _, arg, _ in first):
        return _globals_in(first), False
    rest = [op for _ in range(3) for op in pickletools.genops(f)]
    return _globals_in(rest), True


# -- TorchScript archives -------------------------------------------------------------------------


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A zip written by `torch.jit.save` (it holds TorchScript code and constants, unlike `torch.save`'s)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in zf.namelist())


class TorchScriptObject:
    """Stands in for a TorchScript class (`__torch__.*`): keeps what the pickle gives it, runs nothing."""

    qualified_name = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    """torch.<Type>Storage as named in a persistent id: which numpy dtype its bytes hold."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors (as numpy) and placeholder modules; refuses every other global."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path, self._byteorder = zf, prefix, path, byteorder
        self._storages: dict[str, np.ndarray] = {}
        self._classes: dict[str, type] = {}
        self._bytes_left = path.stat().st_size  # stored entries cannot add up to more than the archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (TorchScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointFormatError(
            f"{self._path} is refused: its data.pkl references the global {module}.{name}, which a TorchScript "
            "archive of weights never needs (only tensors, storages and __torch__ module classes are allowed). "
            "The file may be crafted to run code when loaded; do not load it with torch.jit.load or torch.load.")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise CheckpointFormatError(f"{self._path}: data.pkl refers to an unknown persistent object {pid!r}; "
                                        "expected ('storage', torch.<Type>Storage, key, device, numel).")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            nbytes = numel * storage_type.dtype.itemsize
            if nbytes > self._bytes_left:
                raise CheckpointFormatError(f"{self._path}: storage {key} claims {nbytes} bytes, more than the archive "
                                            "holds; the file is damaged or crafted.")
            self._bytes_left -= nbytes
            raw = _read_entry(self._zf, f"{self._prefix}data/{key}", nbytes, self._path)
            if len(raw) != nbytes:
                raise CheckpointFormatError(f"{self._path}: storage {key} holds {len(raw)} bytes, data.pkl says "
                                            f"{numel} x {storage_type.name} ({nbytes} bytes); the file is damaged.")
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            array = np.frombuffer(raw, dtype).astype(storage_type.dtype.newbyteorder("="))
            if storage_type.name == "BFloat16Storage":  # the upper half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            self._storages[key] = array
        return self._storages[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2 as a bounds-checked strided copy of the storage."""
        ints = lambda xs: isinstance(xs, tuple) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
        if not (isinstance(storage, np.ndarray) and isinstance(offset, int) and offset >= 0 and ints(size)
                and ints(stride) and len(size) == len(stride)):
            raise CheckpointFormatError(f"{self._path}: a tensor in data.pkl has malformed metadata "
                                        f"(offset {offset!r}, size {size!r}, stride {stride!r}).")
        if 0 in size:
            return np.zeros(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointFormatError(f"{self._path}: a tensor of size {size} with stride {stride} at offset "
                                        f"{offset} reaches past its storage of {storage.size} elements.")
        view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
        return np.array(view)


def read_torchscript_state_dict(path: str | os.PathLike, *, opt_in: str) -> StateDict:
    """The parameters and buffers of a `torch.jit.save` archive as {dotted name: numpy array}, running nothing.

    Names are dotted attribute paths, as in `torch.jit.load(path).state_dict()` ("visual.conv1.weight");
    besides parameters and buffers they include any other tensor attribute a scripted module keeps
    (a constant mask, say). opt_in: how the caller's user can run the archive's code instead, named
    in the error for modules whose state only their code can interpret.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf, path)
            has_byteorder = prefix + "byteorder" in zf.namelist()  # older archives lack it: little-endian
            byteorder = _read_entry(zf, prefix + "byteorder", 8, path).decode() if has_byteorder else "little"
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{path}: its byteorder record says {byteorder!r}, expected little or big.")
            data = _read_entry(zf, prefix + "data.pkl", MAX_PICKLE_BYTES, path)
            root = _ArchiveUnpickler(data, zf, prefix, path, byteorder).load()
    except CheckpointFormatError:
        raise
    except zipfile.BadZipFile as err:
        raise CheckpointFormatError(f"{path} is a damaged zip archive ({err}). Fetch the file again.") from err
    except Exception as err:  # noqa: BLE001 - a garbled pickle fails in many ways (UnpicklingError, EOFError, ...)
        raise CheckpointFormatError(f"{path}: its data.pkl is damaged ({type(err).__name__}: {err}). "
                                    "Fetch the file again.") from err
    if not isinstance(root, TorchScriptObject):
        raise CheckpointFormatError(f"{path}: expected data.pkl to hold a TorchScript module, found a "
                                    f"{type(root).__name__}.")
    return _module_tensors(root, path, opt_in)


def _module_tensors(root: TorchScriptObject, path: Path, opt_in: str) -> StateDict:
    """{dotted name: array} for every tensor attribute in the module tree."""
    out: StateDict = {}
    stack, seen = [("", root)], set()
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:  # a pickle can make a module its own attribute
            continue
        seen.add(id(module))
        state = getattr(module, "state", None)
        if not isinstance(state, dict):
            raise CheckpointFormatError(
                f"{path}: module {prefix.rstrip('.') or '(root)'} ({module.qualified_name}) keeps its state through "
                "a custom __getstate__/__setstate__, which only its TorchScript code can interpret, and this reader "
                f"runs no code. If you trust the file, load it with {opt_in} (runs the archive's code), or save a "
                "plain state dict with torch.save(model.state_dict()).")
        children = []
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                out[prefix + name] = value
            elif isinstance(value, TorchScriptObject):
                children.append((f"{prefix}{name}.", value))
        stack.extend(reversed(children))
    return out


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The one top-level folder ("model/") every torch zip keeps its records under."""
    roots = {name.split("/", 1)[0] for name in zf.namelist() if "/" in name}
    if len(roots) != 1:
        raise CheckpointFormatError(f"{path} is a zip archive but not a PyTorch one: expected one top-level "
                                    f"folder holding data.pkl, found {sorted(roots)[:5] or 'none'}.")
    return roots.pop() + "/"


def _read_entry(zf: zipfile.ZipFile, name: str, max_bytes: int, path: Path) -> bytes:
    """A zip entry's bytes, refusing one that holds more than `max_bytes` without reading past that."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointFormatError(f"{path} lacks {name}: the archive is incomplete or not a PyTorch "
                                    "checkpoint.") from None
    with zf.open(info) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointFormatError(f"{path}: {name} holds more than the {max_bytes} bytes expected; the file is "
                                    "damaged or crafted.")
    return data


# -- safetensors ----------------------------------------------------------------------------------


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """A .safetensors file as numpy arrays; a damaged file is a CheckpointFormatError naming it."""
    from safetensors.numpy import load_file  # noqa: PLC0415 - safetensors is imported only where used

    try:
        return load_file(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (an Exception)
        size = Path(path).stat().st_size
        raise CheckpointFormatError(f"{path} is not a valid safetensors file ({size} bytes; {err}): it is "
                                    "truncated, damaged or of another format. Fetch the file again.") from err
