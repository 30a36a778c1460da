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

import lwm.checkpoint as checkpoint_module
from lwm import storage
from lwm.checkpoint import (COMMIT_RECORD, AtomicWriter, CheckpointWriteError, StreamingCheckpointer, flat_fns,
                            iter_streaming, load_checkpoint, load_pickle, load_streaming, save_streaming,
                            train_state_dict)
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
    latest = ckpt.latest()  # the newest save, milestone or not
    assert latest["step"] == 10 and latest["dataset_state"] == {"loc": 9} and latest["suffix"] == "_10"
    assert latest["checkpoint"] == f"trainstate::{tmp_path}/streaming_train_state_10"
    with open(tmp_path / "metadata_10.pkl", "rb") as f:
        assert pickle.load(f)["step"] == 10
    # The defaults: exported params in bf16 beside an exact float32 train state, which resumes.
    default = StreamingCheckpointer(None, str(tmp_path / "b"))
    default.save_all(1, params, opt_state)
    assert load_streaming(str(tmp_path / "b" / "streaming_params"))["lm_head"]["kernel"].dtype == jnp.bfloat16
    state = load_streaming(str(tmp_path / "b" / "streaming_train_state"))
    np.testing.assert_array_equal(state["params"]["params"]["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert default.latest()["checkpoint"] == f"trainstate::{tmp_path}/b/streaming_train_state"
    default.save_all(2, params, opt_state, milestone=True)  # milestones: exported params only
    assert {"streaming_params_2", "metadata_2.pkl"} <= set(os.listdir(tmp_path / "b"))
    assert "streaming_train_state_2" not in os.listdir(tmp_path / "b")
    # The original's behaviour, on request: one bf16 params file.
    original = StreamingCheckpointer(dict(exact_resume=False), str(tmp_path / "c"))
    original.save_all(1, params, opt_state)
    assert sorted(os.listdir(tmp_path / "c")) == ["metadata.pkl", "streaming_params"]


def saved_folder(tmp_path, steps=(1,)):
    params = jax.tree.map(jnp.asarray, small_params())
    opt_state = optax.adam(1e-3).init(params)
    ckpt = StreamingCheckpointer(None, str(tmp_path))
    for step in steps:
        scaled = jax.tree.map(lambda x: x * step, params)
        ckpt.save_all(step, scaled, opt_state, metadata={"note": step}, dataset_state={"loc": step})
    return ckpt, params, opt_state


def folder_step(ckpt):
    """The step every file of the folder agrees on (asserting that they do)."""
    latest = ckpt.latest()
    state = load_streaming(latest["checkpoint"].split("::")[1])
    exported = load_streaming(os.path.join(ckpt.checkpoint_dir, "streaming_params"))
    step = latest["step"]
    assert int(state["step"]) == step and latest["dataset_state"] == {"loc": step}
    base = small_params()["lm_head"]["kernel"]
    np.testing.assert_allclose(state["params"]["params"]["lm_head"]["kernel"], base * step, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(exported["lm_head"]["kernel"], np.float32), base * step, rtol=1e-2)
    return step


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception`)."""


@pytest.mark.parametrize("kill_after", range(5))
def test_a_save_killed_anywhere_leaves_the_last_committed_one(tmp_path, monkeypatch, kill_after):
    """Kill the save of step 2 after each of its file writes (4 staged files, then the commit
    record): recovery brings the folder to step 1 before the commit point and to
    step 2 after it, every file agreeing, and no staged file left."""
    ckpt, params, opt_state = saved_folder(tmp_path)
    calls = {"n": 0}
    real_save = checkpoint_module.save_pickle

    def counting(real):
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] > kill_after:
                raise Killed()
            return out
        return wrapped

    # counted: the staged writes (train state, params, dataset, metadata), then the commit record
    monkeypatch.setattr(checkpoint_module, "save_streaming", counting(checkpoint_module.save_streaming))
    monkeypatch.setattr(checkpoint_module, "save_pickle", counting(real_save))
    scaled = jax.tree.map(lambda x: x * 2, params)
    with pytest.raises(Killed):
        ckpt.save_all(2, scaled, opt_state, metadata={"note": 2}, dataset_state={"loc": 2})
    monkeypatch.undo()
    committed = os.path.exists(tmp_path / COMMIT_RECORD)
    assert committed == (kill_after == 4)
    message = ckpt.recover()
    assert message is not None
    assert folder_step(ckpt) == (2 if committed else 1)
    assert [n for n in os.listdir(tmp_path) if ".saving-" in n or ".tmp." in n or n == COMMIT_RECORD] == []
    assert ckpt.recover() is None  # nothing left to do


def test_a_kill_between_the_renames_is_rolled_forward(tmp_path, monkeypatch):
    ckpt, params, opt_state = saved_folder(tmp_path)
    real_replace, renamed = os.replace, []

    def replace(src, dst):  # the commit's renames are staged -> final; let two of four happen
        if str(src).endswith(".saving-2"):
            if len(renamed) == 2:
                raise Killed()
            renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(Killed):
        ckpt.save_all(2, jax.tree.map(lambda x: x * 2, params), opt_state, dataset_state={"loc": 2})
    monkeypatch.undo()
    assert "finished the interrupted save of step 2" in ckpt.recover()
    assert folder_step(ckpt) == 2


def test_a_full_disk_keeps_the_previous_save(tmp_path, monkeypatch):
    import errno

    ckpt, params, opt_state = saved_folder(tmp_path, steps=(1,))
    real = checkpoint_module.save_streaming

    def full_disk(path, *args, **kwargs):
        if path.endswith(".saving-2") and "streaming_params" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_streaming", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 2 not saved: writing .*streaming_params"
                                                   r"\.saving-2 failed: No space left on device; the previous"):
        ckpt.save_all(2, params, opt_state, dataset_state={"loc": 2})
    assert sorted(os.listdir(tmp_path)) == ["dataset.pkl", "metadata.pkl", "streaming_params",
                                            "streaming_train_state"]
    assert folder_step(ckpt) == 1
