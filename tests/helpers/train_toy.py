"""Trains the toy regression task; used by the resume / preemption tests as a real process."""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import sharding  # noqa: E402
from common.trainer import Trainer, TrainerConfig  # noqa: E402
from tests.toy_task import RegressionData, RegressionTask  # noqa: E402


class SlowData(RegressionData):
    """Prints each step and sleeps, so the parent can signal mid-run."""

    def __next__(self):
        batch = super().__next__()
        print(f"step {self.position}", flush=True)
        time.sleep(0.05)
        return batch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--slow", action="store_true")
    args = p.parse_args()
    cfg = TrainerConfig(total_steps=args.steps, global_batch_size=16, mesh="fsdp", log_every=5, checkpoint_every=5, progress=False)
    optim = {"learning_rate": 1e-2, "warmup_steps": 2, "total_steps": args.steps, "weight_decay": 1e-4}
    trainer = Trainer(RegressionTask(), cfg, optim, args.workdir, mesh=sharding.make_mesh(cfg.mesh))
    data = (SlowData if args.slow else RegressionData)(16)
    result = trainer.fit(data)
    trainer.close()
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result.state.params))[0]
    np.savez(os.path.join(args.workdir, "final_params.npz"), **{jax.tree_util.keystr(k): v for k, v in flat})
    print(f"done at {result.step} preempted={result.preempted}", flush=True)


if __name__ == "__main__":
    main()
