"""The dVAE training driver (DALL·E stage 1): config -> mesh -> task + pipelines -> trainer -> summary.json.

`train(config, workdir)` is what `python -m experiments.run --config experiments/configs/dvae.py`
calls. Everything here runs on every host of a multi-host job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from common import sharding as sh
from common.config import compute_dtype, dataclass_from
from common.data.pipeline import make_pipeline
from common.data.sources import source_from_config
from common.images import save_image_grid
from common.trainer import Evaluator, Trainer
from dalle_jax.dvae import DVAE, DVAEConfig
from dalle_jax.dvae_train import DVAETask, LossConfig, codebook_stats, dvae_transform
from experiments.driver import fit_and_report


def make_task(config: ml_collections.ConfigDict) -> DVAETask:
    """The `DVAETask` that experiments/configs/dvae.py describes."""
    model_cfg = dict(config.model)
    dtype = compute_dtype(model_cfg.pop("dtype", "float32"))
    model = DVAE(DVAEConfig(**model_cfg), dtype=dtype, param_dtype=jnp.float32)
    return DVAETask(model, dataclass_from(LossConfig, config.loss), image_size=config.image_size)


def codebook_usage(task: DVAETask, params: Any, batches: Iterator[dict[str, np.ndarray]], mesh: Any,
                   num_images: int) -> tuple[dict[str, float], np.ndarray]:
    """Code perplexity and dead codes over the real rows (`valid`) of all `batches`, and a grid: the
    first `num_images` originals of the first batch above their reconstructions, (2 n, H, W, C) in [0, 1]."""

    vocab = task.model.config.vocab_size

    def count_and_reconstruct(params, images, valid):
        codes, rec = task.reconstruct(params, images)
        real = jnp.broadcast_to(valid[:, None, None], codes.shape).astype(jnp.int32)  # padded rows count 0
        return jnp.zeros(vocab, jnp.int32).at[codes.ravel()].add(real.ravel()), rec  # (vocab,), (B, H, W, C)

    step = jax.jit(count_and_reconstruct, out_shardings=(sh.replicated(mesh), sh.batch_sharding(mesh, 4)))
    counts, grid = np.zeros(vocab, np.int64), None
    with sh.use_mesh(mesh):
        for host_batch in batches:
            valid = host_batch.get("valid", np.ones(len(host_batch["image"]), bool))
            batch_counts, rec = step(params, *sh.shard_batch((host_batch["image"], valid), mesh))
            counts += np.asarray(jax.device_get(batch_counts))
            if grid is None:
                # Rows of every process in process order: the first ones are process 0's, which writes the grid.
                n = min(num_images, len(host_batch["image"]))
                rec = np.asarray(multihost_utils.process_allgather(rec, tiled=True))[:n]
                grid = np.concatenate([host_batch["image"][:n] / 255.0, rec])
    if grid is None:
        raise ValueError("The eval data gave no batch: it needs at least one global batch of usable images.")
    return codebook_stats(counts), grid


def reconstruction_evaluator(trainer: Trainer, task: DVAETask, batches: Callable[[], Iterator[dict]],
                             grid_path: Path, num_images: int) -> Evaluator:
    """Eval MSE and PSNR (the task's `eval_metrics`), code perplexity and dead codes; writes the grid of
    originals over reconstructions to `grid_path`."""
    reconstruction = trainer.metrics_evaluator(batches)

    def evaluate(params: Any, model_state: Any) -> dict[str, float]:
        usage, grid = codebook_usage(task, params, batches(), trainer.mesh, num_images)
        if jax.process_index() == 0:
            save_image_grid(grid, grid_path, ncols=len(grid) // 2)
        return {**reconstruction(params, model_state), **usage}

    return evaluate


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains a dVAE as `config` (experiments/configs/dvae.py) says, resuming from the last
    checkpoint in `workdir`; when `config.eval_data` is set, evaluates it every
    `trainer.eval_every` steps and at the end.

    Writes under `workdir`: checkpoints, `metrics.jsonl` (+ TensorBoard), `loss.png` and
    `curves.png`, `reconstructions.png` (eval originals over their reconstructions) and
    `summary.json`, which is also returned: eval MSE, PSNR, code perplexity and dead codes.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Sources first: a bad data path fails in seconds, before the train state is built.
    source = source_from_config(config.data)
    eval_source = source_from_config(config.eval_data) if config.get("eval_data") is not None else None
    mesh = sh.make_mesh(config.trainer.mesh)
    task = make_task(config)
    trainer = Trainer(task, config.trainer, config.optim, workdir, mesh=mesh)
    batch_size = trainer.cfg.global_batch_size
    data = make_pipeline(source, dvae_transform(config.image_size, train=True), global_batch_size=batch_size,
                         train=True, seed=trainer.cfg.seed, worker_count=config.data.get("workers", 0))
    evaluators = {}
    if eval_source is not None:
        def eval_batches():
            return make_pipeline(eval_source, dvae_transform(config.image_size, train=False),
                                 global_batch_size=batch_size, train=False, num_epochs=1, pad_last_batch=True,
                                 worker_count=config.eval_data.get("workers", 0))

        evaluators["eval"] = reconstruction_evaluator(trainer, task, eval_batches, workdir / "reconstructions.png",
                                                      config.num_grid_images)
    curves = ["loss", "nll_per_dim", "kl_per_image", "temperature"] + (["eval/psnr"] if evaluators else [])
    return fit_and_report(trainer, data, evaluators, workdir, curves)
