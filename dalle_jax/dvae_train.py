"""Training the dVAE: the relaxed ELBO, its annealing schedules, a jitted step and a plain loop.

Ramesh et al. 2021, sec. 2.1 and appendix A.2. The objective maximised is the evidence lower bound
with the Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017) of the codes:

  loss = [ -ln p(x | z~) + beta * KL(q(z | x) || uniform) ] / (H * W * C)

per image, where z~ is a relaxed sample at temperature tau, p is the logit-Laplace likelihood of
the mapped pixels (appendix A.3) and the KL sums over the h x w code positions; dividing by the
number of pixel values makes the KL weight beta / 192 at 256x256 (appendix A.2). The paper anneals
beta 0 -> 6.6 over the first 5,000 updates and tau 1 -> 1/16 over the first 150,000 (linear
annealing of tau "typically led to divergence"), and the step size 1e-4 -> 1.25e-6 over 1.2M
updates, all with cosine schedules; Adam with b2 = 0.999 and weight decay 1e-4; parameters
averaged with decay 0.999 (the ones evaluated here when `ema_decay > 0`).

The loop is a plain single-task one until `common/trainer.py` takes over.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils

from common import sharding as sh
from common.data.shapes import ShapesConfig, ShapesDataset
from common.images import save_image_grid
from common.metrics import MetricWriter, plot_curves, progress_bar
from common.optim import OptimConfig, make_optimizer
from dalle_jax.dvae import DVAE, DVAEConfig, logit_laplace_nll, map_pixels, stats_to_pixels

log = logging.getLogger(__name__)

Schedule = Literal["cosine", "linear", "exponential"]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The relaxed ELBO's weights and annealing (paper appendix A.2 defaults)."""

    kl_weight: float = 6.6  # beta, reached after kl_warmup_steps
    kl_warmup_steps: int = 5000  # beta rises from 0 over these updates
    kl_schedule: Schedule = "cosine"
    temperature_start: float = 1.0  # Gumbel-softmax tau at step 0
    temperature_end: float = 1.0 / 16  # tau after temperature_steps
    temperature_steps: int = 150_000
    temperature_schedule: Schedule = "cosine"
    straight_through: bool = False  # hard one-hot codes forward, relaxed gradients backward

    def __post_init__(self):
        for kind in (self.kl_schedule, self.temperature_schedule):
            if kind not in ("cosine", "linear", "exponential"):
                raise ValueError(
                    f"invalid LossConfig: expected schedules 'cosine', 'linear' or 'exponential', found {kind!r}"
                )
        if self.kl_schedule == "exponential":
            raise ValueError(
                "invalid LossConfig: an exponential ramp cannot start from beta = 0; use 'cosine' or 'linear'"
            )
        if self.temperature_start <= 0 or self.temperature_end <= 0 or self.kl_weight < 0:
            raise ValueError(f"invalid LossConfig: expected positive temperatures and kl_weight >= 0, found {self}")

    @classmethod
    def from_any(cls, cfg: LossConfig | Mapping[str, Any] | Any) -> LossConfig:
        if isinstance(cfg, cls):
            return cfg
        return cls(**(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))


def anneal(start: float, end: float, steps: int, kind: Schedule) -> Callable[[jax.Array], jax.Array]:
    """`start -> end` over `steps` updates, then constant at `end`. With t = min(step / steps, 1):

      cosine       end + (start - end) * (1 + cos(pi t)) / 2
      linear       start + (end - start) t
      exponential  start * (end / start) ** t        (geometric; start and end must be > 0)
    """

    def schedule(step):
        t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
        if kind == "cosine":
            return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        if kind == "linear":
            return start + (end - start) * t
        return start * (end / start) ** t

    return schedule


def temperature_schedule(cfg: LossConfig) -> Callable[[jax.Array], jax.Array]:
    return anneal(cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps, cfg.temperature_schedule)


