"""The device mesh (`dp, fsdp, tp, sp`), partition rules, and moving trees onto and off it.

Axes: `dp` data parallel (params replicated), `fsdp` data parallel with params sharded,
`tp` tensor parallel (heads / MLP width), `sp` sequence parallel (RingAttention). Batches
are sharded `PS(('dp','fsdp'), 'sp')`, activations `PS(('dp','fsdp'), 'sp', None)`.

`mesh_dim` strings, as the original scripts pass them:
    "1,-1,2,2"               dp=1, fsdp inferred, tp=2, sp=2
    "!1,1,-1,1"              '!' = plain reshape of jax.devices() (may split physical axes)
    "dp:1,fsdp:-1,tp:2,sp:2" named; unnamed axes default to 1
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

MESH_AXES = ("dp", "fsdp", "tp", "sp")
BATCH_AXES = ("dp", "fsdp")
BATCH_SPEC = PS(BATCH_AXES, "sp")  # [batch, seq] arrays
# [batch, seq, hidden] between layers. The original also split hidden over tp; XLA's SPMD
# partitioner (jax 0.10.2, CPU) computes *wrong values* for x + mlp(x) constrained that way
# on mesh 2,2,2,1 with one row per batch shard (docs/sharding.md has the reproduction), so the
# hidden axis stays replicated over tp, as in Megatron-style tensor parallelism.
ACTIVATION_SPEC = PS(BATCH_AXES, "sp", None)
FSDP_SP = ("fsdp", "sp")

# ---- mesh --------------------------------------------------------------------------------


def cpu_xla_flags(devices: int, collective_timeout_s: int = 300) -> str:
    """XLA_FLAGS for `devices` virtual CPU devices (tests, demos, benchmarks).

    Virtual devices share a few cores, so one of them can reach a collective long after the
    others (a long fused op, or another process on the machine); XLA's CPU runtime aborts the
    process when that takes more than 40 s. Tests raise it to 5 minutes; the long benchmarks,
    whose single ring steps take minutes, to an hour. Other flags already in XLA_FLAGS are kept
    (the caller's own choices, such as the test suite's quicker compiles), so a subprocess given
    these flags compiles as its parent does.
    """
    ours = (f"--xla_force_host_platform_device_count={devices} "
            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={min(600, collective_timeout_s)} "
            f"--xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout_s}")
    names = {flag.split("=")[0] for flag in ours.split()}
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag.split("=")[0] not in names]
    return " ".join([ours, *kept])


def parse_mesh_dim(mesh_dim: str, num_devices: int) -> tuple[tuple[int, ...], bool]:
    """(dims in MESH_AXES order, allow_split_physical_axes) for a mesh_dim string."""
    text = mesh_dim.strip().replace(" ", "")
    split_physical = text.startswith("!")
    text = text.lstrip("!")
    parts = [p for p in text.split(",") if p]
    if not parts:
        raise ValueError(f"mesh_dim {mesh_dim!r} is empty; expected e.g. '1,-1,1,1'")
    if all(":" in p for p in parts):
        named: dict[str, int] = {}
        for p in parts:
            name, value = p.split(":", 1)
            if name not in MESH_AXES:
                raise ValueError(f"mesh_dim {mesh_dim!r}: unknown axis {name!r}; axes are {MESH_AXES}")
            if name in named:
                raise ValueError(f"mesh_dim {mesh_dim!r}: axis {name!r} given twice")
            named[name] = _mesh_int(value, mesh_dim)
        dims = [named.get(a, 1) for a in MESH_AXES]
    elif any(":" in p for p in parts):
        raise ValueError(f"mesh_dim {mesh_dim!r} mixes named and positional axes")
    else:
        if len(parts) != len(MESH_AXES):
            raise ValueError(f"mesh_dim {mesh_dim!r} has {len(parts)} values; expected 4 ({','.join(MESH_AXES)})")
        dims = [_mesh_int(p, mesh_dim) for p in parts]
    if any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"mesh_dim {mesh_dim!r}: sizes must be positive or -1, got {dims}")
    n_inferred = dims.count(-1)
    if n_inferred > 1:
        raise ValueError(f"mesh_dim {mesh_dim!r}: only one axis may be -1, got {n_inferred}")
    known = int(np.prod([d for d in dims if d != -1]))
    if n_inferred:
        if num_devices % known:
            raise ValueError(f"mesh_dim {mesh_dim!r}: {num_devices} devices are not divisible by the "
                             f"product {known} of the given axes")
        dims[dims.index(-1)] = num_devices // known
    if int(np.prod(dims)) != num_devices:
        raise ValueError(f"mesh_dim {mesh_dim!r} gives {dict(zip(MESH_AXES, dims))} = {int(np.prod(dims))} "
                         f"devices, but there are {num_devices}")
    return tuple(dims), split_physical


def _mesh_int(value: str, mesh_dim: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"mesh_dim {mesh_dim!r}: {value!r} is not an integer") from None


def build_mesh(mesh_dim: str = "1,-1,1,1", devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES from a mesh_dim string (see the module docstring)."""
    devices = list(jax.devices() if devices is None else devices)
    dims, split_physical = parse_mesh_dim(mesh_dim, len(devices))
    if split_physical or devices[0].platform == "cpu":
        device_array = np.array(devices).reshape(dims)
    else:
        from jax.experimental import mesh_utils

        try:
            device_array = mesh_utils.create_device_mesh(dims, devices)
        except (AssertionError, NotImplementedError, ValueError) as e:
            raise ValueError(f"mesh_dim {mesh_dim!r} does not fit the physical device topology ({e}); "
                             f"prefix it with '!' to allow splitting physical axes") from None
    return Mesh(device_array, MESH_AXES)


