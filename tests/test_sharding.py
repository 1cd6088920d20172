"""Meshes, presets and where each kind of parameter lands, on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from common import sharding as sh


class ToyModel(nn.Module):
    """One parameter of every kind the model families use."""

    @nn.compact
    def __call__(self, tokens, image):
        init = nn.initializers.normal(0.02)
        emb = nn.Embed(64, 16, embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")), name="token_embedding")
        x = emb(tokens)  # (B, L, 16)
        x = nn.LayerNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            name="ln",
        )(x)
        # Fused heads: (embed, heads * head_dim). nn.DenseGeneral is avoided on
        # purpose: flax re-runs its init in flattened shape during apply, which
        # breaks its logical constraint under a mesh.
        x = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("embed", "heads")), use_bias=False, name="query")(x)
        x = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")), use_bias=False, name="fc_in")(x)
        x = nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), use_bias=False, name="fc_out")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        y = nn.Conv(8, (3, 3), kernel_init=nn.with_logical_partitioning(init, ("conv_h", "conv_w", "conv_in", "conv_out")), name="conv")(image)
        # The stem conv's 3 input channels can't be split 4 ways: stays whole.
        return x.mean() + y.mean()


def _init(model, batch=8):
    tokens = jnp.zeros((batch, 4), jnp.int32)
    image = jnp.zeros((batch, 8, 8, 4), jnp.float32)
    return lambda rng: model.init(rng, tokens, image), (tokens, image)


def test_resolve_mesh_shape():
    assert sh.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sh.resolve_mesh_shape("fsdp_tp", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sh.resolve_mesh_shape({"fsdp": 8}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sh.resolve_mesh_shape("data=2, fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(sh.ShardingError, match="Could not parse"):
        sh.resolve_mesh_shape("data=two", 8)
    with pytest.raises(sh.ShardingError, match="8 devices"):
        sh.resolve_mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(sh.ShardingError, match="divisible by 3"):
        sh.resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(sh.ShardingError, match="At most one"):
        sh.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(sh.ShardingError, match="Unknown mesh axes"):
        sh.resolve_mesh_shape({"model": 8}, 8)
    with pytest.raises(sh.ShardingError, match="Unknown mesh preset"):
        sh.resolve_mesh_shape("zero3", 8)


def test_mesh_uses_all_devices(n_devices):
    mesh = sh.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.devices.size == n_devices
    assert len({d.id for d in mesh.devices.flat}) == n_devices


def test_batch_divisibility_error():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh.check_batch_divisible(12, mesh)  # 4-way batch split
    with pytest.raises(sh.ShardingError, match=r"Global batch 10 .*4 ways.*multiple of 4"):
        sh.check_batch_divisible(10, mesh)
    with pytest.raises(sh.ShardingError, match="does not divide"):
        sh.shard_batch({"x": np.zeros((6, 3))}, sh.make_mesh("data_parallel"))


EXPECTED = {
    # preset: {param path fragment: spec}
    "data_parallel": {
        "token_embedding']['embedding": P(None, None),
        "query']['kernel": P(None, None),
        "fc_in']['kernel": P(None, None),
        "conv']['kernel": P(None, None, None, None),
        "ln']['scale": P(None),
    },
    "fsdp": {
        "token_embedding']['embedding": P(None, "fsdp"),
        "query']['kernel": P("fsdp", None),
        "fc_in']['kernel": P(None, "fsdp"),
        "fc_out']['kernel": P("fsdp", None),
        "conv']['kernel": P(None, None, None, None),  # 4 in-channels: not split 8 ways
        "ln']['scale": P(None),
    },
    "fsdp_tp": {
        "token_embedding']['embedding": P("tensor", "fsdp"),
        "query']['kernel": P("fsdp", "tensor"),
        "fc_in']['kernel": P("tensor", "fsdp"),
        "fc_out']['kernel": P("fsdp", "tensor"),
        "conv']['kernel": P(None, None, "fsdp", "tensor"),
        "conv']['bias": P(None),
        "ln']['scale": P(None),
    },
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_presets_place_parameters(preset, n_devices):
    mesh = sh.make_mesh(preset)
    init_fn, _ = _init(ToyModel())
    params, shardings = sh.init_sharded(init_fn, jax.random.key(0), mesh=mesh)
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    specs = {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}
    for fragment, want in EXPECTED[preset].items():
        (path,) = [p for p in specs if fragment in p]
        assert specs[path] == str(want), (preset, path, specs[path])
    # The arrays really are split: every device holds 1/ways of each sharded leaf.
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in flat_params:
        spec = leaf.sharding.spec
        ways = 1
        for axes in spec:
            for name in (axes,) if isinstance(axes, str) else (axes or ()):
                ways *= mesh.shape[name]
        shard = leaf.addressable_shards[0].data
        assert shard.size * ways == leaf.size, jax.tree_util.keystr(path)
    # Sharded init gives the values of a plain single-device init (up to fusion ulps).
    plain = nn.meta.unbox(init_fn(jax.random.key(0)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


def test_activation_constraint_does_not_reuse_batch_axis():
    # ("batch", "length", "embed"): batch takes data+fsdp, so embed must stay whole.
    spec = nn.logical_to_mesh_axes(("batch", "length", "embed"), sh.LOGICAL_RULES)
    assert spec == P(("data", "fsdp"), None, None)
    spec = nn.logical_to_mesh_axes(("embed", "mlp"), sh.LOGICAL_RULES)
    assert spec == P("fsdp", "tensor")


def test_shard_batch_places_rows(n_devices):
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    host = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8)}
    batch = sh.shard_batch(host, mesh)
    assert batch["image"].shape == (8, 3)
    assert batch["image"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
    # 4 batch shards of 2 rows; each replicated over the 2 tensor devices.
    rows = sorted({tuple(np.asarray(s.data[:, 0])) for s in batch["image"].addressable_shards})
    assert rows == [(0.0, 3.0), (6.0, 9.0), (12.0, 15.0), (18.0, 21.0)]


def test_initialize_distributed_is_noop_without_cluster(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert sh.initialize_distributed() is False


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_sharded_forward_matches_single_device(preset):
    model = ToyModel()
    init_fn, (tokens, image) = _init(model)
    mesh = sh.make_mesh(preset)
    params, _ = sh.init_sharded(init_fn, jax.random.key(1), mesh=mesh)
    want = model.apply(jax.device_get(params), tokens, image)
    batch = sh.shard_batch({"tokens": np.asarray(tokens), "image": np.asarray(image) + 0.5}, mesh)
    with sh.use_mesh(mesh):
        got = jax.jit(model.apply)(params, batch["tokens"], batch["image"])
    want = model.apply(jax.device_get(params), tokens, image + 0.5)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
