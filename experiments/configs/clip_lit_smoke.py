"""Locked-image tuning (LiT, Zhai et al. 2022) at smoke scale: a new text tower learns to read a
pretrained image tower that stays frozen.

Two commands on a fresh clone (the first trains and exports the image tower to start from):

    python -m experiments.run --config experiments/configs/clip_vit_b32.py:smoke --workdir runs/clip_smoke
    python -m experiments.run --config experiments/configs/clip_lit_smoke.py --workdir runs/clip_lit_smoke

The arg is the checkpoint to start from (anything clip_jax.load reads with the smoke model's shapes),
`clip_lit_smoke.py:/path/to/clip.pt`; by default the first command's export. Only its image tower is
loaded (`init_from_tower="image"`); the text tower and the temperature start fresh, as in LiT.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.clip_common import get_clip_config
from experiments.train_clip import EXPORT_FILE

DEFAULT_START = f"runs/clip_smoke/{EXPORT_FILE}"  # what the smoke recipe above exports


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = get_clip_config("ViT-B/32", "smoke")
    c.init_from = arg or DEFAULT_START
    c.init_from_tower = "image"  # LiT: a pretrained image tower, a text tower from scratch
    c.lock_image = True
    c.export_openai = False
    c.trainer.total_steps = 200  # the warmup (a tenth) follows
    return c
