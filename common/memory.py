"""Per-device bytes of sharded state, from shapes alone (nothing is allocated, no devices needed).

A pod run is sized before it is paid for: `jax.eval_shape` gives the
logically annotated parameter shapes, `common/sharding.py`'s rules map them
onto an abstract mesh of any size, and each leaf's shard shape gives its
bytes on one device.
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


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
