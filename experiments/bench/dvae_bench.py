"""Throughput of the full-size dVAE (OpenAI's released sizes) against the `dall-e` PyTorch reference.

    python -m experiments.bench.dvae_bench --out experiments/bench/results [--batch 2 --iters 3]

Both run on the same random-init weights (the reference's, converted with
`dalle_jax.dvae_weights`) and the same batch of 256x256 images, on whatever backend jax picks here
(CPU on a laptop) next to PyTorch on CPU. Encode = images -> argmax codes (including
`map_pixels`); decode = codes -> images (one-hot, decoder, sigmoid, `unmap_pixels`). Ours is jitted
and timed after a warmup call (the compile time is reported separately). Before any number is
written the two implementations' codes and reconstructions are compared. Writes `dvae.json` and
`dvae.md` under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
from dall_e import utils as ref_utils
from dall_e.decoder import Decoder as RefDecoder
from dall_e.encoder import Encoder as RefEncoder

from dalle_jax.api import decode_to_images, encode_to_codes
from dalle_jax.dvae import DVAEConfig
from dalle_jax.dvae_weights import infer_config, params_from_state_dict


def _time(fn: Callable[[], Any], iters: int) -> tuple[float, list[float]]:
    """(seconds of the first, warmup call; seconds of each of `iters` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def run(batch: int, iters: int, image_size: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    enc, dec = RefEncoder(), RefDecoder()  # the released sizes: n_hid 256, vocab 8192
    enc_sd = {k: v.numpy() for k, v in enc.state_dict().items()}
    dec_sd = {k: v.numpy() for k, v in dec.state_dict().items()}
    config = infer_config(enc_sd, dec_sd)
    assert config == DVAEConfig(), config
    enc_params = jax.device_put(params_from_state_dict(enc_sd, config, "encoder"))
    dec_params = jax.device_put(params_from_state_dict(dec_sd, config, "decoder"))

    images = np.random.default_rng(seed).random((batch, image_size, image_size, 3), dtype=np.float32)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    images_j = jax.device_put(images)

    def ref_encode():
        with torch.inference_mode():
            return torch.argmax(enc(ref_utils.map_pixels(images_t)), dim=1)

    codes_t = ref_encode()
    codes_j = jax.device_put(codes_t.numpy().astype(np.int32))

    def ref_decode():
        with torch.inference_mode():
            one_hot = torch.nn.functional.one_hot(codes_t, config.vocab_size).permute(0, 3, 1, 2).float()
            return ref_utils.unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))

    def our_encode():
        return encode_to_codes(enc_params, images_j, config=config).block_until_ready()

    def our_decode():
        return decode_to_images(dec_params, codes_j, config=config).block_until_ready()

    results: dict[str, Any] = {}
    calls = dict(
        reference_encode=ref_encode, ours_encode=our_encode, reference_decode=ref_decode, ours_decode=our_decode
    )
    for name, fn in calls.items():
        first, times = _time(fn, iters)
        median = statistics.median(times)
        results[name] = dict(first_call_s=first, median_s=median, images_per_s=batch / median, times_s=times)
        print(f"{name:18s} {batch / median:8.3f} images/s (median {median:.3f} s, first call {first:.2f} s)")

    agree = float((np.asarray(our_encode()) == codes_t.numpy()).mean())
    rec_diff = float(np.abs(np.asarray(our_decode()) - ref_decode().permute(0, 2, 3, 1).numpy()).max())
    return dict(
        config=dataclasses.asdict(config),
        batch=batch,
        image_size=image_size,
        iters=iters,
        code_agreement=agree,
        reconstruction_max_abs_diff=rec_diff,
        backend=jax.default_backend(),
        devices=str(jax.devices()),
        torch_threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax_version=jax.__version__,
        torch_version=torch.__version__,
        results=results,
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    r = report["results"]
    lines = [
        "# dVAE throughput: ours (JAX, jitted) vs the `dall-e` PyTorch reference",
        "",
        f"Released sizes (n_hid 256, vocab 8192), batch {report['batch']} of "
        f"{report['image_size']}x{report['image_size']} "
        f"images, median of {report['iters']} timed calls after one warmup call. Backend: {report['backend']} "
        f"({report['cpu_count']} CPU cores, torch threads {report['torch_threads']}); jax {report['jax_version']}, "
        f"torch {report['torch_version']}.",
        "",
        "| step | reference images/s | ours images/s | speedup | ours first call (compile) s |",
        "|---|---|---|---|---|",
    ]
    for step in ("encode", "decode"):
        ref, ours = r[f"reference_{step}"], r[f"ours_{step}"]
        lines.append(
            f"| {step} | {ref['images_per_s']:.3f} | {ours['images_per_s']:.3f} | "
            f"{ours['images_per_s'] / ref['images_per_s']:.2f}x | {ours['first_call_s']:.1f} |"
        )
    lines += [
        "",
        f"Same weights and inputs: codes agree on {100 * report['code_agreement']:.2f}% of positions; "
        f"reconstructions differ by at most {report['reconstruction_max_abs_diff']:.2e}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for dvae.json and dvae.md")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--iters", type=int, default=3, help="timed calls after the warmup call")
    parser.add_argument("--image-size", type=int, default=256, help="square image side; a multiple of 8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = run(args.batch, args.iters, args.image_size, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dvae.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "dvae.md")
    print(f"wrote {out / 'dvae.json'} and {out / 'dvae.md'}")


if __name__ == "__main__":
    main()
