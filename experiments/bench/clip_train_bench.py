"""CLIP training step: examples/s of our trainer next to OpenAI's PyTorch CLIP, and MFU.

Ours is `common.trainer.Trainer`'s compiled step (host batch placement included) on one device;
the reference is OpenAI's clip/model.py `CLIP` of the same shape, loaded with our initial
weights (`clip_jax.convert`), with torch.optim.AdamW and the same symmetric cross-entropy. The
first step's losses (same weights, same batch) are checked equal. FLOPs per step come from XLA's
cost analysis of the compiled step; model FLOPs utilisation is reported against the device's bf16
peak where `peaks` knows it (an accelerator), achieved FLOP/s otherwise. On a CPU the model is the
smoke CLIP (experiments/configs/clip_vit_b32.py:smoke); on an accelerator ViT-B/16 in bf16 at a
full-size per-chip batch, where the PyTorch reference (CPU-only here) is left out.
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np
import torch
from flax import linen as nn

from clip_jax import convert
from common import sharding
from common.trainer import Trainer, TrainerConfig
from experiments.bench import peaks
from experiments.bench.harness import Result, Section, Settings, add_roofline, compare, max_abs_diff, xla_flops
from experiments.bench.references import openai_clip
from experiments.configs.clip_vit_b16 import get_config as vit_b16_config
from experiments.configs.clip_vit_b32 import get_config as vit_b32_config
from experiments.train_clip import make_task, model_config

TARGET = 1.3  # issue 12: the CLIP training step >= 1.3x the PyTorch reference on CPU
TARGET_MFU = 50.0  # issue 12: ViT-B/16 bf16 training at >= 50 % MFU on an accelerator
STEPS_PER_CALL = 1  # one step per timed call: the warm-up call's loss is the one compared


def _batch(cfg, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s, length = cfg.vision.image_size, cfg.text.context_length
    text = rng.integers(1, 49000, (batch_size, length)).astype(np.int32)
    text[np.arange(batch_size), rng.integers(2, length, batch_size)] = 49407  # end-of-text: highest id
    return {"image": rng.standard_normal((batch_size, s, s, 3)).astype(np.float32), "text": text}


def _reference_step(config, cfg, variables, batch):
    """OpenAI's CLIP holding `variables`, and a step running AdamW on it -> the step's loss before the update."""
    model = openai_clip(cfg).train()
    state = convert.openai_state_dict_from_params(convert.from_scanned(variables), cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    o = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
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
        return loss.item()

    return step


def _trainer_step(config, batch: dict, workdir: str, count_flops: bool):
    """(trainer, compiled step, XLA's FLOPs per step or None) of `config` on one device."""
    mesh = sharding.make_mesh("data_parallel", jax.devices()[:1])
    batch_size = len(batch["text"])
    tcfg = TrainerConfig(total_steps=10_000, global_batch_size=batch_size, progress=False)
    trainer = Trainer(make_task(config, mesh), tcfg, dict(config.optim), workdir, mesh=mesh)
    step = trainer.compiled_train_step(sharding.shard_batch(batch, mesh))
    flops = xla_flops(step, trainer.state, sharding.shard_batch(batch, mesh)) if count_flops else None
    return trainer, step, mesh, flops


def _measure(name: str, config, batch: dict, reference_factory, flops: float | None, target: float | None,
             repeats: int) -> tuple[Result, float]:
    """One row: our compiled training step (host batch placement included) against the reference's.
    flops: the work per step where it is known already (XLA's count of the same work unrolled); None: this
    program's count (a compilation more). Returns the row and the FLOPs per step."""
    cfg = model_config(config.model)
    batch_size = len(batch["text"])
    with tempfile.TemporaryDirectory() as workdir:
        trainer, step, mesh, own_flops = _trainer_step(config, batch, workdir, count_flops=flops is None)
        flops = flops or own_flops
        variables = jax.device_get({"params": nn.meta.unbox(trainer.state.params)})
        state = trainer.state

        def ours():
            nonlocal state
            with sharding.use_mesh(mesh):
                state, metrics = step(state, sharding.shard_batch(batch, mesh))
            return metrics["loss"]

        reference = None if reference_factory is None else reference_factory(config, cfg, variables, batch)
        row = compare(name, "examples/s", batch_size, ours, reference,
                      check=lambda o, r: max_abs_diff(float(o), r, rtol=1e-4, atol=1e-4),
                      target=None if reference is None else target, repeats=repeats, batch=batch_size,
                      scan_layers=bool(config.model.scan_layers), flops_per_step=flops)
        trainer.close()
    return row, flops


def run(settings: Settings) -> Section:
    if settings.toy:  # the runner's paths at smoke size, an accelerator's included (bf16, no reference, MFU)
        config, batch_size = vit_b32_config("smoke"), 8
        if settings.accelerator:
            config.model.dtype = "bfloat16"
    elif settings.accelerator:
        config, batch_size = vit_b16_config(""), 256
    else:
        config, batch_size = vit_b32_config("smoke"), 64
    cfg = model_config(config.model)
    batch = _batch(cfg, batch_size)
    # A step takes milliseconds on the smoke model: many, for a stable median (toy runs check the paths).
    repeats = settings.repeats if settings.toy else max(settings.repeats, 60)
    # XLA's cost analysis counts a loop body once, so the FLOPs of a scanned layer stack would be
    # those of one layer: the count (and MFU) comes from the unrolled program, whose work is the same.
    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan_layers = False
    # The reference runs only where torch has the device (this install's torch is CPU-only).
    reference = None if settings.accelerator else _reference_step
    row, flops = _measure("CLIP train step", unrolled, batch, reference, None, TARGET, repeats)
    rows = [row]
    if config.model.scan_layers:  # the recipe's default layout: one compiled block for the whole stack
        scanned, _ = _measure("CLIP train step, scanned layers", config, batch, reference, flops, None, repeats)
        rows.append(scanned)
    achieved = flops * row.ours / batch_size  # FLOP/s
    row.detail["achieved_flops_per_s"] = achieved
    for r in rows:  # the same work per step either way: the unrolled program's count
        add_roofline(r, flops, batch_size, settings)
    results = list(rows)
    device_peak = peaks.peak(jax.devices()[0].device_kind)
    if device_peak is not None:
        results.append(Result("CLIP train step MFU", "% of bf16 peak", 100 * achieved / device_peak[0], None,
                              TARGET_MFU, detail={"achieved_flops_per_s": achieved, "peak_flops_per_s": device_peak[0]}))
    model = (f"{config.model.variant} {config.model.dtype}" if settings.accelerator_sizes else
             "smoke CLIP (32px ViT patch 8, width 64, 2+2 layers, context 16), "
             + ("fp32" if config.model.dtype == "float32" else config.model.dtype))
    return Section("CLIP training step", f"{model}, batch {batch_size} on one device, {repeats} timed steps; first-step "
                   "losses checked equal on the same initial weights. The first row unrolls the layer stacks "
                   "(`model.scan_layers=False`), the second scans them as the recipes do by default (faster "
                   "compiles for deep stacks; the loop runs all blocks but the last, which runs at the pooled rows "
                   "alone as unrolled).",
                   results,
                   # On a CPU the rows' roofline lines give the achieved FLOP/s against the measured peak.
                   [f"XLA cost analysis of the unrolled step: {flops / 1e9:.2f} GFLOP per step"
                    + ("" if settings.peak_flops_per_s else f", {achieved / 1e9:.1f} GFLOP/s achieved"
                       + ("" if device_peak else " (no peak table entry for this device, so no MFU)"))])
