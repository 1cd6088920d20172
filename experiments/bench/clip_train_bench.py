"""CLIP training throughput: our trainer under each mesh preset, next to OpenAI's PyTorch CLIP.

    python -m experiments.bench.clip_train_bench --out experiments/bench/results [--steps 30]

The model is the smoke CLIP (experiments/configs/clip_vit_b32.py:smoke: 32px
ViT, 2 layers per tower, 16-token text) on in-memory batches, so the numbers
measure the training step, not the input pipeline. Ours runs through
`common.trainer.Trainer` (jitted step, sharded state) on one device and under
the data_parallel, fsdp and fsdp_tp presets of 8 devices; the reference is
OpenAI's clip/model.py `CLIP` of the same shape with torch.optim.AdamW and the
same symmetric cross-entropy, in this process. Compilation and the first steps
are excluded from the timing. On a CPU host the 8 "devices" are simulated
(XLA_FLAGS) and share the same cores, so the presets show sharding overhead,
not speed-up. Writes clip_train.json and clip_train.md under --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax.train import CLIPTask  # noqa: E402
from common import sharding  # noqa: E402
from common.trainer import Trainer, TrainerConfig  # noqa: E402
from experiments.configs.clip_vit_b32 import get_config  # noqa: E402
from experiments.train_clip import model_config  # noqa: E402


def _batch(cfg, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s, length = cfg.vision.image_size, cfg.text.context_length
    text = rng.integers(1, 49000, (batch_size, length)).astype(np.int32)
    text[np.arange(batch_size), rng.integers(2, length, batch_size)] = 49407  # end-of-text: highest id
    return {"image": rng.standard_normal((batch_size, s, s, 3)).astype(np.float32), "text": text}


def time_ours(config, cfg, batch, preset: str, steps: int, warmup: int, devices) -> float:
    """Examples/s of the trainer's compiled step, host batch placement included."""
    mesh = sharding.make_mesh(preset, devices)
    task = CLIPTask(cfg, mesh=mesh)
    tcfg = TrainerConfig(total_steps=steps, global_batch_size=len(batch["image"]), progress=False)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(task, tcfg, dict(config.optim), workdir, mesh=mesh)
        step = trainer.compiled_train_step(sharding.shard_batch(batch, trainer.mesh))
        state = trainer.state
        with sharding.use_mesh(trainer.mesh):
            for i in range(warmup + steps):
                if i == warmup:
                    jax.block_until_ready(state)
                    t0 = time.perf_counter()
                state, _ = step(state, sharding.shard_batch(batch, trainer.mesh))
            jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
        trainer.state = state
        trainer.close()
    return steps * len(batch["image"]) / seconds


def time_reference(config, cfg, batch, steps: int, warmup: int) -> float:
    import torch  # noqa: PLC0415

    spec = importlib.util.find_spec("clip")
    path = Path(spec.origin).parent / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    ref = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(ref)
    model = ref.CLIP(cfg.embed_dim, cfg.vision.image_size, cfg.vision.layers, cfg.vision.width, cfg.vision.patch_size,
                     cfg.text.context_length, cfg.text.vocab_size, cfg.text.width, cfg.text.heads, cfg.text.layers)
    model.visual = ref.VisionTransformer(cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width,
                                         cfg.vision.layers, cfg.vision.heads, cfg.embed_dim)
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2))
    texts = torch.from_numpy(batch["text"]).long()
    labels = torch.arange(len(images))

    def step():
        logits_per_image, logits_per_text = model(images, texts)
        loss = (torch.nn.functional.cross_entropy(logits_per_image, labels)
                + torch.nn.functional.cross_entropy(logits_per_text, labels)) / 2
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(images) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    config = get_config("smoke")
    cfg = model_config(config.model)
    batch = _batch(cfg, args.batch_size)
    rows = {"pytorch reference (OpenAI clip/model.py, 1 process)": time_reference(config, cfg, batch, args.steps, args.warmup)}
    rows["ours, 1 device"] = time_ours(config, cfg, batch, "data_parallel", args.steps, args.warmup, jax.devices()[:1])
    for preset in ("data_parallel", "fsdp", "fsdp_tp"):
        rows[f"ours, {preset} on {len(jax.devices())} devices"] = time_ours(
            config, cfg, batch, preset, args.steps, args.warmup, None)
    ref = next(iter(rows.values()))
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "model": "smoke CLIP (32px ViT patch 8, width 64, 2+2 layers, context 16)",
        "batch_size": args.batch_size, "steps": args.steps,
        "examples_per_second": rows,
        "ratio_vs_reference": {k: v / ref for k, v in rows.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clip_train.json").write_text(json.dumps(result, indent=2))
    lines = [f"## CLIP training throughput ({result['machine']})", "",
             f"{result['model']}, global batch {args.batch_size}, {args.steps} timed steps.", "",
             "| run | examples/s | vs PyTorch |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / ref:.2f}x |" for k, v in rows.items()]
    (args.out / "clip_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
