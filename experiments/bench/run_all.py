"""`make bench`: every benchmark against its reference, one results table per machine.

    python -m experiments.bench.run_all --out experiments/bench/results [--only clip_infer dvae]

Detects the device: on a GPU or TPU the benchmarks take accelerator sizes (bf16 training, larger
batches, MFU and bandwidth against `peaks`); on a CPU, sizes that keep the whole run under about
15 minutes on two cores, and the machine's attainable fp32 peak measured first, against which the
compute-bound rows get a ceiling (`harness.add_roofline`). torch gets as many threads as the cores
XLA's CPU client uses. Writes
`<machine>.md` and `<machine>.json` under --out (see `harness`).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import jax
import torch

from common import memory
from experiments.bench import harness, peaks

BENCHMARKS = ("tokenizer", "dvae", "clip_infer", "clip_train", "dalle_sample")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/results"))
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS,
                        help="a subset (run in the default's order)")
    parser.add_argument("--repeats", type=int, default=harness.Settings.repeats, help="timed calls per side after the warm-up call")
    parser.add_argument("--toy", action="store_true", help="tiny sizes: checks the runner, the numbers mean nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(harness.cpu_cores())
    accelerator = jax.default_backend() != "cpu"
    started = time.perf_counter()
    # A CPU has no peak table entry: its attainable fp32 FLOP/s is measured here, for the rows' ceilings.
    measured_peak = None if accelerator else peaks.measure_cpu_peak(toy=args.toy)
    settings = harness.Settings(accelerator=accelerator, repeats=args.repeats, toy=args.toy,
                                peak_flops_per_s=measured_peak and measured_peak["peak_flops_per_s"])
    sections, tuned_from = [], None
    # In the canonical order whatever --only says: the inference sections run under glibc's default allocator
    # settings, as a user's inference does, and the training step's trainer then tunes them for the rest of
    # the process (common.memory.tune_host_malloc), for both sides of every later row.
    for name in sorted(args.only, key=BENCHMARKS.index):
        print(f"== {name}", flush=True)
        sections.append(importlib.import_module(f"experiments.bench.{name}_bench").run(settings))
        if tuned_from is None and memory.host_malloc_tuned():
            tuned_from = sections[-1].title
    info = {**harness.machine_info(), "measured_peak": measured_peak, "host_malloc_tuned_from": tuned_from}
    path = harness.write_report(args.out, info, sections, time.perf_counter() - started)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
