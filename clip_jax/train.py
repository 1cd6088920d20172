"""CLIP contrastive training as a task for the shared trainer (common/trainer.py).

`CLIPTask` gives the trainer init / loss / eval; the driver that wires a config to it is
experiments/train_clip.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clip_jax import losses
from clip_jax.model import CLIP, dummy_inputs
from clip_jax.variants import CLIPConfig
from common.data.transforms import CenterCrop, Compose, DecodeImage, RandomResizedCrop, Select, Tokenize
from common.optim import frozen_mask

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
    keeps the stored statistics instead, as when fine-tuning; a (partly) frozen
    ResNet tower always does.

    frozen: parameter path prefixes (`clip_jax.finetune.lock_prefixes`) that get
    no gradient (stop_gradient, so no backward pass through a locked tower); give
    the same prefixes to the optimizer (`OptimConfig.frozen`) for no update and no state.
    patch_dropout: training drops this fraction of each image's patch tokens
    (FLIP); evaluation sees them all. After `patch_dropout_until_step` optimizer
    updates (None: never) training sees them all too, FLIP's unmasked tuning.
    """

    def __init__(self, config: CLIPConfig, *, loss: str = "softmax", dtype: Any = jnp.float32,
                 remat: bool = False, scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None,
                 freeze_batchnorm: bool = False, frozen: Sequence[str] = (), patch_dropout: float = 0.0,
                 patch_dropout_until_step: int | None = None):
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss must be 'softmax' or 'sigmoid', found {loss!r}.")
        self.config, self.loss_kind, self.mesh = config, loss, mesh
        self.frozen = tuple(frozen)
        self.patch_dropout, self.patch_dropout_until_step = patch_dropout, patch_dropout_until_step
        self.model = CLIP(config, dtype=dtype, remat=remat, scan_layers=scan_layers)
        image_frozen = any(p == "visual" or p.startswith("visual/") for p in self.frozen)
        self.train_batchnorm = config.vision.is_resnet and not (freeze_batchnorm or image_frozen)
        self.train_model = self.model.clone(train_batchnorm=self.train_batchnorm, patch_dropout=patch_dropout)

    def init(self, rng: jax.Array) -> dict:
        variables = dict(self.model.init(rng, *dummy_inputs(self.config)))
        if self.loss_kind == "sigmoid":
            params = dict(variables["params"])
            scalar = lambda v: nn.LogicallyPartitioned(jnp.asarray(v, jnp.float32), ())  # noqa: E731
            params["logit_scale"] = scalar(SIGLIP_INIT_SCALE)
            params["logit_bias"] = scalar(SIGLIP_INIT_BIAS)
            variables["params"] = params
        return variables

    def _encode_images(self, variables, images, rng, update):
        """Training image features (B, E) and the new BatchNorm statistics (None unless trained)."""
        if self.train_batchnorm:
            return self.train_model.apply(variables, images, method=CLIP.encode_image, mutable=["batch_stats"])
        if not self.patch_dropout:
            return self.model.apply(variables, images, method=CLIP.encode_image), None

        def encode(model):
            return model.apply(variables, images, method=CLIP.encode_image, rngs={"patch_dropout": rng})

        if self.patch_dropout_until_step is None:
            return encode(self.train_model), None
        # Both programs are compiled; each step runs one.
        return jax.lax.cond(update < self.patch_dropout_until_step, lambda: encode(self.train_model),
                            lambda: encode(self.model)), None

    def _loss(self, params, model_state, batch, rng=None, update=None):
        """Training forward when `rng` is given, evaluation otherwise."""
        if self.frozen:  # no gradient reaches frozen parameters: their backward pass is never computed
            params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen_mask(params, self.frozen),
                                  params)
        variables = {"params": params, **model_state}
        texts = self.model.apply(variables, batch["text"], method=CLIP.encode_text)  # (B, E)
        if rng is None:
            images, new_model_state = self.model.apply(variables, batch["image"], method=CLIP.encode_image), None
        else:
            images, new_model_state = self._encode_images(variables, batch["image"], rng, update)  # (B, E)
        loss, metrics = losses.contrastive_loss(self.loss_kind, images, texts, params["logit_scale"],
                                                params.get("logit_bias"), mesh=self.mesh)
        return loss, metrics, new_model_state

    def loss(self, params, model_state, batch, rng, update):
        return self._loss(params, model_state, batch, rng, update)

    def eval_metrics(self, params, model_state, batch):
        loss, metrics, _ = self._loss(params, model_state, batch)
        return {"loss": loss, **metrics}
