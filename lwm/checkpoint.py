"""LWM's streaming checkpoints: read and write, one tensor at a time, atomically.

File format (LWM's, kept byte-compatible with the original release; docs/compatibility.md): a plain
sequence of msgpack objects, each a pair `(key_path, value)`, where key_path is the list of
string keys of one leaf of the flattened state dict and value is
`flax.serialization.to_bytes(array)`. Loading one tensor at a time, and placing each onto
its sharding as it is read, lets a host that cannot hold two copies of a model load it.

    params::PATH             the params tree, no outer {'params': ...}
    trainstate::PATH         a whole train state: {'step', 'params': {'params': ...}, 'opt_state'}
    trainstate_params::PATH  only the params of a train-state file
    flax_params::PATH        one flax msgpack blob of the params tree (non-streaming)

A training run's folder holds `streaming_params` and/or `streaming_train_state`,
`metadata.pkl` and `dataset.pkl`, plus `_<step>` copies for milestones. Every file is
written to a temporary name, flushed, fsynced and renamed, and a save's files are committed
together (`StreamingCheckpointer`), so a killed save never damages the previous checkpoint.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
from typing import Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax.serialization import from_bytes, msgpack_restore, to_bytes
from flax.traverse_util import empty_node, flatten_dict, unflatten_dict
from ml_collections import ConfigDict

from lwm.mesh import gather_array

log = logging.getLogger("lwm.checkpoint")
LOAD_TYPES = ("params", "trainstate", "trainstate_params", "flax_params")
FLOAT_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32, "fp64": jnp.float64,
                "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
_READ_SIZE = 80 * 2**20


def float_dtype_by_name(name: str | None):
    if name in (None, ""):
        return None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"unknown float dtype {name!r}; expected one of {sorted(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def cast_floats(x, dtype):
    """Cast a floating array to dtype (integers, e.g. step counters, are left alone)."""
    if dtype is None:
        return x
    if jnp.issubdtype(getattr(x, "dtype", np.asarray(x).dtype), jnp.floating):
        return np.asarray(x).astype(dtype) if isinstance(x, np.ndarray) else jnp.asarray(x).astype(dtype)
    return x


# ---- atomic files ------------------------------------------------------------------------


class AtomicWriter:
    """`with AtomicWriter(path) as f:` writes to a temp file renamed into place on success."""

    def __init__(self, path: str, mode: str = "wb"):
        self.path = path
        self.mode = mode
        self.tmp = f"{path}.tmp.{os.getpid()}"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.tmp, self.mode)
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.file.flush()  # a full disk often shows here, not at write()
                os.fsync(self.file.fileno())
                self.file.close()
            except BaseException:
                self._discard()
                raise
            os.replace(self.tmp, self.path)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        else:
            self._discard()
        return False

    def _discard(self) -> None:
        try:
            self.file.close()  # may fail again flushing the buffer to a full disk
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_pickle(obj, path: str) -> None:
    with AtomicWriter(path) as f:
        pickle.dump(obj, f)


def load_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


# ---- the streaming format ------------------------------------------------------------------


def state_dict(tree) -> dict:
    """A nested dict of arrays (flax's state-dict form of TrainStates, optax states, ...)."""
    return flax.serialization.to_state_dict(tree)


def save_streaming(path: str, tree, float_dtype=None, gather_fns: Mapping | None = None) -> None:
    """Write `tree` in the streaming format, one leaf at a time, atomically.

    gather_fns: optional {key_path tuple: fn} turning a (sharded) leaf into a host array
    (default: `gather_array`, which all-gathers arrays spread over several processes).
    Only process 0 writes; every process takes part in gathering.
    """
    flat = flatten_dict(state_dict(tree), keep_empty_nodes=False)
    writer = AtomicWriter(path) if jax.process_index() == 0 else None
    packer = msgpack.Packer()
    fout = writer.__enter__() if writer else None
    try:
        for key, value in flat.items():
            value = gather_fns[key](value) if gather_fns is not None else gather_array(value)
            value = cast_floats(np.asarray(value), float_dtype)
            if fout is not None:
                fout.write(packer.pack((list(key), to_bytes(value))))
    except BaseException as e:
        if writer:
            writer.__exit__(type(e), e, None)
        raise
    if writer:
        writer.__exit__(None, None, None)


def iter_streaming(path: str) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (key_path, array) pairs; a truncated or corrupt file raises naming the offset."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty")
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=_READ_SIZE, max_buffer_size=0)
        while True:
            offset = unpacker.tell()
            try:
                item = unpacker.unpack()
            except msgpack.OutOfData:
                break
            except Exception as e:
                raise ValueError(f"checkpoint {path} is corrupt at byte {offset} of {size}: {e}") from None
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))):
                raise ValueError(f"checkpoint {path} is corrupt at byte {offset}: expected a (key_path, "
                                 f"tensor bytes) pair, got {type(item).__name__}")
            key, value = tuple(str(k) for k in item[0]), item[1]
            try:
                tensor = from_bytes(None, value)
            except Exception as e:
                raise ValueError(f"checkpoint {path}: tensor {'/'.join(key)} at byte {offset} is corrupt: {e}") from None
            yield key, tensor
        end = unpacker.tell()
    if end != size:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: the last complete tensor ends at byte "
                         f"{end} but the file has {size} bytes")


