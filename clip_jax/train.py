"""CLIP contrastive training as a task for the shared trainer (common/trainer.py).

`CLIPTask` gives the trainer init / loss / eval; `run(config, workdir)` is what
`python -m experiments.run --config experiments/configs/clip_*.py` calls: it
builds the model from the config, the input pipeline, trains (resuming from
the last checkpoint in workdir), and evaluates zero-shot classification and
retrieval where the data has labels (the built-in shapes data does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clip_jax import losses
from clip_jax.api import CLIPBundle
from clip_jax.model import CLIP, dummy_inputs, normalize
from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig, decode_variant

log = logging.getLogger(__name__)

# SigLIP's initial temperature and bias (Zhai et al. 2023, section 3.2).
SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS = math.log(10.0), -10.0


class CLIPTask:
    """Contrastive image-text training of a `CLIP` module.

    ModifiedResNet towers train their BatchNorm as OpenAI did: batch statistics
    (over the global batch: synchronised across devices) in the loss, running
    averages updated every step and used for evaluation. `freeze_batchnorm`
    keeps the stored statistics instead, as when fine-tuning.
    """

    def __init__(self, config: CLIPConfig, *, loss: str = "softmax", dtype: Any = jnp.float32,
                 remat: bool = False, scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None,
                 freeze_batchnorm: bool = False):
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss must be 'softmax' or 'sigmoid', found {loss!r}.")
        self.config, self.loss_kind, self.mesh = config, loss, mesh
        self.model = CLIP(config, dtype=dtype, remat=remat, scan_layers=scan_layers)
        self.train_batchnorm = config.vision.is_resnet and not freeze_batchnorm
        self.train_model = self.model.clone(train_batchnorm=self.train_batchnorm)

    def init(self, rng: jax.Array) -> dict:
        variables = dict(self.model.init(rng, *dummy_inputs(self.config)))
        if self.loss_kind == "sigmoid":
            params = dict(variables["params"])
            scalar = lambda v: nn.LogicallyPartitioned(jnp.asarray(v, jnp.float32), ())  # noqa: E731
            params["logit_scale"] = scalar(SIGLIP_INIT_SCALE)
            params["logit_bias"] = scalar(SIGLIP_INIT_BIAS)
            variables["params"] = params
        return variables

    def _loss(self, params, model_state, batch, train: bool):
        variables = {"params": params, **model_state}
        texts = self.model.apply(variables, batch["text"], method=CLIP.encode_text)  # (B, E)
        new_model_state = None
        if train and self.train_batchnorm:
            images, new_model_state = self.train_model.apply(
                variables, batch["image"], method=CLIP.encode_image, mutable=["batch_stats"])  # (B, E)
        else:
            images = self.model.apply(variables, batch["image"], method=CLIP.encode_image)  # (B, E)
        loss, metrics = losses.contrastive_loss(self.loss_kind, images, texts, params["logit_scale"],
                                                params.get("logit_bias"), mesh=self.mesh)
        return loss, metrics, new_model_state

    def loss(self, params, model_state, batch, rng, step):
        return self._loss(params, model_state, batch, train=True)

    def eval_metrics(self, params, model_state, batch):
        loss, metrics, _ = self._loss(params, model_state, batch, train=False)
        return {"loss": loss, **metrics}


def model_config(cfg: Any) -> CLIPConfig:
    """A CLIPConfig from `config.model`: a variant name, optionally with sizes overridden (smoke runs)."""
    base = decode_variant(cfg.variant)
    vision = dataclasses.replace(base.vision, **dict(cfg.get("vision", {})))
    text = dataclasses.replace(base.text, **dict(cfg.get("text", {})))
    return CLIPConfig(cfg.get("embed_dim", base.embed_dim), vision, text)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def shapes_zero_shot(bundle: CLIPBundle, dataset, *, batch_size: int, mesh) -> dict[str, float]:
    """Zero-shot colour and shape accuracy (prompt ensembling) and retrieval recall on a shapes split."""
    from clip_jax import retrieval, zeroshot  # noqa: PLC0415
    from common.data import shapes  # noqa: PLC0415
    from common.images import normalize_rgb  # noqa: PLC0415

    templates = {
        "shape": ("a {}.", "an image of a {}.", "a picture of a {} shape.", "a drawing of a {}."),
        "color": ("something {}.", "an image of a {} shape.", "a {} object.", "a picture with something {} in it."),
    }
    items = [dataset[i] for i in range(len(dataset))]
    images = np.stack([normalize_rgb(it["image"]) for it in items])  # (N, S, S, 3) CLIP-normalised
    # Each image is encoded once; both classifiers and retrieval score the same features.
    image_features = np.concatenate([np.asarray(bundle.encode_image(images[i:i + batch_size]))
                                     for i in range(0, len(items), batch_size)])  # (N, E)
    out = {}
    for kind, names in (("shape", shapes.SHAPES), ("color", shapes.COLORS)):
        weights = zeroshot.zero_shot_weights(bundle, list(names), list(templates[kind]), mesh=mesh)  # (E, C)
        labels = np.asarray([it[f"{kind}_id"] for it in items], np.int32)
        logits = normalize(image_features) @ weights  # (N, C)
        out[f"zeroshot_{kind}_top1"] = zeroshot.accuracy(logits, labels, topk=(1,))["top1"]
        out[f"chance_{kind}_top1"] = 1.0 / len(names)
    text_features = zeroshot.embed_texts(bundle, [it["caption"] for it in items], mesh=mesh)
    recall = retrieval.retrieval_metrics(image_features, text_features, np.arange(len(items)))
    out.update({f"retrieval_{k}": float(v) for k, v in recall.items()})
    return out


def make_pipeline(data_cfg: Any, *, global_batch_size: int, image_size: int, context_length: int, seed: int,
                  train: bool = True, num_epochs: int | None = None):
    from common.data import pipeline, sources  # noqa: PLC0415

    augment = pipeline.AugmentConfig(scale=tuple(data_cfg.get("crop_scale", (0.9, 1.0))))
    return pipeline.make_image_text_pipeline(
        sources.source_from_config(data_cfg), global_batch_size=global_batch_size, image_size=image_size,
        context_length=context_length, train=train, seed=seed, num_epochs=num_epochs,
        worker_count=data_cfg.get("workers", 0), augment=augment)


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains CLIP as `config` says (resuming if workdir has checkpoints), then evaluates."""
    from common.data import shapes  # noqa: PLC0415
    from common.trainer import Trainer  # noqa: PLC0415

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = model_config(config.model)
    trainer_cfg = dict(config.trainer)
    task = CLIPTask(cfg, loss=config.loss, dtype=_dtype(config.model.get("dtype", "float32")),
                    remat=config.model.get("remat", False), scan_layers=config.model.get("scan_layers", False),
                    freeze_batchnorm=config.model.get("freeze_batchnorm", False))
    trainer = Trainer(task, trainer_cfg, dict(config.optim), workdir)
    task.mesh = trainer.mesh  # sharded loss over the trainer's mesh
    sizes = dict(global_batch_size=trainer.cfg.global_batch_size, image_size=cfg.vision.image_size,
                 context_length=cfg.text.context_length)
    data = make_pipeline(config.data, seed=trainer.cfg.seed, **sizes)
    eval_batches = None
    if config.get("eval_data") is not None:
        eval_batches = lambda: make_pipeline(config.eval_data, seed=0, train=False, num_epochs=1, **sizes)  # noqa: E731
    result = trainer.fit(data, eval_batches=eval_batches)
    summary = trainer.summary(result, data)
    if config.get("zeroshot_shapes") and not result.preempted:
        z = config.zeroshot_shapes
        bundle = CLIPBundle(task.model, {"params": jax.device_get(result.state.params), **result.state.model_state},
                            cfg, "trained")
        for split in z.splits:
            ds = shapes.ShapesDataset(split, z.num_examples, shapes.ShapesConfig(image_size=cfg.vision.image_size))
            summary[f"shapes_{split}"] = shapes_zero_shot(bundle, ds, batch_size=z.batch_size, mesh=trainer.mesh)
    trainer.close()
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
