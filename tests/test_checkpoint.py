"""Streaming checkpoints: format, round trips, casts, sharded loads, atomicity and errors."""
import os
import pickle

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from flax.serialization import msgpack_serialize, to_bytes

from lwm.checkpoint import (AtomicWriter, StreamingCheckpointer, flat_fns, iter_streaming, load_checkpoint,
                            load_streaming, save_streaming, train_state_dict)
from lwm.mesh import build_mesh, make_shard_and_gather_fns, match_partition_rules, partition_rules


def small_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"transformer": {"wte": {"embedding": rng.normal(size=(16, 8)).astype(np.float32)},
                            "ln_f": {"kernel": rng.normal(size=(8,)).astype(np.float32)}},
            "lm_head": {"kernel": rng.normal(size=(8, 16)).astype(np.float32)}}


def test_file_is_the_lwm_msgpack_stream(tmp_path):
    params = small_params()
    path = str(tmp_path / "streaming_params")
    save_streaming(path, params)
    # Decode by hand: a sequence of (key_path, to_bytes(array)) msgpack pairs.
    with open(path, "rb") as f:
        items = list(msgpack.Unpacker(f))
    keys = [tuple(k) for k, _ in items]
    assert set(keys) == {("transformer", "wte", "embedding"), ("transformer", "ln_f", "kernel"), ("lm_head", "kernel")}
    for key, value in items:
        expected = params[key[0]][key[1]][key[2]] if len(key) == 3 else params[key[0]][key[1]]
        assert value == to_bytes(expected)


