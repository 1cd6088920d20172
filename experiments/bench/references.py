"""The reference implementations the benchmarks compare with, and our variables on their weights.

OpenAI's openai-clip package is loaded by file path: `import clip` pulls torchvision, which the
pinned CPU torch here cannot use. `openai_clip` builds clip/model.py's `CLIP` for one of our
configs; `our_clip` converts its state dict with `clip_jax.convert` into a bundle of ours, so both
sides run the same weights.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import jax.numpy as jnp

from clip_jax import convert
from clip_jax.api import CLIPBundle
from clip_jax.model import CLIP
from clip_jax.variants import CLIPConfig


@functools.cache
def openai_clip_module(name: str) -> ModuleType:
    """`clip/<name>.py` of the openai-clip package ("model", "simple_tokenizer"), without importing `clip`."""
    spec = importlib.util.find_spec("clip")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The OpenAI reference needs the openai-clip package; install it with "
            "`pip install --no-deps openai-clip==1.0.1` (see the Makefile's test target)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_openai_simple_tokenizer() -> ModuleType:
    """The openai-clip package's `simple_tokenizer` module."""
    return openai_clip_module("simple_tokenizer")


def openai_clip(cfg: CLIPConfig, seed: int = 0):
    """OpenAI's `CLIP` (clip/model.py, its own random init) shaped as `cfg`, in eval mode.

    OpenAI derives the image heads from the width; configs with other head counts (the smoke
    models) get a `visual` built with explicit heads.
    """
    import torch  # noqa: PLC0415  (optional: the bench extra)

    ref = openai_clip_module("model")
    torch.manual_seed(seed)
    v, t = cfg.vision, cfg.text
    model = ref.CLIP(cfg.embed_dim, v.image_size, v.layers, v.width, v.patch_size, t.context_length, t.vocab_size,
                     t.width, t.heads, t.layers)
    if v.is_resnet and model.visual.attnpool.num_heads != v.heads:
        model.visual = ref.ModifiedResNet(v.layers, cfg.embed_dim, v.heads, v.image_size, v.width)
    elif not v.is_resnet and model.visual.transformer.resblocks[0].attn.num_heads != v.heads:
        model.visual = ref.VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads, cfg.embed_dim)
    return model.eval()


def our_clip(reference, cfg: CLIPConfig, dtype=None) -> CLIPBundle:
    """Our CLIP bundle holding `reference`'s weights (fp32 storage; `dtype` the compute dtype)."""
    state = {k: v.detach().cpu().numpy() for k, v in reference.state_dict().items()}
    variables = convert.params_from_openai_state_dict(state, cfg)
    return CLIPBundle(CLIP(cfg, dtype=dtype or jnp.float32), variables, cfg, "openai")
