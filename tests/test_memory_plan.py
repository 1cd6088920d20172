"""Memory plans from shapes: per-device bytes equal those of really sharded arrays; the DALL·E plan command."""

import math

import jax
import jax.numpy as jnp
import pytest

from common import sharding
from common.memory import abstract_mesh, per_device_bytes
from dalle_jax import memory_plan
from dalle_jax.transformer import DALLE
from dalle_jax.variants import decode_variant

TINY = decode_variant("tiny")


def _init_fn(model):
    text = jnp.zeros((1, TINY.text_len), jnp.int32)
    codes = jnp.zeros((1, TINY.image_len), jnp.int32)
    return lambda rng: model.init(rng, text, codes)


@pytest.mark.parametrize("preset", ["data_parallel", "fsdp", "fsdp_tp"])
def test_planned_bytes_equal_real_shards(n_devices, preset):
    init = _init_fn(DALLE(TINY, scan_layers=True))
    planned = per_device_bytes(jax.eval_shape(init, jax.random.key(0)), abstract_mesh(preset, n_devices))
    params, _ = sharding.init_sharded(init, jax.random.key(0), mesh=sharding.make_mesh(preset))
    device = jax.devices()[0]
    real = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)
    assert planned == real
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert (planned == total) == (preset == "data_parallel")


def test_plan_command_prints_every_mesh(capsys):
    rows = memory_plan.main(["--variant", "tiny", "--devices", "8", "16", "--global-batch", "32"])
    assert len(rows) == 4 and "| data=1,fsdp=8,tensor=1 | 8 |" in capsys.readouterr().out
    for row in rows:
        assert row["adam_moments"] == 2 * row["params"] and row["total_remat_True"] < row["total_remat_False"]
    # activations scale with the rows each device holds
    by_devices = {r["devices"]: r for r in rows if r["mesh"]["tensor"] == 1}
    assert math.isclose(by_devices[8]["activations_remat_False"], 2 * by_devices[16]["activations_remat_False"],
                        rel_tol=1e-6)


def test_plan_refuses_a_batch_the_mesh_cannot_split():
    with pytest.raises(SystemExit):
        memory_plan.main(["--variant", "tiny", "--devices", "64", "--global-batch", "100"])


def test_plan_flags_are_the_clip_plans(capsys):
    """--mesh / --global-batch, as clip_jax.memory_plan spells them; --meshes / --batch are aliases."""
    rows = memory_plan.main(["--variant", "tiny", "--devices", "8", "--mesh", "fsdp_tp", "--global-batch", "16"])
    aliased = memory_plan.main(["--variant", "tiny", "--devices", "8", "--meshes", "fsdp_tp", "--batch", "16"])
    assert rows == aliased and len(rows) == 1 and rows[0]["mesh"]["tensor"] > 1 and rows[0]["global_batch"] == 16
