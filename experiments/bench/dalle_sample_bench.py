"""DALL·E image-token sampling: the KV-cache program against full recomputation per token.

    python -m experiments.bench.dalle_sample_bench --out experiments/bench/results [--batch 4 --iters 3]

A small transformer (width 256, 4 layers, 64 caption tokens, paper's sparse schedule) samples
16 x 16 = 256 and 32 x 32 = 1,024 image tokens. "cached" is `sample_image_tokens` (one compiled
prefill + `fori_loop` over the positions, a key/value cache); "recompute" is the same sampler with
`use_cache=False`, which runs the whole stream for every token. Recomputation costs the same for
every position, so it is timed on the last `--recompute-tokens` positions (an image prompt fills
the rest) and reported per token; the cached time covers the whole image, prefill included. Both
are compiled first (compile time apart), median of `--iters` runs. Before timing, the two are
checked to draw the same tokens. Memory: XLA's compiled temporary bytes of each program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import sample
from dalle_jax.transformer import DALLE
from dalle_jax.variants import DALLEConfig

BASE = DALLEConfig(text_len=64, text_vocab=1024, image_vocab=1024, width=256, layers=4, heads=4, conv_kernel=5)


def _median_seconds(fn, iters: int) -> tuple[float, float, float]:
    """(compile + first call, median, spread max - min) in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), max(times) - min(times)


def _temp_bytes(jitted, *args, **kwargs) -> int | None:
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run_grid(side: int, batch: int, iters: int, recompute_tokens: int) -> dict[str, Any]:
    config = dataclasses.replace(BASE, image_h=side, image_w=side)
    model = DALLE(config)
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(1, config.text_vocab, (batch, config.text_len)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), text, jnp.zeros((batch, config.image_len), jnp.int32))["params"]
    key = jax.random.key(1)
    prompt_len = config.image_len - recompute_tokens
    prompt = jnp.asarray(rng.integers(0, config.image_vocab, (batch, prompt_len)), jnp.int32)
    # Same tokens both ways before anything is timed.
    with_cache = sample.sample_image_tokens(model, params, text, key, prompt=prompt)
    without = sample.sample_image_tokens(model, params, text, key, prompt=prompt, use_cache=False)
    np.testing.assert_array_equal(with_cache, without)

    cached = _median_seconds(lambda: sample.sample_image_tokens(model, params, text, key), iters)
    recompute = _median_seconds(
        lambda: sample.sample_image_tokens(model, params, text, key, prompt=prompt, use_cache=False), iters)
    cached_rate = batch * config.image_len / cached[1]
    recompute_rate = batch * recompute_tokens / recompute[1]
    filters = dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0)
    empty = jnp.zeros((batch, 0), jnp.int32)
    return {
        "image_tokens": config.image_len, "batch": batch,
        "cached_tokens_per_s": cached_rate, "recompute_tokens_per_s": recompute_rate,
        "speedup": cached_rate / recompute_rate,
        "cached_seconds": cached[1], "cached_spread": cached[2], "cached_compile_and_first": cached[0],
        "recompute_seconds_per_token": recompute[1] / recompute_tokens, "recompute_spread": recompute[2],
        "cached_temp_bytes": _temp_bytes(sample._sample_cached, model, params, text, empty, key, **filters),
        "recompute_temp_bytes": _temp_bytes(sample._sample_uncached, model, params, text, prompt, key, **filters),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/bench/results"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--recompute-tokens", type=int, default=8)
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args(argv)
    rows = [run_grid(side, args.batch, args.iters, args.recompute_tokens) for side in args.sides]
    device = jax.devices()[0]
    machine = {"platform": platform.platform(), "device": f"{device.platform} {device.device_kind}",
               "jax": jax.__version__, "config": dataclasses.asdict(BASE)}
    args.out.mkdir(parents=True, exist_ok=True)
    results = [{"name": f"dalle_sample_{r['image_tokens']}", "unit": "image tokens/s", "ours": r["cached_tokens_per_s"],
                "reference": r["recompute_tokens_per_s"], "ratio": r["speedup"],
                "target": 10.0 if r["image_tokens"] >= 1024 else None} for r in rows]
    (args.out / "dalle_sample.json").write_text(json.dumps({"machine": machine, "rows": rows, "results": results},
                                                           indent=2))
    lines = [f"## DALL·E sampling: KV cache vs recomputation ({machine['device']}, jax {jax.__version__})", "",
             "| image tokens | batch | cached tokens/s | recompute tokens/s | speedup | cached temp MiB | "
             "recompute temp MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
        lines.append(f"| {r['image_tokens']} | {r['batch']} | {r['cached_tokens_per_s']:.0f} | "
                     f"{r['recompute_tokens_per_s']:.1f} | {r['speedup']:.1f}x | {mib(r['cached_temp_bytes'])} | "
                     f"{mib(r['recompute_temp_bytes'])} |")
    (args.out / "dalle_sample.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
