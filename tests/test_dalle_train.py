"""DALL·E stage 2 on the shared trainer: caption dropout, and the smoke recipe end to end after a dVAE run."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import generate
from dalle_jax.train import drop_captions
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
    config.data.num_examples = 512
    config.trainer.update(total_steps=40, checkpoint_every=20, progress=False, log_every=10)
    summary = train_dalle.run(config, tmp_path / "dalle")
    assert summary["steps"] == 40 and summary["final_loss"] < summary["first_loss"]
    assert summary["eval"]["image_loss"] < np.log(128)  # below the uniform distribution over the codebook
    assert (tmp_path / "dalle" / "samples.png").exists()
    assert json.loads((tmp_path / "dalle" / "summary.json").read_text())["steps"] == 40

    config.trainer.total_steps = 50  # the same command with more steps resumes at 40
    resumed = train_dalle.run(config, tmp_path / "dalle")
    assert resumed["steps"] == 50
    logged = [json.loads(line)["step"] for line in (tmp_path / "dalle" / "metrics.jsonl").read_text().splitlines()]
    assert set(logged) == {10, 20, 30, 40, 50}  # the second run logged only steps after 40

    out = tmp_path / "grid.png"
    report = generate.main(["--checkpoint", str(tmp_path / "dalle"), "--prompt", "a red circle.", "--prompt",
                            "a blue square.", "--n", "4", "--keep", "2", "--out", str(out)])
    assert out.exists() and json.loads(out.with_suffix(".json").read_text())["kept"] == report["kept"]
    assert np.asarray(report["kept"]).shape == (2, 2)
