"""Load CLIP weights at another image size or text context length.

Image size: the ViT's positional embeddings are a class-token row and a (grid, grid) raster of
patch rows; the raster is resampled bicubically to the new grid and the class row kept, as
open_clip's `resize_pos_embed` and big_vision's `resample_posemb` do (Dosovitskiy et al. 2021,
section 3.2: "2D interpolation of the pre-trained position embeddings"). The kernel is PyTorch's
`F.interpolate(mode="bicubic", align_corners=False)` (Keys' cubic, a = -0.75, edges clamped,
no antialiasing), so a grid resized here equals one resized by open_clip when upsampling. A
ModifiedResNet's attention-pool embedding (a mean-token row and a (S/32)^2 raster) is resized the same way.

Context length: CLIP's text tower is causal, so a shorter context needs only the first positions
(truncation changes nothing for captions that fit). A longer one stretches the learned positions
linearly (`F.interpolate(mode="linear", align_corners=False)`, as open_clip's `resize_text_pos_embed`):
the new positions are new to the model, so fine-tune before trusting features of long captions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from clip_jax.variants import CLIPConfig

BICUBIC_A = -0.75  # PyTorch's (and OpenCV's) choice of Keys' free parameter


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at distances t (PyTorch's cubic_convolution1/2)."""
    t, a = np.abs(t), BICUBIC_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1  # |t| <= 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def interpolation_matrix(old: int, new: int, method: str) -> np.ndarray:
    """(new, old) float64 weights W with resized = W @ original along one axis.

    Sample i reads the source at (i + 0.5) * old / new - 0.5 (align_corners=False); "bicubic" uses the
    4 nearest source samples, indices clamped to the edge; "linear" the 2 nearest, clamped at 0.
    """
    if method not in ("bicubic", "linear"):
        raise ValueError(f"method must be 'bicubic' or 'linear', found {method!r}")
    weights = np.zeros((new, old))
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        if method == "linear":
            x = max(x, 0.0)
            lo = min(math.floor(x), old - 1)
            frac = x - lo
            weights[i, lo] += 1.0 - frac
            weights[i, min(lo + 1, old - 1)] += frac
        else:
            lo = math.floor(x)
            for k in range(-1, 3):
                weights[i, min(max(lo + k, 0), old - 1)] += _cubic(np.asarray(x - (lo + k)))
    return weights


def resize_position_grid(posemb: np.ndarray, grid: int) -> np.ndarray:
    """(1 + g*g, D) embeddings, leading class row then a row-major (g, g) raster -> (1 + grid*grid, D).

    Bicubic as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`; the class row is kept.
    """
    posemb = np.asarray(posemb)
    old = math.isqrt(posemb.shape[0] - 1)
    if old * old != posemb.shape[0] - 1:
        raise ValueError(f"expected a class row and a square grid of positions, found {posemb.shape[0]} rows")
    if old == grid:
        return posemb
    w = interpolation_matrix(old, grid, "bicubic")  # (grid, old)
    raster = posemb[1:].reshape(old, old, -1).astype(np.float64)  # (old, old, D)
    resized = np.einsum("ih,jw,hwd->ijd", w, w, raster).reshape(grid * grid, -1)
    return np.concatenate([posemb[:1], resized.astype(posemb.dtype)])


def resize_text_positions(posemb: np.ndarray, context_length: int) -> np.ndarray:
    """(L, D) text positions -> (context_length, D): the first ones when shorter, linearly stretched when longer."""
    posemb = np.asarray(posemb)
    if context_length <= posemb.shape[0]:
        return posemb[:context_length]
    w = interpolation_matrix(posemb.shape[0], context_length, "linear")  # (new, L)
    return (w @ posemb.astype(np.float64)).astype(posemb.dtype)


def resized_config(cfg: CLIPConfig, *, image_size: int | None = None, context_length: int | None = None) -> CLIPConfig:
    """`cfg` at another image size and/or context length; None keeps its own."""
    vision = cfg.vision if image_size is None else dataclasses.replace(cfg.vision, image_size=image_size)
    text = cfg.text if context_length is None else dataclasses.replace(cfg.text, context_length=context_length)
    return dataclasses.replace(cfg, vision=vision, text=text)


def resize_variables(variables: dict, cfg: CLIPConfig, *, image_size: int | None = None,
                     context_length: int | None = None) -> tuple[CLIPConfig, dict]:
    """(config, variables) of an unscanned CLIP (`clip_jax.convert` layout) at a new image size and/or
    context length; None keeps the checkpoint's. Everything but the positional embeddings is shared."""
    vision, text = cfg.vision, cfg.text
    image_size = image_size or vision.image_size
    context_length = context_length or text.context_length
    stride = vision.total_stride
    if image_size % stride:
        raise ValueError(f"image_size must be a multiple of {stride} (the {'ResNet stride' if vision.is_resnet else 'patch size'}), "
                         f"found {image_size}")
    params = dict(variables["params"])
    if image_size != vision.image_size:
        visual = dict(params["visual"])
        if vision.is_resnet:
            pool = dict(visual["attnpool"])
            pool["positional_embedding"] = resize_position_grid(np.asarray(pool["positional_embedding"]), image_size // stride)
            visual["attnpool"] = pool
        else:
            visual["positional_embedding"] = resize_position_grid(np.asarray(visual["positional_embedding"]),
                                                                  image_size // stride)
        params["visual"] = visual
    if context_length != text.context_length:
        params["text"] = dict(params["text"], positional_embedding=resize_text_positions(
            np.asarray(params["text"]["positional_embedding"]), context_length))
    return resized_config(cfg, image_size=image_size, context_length=context_length), {**variables, "params": params}
