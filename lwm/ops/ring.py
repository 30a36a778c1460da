"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context", arXiv:2310.01889).

The sequence is sharded over the mesh axis `sp`. Inside `shard_map` each device holds a
shard of q, k, v (and segment ids). For sp steps it attends its queries to the key/value
block it currently holds, with a block kernel (blockwise jnp or Pallas flash) that masks by
the blocks' global token positions, merges the partial result into its running output by
log-sum-exp, and passes the block on to the next device with `lax.ppermute`. The backward
pass (`custom_vjp`) runs the same ring again: k, v travel together with their accumulating
gradients dk, dv, and after sp steps every dk, dv is back on the device that owns k, v.

A ring step whose whole block is masked (a later block under causal masking, or disjoint
segments) is skipped with `lax.cond`. With the "contiguous" layout that leaves device 0 idle
for sp-1 steps while the last device works on all of them; the "zigzag" and "striped"
layouts (`lwm/ops/layout.py`) give every device the same amount of work on every step.

    out = ring_attention(q, k, v, segment_ids, mesh=mesh, layout="zigzag")  # [B, S, H, D]
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as PS

from lwm.ops.blockwise import blockwise_block_bwd, blockwise_block_fwd, output_delta
from lwm.ops.common import check_qkv, fit_chunk, merge_partials, name_residuals
from lwm.ops.layout import chunk_limit, global_index

