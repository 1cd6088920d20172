"""The DALL·E transformer driver (stage 2): config -> mesh -> task + pipelines -> trainer -> summary.json.

`run(config, workdir)` is what `python -m experiments.run --config experiments/configs/dalle.py`
calls. Data are array_record shards of (caption, codes) from `python -m dalle_jax.encode` and a
SentencePiece model; with `data.source = "shapes"` (smoke runs) the driver first renders the
shapes splits, trains the tokenizer on their captions and encodes them with the dVAE of
the stage-1 dVAE (trained in `workdir/dvae` unless `config.dvae.workdir` names a finished run), once,
under `workdir/data`. `workdir/run.json` records the model, tokenizer and dVAE for
`python -m dalle_jax.generate --checkpoint workdir`. Evaluators: the eval loss, and a grid of
samples for `config.samples.captions` decoded by that dVAE (`samples.png`). Everything here runs
on every host of a multi-host job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from common import sharding
from common.config import compute_dtype
from common.data import pipeline, shapes
from common.data.sources import ArrayRecordSource, ShapesSource, source_from_config
from common.data.transforms import Compose, Select, Tokenize
from common.images import save_image_grid
from common.tokenizers.sentencepiece import SentencePieceTokenizer, train_bpe
from common.trainer import Evaluator, Trainer, restore_eval_params
from dalle_jax.api import decode_to_images
from dalle_jax.dvae import DVAEConfig
from dalle_jax.dvae_train import dvae_transform
from dalle_jax.encode import dvae_encoder, write_code_shards
from dalle_jax.generate import RUN_FILE
from dalle_jax.sample import sample_image_tokens
from dalle_jax.train import DALLETask
from dalle_jax.variants import DALLEConfig, decode_variant
from experiments import train_dvae
from experiments.configs import dvae as dvae_configs
from experiments.driver import fit_and_report


def model_config(model_cfg: Any) -> DALLEConfig:
    return decode_variant(model_cfg.variant, **dict(model_cfg.get("overrides", {})))


def make_task(config: Any, dvae: dict[str, Any]) -> DALLETask:
    """The task; with data.source="images" it encodes the (augmented) images with the frozen dVAE itself."""
    m = config.model
    on_the_fly = (DVAEConfig(**dvae["model"]), dvae["params"]["encoder"]) if config.data.source == "images" else None
    return DALLETask(model_config(m), caption_dropout=config.caption_dropout, dtype=compute_dtype(m.dtype),
                     remat=m.remat, scan_layers=m.scan_layers, dvae_encoder=on_the_fly)


def dvae_run(config: Any, workdir: Path, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The stage-1 dVAE: `config.dvae.workdir`, or, when that is None, trained in `workdir/dvae` with
    experiments/configs/dvae.py:<config.dvae.config> (reused once finished; resumed if interrupted).
    `config.dvae.config` may also be a whole dVAE ConfigDict (experiments/configs/demo.py passes its own).

    Returns its run record: workdir, model, loss, image_size, trainer and optim configs, and the
    evaluation parameters ("params", not written to run.json).
    """
    recipe = config.dvae.config
    if isinstance(recipe, ml_collections.ConfigDict):
        dvae_config, recipe = recipe.copy_and_resolve_references(), "its config.dvae.config"
    else:
        dvae_config, recipe = dvae_configs.get_config(recipe), f"experiments/configs/dvae.py:{recipe}"
    if config.dvae.get("total_steps"):
        dvae_config.trainer.total_steps = config.dvae.total_steps
    dvae_workdir = Path(config.dvae.workdir) if config.dvae.workdir else workdir / "dvae"
    if config.dvae.workdir is None:
        train_dvae.train(dvae_config, dvae_workdir)
    elif not (dvae_workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"No dVAE checkpoints in {dvae_workdir}/checkpoints. Train stage 1 first "
                                f"({recipe}), or leave dvae.workdir unset to train it inside this run's workdir.")
    task = train_dvae.make_task(dvae_config)
    record = {"workdir": str(dvae_workdir.resolve()), "model": dataclasses.asdict(task.model.config),
              "loss": dict(dvae_config.loss), "image_size": dvae_config.image_size,
              "trainer": dvae_config.trainer.to_dict(), "optim": dvae_config.optim.to_dict()}
    return {**record, "params": restore_eval_params(task, record, dvae_workdir, mesh)}


def prepare_shapes(config: Any, workdir: Path, dvae: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, str]:
    """Renders, tokenizes and encodes the shapes splits once (smoke runs); returns their paths."""
    dvae_config, image_size = DVAEConfig(**dvae["model"]), dvae["image_size"]
    data_dir = workdir / "data"
    paths = {"tokenizer": str(data_dir / "bpe.model")}
    splits = {"train": config.data, "eval": config.get("eval_data")}
    for name, data_cfg in splits.items():
        if data_cfg is None:
            continue
        out = data_dir / f"{name}_codes"
        paths[name] = str(out)
        if out.is_dir() and any(out.glob("*.array_record")):
            continue
        dataset = shapes.ShapesDataset(data_cfg.split, data_cfg.num_examples, shapes.ShapesConfig(image_size=image_size))
        write_code_shards(ShapesSource(dataset), dvae_encoder(dvae["params"]["encoder"], dvae_config), str(out),
                          image_size=image_size, global_batch_size=sharding.batch_axis_size(mesh) * 8, mesh=mesh)
        if name == "train" and not Path(paths["tokenizer"]).exists() and jax.process_index() == 0:
            captions = (dataset[i]["caption"] for i in range(len(dataset)))
            train_bpe(captions, paths["tokenizer"], vocab_size=config.data.text_vocab, allow_smaller_vocab=True)
    multihost_utils.sync_global_devices("shapes data prepared")  # process 0's tokenizer is written
    return paths


