"""The two-tower CLIP model (OpenAI clip/model.py `CLIP`; Radford et al. 2021, figure 3).

Parameters: `visual` (VisionTransformer or ModifiedResNet), `text` (TextTransformer) and
the scalar `logit_scale`, initialised to log(1 / 0.07). ModifiedResNet variants also
have a `batch_stats` collection. Features are normalised and the logits computed in fp32.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.resnet import ModifiedResNet
from clip_jax.text import TextTransformer
from clip_jax.variants import CLIPConfig
from clip_jax.vit import VisionTransformer
from common.images import CLIP_MEAN, CLIP_STD
from common.layers import Dtype, partitioned

MAX_LOGIT_SCALE = 100.0  # OpenAI clips the learned temperature so that exp(logit_scale) <= 100 (section 2.5)


class CLIP(nn.Module):
    """CLIP with `encode_image`, `encode_text` and `__call__(images, texts)`.

    dtype: compute dtype (bf16 on accelerators); param_dtype: storage dtype.
    remat / scan_layers: see `common.layers.Transformer`; the ResNet tower supports remat only.
    train_batchnorm: the ResNet's BatchNorm uses (and updates) batch statistics, as in training.
    patch_dropout: the ViT keeps a random (1 - patch_dropout) of each image's patch tokens (FLIP),
      as in training; apply with rngs={"patch_dropout": key}. Evaluation models keep 0.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    train_batchnorm: bool = False  # ModifiedResNet only: batch statistics; apply with mutable=["batch_stats"]
    patch_dropout: float = 0.0  # ViT only: fraction of patch tokens dropped per example (training)

    def setup(self):
        cfg = self.config
        if cfg.vision.is_resnet and self.patch_dropout:
            raise ValueError(f"patch_dropout={self.patch_dropout} needs a ViT image tower (patch tokens to drop); "
                             "this CLIP has a ModifiedResNet: set patch_dropout to 0.")
        if cfg.vision.is_resnet:
            self.visual = ModifiedResNet(
                cfg.vision, cfg.embed_dim, self.dtype, self.param_dtype, self.remat, self.train_batchnorm
            )
        else:
            self.visual = VisionTransformer(
                cfg.vision, cfg.embed_dim, self.dtype, self.param_dtype, self.remat, self.scan_layers,
                self.patch_dropout
            )
        self.text = TextTransformer(cfg.text, cfg.embed_dim, self.dtype, self.param_dtype, self.remat, self.scan_layers)
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(math.log(1 / 0.07)), ()), (), self.param_dtype
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) NHWC -> (B, embed_dim) unnormalised features in `dtype`.

        uint8 images are RGB pixels, normalised here (on the device) as `common.images.normalize_rgb`
        does; float images are taken as already normalised (`common.images.clip_preprocess`).
        """
        if images.dtype == jnp.uint8:
            images = (images.astype(jnp.float32) / 255.0 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
        return self.visual(images)

    def encode_text(self, texts: jax.Array) -> jax.Array:
        """texts (B, L) int token ids, end-of-text being the highest id -> (B, embed_dim) features."""
        return self.text(texts)

    def __call__(self, images: jax.Array, texts: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)) in fp32."""
        image_features = normalize(self.encode_image(images))
        text_features = normalize(self.encode_text(texts))
        scale = jnp.minimum(jnp.exp(self.logit_scale.astype(jnp.float32)), MAX_LOGIT_SCALE)
        logits_per_image = scale * image_features @ text_features.T
        return logits_per_image, logits_per_image.T


def normalize(features: jax.Array) -> jax.Array:
    """L2-normalises the last axis in fp32."""
    features = features.astype(jnp.float32)
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def dummy_inputs(config: CLIPConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero images (B, H, W, 3) and token ids (B, context_length) for `init` / `jax.eval_shape`."""
    size = config.vision.image_size
    return jnp.zeros((batch, size, size, 3), jnp.float32), jnp.zeros((batch, config.text.context_length), jnp.int32)


def abstract_variables(model: CLIP) -> dict:
    """The variables of `model` as ShapeDtypeStructs, boxed with logical axis names; allocates nothing."""
    images, texts = dummy_inputs(model.config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images, texts))


def count_params(model: CLIP) -> int:
    """Number of trainable parameters (the `params` collection; BatchNorm statistics excluded)."""
    params = nn.meta.unbox(abstract_variables(model)["params"])
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