def test_round_trip_and_cast(tmp_path):
    params = small_params()
    path = str(tmp_path / "p")
    save_streaming(path, params, float_dtype=jnp.bfloat16)
    loaded = load_streaming(path, target=params)
    assert loaded["lm_head"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"].astype(jnp.bfloat16))
    save_streaming(path, params)
    loaded = load_streaming(path, target=jax.eval_shape(lambda: jax.tree.map(jnp.asarray, params)),
                            float_dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_original_writer_format_loads(tmp_path):
    """A file packed exactly as the original StreamingCheckpointer packs it."""
    params = small_params(1)
    path = tmp_path / "orig"
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for a, b in (("transformer", "wte"), ("transformer", "ln_f")):
            leaf = "embedding" if b == "wte" else "kernel"
            f.write(packer.pack(((a, b, leaf), to_bytes(params[a][b][leaf]))))
        f.write(packer.pack((("lm_head", "kernel"), to_bytes(params["lm_head"]["kernel"]))))
    _, loaded = load_checkpoint(f"params::{path}", params_target=params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_sharded_load_places_each_tensor(tmp_path):
    params = small_params()
    path = str(tmp_path / "p")
    save_streaming(path, params)
    mesh = build_mesh("1,2,2,2")
    specs = match_partition_rules(partition_rules(True, 0), params)
    shard_fns, gather_fns = make_shard_and_gather_fns(specs, mesh)
    _, loaded = load_checkpoint(f"params::{path}", params_target=params, params_shard_fns=flat_fns(shard_fns))
    k = loaded["lm_head"]["kernel"]
    assert isinstance(k, jax.Array) and k.sharding.spec == specs["lm_head"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k), params["lm_head"]["kernel"])
    # and back out through gather functions
    save_streaming(str(tmp_path / "q"), loaded, gather_fns=flat_fns(gather_fns))
    jax.tree.map(np.testing.assert_array_equal, load_streaming(str(tmp_path / "q")), params)


def test_trainstate_forms(tmp_path):
    params = jax.tree.map(jnp.asarray, small_params())
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    path = str(tmp_path / "streaming_train_state")
    save_streaming(path, train_state_dict(jnp.asarray(7, jnp.int32), params, opt_state))
    keys = {k for k, _ in iter_streaming(path)}
    assert ("params", "params", "lm_head", "kernel") in keys and ("step",) in keys
    target = train_state_dict(jnp.asarray(0, jnp.int32), params, opt_state)
    state, _ = load_checkpoint(f"trainstate::{path}", trainstate_target=target)
    assert int(state["step"]) == 7
    from flax.serialization import from_state_dict
    opt_restored = from_state_dict(opt_state, state["opt_state"])
    jax.tree.map(np.testing.assert_array_equal, opt_restored, opt_state)
    _, only_params = load_checkpoint(f"trainstate_params::{path}", params_target=params)
    jax.tree.map(np.testing.assert_array_equal, only_params, params)
    with pytest.raises(ValueError, match="cannot be loaded here"):
        load_checkpoint(f"trainstate::{path}", allow_trainstate=False)


def test_flax_params_form(tmp_path):
    params = small_params(2)
    path = tmp_path / "flax"
    path.write_bytes(msgpack_serialize(params))
    _, loaded = load_checkpoint(f"flax_params::{path}", params_target=params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_errors_name_the_problem(tmp_path):
    params = small_params()
    path = str(tmp_path / "p")
    save_streaming(path, params)
    size = os.path.getsize(path)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(open(path, "rb").read()[: size - 10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_streaming(str(truncated))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xc1" * 64)
    with pytest.raises(ValueError, match="corrupt at byte 0"):
        load_streaming(str(garbage))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_streaming(str(tmp_path / "empty"))
    wrong = {**params, "lm_head": {"kernel": np.zeros((8, 17), np.float32)}}
    with pytest.raises(ValueError, match=r"lm_head/kernel: expected shape \(8, 17\), found \(8, 16\)"):
        load_streaming(path, target=wrong)
    extra = {**params, "vision_head": {"kernel": np.zeros((8, 4), np.float32)}}
    with pytest.raises(ValueError, match=r"missing keys \(1\): vision_head/kernel"):
        load_streaming(path, target=extra)
    fewer = {"transformer": params["transformer"]}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): lm_head/kernel"):
        load_streaming(path, target=fewer)
    with pytest.raises(ValueError, match="unknown type 'weights'"):
        load_checkpoint(f"weights::{path}")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(f"params::{tmp_path}/nope")


def test_interrupted_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "streaming_params")
    save_streaming(path, small_params(0))
    before = open(path, "rb").read()

    class Boom(Exception):
        pass

    def exploding(_):
        raise Boom()

    bad_fns = {("transformer", "wte", "embedding"): lambda x: x, ("transformer", "ln_f", "kernel"): exploding,
               ("lm_head", "kernel"): lambda x: x}
    with pytest.raises(Boom):
        save_streaming(path, small_params(1), gather_fns=bad_fns)
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if ".tmp." in f] == []
    with pytest.raises(RuntimeError):
        with AtomicWriter(str(tmp_path / "x.pkl")) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert not (tmp_path / "x.pkl").exists()


def test_run_folder_layout(tmp_path):
    params = jax.tree.map(jnp.asarray, small_params())
    opt_state = optax.adam(1e-3).init(params)
    ckpt = StreamingCheckpointer(dict(float_dtype="fp32", save_optimizer_state=True), str(tmp_path))
    ckpt.save_all(5, params, opt_state, metadata={"flags": {}}, dataset_state={"loc": 3})
    ckpt.save_all(10, params, opt_state, metadata={"flags": {}}, dataset_state={"loc": 9}, milestone=True)
    names = set(os.listdir(tmp_path))
    assert {"streaming_train_state", "metadata.pkl", "dataset.pkl", "streaming_train_state_10",
            "metadata_10.pkl", "dataset_10.pkl"} <= names
    latest = ckpt.latest()
    assert latest["step"] == 5 and latest["dataset_state"] == {"loc": 3}
    assert latest["checkpoint"] == f"trainstate::{tmp_path}/streaming_train_state"
    with open(tmp_path / "metadata_10.pkl", "rb") as f:
        assert pickle.load(f)["step"] == 10
    params_only = StreamingCheckpointer(dict(float_dtype="bf16"), str(tmp_path / "b"))
    params_only.save_all(1, params, opt_state)
    assert os.path.exists(tmp_path / "b" / "streaming_params")
    assert load_streaming(str(tmp_path / "b" / "streaming_params"))["lm_head"]["kernel"].dtype == jnp.bfloat16
