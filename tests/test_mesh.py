"""Mesh parsing, partition rules, sharding constraints and host <-> mesh moves."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from lwm.mesh import (BATCH_SPEC, batch_to_global, build_mesh, cpu_xla_flags, data_rank_and_world, gather_tree,
                      match_partition_rules, parse_mesh_dim, partition_rules, shard_tree, sharding_table,
                      with_sharding_constraint)


@pytest.mark.parametrize("text, dims, split", [
    ("1,-1,2,2", (1, 2, 2, 2), False),
    ("!1,1,-1,1", (1, 1, 8, 1), True),
    ("dp:1,fsdp:-1,tp:2,sp:2", (1, 2, 2, 2), False),
    ("sp:8", (1, 1, 1, 8), False),
    ("2, 2, 2, 1", (2, 2, 2, 1), False),
    ("-1,1,1,1", (8, 1, 1, 1), False),
])
def test_parse_mesh_dim(text, dims, split):
    assert parse_mesh_dim(text, 8) == (dims, split)


@pytest.mark.parametrize("text, message", [
    ("1,2,2,3", "= 12 devices, but there are 8"),
    ("1,-1,-1,1", "only one axis may be -1"),
    ("1,-1,3,1", "not divisible by the product 3"),
    ("a,1,1,1", "'a' is not an integer"),
    ("1,1,1", "has 3 values; expected 4"),
    ("foo:2", "unknown axis 'foo'"),
    ("dp:2,dp:4", "given twice"),
    ("dp:2,1,1,4", "mixes named and positional"),
    ("0,-1,1,1", "must be positive or -1"),
    ("", "is empty"),
])
def test_parse_mesh_dim_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_mesh_dim(text, 8)


def test_build_mesh_axes():
    mesh = build_mesh("1,2,2,2")
    assert mesh.axis_names == ("dp", "fsdp", "tp", "sp") and dict(mesh.shape) == dict(dp=1, fsdp=2, tp=2, sp=2)


def test_rules_scanned_variants_follow_spec():
    r0 = dict(partition_rules(True, 0))
    assert r0["attention/(wq|wk|wv)/kernel"] == PS(None, ("fsdp", "sp"), "tp")
    assert r0["attention/wo/kernel"] == PS(None, "tp", ("fsdp", "sp"))
    assert r0["feed_forward/w2/kernel"] == PS(None, "tp", ("fsdp", "sp"))
    assert r0["(attention_norm|ffn_norm)/kernel"] == PS(None, None)
    assert r0["transformer/wte/embedding"] == PS("tp", ("fsdp", "sp"))
    assert r0["lm_head/kernel"] == PS(("fsdp", "sp"), "tp")
    r1 = dict(partition_rules(True, 1))
    assert r1["attention/(wq|wk|wv)/kernel"] == PS(("fsdp", "sp"), None, "tp")
    assert r1["feed_forward/w2/kernel"] == PS("tp", None, ("fsdp", "sp"))
    ru = dict(partition_rules(False))
    assert ru["attention/(wq|wk|wv)/kernel"] == PS(("fsdp", "sp"), "tp")


def test_match_rules_params_and_optimizer_state():
    import optax

    params = {"transformer": {"wte": {"embedding": np.zeros((16, 8))},
                              "h": {"scan_decoder": {"attention": {"wq": {"kernel": np.zeros((2, 8, 8))}},
                                                     "ffn_norm": {"kernel": np.zeros((2, 8))}}},
                              "ln_f": {"kernel": np.zeros((8,))}},
              "lm_head": {"kernel": np.zeros((8, 16))}}
    specs = match_partition_rules(partition_rules(True, 0), params)
    assert specs["transformer"]["h"]["scan_decoder"]["attention"]["wq"]["kernel"] == PS(None, ("fsdp", "sp"), "tp")
    assert specs["lm_head"]["kernel"] == PS(("fsdp", "sp"), "tp")
    opt_state = optax.adamw(1e-3).init(jax.tree.map(jnp.asarray, params))
    opt_specs = match_partition_rules(partition_rules(True, 0), opt_state, optimizer_state=True)
    assert opt_specs[0].mu["lm_head"]["kernel"] == PS(("fsdp", "sp"), "tp")
    assert opt_specs[0].count == PS()  # scalars replicated
    with pytest.raises(ValueError, match="no partition rule matches parameter transformer/mystery/kernel"):
        match_partition_rules(partition_rules(True, 0), {"transformer": {"mystery": {"kernel": np.zeros((4, 4))}}})


def test_shard_and_gather_round_trip():
    mesh = build_mesh("1,2,2,2")
    tree = {"lm_head": {"kernel": np.arange(8 * 16, dtype=np.float32).reshape(8, 16)},
            "transformer": {"ln_f": {"kernel": np.ones(8, np.float32)}}}
    specs = match_partition_rules(partition_rules(True, 0), tree)
    placed = shard_tree(tree, specs, mesh, float_dtype=jnp.bfloat16)
    k = placed["lm_head"]["kernel"]
    assert k.sharding == NamedSharding(mesh, PS(("fsdp", "sp"), "tp")) and k.dtype == jnp.bfloat16
    assert k.addressable_shards[0].data.shape == (2, 8)
    back = gather_tree(placed)
    np.testing.assert_array_equal(back["lm_head"]["kernel"].astype(np.float32), tree["lm_head"]["kernel"])
    assert "per device" in sharding_table(tree, specs, mesh)


def test_with_sharding_constraint_is_noop_without_axes():
    x = jnp.ones((8, 4))
    assert with_sharding_constraint(x, PS("dp"), None) is x
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    assert with_sharding_constraint(x, PS("dp"), mesh) is x  # mesh lacks 'dp'
    mesh = build_mesh("8,1,1,1")
    y = jax.jit(lambda a: with_sharding_constraint(a * 2, PS("dp"), mesh))(x)
    assert y.sharding.spec == PS("dp")
    np.testing.assert_array_equal(y, 2 * x)


def test_data_placement():
    mesh = build_mesh("2,2,1,2")
    assert data_rank_and_world(mesh, 8) == (0, 1)  # one process reads all rows
    batch = {"input_tokens": np.arange(32, dtype=np.int32).reshape(4, 8)}
    out = batch_to_global(batch, mesh)
    assert out["input_tokens"].sharding == NamedSharding(mesh, BATCH_SPEC)
    np.testing.assert_array_equal(np.asarray(out["input_tokens"]), batch["input_tokens"])


def test_cpu_xla_flags_set_devices_and_keep_the_callers_other_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x "
                                    "--xla_cpu_collective_call_terminate_timeout_seconds=5")
    flags = cpu_xla_flags(2, collective_timeout_s=60).split()
    assert flags == ["--xla_force_host_platform_device_count=2",
                     "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60",
                     "--xla_cpu_collective_call_terminate_timeout_seconds=60", "--xla_dump_to=/tmp/x"]
    monkeypatch.delenv("XLA_FLAGS")
    flags = cpu_xla_flags(1).split()
    assert flags[0] == "--xla_force_host_platform_device_count=1" and len(flags) == 3