def load_streaming(path: str, target=None, shard_fns: Mapping | None = None,
                   remove_prefix: tuple[str, ...] | None = None, float_dtype=None) -> dict:
    """Read a streaming file into a nested dict, checking it against `target`.

    target: a tree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape) the file must
        match; missing keys, unexpected keys and shape mismatches are reported by name.
    shard_fns: {key_path tuple: fn(host array) -> placed array}, applied as each tensor is read.
    remove_prefix: keep only keys under this prefix, with the prefix removed.
    """
    expected = None if target is None else flatten_dict(state_dict(target), keep_empty_nodes=False)
    flat, mismatched = {}, []
    for key, tensor in iter_streaming(path):
        if remove_prefix:
            if key[:len(remove_prefix)] != tuple(remove_prefix):
                continue
            key = key[len(remove_prefix):]
        if expected is not None:
            if key not in expected:
                flat[key] = None  # reported below as unexpected
                continue
            want = tuple(np.shape(expected[key]))
            if tuple(np.shape(tensor)) != want:
                mismatched.append(f"{'/'.join(key)}: expected shape {want}, found {tuple(np.shape(tensor))}")
                continue
        tensor = cast_floats(tensor, float_dtype)
        flat[key] = shard_fns[key](tensor) if shard_fns is not None and key in shard_fns else tensor
    if expected is not None:
        _report(path, expected, flat, mismatched)
        # Empty subtrees (optax's EmptyState, ...) hold no tensor in the file; restore them.
        for key, value in flatten_dict(state_dict(target), keep_empty_nodes=True).items():
            if value is empty_node:
                flat[key] = value
    if not flat:
        raise ValueError(f"checkpoint {path} holds no tensors" + (f" under {'/'.join(remove_prefix)}" if remove_prefix else ""))
    return unflatten_dict(flat)


def _report(path: str, expected: Mapping, found: Mapping, mismatched: list[str]) -> None:
    missing = sorted("/".join(k) for k in expected if k not in found)
    unexpected = sorted("/".join(k) for k, v in found.items() if k not in expected)
    if missing or unexpected or mismatched:
        # A train state read as params:: matches nothing; say which TYPE reads it.
        tops = {k[0] for k in found if k not in expected}
        if missing and "params" in tops and tops <= {"step", "params", "opt_state"} and \
                not any(k[0] in tops for k in expected):
            raise ValueError(f"checkpoint {path} does not match the model: this file is a train state "
                             f"(keys {'/'.join(sorted(tops))}): use trainstate_params::{path}")
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            parts.append("shape mismatches: " + "; ".join(mismatched[:20]))
        raise ValueError(f"checkpoint {path} does not match the model:\n  " + "\n  ".join(parts))


def load_flax_params(path: str, target=None, shard_fns: Mapping | None = None, float_dtype=None) -> dict:
    """A non-streaming flax msgpack file of the params tree (needs the whole file in memory)."""
    with open(path, "rb") as f:
        tree = msgpack_restore(f.read())
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    flat = flatten_dict(tree, keep_empty_nodes=False)
    if target is not None:
        expected = flatten_dict(state_dict(target), keep_empty_nodes=False)
        mismatched = [f"{'/'.join(k)}: expected shape {tuple(np.shape(expected[k]))}, found {np.shape(v)}"
                      for k, v in flat.items() if k in expected and tuple(np.shape(v)) != tuple(np.shape(expected[k]))]
        _report(path, expected, flat, mismatched)
    out = {}
    for key, tensor in flat.items():
        tensor = cast_floats(np.asarray(tensor), float_dtype)
        out[key] = shard_fns[key](tensor) if shard_fns is not None and key in shard_fns else tensor
    return unflatten_dict(out)


