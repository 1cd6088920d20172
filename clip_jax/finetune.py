"""Fine-tuning CLIP: start a run from imported weights, lock (parts of) its towers.

Starting weights (`load_pretrained`, `place_pretrained`): any checkpoint `clip_jax.load` reads (OpenAI
.pt, open_clip, Hugging Face, our OpenAI-format exports), at the run's image size and context length
(`clip_jax.resize`), whole or one tower; head counts and the activation, which OpenAI-format weights
do not record, are the run's. The weights are converted on the host and each leaf is
placed with the train state's sharding (`jax.make_array_from_callback`), so every device receives
only its own shard and no leaf is ever gathered whole on a device.

Locks (`lock_prefixes`): locked-image tuning (LiT, Zhai et al. 2022, section 3) freezes the image
tower; open_clip's `--lock-image-unlocked-groups N` leaves its last N parameter groups trainable.
The groups, input to output, are open_clip's (`VisionTransformer.lock`): the stem (patch embedding,
class and positional embeddings, ln_pre), each transformer block, with ln_post joining the last
block, and the projection. The text tower's are the same with token and positional embeddings,
ln_final and text_projection; a ModifiedResNet's are the stem convolutions, every residual block
and the attention pool. `logit_scale` (and SigLIP's bias) always train.

A scanned stack (`scan_layers=True`) is one array per weight with a leading layer axis, so it can
be frozen whole but not in part: a frozen block would still have optimizer state and need its
slice of every update zeroed. Partial locks that split a stack therefore require scan_layers=False
(an error says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from clip_jax import convert, weights
from clip_jax.variants import CLIPConfig

TOWERS = ("image", "text")
_ROOT = {"image": "visual", "text": "text"}
# In the train state, parameters that CLIP checkpoints lack keep their fresh initialisation.
_NOT_IN_CHECKPOINTS = ("logit_bias",)


def lock_groups(cfg: CLIPConfig, tower: str) -> list[tuple[str, ...]]:
    """The tower's parameter groups, input to output, as `/`-joined prefixes of the per-layer layout."""
    if tower == "image" and cfg.vision.is_resnet:
        stem = ("visual/conv1", "visual/conv2", "visual/conv3")
        blocks = [(f"visual/layer{stage}_{i}",) for stage, depth in enumerate(cfg.vision.layers, 1) for i in range(depth)]
        return [stem, *blocks, ("visual/attnpool",)]
    if tower == "image":
        stem = ("visual/conv1", "visual/class_embedding", "visual/positional_embedding", "visual/ln_pre")
        layers, last, head = cfg.vision.layers, ("visual/ln_post",), ("visual/proj",)
    elif tower == "text":
        stem = ("text/token_embedding", "text/positional_embedding")
        layers, last, head = cfg.text.layers, ("text/ln_final",), ("text/text_projection",)
    else:
        raise ValueError(f"tower must be one of {TOWERS}, found {tower!r}")
    root = _ROOT[tower]
    blocks = [(f"{root}/transformer/resblocks_{i}",) for i in range(layers)]
    return [stem, *blocks[:-1], blocks[-1] + last, head]


def lock_prefixes(cfg: CLIPConfig, tower: str, unlocked_groups: int = 0, *, scan_layers: bool = False) -> tuple[str, ...]:
    """Parameter path prefixes frozen when `tower` is locked with its last `unlocked_groups` groups trainable."""
    groups = lock_groups(cfg, tower)
    if not 0 <= unlocked_groups:
        raise ValueError(f"unlocked groups must be >= 0, found {unlocked_groups}")
    frozen = [p for group in groups[: max(len(groups) - unlocked_groups, 0)] for p in group]
    stack = f"{_ROOT[tower]}/transformer/resblocks"
    blocks = [p for p in frozen if p.startswith(stack + "_")]
    if scan_layers and blocks:
        total = sum(p.startswith(stack + "_") for group in groups for p in group)
        if len(blocks) < total:
            raise ValueError(
                f"Locking the {tower} tower with {unlocked_groups} unlocked groups freezes {len(blocks)} of its "
                f"{total} transformer blocks, but scan_layers=True stores them as one stacked array per weight, "
                "which is frozen whole or not at all. Set --config.model.scan_layers=False for partial locks.")
        frozen = [p for p in frozen if p not in blocks] + [stack]
    return tuple(frozen)


