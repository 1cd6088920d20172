"""The demo's training stage: a small conv net learns shape and colour through the shared trainer.

It exercises everything a real run uses (sharded state, the jitted step,
checkpoints with data position, metrics, loss curve) at a size that trains in
about a minute on a laptop CPU. Accuracy is reported on the held-out split,
whose colour-shape pairs never appear in training.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from common.data import shapes
from common.trainer import Trainer, TrainerConfig


def _lp(init, names):
    return nn.with_logical_partitioning(init, names)


class ShapeColorNet(nn.Module):
    """Two conv blocks, global pooling, one head per label."""

    width: int = 32

    @nn.compact
    def __call__(self, images):  # (B, H, W, 3) in [0, 1]
        x = images
        for i, w in enumerate((self.width, 2 * self.width)):
            x = nn.Conv(w, (3, 3), kernel_init=_lp(nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
                        bias_init=_lp(nn.initializers.zeros, ("conv_out",)), name=f"conv{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = jnp.concatenate([x.mean((1, 2)), x.max((1, 2))], -1)  # (B, 4 * width)
        heads = {}
        for name, n in (("shape", len(shapes.SHAPES)), ("color", len(shapes.COLORS))):
            heads[name] = nn.Dense(n, kernel_init=_lp(nn.initializers.lecun_normal(), ("embed", "classes")),
                                   bias_init=_lp(nn.initializers.zeros, ("classes",)), name=f"{name}_head")(x)
        return heads


class ShapeColorTask:
    def __init__(self, image_size: int):
        self.model = ShapeColorNet()
        self.image_size = image_size

    def init(self, rng):
        return self.model.init(rng, jnp.zeros((1, self.image_size, self.image_size, 3)))

    def _losses(self, params, batch):
        logits = self.model.apply({"params": params}, batch["image"])
        out = {}
        for name in logits:
            out[f"{name}_loss"] = optax.softmax_cross_entropy_with_integer_labels(logits[name], batch[name]).mean()
            out[f"{name}_accuracy"] = (logits[name].argmax(-1) == batch[name]).mean()
        return out

    def loss(self, params, model_state, batch, rng, step):
        m = self._losses(params, batch)
        return m["shape_loss"] + m["color_loss"], m, None

    def eval_metrics(self, params, model_state, batch):
        return self._losses(params, batch)


class ArrayBatches:
    """Shuffled epochs over in-memory arrays; the position (epoch, index) is checkpointable."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(next(iter(arrays.values())))
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self):
        per_epoch = self.n // self.batch_size
        epoch, i = divmod(self.step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        rows = order[i * self.batch_size:(i + 1) * self.batch_size]
        self.step += 1
        return {k: v[rows] for k, v in self.arrays.items()}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def _arrays(examples) -> dict[str, np.ndarray]:
    return {
        "image": np.stack([np.asarray(e["image"], np.float32) / 255.0 for e in examples]),
        "shape": np.asarray([shapes.SHAPES.index(e["shape"]) for e in examples], np.int32),
        "color": np.asarray([shapes.COLORS.index(e["color"]) for e in examples], np.int32),
    }


def run(workdir: Path, train_examples, heldout, *, steps: int, batch_size: int = 64) -> dict:
    batch_size -= batch_size % len(jax.devices())
    train = _arrays(train_examples)
    held = _arrays([heldout[i] for i in range(len(heldout) - len(heldout) % batch_size)])
    image_size = train["image"].shape[1]
    cfg = TrainerConfig(total_steps=steps, global_batch_size=batch_size, mesh="data_parallel",
                        log_every=10, eval_every=max(steps // 3, 1), checkpoint_every=100)
    optim = {"learning_rate": 3e-3, "warmup_steps": min(20, steps), "total_steps": steps, "weight_decay": 1e-4}
    trainer = Trainer(ShapeColorTask(image_size), cfg, optim, workdir)

    def heldout_batches():
        for i in range(0, len(held["image"]), batch_size):
            yield {k: v[i:i + batch_size] for k, v in held.items()}

    result = trainer.fit(ArrayBatches(train, batch_size), eval_batches=heldout_batches)
    trainer.close()
    final = result.eval_history[-1]
    return {
        "devices": len(jax.devices()),
        "steps": result.step,
        "first_loss": result.history[0]["loss"],
        "final_loss": result.history[-1]["loss"],
        "examples_per_second": result.examples_per_second,
        "heldout_shape_accuracy": final["shape_accuracy"],
        "heldout_color_accuracy": final["color_accuracy"],
        "chance_shape_accuracy": 1 / len(shapes.SHAPES),
        "chance_color_accuracy": 1 / len(shapes.COLORS),
    }