def kl_weight_schedule(cfg: LossConfig) -> Callable[[jax.Array], jax.Array]:
    return anneal(0.0, cfg.kl_weight, cfg.kl_warmup_steps, cfg.kl_schedule)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """KL(softmax(logits) || uniform) per position, (..., vocab) -> (...): ln K - H(q)."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])


def dvae_loss(
    params: Any, images: jax.Array, rng: jax.Array, step: jax.Array, *, model: DVAE, loss_cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scaled negative relaxed ELBO (module docstring) for (B, H, W, C) images in [0, 1]."""
    x = map_pixels(images)
    temperature, beta = temperature_schedule(loss_cfg)(step), kl_weight_schedule(loss_cfg)(step)
    variables = {"params": params}
    logits, stats = model.apply(variables, x, temperature, hard=loss_cfg.straight_through, rngs={"gumbel": rng})
    dims = math.prod(images.shape[1:])
    nll = logit_laplace_nll(x, stats).sum(axis=(1, 2, 3))  # (B,)
    kl = kl_to_uniform(logits).sum(axis=(1, 2))  # (B,)
    loss = jnp.mean(nll + beta * kl) / dims
    metrics = dict(
        loss=loss, nll_per_dim=jnp.mean(nll) / dims, kl_per_image=jnp.mean(kl), temperature=temperature, kl_weight=beta
    )
    return loss, metrics


class TrainState(struct.PyTreeNode):
    step: jax.Array  # () int32, optimizer updates done
    params: Any
    opt_state: Any
    ema_params: Any  # parameter average used for evaluation; None when ema_decay == 0
    rng: jax.Array  # base key; step t uses fold_in(rng, t)


def train_step(
    state: TrainState,
    images: jax.Array,
    *,
    model: DVAE,
    tx: optax.GradientTransformation,
    loss_cfg: LossConfig,
    ema_decay: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on (B, H, W, C) uint8 images. Pure; jit it with `donate_argnums=0`."""
    images = images.astype(jnp.float32) / 255.0
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(functools.partial(dvae_loss, model=model, loss_cfg=loss_cfg), has_aux=True)
    (_, metrics), grads = grad_fn(state.params, images, rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema_params is None else optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def eval_step(params: Any, images: jax.Array, *, model: DVAE) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstructs uint8 images through their argmax codes. Returns the (B, H, W, C) reconstructions
    in [0, 1] and batch sums: squared error per image, PSNR per image, and (vocab,) code counts."""
    x = images.astype(jnp.float32) / 255.0
    logits = model.apply({"params": params}, map_pixels(x), method=DVAE.encode)
    codes = jnp.argmax(logits, axis=-1)  # (B, h, w)
    rec = stats_to_pixels(model.apply({"params": params}, codes.astype(jnp.int32), method=DVAE.decode))
    mse = jnp.mean(jnp.square(rec - x), axis=(1, 2, 3))  # (B,)
    psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))  # peak value 1
    counts = jnp.zeros(logits.shape[-1], jnp.int32).at[codes.ravel()].add(1)
    return rec, dict(mse=mse.sum(), psnr=psnr.sum(), count=jnp.asarray(mse.shape[0], jnp.float32), code_counts=counts)


def codebook_stats(code_counts: np.ndarray) -> dict[str, float]:
    """Perplexity exp(H(p)) of the average code usage p, and how many codes were never used."""
    p = code_counts / max(code_counts.sum(), 1)
    nz = p[p > 0]
    return dict(perplexity=float(np.exp(-np.sum(nz * np.log(nz)))), dead_codes=int(np.sum(code_counts == 0)))


def shapes_batches(
    split: str, num_examples: int, image_size: int, batch_size: int, *, seed: int, shuffle: bool
) -> Iterator[np.ndarray]:
    """(batch, S, S, 3) uint8 batches of this host's share of the shapes dataset, epoch after epoch
    (or one pass when not shuffling). Each process reads `batch_size / process_count` rows."""
    ds = ShapesDataset(split, num_examples, ShapesConfig(image_size=image_size, seed=seed))
    per_host = batch_size // jax.process_count()
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_examples) if shuffle else np.arange(num_examples)
        order = order[jax.process_index() :: jax.process_count()]
        for i in range(0, len(order) - per_host + 1, per_host):
            yield np.stack([ds[int(j)]["image"] for j in order[i : i + per_host]])
        if not shuffle:
            return


