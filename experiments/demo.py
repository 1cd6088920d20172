"""`make demo`: the most complete end-to-end path the project has, on the built-in shapes data.

    python -m experiments.demo --workdir runs/demo [--steps N] [--examples N]

Stages (each writes into --workdir):
  1. data: render the shapes dataset as webdataset tar shards, plus one shard
     with a corrupt member (training skips and counts it), and save a labelled
     PNG grid.
  2. text: tokenize every caption with the exact CLIP BPE, train the DALL·E
     sentencepiece BPE on the captions and check that every caption round-trips.
  3. CLIP: train the smoke-sized CLIP (experiments/configs/clip_vit_b32.py:smoke)
     on those tar shards with the shared sharded trainer: checkpoints,
     JSONL/TensorBoard metrics, a loss-curve PNG; then zero-shot colour and
     shape accuracy with prompt ensembling and retrieval recall, on a
     validation split and on held-out colour-shape pairs never seen in training.
Results are summarised in `summary.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from common.data import shapes, writers
from common.data.sources import TarShardSource
from common.images import save_image_grid
from common.metrics import configure_logging
from common.tokenizers import clip_bpe
from common.tokenizers.sentencepiece import train_bpe
from experiments import train_clip
from experiments.configs.clip_vit_b32 import get_config

log = logging.getLogger("demo")


def stage_data(workdir: Path, n_train: int, image_size: int) -> tuple[dict, list[str]]:
    """Renders the training split as img2dataset-style shards (plus one corrupt shard); returns its captions."""
    cfg = shapes.ShapesConfig(image_size=image_size)
    train = shapes.ShapesDataset("train", n_train, cfg)
    shard_paths = writers.write_tar_shards(train, workdir / "data" / "train_shards", examples_per_shard=256)
    # One deliberately corrupt shard member: training skips and counts it (clip.data.skipped in the summary).
    bad = workdir / "data" / "train_shards" / "shard-corrupt.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("999999999.png", b"\x89PNG not really"), ("999999999.txt", b"broken"), ("999999999.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    first = [train[i] for i in range(16)]
    save_image_grid(np.stack([e["image"] for e in first]), workdir / "samples.png",
                    labels=[e["caption"] for e in first], ncols=4)
    captions = [record["caption"] for record in TarShardSource(shard_paths)]  # read back from the shards
    return {
        "train_examples": len(captions),
        "heldout_combinations": sorted(f"{c} {s}" for c, s in shapes.heldout_combinations(cfg)),
        "shards": len(shard_paths),
    }, captions


def stage_text(workdir: Path, captions: list[str]) -> dict:
    t0 = time.perf_counter()
    ids = clip_bpe.tokenize(captions, context_length=77)
    clip_seconds = time.perf_counter() - t0
    lengths = (ids != 0).sum(-1)
    sp = train_bpe(captions, workdir / "sentencepiece", vocab_size=400, allow_smaller_vocab=True)
    encoded = sp.encode_batch(captions, length=64)
    roundtrip = sum(sp.decode(row.tolist()) == c for row, c in zip(encoded, captions))
    return {
        "clip_bpe_captions_per_second": len(captions) / clip_seconds,
        "clip_bpe_mean_tokens": float(lengths.mean()),
        "clip_bpe_max_tokens": int(lengths.max()),
        "sentencepiece_vocab": sp.vocab_size,
        "sentencepiece_roundtrip_fraction": roundtrip / len(captions),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--examples", type=int, default=8192, help="training images to render")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the smoke config's)")
    args = parser.parse_args(argv)
    configure_logging()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    summary = {}
    data_summary, captions = stage_data(workdir, args.examples, args.image_size)
    summary["data"] = data_summary
    log.info("data: %s", {k: v for k, v in data_summary.items() if k != "heldout_combinations"})
    summary["text"] = stage_text(workdir, captions)
    log.info("text: %s", summary["text"])
    config = get_config("smoke")
    config.data = dict(source="tar", shards=str(workdir / "data" / "train_shards"), crop_scale=(0.9, 1.0), workers=0)
    if args.steps:
        config.trainer.total_steps = args.steps  # config.optim.total_steps follows
    summary["clip"] = train_clip.run(config, workdir / "clip")
    log.info("clip: %s", summary["clip"])
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"Wrote {workdir}/summary.json, samples.png and clip/ (loss.png, metrics.jsonl, checkpoints/)")
    return summary


if __name__ == "__main__":
    main()
