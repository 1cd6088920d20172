"""Reading OpenAI dVAE checkpoints and converting them to (and from) our parameters.

OpenAI published `encoder.pkl` and `decoder.pkl` (https://cdn.openai.com/dall-e/): `torch.save` of
whole `dall_e.Encoder` / `dall_e.Decoder` modules. Loading those means unpickling arbitrary Python
objects, which can run code, so it happens only with `trust_pickle=True`. Plain state dicts (`.pt`
files read with `torch.load(weights_only=True)`), TorchScript archives (read without running their
code) and `.safetensors` files are always safe.

Reference names (dall_e/encoder.py, dall_e/decoder.py) map onto ours one to one:

  blocks.input.w                              input/kernel
  blocks.group_G.block_B.id_path.w            group_G_block_B/id_path/kernel
  blocks.group_G.block_B.res_path.conv_K.w    group_G_block_B/conv_K/kernel
  blocks.output.conv.w                        output/kernel

with `.b` -> `bias` and kernels transposed from torch's (out, in, kh, kw) to HWIO.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from common.torch_io import (PickledObjectsError, is_tensor, is_torchscript_archive, load_safetensors, load_torch_file,
                             read_torchscript_state_dict, tensor_to_numpy)
from dalle_jax.dvae import Decoder, DVAEConfig, Encoder

Part = Literal["encoder", "decoder"]
StateDict = dict[str, np.ndarray]

_BLOCK = re.compile(r"group_(\d+)_block_(\d+)")
_TORCH_BLOCK = re.compile(r"blocks\.group_(\d+)\.block_(\d+)\.")


# The error for a checkpoint that pickles Python objects (OpenAI's whole-module .pkl files among them).
UnsafeCheckpointError = PickledObjectsError
_IF_PICKLED = (
    "OpenAI's encoder.pkl / decoder.pkl are whole `dall_e` modules saved with torch.save. If you trust the "
    "file's origin, pass trust_pickle=True (needs the `dall-e` package installed). Safer: convert it once, e.g.\n"
    "  import torch, safetensors.torch\n"
    "  m = torch.load(path, weights_only=False)\n"
    "  safetensors.torch.save_file(m.state_dict(), 'encoder.safetensors')\n"
    "and load the .safetensors file instead."
)


class WeightsMismatchError(ValueError):
    """A state dict whose names or shapes don't fit the dVAE it should build."""


def _tensor_to_numpy(name: str, value: Any) -> np.ndarray:
    if not (is_tensor(value) or isinstance(value, np.ndarray)):
        raise WeightsMismatchError(f"state dict entry {name!r}: expected a tensor, found {type(value).__name__}")
    return tensor_to_numpy(value)


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> StateDict:
    """Reads a dVAE encoder or decoder checkpoint into `{reference name: float32 numpy array}`.

    Accepts `.safetensors` files; `torch.save`d state dicts (any other suffix, read with
    `torch.load(weights_only=True)`); TorchScript archives (read without running their code,
    unless `trust_pickle`); and, only with `trust_pickle=True`, whole pickled modules such
    as OpenAI's `encoder.pkl` / `decoder.pkl`. A file that cannot be read is a
    `CheckpointFormatError` naming it and what is wrong.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dVAE checkpoint {path} not found. OpenAI's weights are https://cdn.openai.com/dall-e/encoder.pkl "
            "and https://cdn.openai.com/dall-e/decoder.pkl; download them and pass their local paths."
        )
    if path.endswith(".safetensors"):
        raw = load_safetensors(path)
    elif is_torchscript_archive(path) and not trust_pickle:
        raw = read_torchscript_state_dict(path, opt_in="trust_pickle=True")
    else:
        raw = load_torch_file(path, if_pickled=_IF_PICKLED, trust_pickle=trust_pickle)
        if hasattr(raw, "state_dict") and callable(raw.state_dict):
            raw = raw.state_dict()
        if not isinstance(raw, Mapping) or not all(isinstance(name, str) for name in raw):
            raise WeightsMismatchError(f"{path}: expected a state dict or a module, found {type(raw).__name__}")
    return {name: _tensor_to_numpy(name, value).astype(np.float32) for name, value in raw.items()}


def _require(state_dict: Mapping[str, np.ndarray], name: str, ndim: int, part: Part) -> tuple[int, ...]:
    if name not in state_dict or state_dict[name].ndim != ndim:
        found = state_dict[name].shape if name in state_dict else "no such entry"
        raise WeightsMismatchError(
            f"cannot infer the dVAE {part} architecture: expected a {ndim}-d tensor {name!r}, found {found}. "
            f"Is this a dall_e {part.capitalize()} checkpoint? Its first names are {sorted(state_dict)[:5]}"
        )
    return state_dict[name].shape


def _group_layout(state_dict: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(group_count, blocks per group) from the `blocks.group_G.block_B.` names."""
    pairs = {tuple(map(int, m.groups())) for name in state_dict if (m := _TORCH_BLOCK.match(name))}
    groups = {g for g, _ in pairs}
    return len(groups), len({b for g, b in pairs if g == 1})