def frozen_prefixes(cfg: CLIPConfig, *, lock_image: bool = False, lock_image_unlocked_groups: int = 0,
                    lock_text: bool = False, lock_text_unlocked_layers: int = 0,
                    scan_layers: bool = False) -> tuple[str, ...]:
    """The prefixes of every locked tower (for `CLIPTask(frozen=...)` and `OptimConfig.frozen`)."""
    out: tuple[str, ...] = ()
    for tower, locked, unlocked, name in (("image", lock_image, lock_image_unlocked_groups, "lock_image_unlocked_groups"),
                                          ("text", lock_text, lock_text_unlocked_layers, "lock_text_unlocked_layers")):
        if unlocked and not locked:
            raise ValueError(f"{name}={unlocked} only applies to a locked tower: set lock_{tower}=True too.")
        if locked:
            out += lock_prefixes(cfg, tower, unlocked, scan_layers=scan_layers)
    return out


def load_pretrained(path: str, config: CLIPConfig, *, tower: str = "both", scan_layers: bool = False) -> dict:
    """Host variables (numpy) of the checkpoint at `path`, at `config`'s image size and context length,
    in the scanned layout when `scan_layers`. The loaded tower(s) must otherwise have `config`'s architecture."""
    if tower not in ("both", *TOWERS):
        raise ValueError(f"init_from_tower must be 'both', 'image' or 'text', found {tower!r}")
    # Head counts and the activation are not in OpenAI-format weights: they are the run's. A Hugging
    # Face directory states them in config.json, which must then agree with the run.
    unrecorded = {} if Path(path).is_dir() else dict(act=config.text.act, vision_heads=config.vision.heads,
                                                      text_heads=config.text.heads)
    found, variables, _ = weights.load_variables(path, image_size=config.vision.image_size,
                                                 context_length=config.text.context_length, **unrecorded)
    checks = {"embed_dim": (found.embed_dim, config.embed_dim)}
    if tower in ("both", "image"):
        checks["vision"] = (found.vision, config.vision)
    if tower in ("both", "text"):
        checks["text"] = (found.text, config.text)
    wrong = {k: v for k, v in checks.items() if v[0] != v[1]}
    if wrong:
        details = "; ".join(f"{k}: checkpoint {a}, run {b}" for k, (a, b) in wrong.items())
        raise ValueError(f"init_from={path} does not fit the configured model ({details}). Pick the variant the "
                         "checkpoint was trained as (--config.model.variant, and vision/text overrides); image size "
                         "and context length may differ, they are resized.")
    return convert.to_scanned(variables) if scan_layers else variables


def _subtrees(tower: str) -> tuple[tuple[str, ...], ...]:
    """(collection, key) pairs of the variables `tower` replaces."""
    if tower == "both":
        return (("params",), ("batch_stats",))
    return (("params", _ROOT[tower]), ("batch_stats", _ROOT[tower]))


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
        if tree is None:
            return None
    return tree


def _place(target: Any, shardings: Any, host: Any, where: str) -> Any:
    """`host` (numpy, or jax arrays, e.g. a run's restored state; shaped like `target`) as arrays with
    `shardings`; a leaf at a time, each device its shard. A jax array is resharded on the devices, never
    gathered to a host (on several hosts its whole value is on none)."""
    def name(path):
        return jax.tree_util.keystr(path, simple=True, separator="/")

    found = {name(p): v for p, v in jax.tree_util.tree_flatten_with_path(host)[0]}

    def put(path, leaf, sharding):
        key = name(path)
        if key not in found:
            if key.rsplit("/", 1)[-1] in _NOT_IN_CHECKPOINTS:
                return leaf
            raise ValueError(f"init_from: the checkpoint has no {where}{key}; it cannot start this model.")
        value = found[key]
        if value.shape != leaf.shape:
            raise ValueError(f"init_from: {where}{key} has shape {value.shape} in the checkpoint, {leaf.shape} in "
                             "the run.")
        if isinstance(value, jax.Array):
            return jax.device_put(value.astype(leaf.dtype), sharding)
        value = np.asarray(value, leaf.dtype)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map_with_path(put, target, shardings)


def place_pretrained(variables: Mapping, params: Any, model_state: Mapping, params_shardings: Any,
                     model_state_shardings: Mapping, *, tower: str = "both") -> tuple[Any, dict]:
    """(params, model_state) of a train state with `tower`'s parameters (and BatchNorm statistics) replaced by
    `variables` (`load_pretrained`, or a run's restored state), placed with the state's shardings; the rest
    keeps its fresh values."""
    state = {"params": params, **model_state}
    shardings = {"params": params_shardings, **model_state_shardings}
    for path in _subtrees(tower):
        target = _get(state, path)
        if target is None:  # a ViT has no BatchNorm statistics
            continue
        placed = _place(target, _get(shardings, path), _get(variables, path) or {}, "/".join(path) + "/")
        state = _replace(state, path, placed)
    return state.pop("params"), state


def _replace(tree: Mapping, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}
