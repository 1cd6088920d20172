"""dVAE training: annealing schedules, loss pieces, codebook metrics, and a short run that learns."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dalle_jax.dvae import DVAE, DVAEConfig, logit_laplace_nll, map_pixels
from dalle_jax.dvae_train import (
    LossConfig,
    codebook_stats,
    dvae_loss,
    kl_to_uniform,
    kl_weight_schedule,
    temperature_schedule,
    train,
)
from experiments.configs.dvae import get_config


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


def test_short_training_run_improves_reconstructions(tmp_path):
    config = get_config("smoke")
    config.num_steps = 150
    config.eval_every = 150
    config.ema_decay = 0.5  # exercises the averaged parameters that evaluation then uses
    history = train(config, tmp_path)
    first, last = history[0], history[-1]
    assert (first["step"], last["step"]) == (0, 150)
    assert last["eval_psnr"] > first["eval_psnr"] + 4.0, history
    assert last["eval_mse"] < first["eval_mse"]
    assert 1.0 <= last["eval_perplexity"] <= config.model.vocab_size
    assert 0 <= last["eval_dead_codes"] < config.model.vocab_size
    for name in ("recon_000000.png", "recon_000150.png", "curves.png", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 6 and all(math.isfinite(r["loss"]) for r in train_records)
    assert train_records[-1]["loss"] < train_records[0]["loss"]
