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


@pytest.fixture(params=["local", "bucket"])
def folder(request, tmp_path):
    """A run folder on the local disk, or in a GCS bucket (an emulator, through the real gcsfs)."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("bucket_dir")


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
    exported = load_streaming(storage.join(ckpt.checkpoint_dir, "streaming_params"))
    step = latest["step"]
    assert int(state["step"]) == step and latest["dataset_state"] == {"loc": step}
    base = small_params()["lm_head"]["kernel"]
    np.testing.assert_allclose(state["params"]["params"]["lm_head"]["kernel"], base * step, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(exported["lm_head"]["kernel"], np.float32), base * step, rtol=1e-2)
    return step


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception`)."""


@pytest.mark.parametrize("kill_after", range(5))
def test_a_save_killed_anywhere_leaves_the_last_committed_one(folder, monkeypatch, kill_after):
    """Kill the save of step 2 after each of its file writes (4 staged files, then the commit
    record), on a local disk and in a bucket: recovery brings the folder to step 1 before the
    commit point and to step 2 after it, every file agreeing, and no staged file left."""
    ckpt, params, opt_state = saved_folder(folder)
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
    committed = storage.exists(storage.join(folder, COMMIT_RECORD))
    assert committed == (kill_after == 4)
    message = ckpt.recover()
    assert message is not None
    assert folder_step(ckpt) == (2 if committed else 1)
    assert [n for n in storage.listdir(folder) if ".saving-" in n or ".tmp." in n or n == COMMIT_RECORD] == []
    assert ckpt.recover() is None  # nothing left to do


def test_a_kill_between_the_renames_is_rolled_forward(folder, monkeypatch):
    """In a bucket a "rename" is a copy then a delete: killed between any two of those steps,
    the roll-forward redoes what is left and the folder is the new save."""
    ckpt, params, opt_state = saved_folder(folder)
    real_rename, renamed = storage.rename, []

    def rename(src, dst):  # the commit's renames are staged -> final; let two of four happen
        if str(src).endswith(".saving-2"):
            if len(renamed) == 2:
                raise Killed()
            renamed.append(dst)
        real_rename(src, dst)

    monkeypatch.setattr(storage, "rename", rename)
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


# ---- tensors over msgpack's 4 GiB object limit ---------------------------------------------------


def test_msgpack_refuses_one_byte_over_the_limit_the_splitter_uses(tmp_path):
    """The real limit, without allocating 4 GiB: a sparse file mapped into memory is a 4 GiB
    buffer that msgpack measures and refuses before copying it."""
    import mmap

    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(checkpoint_module.MSGPACK_LIMIT + 1)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        with pytest.raises(ValueError, match="too large"):
            msgpack.Packer().pack(memoryview(buffer))
    assert checkpoint_module.MAX_RECORD_BYTES == checkpoint_module.MSGPACK_LIMIT == 2**32 - 1


def test_a_7b_stacked_kernel_is_planned_in_records_under_the_limit():
    """32 x 4096 x 11008 float32 (5.8 GB, a 7B model's scanned MLP kernel in the exact train
    state): pieces that cover it exactly, each well under the limit with room for headers;
    in bf16 (2.9 GB, the original's saves) and for every small tensor: one record, as before."""
    shape = (32, 4096, 11008)
    plan = checkpoint_module.split_plan(shape, np.float32)
    assert len(plan) == 2 and plan[0][0] == 0 and plan[-1][1] == np.prod(shape)
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    assert all((stop - start) * 4 + checkpoint_module.RECORD_OVERHEAD <= checkpoint_module.MSGPACK_LIMIT
               for start, stop in plan)
    assert checkpoint_module.split_plan(shape, jnp.bfloat16) == [(0, int(np.prod(shape)))]
    assert checkpoint_module.split_plan((4096, 4096), np.float32) == [(0, 4096 * 4096)]


