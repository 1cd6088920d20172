"""common/checkpoint.py: sharded round trips, resharding, keep-N, metadata,
async saves, clear errors, and atomicity under SIGKILL of a real process."""
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    abstract_like,
)
from tests.helpers import ckpt_writer

REPO = Path(__file__).resolve().parents[1]


def make_train_state(key) -> train_state.TrainState:
    """A flax TrainState with a real AdamW state after one update (mu, nu != 0)."""
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(16)])
    params = model.init(key, jnp.zeros((1, 8)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-2))
    grads = jax.tree.map(lambda p: jnp.cos(p) + 0.5, params)
    return state.apply_gradients(grads=grads)


def fsdp_shardings(tree, mesh: Mesh, axis="fsdp"):
    """Shard dim 0 of every leaf it divides over `axis`; replicate the rest."""
    size = mesh.shape[axis]

    def spec(x):
        return P(axis) if x.ndim and x.shape[0] % size == 0 else P()

    return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), tree)


@pytest.fixture(scope="module")
def mesh8(n_devices):
    return jax.make_mesh((n_devices,), ("fsdp",))


@pytest.fixture(scope="module")
def saved(mesh8, tmp_path_factory):
    """One TrainState saved on the (8,) FSDP mesh, with its host copy."""
    directory = tmp_path_factory.mktemp("ckpt")
    abstract = jax.eval_shape(make_train_state, jax.random.key(0))
    shardings = fsdp_shardings(abstract, mesh8)
    state = jax.jit(make_train_state, out_shardings=shardings)(jax.random.key(0))
    assert any(s.spec == P("fsdp") for s in jax.tree.leaves(shardings)), "nothing is sharded"
    host = jax.tree.map(np.asarray, state)
    with CheckpointManager(directory) as ckpt:
        assert ckpt.save(5, state, {"step": 5})
    return directory, abstract, shardings, host


def assert_bitwise_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert isinstance(got, jax.Array)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)


def test_round_trip_sharded_train_state_is_bitwise(saved):
    directory, abstract, shardings, host = saved
    assert np.abs(np.asarray(host.opt_state[0].mu["layers_0"]["kernel"])).max() > 0
    with CheckpointManager(directory) as ckpt:
        assert ckpt.latest_step() == 5
        state, metadata = ckpt.restore(target=abstract_like(abstract, shardings))
    assert metadata == {"step": 5}
    assert type(state) is train_state.TrainState and state.tx is not None
    assert_bitwise_equal(state, host)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert got.sharding == want


@pytest.mark.parametrize("layout", ["data_x_fsdp_2x4", "replicated", "four_devices"])
def test_restore_onto_another_mesh(saved, layout):
    directory, abstract, _, host = saved
    devices = np.array(jax.devices())
    if layout == "data_x_fsdp_2x4":
        mesh = Mesh(devices.reshape(2, 4), ("data", "fsdp"))
        shardings = jax.tree.map(
            lambda x: NamedSharding(mesh, P("fsdp", "data") if x.ndim == 2 else P()), abstract
        )
    elif layout == "replicated":
        shardings = NamedSharding(Mesh(devices, ("fsdp",)), P())
    else:
        shardings = fsdp_shardings(abstract, Mesh(devices[:4], ("fsdp",)))
    target = abstract_like(abstract, shardings)
    with CheckpointManager(directory) as ckpt:
        state, _ = ckpt.restore(5, target=target)
    assert_bitwise_equal(state, host)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert got.sharding == want.sharding


def test_scalar_and_prng_key_leaves(tmp_path, mesh8):
    state = {"step": 7, "lr": 0.5, "w": jnp.arange(8.0), "rng": jax.random.key(3)}
    rep = NamedSharding(mesh8, P())
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        restored, _ = ckpt.restore(target=abstract_like(jax.eval_shape(lambda: state), rep))
    assert isinstance(restored["step"], jax.Array) and int(restored["step"]) == 7
    assert restored["step"].dtype == jnp.int32 and float(restored["lr"]) == 0.5
    assert restored["rng"].dtype == state["rng"].dtype
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
    )


def test_keeps_only_the_latest_n(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=2, async_save=False) as ckpt:
        for step in range(1, 5):
            assert ckpt.save(step, {"x": np.full((4,), step, np.float32)}, {"step": step})
        assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path), key=str) == ["3", "4"]
    with CheckpointManager(tmp_path) as reopened:
        assert reopened.all_steps() == [3, 4] and reopened.restore_metadata() == {"step": 4}


