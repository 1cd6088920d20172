"""The shared trainer: learning, presets, non-finite steps, exact resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from common import sharding
from common.metrics import read_jsonl
from common import trainer as trainer_lib
from common.trainer import NonFiniteError, Trainer, TrainerConfig, restore_eval_variables
from tests.toy_task import RegressionData, RegressionTask

OPTIM = {"learning_rate": 1e-2, "warmup_steps": 2, "total_steps": 40, "weight_decay": 1e-4, "b2": 0.99}
REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, steps=20, mesh="data_parallel", optim=OPTIM, devices=None, **kw):
    cfg = TrainerConfig(total_steps=steps, global_batch_size=16, mesh=mesh, log_every=kw.pop("log_every", 5),
                        checkpoint_every=kw.pop("checkpoint_every", 10), progress=False, **kw)
    return Trainer(RegressionTask(), cfg, optim, tmp_path, mesh=sharding.make_mesh(mesh, devices))


def test_trainer_learns_and_logs(tmp_path):
    trainer = _trainer(tmp_path, steps=40, eval_every=20)
    held_out = trainer.metrics_evaluator(lambda: iter([next(RegressionData(16, seed=9))]))
    seen = []

    def count_calls(params, model_state):
        seen.append(int(trainer.state.step))
        return {"calls": len(seen)}

    result = trainer.fit(RegressionData(16), evaluators={"eval": held_out, "probe": count_calls})
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.evaluations["eval"]["mse"] < losses[0] and result.evaluations["eval"]["step"] == 40
    assert seen == [20, 40]  # every eval_every steps and at the end
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [(l["step"], l["probe/calls"]) for l in lines if "probe/calls" in l] == [(20, 1.0), (40, 2.0)]
    assert trainer.summary(result)["eval"] == result.evaluations["eval"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert trainer.checkpoints.all_steps() == [20, 30, 40]
    trainer.close()


def test_resume_and_restore_for_evaluation_never_run_the_random_init(tmp_path, monkeypatch):
    """A resumed run's state comes from the checkpoint alone: no init is compiled, run or held beside it."""
    first = _trainer(tmp_path, steps=10)
    first.fit(RegressionData(16))
    saved = jax.device_get(first.state.params)
    first.close()

    def must_not_init(*args, **kwargs):
        raise AssertionError("the random init ran although a checkpoint was restored")

    monkeypatch.setattr(trainer_lib, "init_state", must_not_init)
    variables = restore_eval_variables(RegressionTask(), None, tmp_path, sharding.make_mesh("data_parallel"))
    restored = jax.tree_util.tree_leaves_with_path(jax.device_get(variables["params"]))
    assert len(restored) == len(jax.tree.leaves(saved))
    for (path, value), want in zip(restored, jax.tree.leaves(saved)):
        np.testing.assert_array_equal(value, want, err_msg=jax.tree_util.keystr(path))
    resumed = _trainer(tmp_path, steps=20)
    assert resumed.fit(RegressionData(16)).step == 20
    resumed.close()
    monkeypatch.undo()
    fresh = _trainer(tmp_path / "fresh", steps=0)  # no checkpoint: the seed's init, on first use
    assert int(fresh.state.step) == 0
    fresh.close()


def test_metrics_evaluator_counts_each_real_row_once(tmp_path):
    """A padded last batch (4 real rows of 16) and an all-padding one weigh by their real rows."""
    trainer = _trainer(tmp_path, steps=1)
    data = RegressionData(16, seed=3)
    full, last = next(data), next(data)
    padded = {k: np.where((np.arange(16) < 4).reshape(-1, *[1] * (v.ndim - 1)), v, 0.0).astype(np.float32)
              for k, v in last.items()}  # rows 4.. zeroed, as padding
    batches = [dict(full, valid=np.ones(16, bool)), dict(padded, valid=np.arange(16) < 4),
               dict(padded, valid=np.zeros(16, bool))]
    with sharding.use_mesh(trainer.mesh):
        got = trainer.metrics_evaluator(lambda: iter(batches))(trainer.state.params, trainer.state.model_state)
    x = np.concatenate([full["x"], last["x"][:4]])
    y = np.concatenate([full["y"], last["y"][:4]])
    pred = trainer.task.model.apply({"params": jax.device_get(trainer.state.params)}, x)
    np.testing.assert_allclose(got["mse"], np.mean((pred - y) ** 2), rtol=1e-5)
    trainer.close()