def dalle_transform(tokenizer: SentencePieceTokenizer, text_len: int, *, train: bool,
                    image_size: int | None = None) -> Compose:
    """(caption, codes) records -> {"text": int32 (text_len,) padded ids, "codes": int16 (h, w)}; with
    `image_size`, (caption, image) records -> {"text", "image": uint8 (S, S, 3)}, augmented as the
    dVAE's training images (the DALL·E paper's listing) when `train`."""
    tokenize = Tokenize(tokenizer, text_len, random_caption=train)
    if image_size is None:
        return Compose((tokenize, Select("text", "codes")))
    return Compose((tokenize, *dvae_transform(image_size, train=train).transforms[:-1], Select("text", "image")))


def samples_evaluator(task: DALLETask, tokenizer: SentencePieceTokenizer, dvae: dict[str, Any], samples: Any,
                      path: Path, seed: int) -> Evaluator:
    """Samples `per_caption` images for each caption, decodes them with the dVAE, writes a labelled grid."""
    captions: Sequence[str] = list(samples.captions)
    cfg = task.config
    text = np.repeat(tokenizer.encode_batch(captions, cfg.text_len, truncate=True), samples.per_caption, axis=0)
    dvae_config, decoder = DVAEConfig(**dvae["model"]), dvae["params"]["decoder"]

    def evaluate(params: Any, model_state: Any) -> dict[str, float]:
        codes = sample_image_tokens(task.model, params, jnp.asarray(text), jax.random.key(seed),
                                    guidance_scale=samples.guidance_scale, top_k=samples.top_k,
                                    temperature=samples.temperature)  # (C n, N)
        images = decode_to_images(decoder, codes.reshape(-1, cfg.image_h, cfg.image_w),
                                  config=dvae_config)
        if jax.process_index() == 0:
            labels = [c for c in captions for _ in range(samples.per_caption)]
            save_image_grid(np.asarray(images), path, labels=labels, ncols=samples.per_caption)
        return {"distinct_codes_per_sample": float(np.mean([len(np.unique(c)) for c in np.asarray(codes)]))}

    return evaluate


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains the DALL·E transformer as `config` says (resuming if workdir has checkpoints)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.trainer.mesh)
    dvae = dvae_run(config, workdir, mesh)
    task = make_task(config, dvae)
    cfg = task.config
    if dvae["image_size"] != cfg.image_h * DVAEConfig(**dvae["model"]).downsample:
        raise ValueError(f"The dVAE turns {dvae['image_size']} px images into codes of another grid than the "
                         f"model's {cfg.image_h} x {cfg.image_w}; set model.overrides.image_h/image_w to match.")
    if dvae["model"]["vocab_size"] != cfg.image_vocab:
        raise ValueError(f"The dVAE has {dvae['model']['vocab_size']} codes but the model's image vocabulary is "
                         f"{cfg.image_vocab}; set model.overrides.image_vocab to match.")
    if config.data.source == "shapes":
        paths = prepare_shapes(config, workdir, dvae, mesh)
    elif config.data.source in ("codes", "images"):
        field = config.data.source
        paths = {"train": config.data[field], "tokenizer": config.data.tokenizer}
        if config.get("eval_data") is not None:
            paths["eval"] = config.eval_data[field]
    else:
        raise ValueError(f"config.data.source={config.data.source!r}; expected 'codes', 'images' or 'shapes'.")
    tokenizer = SentencePieceTokenizer.load(paths["tokenizer"])
    if tokenizer.vocab_size > cfg.text_vocab:
        raise ValueError(f"The tokenizer {paths['tokenizer']} has {tokenizer.vocab_size} ids but the model's text "
                         f"vocabulary is {cfg.text_vocab}; set --config.model.overrides.text_vocab.")
    trainer = Trainer(task, config.trainer, config.optim, workdir, mesh=mesh)
    batch_size = trainer.cfg.global_batch_size
    if jax.process_index() == 0:  # what `python -m dalle_jax.generate --checkpoint workdir` restores
        record = {"model": dataclasses.asdict(cfg), "tokenizer": str(Path(paths["tokenizer"]).resolve()),
                  "trainer": config.trainer.to_dict(), "optim": config.optim.to_dict(),
                  "dvae": {k: v for k, v in dvae.items() if k != "params"}}
        (workdir / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))

    def batches(where: Any, train: bool) -> pipeline.RecordIterator:
        if config.data.source == "images":  # a source config (common.data.sources.source_from_config)
            source, image_size = source_from_config(where), dvae["image_size"]
        else:
            source, image_size = ArrayRecordSource(where), None
        transform = dalle_transform(tokenizer, cfg.text_len, train=train, image_size=image_size)
        return pipeline.make_pipeline(source, transform, global_batch_size=batch_size, train=train, seed=trainer.cfg.seed,
                                      num_epochs=None if train else 1, worker_count=config.data.get("workers", 0))

    data = batches(paths["train"], train=True)
    evaluators: dict[str, Evaluator] = {}
    if "eval" in paths:
        evaluators["eval"] = trainer.metrics_evaluator(lambda: batches(paths["eval"], train=False))
    if config.samples.captions:
        evaluators["samples"] = samples_evaluator(task, tokenizer, dvae, config.samples, workdir / "samples.png",
                                                  trainer.cfg.seed)
    return fit_and_report(trainer, data, evaluators, workdir, ["loss", "text_loss", "image_loss"])
