"""Training the dVAE on the shared trainer: the relaxed ELBO, its annealing schedules and `DVAETask`.

Ramesh et al. 2021, sec. 2.1 and appendix A.2. The objective maximised is the evidence lower bound
with the Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017) of the codes:

  loss = [ -ln p(x | z~) + beta * KL(q(z | x) || uniform) ] / (H * W * C)

per image, where z~ is a relaxed sample at temperature tau, p is the logit-Laplace likelihood of
the mapped pixels (appendix A.3) and the KL sums over the h x w code positions; dividing by the
number of pixel values makes the KL weight beta / 192 at 256x256 (appendix A.2). The paper anneals
beta 0 -> 6.6 over the first 5,000 updates and tau 1 -> 1/16 over the first 150,000 (linear
annealing of tau "typically led to divergence"), and the step size 1e-4 -> 1.25e-6 over 1.2M
updates, all with cosine schedules; Adam with b2 = 0.999 and weight decay 1e-4; parameters
averaged with decay 0.999 per update (the trainer's `ema_decay`; evaluation uses the average).

One addition, off by default: `usage_weight` > 0 adds w * KL(q_mean || uniform), q_mean the code
distribution averaged over the whole batch and every position (wav2vec 2.0's codebook diversity term,
Baevski et al. 2020). The paper's per-position KL pushes each q towards uniform, not the codebook's use;
short runs settle on a few dozen codes (the demo's 800 steps: perplexity 16 of 512), which this spreads.

`DVAETask` plugs this into `common/trainer.py` (sharded step, checkpoints with the data position,
preemption-safe resume); the driver that wires a config to it is experiments/train_dvae.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from common.data.transforms import CenterCrop, Compose, DalleAugment, DecodeImage, Select
from dalle_jax.dvae import DVAE, logit_laplace_nll, map_pixels, stats_to_pixels

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
    # Not in the paper (0 = the paper's objective): weight of KL(mean q || uniform), the batch's average
    # code distribution against uniform (wav2vec 2.0's codebook diversity term). It keeps codes alive
    # where a short run would otherwise settle on a few dozen of them.
    usage_weight: float = 0.0

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
        if self.temperature_start <= 0 or self.temperature_end <= 0 or self.kl_weight < 0 or self.usage_weight < 0:
            raise ValueError("invalid LossConfig: expected positive temperatures, kl_weight >= 0 and usage_weight >= 0, "
                             f"found {self}")


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
    return _kl_to_uniform(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def _kl_to_uniform(log_q: jax.Array) -> jax.Array:
    """`kl_to_uniform` of normalised log-probabilities (..., vocab)."""
    return jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(log_q.shape[-1])


def _log_mean_probs(log_q: jax.Array) -> jax.Array:
    """(..., vocab) normalised log-probabilities -> (vocab,) log of their mean distribution."""
    flat = log_q.reshape(-1, log_q.shape[-1])
    return jax.nn.logsumexp(flat, axis=0) - math.log(flat.shape[0])


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
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, h, w, vocab), once for both KL terms
    kl = _kl_to_uniform(log_q).sum(axis=(1, 2))  # (B,)
    usage_kl = _kl_to_uniform(_log_mean_probs(log_q))  # KL(mean q || uniform) over the whole (global) batch
    loss = jnp.mean(nll + beta * kl) / dims + loss_cfg.usage_weight * usage_kl
    metrics = dict(
        loss=loss, nll_per_dim=jnp.mean(nll) / dims, kl_per_image=jnp.mean(kl), temperature=temperature, kl_weight=beta,
        usage_perplexity=jnp.exp(math.log(logits.shape[-1]) - usage_kl),
    )
    return loss, metrics


def _unit_interval(images: jax.Array) -> jax.Array:
    """uint8 (B, H, W, C) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


class DVAETask:
    """The dVAE as a `common.trainer.Task`: batches are {"image": uint8 (B, H, W, C)}.

    The annealing schedules follow the trainer's count of optimizer updates (under gradient
    accumulation several steps make one update). The paper's parameter averaging (decay 0.999 per
    update) is the trainer's `ema_decay`; evaluation then sees the average.
    """

    def __init__(self, model: DVAE, loss_cfg: LossConfig, *, image_size: int):
        multiple = model.config.downsample
        if image_size < multiple or image_size % multiple:
            raise ValueError(f"image_size={image_size} must be a positive multiple of {multiple}, the dVAE's "
                             f"downsampling with group_count={model.config.group_count}; pick e.g. "
                             f"{max(multiple, image_size // multiple * multiple)}.")
        self.model, self.loss_cfg, self.image_size = model, loss_cfg, image_size

    def init(self, rng: jax.Array) -> dict[str, Any]:
        k_params, k_gumbel = jax.random.split(rng)
        dummy = jnp.zeros((1, self.image_size, self.image_size, self.model.config.channels), jnp.float32)
        return self.model.init({"params": k_params, "gumbel": k_gumbel}, dummy, 1.0)

    def loss(self, params, model_state, batch, rng, update):
        loss, metrics = dvae_loss(params, _unit_interval(batch["image"]), rng, update, model=self.model,
                                  loss_cfg=self.loss_cfg)
        return loss, metrics, None

    def reconstruct(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """uint8 (B, H, W, C) -> ((B, h, w) argmax codes, (B, H, W, C) reconstructions in [0, 1])."""
        variables = {"params": params}
        logits = self.model.apply(variables, map_pixels(_unit_interval(images)), method=DVAE.encode)
        codes = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B, h, w)
        return codes, stats_to_pixels(self.model.apply(variables, codes, method=DVAE.decode))

    def eval_metrics(self, params, model_state, batch):
        """Means over the real rows (`valid`) of the squared error and of the PSNR (peak 1) per image,
        through argmax codes."""
        _, rec = self.reconstruct(params, batch["image"])
        mse = jnp.mean(jnp.square(rec - _unit_interval(batch["image"])), axis=(1, 2, 3))  # (B,)
        psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
        weights = batch.get("valid", jnp.ones(mse.shape, bool)).astype(jnp.float32)  # (B,)
        mean = lambda x: jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)  # noqa: E731
        return {"mse": mean(mse), "psnr": mean(psnr)}


def codebook_stats(code_counts: np.ndarray) -> dict[str, float]:
    """Perplexity exp(H(p)) of the average code usage p, and how many codes were never used."""
    p = code_counts / max(code_counts.sum(), 1)
    nz = p[p > 0]
    return dict(perplexity=float(np.exp(-np.sum(nz * np.log(nz)))), dead_codes=int(np.sum(code_counts == 0)))


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def dvae_transform(image_size: int, *, train: bool) -> Compose:
    """Records -> {"image": uint8 (S, S, 3)}; captions and labels are neither needed nor read.

    Training: the paper's augmentation (appendix A, Listing 1: a random crop of the shorter
    side, resized, randomly cropped to S and flipped); evaluation: resize and center crop.
    """
    crop = DalleAugment(image_size) if train else CenterCrop(image_size)
    return Compose((DecodeImage(), crop, Select("image")))
