"""Throughput of our CLIP tokenizer against OpenAI's ``SimpleTokenizer`` on the same captions.

    python -m experiments.bench.tokenizer_bench --out experiments/bench/results [--n 20000]

Both tokenizers start cold (fresh instances, empty caches) in every repeat and tokenize the same
deterministic caption list into (N, 77) ids; the outputs are checked to be identical before any
number is reported. Writes ``tokenizer.json`` and ``tokenizer.md`` under ``--out``.

The reference is openai/CLIP ``clip/simple_tokenizer.py`` loaded by file path (``import clip``
pulls torchvision), with ``clip.tokenize``'s padding and truncation (``clip/clip.py``) mirrored in
numpy by :func:`openai_reference_tokenize`; ``tests/test_clip_bpe.py`` uses the same two helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from common.tokenizers.clip_bpe import DEFAULT_CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, ClipTokenizer


def load_openai_simple_tokenizer() -> ModuleType:
    """The openai-clip package's ``simple_tokenizer`` module, loaded without importing ``clip``."""
    spec = importlib.util.find_spec("clip")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The OpenAI reference tokenizer needs the openai-clip package; install it with "
            "`pip install --no-deps openai-clip==1.0.1` (see the Makefile's test target)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def openai_reference_tokenize(
    tokenizer: Any, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> np.ndarray:
    """``clip.tokenize`` (clip/clip.py) over a reference ``SimpleTokenizer``, as int32 numpy."""
    if isinstance(texts, str):
        texts = [texts]
    sot, eot = tokenizer.encoder[SOT_TOKEN], tokenizer.encoder[EOT_TOKEN]
    all_tokens = [[sot] + tokenizer.encode(text) + [eot] for text in texts]
    result = np.zeros((len(all_tokens), context_length), dtype=np.int32)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {texts[i]} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, : len(tokens)] = tokens
    return result


