"""Per-device bytes of sharded state, from shapes alone (nothing is allocated, no devices needed), and
XLA's own accounting of a compiled step.

A pod run is sized before it is paid for: `jax.eval_shape` gives the
logically annotated parameter shapes, `common/sharding.py`'s rules map them
onto an abstract mesh of any size, and each leaf's shard shape gives its
bytes on one device. `compiled_memory` reads what XLA's buffer assignment
reserves on one device for a compiled (SPMD-partitioned) step: its arguments,
outputs, temporaries (the activations and workspaces) and code.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh

from common import sharding


def abstract_mesh(axes: Mapping[str, int] | str, num_devices: int) -> AbstractMesh:
    """A ("data", "fsdp", "tensor") mesh of `num_devices` that exists only as shapes (a preset or sizes)."""
    shape = sharding.resolve_mesh_shape(axes, num_devices)
    return AbstractMesh(tuple(shape[name] for name in sharding.MESH_AXES), sharding.MESH_AXES)


def per_device_bytes(abstract_tree: Any, mesh: AbstractMesh) -> int:
    """Bytes one device holds of `abstract_tree` (eval_shape output, leaves logically boxed or plain)."""
    shardings = jax.tree.leaves(sharding.logical_to_shardings(abstract_tree, mesh))
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_tree))
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for s, x in zip(shardings, leaves))


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes per device of a compiled step, from XLA's memory analysis.

    `peak` = arguments + outputs - aliased (outputs written into donated arguments) + temporaries +
    generated code: what the step needs resident while it runs.
    """
    stats = compiled.memory_analysis()
    out = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
           "generated_code": stats.generated_code_size_in_bytes}
    out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                   + out["generated_code"])
    return out


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# -- host allocator -------------------------------------------------------------------------------------------
HOST_MALLOC_ENV = "CLIP_DALLE_JAX_HOST_MALLOC"  # "system": leave the C allocator's settings as they are
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_host_malloc_tuned: bool | None = None


def tune_host_malloc(threshold_bytes: int = 1 << 30) -> bool:
    """Let glibc keep freed host memory for reuse instead of unmapping it after every step; True when applied.

    XLA's CPU runtime mallocs each execution's temporaries (one block the size of the program's activations)
    and frees them when it returns. glibc serves blocks above its mmap threshold (128 KiB, adapting up to
    32 MiB) with fresh pages from mmap and unmaps them on free, and trims freed memory at the top of its heap
    back to the OS, so every step of a compiled program faults its whole working set in again, page by page
    (the kernel zeroes each one). Raising both thresholds to `threshold_bytes` serves blocks below it from the
    heap and keeps up to that much freed memory mapped: measured on the smoke CLIP training step on 2 CPU
    cores, 46-47 -> 30-33 ms a step. The price is resident memory: up to `threshold_bytes` of freed memory stays
    with the process, as with tcmalloc or jemalloc, which TPU VM guides preload for the same reason.

    Not every block is covered: a block that XLA allocates on one of its worker threads comes from that
    thread's glibc arena, whose heaps hold at most 64 MiB and are unmapped once wholly free, so a large
    temporary block may still fault in every step (seen on the scanned smoke step: 13k faults a step, against
    none with `MALLOC_ARENA_MAX=1`). Setting MALLOC_ARENA_MAX=1 before the process starts puts every thread
    on the main heap, which these thresholds govern.

    The trainer calls this; call it yourself for long inference loops. Process-wide and idempotent; a no-op
    off glibc or with the environment variable CLIP_DALLE_JAX_HOST_MALLOC=system.
    """
    global _host_malloc_tuned
    if _host_malloc_tuned is None:
        _host_malloc_tuned = False
        if os.environ.get(HOST_MALLOC_ENV, "").lower() != "system" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
            except OSError:
                libc = None
            # glibc, not musl: only there do mallopt's thresholds mean this.
            if libc is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                _host_malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
                                          and libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
    return _host_malloc_tuned


def host_malloc_tuned() -> bool:
    """Whether `tune_host_malloc` has applied its settings in this process."""
    return bool(_host_malloc_tuned)
