"""Launch any experiment: `python -m experiments.run --config experiments/configs/X.py[:arg] --workdir DIR`.

    python -m experiments.run --config experiments/configs/clip_vit_b32.py:smoke --workdir runs/b32_smoke
    python -m experiments.run --config experiments/configs/clip_vit_b32.py --workdir gs://bucket/b32 \\
        --config.trainer.global_batch_size=65536 --config.optim.learning_rate=1e-3

Every field of the ConfigDict is overridable with --config.path.to.field=value.
Re-running the same command resumes from the last checkpoint in --workdir.
On a multi-host system (TPU pod slice, SLURM), run the same command on every
host: `jax.distributed.initialize()` is called first, when the runtime
describes a cluster.
"""

from __future__ import annotations

import importlib
import json

from absl import app, flags
from ml_collections import config_flags

from common import sharding
from common.metrics import configure_logging

TASKS = {
    "clip": "experiments.train_clip:run",
    "dvae": "experiments.train_dvae:train",
    "dalle": "experiments.train_dalle:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go (local path or gs://).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    configure_logging()
    sharding.initialize_distributed()
    config = _CONFIG.value
    if config.task not in TASKS:
        raise app.UsageError(f"config.task={config.task!r}; known tasks: {sorted(TASKS)}.")
    module, fn = TASKS[config.task].split(":")
    summary = getattr(importlib.import_module(module), fn)(config, _WORKDIR.value)
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    app.run(main)
