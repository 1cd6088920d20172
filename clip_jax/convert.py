"""Convert CLIP weights between torch state dicts and our Flax variables.

* OpenAI (clip/model.py, also open_clip's OpenAI-style towers): `params_from_openai_state_dict`
  and its inverse `openai_state_dict_from_params`.
* Hugging Face `transformers.CLIPModel` (ViT only): `params_from_hf_state_dict`.
* `to_scanned` / `from_scanned` move transformer blocks between the per-layer layout
  (`resblocks_{i}`) and the nn.scan layout (one `resblocks` entry with a leading layer axis).

Variables are nested dicts of numpy arrays: {'params': ...} plus {'batch_stats': ...} for a
ModifiedResNet, in the unscanned layout, ready for `CLIP(config).apply`. torch Linear weights
are (out, in) and Conv weights (out, in, kh, kw); ours are (in, out) and (kh, kw, in, out).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from clip_jax.model import CLIP, abstract_variables
from clip_jax.variants import CLIPConfig

Path = tuple[str, ...]
# Not weights: counters and sizes some exports keep as tensors, and clip/model.py's constant causal
# mask, a plain tensor attribute that a TorchScript archive may keep (common.torch_io reads them all).
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|input_resolution|context_length|vocab_size|attn_mask)$")


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One torch tensor <-> one or more Flax leaves (a packed in_proj feeds query, key and value)."""

    torch_key: str
    paths: tuple[Path, ...]
    to_flax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_torch: Callable[..., np.ndarray]
    required: bool = True


def _same(key: str, path: Path) -> _Rule:
    return _Rule(key, (path,), lambda w: (w,), lambda w: w)


def _transposed(key: str, path: Path) -> _Rule:
    return _Rule(key, (path,), lambda w: (w.T,), lambda k: k.T)


def _linear(prefix: str, path: Path) -> list[_Rule]:
    return [_transposed(f"{prefix}.weight", path + ("kernel",)), _same(f"{prefix}.bias", path + ("bias",))]


def _conv(key: str, path: Path) -> _Rule:
    return _Rule(key, (path + ("kernel",),), lambda w: (w.transpose(2, 3, 1, 0),), lambda k: k.transpose(3, 2, 0, 1))


def _layer_norm(prefix: str, path: Path) -> list[_Rule]:
    return [_same(f"{prefix}.weight", path + ("scale",)), _same(f"{prefix}.bias", path + ("bias",))]


def _batch_norm(prefix: str, path: Path) -> list[_Rule]:
    stats = ("batch_stats",) + path[1:]
    return _layer_norm(prefix, path) + [
        _same(f"{prefix}.running_mean", stats + ("mean",)),
        _same(f"{prefix}.running_var", stats + ("var",)),
        # torch-only counter: ignored on import, exported as 0 so strict `load_state_dict` works.
        _Rule(f"{prefix}.num_batches_tracked", (), lambda w: (), lambda: np.array(0, np.int64), required=False),
    ]


def _conv_bn(conv_key: str, bn_prefix: str, path: Path) -> list[_Rule]:
    return [_conv(conv_key, path + ("conv",))] + _batch_norm(bn_prefix, path + ("bn",))


def _heads_in(prefix: str, path: Path, heads: int) -> list[_Rule]:
    """A q/k/v Linear: weight (out, in) -> kernel (in, heads, head_dim), bias -> (heads, head_dim)."""
    return [
        _Rule(f"{prefix}.weight", (path + ("kernel",),), lambda w: (w.T.reshape(w.shape[1], heads, -1),),
              lambda k: k.reshape(k.shape[0], -1).T),
        _Rule(f"{prefix}.bias", (path + ("bias",),), lambda b: (b.reshape(heads, -1),), lambda b: b.reshape(-1)),
    ]


