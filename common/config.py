"""Typed settings from experiment configs: config dataclasses and compute dtypes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

T = TypeVar("T")
# What models compute in (DESIGN.md principle 4): float32, or a 16-bit type on accelerators. float64
# needs jax_enable_x64 and is not a supported training precision.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def dataclass_from(cls: type[T], cfg: T | Mapping[str, Any] | Any) -> T:
    """A `cls` from an instance of it, a dict or an `ml_collections.ConfigDict`.

    Missing fields keep their defaults; an unknown field is an error, since it is usually a typo.
    """
    if isinstance(cfg, cls):
        return cfg
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    fields = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {fields}: "
                         "fix the name or remove the field from the experiment config")
    return cls(**values)


def compute_dtype(name: Any, field: str = "config.model.dtype") -> jnp.dtype:
    """The compute dtype `name` (a string such as "bfloat16", or a dtype) names, one of `COMPUTE_DTYPES`."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"{field}={name!r} is not a compute dtype; expected one of {', '.join(COMPUTE_DTYPES)} "
                         "(bfloat16 on TPUs and recent GPUs, float32 on CPUs); set it with "
                         f"--{field}=bfloat16, for example.")
    return dtype
