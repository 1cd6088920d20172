"""CLIP training through the shared trainer: presets agree, smoke runs learn, the CLI works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from clip_jax.train import CLIPTask
from common import sharding
from common.data import shapes, writers
from common.trainer import Trainer, TrainerConfig
from experiments.configs.clip_vit_b32 import get_config
from experiments.train_clip import make_pipeline, model_config, run

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ml_collections.ConfigDict(dict(
    variant="ViT-B/32", embed_dim=32,
    vision=dict(image_size=16, patch_size=8, width=32, layers=1, heads=2),
    text=dict(width=32, layers=1, heads=2, context_length=16)))
SHAPES_DATA = ml_collections.ConfigDict(dict(source="shapes", split="train", num_examples=512, render_size=16))
OPTIM = {"learning_rate": 1e-3, "warmup_steps": 1, "total_steps": 5, "weight_decay": 0.1}


def _curve(tmp_path, mesh, loss="softmax", devices=None):
    mesh = sharding.make_mesh(mesh, devices)
    task = CLIPTask(model_config(TINY_MODEL), loss=loss, mesh=mesh)
    tcfg = TrainerConfig(total_steps=5, global_batch_size=16, log_every=1, checkpoint_every=5, progress=False)
    trainer = Trainer(task, tcfg, OPTIM, tmp_path, mesh=mesh)
    data = make_pipeline(SHAPES_DATA, global_batch_size=16, image_size=16, context_length=16, seed=0)
    res = trainer.fit(data)
    trainer.close()
    kernel = res.state.params["text"]["token_embedding"]["embedding"]  # (vocab, embed)
    return [h["loss"] for h in res.history], np.asarray(jax.device_get(kernel)), kernel.sharding


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_presets_follow_the_single_device_loss_curve(tmp_path, loss):
    single, kernel, _ = _curve(tmp_path / "single", "data_parallel", loss, devices=jax.devices()[:1])
    assert single[-1] < single[0]
    for preset in ("data_parallel", "fsdp", "fsdp_tp"):
        curve, k, sharding = _curve(tmp_path / preset, preset, loss)
        np.testing.assert_allclose(curve, single, rtol=1e-4, err_msg=preset)
        np.testing.assert_allclose(k, kernel, rtol=1e-4, atol=1e-6, err_msg=preset)
        if preset != "data_parallel":  # parameters really are split
            assert any(axis is not None for axis in sharding.spec), (preset, sharding.spec)


def test_smoke_run_on_tar_shards_learns(tmp_path):
    ds = shapes.ShapesDataset("train", 2048, shapes.ShapesConfig(image_size=32))
    writers.write_tar_shards(ds, tmp_path / "shards", examples_per_shard=512)
    config = get_config("smoke")  # the smoke model itself: 32px ViT, 2 layers per tower
    config.trainer.update(total_steps=200, global_batch_size=32, log_every=10, checkpoint_every=100, progress=False)
    config.optim.update(warmup_steps=20, learning_rate=4e-3)
    config.data = ml_collections.ConfigDict(dict(source="tar", shards=str(tmp_path / "shards"), crop_scale=(0.9, 1.0), workers=0))
    config.zeroshot_shapes.num_examples = 128
    config.zeroshot_shapes.splits = ("validation",)
    summary = run(config, tmp_path / "run")
    assert summary["final_loss"] < 0.8 * summary["first_loss"], summary
    assert summary["data"]["skipped_total"] == 0
    # Colour is the easiest concept: zero-shot (unseen prompt wording) beats the 1/12 chance twice over.
    assert summary["shapes_validation"]["zeroshot_color_top1"] > 2 / 12, (summary["final_loss"], summary["shapes_validation"])
    assert (tmp_path / "run" / "loss.png").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 200


def test_cli_with_overrides_and_resume(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "experiments.run", "--config", "experiments/configs/clip_vit_b32.py:smoke",
            "--workdir", str(tmp_path), "--config.model.vision.layers=1", "--config.model.text.layers=1",
            "--config.trainer.global_batch_size=8", "--config.trainer.checkpoint_every=5",
            "--config.trainer.progress=False", "--config.zeroshot_shapes.num_examples=16",
            "--config.data.num_examples=64", "--config.optim.warmup_steps=2"]

    def launch(steps):
        out = subprocess.run(base + [f"--config.trainer.total_steps={steps}"],  # optim.total_steps follows
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads((tmp_path / "summary.json").read_text())

    first = launch(5)
    assert first["steps"] == 5 and first["mesh"]["data"] == 2
    second = launch(10)  # same command, longer: resumes from step 5
    assert second["steps"] == 10
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 10, steps  # no step trained twice


TINY_RN = ml_collections.ConfigDict(dict(
    variant="RN50", embed_dim=32, vision=dict(image_size=32, layers=(1, 1, 1, 1), width=8, heads=2),
    text=dict(width=32, layers=1, heads=2, context_length=16)))


def _rn_run(tmp_path, mesh, devices=None):
    mesh = sharding.make_mesh(mesh, devices)
    task = CLIPTask(model_config(TINY_RN), mesh=mesh)
    tcfg = TrainerConfig(total_steps=3, global_batch_size=16, log_every=1, checkpoint_every=3, progress=False)
    trainer = Trainer(task, tcfg, OPTIM, tmp_path, mesh=mesh)
    data = make_pipeline(ml_collections.ConfigDict(dict(source="shapes", split="train", num_examples=256, render_size=32)),
                         global_batch_size=16, image_size=32, context_length=16, seed=0)
    before = jax.device_get(trainer.state.model_state)
    res = trainer.fit(data)
    trainer.close()
    return [h["loss"] for h in res.history], before, jax.device_get(res.state.model_state)


def test_resnet_batchnorm_trains_synchronised(tmp_path):
    losses1, before, after = _rn_run(tmp_path / "one", "data_parallel", devices=jax.devices()[:1])
    stem_var = lambda s: np.asarray(s["batch_stats"]["visual"]["conv1"]["bn"]["var"])  # noqa: E731
    assert not np.allclose(stem_var(before), stem_var(after))  # running statistics were updated
    # Statistics over the global batch: 8-way data parallel equals one device.
    losses8, _, after8 = _rn_run(tmp_path / "eight", "data_parallel")
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
    np.testing.assert_allclose(stem_var(after8), stem_var(after), rtol=1e-4)
    # Frozen (fine-tuning) mode returns no statistics to update.
    frozen = CLIPTask(model_config(TINY_RN), freeze_batchnorm=True)
    variables = nn.meta.unbox(jax.eval_shape(frozen.init, jax.random.key(0)))
    batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), np.float32), "text": jax.ShapeDtypeStruct((4, 16), np.int32)}
    out = jax.eval_shape(lambda v, b: frozen.loss(v["params"], {"batch_stats": v["batch_stats"]}, b, None, 0)[2],
                         variables, batch)
    assert out is None


def test_a_run_whose_export_cannot_be_written_fails_before_training(tmp_path):
    """export_openai with a ResNet stem OpenAI's layout lacks (stem_stride 2) is refused at the start, not
    after the training it would end."""
    from experiments.configs.clip_rn50 import get_config as rn50_config

    config = rn50_config("smoke")
    config.model.vision.stem_stride = 2
    assert config.export_openai
    with pytest.raises(ValueError, match="stride-4 stem; this model's stem_stride is 2"):
        run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
