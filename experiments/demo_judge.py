"""The demo's independent judge: a small supervised CNN that names the colour and the shape in a shapes image.

The demo measures how faithful DALL·E's samples are to their captions by asking this classifier
what it sees, so the judge shares nothing with the models it judges: another architecture (a
plain convolutional network, not CLIP's transformers nor the dVAE), other images (the shapes
rendered with another seed), every colour-shape combination (including the ones held out of
CLIP's and DALL·E's training: a judge that never saw a green heart would be a poor referee of one),
and labels instead of captions. It trains through the shared trainer like every other model here.
Its own accuracy on real images it never saw is part of the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, SupportsIndex

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import sharding
from common.data import pipeline, shapes
from common.data.sources import ShapesSource
from common.data.transforms import Select
from common.layers import partitioned
from common.trainer import Trainer
from experiments.driver import fit_and_report


class ShapesJudge(nn.Module):
    """Stages of two 3x3 conv + BatchNorm + ReLU, 2x2 max-pooling between them, global average pool,
    two linear heads. uint8 (B, S, S, 3) -> (colour logits (B, len(COLORS)), shape logits (B, len(SHAPES))).

    `train`: BatchNorm normalises with the batch's statistics and updates the running averages in
    the "batch_stats" collection; otherwise it uses those averages.
    """

    widths: tuple[int, ...] = (32, 64, 128)
    train: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images.astype(jnp.float32) / 127.5 - 1.0  # (B, S, S, 3)
        channels_in = None  # the RGB input channels stay whole
        for stage, width in enumerate(self.widths):
            for conv in range(2):
                kernel = partitioned(nn.initializers.he_normal(), ("conv_h", "conv_w", channels_in, "conv_out"))
                x = nn.Conv(width, (3, 3), use_bias=False, kernel_init=kernel, name=f"conv{stage}_{conv}")(x)
                x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9,
                                 scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
                                 bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
                                 name=f"bn{stage}_{conv}")(x)
                x = nn.relu(x)
                channels_in = "conv_in"
            if stage < len(self.widths) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # (B, S / 2^(stage+1), ..., width)
        x = x.mean(axis=(1, 2))  # (B, widths[-1])

        def head(classes: int, name: str) -> jax.Array:
            kernel = partitioned(nn.initializers.lecun_normal(), ("embed", "classes"))
            return nn.Dense(classes, kernel_init=kernel, name=name)(x)

        return head(len(shapes.COLORS), "color_head"), head(len(shapes.SHAPES), "shape_head")


class JudgeTask:
    """Supervised colour and shape classification (a `common.trainer.Task`): the sum of the two
    cross-entropies; accuracies of each and of both at once. BatchNorm statistics are the task's
    model state: batch statistics in the loss, their running averages for evaluation."""

    def __init__(self, image_size: int, widths: tuple[int, ...]):
        self.image_size = image_size
        self.model = ShapesJudge(tuple(widths))
        self.train_model = self.model.clone(train=True)
        self._predict = jax.jit(lambda variables, x: [jnp.argmax(logits, -1) for logits in self.model.apply(variables, x)])

    def init(self, rng: jax.Array) -> dict:
        return dict(self.model.init(rng, jnp.zeros((1, self.image_size, self.image_size, 3), jnp.uint8)))

    @staticmethod
    def _scores(logits: tuple[jax.Array, jax.Array], batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-row loss (B,) and per-row correctness of colour, shape and both (B,) each."""
        color_logits, shape_logits = logits
        colors, kinds = batch["color_id"].astype(jnp.int32), batch["shape_id"].astype(jnp.int32)
        loss = (optax.softmax_cross_entropy_with_integer_labels(color_logits, colors)
                + optax.softmax_cross_entropy_with_integer_labels(shape_logits, kinds))
        color_ok = jnp.argmax(color_logits, -1) == colors
        shape_ok = jnp.argmax(shape_logits, -1) == kinds
        return loss, {"color_accuracy": color_ok, "shape_accuracy": shape_ok, "accuracy": color_ok & shape_ok}

    def loss(self, params, model_state, batch, rng, update):
        logits, new_state = self.train_model.apply({"params": params, **model_state}, batch["image"],
                                                   mutable=["batch_stats"])
        loss, correct = self._scores(logits, batch)
        return loss.mean(), {k: v.mean() for k, v in correct.items()}, dict(new_state)

    def eval_metrics(self, params, model_state, batch):
        loss, correct = self._scores(self.model.apply({"params": params, **model_state}, batch["image"]), batch)
        weights = batch.get("valid", jnp.ones(loss.shape, bool)).astype(jnp.float32)  # padded rows: 0

        def mean(values: jax.Array) -> jax.Array:
            return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1.0)

        return {"loss": mean(loss), **{k: mean(v.astype(jnp.float32)) for k, v in correct.items()}}

    def predict(self, variables: Any, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(colour ids (N,), shape ids (N,)) the judge sees in uint8 or [0, 1] float images (N, S, S, 3);
        `variables`: {"params", "batch_stats"} of a trained judge (`restore`)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
        colors, kinds = [], []
        for start in range(0, len(images), batch_size):
            c, s = self._predict(variables, images[start:start + batch_size])
            colors.append(np.asarray(c))
            kinds.append(np.asarray(s))
        return np.concatenate(colors), np.concatenate(kinds)


class EveryCombination:
    """Shapes of every colour-shape pair: the "train" split followed by the "heldout" one."""

    def __init__(self, num_train: int, num_heldout: int, config: shapes.ShapesConfig):
        self.parts = (ShapesSource(shapes.ShapesDataset("train", num_train, config)),
                      ShapesSource(shapes.ShapesDataset("heldout", num_heldout, config)))

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: SupportsIndex) -> dict:
        first = self.parts[0]
        i = int(index)
        return first[i] if i < len(first) else self.parts[1][i - len(first)]


def judge_transform() -> Select:
    return Select("image", "color_id", "shape_id")


def make_task(config: Any) -> JudgeTask:
    return JudgeTask(config.image_size, tuple(config.widths))


def train(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains the judge as `config` (experiments/configs/demo.py, `judge`) says, resuming from
    `workdir`; evaluates its accuracy on real "validation" and "heldout" images of the demo's own
    seed, which its training (another seed) never rendered. Writes and returns summary.json."""
    workdir = Path(workdir)
    mesh = sharding.make_mesh(config.trainer.mesh)
    task = make_task(config)
    trainer = Trainer(task, config.trainer, config.optim, workdir, mesh=mesh)
    batch_size = trainer.cfg.global_batch_size
    render = shapes.ShapesConfig(image_size=config.image_size, seed=config.seed)
    source = EveryCombination(config.num_train, config.num_heldout, render)
    data = pipeline.make_pipeline(source, judge_transform(), global_batch_size=batch_size, train=True,
                                  seed=trainer.cfg.seed)

    def real_images(split: str):
        dataset = shapes.ShapesDataset(split, config.eval_examples, shapes.ShapesConfig(image_size=config.image_size))
        return lambda: pipeline.make_pipeline(ShapesSource(dataset), judge_transform(), global_batch_size=batch_size,
                                              train=False, num_epochs=1, pad_last_batch=True)

    evaluators = {split: trainer.metrics_evaluator(real_images(split)) for split in ("validation", "heldout")}
    return fit_and_report(trainer, data, evaluators, workdir, ["loss", "color_accuracy", "shape_accuracy"])