def test_relative_directory(tmp_path, monkeypatch, mesh8):
    # `--workdir runs/x` is how people launch runs; orbax itself needs absolute paths.
    monkeypatch.chdir(tmp_path)
    state = {"x": jax.device_put(np.arange(8, dtype=np.float32), NamedSharding(mesh8, P("fsdp")))}
    with CheckpointManager("runs/rel", async_save=True) as ckpt:
        assert ckpt.save(1, state, {"step": 1})
        ckpt.wait_until_finished()
        restored, meta = ckpt.restore(target=abstract_like(state, state["x"].sharding))
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(8))
    assert (tmp_path / "runs" / "rel" / "1").is_dir() and meta == {"step": 1}


def test_save_interval_and_force(tmp_path):
    tree = {"x": np.zeros((2,), np.float32)}
    with CheckpointManager(tmp_path, save_interval_steps=3) as ckpt:
        assert ckpt.save(1, tree, {}) is False
        assert ckpt.save(3, tree, {}) is True
        assert ckpt.save(4, tree, {}) is False
        assert ckpt.save(5, tree, {}, force=True) is True
        assert ckpt.save(2, tree, {}, force=False) is False  # older than the latest
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 5]


def test_metadata_round_trip(tmp_path, mesh8):
    metadata = {
        "config": {"model": {"variant": "ViT-B/32", "width": 64}, "lr": 3e-4,
                   "betas": [0.9, 0.98], "bf16": True, "warmup": None},
        "step": 7,
        "data": {"iterator": json.dumps({"last_seen_indices": {"0": 41}})},
        "note": "héllo ✓",
    }
    state = {"x": jnp.ones((8,))}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(7, state, metadata)
        ckpt.wait_until_finished()
        assert ckpt.restore_metadata() == metadata
        assert ckpt.restore_metadata(7) == metadata
        target = abstract_like(state, NamedSharding(mesh8, P()))
        assert ckpt.restore(target=target)[1] == metadata


def test_async_save_returns_before_commit_and_snapshots_state(tmp_path, mesh8, monkeypatch):
    """`save` returns while the files are still being written, and the trainer
    may donate (delete) the state right after it."""
    commit = threading.Event()
    rename = os.rename

    def held_rename(src, dst, *args, **kwargs):  # orbax's commit on local disks
        commit.wait(timeout=10)
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", held_rename)
    sharding = NamedSharding(mesh8, P("fsdp"))
    state = {"w": jax.device_put(jnp.arange(4096.0).reshape(512, 8), sharding)}
    expected = jax.tree.map(np.asarray, state)
    target = abstract_like(state, sharding)
    with CheckpointManager(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, state, {"step": 1})
        assert os.listdir(tmp_path) == ["1.orbax-checkpoint-tmp"]  # not committed yet
        state["w"].delete()  # what donation does to the buffers
        commit.set()
        ckpt.wait_until_finished()
        assert os.listdir(tmp_path) == ["1"]  # committed: renamed, no tmp left
        restored, _ = ckpt.restore(target=target)
    assert_bitwise_equal(restored, expected)


