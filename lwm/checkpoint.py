"""LWM's streaming checkpoints: read and write, one tensor at a time, atomically, on a local
disk or in a bucket (every file goes through lwm.storage).

File format (LWM's, kept byte-compatible with the original release; docs/compatibility.md): a plain
sequence of msgpack objects, each a pair `(key_path, value)`, where key_path is the list of
string keys of one leaf of the flattened state dict and value is
`flax.serialization.to_bytes(array)`. Loading one tensor at a time, and placing each onto
its sharding as it is read, lets a host that cannot hold two copies of a model load it.
One extension: msgpack caps one object at 4 GiB, so a tensor larger than that (a 7B model's
stacked float32 MLP kernel is 5.8 GB) is written as consecutive records of its flattened
pieces, each key path ending in `__lwm_part__:<i>:<n>:<shape>`; a file whose tensors all fit
is exactly the original's format.

    params::PATH             the params tree, no outer {'params': ...}
    trainstate::PATH         a whole train state: {'step', 'params': {'params': ...}, 'opt_state'}
    trainstate_params::PATH  only the params of a train-state file
    flax_params::PATH        one flax msgpack blob of the params tree (non-streaming)

A training run's folder holds `streaming_params` and/or `streaming_train_state`,
`metadata.pkl` and `dataset.pkl`, plus `_<step>` copies for milestones; a save's files are
committed together (`StreamingCheckpointer`; docs/checkpoints.md), so a killed save never
damages the previous checkpoint.
"""
from __future__ import annotations

import logging
import pickle
import re
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

from lwm import storage
from lwm.mesh import gather_array
from lwm.storage import AtomicWriter  # noqa: F401  (re-exported: writers of other files use it from here)

log = logging.getLogger("lwm.checkpoint")
LOAD_TYPES = ("params", "trainstate", "trainstate_params", "flax_params")
FLOAT_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32, "fp64": jnp.float64,
                "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
_READ_SIZE = 80 * 2**20
MSGPACK_LIMIT = 2**32 - 1  # the largest bin/ext object msgpack writes (its 32-bit length field)
MAX_RECORD_BYTES = MSGPACK_LIMIT  # a tensor whose bytes exceed this is split (lowered in tests)
RECORD_OVERHEAD = 1024  # room for to_bytes' own headers (and flax's 1 GiB chunk headers) in a record
PART_KEY = "__lwm_part__"


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


def save_pickle(obj, path: str) -> None:
    storage.write_bytes(path, pickle.dumps(obj))


def load_pickle(path: str):
    return pickle.loads(storage.read_bytes(path))


# ---- the streaming format ------------------------------------------------------------------


def state_dict(tree) -> dict:
    """A nested dict of arrays (flax's state-dict form of TrainStates, optax states, ...)."""
    return flax.serialization.to_state_dict(tree)


