"""The one measuring harness of `make bench`: paired timings, checked outputs, one results format.

Every benchmark puts ours next to a reference on the same machine, in the same process, with the
same weights and inputs. `compare` calls each once to warm up (compilation is reported apart,
never timed), checks those two outputs agree, then times `repeats` calls of each, the sides taking
turns in blocks, so load from other processes falls on both alike; it reports the median and the
spread (max - min) / median.
Results are written per machine as `<machine>.md` and `<machine>.json`; in the JSON list
`results`, `ratio` = ours / reference in the unit's "more is better" sense (> 1: we are faster).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

# (untimed setup, timed run of its result): e.g. a fresh tokenizer per call, its cache cold.
Staged = tuple[Callable[[], Any], Callable[[Any], Any]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every benchmark sizes itself by."""

    accelerator: bool  # a GPU or TPU: full-size batches and bf16 where a benchmark says so
    repeats: int = 5  # timed calls per side after the warm-up call
    toy: bool = False  # tiny sizes: checks the runner end to end (tests), numbers mean nothing
    peak_flops_per_s: float | None = None  # a CPU's measured attainable fp32 peak (peaks.measure_cpu_peak)

    @property
    def accelerator_sizes(self) -> bool:
        """A GPU or TPU run at full sizes (a toy run keeps the CPU's small models there too)."""
        return self.accelerator and not self.toy

    def cpu_target(self, target: float) -> float | None:
        """`target` for a row whose PyTorch reference runs on the host CPU: issue 12 sets those ratios
        for CPU runs, ours and the reference on the same cores. None on an accelerator, where ours runs
        on the device and the reference still on the CPU (this install's torch is CPU-only)."""
        return None if self.accelerator else target


@dataclasses.dataclass
class Result:
    """One row: throughput of ours and of the reference in `unit` (more is better)."""

    name: str
    unit: str
    ours: float
    reference: float | None
    target: float | None  # the ratio (or, for a reference-free row, the value) asked for; None: none
    ours_spread: float | None = None
    reference_spread: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)  # batch, max_abs_diff, compile_s, ...

    @property
    def ratio(self) -> float | None:
        return None if not self.reference else self.ours / self.reference

    @property
    def met(self) -> bool | None:
        value = self.ratio if self.reference is not None else self.ours
        return None if self.target is None or value is None else value >= self.target

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "ours": self.ours, "reference": self.reference,
                "ratio": self.ratio, "target": self.target, "met": self.met, "ours_spread": self.ours_spread,
                "reference_spread": self.reference_spread, **self.detail}


@dataclasses.dataclass
class Section:
    """One benchmark's rows with the sizes they were measured at."""

    title: str
    setup: str  # one line: model, batch sizes, dtype, repetitions
    results: list[Result]
    notes: list[str] = dataclasses.field(default_factory=list)


def _ready(out: Any) -> Any:
    """Waits for jax arrays (asynchronous dispatch) so the clock covers the work."""
    return jax.block_until_ready(out) if any(isinstance(x, jax.Array) for x in jax.tree.leaves(out)) else out


def _timed(side: Callable[[], Any] | Staged) -> tuple[float, Any]:
    setup, run = side if isinstance(side, tuple) else (None, side)
    arg = setup() if setup else None
    start = time.perf_counter()
    out = _ready(run(arg) if setup else run())
    return time.perf_counter() - start, out


def max_abs_diff(ours: Any, reference: Any, *, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Largest |ours - reference| over matching leaves; raises when they are not allclose."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    if ours.shape != reference.shape:
        raise AssertionError(f"ours has shape {ours.shape}, the reference {reference.shape}; compare like with like")
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=atol, err_msg="ours differs from the reference")
    return float(np.abs(ours.astype(np.float64) - reference).max()) if ours.size else 0.0