def test_tensors_over_the_record_limit_round_trip(tmp_path, monkeypatch):
    """With the writer's limit lowered to 4 KiB, a 3 x 40 x 50 float32 kernel (24 KB) is written
    as consecutive pieces and read back exactly, sharded or not; the small tensors beside it
    stay single records in the original format; a piece missing is a named error."""
    monkeypatch.setattr(checkpoint_module, "MAX_RECORD_BYTES", 4096)
    rng = np.random.default_rng(0)
    tree = {**small_params(), "big": {"kernel": rng.normal(size=(3, 40, 50)).astype(np.float32)}}
    path = str(tmp_path / "split")
    save_streaming(path, tree)
    with open(path, "rb") as f:
        keys = [tuple(k) for k, _ in msgpack.Unpacker(f, max_buffer_size=0)]
    parts = [k for k in keys if k[:2] == ("big", "kernel")]
    assert len(parts) == 8 and parts[0][-1] == "__lwm_part__:0:8:3x40x50"  # 768 floats a piece
    assert ("lm_head", "kernel") in keys  # a small tensor: unchanged record
    loaded = load_streaming(path, target=tree)
    jax.tree.map(np.testing.assert_array_equal, loaded, tree)
    mesh = build_mesh("1,2,1,4")
    from jax.sharding import NamedSharding, PartitionSpec as PS

    place = lambda x: jax.device_put(x, NamedSharding(mesh, PS(None, "fsdp", None)))  # noqa: E731
    sharded = load_streaming(path, target=tree, shard_fns={("big", "kernel"): place})
    np.testing.assert_array_equal(np.asarray(sharded["big"]["kernel"]), tree["big"]["kernel"])
    with open(path, "rb") as f:
        records = list(msgpack.Unpacker(f, max_buffer_size=0))
    with open(tmp_path / "gap", "wb") as f:
        for record in records:
            if record[0][-1] != "__lwm_part__:3:8:3x40x50":
                f.write(msgpack.packb(record))
    with pytest.raises(ValueError, match=r"big/kernel: piece 4 follows piece 2"):
        load_streaming(str(tmp_path / "gap"))


# ---- what autoresume starts from ---------------------------------------------------------------


def test_resume_follows_the_newest_saves_own_file_list(tmp_path):
    """Flags changed between runs: a leftover exact train state of step 1 beside a newer
    params-only save of step 2 resumes from step 2's params (its metadata lists them), not
    from the stale train state; a folder the original wrote (no file list) is read by name."""
    params = jax.tree.map(jnp.asarray, small_params())
    opt_state = optax.adam(1e-3).init(params)
    StreamingCheckpointer(None, str(tmp_path)).save_all(1, params, opt_state, dataset_state={"loc": 1})
    later = StreamingCheckpointer(dict(exact_resume=False), str(tmp_path))
    later.save_all(2, params, opt_state, dataset_state={"loc": 2})
    assert {"streaming_train_state", "streaming_params"} <= set(os.listdir(tmp_path))
    latest = later.latest()
    assert latest["step"] == 2 and latest["checkpoint"] == f"params::{tmp_path}/streaming_params"
    assert latest["dataset_state"] == {"loc": 2}
    # the same folder without file lists (as the original LWM leaves it): the stale train state is skipped
    import pickle as pkl

    meta = load_pickle(str(tmp_path / "metadata.pkl"))
    del meta["files"]
    (tmp_path / "metadata.pkl").write_bytes(pkl.dumps(meta))
    assert later.latest()["checkpoint"] == f"params::{tmp_path}/streaming_params"
    # a listed file that is gone is named, not silently replaced by another
    meta["files"] = ["streaming_params", "streaming_train_state_7", "metadata.pkl"]
    (tmp_path / "metadata.pkl").write_bytes(pkl.dumps(meta))
    with pytest.raises(ValueError, match="lists streaming_train_state_7, which is missing"):
        later.latest()


def test_milestone_only_runs_resume_from_their_newest_milestone(tmp_path):
    """save_model_freq=0: the milestones are the only saves, so they keep the exact train state
    (resumable=True) and autoresume starts from the newest one, with its own data position."""
    params = jax.tree.map(jnp.asarray, small_params())
    opt_state = optax.adam(1e-3).init(params)
    ckpt = StreamingCheckpointer(None, str(tmp_path))
    for step in (3, 6):
        ckpt.save_all(step, params, opt_state, dataset_state={"loc": step}, milestone=True, resumable=True)
    latest = ckpt.latest()
    assert latest["step"] == 6 and latest["suffix"] == "_6" and latest["dataset_state"] == {"loc": 6}
    assert latest["checkpoint"] == f"trainstate::{tmp_path}/streaming_train_state_6"
    assert int(load_streaming(latest["checkpoint"].split("::")[1])["step"]) == 6


def test_a_commit_with_a_staged_file_missing_is_refused(folder):
    """Process 0 lists another process's staged file that it cannot see (a folder on each host's
    own disk): nothing is committed, the previous save stays, and the message says why."""
    ckpt, params, opt_state = saved_folder(folder)
    storage.write_bytes(storage.join(folder, "metadata.pkl.saving-2"), b"x")
    names = [("metadata.pkl.saving-2", "metadata.pkl"), ("dataset.process1.pkl.saving-2", "dataset.process1.pkl")]
    with pytest.raises(CheckpointWriteError, match=r"staged file\(s\) dataset.process1.pkl.saving-2 are missing .*"
                                                   r"one shared run folder"):
        ckpt._commit(2, names)
    assert COMMIT_RECORD not in storage.listdir(folder) and folder_step(ckpt) == 1


