"""A tiny regression task and a checkpointable data iterator for trainer tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


class MLP(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(self.width, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name="fc1")(x)
        x = nn.gelu(x)
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="fc2")(x)[..., 0]


class RegressionTask:
    """y = sin(x . w*) with noise."""

    def __init__(self, dim: int = 8):
        self.dim = dim
        self.model = MLP()

    def init(self, rng):
        return self.model.init(rng, jnp.zeros((1, self.dim)))

    def loss(self, params, model_state, batch, rng, update):
        pred = self.model.apply({"params": params}, batch["x"])
        noise = 0.01 * jax.random.normal(rng, pred.shape)  # uses the step rng: resume must reproduce it
        loss = jnp.mean((pred + noise - batch["y"]) ** 2)
        return loss, {"mse": loss}, None

    def eval_metrics(self, params, model_state, batch):
        pred = self.model.apply({"params": params}, batch["x"])
        weights = batch.get("valid", jnp.ones(pred.shape, bool)).astype(jnp.float32)  # padded rows: 0
        return {"mse": jnp.sum(weights * (pred - batch["y"]) ** 2) / jnp.maximum(jnp.sum(weights), 1.0)}


class RegressionData:
    """Deterministic batches; the position is the whole state. Batches at `nan_steps` hold NaN targets."""

    def __init__(self, batch_size: int, dim: int = 8, seed: int = 0, process_index: int = 0, process_count: int = 1,
                 nan_steps: tuple[int, ...] = ()):
        self.batch_size, self.dim, self.seed, self.nan_steps = batch_size, dim, seed, nan_steps
        self.process_index, self.process_count = process_index, process_count
        self.position = 0
        self.w = np.random.default_rng(1234).normal(size=dim).astype(np.float32)

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        x = rng.normal(size=(self.batch_size, self.dim)).astype(np.float32)
        y = np.sin(x @ self.w).astype(np.float32)
        if self.position in self.nan_steps:
            y[:] = np.nan
        self.position += 1
        # Each process keeps only its slice of the global batch.
        rows = self.batch_size // self.process_count
        sl = slice(self.process_index * rows, (self.process_index + 1) * rows)
        return {"x": x[sl], "y": y[sl]}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])
