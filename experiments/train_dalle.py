"""The DALL·E transformer driver (stage 2): config -> mesh -> task + pipelines -> trainer -> summary.json.

`run(config, workdir)` is what `python -m experiments.run --config experiments/configs/dalle.py`
calls. Data are array_record shards of (caption, codes) from `python -m dalle_jax.encode` and a
SentencePiece model; with `data.source = "shapes"` (smoke runs) the driver first renders the
shapes splits, trains the tokenizer on their captions and encodes them with the dVAE of
`config.dvae.workdir`, once, under `workdir/data`. Evaluators: the eval loss, and a grid of
samples for `config.samples.captions` decoded by that dVAE (`samples.png`). Everything here runs
on every host of a multi-host job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from common import sharding
from common.data import pipeline, shapes
from common.data.sources import ArrayRecordSource, ShapesSource
from common.data.transforms import Compose, Select, Tokenize
from common.images import save_image_grid
from common.metrics import plot_curves
from common.tokenizers.sentencepiece import SentencePieceTokenizer, train_bpe
from common.trainer import Evaluator, Trainer
from dalle_jax.api import decode_to_images
from dalle_jax.encode import dvae_encoder, write_code_shards
from dalle_jax.sample import sample_image_tokens
from dalle_jax.train import DALLETask
from dalle_jax.variants import DALLEConfig, decode_variant
from experiments import train_dvae
from experiments.configs import dvae as dvae_configs


def model_config(model_cfg: Any) -> DALLEConfig:
    return decode_variant(model_cfg.variant, **dict(model_cfg.get("overrides", {})))


def make_task(config: Any) -> DALLETask:
    m = config.model
    return DALLETask(model_config(m), caption_dropout=config.caption_dropout, dtype=jnp.dtype(m.dtype),
                     remat=m.remat, scan_layers=m.scan_layers)


def load_dvae_run(dvae_cfg: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """(DVAEConfig, evaluation params {"encoder", "decoder"}) of the latest checkpoint of a dVAE run."""
    workdir = Path(dvae_cfg.workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"No dVAE checkpoints in {workdir}/checkpoints. Train stage 1 first: "
                                f"python -m experiments.run --config experiments/configs/dvae.py:{dvae_cfg.config} "
                                f"--workdir {workdir}")
    config = dvae_configs.get_config(dvae_cfg.config)
    trainer = Trainer(train_dvae.make_task(config), config.trainer, config.optim, workdir, mesh=mesh)
    step = trainer.restore_if_any(None)
    params = trainer.eval_params
    trainer.close()
    if step == 0:
        raise FileNotFoundError(f"The dVAE run in {workdir} has no finished checkpoint.")
    return trainer.task.model.config, params


def prepare_shapes(config: Any, workdir: Path, dvae: tuple[Any, Any], image_size: int,
                   mesh: jax.sharding.Mesh) -> dict[str, str]:
    """Renders, tokenizes and encodes the shapes splits once (smoke runs); returns their paths."""
    dvae_config, dvae_params = dvae
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
        write_code_shards(ShapesSource(dataset), dvae_encoder(dvae_params["encoder"], dvae_config), str(out),
                          image_size=image_size, global_batch_size=sharding.batch_axis_size(mesh) * 8, mesh=mesh)
        if name == "train" and not Path(paths["tokenizer"]).exists() and jax.process_index() == 0:
            captions = (dataset[i]["caption"] for i in range(len(dataset)))
            train_bpe(captions, paths["tokenizer"], vocab_size=config.data.text_vocab, allow_smaller_vocab=True)
    multihost_utils.sync_global_devices("shapes data prepared")  # process 0's tokenizer is written
    return paths


def dalle_transform(tokenizer: SentencePieceTokenizer, text_len: int, *, train: bool) -> Compose:
    """(caption, codes) records -> {"text": int32 (text_len,) padded ids, "codes": int16 (h, w)}."""
    return Compose((Tokenize(tokenizer, text_len, random_caption=train), Select("text", "codes")))


def samples_evaluator(task: DALLETask, tokenizer: SentencePieceTokenizer, dvae: tuple[Any, Any], samples: Any,
                      path: Path, seed: int) -> Evaluator:
    """Samples `per_caption` images for each caption, decodes them with the dVAE, writes a labelled grid."""
    captions: Sequence[str] = list(samples.captions)
    cfg = task.config
    text = np.repeat(tokenizer.encode_batch(captions, cfg.text_len, truncate=True), samples.per_caption, axis=0)
    dvae_config, dvae_params = dvae

    def evaluate(params: Any, model_state: Any) -> dict[str, float]:
        codes = sample_image_tokens(task.model, params, jnp.asarray(text), jax.random.key(seed),
                                    guidance_scale=samples.guidance_scale, top_k=samples.top_k,
                                    temperature=samples.temperature)  # (C n, N)
        images = decode_to_images(dvae_params["decoder"], codes.reshape(-1, cfg.image_h, cfg.image_w),
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
    task = make_task(config)
    cfg = task.config
    dvae = load_dvae_run(config.dvae, mesh) if config.dvae.workdir else None
    if config.data.source == "shapes":
        if dvae is None:
            raise ValueError("data.source='shapes' encodes the shapes data with a trained dVAE: set dvae.workdir.")
        paths = prepare_shapes(config, workdir, dvae, cfg.image_h * dvae[0].downsample, mesh)
    elif config.data.source == "codes":
        paths = {"train": config.data.codes, "tokenizer": config.data.tokenizer}
        if config.get("eval_data") is not None:
            paths["eval"] = config.eval_data.codes
    else:
        raise ValueError(f"config.data.source={config.data.source!r}; expected 'codes' or 'shapes'.")
    tokenizer = SentencePieceTokenizer.load(paths["tokenizer"])
    if tokenizer.vocab_size > cfg.text_vocab:
        raise ValueError(f"The tokenizer {paths['tokenizer']} has {tokenizer.vocab_size} ids but the model's text "
                         f"vocabulary is {cfg.text_vocab}; set --config.model.overrides.text_vocab.")
    trainer = Trainer(task, config.trainer, config.optim, workdir, mesh=mesh)
    batch_size = trainer.cfg.global_batch_size

    def batches(path: str, train: bool) -> pipeline.RecordIterator:
        return pipeline.make_pipeline(ArrayRecordSource(path), dalle_transform(tokenizer, cfg.text_len, train=train),
                                      global_batch_size=batch_size, train=train, seed=trainer.cfg.seed,
                                      num_epochs=None if train else 1, worker_count=config.data.get("workers", 0))

    data = batches(paths["train"], train=True)
    evaluators: dict[str, Evaluator] = {}
    if "eval" in paths:
        evaluators["eval"] = trainer.metrics_evaluator(lambda: batches(paths["eval"], train=False))
    if dvae is not None and config.samples.captions:
        evaluators["samples"] = samples_evaluator(task, tokenizer, dvae, config.samples, workdir / "samples.png",
                                                  trainer.cfg.seed)
    result = trainer.fit(data, evaluators)
    summary = trainer.summary(result, data)
    data.close()
    trainer.close()
    if jax.process_index() == 0:
        if result.history:
            plot_curves(workdir / "metrics.jsonl", ["loss", "text_loss", "image_loss"], workdir / "curves.png")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