def infer_config(
    encoder: Mapping[str, np.ndarray] | None = None, decoder: Mapping[str, np.ndarray] | None = None
) -> DVAEConfig:
    """The `DVAEConfig` that the given reference state dicts describe (either may be None).

    With both, they must agree on every size they share. Sizes neither specifies keep defaults
    (an encoder alone says nothing about the decoder's n_init).
    """
    found: dict[Part, dict[str, int]] = {}
    if encoder is not None:
        n_hid, channels = _require(encoder, "blocks.input.w", 4, "encoder")[:2]
        vocab = _require(encoder, "blocks.output.conv.w", 4, "encoder")[0]
        groups, blocks = _group_layout(encoder)
        found["encoder"] = dict(
            n_hid=n_hid, channels=channels, vocab_size=vocab, group_count=groups, n_blk_per_group=blocks
        )
    if decoder is not None:
        n_init, vocab = _require(decoder, "blocks.input.w", 4, "decoder")[:2]
        out, n_hid = _require(decoder, "blocks.output.conv.w", 4, "decoder")[:2]
        groups, blocks = _group_layout(decoder)
        found["decoder"] = dict(
            n_hid=n_hid, channels=out // 2, vocab_size=vocab, group_count=groups, n_blk_per_group=blocks, n_init=n_init
        )
    if not found:
        raise ValueError("infer_config needs an encoder or a decoder state dict")
    if len(found) == 2:
        clash = {k: (v, found["decoder"][k]) for k, v in found["encoder"].items() if found["decoder"][k] != v}
        if clash:
            raise WeightsMismatchError(
                f"encoder and decoder checkpoints disagree (encoder, decoder): {clash}; are they from the same dVAE?"
            )
    merged = {**found.get("encoder", {}), **found.get("decoder", {})}
    try:
        return DVAEConfig(**merged)
    except ValueError as e:
        raise WeightsMismatchError(f"the checkpoint's sizes {merged} make no valid dVAE: {e}") from e


def torch_name(path: tuple[str, ...]) -> str:
    """Our parameter path, e.g. ('group_1_block_2', 'conv_3', 'kernel'), as the reference's state
    dict name, e.g. 'blocks.group_1.block_2.res_path.conv_3.w'."""
    *modules, leaf = path
    suffix = {"kernel": "w", "bias": "b"}[leaf]
    if modules == ["output"]:
        return f"blocks.output.conv.{suffix}"
    if modules == ["input"]:
        return f"blocks.input.{suffix}"
    block, conv = modules
    g, b = _BLOCK.fullmatch(block).groups()
    middle = "id_path" if conv == "id_path" else f"res_path.{conv}"
    return f"blocks.group_{g}.block_{b}.{middle}.{suffix}"


def expected_shapes(config: DVAEConfig, part: Part) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our parameter paths and shapes for `part`, computed without allocating anything."""
    f = config.downsample
    if part == "encoder":
        module, dummy = Encoder(config), np.zeros((1, f, f, config.channels), np.float32)
    else:
        module, dummy = Decoder(config), np.zeros((1, 1, 1), np.int32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), dummy)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: DVAEConfig, part: Part) -> dict[str, Any]:
    """Reference encoder/decoder state dict -> our nested params (numpy, float32).

    Raises `WeightsMismatchError` listing every missing, unexpected and mis-shaped entry.
    """
    expected = expected_shapes(config, part)
    by_name = {torch_name(path): path for path in expected}
    missing = sorted(set(by_name) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_name))
    misshaped = {
        name: (_to_torch_shape(expected[path]), tuple(state_dict[name].shape))
        for name, path in by_name.items()
        if name in state_dict and tuple(state_dict[name].shape) != _to_torch_shape(expected[path])
    }
    if missing or unexpected or misshaped:
        lines = [f"the {part} checkpoint does not fit a dVAE {part} with {config}:"]
        lines += [f"  missing: {missing}"] if missing else []
        lines += [f"  unexpected: {unexpected}"] if unexpected else []
        lines += [f"  mis-shaped (expected, found): {misshaped}"] if misshaped else []
        lines.append("Check that the file is a dall_e Encoder/Decoder state dict (not wrapped or prefixed).")
        raise WeightsMismatchError("\n".join(lines))
    flat = {}
    for name, path in by_name.items():
        value = np.asarray(state_dict[name], np.float32)
        flat[path] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: Mapping[str, Any]) -> StateDict:
    """Our encoder or decoder params -> a reference state dict (float32 numpy), e.g. to save a dVAE
    trained here in the format `dall_e.Encoder.load_state_dict` / `read_state_dict` accept."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
    out = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value), np.float32)
        out[torch_name(path)] = np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if value.ndim == 4 else value
    return out
