"""`make bench`: runs every benchmark in experiments/bench and writes their tables to --out.

Each benchmark module exposes `main(argv)` taking `--out DIR`, measures ours
against the reference in the same process, and writes `<name>.json` and
`<name>.md`. This runner also collects the Markdown tables into `README.md`
under --out.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

BENCHMARKS = ("tokenizer_bench", "dvae_bench", "clip_train_bench", "dalle_sample_bench")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/results"))
    parser.add_argument("--only", nargs="*", default=None, help="subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        importlib.import_module(f"experiments.bench.{name}").main(["--out", str(args.out)])
    tables = sorted(p for p in args.out.glob("*.md") if p.name != "README.md")
    (args.out / "README.md").write_text(
        "# Benchmark results\n\nWritten by `make bench`; each table names its machine.\n\n"
        + "\n\n".join(p.read_text().strip() for p in tables) + "\n"
    )


if __name__ == "__main__":
    main()
