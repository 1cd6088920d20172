"""Published peak dense bf16 FLOP/s and memory bandwidth per accelerator, for MFU and bandwidth use.

Sources: NVIDIA A100 / H100 / H200 datasheets (SXM, dense tensor-core bf16, HBM bandwidth);
Google Cloud TPU system-architecture pages (v4, v5e, v5p: bf16 peak per chip, HBM bandwidth).
No CPU entry: a CPU's attainable peak depends on its vector units, clocks and threads, so on a
CPU the benchmarks report achieved FLOP/s and bytes/s without a utilisation.
"""

from __future__ import annotations

# (substring of jax's device_kind, lower case) -> (peak bf16 FLOP/s, HBM bytes/s); first match wins.
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 4.8e12),
    ("h100", 989e12, 3.35e12),
    ("a100-sxm4-80gb", 312e12, 2.039e12),
    ("a100", 312e12, 1.555e12),
    ("tpu v4", 275e12, 1.2e12),
    ("tpu v5 lite", 197e12, 0.819e12),  # v5e
    ("tpu v5e", 197e12, 0.819e12),
    ("tpu v5", 459e12, 2.765e12),  # v5p
)


def peak(device_kind: str) -> tuple[float, float] | None:
    """(bf16 FLOP/s, bytes/s) of one chip of `device_kind`, or None when it is not in the table."""
    kind = device_kind.lower()
    return next(((flops, bandwidth) for key, flops, bandwidth in PEAKS if key in kind), None)
