"""Memory plan of DALL·E transformer training, per device, from shapes alone.

    python -m dalle_jax.memory_plan --variant 12B --devices 64 256 --mesh fsdp fsdp_tp --global-batch 1024

The flags are clip_jax.memory_plan's (`--batch` and `--meshes` are accepted too).

For each mesh and device count: parameters (fp32, sharded by the logical
rules), AdamW moments (two fp32 copies sharded like the parameters),
gradients (one fp32 copy), and an analytic estimate of the activations the
backward pass keeps, with and without per-layer rematerialisation. The
activation count follows this implementation (bf16 compute, fp32 softmax,
dense L x L scores with the sparse pattern applied as a mask), in the manner
of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4): per layer it keeps the block input, both
LayerNorm outputs, q/k/v, the attention output, the fp32 probabilities and
their bf16 copy, and the MLP's pre-activation and activation; with remat only
the block input per layer plus one layer's worth during its recomputation.
Heads and MLP split over the tensor axis, rows over data x fsdp. The logits
(fp32, vocabulary split over tensor) and their gradient come on top. XLA's
real allocation differs by its fusion and buffer reuse; this is a plan.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from common.cli import positive_int
from common.memory import abstract_mesh, format_bytes, per_device_bytes
from common.sharding import ShardingError
from dalle_jax.transformer import DALLE
from dalle_jax.variants import DALLEConfig, decode_variant

COMPUTE_BYTES, SOFTMAX_BYTES = 2, 4  # bf16 activations, fp32 probabilities


def activation_bytes(config: DALLEConfig, rows: int, tensor: int, remat: bool) -> int:
    """Bytes of activations kept for the backward pass on one device holding `rows` sequences."""
    length, width, mlp = config.seq_len, config.width, config.mlp_ratio * config.width
    heads = config.heads / tensor
    per_token = COMPUTE_BYTES * (4 * width + 4 * width / tensor + 2 * mlp / tensor)
    layer = rows * (length * per_token + heads * length**2 * (SOFTMAX_BYTES + COMPUTE_BYTES))
    kept = config.layers * rows * length * width * COMPUTE_BYTES + layer if remat else config.layers * layer
    logits = rows * (config.text_len * config.text_tokens + config.image_len * config.image_vocab) / tensor * 4
    return int(kept + 2 * logits)


def plan(config: DALLEConfig, *, mesh: str, num_devices: int, global_batch: int) -> dict[str, Any]:
    """Per-device bytes of parameters, optimizer state, gradients and activations (module docstring)."""
    abstract_mesh_ = abstract_mesh(mesh, num_devices)
    sizes = dict(abstract_mesh_.shape)
    batch_ways = sizes["data"] * sizes["fsdp"]
    if global_batch % batch_ways:
        raise ShardingError(f"Global batch {global_batch} does not split over {batch_ways} batch shards of mesh "
                            f"{sizes}; use a multiple of {batch_ways}.")
    model = DALLE(config, scan_layers=True)
    text = jnp.zeros((1, config.text_len), jnp.int32)
    codes = jnp.zeros((1, config.image_len), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), text, codes))
    params = per_device_bytes(abstract, abstract_mesh_)
    rows = global_batch // batch_ways
    out = {"variant_width": config.width, "layers": config.layers, "mesh": sizes, "devices": num_devices,
           "global_batch": global_batch, "rows_per_device": rows, "params": params, "adam_moments": 2 * params,
           "gradients": params}
    for remat in (False, True):
        activations = activation_bytes(config, rows, sizes["tensor"], remat)
        out[f"activations_remat_{remat}"] = activations
        out[f"total_remat_{remat}"] = 4 * params + activations
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="12B")
    parser.add_argument("--devices", type=positive_int, nargs="+", default=[64, 256])
    parser.add_argument("--mesh", "--meshes", nargs="+", default=["fsdp", "fsdp_tp"], help="common/sharding.py presets")
    parser.add_argument("--global-batch", "--batch", type=positive_int, default=1024, help="global batch size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        config = decode_variant(args.variant)
    except ValueError as err:
        parser.error(f"--variant: {err}")
    try:
        rows = [plan(config, mesh=m, num_devices=n, global_batch=args.global_batch)
                for m in args.mesh for n in args.devices]
    except ShardingError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print(f"DALL·E {args.variant}, global batch {args.global_batch}, bytes per device")
    print("| mesh | devices | params | Adam moments | grads | activations | total | activations (remat) | total (remat) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["params"], r["adam_moments"], r["gradients"], r["activations_remat_False"],
                 r["total_remat_False"], r["activations_remat_True"], r["total_remat_True"]]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        print(f"| {mesh} | {r['devices']} | " + " | ".join(format_bytes(c) for c in cells) + " |")
    return rows


if __name__ == "__main__":
    main()