def load_checkpoint(spec: str, params_target=None, params_shard_fns: Mapping | None = None,
                    trainstate_target=None, trainstate_shard_fns: Mapping | None = None,
                    float_dtype=None, allow_trainstate: bool = True):
    """Load a `TYPE::PATH` checkpoint; returns (train_state_dict or None, params or None).

    params_shard_fns / trainstate_shard_fns are flat {key_path: fn} dicts (see `flat_fns`).
    """
    if "::" not in spec:
        raise ValueError(f"checkpoint {spec!r}: expected TYPE::PATH with TYPE one of {LOAD_TYPES}")
    kind, path = spec.split("::", 1)
    if kind not in LOAD_TYPES:
        raise ValueError(f"checkpoint {spec!r}: unknown type {kind!r}; expected one of {LOAD_TYPES}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if kind == "trainstate":
        if not allow_trainstate:
            raise ValueError(f"{spec!r}: a full train state cannot be loaded here; use trainstate_params::{path}")
        state = load_streaming(path, trainstate_target, trainstate_shard_fns, float_dtype=float_dtype)
        return state, None
    if kind == "trainstate_params":
        return None, load_streaming(path, params_target, params_shard_fns, remove_prefix=("params", "params"),
                                    float_dtype=float_dtype)
    if kind == "params":
        return None, load_streaming(path, params_target, params_shard_fns, float_dtype=float_dtype)
    return None, load_flax_params(path, params_target, params_shard_fns, float_dtype=float_dtype)


def saved_step(path: str) -> int | None:
    """The `step` of a streaming train state, read without loading the rest (training writes
    it first; a file without one reads to the end and gives None)."""
    for key, value in iter_streaming(path):
        if key == ("step",):
            return int(value)
    return None


def flat_fns(fns) -> dict:
    """A tree of per-leaf functions as a flat {key_path: fn} dict."""
    return flatten_dict(state_dict(fns), keep_empty_nodes=False)


def train_state_dict(step, params, opt_state) -> dict:
    """The original's TrainState layout: params under an extra 'params' key."""
    return {"step": step, "params": {"params": params}, "opt_state": state_dict(opt_state)}


# ---- the run folder ------------------------------------------------------------------------

COMMIT_RECORD = "checkpoint.commit"  # present only between a save's commit point and its last rename
STAGED = ".saving-"  # a staged file is `<final name>.saving-<step>`


class CheckpointWriteError(OSError):
    """A save could not be written (disk full, quota, I/O error); the previous save is intact."""


class StreamingCheckpointer:
    """Writes a run's checkpoints into `checkpoint_dir` in the original layout, a save at a time.

    A save commits as a whole or not at all. Its files are first written under staged names
    (`streaming_train_state.saving-<step>`, ... each flushed, fsynced and renamed into place);
    then one atomic write of `checkpoint.commit` (the list of staged -> final names) is the
    commit point; then the staged files are renamed over the old ones and the record removed.
    A run killed before the commit point leaves the previous save as it was (the staged files
    are deleted at the next start); one killed after it is rolled forward at the next start
    (`recover`). What a complete save leaves behind is the original's layout and formats.

    The resumable state, `streaming_train_state`, holds the float32 parameters and optimizer
    state exactly (with `exact_resume`, also when `save_optimizer_state=False`, beside the
    exported `streaming_params`); `float_dtype` applies to `streaming_params` and milestone
    parameters only.
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.float_dtype = "bf16"  # exported parameters (streaming_params, milestones) are cast to this
        config.save_optimizer_state = False  # the original's switch: streaming_train_state instead of streaming_params
        config.exact_resume = True  # also keep an exact float32 streaming_train_state for --autoresume
        if updates is not None:
            config.update(ConfigDict(updates).copy_and_resolve_references())
        return config

    def __init__(self, config, checkpoint_dir: str, enable: bool = True):
        self.config = self.get_default_config(config)
        self.checkpoint_dir = checkpoint_dir
        self.enable = enable
        float_dtype_by_name(self.config.float_dtype)

    def _path(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name)

    def files_of_save(self, milestone: bool) -> list[str]:
        """The parameter/state files one save writes (before dataset and metadata files)."""
        suffix = "_{step}" if milestone else ""
        if self.config.save_optimizer_state:
            return ["streaming_train_state" + suffix]
        if self.config.exact_resume and not milestone:
            return ["streaming_train_state", "streaming_params"]
        return ["streaming_params" + suffix]

    def save_all(self, step: int, params, opt_state, gather_fns=None, metadata=None,
                 dataset_state=None, milestone: bool = False) -> str:
        """Save the train state and/or params, this process's dataset state and the metadata
        as one commit (see the class docstring). Every process calls it.

        dataset_state: this process's loader state; process 0's becomes `dataset.pkl`, and with
        several processes each one's also `dataset.process<i>.pkl`.
        gather_fns: a tree like the train state dict (see `train_state_dict`) of per-leaf gathers.
        Raises CheckpointWriteError naming the file and the cause when a write fails.
        """
        suffix = f"_{step}" if milestone else ""
        if not self.enable:
            return self._path(self.files_of_save(milestone)[0].format(step=step))
        log.info("checkpoint step %d: saving", step)
        start, staged, main = time.time(), [], jax.process_index() == 0
        os.makedirs(self.checkpoint_dir, exist_ok=True)

        def stage(name, write):
            final = self._path(name)
            staged.append((f"{final}{STAGED}{step}", final))
            write(staged[-1][0])

        try:
            for name in self.files_of_save(milestone):
                if name.startswith("streaming_train_state"):  # exact: no cast
                    tree, fns, dtype = train_state_dict(step, params, opt_state), gather_fns, None
                else:
                    tree, dtype = params, float_dtype_by_name(self.config.float_dtype)
                    fns = None if gather_fns is None else gather_fns["params"]["params"]
                fns = None if fns is None else flat_fns(fns)
                stage(name.format(step=step), lambda path: save_streaming(path, tree, dtype, fns))
            if dataset_state is not None and jax.process_count() > 1:
                stage(f"dataset.process{jax.process_index()}{suffix}.pkl",
                      lambda path: save_pickle(dataset_state, path))
            if main:
                if dataset_state is not None:
                    stage(f"dataset{suffix}.pkl", lambda path: save_pickle(dataset_state, path))
                stage(f"metadata{suffix}.pkl", lambda path: save_pickle(dict(metadata or {}, step=int(step)), path))
        except OSError as e:
            for tmp, _ in staged:
                _remove(tmp)
            raise CheckpointWriteError(e.errno, f"checkpoint step {step} not saved: writing {e.filename or staged[-1][0]} "
                                       f"failed: {e.strerror or e}; the previous checkpoint is intact (free space, "
                                       "then restart with --autoresume=True)") from None
        log.info("checkpoint step %d: staged", step)
        _sync_processes(f"lwm-checkpoint-staged-{step}{suffix}")
        if main:
            names = [(os.path.basename(t), os.path.basename(f)) for t, f in staged]
            if jax.process_count() > 1 and dataset_state is not None:
                names += [(f"dataset.process{i}{suffix}.pkl{STAGED}{step}", f"dataset.process{i}{suffix}.pkl")
                          for i in range(1, jax.process_count())]
            try:
                save_pickle({"step": int(step), "files": names}, self._path(COMMIT_RECORD))
            except OSError as e:
                for tmp, _ in names:
                    _remove(self._path(tmp))
                raise CheckpointWriteError(e.errno, f"checkpoint step {step} not saved: writing the commit record "
                                           f"{self._path(COMMIT_RECORD)} failed: {e.strerror or e}; the previous "
                                           "checkpoint is intact") from None
            log.info("checkpoint step %d: committed", step)
            self._apply_commit(names)
        _sync_processes(f"lwm-checkpoint-done-{step}{suffix}")
        log.info("checkpoint step %d: saved in %.2f s", step, time.time() - start)
        return self._path(self.files_of_save(milestone)[0].format(step=step))

    def _apply_commit(self, names) -> None:
        for tmp, final in names:
            if os.path.exists(self._path(tmp)):
                os.replace(self._path(tmp), self._path(final))
        _fsync_dir(self.checkpoint_dir)
        os.unlink(self._path(COMMIT_RECORD))
        _fsync_dir(self.checkpoint_dir)

    def recover(self) -> str | None:
        """Bring the folder to its last committed save: finish a save killed after its commit
        point, and delete the files of saves killed before theirs. Process 0 only; returns what
        it did, for the log, or None when there was nothing to do."""
        if jax.process_index() != 0 or not os.path.isdir(self.checkpoint_dir):
            return None
        done = []
        record = self._path(COMMIT_RECORD)
        if os.path.exists(record):
            try:
                commit = load_pickle(record)
            except (OSError, EOFError, pickle.UnpicklingError):  # a torn record cannot exist (atomic write)
                raise ValueError(f"{record} is unreadable; remove it to resume from the files beside it") from None
            self._apply_commit(commit["files"])
            done.append(f"finished the interrupted save of step {commit['step']}")
        stale = [n for n in os.listdir(self.checkpoint_dir) if STAGED in n or ".tmp." in n]
        for name in stale:
            _remove(self._path(name))
        if stale:
            done.append(f"removed {len(stale)} file(s) of a save that did not commit ({', '.join(sorted(stale))})")
        return "; ".join(done) or None

    def latest(self) -> dict | None:
        """What autoresume needs from this folder (after `recover`), or None when nothing was
        saved yet. The exact train state is preferred to exported params."""
        meta_path = self._path("metadata.pkl")
        if not os.path.exists(meta_path):
            return None
        metadata = load_pickle(meta_path)
        out = {"metadata": metadata, "step": metadata.get("step")}
        for name in ("streaming_train_state", "streaming_params"):
            if os.path.exists(self._path(name)):
                out["checkpoint"] = ("trainstate::" if name == "streaming_train_state" else "params::") + self._path(name)
                break
        dataset_path = self._path("dataset.pkl")
        out["dataset_state"] = load_pickle(dataset_path) if os.path.exists(dataset_path) else None
        return out


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
