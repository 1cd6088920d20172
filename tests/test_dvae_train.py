"""dVAE training: annealing schedules, loss pieces, codebook metrics, and runs through the shared trainer
(learning, bitwise resume across a restart, the `experiments.run` command line)."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from common import sharding
from common.data.pipeline import make_pipeline
from common.data.sources import source_from_config
from common.data.shapes import ShapesConfig, ShapesDataset
from common.trainer import Trainer
from dalle_jax.dvae import DVAE, DVAEConfig, logit_laplace_nll, map_pixels
from dalle_jax.dvae_train import (
    DVAETask,
    LossConfig,
    codebook_stats,
    dvae_loss,
    dvae_transform,
    kl_to_uniform,
    kl_weight_schedule,
    temperature_schedule,
)
from experiments.configs.dvae import get_config
from experiments.train_dvae import make_task, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every run below: the smoke recipe at one image per simulated device (steps twice as fast on this
# 2-core CPU), with a parameter average so that its update, use in evaluation and checkpointing run too.
SMOKE_OVERRIDES = {"trainer.global_batch_size": 8, "trainer.ema_decay": 0.5}


def smoke_config(**overrides):
    config = get_config("smoke")
    config.update_from_flattened_dict({**SMOKE_OVERRIDES, **overrides})
    return config


def test_paper_schedules_closed_form():
    cfg = LossConfig()  # appendix A.2: tau 1 -> 1/16 over 150k updates, beta 0 -> 6.6 over 5k, cosine
    tau, beta = temperature_schedule(cfg), kl_weight_schedule(cfg)
    start, end = 1.0, 1.0 / 16
    for step, t in [(0, 0.0), (37_500, 0.25), (75_000, 0.5), (150_000, 1.0), (400_000, 1.0)]:
        expected = end + (start - end) * (1 + math.cos(math.pi * t)) / 2
        assert float(tau(step)) == pytest.approx(expected, rel=1e-6), step
    quarter = 6.6 * (1 - math.cos(math.pi / 4)) / 2
    for step, expected in [(0, 0.0), (1250, quarter), (2500, 3.3), (5000, 6.6), (10**6, 6.6)]:
        assert float(beta(step)) == pytest.approx(expected, rel=1e-6, abs=1e-7), step


def test_exponential_and_linear_schedules():
    exp = temperature_schedule(LossConfig(temperature_schedule="exponential", temperature_steps=100))
    assert [float(exp(s)) for s in (0, 50, 100, 200)] == pytest.approx([1.0, 0.25, 1 / 16, 1 / 16], rel=1e-6)
    lin = kl_weight_schedule(LossConfig(kl_schedule="linear", kl_warmup_steps=10, kl_weight=2.0))
    assert [float(lin(s)) for s in (0, 3, 10, 11)] == pytest.approx([0.0, 0.6, 2.0, 2.0], rel=1e-6)
    with pytest.raises(ValueError, match="cannot start from beta = 0"):
        LossConfig(kl_schedule="exponential")
    with pytest.raises(ValueError, match="schedules"):
        LossConfig(temperature_schedule="step")


def test_kl_to_uniform():
    logits = np.random.default_rng(0).normal(0, 2, (2, 3, 16)).astype(np.float32)
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.sum(q * np.log(q * 16), axis=-1)  # sum_k q_k ln(q_k / (1/16))
    np.testing.assert_allclose(kl_to_uniform(logits), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_to_uniform(np.zeros((4, 16))), 0.0, atol=1e-6)


def test_codebook_stats():
    assert codebook_stats(np.array([5, 5, 0, 0])) == {"perplexity": pytest.approx(2.0), "dead_codes": 2}
    assert codebook_stats(np.array([3, 3, 3, 3]))["perplexity"] == pytest.approx(4.0)


def test_loss_is_scaled_elbo_and_trains_the_encoder():
    """Straight-through mode: the harder case for gradients (the relaxed one trains in the run below)."""
    model = DVAE(DVAEConfig(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8))
    images = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32))
    cfg = LossConfig(kl_warmup_steps=10, temperature_steps=10, straight_through=True)
    step = jnp.asarray(10)  # beta = 6.6, tau = 1/16

    @jax.jit  # one compilation for everything this test needs
    def run(rng):
        params = nn.meta.unbox(model.init({"params": rng, "gumbel": rng}, images, 1.0)["params"])
        loss_fn = functools.partial(dvae_loss, model=model, loss_cfg=cfg)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, rng, step)
        x = map_pixels(images)
        outputs = model.apply({"params": params}, x, 1 / 16, hard=True, rngs={"gumbel": rng})
        return loss, metrics, grads, outputs

    loss, metrics, grads, (logits, stats) = run(jax.random.key(0, impl="rbg"))  # rbg compiles faster on CPU
    nll = logit_laplace_nll(map_pixels(images), stats).sum((1, 2, 3))
    kl = kl_to_uniform(logits).sum((1, 2))
    assert float(loss) == pytest.approx(float(jnp.mean(nll + 6.6 * kl)) / (8 * 8 * 3), rel=1e-4)
    assert float(metrics["kl_weight"]) == pytest.approx(6.6) and float(metrics["temperature"]) == pytest.approx(1 / 16)
    encoder_grad = jnp.abs(grads["encoder"]["group_1_block_1"]["conv_1"]["kernel"]).max()
    assert float(encoder_grad) > 0  # gradients reach the encoder through the relaxed codes


def test_usage_term_adds_the_batch_mean_code_distributions_kl_to_uniform():
    """usage_weight (not in the paper) adds w * KL(mean over batch and positions of q || uniform); 0 adds nothing."""
    model = DVAE(DVAEConfig(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8))
    images = jnp.asarray(np.random.default_rng(1).random((3, 8, 8, 3), dtype=np.float32))
    rng = jax.random.key(0, impl="rbg")
    params = nn.meta.unbox(model.init({"params": rng, "gumbel": rng}, images, 1.0)["params"])
    losses = {w: dvae_loss(params, images, rng, jnp.asarray(0), model=model, loss_cfg=LossConfig(usage_weight=w))
              for w in (0.0, 0.5)}
    logits = np.asarray(model.apply({"params": params}, map_pixels(images), method=DVAE.encode), np.float64)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    mean_q = (q / q.sum(-1, keepdims=True)).reshape(-1, 16).mean(0)  # (16,) over 3 images x 4 x 4 positions
    usage_kl = float(np.sum(mean_q * np.log(mean_q * 16)))
    assert usage_kl > 1e-3  # a random encoder's codes are not spread evenly: the term is not trivially 0
    assert float(losses[0.5][0]) == pytest.approx(float(losses[0.0][0]) + 0.5 * usage_kl, rel=1e-5)
    for _, metrics in losses.values():
        assert float(metrics["usage_perplexity"]) == pytest.approx(16 * math.exp(-usage_kl), rel=1e-5)
    with pytest.raises(ValueError, match="usage_weight >= 0"):
        LossConfig(usage_weight=-0.1)


def test_task_schedules_follow_the_update_count():
    """The trainer hands the loss its count of optimizer updates (common/trainer.py: under gradient
    accumulation several steps share one); the annealing schedules follow it."""
    model = DVAE(DVAEConfig(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8))
    cfg = LossConfig(temperature_steps=4, kl_warmup_steps=4)
    task = DVAETask(model, cfg, image_size=8)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)}

    @jax.jit
    def run(rng):
        params = nn.meta.unbox(task.init(rng))["params"]
        return task.loss(params, {}, batch, rng, jnp.asarray(2))

    _, metrics, new_state = run(jax.random.key(0, impl="rbg"))
    assert new_state is None
    assert float(metrics["temperature"]) == pytest.approx(float(temperature_schedule(cfg)(2)), rel=1e-6)
    assert float(metrics["kl_weight"]) == pytest.approx(float(kl_weight_schedule(cfg)(2)), rel=1e-6)


def test_batches_hold_the_exact_source_pixels():
    """The dVAE sees the source's uint8 pixels, with no caption needed."""
    config = get_config("smoke")
    batches = make_pipeline(source_from_config(config.eval_data), dvae_transform(config.image_size, train=False),
                            global_batch_size=16, train=False, num_epochs=1)
    dataset = ShapesDataset("validation", 64, ShapesConfig(image_size=config.image_size))
    for start in (0, 16):
        images = next(batches)["image"]
        expected = np.stack([dataset[i]["image"] for i in range(start, start + 16)])
        assert images.dtype == np.uint8
        np.testing.assert_array_equal(images, expected)
    assert batches.get_state()["batches"] == 2


