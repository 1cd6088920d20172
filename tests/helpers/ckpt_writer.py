"""Writes checkpoints in a child process so a test can SIGKILL it mid-save.

    python -m tests.helpers.ckpt_writer DIRECTORY BIG_MB

Saves `small_state()` as step 1, waits until it is committed and prints
"saved 1"; then prints "saving 2" and saves `big_state(BIG_MB)` as step 2,
printing "saved 2" once committed. tests/test_checkpoint.py kills the process
between the last two lines, while `2.orbax-checkpoint-tmp` is being written.

The array files of a few hundred MB are written in well under a second here,
too short a window to hit reliably, so the commit of step 2 (orbax's rename of
`2.orbax-checkpoint-tmp` to `2`, an `os.rename` on local disks) is held back
for `COMMIT_HOLD_S`. What is written, and how, is unchanged; the test kills the
process once part of the data is on disk, and never after the commit.

Importing this module does not import jax, so a test may use `small_state`.
"""
import os
import sys
import time

import numpy as np

N_DEVICES = 8
COMMIT_HOLD_S = 60.0


def small_state() -> dict:
    """Step-1 state as NumPy arrays (a few MB), the same on every call."""
    rng = np.random.default_rng(1)
    return {
        "params": {
            "w": rng.standard_normal((512, 1024), dtype=np.float32),  # 2 MiB
            "b": rng.standard_normal((1024,), dtype=np.float32),
        },
        "step": np.asarray(1, np.int32),
    }


def big_state(megabytes: int) -> dict:
    """Step-2 state: random (incompressible) float32 rows, `megabytes` MiB in all."""
    rows = megabytes * 2**20 // (4 * 1024)
    rows -= rows % N_DEVICES
    rng = np.random.default_rng(2)
    big = rng.standard_normal((rows, 1024), dtype=np.float32)
    return {"big": big, "step": np.asarray(2, np.int32)}


def hold_commit_of(tmp_name: str) -> None:
    """Delays `os.rename` of a directory named `tmp_name` by COMMIT_HOLD_S."""
    rename = os.rename

    def delayed_rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)) == tmp_name:
            time.sleep(COMMIT_HOLD_S)
        return rename(src, dst, *args, **kwargs)

    os.rename = delayed_rename


def main(directory: str, megabytes: int) -> None:
    # XLA reads the device count once, when the backend starts.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from common.checkpoint import CheckpointManager

    mesh = jax.make_mesh((N_DEVICES,), ("fsdp",))
    fsdp = NamedSharding(mesh, P("fsdp"))

    def shard(tree):
        replicated = NamedSharding(mesh, P())
        return jax.tree.map(lambda x: jax.device_put(x, fsdp if x.ndim else replicated), tree)

    with CheckpointManager(directory, max_to_keep=None) as ckpt:
        ckpt.save(1, shard(small_state()), {"step": 1})
        ckpt.wait_until_finished()
        print("saved 1", flush=True)
        big = shard(big_state(megabytes))
        hold_commit_of("2.orbax-checkpoint-tmp")
        print("saving 2", flush=True)
        ckpt.save(2, big, {"step": 2})
        ckpt.wait_until_finished()
        print("saved 2", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
