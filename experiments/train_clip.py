"""The CLIP training driver: config -> mesh -> task + pipelines -> trainer -> summary.json.

`run(config, workdir)` is what `python -m experiments.run --config experiments/configs/clip_*.py`
calls: it makes the mesh, builds the model and the input pipeline, trains (resuming from the last
checkpoint in workdir) and runs the evaluators: the task's metrics on `config.eval_data`, and
zero-shot classification and retrieval on the built-in shapes data when `config.zeroshot_shapes`
asks for it (smoke runs). Everything here runs on every host of a multi-host job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from clip_jax import retrieval, zeroshot
from clip_jax.api import CLIPBundle
from clip_jax.train import CLIPTask, clip_transform
from clip_jax.variants import CLIPConfig, decode_variant
from common import sharding
from common.config import compute_dtype
from common.data import pipeline, shapes, sources
from common.trainer import Evaluator, Trainer
from experiments.driver import fit_and_report

# Prompts for the shapes data's two label kinds; none of them is a training caption's wording.
SHAPES_TEMPLATES = {
    "shape": ("a {}.", "an image of a {}.", "a picture of a {} shape.", "a drawing of a {}."),
    "color": ("something {}.", "an image of a {} shape.", "a {} object.", "a picture with something {} in it."),
}


def model_config(cfg: Any) -> CLIPConfig:
    """A CLIPConfig from `config.model`: a variant name, optionally with sizes overridden (smoke runs)."""
    base = decode_variant(cfg.variant)
    vision = dataclasses.replace(base.vision, **dict(cfg.get("vision", {})))
    text = dataclasses.replace(base.text, **dict(cfg.get("text", {})))
    return CLIPConfig(cfg.get("embed_dim", base.embed_dim), vision, text)


def make_task(config: Any, mesh: jax.sharding.Mesh) -> CLIPTask:
    """The `CLIPTask` that `config` (experiments/configs/clip_common.py) describes, its loss sharded over `mesh`."""
    m = config.model
    return CLIPTask(model_config(m), loss=config.loss, dtype=compute_dtype(m.get("dtype", "float32")),
                    remat=m.get("remat", False), scan_layers=m.get("scan_layers", False),
                    freeze_batchnorm=m.get("freeze_batchnorm", False), mesh=mesh)


def shapes_zero_shot(bundle: CLIPBundle, dataset, *, batch_size: int, mesh) -> dict[str, float]:
    """Zero-shot colour and shape accuracy (prompt ensembling) and retrieval recall on a shapes split.

    Every host renders the whole split; features come back replicated (`zeroshot.embed_rows`), so
    this works on parameters sharded over the devices of every host.
    """
    items = [dataset[i] for i in range(len(dataset))]
    images = np.stack([it["image"] for it in items])  # (N, S, S, 3) uint8, normalised on the devices
    # Each image is encoded once; both classifiers and retrieval score the same features.
    image_features = zeroshot.embed_rows(bundle.encode_image, images, batch_size=batch_size, mesh=mesh,
                                         desc="images")  # (N, E) unit rows
    out = {}
    for kind, names in (("shape", shapes.SHAPES), ("color", shapes.COLORS)):
        weights = zeroshot.zero_shot_weights(bundle, list(names), list(SHAPES_TEMPLATES[kind]), mesh=mesh)  # (E, C)
        labels = np.asarray([it[f"{kind}_id"] for it in items], np.int32)
        out[f"zeroshot_{kind}_top1"] = zeroshot.accuracy(image_features @ weights, labels, topk=(1,))["top1"]
        out[f"chance_{kind}_top1"] = 1.0 / len(names)
    text_features = zeroshot.embed_texts(bundle, [it["caption"] for it in items], mesh=mesh)
    recall = retrieval.retrieval_metrics(image_features, text_features, np.arange(len(items)))
    out.update({f"retrieval_{k}": float(v) for k, v in recall.items()})
    return out


def shapes_evaluator(task: CLIPTask, split: str, zcfg: Any, mesh: jax.sharding.Mesh) -> Evaluator:
    """`shapes_zero_shot` on `split` of `config.zeroshot_shapes`, for the trainer's evaluators."""
    dataset = shapes.ShapesDataset(split, zcfg.num_examples, shapes.ShapesConfig(image_size=task.config.vision.image_size))

    def evaluate(params: Any, model_state: Any) -> dict[str, float]:
        bundle = CLIPBundle(task.model, {"params": params, **model_state}, task.config, "trained")
        return shapes_zero_shot(bundle, dataset, batch_size=zcfg.batch_size, mesh=mesh)

    return evaluate


def make_pipeline(data_cfg: Any, *, global_batch_size: int, image_size: int, context_length: int, seed: int,
                  train: bool = True, num_epochs: int | None = None):
    transform = clip_transform(image_size, context_length, train=train,
                               crop_scale=data_cfg.get("crop_scale", (0.9, 1.0)))
    return pipeline.make_pipeline(sources.source_from_config(data_cfg), transform,
                                  global_batch_size=global_batch_size, train=train, seed=seed, num_epochs=num_epochs,
                                  worker_count=data_cfg.get("workers", 0))


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains CLIP as `config` says (resuming if workdir has checkpoints), evaluates, writes summary.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.trainer.mesh)
    task = make_task(config, mesh)
    trainer = Trainer(task, config.trainer, config.optim, workdir, mesh=mesh)
    cfg = task.config
    sizes = dict(global_batch_size=trainer.cfg.global_batch_size, image_size=cfg.vision.image_size,
                 context_length=cfg.text.context_length)
    data = make_pipeline(config.data, seed=trainer.cfg.seed, **sizes)
    evaluators = {}
    if config.get("eval_data") is not None:
        evaluators["eval"] = trainer.metrics_evaluator(
            lambda: make_pipeline(config.eval_data, seed=0, train=False, num_epochs=1, **sizes))
    if config.get("zeroshot_shapes"):
        for split in config.zeroshot_shapes.splits:
            evaluators[f"shapes_{split}"] = shapes_evaluator(task, split, config.zeroshot_shapes, mesh)
    return fit_and_report(trainer, data, evaluators, workdir)
