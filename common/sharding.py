"""Device meshes and the one logical-axis vocabulary of the project.

Model code names the axes of its parameters and activations logically
(`("embed", "mlp")`) through `nn.with_logical_partitioning` and
`nn.with_logical_constraint`; it never names a mesh axis. This module owns the
only table that maps those names onto the three mesh axes:

  data    pure data parallelism: the batch is split, parameters are replicated.
  fsdp    fully sharded data parallelism (ZeRO-3): the batch is split *and*
          parameters / optimizer state are split along their `embed` dimension;
          XLA all-gathers them just in time for each layer.
  tensor  Megatron-style tensor parallelism: `mlp`, `heads`, `vocab`,
          `conv_out` dimensions are split and the batch is replicated.

Because one rules table serves every mesh, data parallel, FSDP and FSDP+TP
are mesh *shapes*, not code paths: an axis of size 1 shards nothing. The
presets below are just named mesh shapes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch, outermost first.
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Order is priority: flax assigns rules top to bottom
# and skips a mesh axis an array already uses, so an activation named
# ("batch", "length", "embed") gets its batch split over data+fsdp and its
# embed dimension left whole, while a weight ("embed", "mlp") is split over
# fsdp x tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("codebook", "fsdp"),
    # Never sharded: small, or a dimension that every device needs whole.
    ("length", None),
    ("head_dim", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("pos", None),
    ("layers", None),
    ("classes", None),
)

# Named mesh shapes; -1 takes whatever devices are left.
PRESETS: dict[str, dict[str, int]] = {
    "data_parallel": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "fsdp_tp": {"data": 1, "fsdp": -1, "tensor": 2},
}


class ShardingError(ValueError):
    """A mesh, batch or sharding that cannot work on the devices at hand."""


def resolve_mesh_shape(axes: Mapping[str, int] | str, num_devices: int) -> dict[str, int]:
    """Turns `{"data": -1, "fsdp": 2}`, "data=-1,fsdp=2" or a preset name into concrete sizes.

    Missing axes get size 1; at most one axis may be -1 and takes the rest.
    """
    if isinstance(axes, str) and "=" in axes:  # "data=2,fsdp=-1": sizes from a command line
        try:
            axes = {name.strip(): int(size) for name, size in (part.split("=") for part in axes.split(","))}
        except ValueError:
            raise ShardingError(f"Could not parse mesh {axes!r}; expected e.g. 'data=2,fsdp=-1,tensor=2'.") from None
    if isinstance(axes, str):
        if axes not in PRESETS:
            raise ShardingError(f"Unknown mesh preset {axes!r}; known presets: {sorted(PRESETS)}.")
        axes = PRESETS[axes]
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    shape = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in shape.items() if size == -1]
    if len(free) > 1:
        raise ShardingError(f"At most one mesh axis may be -1, got {free} in {dict(axes)}.")
    bad = {name: size for name, size in shape.items() if size == 0 or size < -1}
    if bad:
        raise ShardingError(f"Mesh axis sizes must be positive (or -1), got {bad}.")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"Mesh {dict(axes)} needs a device count divisible by {fixed}, "
                f"but there are {num_devices} devices. Change the fixed axis sizes."
            )
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(
            f"Mesh {shape} has {fixed} slots but there are {num_devices} devices. "
            "Make the product of the axis sizes equal the device count, or set one axis to -1."
        )
    return shape


def make_mesh(
    axes: Mapping[str, int] | str = "data_parallel",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh from sizes or a preset name.

    The tensor axis is innermost so that its collectives stay on the fastest
    links (within a host / ICI ring), as MaxText does.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(axes, len(devices))
    sizes = tuple(shape[name] for name in MESH_AXES)
    # Auto axes keep jit's pjit semantics (shardings given at the jit boundary).
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_axis_size(mesh: Mesh) -> int:
    """How many ways the batch is split on `mesh`."""
    return math.prod(mesh.shape[name] for name in BATCH_AXES if name in mesh.shape)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raises a clear error when the global batch can't be split over the mesh."""
    ways = batch_axis_size(mesh)
    if global_batch % ways:
        below = global_batch - global_batch % ways
        options = f"{below} or {below + ways}" if below else f"{ways} or {2 * ways}"
        raise ShardingError(
            f"Global batch {global_batch} does not divide over the mesh's batch axes "
            f"{dict((n, mesh.shape[n]) for n in BATCH_AXES)} ({ways} ways). "
            f"Use a multiple of {ways}, e.g. {options}."
        )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dimension split over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes of size 1, and mesh axes from dimensions they don't divide.

    A 3-channel stem conv or a 50-row attention-pool embedding can't be split
    8 ways; those dimensions stay whole (replicated) rather than failing.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        # Size-1 axes split nothing; leaving them out keeps specs readable.
        names = tuple(n for n in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[n] > 1)
        ways = math.prod(mesh.shape[name] for name in names)
        if not names or dim % ways:
            fitted.append(None)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
    return P(*fitted)