def evaluate(
    params: Any, batches: Iterator[np.ndarray], eval_fn: Callable, mesh: Any
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Mean MSE / PSNR over the batches plus codebook usage; also the first batch's reconstructions.
    Batches must be full (`shapes_batches` drops a last partial one)."""
    totals, first = None, None
    for images in batches:
        rec, sums = eval_fn(params, sh.shard_batch(images, mesh))
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        if first is None:
            # Rows of every process, in process order: this host's rows come at its offset (0 on the chief).
            first = (images, np.asarray(multihost_utils.process_allgather(rec, tiled=True)))
    n = totals["count"]
    metrics = dict(eval_mse=float(totals["mse"] / n), eval_psnr=float(totals["psnr"] / n))
    metrics.update({f"eval_{k}": v for k, v in codebook_stats(np.asarray(totals["code_counts"])).items()})
    return metrics, first


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, float]]:
    """Trains a dVAE on the shapes dataset as `config` (experiments/configs/dvae.py) says.

    Writes `metrics.jsonl` (+ TensorBoard), `recon_<step>.png` grids (originals over their
    reconstructions) and `curves.png` under `workdir`. Returns the eval records, step 0 first.
    """
    workdir = Path(workdir)
    model = DVAE(DVAEConfig(**config.model), dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32)
    loss_cfg = LossConfig.from_any(config.loss)
    tx = make_optimizer(OptimConfig.from_any(config.optim))
    mesh = sh.make_mesh(config.mesh)
    sh.check_batch_divisible(config.batch_size, mesh)
    size = config.data.image_size

    def init_state(rng):
        k_params, k_gumbel, k_train = jax.random.split(rng, 3)
        dummy = jnp.zeros((1, size, size, model.config.channels), jnp.float32)
        params = model.init({"params": k_params, "gumbel": k_gumbel}, dummy, 1.0)["params"]
        ema = params if config.ema_decay > 0 else None
        step = jnp.zeros((), jnp.int32)
        return TrainState(step=step, params=params, opt_state=tx.init(params), ema_params=ema, rng=k_train)

    state, state_shardings = sh.init_sharded(init_state, jax.random.PRNGKey(config.seed), mesh=mesh)
    data_sharding, replicated = sh.batch_sharding(mesh, 4), sh.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, loss_cfg=loss_cfg, ema_decay=config.ema_decay),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(functools.partial(eval_step, model=model), out_shardings=(data_sharding, replicated))
    data = functools.partial(shapes_batches, image_size=size, batch_size=config.batch_size, seed=config.data.seed)
    train_data = data("train", config.data.train_examples, shuffle=True)

    def eval_batches():
        return data("validation", config.data.eval_examples, shuffle=False)

    history, pending = [], []
    writer = MetricWriter(workdir)

    def run_eval(step):
        params = state.params if state.ema_params is None else state.ema_params
        metrics, (images, rec) = evaluate(params, eval_batches(), eval_fn, mesh)
        writer.write_scalars(step, metrics)
        n = min(config.num_grid_images, len(images))
        if jax.process_index() == 0:
            save_image_grid(np.concatenate([images[:n] / 255.0, rec[:n]]), workdir / f"recon_{step:06d}.png", ncols=n)
        history.append(dict(step=step, **metrics))
        log.info("step %d: %s", step, metrics)

    with sh.use_mesh(mesh), writer:
        run_eval(0)
        start = time.perf_counter()
        bar = progress_bar(config.num_steps, desc="dvae")
        for step in range(1, config.num_steps + 1):
            state, metrics = step_fn(state, sh.shard_batch(next(train_data), mesh))
            pending.append(metrics)
            if step % config.log_every == 0 or step == config.num_steps:
                pending = jax.device_get(pending)
                means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                means["images_per_sec"] = len(pending) * config.batch_size / (time.perf_counter() - start)
                writer.write_scalars(step, means)
                bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
                pending, start = [], time.perf_counter()
            if step % config.eval_every == 0 or step == config.num_steps:
                eval_start = time.perf_counter()
                run_eval(step)
                start += time.perf_counter() - eval_start  # keep evaluation out of images_per_sec
            bar.update()
        bar.close()
    if jax.process_index() == 0:
        plot_curves(workdir, ["loss", "kl_per_image", "eval_psnr", "eval_perplexity"], workdir / "curves.png")
    return history
