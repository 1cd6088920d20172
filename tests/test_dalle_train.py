"""DALL·E stage 2 on the shared trainer: caption dropout, and the smoke recipe end to end after a dVAE run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.generate import main as generate_main
from dalle_jax.api import encode_to_codes
from dalle_jax.dvae import DVAE, DVAEConfig
from dalle_jax.train import DALLETask, drop_captions
from dalle_jax.variants import decode_variant
from experiments import train_dalle
from experiments.configs import dalle as dalle_configs


def test_caption_dropout_empties_whole_captions_at_the_rate():
    text = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), (20_000, 1))
    out = np.asarray(drop_captions(text, jax.random.key(0), 0.1))
    dropped = (out == 0).all(axis=1)
    assert ((out == np.asarray(text)).all(axis=1) | dropped).all()  # a row is kept whole or emptied whole
    assert abs(dropped.mean() - 0.1) < 0.01


def test_smoke_recipe_trains_resumes_samples_and_generates(tmp_path):
    """One command trains the dVAE, tokenizer and transformer; generate restores all three from the workdir."""
    config = dalle_configs.get_config("smoke")
    config.dvae.total_steps = 10
    config.data.num_examples = 256
    config.samples.per_caption = 2
    config.trainer.update(total_steps=30, checkpoint_every=15, progress=False, log_every=10)
    summary = train_dalle.run(config, tmp_path / "dalle")
    assert summary["steps"] == 30 and summary["final_loss"] < summary["first_loss"]
    assert summary["eval"]["image_loss"] < np.log(128)  # below the uniform distribution over the codebook
    assert (tmp_path / "dalle" / "samples.png").exists()
    assert json.loads((tmp_path / "dalle" / "summary.json").read_text())["steps"] == 30

    config.trainer.total_steps = 40  # the same command with more steps resumes at 30
    resumed = train_dalle.run(config, tmp_path / "dalle")
    assert resumed["steps"] == 40
    logged = [json.loads(line)["step"] for line in (tmp_path / "dalle" / "metrics.jsonl").read_text().splitlines()]
    assert set(logged) == {10, 20, 30, 40}  # the second run logged only steps after 30

    out = tmp_path / "grid.png"
    report = generate_main(["--checkpoint", str(tmp_path / "dalle"), "--prompt", "a red circle.", "--prompt",
                            "a blue square.", "--n", "4", "--keep", "2", "--out", str(out)])
    assert out.exists() and json.loads(out.with_suffix(".json").read_text())["kept"] == report["kept"]
    assert np.asarray(report["kept"]).shape == (2, 2)

    # The same data encoded at every step by the frozen dVAE (data.source="images"): same task, same loss scale.
    images = dalle_configs.get_config("smoke")
    images.data.update(source="images", tokenizer=str(tmp_path / "dalle" / "data" / "bpe.model"),
                       images=dict(source="shapes", split="train", num_examples=128, render_size=32))
    images.eval_data = None
    images.dvae.workdir = str(tmp_path / "dalle" / "dvae")
    images.samples.captions = ()
    images.trainer.update(total_steps=4, progress=False, log_every=2)
    images.optim.warmup_steps = 2
    on_the_fly = train_dalle.run(images, tmp_path / "images")
    cfg = train_dalle.model_config(images.model)
    untrained = np.log(cfg.text_tokens) / 8 + 7 * np.log(cfg.image_vocab) / 8  # uniform predictions
    assert on_the_fly["steps"] == 4 and abs(on_the_fly["first_loss"] - untrained) < 1.0


def test_encoding_on_the_fly_equals_precomputed_codes():
    dvae_config = DVAEConfig(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8)
    encoder = DVAE(dvae_config).init({"params": jax.random.key(0), "gumbel": jax.random.key(1)},
                                     jnp.zeros((1, 8, 8, 3)), 1.0)["params"]["encoder"]
    config = decode_variant("tiny", image_h=4, image_w=4, image_vocab=16)
    precomputed, on_the_fly = DALLETask(config), DALLETask(config, dvae_encoder=(dvae_config, encoder))
    variables = on_the_fly.init(jax.random.key(2))
    params, state = variables.pop("params"), variables
    assert set(state) == {"frozen_dvae"}
    images = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    text = np.random.default_rng(4).integers(0, 2, (4, config.text_len)).astype(np.int32)
    codes = encode_to_codes(encoder, jnp.asarray(images) / 255.0, config=dvae_config)
    a = jax.jit(precomputed.eval_metrics)(params, {}, {"text": text, "codes": codes})
    b = jax.jit(on_the_fly.eval_metrics)(params, state, {"text": text, "image": images})
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="needs 'codes'"):
        precomputed.eval_metrics(params, {}, {"text": text, "image": images})


class _CodesData:
    """Deterministic (caption ids, image codes) batches; the position is the state."""

    def __init__(self, config, batch_size: int):
        self.config, self.batch_size, self.position = config, batch_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([7, self.position])
        self.position += 1
        lengths = rng.integers(0, self.config.text_len + 1, self.batch_size)  # some captions empty, some full
        text = rng.integers(1, self.config.text_vocab, (self.batch_size, self.config.text_len)).astype(np.int32)
        text[np.arange(self.config.text_len) >= lengths[:, None]] = 0
        codes = rng.integers(0, self.config.image_vocab, (self.batch_size, self.config.image_h * self.config.image_w))
        return {"text": text, "codes": codes.astype(np.int16)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def test_dalle_trains_sharded_like_data_parallel_and_resumes(tmp_path):
    """The transformer's weights split over 8 devices (fsdp x tensor) train like replicated data
    parallelism, and a sharded run resumed from its checkpoint continues the same losses."""
    from common import sharding
    from common.trainer import Trainer, TrainerConfig

    config = decode_variant("tiny", width=32, layers=2, heads=4, text_len=6, image_h=4, image_w=4,
                            image_vocab=32, text_vocab=64)
    optim = {"learning_rate": 3e-3, "warmup_steps": 1, "total_steps": 4}
    mesh_name = "fsdp_tp"

    def train(mesh_name, workdir, steps):
        cfg = TrainerConfig(total_steps=steps, global_batch_size=16, mesh=mesh_name, log_every=1,
                            checkpoint_every=2, progress=False)
        mesh = sharding.make_mesh(mesh_name)
        trainer = Trainer(DALLETask(config, caption_dropout=0.25), cfg, optim, workdir, mesh=mesh)
        result = trainer.fit(_CodesData(config, 16))
        trainer.close()
        return result, mesh

    replicated, _ = train("data_parallel", tmp_path / "dp", 4)
    sharded, mesh = train(mesh_name, tmp_path / mesh_name, 2)
    resumed, _ = train(mesh_name, tmp_path / mesh_name, 4)
    # The largest weights are really split: each device holds a fraction of them.
    split = [leaf for leaf in jax.tree_util.tree_leaves(resumed.state.params)
             if leaf.addressable_shards[0].data.size < leaf.size]
    assert len(split) >= 4, f"no parameter is sharded under {mesh_name}: {mesh.shape}"
    losses = lambda result: {h["step"]: h["loss"] for h in result.history}  # noqa: E731
    sharded_losses = {**losses(sharded), **losses(resumed)}
    assert sorted(sharded_losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([sharded_losses[s] for s in range(1, 5)],
                               [losses(replicated)[s] for s in range(1, 5)], rtol=2e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5),
                           resumed.state.params, replicated.state.params)
