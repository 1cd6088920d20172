"""Restore on another mesh: a checkpoint written under FSDP on 8 devices resumes under data parallelism on
4 with identical parameters and keeps training; one written by more processes than the resuming run has
says that its data cannot continue bitwise and continues from the same step. (tests/test_multihost.py
resumes a real two-process checkpoint with one process.)"""

import logging

import jax
import numpy as np

from common import sharding
from common import trainer as trainer_lib
from common.trainer import Trainer, TrainerConfig
from tests.toy_task import RegressionData, RegressionTask

BATCH = 16
OPTIM = {"learning_rate": 1e-2, "warmup_steps": 2, "total_steps": 12, "weight_decay": 1e-4}
LOOP = dict(global_batch_size=BATCH, log_every=1, checkpoint_every=2, progress=False, async_checkpoints=False)


def _trainer(workdir, preset, steps, devices=None):
    mesh = sharding.make_mesh(preset, devices)
    return Trainer(RegressionTask(), TrainerConfig(total_steps=steps, mesh=preset, **LOOP), OPTIM, workdir, mesh=mesh)


def _fit(trainer, data):
    try:
        return trainer.fit(data)
    finally:
        trainer.close()


def _assert_same_values(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_another_mesh_fsdp_on_8_resumes_on_data_parallel_on_4(tmp_path, n_devices, caplog):
    first = _fit(_trainer(tmp_path / "run", "fsdp", 4), RegressionData(BATCH))
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(first.state.params))
    saved = jax.device_get(first.state)

    four = jax.devices()[:4]
    resumed = _trainer(tmp_path / "run", "data_parallel", 6, devices=four)
    data = RegressionData(BATCH)
    with caplog.at_level(logging.INFO, logger="common.trainer"):
        assert resumed.restore_if_any(data) == 4
    assert "fsdp=8" in caplog.text and "data=4" in caplog.text  # both meshes named
    _assert_same_values(resumed.state, saved)  # params, optimizer moments, step, rng: all identical
    assert {d for x in jax.tree.leaves(resumed.state) for d in x.sharding.device_set} == set(four)
    assert data.position == 4  # one process before and after: the data continues exactly

    result = _fit(resumed, data)
    assert [h["step"] for h in result.history] == [5, 6] and np.isfinite(result.history[-1]["loss"])
    # The same six steps on one mesh, up to the order of the gradient reductions.
    straight = _fit(_trainer(tmp_path / "straight", "fsdp", 6), RegressionData(BATCH))
    np.testing.assert_allclose([h["loss"] for h in result.history], [h["loss"] for h in straight.history[4:]],
                               rtol=1e-5)
    for x, y in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(straight.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_another_mesh_process_count_change_warns_and_continues_from_the_step(tmp_path, monkeypatch, caplog):
    # A checkpoint as two processes write it: two input positions, a layout of 2 processes.
    monkeypatch.setattr(trainer_lib, "_gather_from_processes", lambda value: [value, value])
    monkeypatch.setattr(Trainer, "_layout", lambda self: {"mesh": dict(self.mesh.shape), "processes": 2})
    first = _fit(_trainer(tmp_path, "fsdp", 4), RegressionData(BATCH))
    saved = jax.device_get(first.state.params)
    monkeypatch.undo()

    resumed = _trainer(tmp_path, "data_parallel", 6, devices=jax.devices()[:4])
    data = RegressionData(BATCH)
    with caplog.at_level(logging.WARNING, logger="common.trainer"):
        assert resumed.restore_if_any(data) == 4
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 process(es)" in warning and "this run has 1" in warning and "cannot continue bitwise" in warning
    assert "fsdp=8" in warning and "data=4" in warning  # both layouts named
    _assert_same_values(resumed.state.params, saved)
    assert data.position == 0  # the input starts afresh in the new layout

    result = _fit(resumed, data)
    assert [h["step"] for h in result.history] == [5, 6] and data.position == 2
    assert np.isfinite(result.history[-1]["loss"])

