"""Read CLIP checkpoints in every common format, safely, and write OpenAI-format state dicts.

Formats (`read_checkpoint`):
  * OpenAI releases: TorchScript archives (`ViT-B-32.pt` from clip.load). Read
    without running anything (`common.torch_io.read_torchscript_state_dict`
    rebuilds only the tensors from the archive's pickle). `torch.jit.load`, which
    runs the TorchScript code stored in the archive, is used only with
    `trust_torchscript=True`.
  * Plain OpenAI-style state dicts (`.pt`/`.bin`, e.g. `torch.save(model.state_dict())`)
    and open_clip checkpoints (`{"state_dict": {"module.visual...": ...}, "epoch": ...}`):
    `torch.load(weights_only=True)`, never bare pickle.
  * `.safetensors` files with OpenAI-style keys (open_clip's hub format).
  * Hugging Face CLIP directories (`config.json` + `model.safetensors`), read
    with safetensors' numpy API: no torch needed.

A file that cannot be read (empty, truncated, damaged, not a checkpoint) is a
`CheckpointFormatError` that names it and says what is wrong.

The architecture is inferred from the weights, as OpenAI's `build_model`
(clip/model.py) does. Two things weights cannot tell: head counts (q/k/v are
packed) and the MLP activation (QuickGELU for OpenAI, exact GELU for most
open_clip LAION models). They come from, in order: the caller, an
`open_clip_config.json` beside the file, the HF `config.json`, a variant in
`clip_jax.variants` with the same shapes, and OpenAI's conventions
(64-wide heads, QuickGELU); the choice is logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax import convert, resize
from clip_jax.variants import CLIPConfig, TextConfig, VisionConfig, decode_variant, known_variants
from common.torch_io import (CheckpointFormatError, import_torch, is_torchscript_archive, load_safetensors,
                             load_torch_file, read_torchscript_state_dict, tensor_to_numpy)

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]


# What to do with a checkpoint that pickles Python objects: CLIP weights never need them.
_IF_PICKLED = ("If you trust it, convert it once: torch.save(torch.load(p, weights_only=False)['state_dict'] or "
               ".state_dict(), 'weights.pt'), or save it as .safetensors.")
_OVERRIDES = ("act", "vision_heads", "text_heads")


# -- reading files --------------------------------------------------------------------------------


def _to_numpy(tensors: Mapping[str, Any]) -> StateDict:
    return {key: tensor_to_numpy(value) for key, value in tensors.items()}


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """open_clip / training checkpoints nest the weights; DDP prefixes them with `module.`."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors.")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | os.PathLike, *, trust_torchscript: bool = False) -> tuple[StateDict, str, dict]:
    """(state_dict as numpy, format, config) for a file or Hugging Face directory.

    format is "openai" (OpenAI/open_clip key names) or "hf"; config holds what
    the files say beyond the weights (HF config.json, open_clip_config.json).
    trust_torchscript: read TorchScript archives with `torch.jit.load`, which runs the
    code stored in them; only for files from a source you trust. Off, they are read
    without running anything.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No CLIP checkpoint at {path}. Nothing is downloaded at run time: fetch the weights "
            "(OpenAI .pt, open_clip .pt/.safetensors, or a Hugging Face directory) and pass their local path."
        )
    if path.is_dir():
        return _read_hf_dir(path)
    config = _sibling_open_clip_config(path)
    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
        return sd, _detect_naming(sd, path), config
    if is_torchscript_archive(path):  # OpenAI's releases
        if trust_torchscript:
            sd = _to_numpy(import_torch(path).jit.load(str(path), map_location="cpu").state_dict())
        else:
            sd = read_torchscript_state_dict(path, opt_in="clip_jax.load(path, trust_torchscript=True)")
        return sd, "openai", {"torchscript": True, **config}
    sd = _to_numpy(_unwrap(load_torch_file(path, if_pickled=_IF_PICKLED), path))
    return sd, _detect_naming(sd, path), config


def _detect_naming(sd: Mapping[str, Any], path: Path) -> str:
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    if "token_embedding.weight" in sd and any(k.startswith("visual.") for k in sd):
        return "openai"
    raise CheckpointFormatError(
        f"{path} is not a CLIP checkpoint: expected OpenAI/open_clip keys (visual.*, token_embedding.weight, "
        f"transformer.*) or Hugging Face keys (vision_model.*, text_model.*); found e.g. {sorted(sd)[:5]}."
    )


def _read_json_object(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(f"{file} is not valid JSON ({err}); restore the file that came with the "
                                    "weights.") from err
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{file} must hold a JSON object of settings, found a {type(config).__name__}; "
                                    "restore the file that came with the weights.")
    return config


def _sibling_open_clip_config(path: Path) -> dict:
    candidate = path.parent / "open_clip_config.json"
    if candidate.exists():
        return {"open_clip": _read_json_object(candidate)}
    return {}


def _read_hf_dir(path: Path) -> tuple[StateDict, str, dict]:
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointFormatError(f"{path} is a directory but has no config.json: not a Hugging Face CLIP model.")
    config = _read_json_object(config_file)
    if config.get("model_type") not in (None, "clip"):
        raise CheckpointFormatError(f"{path} holds a {config.get('model_type')!r} model, not CLIP (model_type 'clip').")
    weights = path / "model.safetensors"
    if weights.exists():
        sd = load_safetensors(weights)
    elif (path / "pytorch_model.bin").exists():
        sd = _to_numpy(load_torch_file(path / "pytorch_model.bin", if_pickled=_IF_PICKLED))
    else:
        raise CheckpointFormatError(f"{path} has config.json but neither model.safetensors nor pytorch_model.bin.")
    return sd, "hf", {"hf": config}


# -- inferring the architecture -------------------------------------------------------------------


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _ratio(mlp_dim: int, width: int) -> float:
    """An mlp_ratio for which the configs' `int(width * mlp_ratio)` is exactly mlp_dim.

    Plain mlp_dim / width can land a hair under an integer (ViT-g: 6144 / 1408).
    """
    return (mlp_dim + 0.5) / width if mlp_dim % width else float(mlp_dim // width)


def _matching_variant(cfg: CLIPConfig) -> CLIPConfig | None:
    """A named variant with the same shapes; heads and activation can then be taken from it."""

    def shapes(c: CLIPConfig):
        v, t = c.vision, c.text
        return (c.embed_dim, v.image_size, v.layers, v.width, v.patch_size, v.mlp_dim, t.width, t.layers, t.mlp_dim,
                t.context_length, t.vocab_size)

    for name in known_variants():
        if shapes(decode_variant(name)) == shapes(cfg):
            return decode_variant(name)
    return None


def infer_openai_config(sd: Mapping[str, Any], *, act: str | None = None, vision_heads: int | None = None,
                        text_heads: int | None = None, open_clip_cfg: dict | None = None) -> CLIPConfig:
    """CLIPConfig from OpenAI/open_clip-named weights (clip/model.py `build_model`)."""
    embed_dim = sd["text_projection"].shape[1]
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = _count(sd, r"^transformer\.resblocks\.(\d+)\.")
    text_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers: int | tuple = _count(sd, r"^visual\.transformer\.resblocks\.(\d+)\.")
        vision_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        vision = dict(image_size=patch * grid, layers=layers, width=width, patch_size=patch, mlp_ratio=_ratio(vision_mlp, width))
        default_heads = width // 64
    else:
        layers = tuple(_count(sd, rf"^visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(image_size=grid * 32, layers=layers, width=width)
        default_heads = width * 32 // 64
    text = dict(width=text_width, layers=text_layers, context_length=sd["positional_embedding"].shape[0],
                vocab_size=sd["token_embedding.weight"].shape[0], mlp_ratio=_ratio(text_mlp, text_width))
    # Sizes first with placeholder heads/act, then fill those from the best source.
    probe = CLIPConfig(embed_dim, VisionConfig(heads=1, **vision), TextConfig(heads=1, **text))
    known = _matching_variant(probe)
    oc = (open_clip_cfg or {}).get("model_cfg", {})
    if act is None and oc:
        act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
    if vision_heads is None and oc.get("vision_cfg", {}).get("head_width") and not probe.vision.is_resnet:
        vision_heads = width // oc["vision_cfg"]["head_width"]
    if text_heads is None and oc.get("text_cfg", {}).get("heads"):
        text_heads = oc["text_cfg"]["heads"]
    if known is not None:
        vision_heads = vision_heads or known.vision.heads
        text_heads = text_heads or known.text.heads
        act = act or known.vision.act
    act = act or "quick_gelu"
    vision_heads = vision_heads or default_heads
    text_heads = text_heads or max(text_width // 64, 1)
    log.info("CLIP architecture from weights: vision %s heads=%d, text width %d heads=%d, act=%s (%s)",
             vision, vision_heads, text_width, text_heads, act,
             "named variant" if known else "OpenAI conventions" if not oc else "open_clip_config.json")
    vision_act = {} if probe.vision.is_resnet else {"act": act}
    return CLIPConfig(embed_dim, VisionConfig(heads=vision_heads, **vision, **vision_act),
                      TextConfig(heads=text_heads, act=act, **text))


def infer_hf_config(sd: Mapping[str, Any], hf_config: Mapping[str, Any]) -> CLIPConfig:
    """CLIPConfig from a Hugging Face CLIPModel; sizes from the weights, heads/act from config.json.

    `save_pretrained` omits values equal to transformers' defaults, so those
    defaults (CLIPVisionConfig: 12 heads, CLIPTextConfig: 8 heads, QuickGELU) fill the gaps.
    """
    vc, tc = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    width = sd["vision_model.embeddings.class_embedding"].shape[0]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    text_width = sd["text_model.final_layer_norm.weight"].shape[0]
    vision = VisionConfig(
        image_size=patch * grid, layers=_count(sd, r"^vision_model\.encoder\.layers\.(\d+)\."), width=width,
        heads=vc.get("num_attention_heads", 12), patch_size=patch,
        mlp_ratio=_ratio(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], width),
        act=_hf_act(vc.get("hidden_act", "quick_gelu")))
    text = TextConfig(
        width=text_width, heads=tc.get("num_attention_heads", 8), layers=_count(sd, r"^text_model\.encoder\.layers\.(\d+)\."),
        context_length=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0],
        mlp_ratio=_ratio(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], text_width),
        act=_hf_act(tc.get("hidden_act", "quick_gelu")))
    return CLIPConfig(sd["text_projection.weight"].shape[0], vision, text)


def _hf_act(name: str) -> str:
    if name in ("quick_gelu", "gelu"):
        return name
    raise CheckpointFormatError(f"Hugging Face hidden_act {name!r} is not supported; expected 'quick_gelu' or 'gelu'.")


def load_variables(path: str | os.PathLike, *, act: str | None = None, vision_heads: int | None = None,
                   text_heads: int | None = None, trust_torchscript: bool = False, image_size: int | None = None,
                   context_length: int | None = None) -> tuple[CLIPConfig, dict, str]:
    """(config, variables, format) for a checkpoint.

    act, vision_heads, text_heads: what OpenAI-format weights cannot tell (see the module
    docstring); None infers them. A Hugging Face directory states them in config.json, so
    there they are refused rather than ignored.
    image_size, context_length: load at another resolution or text context (`clip_jax.resize`:
    positional embeddings resampled); None keeps the checkpoint's.
    """
    sd, naming, extra = read_checkpoint(path, trust_torchscript=trust_torchscript)
    given = {k: v for k, v in zip(_OVERRIDES, (act, vision_heads, text_heads)) if v is not None}
    try:
        if naming == "hf":
            if given:
                raise TypeError(f"{path} is a Hugging Face CLIP directory, whose config.json sets the heads and "
                                f"activation; the overrides {given} do not apply. Edit config.json if it is wrong.")
            cfg = infer_hf_config(sd, extra["hf"])
            variables = convert.params_from_hf_state_dict(sd, cfg)
        else:
            cfg = infer_openai_config(sd, open_clip_cfg=extra.get("open_clip"), **given)
            variables = convert.params_from_openai_state_dict(sd, cfg)
    except KeyError as err:
        raise CheckpointFormatError(f"{path}: CLIP weight {err} is missing; the checkpoint is incomplete or not CLIP.") from err
    del sd  # the converted copy is all that is kept
    cfg, variables = resize.resize_variables(variables, cfg, image_size=image_size, context_length=context_length)
    return cfg, variables, naming


# -- writing --------------------------------------------------------------------------------------


def save_openai_state_dict(variables: Mapping, cfg: CLIPConfig, path: str | os.PathLike) -> Path:
    """Writes an OpenAI-format state dict that `clip.model.CLIP(...).load_state_dict` accepts strictly.

    `.safetensors` needs no torch; `.pt`/`.bin` is `torch.save` of a dict of tensors
    (readable with `torch.load(weights_only=True)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: np.array(v, order="C") for k, v in convert.openai_state_dict_from_params(_unscanned(variables), cfg).items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file  # noqa: PLC0415

        save_file(sd, str(path))
    else:
        torch = import_torch(path)
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, str(path))
    return path


def _unscanned(variables: Mapping) -> dict:
    """Exports work from either layer layout."""
    return convert.from_scanned(variables)
