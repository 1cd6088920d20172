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

import math
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