def split_plan(shape, dtype, limit: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop)] element ranges of a tensor's flattened pieces, one record each; a single
    range when the tensor fits in one record (the original format). Computed from the shape
    alone, so the plan of a 7B tensor is checked without allocating it."""
    limit = MAX_RECORD_BYTES if limit is None else limit
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape, dtype=np.int64))
    if count * itemsize + RECORD_OVERHEAD <= limit:
        return [(0, count)]
    per_piece = max(1, (limit - RECORD_OVERHEAD) // itemsize)
    return [(start, min(start + per_piece, count)) for start in range(0, count, per_piece)]


def _records(key: tuple[str, ...], value: np.ndarray) -> Iterator[tuple[list[str], bytes]]:
    """The (key_path, bytes) records of one tensor: one, or its pieces when it is too large."""
    plan = split_plan(value.shape, value.dtype)
    if len(plan) == 1:
        yield list(key), to_bytes(value)
        return
    flat, shape = value.reshape(-1), "x".join(str(d) for d in value.shape)
    for i, (start, stop) in enumerate(plan):
        yield [*key, f"{PART_KEY}:{i}:{len(plan)}:{shape}"], to_bytes(np.ascontiguousarray(flat[start:stop]))


def save_streaming(path: str, tree, float_dtype=None, gather_fns: Mapping | None = None) -> None:
    """Write `tree` in the streaming format, one leaf at a time, atomically.

    gather_fns: optional {key_path tuple: fn} turning a (sharded) leaf into a host array
    (default: `gather_array`, which all-gathers arrays spread over several processes).
    Only process 0 writes; every process takes part in gathering. path=None: gather only (a
    process whose save already failed still keeps the others' collectives company).
    """
    flat = flatten_dict(state_dict(tree), keep_empty_nodes=False)
    writer = AtomicWriter(path) if jax.process_index() == 0 and path is not None else None
    packer = msgpack.Packer()
    fout = writer.__enter__() if writer else None
    failure = None  # a write error: the other processes still gather the rest, so keep gathering
    try:
        for key, value in flat.items():
            value = gather_fns[key](value) if gather_fns is not None else gather_array(value)
            value = cast_floats(np.asarray(value), float_dtype)
            if fout is None:
                continue
            try:
                for record_key, blob in _records(key, value):
                    if len(blob) > MAX_RECORD_BYTES:  # cannot happen with RECORD_OVERHEAD: say so if it does
                        raise ValueError(f"checkpoint {path}: tensor {'/'.join(key)} makes a record of "
                                         f"{len(blob)} bytes, over msgpack's limit of {MAX_RECORD_BYTES}")
                    with storage.translate_errors(path):
                        fout.write(packer.pack((record_key, blob)))
            except OSError as e:
                failure, fout = e, None
                writer.__exit__(type(e), e, None)
    except BaseException as e:
        if fout is not None:
            writer.__exit__(type(e), e, None)
        raise
    if failure is not None:
        raise failure
    if writer:
        writer.__exit__(None, None, None)


class _Parts:
    """Reassembles a split tensor from its consecutive records into one preallocated array."""

    def __init__(self, path: str, key: tuple[str, ...], count: int, shape: tuple[int, ...]):
        self.path, self.key, self.count, self.shape = path, key, count, shape
        self.out, self.filled, self.next = None, 0, 0

    def add(self, index: int, piece: np.ndarray) -> np.ndarray | None:
        if index != self.next:
            raise ValueError(f"checkpoint {self.path}: tensor {'/'.join(self.key)}: piece {index} follows piece "
                             f"{self.next - 1} (the file is corrupt)")
        if self.out is None:
            self.out = np.empty(int(np.prod(self.shape, dtype=np.int64)), piece.dtype)
        self.out[self.filled:self.filled + piece.size] = piece.reshape(-1)
        self.filled, self.next = self.filled + piece.size, self.next + 1
        if self.next < self.count:
            return None
        if self.filled != self.out.size:
            raise ValueError(f"checkpoint {self.path}: tensor {'/'.join(self.key)}: its pieces hold {self.filled} "
                             f"values, its shape {self.shape} needs {self.out.size}")
        return self.out.reshape(self.shape)


def iter_streaming(path: str) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (key_path, array) pairs; a truncated or corrupt file raises naming the offset."""
    size = storage.size(path)
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty")
    parts = None
    with storage.open_file(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=_READ_SIZE, max_buffer_size=0)
        while True:
            offset = unpacker.tell()
            try:
                with storage.translate_errors(path):
                    item = unpacker.unpack()
            except msgpack.OutOfData:
                break
            except OSError:
                raise
            except Exception as e:
                raise ValueError(f"checkpoint {path} is corrupt at byte {offset} of {size}: {e}") from None
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))):
                if offset == 0 and isinstance(item, dict) and item and unpacker.tell() == size:
                    raise ValueError(f"checkpoint {path} is a flax msgpack file (one tree, not streaming records): "
                                     f"load it with flax_params::{path}")
                if offset == 0:
                    raise ValueError(f"{path} is not an LWM streaming checkpoint (it does not start with a (key "
                                     "path, tensor) record); pass a streaming_params or streaming_train_state file")
                raise ValueError(f"checkpoint {path} is corrupt at byte {offset}: expected a (key_path, "
                                 f"tensor bytes) pair, got {type(item).__name__}")
            key, value = tuple(str(k) for k in item[0]), item[1]
            try:
                tensor = from_bytes(None, value)
            except Exception as e:
                raise ValueError(f"checkpoint {path}: tensor {'/'.join(key)} at byte {offset} is corrupt: {e}") from None
            if key and key[-1].startswith(PART_KEY + ":"):
                _, index, count, shape = key[-1].split(":")
                key = key[:-1]
                if parts is None or parts.key != key:
                    if parts is not None:
                        raise ValueError(f"checkpoint {path}: tensor {'/'.join(parts.key)} ends after piece "
                                         f"{parts.next - 1} of {parts.count} (the file is corrupt)")
                    parts = _Parts(path, key, int(count), tuple(int(d) for d in shape.split("x") if d))
                tensor = parts.add(int(index), tensor)
                if tensor is None:
                    continue
                parts = None
            elif parts is not None:
                raise ValueError(f"checkpoint {path}: tensor {'/'.join(parts.key)} ends after piece "
                                 f"{parts.next - 1} of {parts.count} (the file is corrupt)")
            yield key, tensor
        end = unpacker.tell()
    if parts is not None or end != size:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: the last complete tensor ends at byte "
                         f"{end} but the file has {size} bytes")