def _heads_out(prefix: str, path: Path, heads: int) -> list[_Rule]:
    """The output Linear: weight (out, in) -> kernel (heads, head_dim, out)."""
    return [
        _Rule(f"{prefix}.weight", (path + ("kernel",),), lambda w: (w.T.reshape(heads, -1, w.shape[0]),),
              lambda k: k.reshape(-1, k.shape[-1]).T),
        _same(f"{prefix}.bias", path + ("bias",)),
    ]


def _separate_attention(prefix: str, path: Path, heads: int, names: tuple[str, str, str, str]) -> list[_Rule]:
    """Attention with separate q/k/v/out Linear layers (OpenAI AttentionPool2d, Hugging Face)."""
    rules = []
    for torch_name, ours in zip(names[:3], ("query", "key", "value")):
        rules += _heads_in(f"{prefix}.{torch_name}", path + (ours,), heads)
    return rules + _heads_out(f"{prefix}.{names[3]}", path + ("out",), heads)


def _packed_attention(prefix: str, path: Path, heads: int) -> list[_Rule]:
    """torch.nn.MultiheadAttention: in_proj_weight (3D, D) stacks q, k, v."""
    qkv = tuple(path + (name,) for name in ("query", "key", "value"))

    def split_weight(w):
        return tuple(part.T.reshape(w.shape[1], heads, -1) for part in np.split(w, 3))

    def split_bias(b):
        return tuple(part.reshape(heads, -1) for part in np.split(b, 3))

    return [
        _Rule(f"{prefix}.in_proj_weight", tuple(p + ("kernel",) for p in qkv), split_weight,
              lambda *ks: np.concatenate([k.reshape(k.shape[0], -1).T for k in ks])),
        _Rule(f"{prefix}.in_proj_bias", tuple(p + ("bias",) for p in qkv), split_bias,
              lambda *bs: np.concatenate([b.reshape(-1) for b in bs])),
    ] + _heads_out(f"{prefix}.out_proj", path + ("out",), heads)


def _openai_transformer(prefix: str, path: Path, layers: int, heads: int) -> list[_Rule]:
    rules = []
    for i in range(layers):
        torch_block, block = f"{prefix}.resblocks.{i}", path + (f"resblocks_{i}",)
        rules += _layer_norm(f"{torch_block}.ln_1", block + ("ln_1",))
        rules += _packed_attention(f"{torch_block}.attn", block + ("attn",), heads)
        rules += _layer_norm(f"{torch_block}.ln_2", block + ("ln_2",))
        rules += _linear(f"{torch_block}.mlp.c_fc", block + ("mlp", "c_fc"))
        rules += _linear(f"{torch_block}.mlp.c_proj", block + ("mlp", "c_proj"))
    return rules


def check_openai_layout(cfg: CLIPConfig) -> None:
    """Raises ValueError when `cfg` has no OpenAI clip/model.py equivalent (a ResNet stem_stride other than 4)."""
    if cfg.vision.is_resnet and cfg.vision.stem_stride != 4:
        raise ValueError(f"OpenAI's ModifiedResNet has a stride-4 stem; this model's stem_stride is "
                         f"{cfg.vision.stem_stride}, so its weights have no OpenAI layout")


