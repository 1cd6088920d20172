"""Training faults (issue 10): damaged checkpoints are named, not restored; the log holds every step
once across kill + resume; one run per workdir; a resume may not silently change what is trained."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common import run_guard, sharding
from common.checkpoint import CheckpointCorruptError, CheckpointManager, abstract_like, array_checksums
from common.metrics import read_jsonl
from common.trainer import Trainer, TrainerConfig
from tests.toy_task import RegressionData, RegressionTask

REPO = Path(__file__).resolve().parents[1]
OPTIM = {"learning_rate": 1e-2, "warmup_steps": 2, "total_steps": 40, "weight_decay": 1e-4}


def _trainer(workdir, steps, optim=OPTIM, mesh="data_parallel", **kw):
    cfg = TrainerConfig(total_steps=steps, global_batch_size=16, mesh=mesh, log_every=kw.pop("log_every", 5),
                        checkpoint_every=kw.pop("checkpoint_every", 10), progress=False, **kw)
    return Trainer(RegressionTask(), cfg, optim, workdir, mesh=sharding.make_mesh(mesh))


def _fit(workdir, steps, evaluators=None, **kw):
    trainer = _trainer(workdir, steps, **kw)
    try:
        return trainer.fit(RegressionData(16), evaluators)
    finally:
        trainer.close()


# -- damaged checkpoints ------------------------------------------------------

def _state(seed: int, mesh: Mesh) -> dict:
    """Random uint32 words (incompressible, so zstd stores them verbatim and a test can find them on
    disk) sharded over the mesh, and a replicated float vector."""
    rng = np.random.default_rng(seed)
    return {"w": jax.device_put(rng.integers(0, 2**32, (512, 8), dtype=np.uint32), NamedSharding(mesh, P("fsdp"))),
            "b": jax.device_put(rng.standard_normal(8).astype(np.float32), NamedSharding(mesh, P()))}


@pytest.fixture(scope="module")
def two_steps(n_devices, tmp_path_factory):
    """Steps 1 and 2 of a small state, saved; and the host copies of both."""
    mesh = jax.make_mesh((n_devices,), ("fsdp",))
    directory = tmp_path_factory.mktemp("two_steps")
    states = {step: _state(step, mesh) for step in (1, 2)}
    with CheckpointManager(directory) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"step": step})
    return directory, {step: jax.tree.map(np.asarray, s) for step, s in states.items()}


def _target(mesh: Mesh):
    state = _state(1, mesh)
    return abstract_like(state, jax.tree.map(lambda x: x.sharding, state))


def _data_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def _flip_a_stored_word(step_dir: Path, words: np.ndarray) -> None:
    needle = words[100, :4].tobytes()
    for path in _data_files(step_dir):
        data = bytearray(path.read_bytes())
        at = data.find(needle)
        if at >= 0:
            data[at + 1] ^= 0x10
            path.write_bytes(bytes(data))
            return
    raise AssertionError("the array's bytes were not found verbatim in the data files")


DAMAGE = {
    "description deleted": (lambda d, host: (d / "state" / "_METADATA").unlink(),
                            "the description of its arrays (state/_METADATA) is missing"),
    "data file truncated": (lambda d, host: os.truncate(_data_files(d)[-1], _data_files(d)[-1].stat().st_size // 2),
                            "its files cannot be read (ValueError: OUT_OF_RANGE"),
    "array bytes flipped": (lambda d, host: _flip_a_stored_word(d, host["w"]),
                            "1 array(s) differ from the checksums saved with them (the files changed after "
                            "the save): w"),
    "metadata cut short": (lambda d, host: (d / "metadata" / "metadata").write_text('{"st'),
                           "its files cannot be read (JSONDecodeError"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_is_named_and_the_previous_one_offered(two_steps, tmp_path, damage):
    saved, host = two_steps
    directory = tmp_path / "ckpt"
    shutil.copytree(saved, directory)
    spoil, expected = DAMAGE[damage]
    spoil(directory / "2", host[2])
    target = _target(jax.make_mesh((jax.device_count(),), ("fsdp",)))
    with CheckpointManager(directory) as ckpt:
        with pytest.raises(CheckpointCorruptError) as info:
            ckpt.restore(target=target)
        message = str(info.value)
        assert message.startswith(f"Step 2 in {directory} is damaged: ") and expected in message, message
        assert "The previous checkpoint is step 1" in message and "fallback_to_previous_checkpoint" in message
        assert len(message.splitlines()) == 1 and len(message) < 1000  # no tensorstore specs or tracebacks

        state, meta = ckpt.restore(target=target, fall_back=True)
        assert meta == {"step": 1}
        for key in host[1]:
            np.testing.assert_array_equal(np.asarray(state[key]), host[1][key])
        assert ckpt.all_steps() == [1] and (directory / "2.damaged").is_dir()
        assert ckpt.save(2, state, {"step": 2})  # the damaged step is out of the way
        ckpt.wait_until_finished()
        assert ckpt.restore(target=target)[1] == {"step": 2}


def test_a_damaged_only_checkpoint_says_there_is_none_earlier(two_steps, tmp_path):
    saved, host = two_steps
    directory = tmp_path / "ckpt"
    shutil.copytree(saved / "2", directory / "2")
    _flip_a_stored_word(directory / "2", host[2]["w"])
    target = _target(jax.make_mesh((jax.device_count(),), ("fsdp",)))
    with CheckpointManager(directory) as ckpt:
        with pytest.raises(CheckpointCorruptError, match="Step 2 .* no earlier checkpoint"):
            ckpt.restore(target=target, fall_back=True)
        assert ckpt.all_steps() == [2]  # nothing to fall back to: left where it is


def test_checksums_do_not_depend_on_the_mesh_and_see_one_changed_bit(n_devices):
    rng = np.random.default_rng(0)
    host = {"f32": rng.standard_normal((16, 8)).astype(np.float32),
            "bf16": rng.standard_normal((8, 4)).astype(jnp.bfloat16),
            "i8": rng.integers(-100, 100, (8,), dtype=np.int8),
            "mask": rng.random(8) > 0.5, "step": np.int32(7)}
    devices = np.array(jax.devices())
    layouts = {
        "fsdp": NamedSharding(Mesh(devices, ("fsdp",)), P("fsdp")),
        "2x4": NamedSharding(Mesh(devices.reshape(2, 4), ("data", "fsdp")), P("fsdp", "data")),
        "replicated": NamedSharding(Mesh(devices, ("fsdp",)), P()),
        "one device": jax.sharding.SingleDeviceSharding(devices[3]),
    }

    def placed(tree, sharding):  # matrices laid out by `sharding`, the rest replicated beside them
        replicated = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else sharding
        return {k: jax.device_put(v, sharding if np.ndim(v) == 2 else replicated) for k, v in tree.items()}

    sums = {name: array_checksums(placed(host, s)) for name, s in layouts.items()}
    assert all(s == sums["fsdp"] for s in sums.values()), sums
    key = jax.random.key(3)
    assert array_checksums({"key": key}) == array_checksums({"key": jax.random.key_data(key)})  # stored as key data
    changed = dict(host, f32=host["f32"].copy())
    changed["f32"].view(np.uint32)[11, 5] ^= 1  # the lowest mantissa bit of one value
    after = array_checksums(placed(changed, layouts["2x4"]))
    assert {k for k in after if after[k] != sums["fsdp"][k]} == {"f32"}


def test_trainer_falls_back_to_the_previous_checkpoint_only_when_asked(tmp_path):
    _fit(tmp_path, 4, checkpoint_every=2, log_every=1)
    (tmp_path / "checkpoints" / "4" / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointCorruptError, match="Step 4 .* previous checkpoint is step 2"):
        _fit(tmp_path, 6, checkpoint_every=2, log_every=1)
    result = _fit(tmp_path, 6, checkpoint_every=2, log_every=1, fallback_to_previous_checkpoint=True)
    assert [h["step"] for h in result.history] == [3, 4, 5, 6]  # resumed at 2
    assert (tmp_path / "checkpoints" / "4.damaged").is_dir()
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6]


# -- the log across kill + resume -----------------------------------------------

def test_log_holds_every_step_once_across_a_lost_checkpoint_and_a_rerun(tmp_path):
    """A run that logged (and evaluated) past its last committed checkpoint, e.g. killed while the
    step-20 save was in flight, resumes at 10: steps 15 and 20 and the step-20 evaluation are logged
    once, not twice. Re-running the finished run evaluates again, replacing its final records."""
    calls = []

    def probe(params, model_state):
        calls.append(1)
        return {"calls": len(calls)}

    _fit(tmp_path, 20, {"probe": probe}, eval_every=10)
    shutil.rmtree(tmp_path / "checkpoints" / "20")  # as if that save had never committed
    _fit(tmp_path, 30, {"probe": probe}, eval_every=10)
    _fit(tmp_path, 30, {"probe": probe}, eval_every=10)  # nothing left to train: evaluates only
    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [(r["step"], r["probe/calls"]) for r in records if "probe/calls" in r] == [(10, 1), (20, 3), (30, 5)]


# -- one run per workdir --------------------------------------------------------

def test_a_second_run_on_a_workdir_in_use_stops_and_names_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from common.run_guard import WorkdirLock; "
         "lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_use = re.escape(f"Another run is training in {tmp_path} (pid {holder.pid} on host ")
        with pytest.raises(run_guard.WorkdirInUseError, match=in_use):
            _fit(tmp_path, 2)
        assert not (tmp_path / "metrics.jsonl").exists() and not list((tmp_path / "checkpoints").iterdir())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _fit(tmp_path, 2).step == 2  # the kernel dropped the killed holder's lock


# -- config changes on resume -----------------------------------------------------

def test_resume_refuses_a_changed_learning_rate_unless_forced(tmp_path, caplog):
    _fit(tmp_path, 4, checkpoint_every=4)
    with pytest.raises(run_guard.ConfigChangeError) as info:
        _fit(tmp_path, 8, optim={**OPTIM, "learning_rate": 2e-2}, checkpoint_every=4, seed=1)
    message = str(info.value)
    assert "optim.learning_rate: 0.01 -> 0.02" in message and "trainer.seed: 0 -> 1" in message
    assert "allow_config_change=True" in message and "total_steps" not in message.split("A resume may")[0]
    with pytest.raises(run_guard.ConfigChangeError, match="total_steps=3 is below step 4"):
        _fit(tmp_path, 3, checkpoint_every=4, allow_config_change=True)
    with caplog.at_level(logging.INFO, logger="common.run_guard"):
        result = _fit(tmp_path, 6, mesh="fsdp", checkpoint_every=2, log_every=1)  # allowed: logged only
    assert result.step == 6
    assert ("trainer.checkpoint_every: 4 -> 2; trainer.log_every: 5 -> 1; trainer.mesh: 'data_parallel' -> 'fsdp'; "
            "trainer.total_steps: 4 -> 6") in caplog.text
    with caplog.at_level(logging.WARNING, logger="common.run_guard"):
        forced = _fit(tmp_path, 8, optim={**OPTIM, "learning_rate": 2e-2}, allow_config_change=True)
    assert forced.step == 8 and "optim.learning_rate: 0.01 -> 0.02" in caplog.text


def test_the_schedule_may_follow_the_run_length_where_a_recipe_ties_them():
    def config(steps, schedule):
        return {"trainer": {"total_steps": steps, "seed": 0}, "optim": {"total_steps": schedule, "accum_steps": 1}}

    check = dict(step=4, where="ckpt", allow_changes=False)
    run_guard.check_resumed_config(config(4, 4), config(8, 8), **check)  # tied before and after
    run_guard.check_resumed_config(config(4, 100), config(8, 100), **check)  # an untouched schedule
    with pytest.raises(run_guard.ConfigChangeError, match=r"optim.total_steps: 100 -> 8"):
        run_guard.check_resumed_config(config(4, 100), config(8, 8), **check)