def test_state_is_sharded_and_donated(tmp_path):
    trainer = _trainer(tmp_path, steps=1, mesh="fsdp_tp")
    kernel = trainer.state.params["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # Adam moments follow the parameter layout.
    mu = trainer.state.opt_state[1][0].mu["fc1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    old = trainer.state
    batch = sharding.shard_batch(next(RegressionData(16)), trainer.mesh)
    with sharding.use_mesh(trainer.mesh):
        trainer.state, _ = trainer.compiled_train_step(batch)(trainer.state, batch)
    assert old.params["fc1"]["kernel"].is_deleted()
    trainer.close()


def test_presets_follow_the_same_loss_curve(tmp_path):
    def curve(name, mesh, devices=None):
        trainer = _trainer(tmp_path / name, steps=5, mesh=mesh, devices=devices, log_every=1, checkpoint_every=5)
        res = trainer.fit(RegressionData(16))
        trainer.close()
        return [h["loss"] for h in res.history] + [float(np.abs(np.asarray(res.state.params["fc1"]["kernel"])).sum())]

    single = curve("single", "data_parallel", devices=jax.devices()[:1])
    for preset in ("data_parallel", "fsdp", "fsdp_tp"):
        np.testing.assert_allclose(curve(preset, preset), single, rtol=1e-4, err_msg=preset)


def test_nonfinite_steps_are_skipped(tmp_path):
    trainer = _trainer(tmp_path, steps=10)
    res = trainer.fit(RegressionData(16, nan_steps=(3, 4)))
    assert res.nonfinite_total == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state.params))
    trainer.close()


def test_nonfinite_streak_stops_with_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, steps=40, max_nonfinite_streak=5, checkpoint_every=5)
    with pytest.raises(NonFiniteError, match="last checkpoint \\(step 10\\)"):
        trainer.fit(RegressionData(16, nan_steps=tuple(range(10, 40))))
    trainer.close()
    restored = _trainer(tmp_path, steps=10)
    assert restored.restore_if_any(RegressionData(16)) == 10
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))
    restored.close()


class _UpdateProbe(RegressionTask):
    """Reports the update count its loss was given."""

    def loss(self, params, model_state, batch, rng, update):
        loss, metrics, new_state = super().loss(params, model_state, batch, rng, update)
        return loss, dict(metrics, update=update), new_state


def test_accumulation_counts_updates_and_averages_once_per_update(tmp_path):
    """accum_steps=2: the loss sees the update count (0, 0, 1, 1, 2, 2), and the parameter average
    moves once per applied update, by ema_decay, towards the parameters after that update."""
    decay = 0.5
    cfg = TrainerConfig(total_steps=6, global_batch_size=16, ema_decay=decay, progress=False)
    trainer = Trainer(_UpdateProbe(), cfg, {**OPTIM, "accum_steps": 2}, tmp_path, mesh=sharding.make_mesh("fsdp"))
    data = RegressionData(16)
    kernel = lambda tree: np.asarray(tree["fc1"]["kernel"])  # noqa: E731
    expected, updates = kernel(trainer.state.params), []
    with sharding.use_mesh(trainer.mesh):
        for step in range(6):
            batch = sharding.shard_batch(next(data), trainer.mesh)
            trainer.state, metrics = trainer.compiled_train_step(batch)(trainer.state, batch)
            updates.append(int(metrics["update"]))
            if step % 2 == 1:  # an update was applied
                expected = decay * expected + (1 - decay) * kernel(trainer.state.params)
            np.testing.assert_allclose(kernel(trainer.state.ema_params), expected, rtol=1e-6, err_msg=f"step {step}")
    assert updates == [0, 0, 1, 1, 2, 2] and int(trainer.state.update) == 3
    assert trainer.eval_params is trainer.state.ema_params
    trainer.close()


def _run_script(workdir, steps, kill_at=None, sigterm_at=None):
    cmd = [sys.executable, "-m", "tests.helpers.train_toy", "--workdir", str(workdir), "--steps", str(steps)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    if kill_at is None and sigterm_at is None:
        return subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(cmd + ["--slow"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = kill_at or sigterm_at
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= target:
            proc.send_signal(signal.SIGKILL if kill_at else signal.SIGTERM)
            break
    proc.wait(timeout=120)
    return proc


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    _run_script(tmp_path / "clean", 30)
    killed = _run_script(tmp_path / "killed", 30, kill_at=17)
    assert killed.returncode == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 30, steps
    _run_script(tmp_path / "killed", 30)
    a = np.load(tmp_path / "clean" / "final_params.npz")
    b = np.load(tmp_path / "killed" / "final_params.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # The log holds every step once: none lost in a buffer at the kill, none written twice by the resume.
    clean, killed_log = read_jsonl(tmp_path / "clean"), read_jsonl(tmp_path / "killed")
    assert [r["step"] for r in killed_log] == [r["step"] for r in clean] == [5, 10, 15, 20, 25, 30]
    assert [r["loss"] for r in killed_log] == [r["loss"] for r in clean]


def test_sigterm_checkpoints_and_exits(tmp_path):
    proc = _run_script(tmp_path, 1000, sigterm_at=7)
    assert proc.returncode == 0, proc.stderr.read()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 7 <= steps[-1] < 1000
