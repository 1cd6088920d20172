"""Memory plan of the compiled CLIP train step: bytes per device, as XLA's memory analysis counts them.

    python -m clip_jax.memory_plan --variant ViT-B/16 --global-batch 32768 --devices 64 256 --mesh fsdp fsdp_tp

The flags are dalle_jax.memory_plan's (`--batch` and `--meshes` are accepted too).

For a variant, global batch, mesh preset (common/sharding.py) and remat setting, the shared trainer's
train step (common/trainer.py: CLIPTask's contrastive loss, AdamW, the state donated) is lowered
against a train state and batch that exist only as shapes with their shardings, compiled, and
`compiled.memory_analysis()` read: the arguments (the state's shards and the batch's), the outputs,
what is aliased (outputs written into the donated state), the temporaries (activations kept for the
backward pass, gradients, workspaces) and the generated code; `peak` sums what is resident at once
(common/memory.py `compiled_memory`). The parameters' bytes come from shapes alone
(`common.memory.per_device_bytes`), a check on the arguments.

Devices: a count equal to this process's device count compiles for those devices (on a pod, the pod);
any other count runs this command again in a child process on that many simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N): XLA partitions the program for all N devices
and the per-device analysis is exact for the CPU compiler's buffer assignment. Arguments, outputs and
aliasing are the same bytes on any backend. Temporaries are not: accelerator compilers fuse and lay out
differently, and the CPU compiler computes bf16 in fp32 with conversion copies (a bf16 MLP's gradient
needs more temporaries there than the fp32 one), so simulated bf16 temporaries are an upper bound for a
GPU or TPU, which keep bf16 activations; `--dtype float32` gives the fp32 run's own number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clip_jax.model import abstract_variables
from clip_jax.train import CLIPTask
from clip_jax.variants import CLIPConfig, decode_variant
from common import optim, sharding
from common.cli import positive_int
from common.memory import compiled_memory, format_bytes, per_device_bytes
from common.trainer import abstract_train_state, jit_train_step

COLUMNS = ("params", "arguments", "outputs", "aliased", "temporaries", "generated_code", "peak")


def plan(config: CLIPConfig, *, global_batch: int, mesh: jax.sharding.Mesh, remat: bool, dtype: Any = jnp.bfloat16,
         loss: str = "softmax", optim_cfg: optim.OptimConfig | None = None) -> dict[str, Any]:
    """Bytes per device of CLIP's compiled train step on `mesh` (see the module docstring).

    Raises common.sharding.ShardingError when `global_batch` does not split over the mesh's batch axes.
    """
    sharding.check_batch_divisible(global_batch, mesh)
    task = CLIPTask(config, loss=loss, dtype=dtype, remat=remat, scan_layers=not config.vision.is_resnet, mesh=mesh)
    tx = optim.make_optimizer(optim_cfg or optim.OptimConfig())
    state, state_shardings = abstract_train_state(task, tx, mesh)
    size, length = config.vision.image_size, config.text.context_length
    batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8,
                                           sharding=sharding.batch_sharding(mesh, 4)),  # pixels, normalised on device
             "text": jax.ShapeDtypeStruct((global_batch, length), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))}
    step = jit_train_step(task, tx, mesh, state_shardings, jax.tree.map(lambda x: x.sharding, batch))
    with sharding.use_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    params = per_device_bytes(abstract_variables(task.model)["params"], mesh)
    return {"mesh": dict(mesh.shape), "devices": mesh.size, "platform": mesh.devices.flat[0].platform,
            "global_batch": global_batch, "remat": remat, "dtype": jnp.dtype(dtype).name, "params": params,
            **compiled_memory(compiled)}


def _simulated(args: argparse.Namespace, devices: int) -> list[dict[str, Any]]:
    """This command's rows for `devices` simulated CPU devices, from a child process."""
    cmd = [sys.executable, "-m", "clip_jax.memory_plan", "--variant", args.variant, "--global-batch",
           str(args.global_batch), "--devices", str(devices), "--mesh", *args.mesh, "--dtype", args.dtype, "--json"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    done = subprocess.run(cmd + ["--remat", *args.remat], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"Compiling for {devices} simulated devices failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="ViT-B/16", help="a clip_jax.variants name")
    parser.add_argument("--global-batch", "--batch", type=positive_int, default=32_768, help="global batch size")
    parser.add_argument("--devices", type=positive_int, nargs="+", default=[64, 256])
    parser.add_argument("--mesh", "--meshes", nargs="+", default=["fsdp"], help="common/sharding.py presets")
    parser.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"],
                        help="activation recomputation in the backward pass: off, on, or both (the default)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        config = decode_variant(args.variant)
    except ValueError as err:
        parser.error(f"--variant: {err}")
    rows = []
    for devices in args.devices:
        if devices != jax.device_count():
            rows += _simulated(args, devices)
            continue
        try:
            for name in args.mesh:
                mesh = sharding.make_mesh(name)
                rows += [plan(config, global_batch=args.global_batch, mesh=mesh, remat=remat == "on",
                              dtype=jnp.dtype(args.dtype)) for remat in args.remat]
        except sharding.ShardingError as err:
            parser.error(str(err))
    if args.json:
        print(json.dumps(rows))
        return rows
    print(f"CLIP {args.variant} train step, global batch {args.global_batch}, {args.dtype} compute: bytes per device "
          "(XLA memory analysis)")
    print("| mesh | devices | remat | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        print(f"| {mesh} | {r['devices']} ({r['platform']}) | {'on' if r['remat'] else 'off'} | "
              + " | ".join(format_bytes(r[c]) for c in COLUMNS) + " |")
    return rows


if __name__ == "__main__":
    main()