def load_streaming(path: str, target=None, shard_fns: Mapping | None = None,
                   remove_prefix: tuple[str, ...] | None = None, float_dtype=None, optional=()) -> dict:
    """Read a streaming file into a nested dict, checking it against `target`.

    target: a tree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape) the file must
        match; missing keys, unexpected keys and shape mismatches are reported by name.
    shard_fns: {key_path tuple: fn(host array) -> placed array}, applied as each tensor is read.
    remove_prefix: keep only keys under this prefix, with the prefix removed.
    optional: key paths of `target` the file may lack (the result then lacks them too).
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
    if not flat and remove_prefix == ("params", "params"):
        raise ValueError(f"checkpoint {path} holds no train state parameters (no params/params/...): if it is a "
                         f"params file, load it with params::{path}")
    if expected is not None:
        _report(path, {k: v for k, v in expected.items() if k not in set(optional) or k in flat}, flat, mismatched)
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
        # ... and a params file read as trainstate:: lacks step and optimizer state altogether.
        expected_tops = {k[0] for k in expected}
        if expected_tops <= {"step", "params", "opt_state"} and "step" in expected_tops and \
                not any(k[0] in expected_tops for k in found):
            raise ValueError(f"checkpoint {path} is a params file (no step or optimizer state): load it with "
                             f"params::{path}")
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
    try:
        tree = msgpack_restore(storage.read_bytes(path))
    except msgpack.ExtraData:  # several top-level objects: the streaming format's records
        first = next(iter_streaming(path))[0]
        kind = "trainstate_params" if first[0] in ("step", "params", "opt_state") else "params"
        raise ValueError(f"checkpoint {path} is a streaming checkpoint, not a flax msgpack tree: load it with "
                         f"{kind}::{path}") from None
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
                    float_dtype=None, allow_trainstate: bool = True, optional_params=()):
    """Load a `TYPE::PATH` checkpoint; returns (train_state_dict or None, params or None).

    params_shard_fns / trainstate_shard_fns are flat {key_path: fn} dicts (see `flat_fns`).
    optional_params: params key paths a params-only file may lack (absent from the result).
    """
    if "::" not in spec:
        raise ValueError(f"checkpoint {spec!r}: expected TYPE::PATH with TYPE one of {LOAD_TYPES}")
    kind, path = spec.split("::", 1)
    if kind not in LOAD_TYPES:
        raise ValueError(f"checkpoint {spec!r}: unknown type {kind!r}; expected one of {LOAD_TYPES}")
    if not storage.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if kind == "trainstate":
        if not allow_trainstate:
            raise ValueError(f"{spec!r}: a full train state cannot be loaded here; use trainstate_params::{path}")
        state = load_streaming(path, trainstate_target, trainstate_shard_fns, float_dtype=float_dtype)
        return state, None
    if kind == "trainstate_params":
        return None, load_streaming(path, params_target, params_shard_fns, remove_prefix=("params", "params"),
                                    float_dtype=float_dtype, optional=optional_params)
    if kind == "params":
        return None, load_streaming(path, params_target, params_shard_fns, float_dtype=float_dtype,
                                    optional=optional_params)
    return None, load_flax_params(path, params_target, params_shard_fns, float_dtype=float_dtype)


def saved_step(path: str) -> int | None:
    """The `step` of a streaming train state, read without loading the rest (training writes
    it first; a file without one reads to the end and gives None)."""
    for key, value in iter_streaming(path):
        if key == ("step",):
            return int(value)
    return None


def checkpoint_origin(path: str) -> tuple[int | None, str | None]:
    """(step, run folder name) of a run's save, from the metadata written beside it
    (`streaming_params` -> metadata.pkl, `streaming_params_500` -> metadata_500.pkl); (None, None)
    for a file that is no run's save."""
    folder, name = storage.dirname(path), storage.basename(path)
    suffix = name.rsplit("_", 1)[1] if name.rsplit("_", 1)[-1].isdigit() else ""
    meta = storage.join(folder, f"metadata_{suffix}.pkl" if suffix else "metadata.pkl")
    try:
        step = load_pickle(meta).get("step") if storage.exists(meta) else None
    except (OSError, EOFError, ValueError, pickle.UnpicklingError):
        step = None
    return (None, None) if step is None else (int(step), storage.basename(folder))


