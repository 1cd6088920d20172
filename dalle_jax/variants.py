"""DALL·E transformer hyperparameters and the table of named variants.

Source: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", section 2.2
and appendix B.1: a decoder-only transformer of 64 layers, 62 heads of width
64 (d_model 3,968), over up to 256 BPE caption tokens (vocabulary 16,384)
followed by 32 x 32 = 1,024 dVAE image tokens (vocabulary 8,192). Each text
position has its own padding token. Sizes other than "12B" are ours, for
tests, the demo and small experiments.
"""

from __future__ import annotations

import dataclasses

from dalle_jax.masks import KINDS


@dataclasses.dataclass(frozen=True)
class DALLEConfig:
    """Sizes of the text + image transformer.

    Attributes:
      text_len: caption positions (padded with per-position padding tokens).
      text_vocab: BPE vocabulary (the padding tokens come on top of it).
      image_h, image_w: the dVAE code grid.
      image_vocab: dVAE codebook size.
      width, layers, heads: transformer sizes (head_dim = width // heads).
      mlp_ratio: MLP width over residual width.
      attention: "sparse" (the paper's row/column/conv schedule) or one mask
        kind for every layer ("dense", "row", "column", "conv").
      conv_kernel: side of the last layer's causal convolutional window.
    """

    text_len: int = 256
    text_vocab: int = 16_384
    image_h: int = 32
    image_w: int = 32
    image_vocab: int = 8_192
    width: int = 3_968
    layers: int = 64
    heads: int = 62
    mlp_ratio: int = 4
    attention: str = "sparse"
    conv_kernel: int = 11

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads={self.heads}.")
        if min(self.text_len, self.text_vocab, self.image_h, self.image_w, self.image_vocab, self.layers) < 1:
            raise ValueError(f"Expected positive sizes, found {self}.")
        if self.attention not in ("sparse", *KINDS):
            raise ValueError(f"attention must be 'sparse' or one of {KINDS}, found {self.attention!r}.")

    @property
    def image_len(self) -> int:
        return self.image_h * self.image_w

    @property
    def seq_len(self) -> int:
        """Positions of the stream: all text positions, then all image positions."""
        return self.text_len + self.image_len

    @property
    def text_tokens(self) -> int:
        """Text embedding rows: the BPE vocabulary, then one padding token per text position."""
        return self.text_vocab + self.text_len


VARIANTS: dict[str, DALLEConfig] = {
    "12B": DALLEConfig(),  # the paper's model
    # Ours: small models for experiments, the demo and tests.
    "1.3B": DALLEConfig(width=2048, layers=24, heads=32),
    "base": DALLEConfig(text_len=128, width=768, layers=12, heads=12),
    "tiny": DALLEConfig(text_len=16, text_vocab=512, image_h=8, image_w=8, image_vocab=128, width=64, layers=4,
                        heads=4, conv_kernel=3),
}


def decode_variant(name: str, **overrides) -> DALLEConfig:
    """The named configuration, with fields replaced by `overrides` (e.g. attention="dense")."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown DALL·E variant {name!r}; known: {sorted(VARIANTS)}.")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DALLEConfig)}
    if unknown:
        raise ValueError(f"Unknown DALLEConfig fields {sorted(unknown)}.")
    return dataclasses.replace(VARIANTS[name], **overrides)
