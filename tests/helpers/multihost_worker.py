"""One process of a multi-host toy run; tests/test_multihost.py starts several.

    python -m tests.helpers.multihost_worker --workdir DIR --out DIR --steps N --run NAME=PRESET [--run ...]

The process joins the cluster described by JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID (through `common.sharding.initialize_distributed`,
as a real job would; without them it runs alone), then for each --run trains
the toy regression task with the shared `Trainer` on the mesh preset PRESET in
`DIR/NAME`, feeding only this process's rows of every global batch. A run
resumes from the latest checkpoint in its directory, so calling the worker
twice with growing --steps trains in two legs. The device count per process
comes from XLA_FLAGS, set by the caller.

Writes to --out: `history_<NAME>_<process>.json` (the logged per-step metrics,
from every process) and, from process 0 only, `params_<NAME>.npz` (the final
parameters gathered from all processes).
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from common import sharding  # noqa: E402
from common.trainer import Trainer, TrainerConfig  # noqa: E402
from tests.toy_task import RegressionData, RegressionTask  # noqa: E402

GLOBAL_BATCH = 16
# The schedule spans the whole run whatever leg this is, so legs 1 + 2 equal one run.
OPTIM = {"learning_rate": 1e-2, "warmup_steps": 2, "total_steps": 12, "weight_decay": 1e-4}


class HostData(RegressionData):
    """RegressionData whose state names the host that owns it.

    Like the real pipelines (common/data/pipeline.py), each host's iterator
    state is its own and refuses a state saved by another host, so a resume
    that hands every host process 0's data state fails loudly.
    """

    def get_state(self):
        return {**super().get_state(), "process_index": self.process_index}

    def set_state(self, state):
        if state.get("process_index") != self.process_index:
            raise ValueError(f"process {self.process_index} was given the data state of process "
                             f"{state.get('process_index')}: {state}")
        super().set_state(state)


def train(name: str, preset: str, steps: int, workdir: str, out: str) -> None:
    cfg = TrainerConfig(total_steps=steps, global_batch_size=GLOBAL_BATCH, mesh=preset, log_every=1,
                        checkpoint_every=2, keep_checkpoints=2, progress=False)
    trainer = Trainer(RegressionTask(), cfg, OPTIM, os.path.join(workdir, name), mesh=sharding.make_mesh(preset))
    data = HostData(GLOBAL_BATCH, process_index=jax.process_index(), process_count=jax.process_count())
    result = trainer.fit(data)
    trainer.close()
    pid = jax.process_index()
    with open(os.path.join(out, f"history_{name}_{pid}.json"), "w") as f:
        json.dump(result.history, f)
    # Parameters sharded over every process's devices: gather them whole (a collective).
    params = multihost_utils.process_allgather(result.state.params, tiled=True)
    if pid == 0:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez(os.path.join(out, f"params_{name}.npz"), **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--run", action="append", required=True, metavar="NAME=PRESET")
    args = p.parse_args()
    sharding.initialize_distributed()
    print(f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    for run in args.run:
        name, preset = run.split("=")
        start = time.perf_counter()
        train(name, preset, args.steps, args.workdir, args.out)
        print(f"{name} ({preset}) reached step {args.steps} in {time.perf_counter() - start:.1f} s", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
