"""`make bench`: every benchmark against its reference, one results table per machine.

    python -m experiments.bench.run_all --out experiments/bench/results [--only clip_infer dvae]

Detects the device: on a GPU or TPU the benchmarks take accelerator sizes (bf16 training, larger
batches, MFU and bandwidth against `peaks`); on a CPU, sizes that keep the whole run under about
15 minutes on two cores. torch gets as many threads as the cores XLA's CPU client uses. Writes
`<machine>.md` and `<machine>.json` under --out (see `harness`).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import jax
import torch

from experiments.bench import harness

BENCHMARKS = ("tokenizer", "dvae", "clip_infer", "clip_train", "dalle_sample")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/results"))
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS, help="a subset, in run order")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side after the warm-up call")
    parser.add_argument("--toy", action="store_true", help="tiny sizes: checks the runner, the numbers mean nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(harness.cpu_cores())
    settings = harness.Settings(accelerator=jax.default_backend() != "cpu", repeats=args.repeats, toy=args.toy)
    started = time.perf_counter()
    sections = []
    for name in args.only:
        print(f"== {name}", flush=True)
        sections.append(importlib.import_module(f"experiments.bench.{name}_bench").run(settings))
    path = harness.write_report(args.out, harness.machine_info(), sections, time.perf_counter() - started)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
