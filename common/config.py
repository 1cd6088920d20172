"""Typed settings from experiment configs: one helper for every config dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


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
