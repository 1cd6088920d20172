"""Attention masks of the DALL·E transformer over one text + image stream.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", section 2.2 and
appendix B.1, figure 11. The stream is `text_len` caption tokens followed by
the `image_h * image_w` image tokens in raster order (row by row). In every
layer, text tokens attend causally to text tokens, and every image token sees
every text token. Image-to-image attention is one of:

* ``dense``: causal over the whole stream (the standard GPT mask).
* ``row`` (figure 11a): the image token at raster position p sees the image
  positions p - W .. p, i.e. itself, the tokens to its left in its row, and
  the tokens of the previous row at its column and to its right. This is the
  Sparse Transformer's strided "local" head (Child et al. 2019, section 4.1,
  stride l = W) with the window reaching the same column one row up, as the
  paper's figure draws it (W + 1 image keys per query).
* ``column`` (figure 11b): the image positions of the same column in the same
  or earlier rows, p - k W for k >= 0: the Sparse Transformer's strided head.
  One row layer and one column layer together (in either order) reach every
  earlier image position, while each sees O(W) (resp. O(H)) image keys.
* ``conv`` (figure 11d): the causal k x k window, as a PixelCNN-style masked
  convolution: the positions (r', c') with |r' - r| <= k // 2 and
  |c' - c| <= k // 2 that are not after (r, c) in raster order (the kernel
  centred on the query, with its future half removed). The paper uses k = 11.

`layer_kinds` gives the paper's per-layer schedule: layer i = 1 .. N - 1 uses
column attention where (i - 2) mod 4 == 0 and row attention otherwise; the
last layer is convolutional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ("dense", "row", "column", "conv")


def attention_mask(kind: str, *, text_len: int, image_h: int, image_w: int, kernel: int = 11,
                   xp: Any = np) -> Any:
    """bool (L, L), L = text_len + image_h * image_w; True where query (row) may attend to key (column).

    See the module docstring for each kind's definition and source. `xp` is the
    array module: numpy (default), or jax.numpy to build the mask inside a
    compiled function instead of embedding it as a constant.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown attention mask kind {kind!r}; expected one of {KINDS}.")
    if text_len < 0 or image_h < 1 or image_w < 1:
        raise ValueError(f"Expected text_len >= 0 and a positive image grid, found text_len={text_len}, "
                         f"image_h={image_h}, image_w={image_w}.")
    if kind == "conv" and (kernel < 1 or kernel % 2 == 0):
        raise ValueError(f"Expected an odd convolution kernel >= 1, found kernel={kernel}.")
    positions = xp.arange(text_len + image_h * image_w)
    q, k = positions[:, None], positions[None, :]  # (L, 1), (1, L)
    causal = k <= q
    if kind == "dense":
        return causal
    (rq, cq), (rk, ck) = xp.divmod(q - text_len, image_w), xp.divmod(k - text_len, image_w)
    if kind == "row":
        allowed = q - k <= image_w
    elif kind == "column":
        allowed = cq == ck
    else:
        half = kernel // 2
        allowed = (xp.abs(rq - rk) <= half) & (xp.abs(cq - ck) <= half)
    image_pair = (q >= text_len) & (k >= text_len)  # text rows and text keys stay plainly causal
    return causal & (~image_pair | allowed)


def layer_kinds(num_layers: int, attention: str = "sparse") -> tuple[str, ...]:
    """The mask kind of each layer: the paper's sparse schedule, or one kind everywhere.

    "sparse": layers i = 1 .. N - 1 are "column" where (i - 2) mod 4 == 0 and
    "row" otherwise, layer N is "conv" (appendix B.1). Any kind in `KINDS`
    gives that kind in every layer.
    """
    if num_layers < 1:
        raise ValueError(f"Expected num_layers >= 1, found {num_layers}.")
    if attention in KINDS:
        return (attention,) * num_layers
    if attention != "sparse":
        raise ValueError(f"Unknown attention schedule {attention!r}; expected 'sparse' or one of {KINDS}.")
    body = tuple("column" if (i - 2) % 4 == 0 else "row" for i in range(1, num_layers))
    return body + ("conv",)
