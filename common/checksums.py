"""Checksums of arrays that are exact and the same on any mesh (`common.checkpoint` saves one per array).

Each array's raw bits are summed on the devices that hold it, weighted by their position in the global
array, so a restore onto another mesh recomputes and compares the same numbers.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_CHECKSUM_C = 0x9E3779BA  # even (2**32 / golden ratio, rounded to even): position weights C * i + 1 are odd


def array_checksums(tree: Any) -> dict[str, int]:
    """A 32-bit checksum of every array in `tree`, keyed by its dotted path, equal on any mesh.

    Each array's raw bits, read as unsigned 32-bit words w_i (i: the row-major position in the
    global array), give sum_i w_i * (C * i + 1) mod 2**32 with C even: every weight is odd, so a
    change of any one word always changes the sum, and damage to several words goes unnoticed with
    probability about 2**-32. The sum runs on the devices that hold the array, each over its shard,
    and the partial sums meet in an all-reduce; being exact integer arithmetic it is the same
    whatever the mesh or reduction order. A collective under multi-host: every process calls it.
    A replicated array is hashed once, from this process's copy, not on every device that holds it.
    """
    arrays = ocp.tree.to_flat_dict(tree, sep=".")
    copies = {k: x.addressable_data(0) for k, x in arrays.items()
              if isinstance(x, jax.Array) and x.sharding.is_fully_replicated}
    spread = {k: x for k, x in arrays.items() if k not in copies}
    with jax.set_mesh(None):  # arrays carry their shardings; a caller's mesh would refuse the copies
        sums = {**_checksum_tree(copies), **_checksum_tree(spread)}  # (): uint32 each
    return {k: int(np.asarray(v.addressable_data(0))) for k, v in sums.items()}


@jax.jit
def _checksum_tree(tree: Any) -> Any:
    return jax.tree.map(_array_checksum, tree)


def _array_checksum(x: jax.Array) -> jax.Array:
    """uint32 weighted sum of the array's 32-bit words (see `array_checksums`)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = 8 * x.dtype.itemsize
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    if bits > 32:
        words = jax.lax.bitcast_convert_type(words, jnp.uint32)  # (..., bits // 32)
    words = words.astype(jnp.uint32)
    position = jnp.zeros(words.shape, jnp.uint32)  # row-major index in the global array, mod 2**32
    stride = 1
    for dim in reversed(range(words.ndim)):
        position += jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * np.uint32(stride % 2**32)
        stride *= words.shape[dim]
    return jnp.sum(words * (position * np.uint32(_CHECKSUM_C) + np.uint32(1)), dtype=jnp.uint32)