def compare(name: str, unit: str, items: float | tuple[float, float], ours: Callable[[], Any] | Staged,
            reference: Callable[[], Any] | Staged | None, *, check: Callable[[Any, Any], float] | None = max_abs_diff,
            target: float | None, repeats: int, block: int | None = None, **detail: Any) -> Result:
    """Throughput (items per second) of `ours` and `reference`, each called with no argument (or staged).

    items: work per call, or (ours, reference) where the two do different amounts. check(ours
    output, reference output) -> max abs diff, raising if they differ; it sees the outputs of the
    warm-up calls (the timed calls repeat them; a training step's later losses depend on its
    optimizer's schedule). None where the outputs cannot match (the caller checks them apart, says so).
    reference None: ours alone (no reference runs on this device).

    The sides take turns in blocks of `block` calls (default repeats // 10, at least 1), so load
    from other processes falls on both alike while a short call seldom starts in the other side's
    wake: torch's OpenMP threads keep spinning for milliseconds after a call and slow whatever
    runs next on the same cores. Measured on 2 cores, the smoke CLIP training step: ours alone
    20.6-20.9 ms, right after each torch step 23-32 ms, in blocks of 6 21.0 ms; torch's 39.6-41.1
    ms alone and 40.3-40.6 ms in blocks. Calls of a second or so lose a few milliseconds at most.
    """
    sides = {"ours": ours} if reference is None else {"ours": ours, "reference": reference}
    first = {side: _timed(fn) for side, fn in sides.items()}
    if check is not None and reference is not None:
        detail["max_abs_diff"] = check(first["ours"][1], first["reference"][1])
    seconds = {side: [] for side in sides}
    block = block or max(1, repeats // 10)
    while len(seconds["ours"]) < repeats:
        calls = min(block, repeats - len(seconds["ours"]))
        for side, fn in sides.items():
            seconds[side] += [_timed(fn)[0] for _ in range(calls)]
    rate, spread = {}, {}
    for side, work in zip(sides, items if isinstance(items, tuple) else (items, items)):
        median = statistics.median(seconds[side])
        rate[side], spread[side] = work / median, (max(seconds[side]) - min(seconds[side])) / median
        detail[f"{side}_first_call_s"] = first[side][0]
    result = Result(name, unit, rate["ours"], rate.get("reference"), target, ours_spread=spread["ours"],
                    reference_spread=spread.get("reference"), detail=detail)
    print(f"  {name:34s} ours {_number(result.ours):>10s}  reference {_number(result.reference):>10s} {unit:16s} "
          f"ratio {_number(result.ratio)}", flush=True)
    return result


def xla_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float | None:
    """FLOPs of one call of the jitted `fn` on `args`, from XLA's cost analysis of the compiled
    program (a loop body counts once); None where the backend gives none."""
    analysis = fn.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def add_roofline(result: Result, flops_per_call: float | None, items_per_call: float, settings: Settings) -> Result:
    """Puts a throughput row against the machine's measured peak FLOP/s (CPU runs).

    Adds to `result.detail`: `flops_per_item` (ours, XLA's count), `ours_flops_per_s`, `ours_peak_fraction`
    and `ceiling`: the ratio ours would show against this reference if it ran the FLOPs it runs now
    at the measured peak. A target above the ceiling takes less work, not faster kernels, on this machine.
    """
    if flops_per_call is None or settings.peak_flops_per_s is None:
        return result
    per_item = flops_per_call / items_per_call
    result.detail.update(flops_per_item=per_item, ours_flops_per_s=result.ours * per_item,
                         ours_peak_fraction=result.ours * per_item / settings.peak_flops_per_s)
    if result.reference:
        result.detail["ceiling"] = settings.peak_flops_per_s / per_item / result.reference
    return result


def cpu_cores() -> int:
    """Cores this process may run on: XLA's CPU thread pool size, and what torch is given."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch  # noqa: PLC0415  (the references' framework: the bench extra)

    device = jax.devices()[0]
    versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
                "torch": torch.__version__}
    return {"backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
            "cpu": _cpu_model(), "cpu_cores": cpu_cores(), "torch_threads": torch.get_num_threads(),
            # Other processes' load skews CPU ratios (torch's spinning threads suffer most): read it with the table.
            "load_average_15min": os.getloadavg()[2] if hasattr(os, "getloadavg") else None,
            "versions": versions}


def machine_name(info: dict[str, Any]) -> str:
    """File-name slug: the accelerator kind (`nvidia-h200`), or `cpu-<cores>core-<arch>`."""
    if info["backend"] == "cpu":
        return f"cpu-{info['cpu_cores']}core-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", info["device_kind"].lower()).strip("-")


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def _roofline_line(r: Result) -> str:
    item = r.unit.split("/")[0].removesuffix("s")
    return (f"{r.name}: {r.detail['flops_per_item'] / 1e9:.3g} GFLOP per {item}, ours "
            f"{r.detail['ours_flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r.detail['ours_peak_fraction']:.0f}% of the "
            "measured peak")


def to_markdown(info: dict[str, Any], sections: list[Section], total_s: float) -> str:
    v = info["versions"]
    lines = [f"# Benchmarks on {machine_name(info)}", "",
             f"{info['backend']} ({info['device_kind']}, {info['devices']} device(s)); CPU {info['cpu']}, "
             f"{info['cpu_cores']} cores, torch threads {info['torch_threads']}, 15-min load average "
             f"{_number(info['load_average_15min'])} at the end; python {v['python']}, jax {v['jax']}, "
             f"torch {v['torch']}. Written by `make bench` in {total_s / 60:.1f} min. Ratio = ours / reference "
             "throughput (> 1: we are faster), same weights and inputs, outputs checked; median of the timed "
             "calls after a warm-up call, spread = (max - min) / median."
             + (f" From the section \"{info['host_malloc_tuned_from']}\" on, both sides run under the host allocator "
                "settings our trainer applies (glibc keeps freed memory mapped: `common.memory.tune_host_malloc`); "
                "the sections before it under glibc's defaults." if info.get("host_malloc_tuned_from") else "")
             + (" On this accelerator the PyTorch references still run on the host CPU (this install's torch is "
                "CPU-only): their ratios compare unlike devices and carry no target; the accelerator's own targets "
                "are the MFU and bandwidth rows." if info["backend"] != "cpu" else ""), "",
             "| benchmark | unit | ours | reference | ratio | target | met | ceiling | spread ours / ref |",
             "|---|---|---:|---:|---:|---:|:-:|---:|---:|"]
    for section in sections:
        for r in section.results:
            target = "" if r.target is None else (f">= {r.target:g}x" if r.reference is not None else f">= {r.target:g}")
            met = {None: "", True: "yes", False: "**no**"}[r.met]
            ratio = "" if r.ratio is None else f"**{r.ratio:.2f}x**"
            spread = "/".join("" if s is None else f"{100 * s:.0f}%" for s in (r.ours_spread, r.reference_spread))
            ceiling = f"{r.detail['ceiling']:.2f}x" if "ceiling" in r.detail else ""
            lines.append(f"| {r.name} | {r.unit} | {_number(r.ours)} | {_number(r.reference)} | {ratio} | {target} | "
                         f"{met} | {ceiling} | {spread} |")
    peak = info.get("measured_peak")
    if peak:
        kernels = ", ".join(f"{name} {flops / 1e9:.0f}" for name, flops in peak["kernels"].items())
        lines += ["", "Ceiling: the ratio ours would reach against the reference running the FLOPs it runs now "
                  "(XLA's cost analysis) at this machine's attainable fp32 peak, "
                  f"{peak['peak_flops_per_s'] / 1e9:.0f} GFLOP/s, the fastest of large dense kernels timed in this run "
                  f"(GFLOP/s: {kernels}; {peak['shapes']}). "
                  "A target above its ceiling needs less work per item, not faster kernels, on this machine."]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.setup]
        lines += [f"- {note}" for note in section.notes]
        lines += [f"- {_roofline_line(r)}" for r in section.results if "flops_per_item" in r.detail]
    return "\n".join(lines) + "\n"


def write_report(out: Path, info: dict[str, Any], sections: list[Section], total_s: float) -> Path:
    """Writes `<machine>.md` and `<machine>.json` under `out`; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / machine_name(info)
    payload = {"machine": machine_name(info), **info, "total_s": total_s,
               "settings": {s.title: {"setup": s.setup, "notes": s.notes} for s in sections},
               "results": [r.to_json() for s in sections for r in s.results]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(info, sections, total_s))
    return stem.with_suffix(".md")
