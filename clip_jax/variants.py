"""CLIP model hyperparameters and the table of named variants.

Names are the original ones ("ViT-B/32", "RN50", "ViT-bigG/14"). Sources:
  * OpenAI: clip/model.py `build_model` (which derives every size from the released
    state dicts) and the model card (github.com/openai/CLIP/blob/main/model-card.md).
    OpenAI heads are derived, never stored: ViT `width // 64`, ModifiedResNet
    `width * 32 // 64`, text `width // 64`.
  * open_clip: src/open_clip/model_configs/{ViT-H-14,ViT-g-14,ViT-bigG-14}.json, whose
    heads are `width // head_width` and whose MLP width is `int(width * mlp_ratio)`
    (open_clip transformer.py `ResidualAttentionBlock`); they use exact (erf) GELU.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

Activation = Literal["quick_gelu", "gelu"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower. A ViT when `layers` is an int, a ModifiedResNet when it is a 4-tuple.

    Attributes:
      image_size: input height and width in pixels (square images).
      layers: ViT depth, or the number of Bottleneck blocks in each of the four ResNet stages.
      width: ViT residual width, or the ResNet stem width (the attention pool sees `32 * width`).
      heads: attention heads (ViT blocks, or the ResNet attention pool).
      patch_size: ViT patch size; None for a ResNet.
      mlp_ratio: ViT MLP width over residual width (open_clip truncates `width * mlp_ratio`).
      act: ViT MLP activation: OpenAI's QuickGELU or exact GELU.
      stem_stride: ResNet only: how much the stem downsamples. 4 is OpenAI's (a stride-2 conv, then a 2x2
        average pool); 2 keeps the pool only, 1 neither, for small images whose objects are a few pixels
        (32-pixel images). The attention pool sees an `image_size / (8 * stem_stride)` grid.
    """

    image_size: int
    layers: int | tuple[int, int, int, int]
    width: int
    heads: int
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    act: Activation = "quick_gelu"
    stem_stride: int = 4

    def __post_init__(self):
        if self.is_resnet:
            if len(self.layers) != 4 or self.patch_size is not None:
                raise ValueError(
                    "a ModifiedResNet needs 4 stage depths and patch_size=None, "
                    f"found layers={self.layers}, patch_size={self.patch_size}"
                )
            if self.stem_stride not in (1, 2, 4):
                raise ValueError(f"ModifiedResNet stem_stride must be 1, 2 or 4, found {self.stem_stride}")
            if self.image_size % self.total_stride:
                raise ValueError(
                    f"ModifiedResNet downsamples by {self.total_stride}: image_size must be a multiple of "
                    f"{self.total_stride}, found {self.image_size}"
                )
            _check_heads(32 * self.width, self.heads, "ModifiedResNet attention pool (32 * width)")
        else:
            if self.patch_size is None or self.image_size % self.patch_size:
                raise ValueError(
                    "a ViT needs image_size divisible by patch_size, "
                    f"found image_size={self.image_size}, patch_size={self.patch_size}"
                )
            if self.stem_stride != 4:
                raise ValueError(f"stem_stride is a ModifiedResNet setting; a ViT has patch_size, found {self.stem_stride}")
            _check_heads(self.width, self.heads, "ViT width")
        _check_act(self.act)

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def total_stride(self) -> int:
        """Input pixels per output position: a ResNet's stem times its three 2x stages; a ViT's patch size."""
        return 8 * self.stem_stride if self.is_resnet else self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Causal text transformer pooled at the end-of-text token (the highest token id)."""

    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    act: Activation = "quick_gelu"

    def __post_init__(self):
        _check_heads(self.width, self.heads, "text width")
        _check_act(self.act)

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Two towers projected into a shared `embed_dim`-dimensional space."""

    embed_dim: int
    vision: VisionConfig
    text: TextConfig


def _check_heads(width: int, heads: int, what: str) -> None:
    if heads < 1 or width % heads:
        raise ValueError(f"{what} {width} must be divisible by heads={heads}; choose heads dividing it")


def _check_act(act: str) -> None:
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"act must be 'quick_gelu' or 'gelu', found {act!r}")


def _openai_vit(embed_dim, image_size, patch_size, width, layers, text_width) -> CLIPConfig:
    return CLIPConfig(
        embed_dim,
        VisionConfig(image_size, layers, width, width // 64, patch_size),
        TextConfig(text_width, text_width // 64, 12),
    )


def _openai_resnet(embed_dim, image_size, layers, width, text_width) -> CLIPConfig:
    return CLIPConfig(
        embed_dim,
        VisionConfig(image_size, layers, width, width * 32 // 64),
        TextConfig(text_width, text_width // 64, 12),
    )


def _open_clip_vit(embed_dim, layers, width, head_width, mlp_ratio, text_width, text_heads, text_layers) -> CLIPConfig:
    return CLIPConfig(
        embed_dim,
        VisionConfig(224, layers, width, width // head_width, 14, mlp_ratio, "gelu"),
        TextConfig(text_width, text_heads, text_layers, act="gelu"),
    )


_VARIANTS: dict[str, CLIPConfig] = {
    # OpenAI (clip/model.py build_model on the released checkpoints; model-card.md). Every OpenAI
    # text tower has 12 layers and width // 64 heads.
    #                        embed  image  stages            width  text width
    "RN50": _openai_resnet(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _openai_resnet(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _openai_resnet(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _openai_resnet(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _openai_resnet(1024, 448, (3, 15, 36, 10), 128, 1024),
    #                        embed  image  patch  width  layers  text width
    "ViT-B/32": _openai_vit(512, 224, 32, 768, 12, 512),
    "ViT-B/16": _openai_vit(512, 224, 16, 768, 12, 512),
    "ViT-L/14": _openai_vit(768, 224, 14, 1024, 24, 768),
    "ViT-L/14@336px": _openai_vit(768, 336, 14, 1024, 24, 768),
    # open_clip model_configs/*.json (LAION-2B checkpoints): all 224px, patch 14. Parameter counts
    # match open_clip docs/model_profile.csv (986.11M, 1366.68M, 2539.57M; tested).
    #                               embed  layers  width  head_w  mlp_ratio  text: width heads layers
    "ViT-H/14": _open_clip_vit(1024, 32, 1280, 80, 4.0, 1024, 16, 24),
    "ViT-g/14": _open_clip_vit(1024, 40, 1408, 88, 4.3637, 1024, 16, 24),
    "ViT-bigG/14": _open_clip_vit(1280, 48, 1664, 104, 4.9231, 1280, 20, 32),
}

OPENAI_VARIANTS: tuple[str, ...] = (
    "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"
)


def known_variants() -> tuple[str, ...]:
    return tuple(_VARIANTS)


def decode_variant(name: str) -> CLIPConfig:
    """Returns the hyperparameters of the CLIP variant called `name` (e.g. "ViT-B/32")."""
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown CLIP variant {name!r}; known variants: {', '.join(_VARIANTS)}") from None