def checkpoint_identity(spec: str) -> dict:
    """What an eval records about the checkpoint it scored: the --load_checkpoint value, the
    file's content hash, and its step and run when it is a run's save. Two evals with equal
    hashes scored the same weights, whatever path or bucket the file was read from."""
    path = spec.split("::", 1)[1] if "::" in spec else spec
    step, run = checkpoint_origin(path)
    return dict(load_checkpoint=spec, sha256=storage.content_sha256(path), step=step, run=run)


def flat_fns(fns) -> dict:
    """A tree of per-leaf functions as a flat {key_path: fn} dict."""
    return flatten_dict(state_dict(fns), keep_empty_nodes=False)


def train_state_dict(step, params, opt_state) -> dict:
    """The original's TrainState layout: params under an extra 'params' key."""
    return {"step": step, "params": {"params": params}, "opt_state": state_dict(opt_state)}




# ---- the run folder ------------------------------------------------------------------------

COMMIT_RECORD = "checkpoint.commit"  # present only between a save's commit point and its last rename
STAGED = ".saving-"  # a staged file is `<final name>.saving-<step>[.<writer token>]`
_METADATA = re.compile(r"metadata(?:_(\d+))?\.pkl")


class CheckpointWriteError(OSError):
    """A save could not be written or committed (disk full, quota, I/O error, a staged file that
    another host cannot see, a run lock taken over); the previous save is intact."""