def mesh_shape(mesh: Mesh | None) -> dict[str, int]:
    """{'dp': ., 'fsdp': ., 'tp': ., 'sp': .}; all 1 without a mesh."""
    if mesh is None:
        return {a: 1 for a in MESH_AXES}
    return {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}


# ---- partition rules ---------------------------------------------------------------------

# One table for the layer-unstacked tree. `in_layer`: the parameter lives inside the decoder
# stack, so the scanned tree has one more (layer) axis, unsharded, at param_scan_axis.
PARTITION_RULES: tuple[tuple[str, PS, bool], ...] = (
    ("transformer/wte/embedding", PS("tp", FSDP_SP), False),
    ("transformer/vte/embedding", PS("tp", FSDP_SP), False),
    ("attention/(wq|wk|wv)/kernel", PS(FSDP_SP, "tp"), True),
    ("attention/wo/kernel", PS("tp", FSDP_SP), True),
    ("feed_forward/(w1|w3)/kernel", PS(FSDP_SP, "tp"), True),
    ("feed_forward/w2/kernel", PS("tp", FSDP_SP), True),
    ("(attention_norm|ffn_norm)/kernel", PS(None), True),
    ("transformer/ln_f/kernel", PS(None), False),
    ("lm_head/kernel", PS(FSDP_SP, "tp"), False),
    ("vision_head/kernel", PS(FSDP_SP, "tp"), False),
)


def partition_rules(scan_layers: bool = True, param_scan_axis: int = 0) -> tuple[tuple[str, PS], ...]:
    """Ordered (regex, PartitionSpec) rules; the scanned variant inserts the layer axis."""
    if param_scan_axis not in (0, 1):
        raise ValueError(f"param_scan_axis must be 0 or 1, got {param_scan_axis}")
    rules = []
    for pattern, spec, in_layer in PARTITION_RULES:
        if scan_layers and in_layer:
            dims = list(spec)
            dims.insert(param_scan_axis, None)
            spec = PS(*dims)
        rules.append((pattern, spec))
    return tuple(rules)


def tree_paths(tree: Any) -> dict[tuple, Any]:
    """Flatten a nested dict (or any pytree) to {path tuple of str: leaf}."""
    if isinstance(tree, Mapping):
        return flatten_dict(_to_dict(tree), keep_empty_nodes=False)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _to_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def match_partition_rules(rules, tree, *, optimizer_state: bool = False):
    """A tree of PartitionSpecs for `tree` (params, or an optimizer state with params inside).

    Scalars and one-element arrays are replicated. A leaf that no rule matches is an error
    naming it. With `optimizer_state=True`, a leaf whose rank does not fit the matched spec
    (e.g. adafactor's factored moments) is replicated.
    """
    def spec_for(path: str, leaf) -> PS:
        shape = np.shape(leaf)
        if len(shape) == 0 or int(np.prod(shape)) == 1:
            return PS()
        for pattern, spec in rules:
            if re.search(pattern, path):
                if len(spec) > len(shape):
                    if optimizer_state:
                        return PS()
                    raise ValueError(f"partition rule {pattern!r} gives {spec} ({len(spec)} dims) for "
                                     f"parameter {path} of shape {shape}")
                return spec
        raise ValueError(f"no partition rule matches parameter {path} (shape {shape})")

    def leaf_spec(path, leaf):
        return spec_for("/".join(_key_name(k) for k in path), leaf)

    return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def named_shardings(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PS))