_ADJECTIVES = (
    "red old small large wooden bright dark happy fluffy modern rusty snowy vintage golden empty busy "
    "tiny colorful abandoned cozy wet ancient shiny sleepy wild elegant"
).split()
_NOUNS = (
    "dog cat car house tree bicycle woman man child bird boat mountain street kitchen guitar horse "
    "train bridge flower cake laptop beach river castle airplane sandwich umbrella clock elephant "
    "pizza giraffe church lighthouse chair window bus sofa teapot owl skateboard tractor"
).split()
_PLACES = "park beach city street forest table field lake room garden market station desert snow".split()
_TEMPLATES = (
    "a photo of a {a} {n}.",
    "A {a} {n} sitting on a {p}",
    "Two {n}s and a {a} {n2} near the {p}.",
    "{N} in the {p} at sunset, {y}",
    "close-up of the {n}'s {a} {n2}",
    "Stock Photo - {a} {n} isolated on white background",
    "IMG_{d}.JPG",
    "{N} & {N2} | {P} {y} | Free Download",
    "there's a {n} and it's {a}!!",
    "Vintage {n} poster ({y}) &amp; frame, 24x36\"",
    "{a} {n} -- {p} #travel #{n2}",
)
_SUFFIXES = ("", "", "", " in the {p}", ", shot on 35mm", " - {y}", " with a {a} {n2}", " (HD wallpaper)")
# Web alt text is mostly ASCII; a minority needs ftfy (accents, scripts, emoji, curly quotes).
_NON_ASCII = (
    "Café au lait in Paris ☕",
    "東京の夜景 night view of Tokyo",
    "Москва зимой: Red Square in winter",
    "São Paulo skyline 🌆",
    "“Best day ever” 😂👍🏽",
    "naïve façade, Zürich",
    "مدينة at dusk",
    "बाज़ार market stall",
    "Crème brûlée – recipe",
    "Family 👨‍👩‍👧 at the beach 🇬🇷",
)


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions drawn with Zipf-like repetition from a pool of ``n // 2`` templated ones."""
    rng = random.Random(seed)

    def one() -> str:
        if rng.random() < 0.08:
            return rng.choice(_NON_ASCII) + rng.choice(("", f" {rng.randint(1, 99)}", " #" + rng.choice(_NOUNS)))
        n, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
        return (rng.choice(_TEMPLATES) + rng.choice(_SUFFIXES)).format(
            a=rng.choice(_ADJECTIVES), n=n, n2=n2, N=n.capitalize(), N2=n2.capitalize(), p=rng.choice(_PLACES),
            P=rng.choice(_PLACES).upper(), y=rng.randint(1950, 2024), d=rng.randint(1000, 9999),
        )

    pool = [one() for _ in range(max(1, n // 2))]
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(pool))]
    return rng.choices(pool, weights=weights, k=n)


def _time_cold(build, run, repeats: int) -> tuple[list[float], list[float], np.ndarray]:
    """(construction seconds, tokenization seconds, ids) over ``repeats`` fresh instances."""
    builds, runs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tokenizer = build()
        builds.append(time.perf_counter() - start)
        start = time.perf_counter()
        ids = run(tokenizer)
        runs.append(time.perf_counter() - start)
    return builds, runs, ids


def _compare(captions: list[str], repeats: int) -> dict[str, Any]:
    """Cold-cache timings of both tokenizers on ``captions``, after checking their ids agree."""
    reference = load_openai_simple_tokenizer()
    ref_build, ref_runs, ref_ids = _time_cold(
        reference.SimpleTokenizer, lambda t: openai_reference_tokenize(t, captions), repeats
    )
    our_build, our_runs, our_ids = _time_cold(ClipTokenizer, lambda t: t.tokenize(captions), repeats)
    if not np.array_equal(ref_ids, our_ids):
        rows = np.flatnonzero((ref_ids != our_ids).any(axis=1))
        raise AssertionError(f"ids differ from the reference on {rows.size} captions, first {captions[rows[0]]!r}")
    n = len(captions)
    ref_s, our_s = statistics.median(ref_runs), statistics.median(our_runs)
    return {
        "n_captions": n,
        "n_distinct": len(set(captions)),
        "openai_simple_tokenizer": {
            "build_s": statistics.median(ref_build), "tokenize_s": ref_s, "captions_per_s": n / ref_s
        },
        "clip_jax": {"build_s": statistics.median(our_build), "tokenize_s": our_s, "captions_per_s": n / our_s},
        "speedup": ref_s / our_s,
    }


def run_benchmark(n: int = 20_000, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Two workloads: ``n`` captions with repeats, and the same captions de-duplicated."""
    captions = make_captions(n, seed)
    return {
        "seed": seed,
        "repeats": repeats,
        "context_length": DEFAULT_CONTEXT_LENGTH,
        "ids_identical": True,  # _compare raises otherwise
        "machine": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "workloads": {
            "with_repeats": _compare(captions, repeats),
            "distinct": _compare(list(dict.fromkeys(captions)), repeats),
        },
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CLIP tokenizer throughput: cold caches (fresh instances), median of {result['repeats']} runs, "
        f"ids checked identical; {result['machine']}.",
        "",
        "| workload | captions (distinct) | tokenizer | build (s) | tokenize (s) | captions/s | speed-up |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for workload, w in result["workloads"].items():
        for name, key in (("OpenAI SimpleTokenizer", "openai_simple_tokenizer"), ("clip_bpe (ours)", "clip_jax")):
            r = w[key]
            speedup = f"**{w['speedup']:.2f}x**" if key == "clip_jax" else "1.00x"
            lines.append(
                f"| {workload} | {w['n_captions']:,} ({w['n_distinct']:,}) | {name} | {r['build_s']:.3f} | "
                f"{r['tokenize_s']:.3f} | {r['captions_per_s']:,.0f} | {speedup} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json and tokenizer.md")
    parser.add_argument("--n", type=int, default=20_000, help="number of captions")
    parser.add_argument("--seed", type=int, default=0, help="caption generator seed")
    parser.add_argument("--repeats", type=int, default=3, help="cold runs per tokenizer; the median is reported")
    args = parser.parse_args(argv)
    result = run_benchmark(args.n, args.seed, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "tokenizer.md").write_text(to_markdown(result))
    print(to_markdown(result), end="")
    return result


if __name__ == "__main__":
    main()
