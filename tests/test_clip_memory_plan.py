"""The CLIP memory plan: XLA's per-device bytes of the compiled train step match really sharded arrays."""

import dataclasses

import jax
import numpy as np
import pytest

from clip_jax import memory_plan
from clip_jax.train import CLIPTask
from clip_jax.variants import CLIPConfig, decode_variant
from common import optim, sharding
from common.trainer import Trainer, TrainerConfig

BASE = decode_variant("ViT-B/32")
# Three layers: a scanned stack loops over all blocks but the last (that one runs at the pooled rows alone);
# with two the loop holds one block, and what remat saves there is lost in XLA's buffer assignment.
TINY = CLIPConfig(32, dataclasses.replace(BASE.vision, image_size=32, patch_size=8, width=64, layers=3, heads=2),
                  dataclasses.replace(BASE.text, width=32, layers=3, heads=2, context_length=16))
BATCH = 32


def _bytes_on(device, tree) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.fixture(scope="module")
def fsdp_plan():
    return memory_plan.plan(TINY, global_batch=BATCH, mesh=sharding.make_mesh("fsdp"), remat=False, dtype=np.float32)


def test_clip_memory_plan_arguments_are_the_real_shards(tmp_path, n_devices, fsdp_plan):
    mesh = sharding.make_mesh("fsdp")
    # The state the trainer really creates, and a batch placed as the trainer places it.
    task = CLIPTask(TINY, remat=False, scan_layers=True, mesh=mesh)
    trainer = Trainer(task, TrainerConfig(global_batch_size=BATCH, progress=False), optim.OptimConfig(), tmp_path,
                      mesh=mesh)
    batch = sharding.shard_batch({"image": np.zeros((BATCH, 32, 32, 3), np.uint8),
                                  "text": np.zeros((BATCH, 16), np.int32)}, mesh)
    device = jax.devices()[0]
    state_bytes = _bytes_on(device, trainer.state)
    trainer.close()
    total_state = sum(x.nbytes for x in jax.tree.leaves(trainer.state))
    assert fsdp_plan["arguments"] == state_bytes + _bytes_on(device, batch) and state_bytes < total_state / 2
    assert fsdp_plan["params"] == _bytes_on(device, trainer.state.params)
    # The donated state comes back in place: everything but the metrics is aliased.
    assert fsdp_plan["aliased"] == state_bytes and fsdp_plan["outputs"] - fsdp_plan["aliased"] < 4096
    assert fsdp_plan["temporaries"] > 0 and fsdp_plan["peak"] >= fsdp_plan["arguments"] + fsdp_plan["temporaries"]
    assert fsdp_plan["devices"] == n_devices and fsdp_plan["mesh"]["fsdp"] == n_devices


def test_clip_memory_plan_command_prints_a_table_and_remat_shrinks_the_temporaries(monkeypatch, capsys, n_devices,
                                                                                   fsdp_plan):
    monkeypatch.setattr(memory_plan, "decode_variant", lambda name: TINY)
    rows = memory_plan.main(["--variant", "tiny", "--global-batch", str(BATCH), "--devices", str(n_devices),
                             "--remat", "on", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["remat"] and "| data=1,fsdp=8,tensor=1 | 8 (cpu) | on |" in out
    assert rows[0]["temporaries"] < fsdp_plan["temporaries"] and rows[0]["arguments"] == fsdp_plan["arguments"]
    with pytest.raises(SystemExit):  # 60 rows do not split over 8 devices (--batch: --global-batch's alias)
        memory_plan.main(["--variant", "tiny", "--batch", "60", "--devices", str(n_devices)])


def test_clip_memory_plan_plans_every_mesh_and_remat_setting(monkeypatch, n_devices):
    """--mesh takes several presets (--meshes too, as dalle_jax.memory_plan spells it): one plan per mesh and
    remat setting, each with the global batch asked for (plan itself: the tests above)."""
    calls = []

    def fake_plan(config, *, global_batch, mesh, remat, dtype):
        calls.append((dict(mesh.shape), global_batch, remat))
        return {"mesh": dict(mesh.shape), "devices": mesh.size, "platform": "cpu", "remat": remat,
                **{c: 0 for c in memory_plan.COLUMNS}}

    monkeypatch.setattr(memory_plan, "decode_variant", lambda name: TINY)
    monkeypatch.setattr(memory_plan, "plan", fake_plan)
    memory_plan.main(["--variant", "tiny", "--batch", "16", "--devices", str(n_devices), "--meshes", "fsdp",
                      "data_parallel"])
    assert [(m["fsdp"], m["data"], batch, remat) for m, batch, remat in calls] == [
        (8, 1, 16, False), (8, 1, 16, True), (1, 8, 16, False), (1, 8, 16, True)]
