"""Published peak dense bf16 FLOP/s and memory bandwidth per accelerator, for MFU and bandwidth use.

Sources: NVIDIA A100 / H100 / H200 datasheets (SXM, dense tensor-core bf16, HBM bandwidth);
Google Cloud TPU system-architecture pages (v4, v5e, v5p: bf16 peak per chip, HBM bandwidth).
No CPU entry: a CPU's attainable peak depends on its vector units, clocks and threads, so on a
CPU `measure_cpu_peak` times large dense fp32 kernels in jax and in torch in the same run, and the
fastest of them is the attainable peak the benchmarks' ceilings use (`harness.add_roofline`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.harness import _timed

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


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls (the harness's clock, which waits for jax arrays) after a warm-up."""
    _timed(fn)  # warm-up: compilation, allocation
    return min(_timed(fn)[0] for _ in range(repeats))


def measure_cpu_peak(toy: bool = False, repeats: int = 5) -> dict[str, object]:
    """The attainable fp32 FLOP/s of this machine: the fastest of a large matmul and a large 3x3
    convolution, each in jax and in torch (best of `repeats` timed calls after a warm-up).

    Returns {"peak_flops_per_s": the fastest, "kernels": {name: FLOP/s}}. A roofline ceiling built
    on it is empirical: no kernel either framework has for these shapes beat it in this run.
    """
    import torch  # noqa: PLC0415  (the references' framework: the bench extra)

    n, (b, hw, c) = (256, (1, 16, 32)) if toy else (2048, (8, 56, 256))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    x = rng.standard_normal((b, hw, hw, c), np.float32)
    w = rng.standard_normal((3, 3, c, c), np.float32)
    matmul_flops, conv_flops = 2 * n**3, 2 * b * hw * hw * c * c * 9
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    matmul = jax.jit(jnp.matmul)
    aj, xj, wj = jax.device_put(a), jax.device_put(x), jax.device_put(w)
    at, xt = torch.from_numpy(a), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    with torch.inference_mode():
        seconds = {
            "jax matmul": (matmul_flops, _best_seconds(lambda: matmul(aj, aj), repeats)),
            "torch matmul": (matmul_flops, _best_seconds(lambda: at @ at, repeats)),
            "jax conv3x3": (conv_flops, _best_seconds(lambda: conv(xj, wj), repeats)),
            "torch conv3x3": (conv_flops, _best_seconds(lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
                                                        repeats)),
        }
    kernels = {name: flops / s for name, (flops, s) in seconds.items()}
    return {"peak_flops_per_s": max(kernels.values()), "kernels": kernels,
            "shapes": f"matmul {n}x{n}x{n}; conv3x3 batch {b}, {hw}x{hw}, {c}->{c} channels"}