def _openai_rules(cfg: CLIPConfig) -> list[_Rule]:
    vision, text = cfg.vision, cfg.text
    visual: Path = ("params", "visual")
    rules: list[_Rule] = []
    check_openai_layout(cfg)
    if vision.is_resnet:
        for i in (1, 2, 3):
            rules += _conv_bn(f"visual.conv{i}.weight", f"visual.bn{i}", visual + (f"conv{i}",))
        for stage, depth in enumerate(vision.layers, start=1):
            for j in range(depth):
                torch_block, block = f"visual.layer{stage}.{j}", visual + (f"layer{stage}_{j}",)
                for i in (1, 2, 3):
                    rules += _conv_bn(f"{torch_block}.conv{i}.weight", f"{torch_block}.bn{i}", block + (f"conv{i}",))
                if j == 0:  # the first block of every stage changes width or stride
                    rules += _conv_bn(f"{torch_block}.downsample.0.weight", f"{torch_block}.downsample.1",
                                      block + ("downsample",))
        rules.append(_same("visual.attnpool.positional_embedding", visual + ("attnpool", "positional_embedding")))
        rules += _separate_attention("visual.attnpool", visual + ("attnpool", "attn"), vision.heads,
                                     ("q_proj", "k_proj", "v_proj", "c_proj"))
    else:
        rules.append(_conv("visual.conv1.weight", visual + ("conv1",)))
        for name in ("class_embedding", "positional_embedding", "proj"):
            rules.append(_same(f"visual.{name}", visual + (name,)))
        rules += _layer_norm("visual.ln_pre", visual + ("ln_pre",))
        rules += _openai_transformer("visual.transformer", visual + ("transformer",), vision.layers, vision.heads)
        rules += _layer_norm("visual.ln_post", visual + ("ln_post",))
    txt: Path = ("params", "text")
    rules.append(_same("token_embedding.weight", txt + ("token_embedding", "embedding")))
    rules.append(_same("positional_embedding", txt + ("positional_embedding",)))
    rules += _openai_transformer("transformer", txt + ("transformer",), text.layers, text.heads)
    rules += _layer_norm("ln_final", txt + ("ln_final",))
    rules.append(_same("text_projection", txt + ("text_projection",)))
    rules.append(_same("logit_scale", ("params", "logit_scale")))
    return rules


