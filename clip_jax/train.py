"""CLIP contrastive training as a task for the shared trainer (common/trainer.py).

`CLIPTask` gives the trainer init / loss / eval; the driver that wires a config to it is
experiments/train_clip.py.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clip_jax import losses
from clip_jax.model import CLIP, dummy_inputs
from clip_jax.variants import CLIPConfig
from common.data.transforms import CenterCrop, Compose, DecodeImage, RandomResizedCrop, Select, Tokenize

# SigLIP's initial temperature and bias (Zhai et al. 2023, section 3.2).
SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS = math.log(10.0), -10.0


def clip_transform(image_size: int, context_length: int, *, train: bool, crop_scale: tuple[float, float] = (0.9, 1.0),
                   tokenizer: Any = "clip") -> Compose:
    """Records -> {"image": uint8 (S, S, 3), "text": int32 (context_length,)}, CLIPTask's batches.

    Training: open_clip's RandomResizedCrop of `crop_scale` of the image area, one caption drawn
    per epoch; evaluation: OpenAI CLIP's resize and center crop, the first caption. `tokenizer` is
    "clip" or any tokenizer `common.data.transforms.Tokenize` takes.
    """
    crop = RandomResizedCrop(image_size, scale=tuple(crop_scale)) if train else CenterCrop(image_size)
    return Compose((Tokenize(tokenizer, context_length, random_caption=train), DecodeImage(), crop,
                    Select("image", "text")))


class CLIPTask:
    """Contrastive image-text training of a `CLIP` module on batches from `clip_transform`.

    Images come as uint8 pixels and are normalised on the device (`CLIP.encode_image`).

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

    def loss(self, params, model_state, batch, rng, update):
        return self._loss(params, model_state, batch, train=True)

    def eval_metrics(self, params, model_state, batch):
        loss, metrics, _ = self._loss(params, model_state, batch, train=False)
        return {"loss": loss, **metrics}