def test_training_through_the_trainer_improves_reconstructions(tmp_path):
    untrained = train(smoke_config(**{"trainer.total_steps": 0}), tmp_path / "untrained")["eval"]
    config = smoke_config(**{"trainer.total_steps": 120, "trainer.eval_every": 60})
    summary = train(config, tmp_path / "run")
    ev, vocab = summary["eval"], config.model.vocab_size
    assert summary["steps"] == 120 and summary["nonfinite_steps"] == 0 and not summary["preempted"]
    assert ev["psnr"] > untrained["psnr"] + 4.0, (untrained, ev)
    assert ev["mse"] < untrained["mse"]
    assert 1.0 <= ev["perplexity"] <= vocab and 0 <= ev["dead_codes"] < vocab
    for name in ("reconstructions.png", "curves.png", "loss.png", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert [r["step"] for r in records if "eval/psnr" in r] == [60, 120]


def _final_state(config, workdir):
    trainer = Trainer(make_task(config), config.trainer, config.optim, workdir,
                      mesh=sharding.make_mesh(config.trainer.mesh))
    assert trainer.restore_if_any(None) == config.trainer.total_steps
    state = jax.device_get(trainer.state)
    trainer.close()
    return state


def test_command_line_run_resumes_bitwise(tmp_path):
    """`experiments.run` trains 5 steps and exits; the same config with 8 steps resumes from its
    checkpoint (train state, data position) and ends bitwise where an uninterrupted 8-step run does."""
    overrides = {**SMOKE_OVERRIDES, "trainer.total_steps": 5, "trainer.log_every": 1}
    cmd = [sys.executable, "-m", "experiments.run", "--config", "experiments/configs/dvae.py:smoke",
           "--workdir", str(tmp_path / "resumed"), *(f"--config.{k}={v}" for k, v in overrides.items())]
    config = smoke_config(**{**overrides, "trainer.total_steps": 8})
    straight = train(config, tmp_path / "straight")  # first: it fills the compilation cache

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert first["steps"] == 5 and first["eval"]["psnr"] > 0
    assert (tmp_path / "resumed" / "reconstructions.png").is_file()

    resumed = train(config, tmp_path / "resumed")
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # 6..8 continued, not retrained
    assert resumed["eval"] == straight["eval"] and resumed["final_loss"] == straight["final_loss"]
    assert resumed["data"] == straight["data"] and straight["data"]["batches"] == 8
    a, b = _final_state(config, tmp_path / "straight"), _final_state(config, tmp_path / "resumed")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert int(a.step) == 8 and a.ema_params is not None  # the averaged parameters are checkpointed too
    ema, params = a.ema_params["decoder"]["output"]["kernel"], a.params["decoder"]["output"]["kernel"]
    assert not np.array_equal(ema, params)


def test_smoke_recipe_trains_from_an_image_only_folder(tmp_path):
    """No captions anywhere: the dVAE reads images only, so nothing is skipped for a missing caption."""
    dataset = ShapesDataset("train", 40, ShapesConfig(image_size=32))
    for i in range(len(dataset)):
        Image.fromarray(dataset[i]["image"]).save(tmp_path / f"{i:03d}.png")
    assert not any(p.suffix in (".tsv", ".jsonl") for p in tmp_path.iterdir())
    config = smoke_config(**{"trainer.total_steps": 6, "trainer.eval_every": 0})
    config.data = {"source": "folder", "root": str(tmp_path), "workers": 0}
    config.eval_data = {"source": "folder", "root": str(tmp_path), "workers": 0}
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 6 and summary["data"]["skipped_total"] == 0
    assert summary["data"]["examples"] == 6 * 8 and np.isfinite(summary["eval"]["psnr"])