def check_divisibility(mesh: Mesh, tree, specs) -> None:
    """Raise naming the parameter when a sharded dim is not divisible by its mesh axes."""
    sizes = mesh_shape(mesh)
    for (path, leaf), spec in zip(tree_paths(tree).items(), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PS))):
        for dim, axes in zip(np.shape(leaf), spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            n = int(np.prod([sizes[a] for a in axes])) if axes else 1
            if dim % n:
                raise ValueError(f"parameter {'/'.join(path)} of shape {np.shape(leaf)}: dim {dim} is not "
                                 f"divisible by mesh axes {axes} (size {n}) of spec {spec}")


# ---- sharding constraints and host <-> mesh moves -----------------------------------------


def with_sharding_constraint(x, spec: PS, mesh: Mesh | None = None):
    """Constrain `x` to `spec` on `mesh`; a no-op without a mesh or when the mesh lacks an axis."""
    if mesh is None or mesh.empty:
        return x
    names = set(mesh.axis_names)
    for axes in spec:
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            if a not in names:
                return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_array(x, sharding: NamedSharding, dtype=None) -> jax.Array:
    """Place one host array (every process holds all of it) onto a global sharding."""
    x = np.asarray(x)
    if dtype is not None and np.issubdtype(x.dtype, np.floating):
        x = x.astype(dtype)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_tree(tree, specs, mesh: Mesh, float_dtype=None):
    """Place a host tree onto the mesh by specs (floats optionally cast)."""
    return jax.tree.map(lambda s, x: shard_array(x, NamedSharding(mesh, s), float_dtype), specs, tree,
                        is_leaf=lambda x: isinstance(x, PS))


def gather_array(x) -> np.ndarray:
    """A global array as one host numpy array (all processes get all of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_tree(tree):
    return jax.tree.map(gather_array, tree)


def make_shard_and_gather_fns(specs, mesh: Mesh, float_dtype=None):
    """Per-leaf functions: shard_fns place one host array, gather_fns bring one back."""
    def shard_fn(spec):
        sharding = NamedSharding(mesh, spec)
        return lambda x: shard_array(x, sharding, float_dtype)

    is_spec = lambda x: isinstance(x, PS)  # noqa: E731
    return (jax.tree.map(shard_fn, specs, is_leaf=is_spec),
            jax.tree.map(lambda _: gather_array, specs, is_leaf=is_spec))


# ---- data placement -------------------------------------------------------------------------


def process_batch_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """Sorted global row indices of a `BATCH_SPEC` array that this process's devices hold."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map((global_batch, mesh.shape["sp"])).items():
        if device.process_index == jax.process_index():
            rows.update(range(*index[0].indices(global_batch)))
    return np.array(sorted(rows), dtype=np.int64)


def data_rank_and_world(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(rank, world) of this process among the processes that need distinct batch rows.

    Processes whose devices hold the same rows (model-parallel replicas across hosts) share
    a rank and must read the same data. Rank k's local rows are the global rows
    `process_batch_rows` lists, in order.
    """
    sharding = NamedSharding(mesh, BATCH_SPEC)
    by_process: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((global_batch, mesh.shape["sp"])).items():
        by_process.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
    distinct = sorted({tuple(sorted(v)) for v in by_process.values()})
    return distinct.index(tuple(sorted(by_process[jax.process_index()]))), len(distinct)


def batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, global_batch: int | None = None,
                    spec: PS = BATCH_SPEC) -> dict:
    """Global arrays sharded by `spec` from this process's rows of a batch.

    The local arrays hold either the whole global batch (every process read everything) or
    exactly the rows `process_batch_rows` names, in that order.
    """
    sharding = NamedSharding(mesh, spec)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        n = global_batch or value.shape[0]
        if value.shape[0] == n:
            rows = None
        else:
            rows = process_batch_rows(mesh, n)
            if len(rows) != value.shape[0]:
                raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows; this process holds {len(rows)} of "
                                 f"the global batch of {n}")

        def fetch(index, value=value, rows=rows):
            if rows is None:
                return value[index]
            wanted = np.arange(n)[index[0]]
            return value[np.searchsorted(rows, wanted)][(slice(None),) + tuple(index[1:])]

        out[key] = jax.make_array_from_callback((n,) + value.shape[1:], sharding, fetch)
    return out


# ---- reporting ------------------------------------------------------------------------------


def sharding_table(tree, specs, mesh: Mesh) -> str:
    """One line per parameter: path, shape, PartitionSpec, bytes per device; then totals."""
    sizes = mesh_shape(mesh)
    lines, total, per_device = [], 0, 0
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PS))
    for (path, leaf), spec in zip(tree_paths(tree).items(), spec_leaves):
        shape = np.shape(leaf)
        nbytes = int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
        shards = 1
        for axes in spec:
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shards *= sizes[a]
        total += nbytes
        per_device += nbytes // shards
        lines.append(f"  {'/'.join(path):<60} {str(shape):<22} {str(spec):<40} {_fmt_bytes(nbytes // shards)}")
    lines.append(f"  total {_fmt_bytes(total)}, {_fmt_bytes(per_device)} per device")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"
