"""The CLIP training driver: config -> mesh -> task + pipelines -> trainer -> summary.json.

`run(config, workdir)` is what `python -m experiments.run --config experiments/configs/clip_*.py`
calls: it makes the mesh, builds the model and the input pipeline, trains (resuming from the last
checkpoint in workdir; else starting from `config.init_from` weights when given, with the towers
`config.lock_*` asks for frozen) and runs the evaluators: the task's metrics on `config.eval_data`, and
zero-shot classification and retrieval on the built-in shapes data when `config.zeroshot_shapes`
asks for it (smoke runs), and few-shot linear probes there when `config.fewshot_shapes` does. Everything here runs on every host of a multi-host job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax import convert, finetune, linear_probe, retrieval, weights, zeroshot
from clip_jax.api import CLIPBundle
from clip_jax.train import CLIPTask, clip_transform
from clip_jax.variants import CLIPConfig, decode_variant
from common import checkpoint as ckpt
from common import sharding
from common.config import compute_dtype
from common.data import pipeline, shapes, sources
from common.trainer import Evaluator, Trainer, restore_eval_variables
from experiments.driver import fit_and_report

EXPORT_FILE = "clip_openai.safetensors"  # written at the end of a run when config.export_openai is set
# Prompts for the shapes data's two label kinds; none of them is a training caption's wording.
SHAPES_TEMPLATES = {
    "shape": ("a {}.", "an image of a {}.", "a picture of a {} shape.", "a drawing of a {}."),
    "color": ("something {}.", "an image of a {} shape.", "a {} object.", "a picture with something {} in it."),
}


def model_config(cfg: Any) -> CLIPConfig:
    """A CLIPConfig from `config.model`: a variant name, optionally with sizes overridden (smoke runs,
    image size, context length); overrides set to None keep the variant's value."""
    base = decode_variant(cfg.variant)
    overrides = lambda name: {k: v for k, v in dict(cfg.get(name, {})).items() if v is not None}  # noqa: E731
    vision = dataclasses.replace(base.vision, **overrides("vision"))
    text = dataclasses.replace(base.text, **overrides("text"))
    return CLIPConfig(cfg.get("embed_dim", base.embed_dim), vision, text)


def make_task(config: Any, mesh: jax.sharding.Mesh) -> CLIPTask:
    """The `CLIPTask` that `config` (experiments/configs/clip_common.py) describes, its loss sharded over `mesh`."""
    m = config.model
    cfg, scan_layers = model_config(m), m.get("scan_layers", False)
    frozen = finetune.frozen_prefixes(
        cfg, lock_image=config.get("lock_image", False), lock_image_unlocked_groups=config.get("lock_image_unlocked_groups", 0),
        lock_text=config.get("lock_text", False), lock_text_unlocked_layers=config.get("lock_text_unlocked_layers", 0),
        scan_layers=scan_layers)
    return CLIPTask(cfg, loss=config.loss, dtype=compute_dtype(m.get("dtype", "float32")),
                    remat=m.get("remat", False), scan_layers=scan_layers,
                    freeze_batchnorm=m.get("freeze_batchnorm", False), frozen=frozen,
                    patch_dropout=m.get("patch_dropout", 0.0), patch_dropout_until_step=m.get("patch_dropout_until_step"),
                    mesh=mesh)


def optim_config(config: Any, task: CLIPTask) -> dict[str, Any]:
    """`config.optim` with the task's frozen parameters, which get no update and no optimizer state."""
    return {**config.optim.to_dict(), "frozen": task.frozen}


def run_variables(workdir: str | Path, task: CLIPTask, mesh: jax.sharding.Mesh) -> dict:
    """The evaluation variables of the latest checkpoint of a CLIP training run in `workdir`, which must
    have trained `task`'s model (its optimizer settings are read from the checkpoint)."""
    try:
        return restore_eval_variables(task, None, workdir, mesh)
    except ckpt.CheckpointMismatchError as err:
        raise ValueError(f"init_from={workdir} is a training run of another model than this one ({err}). A "
                         "run's checkpoints start runs of the same model; for another image size or context "
                         "length, start from its export (export_openai=True writes clip_openai.safetensors).") from None


def make_trainer(config: Any, task: CLIPTask, workdir: Path, mesh: jax.sharding.Mesh) -> Trainer:
    """The trainer of `task`; a fresh run (no checkpoint in workdir: resuming wins) starts from
    `config.init_from` weights (`config.init_from_tower`: "both", "image" or "text") when given."""
    trainer = Trainer(task, config.trainer, optim_config(config, task), workdir, mesh=mesh)
    path = config.get("init_from")
    if path and trainer.checkpoints.latest_step() is None:
        tower = config.get("init_from_tower", "both")
        if (Path(path) / "checkpoints").is_dir():  # a training workdir: its latest checkpoint, same model
            variables = run_variables(path, task, mesh)  # sharded on this mesh already
        else:
            variables = finetune.load_pretrained(path, task.config, tower=tower, scan_layers=task.model.scan_layers)
        state, shardings = trainer.state, trainer.state_shardings
        params, model_state = finetune.place_pretrained(variables, state.params, state.model_state, shardings.params,
                                                        shardings.model_state, tower=tower)
        ema = None if state.ema_params is None else finetune.place_pretrained(
            variables, state.ema_params, {}, shardings.ema_params, {}, tower=tower)[0]
        trainer.state = state.replace(params=params, model_state=model_state, ema_params=ema)
    return trainer


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


def shapes_fewshot_evaluator(task: CLIPTask, fcfg: Any, mesh: jax.sharding.Mesh) -> Evaluator:
    """Few-shot ridge-regression accuracy of the image tower (clip_jax.linear_probe) on the shapes data's
    `fcfg.label` ("shape" or "color"): k-shot sets drawn from `fcfg.train_examples` train images, scored
    on `fcfg.test_examples` validation images."""
    render = shapes.ShapesConfig(image_size=task.config.vision.image_size)

    def split(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        items = [shapes.ShapesDataset(name, n, render)[i] for i in range(n)]
        return np.stack([it["image"] for it in items]), np.asarray([it[f"{fcfg.label}_id"] for it in items])

    return linear_probe.fewshot_evaluator(
        task.model, task.config, split("train", fcfg.train_examples), split("validation", fcfg.test_examples),
        num_classes=len(shapes.SHAPES if fcfg.label == "shape" else shapes.COLORS), mesh=mesh,
        shots=tuple(fcfg.shots), num_seeds=fcfg.num_seeds, batch_size=fcfg.batch_size)


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
    if config.get("export_openai"):
        convert.check_openai_layout(task.config)  # before training, not after it
    trainer = make_trainer(config, task, workdir, mesh)
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
    if config.get("fewshot_shapes"):
        evaluators["fewshot_shapes"] = shapes_fewshot_evaluator(task, config.fewshot_shapes, mesh)
    summary = fit_and_report(trainer, data, evaluators, workdir)
    if config.get("export_openai") and not summary["preempted"]:
        export_openai(trainer, task, workdir / EXPORT_FILE)
    return summary


def export_openai(trainer: Trainer, task: CLIPTask, path: Path) -> None:
    """Writes the evaluation parameters (and BatchNorm statistics) as an OpenAI-format state dict that
    `clip_jax.load`, `--config.init_from` and OpenAI's PyTorch CLIP read. Every host gathers the
    whole model (a collective); process 0 writes."""
    variables = {"params": trainer.eval_params, **trainer.state.model_state}
    host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), variables)
    if jax.process_index() == 0:
        weights.save_openai_state_dict(host, task.config, path)