def test_sync_save_is_committed_on_return(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(1, {"x": np.ones((3,), np.float32)}, {})
        assert os.listdir(tmp_path) == ["1"]
        assert "commit_success.txt" in os.listdir(tmp_path / "1")


def test_restore_from_empty_directory_says_so(tmp_path, mesh8):
    target = abstract_like({"x": jnp.ones((8,))}, NamedSharding(mesh8, P()))
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for call in (lambda: ckpt.restore(target=target), ckpt.restore_metadata):
            with pytest.raises(CheckpointNotFoundError, match="it is empty") as info:
                call()
            assert str(tmp_path) in str(info.value)
        (tmp_path / "3.orbax-checkpoint-tmp").mkdir()  # what a killed save leaves
        assert ckpt.latest_step() is None
        with pytest.raises(CheckpointNotFoundError, match=r"only interrupted saves \['3.orbax"):
            ckpt.restore_metadata()
        ckpt.save(1, {"x": np.ones((8,), np.float32)}, {})
        ckpt.wait_until_finished()
        with pytest.raises(CheckpointNotFoundError, match=r"step 4 .*committed steps are \[1\]"):
            ckpt.restore(4, target=target)


def test_mismatched_target_lists_keys_and_shapes(tmp_path, mesh8):
    rep = NamedSharding(mesh8, P())
    state = {"params": {"w": np.zeros((16, 4), np.float32), "b": np.zeros((4,), np.float32)},
             "step": np.int32(3)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait_until_finished()
        wrong = {"params": {"w": np.zeros((16, 8), np.float32), "c": np.zeros((2,), np.float32)},
                 "step": np.int32(0)}
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore(target=abstract_like(wrong, rep))
        message = str(info.value)
        assert "in the checkpoint but not in the target (1):\n    params.b" in message
        assert "in the target but not in the checkpoint (1):\n    params.c" in message
        assert "params.w: checkpoint (16, 4), target (16, 8)" in message
        assert "step" not in message.split("target:")[1].split("Build")[0]
        # Structure right, one shape wrong (the case orbax would otherwise
        # report as a stack trace from a reader thread).
        smaller = {"params": {"w": np.zeros((8, 4), np.float32), "b": np.zeros((4,), np.float32)},
                   "step": np.int32(0)}
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore(target=abstract_like(smaller, rep))
        expected = "shape differs (1):\n    params.w: checkpoint (16, 4), target (8, 4)"
        assert expected in str(info.value)


def test_bad_leaves_are_rejected_clearly(tmp_path):
    with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"\['name'\] is a str.*metadata"):
            ckpt.save(1, {"name": "run-1", "x": np.ones((2,), np.float32)}, {})
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.save(1, {"x": np.ones((2,), np.float32)}, {"bad": object()})
        ckpt.save(1, {"x": np.ones((2,), np.float32)}, {})
        ckpt.wait_until_finished()
        no_sharding = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
        with pytest.raises(TypeError, match=r"\['x'\].*with a sharding.*abstract_like"):
            ckpt.restore(target=no_sharding)


def disk_usage(directory: Path) -> int:
    """Bytes in the files under `directory` (0 if absent), tolerant of writers."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def test_sigkill_mid_save_leaves_previous_step_intact(tmp_path, mesh8):
    """Kill a real writer process once 64 of the 256 MiB of step 2 are on disk
    (ckpt_writer holds the commit back, so the kill always precedes it)."""
    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")
    log = tmp_path / "writer.log"
    with open(log, "w") as stderr:
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.ckpt_writer", str(directory), "256"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    lines = []
    try:
        for line in writer.stdout:
            lines.append(line.strip())
            if lines[-1] == "saving 2":
                break
        assert lines == ["saved 1", "saving 2"], (
            f"writer printed {lines}, rc={writer.poll()}, stderr:\n{log.read_text()[-3000:]}"
        )
        tmp_dir = directory / "2.orbax-checkpoint-tmp"
        deadline = time.monotonic() + 20
        while disk_usage(tmp_dir) < 64 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        rest = writer.communicate()[0]
    assert writer.returncode == -signal.SIGKILL
    # The kill landed mid-save: step 2 exists only as uncommitted debris.
    assert "saved 2" not in rest
    assert tmp_dir.is_dir() and not (directory / "2").exists(), os.listdir(directory)
    assert disk_usage(tmp_dir) >= 64 * 2**20

    expected = ckpt_writer.small_state()
    target = abstract_like(expected, fsdp_shardings(expected, mesh8))
    with CheckpointManager(directory) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        state, metadata = ckpt.restore(target=target)
        assert_bitwise_equal(state, expected)
        assert metadata == {"step": 1}
        # A resumed run saves step 2 again, over the debris.
        assert ckpt.save(2, state, {"step": 2})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]
        assert_bitwise_equal(ckpt.restore(2, target=target)[0], expected)
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_replicated_arrays_are_written_whole_in_one_process(tmp_path, mesh8, monkeypatch):
    """One process: no replicated array is cut into per-device slices to save (each a compiled program),
    and it comes back bitwise."""
    replicated = NamedSharding(mesh8, P())
    state = {f"w{i}": jax.device_put(np.arange(4096 * (i + 1), dtype=np.float32).reshape(64, -1), replicated)
             for i in range(4)}
    assert all(len(x.sharding.device_set) == 8 and x.sharding.is_fully_replicated for x in state.values())
    slices = []
    real = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a[0].shape) or real(*a, **k))
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(1, state, {})
        restored, _ = ckpt.restore(1, target=abstract_like(state, replicated))
    assert slices == []
    assert_bitwise_equal(restored, jax.tree.map(np.asarray, state))


def test_replacing_orbaxs_array_handler_is_silent(tmp_path, monkeypatch, caplog):
    """Opening a manager swaps orbax's default jax.Array handler (above) without orbax's override warning."""
    from common import checkpoint

    default = copy.copy(ocp.type_handlers.get_type_handler(jax.Array))
    default._use_replica_parallel = True  # orbax's own default, as in a fresh process
    ocp.type_handlers.register_type_handler(jax.Array, default, override=True)
    monkeypatch.setattr(checkpoint, "_REPLICATED_WHOLE", False)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        with CheckpointManager(tmp_path, async_save=False):
            pass
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
    assert [r.getMessage() for r in caplog.records if "overriding" in r.getMessage()] == []