def test_a_copy_that_lost_the_run_lock_does_not_commit(tmp_path):
    """A second copy of the run took the lock over: the first one's next save stops before its
    commit point, naming the new holder, and the folder keeps the last committed save."""
    class TakenOver:
        def verify(self):
            raise CheckpointWriteError("the run lock was taken over by another copy of this run (host h, pid 1)")

    ckpt, params, opt_state = saved_folder(tmp_path)
    ckpt.lock = TakenOver()
    with pytest.raises(CheckpointWriteError, match="taken over"):
        ckpt.save_all(2, params, opt_state, dataset_state={"loc": 2})
    ckpt.lock = None
    ckpt.recover()
    assert folder_step(ckpt) == 1


def test_resume_prefers_the_newest_exact_save_to_a_newer_params_only_milestone(tmp_path):
    params = jax.tree.map(jnp.asarray, small_params())
    opt_state = optax.adam(1e-3).init(params)
    ckpt = StreamingCheckpointer(None, str(tmp_path))
    ckpt.save_all(4, params, opt_state, dataset_state={"loc": 4})
    ckpt.save_all(6, params, opt_state, dataset_state={"loc": 6}, milestone=True)  # bf16 params only
    latest = ckpt.latest()
    assert latest["step"] == 4 and latest["checkpoint"] == f"trainstate::{tmp_path}/streaming_train_state"


def test_every_wrong_prefix_gets_one_short_line_naming_the_right_one(tmp_path):
    """Each file kind (params, train state, flax msgpack tree, not a checkpoint) read with each
    prefix that does not fit it: one short line naming the prefix that does, never a list of
    every missing key (the first report was a 1,787-character line of 39 opt_state keys)."""
    params = jax.tree.map(jnp.asarray, small_params())
    target = train_state_dict(jnp.asarray(0, jnp.int32), params, optax.adam(1e-3).init(params))
    files = {"params": str(tmp_path / "streaming_params"), "trainstate": str(tmp_path / "streaming_train_state"),
             "flax": str(tmp_path / "params.msgpack"), "pickle": str(tmp_path / "metadata.pkl")}
    save_streaming(files["params"], params)
    save_streaming(files["trainstate"], target)
    (tmp_path / "params.msgpack").write_bytes(msgpack_serialize(jax.tree.map(np.asarray, {"params": params})))
    (tmp_path / "metadata.pkl").write_bytes(pickle.dumps({"step": 3}))
    kwargs = dict(params_target=params, trainstate_target=target)
    expected = {
        ("params", "trainstate"): "is a params file (no step or optimizer state): load it with params::",
        ("params", "trainstate_params"): "holds no train state parameters (no params/params/...): if it is a params "
                                         "file, load it with params::",
        ("params", "flax_params"): "is a streaming checkpoint, not a flax msgpack tree: load it with params::",
        ("trainstate", "params"): "does not match the model: this file is a train state (keys "
                                  "opt_state/params/step): use trainstate_params::",
        ("trainstate", "flax_params"): "is a streaming checkpoint, not a flax msgpack tree: load it with "
                                       "trainstate_params::",
        ("flax", "params"): "is a flax msgpack file (one tree, not streaming records): load it with flax_params::",
        ("flax", "trainstate"): "is a flax msgpack file (one tree, not streaming records): load it with flax_params::",
        ("flax", "trainstate_params"): "is a flax msgpack file (one tree, not streaming records): load it with "
                                       "flax_params::",
        ("pickle", "params"): "is not an LWM streaming checkpoint (it does not start with a (key path, tensor) record)",
    }
    for (kind, prefix), text in expected.items():
        path = files[kind]
        with pytest.raises(ValueError) as error:
            load_checkpoint(f"{prefix}::{path}", **kwargs)
        message = str(error.value)
        assert text in message and "\n" not in message and len(message.replace(path, "P")) < 200, (kind, prefix, message)
        if "load it with" in text or "use " in text:
            assert message.endswith(path), message  # the prefix and the path, ready to paste
    # and each file read with its own prefix loads
    assert load_checkpoint(f"params::{files['params']}", **kwargs)[1] is not None
    assert load_checkpoint(f"trainstate::{files['trainstate']}", **kwargs)[0] is not None
    assert load_checkpoint(f"flax_params::{files['flax']}", **kwargs)[1] is not None
