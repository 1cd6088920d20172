"""OpenAI's reference CLIP (clip/model.py) and tokenizer, loaded by file path.

`import clip` pulls in torchvision, which does not work here, so the two submodules we need
are loaded directly from the installed openai-clip package.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib

import numpy as np
import torch

from clip_jax.variants import CLIPConfig



def _load(name: str):
    spec = importlib.util.find_spec("clip")  # locates the package without executing its __init__
    if spec is None or spec.origin is None:
        raise FileNotFoundError("OpenAI's clip package is not installed: pip install openai-clip into .venv")
    path = pathlib.Path(spec.origin).parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def openai_model_module():
    """OpenAI clip/model.py as a module (CLIP, VisionTransformer, ModifiedResNet, ...)."""
    return _load("model")


@functools.cache
def _tokenizer():
    return _load("simple_tokenizer").SimpleTokenizer()


def tokenize(texts: list[str], context_length: int = 77) -> np.ndarray:
    """clip.tokenize: [SOT] + BPE + [EOT], zero-padded to `context_length` -> (B, context_length) int32."""
    tok = _tokenizer()
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    out = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
        ids = [sot] + tok.encode(text) + [eot]
        if len(ids) > context_length:
            raise ValueError(f"{text!r} is {len(ids)} tokens, longer than the context of {context_length}")
        out[i, : len(ids)] = ids
    return out


def openai_clip_kwargs(cfg: CLIPConfig) -> dict:
    """Arguments of OpenAI's `CLIP.__init__` for our config."""
    return dict(
        embed_dim=cfg.embed_dim,
        image_resolution=cfg.vision.image_size,
        vision_layers=cfg.vision.layers,
        vision_width=cfg.vision.width,
        vision_patch_size=cfg.vision.patch_size,
        context_length=cfg.text.context_length,
        vocab_size=cfg.text.vocab_size,
        transformer_width=cfg.text.width,
        transformer_heads=cfg.text.heads,
        transformer_layers=cfg.text.layers,
    )


def build_openai_clip(cfg: CLIPConfig) -> torch.nn.Module:
    """OpenAI's `CLIP` in eval mode, its image tower using `cfg.vision.heads`.

    OpenAI derives image heads from the width; reduced test geometries need other head
    counts, so then `visual` is replaced by one built with explicit heads.
    """
    ref = openai_model_module()
    model = ref.CLIP(**openai_clip_kwargs(cfg))
    v = cfg.vision
    if v.heads != vision_heads(model):
        if v.is_resnet:
            model.visual = ref.ModifiedResNet(v.layers, cfg.embed_dim, v.heads, v.image_size, v.width)
        else:
            model.visual = ref.VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads, cfg.embed_dim)
    return model.eval()


def vision_heads(model: torch.nn.Module) -> int:
    """The attention heads of a reference model's image tower (ResNet attention pool or ViT blocks)."""
    visual = model.visual
    if hasattr(visual, "attnpool"):
        return visual.attnpool.num_heads
    return visual.transformer.resblocks[0].attn.num_heads


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Perturbs every parameter and buffer so that no weight keeps its structured init.

    OpenAI's init zeroes biases and the last BN scale of each block and sets LayerNorm to
    identity; those would hide conversion bugs. Matrices get noise of half their std, vectors
    and scalars N(0, 0.1) noise, BN running means N(0, 0.1), running variances U(0.5, 2).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or name.endswith("attn_mask"):
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + 1.5 * torch.rand(tensor.shape, generator=gen))
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * noise)
        elif tensor.ndim >= 2:
            tensor.add_(0.5 * tensor.std() * noise)
        else:
            tensor.add_(0.1 * noise)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
