"""CLIP RN50 at LAION-400M scale; `:smoke` for a CPU-sized run. See clip_common.py."""

from experiments.configs.clip_common import get_clip_config


def get_config(arg: str = ""):
    return get_clip_config("RN50", arg)