BATCH_AXES = ("dp", "fsdp")
SEQ_AXIS = "sp"
HEAD_AXIS = "tp"
QKV_SPEC = PS(BATCH_AXES, SEQ_AXIS, HEAD_AXIS, None)  # [batch, seq, heads, head_dim]
SEGMENT_SPEC = PS(BATCH_AXES, SEQ_AXIS)  # [batch, seq]


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Static description of one ring attention call (hashable)."""
    seq_len: int  # global sequence length
    sp: int  # devices on the ring (mesh axis `sp`)
    layout: str  # lwm.ops.layout name
    causal: bool
    scale: float  # softmax scale applied to q.k
    block_impl: str  # "blockwise" or "pallas": the kernel called on each ring step
    query_chunk_size: int  # blockwise chunk sizes (already fitted to the local length)
    key_chunk_size: int
    block_sizes: object = None  # pallas: a BlockSizes for every platform, or None: picked per platform
    interpret: bool | None = None  # pallas: None = interpret mode only where no kernel compiler exists (CPU)
    gather_kv: bool = False  # all-gather k, v once instead of passing blocks around the ring


def ring_attention(q, k, v, segment_ids=None, *, mesh, causal=True, layout="contiguous",
                   block_impl="blockwise", query_chunk_size=1024, key_chunk_size=1024,
                   softmax_scale=None, block_sizes=None, interpret=None, gather_kv=False):
    """Attention with the sequence sharded over mesh axis 'sp' (a ring of ppermutes).

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids:
    [batch, seq] or None; all stored in `layout` order. Batch is split over ('dp', 'fsdp'),
    seq over 'sp', heads over 'tp'. Chunk sizes apply to the local length seq / sp: the chunk
    used is min(chunk, layout.chunk_limit) (seq/sp, or seq/(2*sp) for zigzag), which must
    divide the local length. block_sizes, interpret (block_impl="pallas"): as in
    `pallas_flash.flash_attention`; the Pallas kernel follows the platform the call is lowered for,
    with block sizes (when None) picked per platform under the chunk sizes.
    Returns [batch, seq, heads, head_dim].

    gather_kv=True trades the ring for one all-gather of k, v (and one reduce-scatter of dk, dv
    in the backward): every device then holds the whole sequence's k, v for one layer, but makes
    2 collectives per layer instead of 3 * sp - 2. For short sequences, where each ring step's
    compute is too small to hide a rendezvous of all devices (see `gather_kv_fits`).
    """
    check_qkv(q, k, v, segment_ids)
    b, seq, h, d = q.shape
    sp = mesh.shape[SEQ_AXIS]
    limit = chunk_limit(layout, seq, sp)  # validates the layout too
    local = seq // sp
    batch_shards = mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]
    if b % batch_shards:
        raise ValueError(f"batch {b} is not divisible by dp*fsdp={batch_shards}")
    tp = mesh.shape[HEAD_AXIS]
    if h % tp or k.shape[2] % tp:
        raise ValueError(f"query heads {h} and key/value heads {k.shape[2]} must be divisible by tp={tp}")
    if block_impl not in ("blockwise", "pallas"):
        raise ValueError(f"unknown block_impl {block_impl!r}; expected 'blockwise' or 'pallas'")
    config = RingConfig(
        seq_len=seq, sp=sp, layout=layout, causal=bool(causal),
        scale=d ** -0.5 if softmax_scale is None else float(softmax_scale), block_impl=block_impl,
        query_chunk_size=fit_chunk(min(query_chunk_size, limit), local, "query_chunk_size"),
        key_chunk_size=fit_chunk(min(key_chunk_size, limit), local, "key_chunk_size"),
        block_sizes=block_sizes, interpret=None if interpret is None else bool(interpret),
        gather_kv=bool(gather_kv))
    ring = _make_gathered(config) if config.gather_kv else _make_ring(config)
    if segment_ids is None:
        fn, args, specs = (lambda q, k, v: ring(q, k, v, None)), (q, k, v), (QKV_SPEC,) * 3
    else:
        fn, args, specs = ring, (q, k, v, segment_ids.astype(jnp.int32)), (QKV_SPEC,) * 3 + (SEGMENT_SPEC,)
    # check_vma=False: Pallas interpret mode inside shard_map fails the varying-axes check.
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=QKV_SPEC, check_vma=False)
    return sharded(*args)


# ----------------------------------------------------------------------------- custom_vjp


def _block_kernels(config):
    """(fwd, bwd) of the per-step block kernel, with the static settings bound."""
    if config.block_impl == "pallas":
        from lwm.ops import pallas_flash  # only the pallas impl needs the Pallas module

        common = dict(causal=config.causal, scale=config.scale, block_sizes=config.block_sizes,
                      chunk_sizes=(config.query_chunk_size, config.key_chunk_size), interpret=config.interpret)
        return (functools.partial(pallas_flash.flash_block_fwd, **common),
                functools.partial(pallas_flash.flash_block_bwd, **common))
    common = dict(causal=config.causal, scale=config.scale, query_chunk_size=config.query_chunk_size,
                  key_chunk_size=config.key_chunk_size)
    return functools.partial(blockwise_block_fwd, **common), functools.partial(blockwise_block_bwd, **common)


def _with_output_residuals(forward, backward):
    """(q, k, v, seg) -> out with a custom VJP: forward -> (out, lse); the backward gets
    (q, k, v, seg, out, lse), out and lse tagged for the save_attention remat policy."""
    @jax.custom_vjp
    def attend(q, k, v, seg):
        return forward(q, k, v, seg)[0]

    def attend_fwd(q, k, v, seg):
        out, lse = name_residuals(*forward(q, k, v, seg))
        return out, (q, k, v, seg, out, lse)

    attend.defvjp(attend_fwd, backward)
    return attend


@functools.lru_cache(maxsize=128)
def _make_ring(config):
    """The per-device ring function (q, k, v, segment_ids|None) -> out with its custom VJP."""
    sp = config.sp
    positions = global_index(config.layout, config.seq_len, sp).reshape(sp, -1)  # [sp, local]
    first_position = positions.min(axis=1)  # [sp]
    last_position = positions.max(axis=1)
    block_fwd, block_bwd = _block_kernels(config)
    perm = [(i, (i + 1) % sp) for i in range(sp)]  # device i sends to i+1

    def rotate(x):
        return x if sp == 1 else lax.ppermute(x, SEQ_AXIS, perm)

    def block_visible(me, src, q_seg, kv_seg):
        """False when every (query, key) pair between my block and block `src` is masked."""
        visible = jnp.asarray(True)
        if config.causal:
            visible = jnp.asarray(first_position)[src] <= jnp.asarray(last_position)[me]
        if q_seg is not None:
            overlap = (q_seg.min(axis=1) <= kv_seg.max(axis=1)) & (kv_seg.min(axis=1) <= q_seg.max(axis=1))
            visible = visible & overlap.any()
        return visible

    # Every transfer is a rendezvous of all devices, so a ring step sends as few arrays as it
    # can: k and v travel stacked (dk, dv stacked too in the backward), segment ids are
    # gathered once instead of travelling, and the last step sends nothing it does not need.
    def gather_segments(seg):
        return None if seg is None else lax.all_gather(seg, SEQ_AXIS)  # [sp, b, local]

    def forward(q, k, v, seg):
        me = lax.axis_index(SEQ_AXIS)
        q_pos = jnp.asarray(positions)[me]  # [local]
        b, s, h, d = q.shape
        all_seg = gather_segments(seg)

        def attend_block(t, out, lse, kv_t):
            src = (me - t) % sp  # the device whose k/v block I hold at step t
            seg_t = None if seg is None else all_seg[src]

            def attend(partial):
                block_out, block_lse = block_fwd(q, kv_t[0], kv_t[1], seg, seg_t, q_pos, jnp.asarray(positions)[src])
                return merge_partials(*partial, block_out, block_lse)

            return lax.cond(block_visible(me, src, seg, seg_t), attend, lambda p: p, (out, lse))

        def step(t, carry):
            out, lse, kv_t = carry
            kv_next = rotate(kv_t)  # sent first, so the transfer can overlap this step's compute
            return (*attend_block(t, out, lse, kv_t), kv_next)

        init = (jnp.zeros((b, s, h, d), jnp.float32), jnp.full((b, h, s), -jnp.inf, jnp.float32), jnp.stack([k, v]))
        out, lse, kv_last = lax.fori_loop(0, sp - 1, step, init)
        out, lse = attend_block(sp - 1, out, lse, kv_last)
        return out.astype(q.dtype), lse

    def ring_bwd(residuals, d_out):
        q, k, v, seg, out, lse = residuals
        me = lax.axis_index(SEQ_AXIS)
        q_pos = jnp.asarray(positions)[me]
        delta = output_delta(out, d_out)  # [b, h, local]
        all_seg = gather_segments(seg)
        # dk, dv travel with their k, v block; after sp steps they are home again. k, v are sent
        # before the step's compute (the transfer overlaps it), dk, dv after it.

        def backprop_block(t, dq, kv_t, dkv_t):
            src = (me - t) % sp
            seg_t = None if seg is None else all_seg[src]

            def backprop(grads):
                dq_b, dk_b, dv_b = block_bwd(q, kv_t[0], kv_t[1], d_out, lse, delta, seg, seg_t, q_pos,
                                             jnp.asarray(positions)[src])
                return grads[0] + dq_b, grads[1] + jnp.stack([dk_b, dv_b])

            return lax.cond(block_visible(me, src, seg, seg_t), backprop, lambda g: g, (dq, dkv_t))

        def step(t, carry):
            dq, kv_t, dkv_t = carry
            kv_next = rotate(kv_t)
            dq, dkv_t = backprop_block(t, dq, kv_t, dkv_t)
            return dq, kv_next, rotate(dkv_t)

        init = (jnp.zeros(q.shape, jnp.float32), jnp.stack([k, v]), jnp.zeros((2,) + k.shape, jnp.float32))
        dq, kv_last, dkv = lax.fori_loop(0, sp - 1, step, init)
        dq, dkv = backprop_block(sp - 1, dq, kv_last, dkv)
        dkv = rotate(dkv)
        return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None

    return _with_output_residuals(forward, ring_bwd)


# Gathered k/v: at most this many bytes of one layer's k and v per device for sp_attention="auto".
GATHER_KV_MAX_BYTES = 32 * 2 ** 20


def kv_bytes_per_device(k, mesh) -> int:
    """Bytes of one layer's whole-sequence k and v on each device once gathered over sp."""
    b, seq, kv_heads, d = k.shape
    per_device = 2 * b * seq * kv_heads * d * jnp.dtype(k.dtype).itemsize
    return per_device // (mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]] * mesh.shape[HEAD_AXIS])