def _hf_encoder(prefix: str, path: Path, layers: int, heads: int) -> list[_Rule]:
    rules = []
    for i in range(layers):
        layer, block = f"{prefix}.encoder.layers.{i}", path + (f"resblocks_{i}",)
        rules += _layer_norm(f"{layer}.layer_norm1", block + ("ln_1",))
        rules += _separate_attention(
            f"{layer}.self_attn", block + ("attn",), heads, ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        rules += _layer_norm(f"{layer}.layer_norm2", block + ("ln_2",))
        rules += _linear(f"{layer}.mlp.fc1", block + ("mlp", "c_fc"))
        rules += _linear(f"{layer}.mlp.fc2", block + ("mlp", "c_proj"))
    return rules


def _hf_rules(cfg: CLIPConfig) -> list[_Rule]:
    if cfg.vision.is_resnet:
        raise ValueError(
            "Hugging Face CLIPModel has only ViT image towers; use params_from_openai_state_dict for ResNets"
        )
    visual, txt = ("params", "visual"), ("params", "text")
    return [
        _same("vision_model.embeddings.class_embedding", visual + ("class_embedding",)),
        _conv("vision_model.embeddings.patch_embedding.weight", visual + ("conv1",)),
        _same("vision_model.embeddings.position_embedding.weight", visual + ("positional_embedding",)),
        *_layer_norm("vision_model.pre_layrnorm", visual + ("ln_pre",)),
        *_hf_encoder("vision_model", visual + ("transformer",), cfg.vision.layers, cfg.vision.heads),
        *_layer_norm("vision_model.post_layernorm", visual + ("ln_post",)),
        _transposed("visual_projection.weight", visual + ("proj",)),
        _same("text_model.embeddings.token_embedding.weight", txt + ("token_embedding", "embedding")),
        _same("text_model.embeddings.position_embedding.weight", txt + ("positional_embedding",)),
        *_hf_encoder("text_model", txt + ("transformer",), cfg.text.layers, cfg.text.heads),
        *_layer_norm("text_model.final_layer_norm", txt + ("ln_final",)),
        _transposed("text_projection.weight", txt + ("text_projection",)),
        _same("logit_scale", ("params", "logit_scale")),
    ]


def _set(tree: dict, path: Path, value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: Path) -> np.ndarray:
    for name in path:
        tree = tree[name]
    return np.asarray(tree)


def _import(state_dict: Mapping[str, np.ndarray], rules: list[_Rule], cfg: CLIPConfig, source: str) -> dict:
    missing = [r.torch_key for r in rules if r.required and r.torch_key not in state_dict]
    known = {r.torch_key for r in rules}
    unused = [k for k in state_dict if k not in known and not _IGNORED_KEYS.search(k)]
    if missing or unused:
        raise ValueError(
            f"{source} state dict does not match {cfg}: missing keys {missing[:10]} ({len(missing)} in all), "
            f"unexpected keys {unused[:10]} ({len(unused)} in all). Check the variant's config matches the checkpoint."
        )
    variables: dict = {}
    for rule in rules:
        if rule.paths:
            tensor = np.asarray(state_dict[rule.torch_key], dtype=np.float32)
            for path, value in zip(rule.paths, rule.to_flax(tensor)):
                _set(variables, path, np.array(value, order="C"))
    _check_shapes(variables, cfg, source)
    return variables


def _check_shapes(variables: dict, cfg: CLIPConfig, source: str) -> None:
    expected = nn.meta.unbox(abstract_variables(CLIP(cfg)))
    found = jax.tree_util.tree_flatten_with_path(variables)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    extra, missing = sorted({p for p, _ in found} - set(want)), sorted(set(want) - {p for p, _ in found})
    if extra or missing:
        raise ValueError(
            f"{source} weights give a different parameter tree than CLIP({cfg}) expects: unexpected "
            f"{[jax.tree_util.keystr(p) for p in extra[:5]]}, missing {[jax.tree_util.keystr(p) for p in missing[:5]]}"
        )
    for path, value in found:
        if value.shape != want[path].shape:
            raise ValueError(
                f"{source} weight {jax.tree_util.keystr(path)} has shape {value.shape}, CLIP({cfg}) expects "
                f"{want[path].shape}; check the variant's config matches the checkpoint"
            )


def params_from_openai_state_dict(state_dict: Mapping[str, np.ndarray], cfg: CLIPConfig) -> dict:
    """OpenAI clip/model.py `CLIP.state_dict()` (numpy arrays, any float dtype) -> our fp32 variables."""
    return _import(state_dict, _openai_rules(cfg), cfg, "OpenAI")


def openai_state_dict_from_params(variables: Mapping, cfg: CLIPConfig) -> dict[str, np.ndarray]:
    """Our (unscanned) variables -> a state dict that OpenAI's `CLIP(...).load_state_dict` accepts strictly."""
    return {r.torch_key: r.to_torch(*(_get(variables, p) for p in r.paths)) for r in _openai_rules(cfg)}


def params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], cfg: CLIPConfig) -> dict:
    """Hugging Face `transformers.CLIPModel.state_dict()` (numpy arrays) -> our fp32 variables."""
    return _import(state_dict, _hf_rules(cfg), cfg, "Hugging Face")


_LAYER = re.compile(r"^resblocks_(\d+)$")


def to_scanned(tree: Mapping) -> dict:
    """Stacks every `resblocks_{i}` group into one `resblocks` entry with a leading layer axis."""
    if not isinstance(tree, Mapping):
        return tree
    layers = sorted((int(m.group(1)), k) for k in tree if (m := _LAYER.match(k)))
    out = {k: to_scanned(v) for k, v in tree.items() if not _LAYER.match(k)}
    if layers:
        if [i for i, _ in layers] != list(range(len(layers))):
            raise ValueError(
                f"expected layers resblocks_0..resblocks_{len(layers) - 1}, found {[k for _, k in layers]}"
            )
        stack = lambda *xs: np.stack([np.asarray(x) for x in xs])  # noqa: E731
        out["resblocks"] = jax.tree.map(stack, *(tree[k] for _, k in layers))
    return out


def from_scanned(tree: Mapping) -> dict:
    """Inverse of `to_scanned`: splits each `resblocks` entry into `resblocks_{i}` groups."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: from_scanned(v) for k, v in tree.items() if k != "resblocks"}
    if "resblocks" in tree:
        stacked = tree["resblocks"]
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            out[f"resblocks_{i}"] = jax.tree.map(lambda x: np.asarray(x[i]), stacked)
    return out