def logical_to_shardings(
    abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
) -> Any:
    """NamedShardings for a pytree whose leaves are logically annotated.

    `abstract_tree` is what `jax.eval_shape(model.init, ...)` returns: leaves
    wrapped in `nn.LogicallyPartitioned` carry names; plain leaves (e.g.
    optimizer step counters, BatchNorm statistics without names) are replicated.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))

    def to_sharding(spec, shape):
        return NamedSharding(mesh, _fit_spec(spec, shape, mesh))

    return jax.tree.map(to_sharding, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def abstract_sharded(
    init_fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> tuple[Any, Any]:
    """(shapes, shardings) of what `init_fn(*args)` would return, nothing allocated.

    Shapes are `jax.eval_shape`'s `jax.ShapeDtypeStruct`s with the logical boxes
    removed; shardings come from the logical rules. Traced outside any mesh
    context (also when called inside `use_mesh`): flax would otherwise
    constrain DenseGeneral kernels in their flattened shape.
    """
    with jax.set_mesh(None):  # unboxing, too, would constrain under a mesh
        abstract = jax.eval_shape(init_fn, *args)
        return nn.meta.unbox(abstract), logical_to_shardings(abstract, mesh, rules)


def init_sharded(
    init_fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` so its outputs are born sharded; returns (tree, shardings).

    Shapes and shardings come from `abstract_sharded` (nothing allocated); the
    jitted init then writes each shard straight onto its device, so a model
    larger than one device's memory can still be created. The logical boxes
    are removed from the result.
    """
    _, shardings = abstract_sharded(init_fn, *args, mesh=mesh, rules=rules)
    with jax.set_mesh(None):  # out_shardings alone place the result (see abstract_sharded)
        tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Iterator[Mesh]:
    """The context a sharded step runs in: the mesh plus the logical rules.

    Inside it, `nn.with_logical_constraint` in model code becomes a real
    sharding constraint on activations.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def shard_batch(host_batch: Any, mesh: Mesh) -> Any:
    """Puts this process's slice of the batch onto the global mesh.

    Each host passes only the rows it loaded; the global batch is the
    concatenation over processes in process order. Every leaf is split on its
    leading dimension over the batch axes.
    """

    def put(x):
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count()
        check_batch_divisible(global_rows, mesh)
        sharding = batch_sharding(mesh, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree.map(put, host_batch)


def initialize_distributed(**kwargs: Any) -> bool:
    """Calls `jax.distributed.initialize()` when the runtime describes a cluster.

    TPU pod slices, SLURM and GKE set the variables jax auto-detects; a local
    multi-process run can pass coordinator_address / num_processes /
    process_id explicitly (or through JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). Returns whether it initialized. Must be
    called before anything touches the devices.
    """
    env = os.environ
    if not kwargs and "JAX_COORDINATOR_ADDRESS" in env:
        kwargs = dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
    auto = any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if not kwargs and not auto:
        return False
    if kwargs.get("num_processes") == 1 and not auto:
        return False
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