def gather_kv_fits(k, mesh) -> bool:
    """Whether one layer's whole-sequence k and v, per device, fit GATHER_KV_MAX_BYTES."""
    return kv_bytes_per_device(k, mesh) <= GATHER_KV_MAX_BYTES


@functools.lru_cache(maxsize=128)
def _make_gathered(config):
    """Like `_make_ring`, with k, v all-gathered over sp and one block kernel call per device."""
    sp = config.sp
    positions = global_index(config.layout, config.seq_len, sp).reshape(sp, -1)  # [sp, local]
    block_fwd, block_bwd = _block_kernels(config)

    def gather(k, v, seg):
        """Whole-sequence k, v [b, seq, hkv, d] and segment ids, in the devices' (layout) order."""
        kv = lax.all_gather(jnp.stack([k, v]), SEQ_AXIS, axis=2, tiled=True)
        return kv[0], kv[1], None if seg is None else lax.all_gather(seg, SEQ_AXIS, axis=1, tiled=True)

    def forward(q, k, v, seg):
        k_all, v_all, seg_all = gather(k, v, seg)
        me = lax.axis_index(SEQ_AXIS)
        out, lse = block_fwd(q, k_all, v_all, seg, seg_all, jnp.asarray(positions)[me],
                             jnp.asarray(positions.reshape(-1)))
        return out.astype(q.dtype), lse

    def gathered_bwd(residuals, d_out):  # k, v are gathered again rather than saved
        q, k, v, seg, out, lse = residuals
        k_all, v_all, seg_all = gather(k, v, seg)
        me = lax.axis_index(SEQ_AXIS)
        dq, dk, dv = block_bwd(q, k_all, v_all, d_out, lse, output_delta(out, d_out), seg, seg_all,
                               jnp.asarray(positions)[me], jnp.asarray(positions.reshape(-1)))
        dkv = lax.psum_scatter(jnp.stack([dk, dv]), SEQ_AXIS, scatter_dimension=2, tiled=True)
        return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None

    return _with_output_residuals(forward, gathered_bwd)


def causal_work(layout: str, seq_len: int, sp: int, chunk: int):
    """int [sp steps, sp devices]: chunk pairs each device computes at each causal ring step.

    A step takes as long as its busiest device, so sum(max over devices) is the ring's time.
    Example, 16 tokens, sp=2, chunk 4: contiguous [[3, 3], [0, 4]] (device 0 idles on step 1),
    zigzag [[3, 3], [2, 2]], striped [[3, 3], [3, 3]] (striped diagonal pairs are half masked).
    """
    positions = global_index(layout, seq_len, sp).reshape(sp, -1, chunk)  # [device, chunk, token]
    first, last = positions.min(axis=2), positions.max(axis=2)  # [device, chunk]
    work = np.zeros((sp, sp), np.int64)
    for step in range(sp):
        for me in range(sp):
            src = (me - step) % sp
            work[step, me] = int((first[src][None, :] <= last[me][:, None]).sum())
    return work
