"""Text to images: sample N candidates per caption, decode them with the dVAE, keep the k CLIP likes best.

    python -m dalle_jax.generate --checkpoint runs/dalle --prompt "a red circle." --n 64 --keep 8 \\
        [--clip /ckpts/ViT-B-32.pt] --out grid.png

`--checkpoint` is a DALL·E training workdir (experiments/train_dalle.py): its `run.json` records
the model, the caption tokenizer and the dVAE run whose codes it learned, and its checkpoints
hold the weights (the parameter average when the run kept one). Without `--clip` the first k
candidates are kept (a random choice). Writes the captioned PNG grid and, beside it, a JSON of
the CLIP scores of every candidate and of the kept ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import clip_jax
from common import sharding
from common.images import save_image_grid
from common.metrics import configure_logging
from common.tokenizers.sentencepiece import SentencePieceTokenizer
from common.trainer import restore_eval_params
from dalle_jax.api import decode_to_images
from dalle_jax.dvae import DVAE, DVAEConfig
from dalle_jax.dvae_train import DVAETask, LossConfig
from dalle_jax.rerank import clip_scores
from dalle_jax.sample import sample_image_tokens
from dalle_jax.train import DALLETask
from dalle_jax.variants import DALLEConfig

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class TrainedDALLE:
    """What generation needs from a training run: the transformer, its tokenizer and the dVAE decoder."""

    task: DALLETask
    params: Any
    tokenizer: SentencePieceTokenizer
    dvae_config: DVAEConfig
    dvae_decoder: Any


def load_run(workdir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> TrainedDALLE:
    """Restores what `run.json` in a DALL·E training workdir records (experiments/train_dalle.py)."""
    workdir = Path(workdir)
    path = workdir / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --checkpoint must be a DALL·E training workdir "
                                "(python -m experiments.run --config experiments/configs/dalle.py ...).")
    try:
        run = json.loads(path.read_text())
        model, dvae_run = DALLEConfig(**run["model"]), run["dvae"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a DALL·E run record: {err}") from None
    mesh = mesh or sharding.make_mesh("data_parallel")
    params = restore_eval_params(DALLETask(model), run, workdir, mesh)
    dvae_config = DVAEConfig(**dvae_run["model"])
    dvae_task = DVAETask(DVAE(dvae_config), LossConfig(**dvae_run["loss"]), image_size=dvae_run["image_size"])
    dvae_params = restore_eval_params(dvae_task, dvae_run, dvae_run["workdir"], mesh)
    return TrainedDALLE(DALLETask(model), params, SentencePieceTokenizer.load(run["tokenizer"]), dvae_config,
                        dvae_params["decoder"])


def generate(trained: TrainedDALLE, captions: Sequence[str], *, n: int = 512, keep: int = 32, clip: Any = None,
             seed: int = 0, batch_size: int = 64, **sampling: Any) -> dict[str, Any]:
    """Per caption, `n` sampled images, of which the `keep` best by CLIP (else the first `keep`).

    Returns {"images": float32 (C, keep, H, W, 3) in [0, 1], "kept": int (C, keep) candidate
    indices, "scores": (C, n) CLIP scores or None}. `sampling`: temperature, top_k, top_p,
    guidance_scale (dalle_jax.sample). Candidates are drawn `batch_size` at a time, each batch
    with its own key, so the result depends only on `seed`.
    """
    if not captions or not 1 <= keep <= n or batch_size < 1:
        raise ValueError(f"Expected captions, 1 <= keep <= n and batch_size >= 1, found {len(captions)} captions, "
                         f"keep={keep}, n={n}, batch_size={batch_size}.")
    cfg = trained.task.config
    text = trained.tokenizer.encode_batch(list(captions), cfg.text_len, truncate=True)  # (C, T)
    rng = jax.random.key(seed)
    images, kept, scores = [], [], []
    for c, row in enumerate(text):
        codes = []
        for start in range(0, n, batch_size):
            rows = jnp.asarray(np.repeat(row[None], min(batch_size, n - start), axis=0))
            key = jax.random.fold_in(jax.random.fold_in(rng, c), start)
            codes.append(sample_image_tokens(trained.task.model, trained.params, rows, key, **sampling))
        codes = jnp.concatenate(codes).reshape(n, cfg.image_h, cfg.image_w)
        candidates = decode_to_images(trained.dvae_decoder, codes, config=trained.dvae_config)  # (n, H, W, 3)
        if clip is None:
            order = np.arange(keep)
        else:
            score = clip_scores(clip, candidates[None], clip.tokenize([captions[c]], truncate=True))[0]  # (n,)
            scores.append(np.asarray(score))
            order = np.argsort(-scores[-1], kind="stable")[:keep]
        kept.append(order)
        images.append(np.asarray(candidates)[order])
    return {"images": np.stack(images), "kept": np.stack(kept), "scores": np.stack(scores) if scores else None}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a DALL·E training workdir")
    parser.add_argument("--prompt", action="append", required=True, help="a caption (repeat for several)")
    parser.add_argument("--clip", help="CLIP weights for reranking (anything clip_jax.load reads)")
    parser.add_argument("--n", type=int, default=64, help="candidates per caption")
    parser.add_argument("--keep", type=int, default=8, help="candidates kept per caption")
    parser.add_argument("--out", default="generated.png", help="PNG grid; the scores go beside it as .json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.n < 1 or not 1 <= args.keep <= args.n or args.batch_size < 1:
        parser.error("expected --n >= 1, 1 <= --keep <= --n and --batch-size >= 1")
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a directory; give the PNG file to write")
    configure_logging()
    trained = load_run(args.checkpoint)
    clip = clip_jax.load(args.clip) if args.clip else None
    result = generate(trained, args.prompt, n=args.n, keep=args.keep, clip=clip, seed=args.seed,
                      batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      guidance_scale=args.guidance_scale)
    images = result["images"].reshape(-1, *result["images"].shape[2:])
    labels = [p for p in args.prompt for _ in range(args.keep)]
    save_image_grid(images, args.out, labels=labels, ncols=args.keep)
    report = {"prompts": args.prompt, "n": args.n, "keep": args.keep, "kept": result["kept"].tolist()}
    if result["scores"] is not None:
        scores = result["scores"]
        kept_scores = np.take_along_axis(scores, result["kept"], axis=1)
        report.update(scores=scores.tolist(), kept_mean_score=float(kept_scores.mean()),
                      all_mean_score=float(scores.mean()))
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "scores"}, indent=2))
    return report


if __name__ == "__main__":
    main()