class StreamingCheckpointer:
    """Writes a run's checkpoints into `checkpoint_dir` (a folder or a bucket URL) in the
    original layout, a save at a time.

    A save commits as a whole or not at all, on a local disk and in a bucket (docs/checkpoints.md):
      1. every process writes its files under staged names (`streaming_train_state.saving-<step>`,
         ...), each one atomically (a local temp file renamed into place; a bucket object, which
         appears only when its upload completes); the save's metadata lists its files;
      2. the processes agree that every one of them succeeded (one failure stops them all);
      3. process 0 checks that every staged file is there (all hosts see the same folder) and that
         it still holds the run's lock, then writes `checkpoint.commit` (the staged -> final names),
         one small whole-object write: the commit point;
      4. the staged files are moved over the old ones (a rename; in a bucket a server-side copy and
         a delete) and the record removed.
    A run killed before the commit point leaves the previous save as it was (`recover` deletes the
    staged files at the next start); one killed after it is rolled forward by `recover`, which
    redoes step 4 (each move is idempotent). What a complete save leaves is the original's
    layout and formats.

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
        config.take_over_lock = False  # start even if the run folder's lock looks held by a live copy of the run
        config.lock_ttl_seconds = 120  # a bucket lease not renewed for this long belongs to a dead run
        if updates is not None:
            config.update(ConfigDict(updates).copy_and_resolve_references())
        return config

    def __init__(self, config, checkpoint_dir: str, enable: bool = True, lock=None, token: str = ""):
        """lock: the run folder's `lwm.run_folder.RunLock`, held by process 0 and checked before
        every commit; token: a name part every process agrees on, so two copies of one run never
        write the same staged file."""
        self.config = self.get_default_config(config)
        self.checkpoint_dir = str(checkpoint_dir)
        self.enable = enable
        self.lock = lock
        self.token = token
        float_dtype_by_name(self.config.float_dtype)

    def _path(self, name: str) -> str:
        return storage.join(self.checkpoint_dir, name)

    def _staged(self, final: str, step: int) -> str:
        return f"{final}{STAGED}{step}" + (f".{self.token}" if self.token else "")

    def files_of_save(self, milestone: bool, resumable: bool = False) -> list[str]:
        """The parameter/state files one save writes (before dataset and metadata files).
        resumable: a milestone that autoresume starts from (in a run that makes no other saves)
        also keeps the exact train state."""
        suffix = "_{step}" if milestone else ""
        if self.config.save_optimizer_state:
            return ["streaming_train_state" + suffix]
        if self.config.exact_resume and (resumable or not milestone):
            return ["streaming_train_state" + suffix, "streaming_params" + suffix]
        return ["streaming_params" + suffix]

    def save_all(self, step: int, params, opt_state, gather_fns=None, metadata=None,
                 dataset_state=None, milestone: bool = False, resumable: bool = False) -> str:
        """Save the train state and/or params, this process's dataset state and the metadata
        as one commit (see the class docstring). Every process calls it.

        dataset_state: this process's loader state; process 0's becomes `dataset.pkl`, and with
        several processes each one's also `dataset.process<i>.pkl`.
        gather_fns: a tree like the train state dict (see `train_state_dict`) of per-leaf gathers.
        Raises CheckpointWriteError naming the file and the cause when a write fails, on every
        process when any process's write fails.
        """
        suffix = f"_{step}" if milestone else ""
        tensors = [name.format(step=step) for name in self.files_of_save(milestone, resumable)]
        if not self.enable:
            return self._path(tensors[0])
        count, index = jax.process_count(), jax.process_index()
        main = index == 0
        datasets = [] if dataset_state is None else [f"dataset{suffix}.pkl"] + (
            [f"dataset.process{i}{suffix}.pkl" for i in range(count)] if count > 1 else [])
        files = tensors + datasets + [f"metadata{suffix}.pkl"]
        log.info("checkpoint step %d: saving", step)
        start, staged, error = time.time(), [], None
        storage.makedirs(self.checkpoint_dir)

        def stage(name, write):
            final = self._path(name)
            staged.append((self._staged(final, step), final))
            write(staged[-1][0])

        failure = None
        for name in tensors:  # every process gathers every tensor (collective), even after a failure
            if name.startswith("streaming_train_state"):  # exact: no cast
                tree, fns, dtype = train_state_dict(step, params, opt_state), gather_fns, None
            else:
                tree, dtype = params, float_dtype_by_name(self.config.float_dtype)
                fns = None if gather_fns is None else gather_fns["params"]["params"]
            fns = None if fns is None else flat_fns(fns)
            if failure is not None:
                save_streaming(None, tree, dtype, fns)
                continue
            try:
                stage(name, lambda path: save_streaming(path, tree, dtype, fns))
            except OSError as e:
                failure = e
        try:
            if failure is not None:
                raise failure
            if dataset_state is not None and count > 1:
                stage(f"dataset.process{index}{suffix}.pkl", lambda path: save_pickle(dataset_state, path))
            if main:
                if dataset_state is not None:
                    stage(f"dataset{suffix}.pkl", lambda path: save_pickle(dataset_state, path))
                stage(f"metadata{suffix}.pkl",
                      lambda path: save_pickle(dict(metadata or {}, step=int(step), files=files), path))
        except OSError as e:
            for tmp, _ in staged:
                storage.remove(tmp)
            error = CheckpointWriteError(e.errno, f"checkpoint step {step} not saved: writing "
                                         f"{e.filename or staged[-1][0]} failed: {e.strerror or e}; the previous "
                                         "checkpoint is intact (free space, then restart with --autoresume=True)")
        failed = failed_processes(error is not None)
        if error is not None:
            raise error
        if failed:
            for tmp, _ in staged:
                storage.remove(tmp)
            raise CheckpointWriteError(f"checkpoint step {step} not saved: process {', '.join(map(str, failed))} "
                                       "could not write its part (its log says why); the previous checkpoint is "
                                       "intact; every process stops")
        log.info("checkpoint step %d: staged", step)
        if main:
            names = [(storage.basename(t), storage.basename(f)) for t, f in staged]
            if count > 1 and dataset_state is not None:
                names += [(storage.basename(self._staged(f"dataset.process{i}{suffix}.pkl", step)),
                           f"dataset.process{i}{suffix}.pkl") for i in range(1, count)]
            try:
                self._commit(step, names)
            except OSError as e:
                error = e if isinstance(e, CheckpointWriteError) else CheckpointWriteError(
                    e.errno, f"checkpoint step {step}: committing failed: {e.strerror or e}; restart with "
                             "--autoresume=True (the save is finished or discarded at the start)")
        failed = failed_processes(error is not None)
        if error is not None:
            raise error
        if failed:
            raise CheckpointWriteError(f"checkpoint step {step}: process 0 could not commit it (its log says why); "
                                       "every process stops")
        log.info("checkpoint step %d: saved in %.2f s", step, time.time() - start)
        return self._path(tensors[0])

    def _commit(self, step: int, names) -> None:
        """The commit point (process 0): refuse a save with a staged file missing, or a run whose
        lock another copy has taken over; otherwise write the record, then move the files."""
        missing = [tmp for tmp, _ in names if not storage.exists(self._path(tmp))]
        if missing:
            for tmp, _ in names:
                storage.remove(self._path(tmp))
            raise CheckpointWriteError(f"checkpoint step {step} not saved: staged file(s) {', '.join(missing)} are "
                                       f"missing from {storage.display(self.checkpoint_dir)}: every process must write "
                                       "to one shared run folder (a shared file system or a bucket URL for "
                                       "--logger.output_dir); the previous checkpoint is intact")
        if self.lock is not None:
            self.lock.verify()  # raises CheckpointWriteError when another copy of the run took over
        try:
            save_pickle({"step": int(step), "files": names}, self._path(COMMIT_RECORD))
        except OSError as e:
            for tmp, _ in names:
                storage.remove(self._path(tmp))
            raise CheckpointWriteError(e.errno, f"checkpoint step {step} not saved: writing the commit record "
                                       f"{self._path(COMMIT_RECORD)} failed: {e.strerror or e}; the previous "
                                       "checkpoint is intact") from None
        log.info("checkpoint step %d: committed", step)
        self._apply_commit(names)

    def _apply_commit(self, names) -> None:
        for tmp, final in names:
            if storage.exists(self._path(tmp)):  # gone: moved before a kill, nothing left to do
                storage.rename(self._path(tmp), self._path(final))
        storage.sync_folder(self.checkpoint_dir)
        storage.remove(self._path(COMMIT_RECORD))
        storage.sync_folder(self.checkpoint_dir)

    def recover(self) -> str | None:
        """Bring the folder to its last committed save: finish a save killed after its commit
        point, and delete the files of saves killed before theirs. Process 0 only, holding the
        run's lock (so no live writer's files are deleted); returns what it did, for the log, or
        None when there was nothing to do."""
        if jax.process_index() != 0 or not storage.isdir(self.checkpoint_dir):
            return None
        done = []
        record = self._path(COMMIT_RECORD)
        if storage.exists(record):
            try:
                commit = load_pickle(record)
            except (EOFError, pickle.UnpicklingError):  # a torn record cannot exist (atomic write)
                raise ValueError(f"{record} is unreadable; remove it to resume from the files beside it") from None
            self._apply_commit(commit["files"])
            done.append(f"finished the interrupted save of step {commit['step']}")
        stale = [n for n in storage.listdir(self.checkpoint_dir) if STAGED in n or ".tmp." in n]
        for name in stale:
            storage.remove(self._path(name))
        if stale:
            done.append(f"removed {len(stale)} file(s) of a save that did not commit ({', '.join(sorted(stale))})")
        return "; ".join(done) or None

    def latest(self) -> dict | None:
        """What autoresume needs from this folder (after `recover`), or None when nothing was
        saved yet: the newest committed save, regular or milestone, that holds an exact train
        state (else the newest save), read from the file list its metadata recorded (older
        folders: the files its name implies). The exact train state is preferred to exported params.

        Returns {"step", "metadata", "suffix" ('' or '_<step>'), "checkpoint" ('TYPE::PATH', absent
        when the save holds no tensors), "dataset_state" (None when not saved)}."""
        names = set(storage.listdir(self.checkpoint_dir))
        saves = []
        for name in names:
            match = _METADATA.fullmatch(name)
            if match:
                metadata = load_pickle(self._path(name))
                step = int(metadata.get("step", match.group(1) or -1))
                saves.append((step, match.group(1) is None, metadata))
        if not saves:
            return None
        # The newest save that continues the run exactly (a train state), else the newest save:
        # a params-only milestone newer than the last exact save would lose the optimizer state.
        exact = [s for s in saves if any(f.startswith("streaming_train_state") for f in s[2].get("files", ()))
                 or (s[2].get("files") is None and f"streaming_train_state{'' if s[1] else f'_{s[0]}'}" in names)]
        step, regular, metadata = max(exact or saves, key=lambda s: (s[0], s[1]))
        suffix = "" if regular else f"_{step}"
        out = {"metadata": metadata, "step": step, "suffix": suffix}
        listed = metadata.get("files")
        if listed is not None:
            missing = [f for f in listed if f not in names]
            if missing:
                raise ValueError(f"{storage.display(self.checkpoint_dir)}: the save of step {step} lists "
                                 f"{', '.join(missing)}, which is missing; resume from a milestone with "
                                 "--load_checkpoint instead, or restore the file")
            tensors = [f for f in listed if f.startswith("streaming_")]
        else:  # written by the original LWM (or an older version of this code)
            tensors = [f for f in (f"streaming_train_state{suffix}", f"streaming_params{suffix}") if f in names]
            if len(tensors) == 2 and saved_step(self._path(tensors[0])) != step:
                log.warning("%s: streaming_train_state is not of step %d (a leftover of other checkpointer flags); "
                            "resuming from streaming_params", self.checkpoint_dir, step)
                tensors = tensors[1:]
        exact = [f for f in tensors if f.startswith("streaming_train_state")]
        if exact or tensors:
            name = (exact or tensors)[0]
            out["checkpoint"] = ("trainstate::" if exact else "params::") + self._path(name)
        dataset = f"dataset{suffix}.pkl"
        out["dataset_state"] = load_pickle(self._path(dataset)) if dataset in names else None
        return out


def failed_processes(failed: bool) -> list[int]:
    """The indices of the processes that report a failure; every process calls it (a barrier), so
    all of them learn at once that one failed, instead of waiting for it in a later collective."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([int(failed)], np.int32))).reshape(-1)
    return [i for i, flag in enumerate(flags) if flag]
