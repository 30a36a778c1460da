"""Blockwise attention in pure jnp (Liu & Abbeel 2023, "Blockwise Parallel Transformer",
arXiv:2305.19370): memory linear in sequence length.

Queries are processed in chunks of `query_chunk_size`; for each, keys/values stream past in
chunks of `key_chunk_size` while an online softmax keeps a running max `m`, denominator `l`
and numerator `acc` per query row. The backward pass (a `custom_vjp`) recomputes the scores
chunk by chunk from the saved log-sum-exp, so no [seq, seq] array exists in either pass.
Chunk pairs that are fully masked (above the causal diagonal, or disjoint segments) are
skipped, and pairs with nothing masked (below the diagonal, one shared segment) skip building
the mask (`lax.switch` on `common.chunk_pair_kinds`). Grouped-query attention reshapes the query heads to
[kv_heads, group] instead of repeating k/v.

    out = blockwise_attention(q, k, v, segment_ids, causal=True,
                              query_chunk_size=256, key_chunk_size=256)   # [B, S, H, D]

`blockwise_block_fwd` / `blockwise_block_bwd` are the per-block kernels the ring calls
(`lwm/ops/ring.py`): they take the blocks' global token positions, so a block of keys from
another device, or a load-balanced layout, is masked correctly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lwm.ops.common import MASK_VALUE, block_mask, check_qkv, chunk_pair_kinds, fit_chunk, name_residuals


def blockwise_attention(q, k, v, segment_ids=None, *, causal=True, query_chunk_size=1024,
                        key_chunk_size=1024, softmax_scale=None, positions=None):
    """Masked softmax attention computed chunk by chunk; differentiable.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim];
    segment_ids: [batch, seq] int or None; positions: [seq] int global order of the stored
    tokens (default arange; used by the causal mask). Chunk sizes larger than seq are
    reduced to seq; otherwise they must divide seq. Returns [batch, seq, heads, head_dim].
    """
    check_qkv(q, k, v, segment_ids)
    seq = q.shape[1]
    q_chunk = fit_chunk(query_chunk_size, seq, "query_chunk_size")
    kv_chunk = fit_chunk(key_chunk_size, seq, "key_chunk_size")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    positions = jnp.arange(seq, dtype=jnp.int32) if positions is None else jnp.asarray(positions, jnp.int32)
    if positions.shape != (seq,):
        raise ValueError(f"positions shape {positions.shape} != (seq,) = {(seq,)}")
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    config = (bool(causal), scale, q_chunk, kv_chunk)
    return _blockwise(config, q, k, v, segment_ids, positions)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(config, q, k, v, segment_ids, positions):
    out, _ = _forward(config, q, k, v, segment_ids, positions)
    return out


def _forward(config, q, k, v, segment_ids, positions):
    causal, scale, q_chunk, kv_chunk = config
    out, lse = blockwise_block_fwd(q, k, v, segment_ids, segment_ids, positions, positions, causal=causal,
                                   scale=scale, query_chunk_size=q_chunk, key_chunk_size=kv_chunk)
    out, lse = name_residuals(out.astype(q.dtype), lse)
    return out, (q, k, v, segment_ids, positions, out, lse)


def _backward(config, residuals, d_out):
    causal, scale, q_chunk, kv_chunk = config
    q, k, v, segment_ids, positions, out, lse = residuals
    delta = output_delta(out, d_out)
    dq, dk, dv = blockwise_block_bwd(q, k, v, d_out, lse, delta, segment_ids, segment_ids, positions, positions,
                                     causal=causal, scale=scale, query_chunk_size=q_chunk,
                                     key_chunk_size=kv_chunk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_forward, _backward)


def output_delta(out, d_out):
    """rowsum(dO * O) per query and head: [batch, heads, seq] float32 (the softmax-backward term)."""
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [b, s, h]
    return jnp.transpose(delta, (0, 2, 1))


# ----------------------------------------------------------------------------- block kernels


def _tie_masks_to(q, q_seg, kv_seg, q_pos, kv_pos):
    """Pass positions and segment ids through one optimization barrier with q.

    The masks depend only on positions and segments, which do not change from layer to layer.
    Under a scan over layers (flax nn.scan) and jax.grad, JAX's scan partial evaluation would
    then hoist every chunk pair's [chunk, chunk] mask out of the layer loop as one stacked
    [n_q, n_kv, chunk, chunk] array: quadratic memory (measured: 3.4 GB per device at 32K
    tokens). Tied to q, they are computed inside each call, chunk by chunk.
    """
    return lax.optimization_barrier((q, q_seg, kv_seg, q_pos, kv_pos))


def _head_major(x, kv_heads):
    """[b, s, heads, d] -> [b, kv_heads, group, s, d]: chunk matmuls then batch over contiguous heads."""
    b, s, h, d = x.shape
    return jnp.transpose(x.reshape(b, s, kv_heads, h // kv_heads, d), (0, 2, 3, 1, 4))


def _from_head_major(x):
    """[b, kv_heads, group, s, d] -> [b, s, heads, d]."""
    b, kv_heads, g, s, d = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, s, kv_heads * g, d)


def blockwise_block_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, causal, scale, query_chunk_size,
                        key_chunk_size):
    """Attention of a query block to a key/value block: (out float32 [b, sq, h, d], lse [b, h, sq]).

    out is normalised over this block's keys; lse = -inf and out = 0 on rows with no allowed key,
    so blocks merge with `common.merge_partials`. q_pos [sq] / kv_pos [sk] are global positions.
    """
    b, sq, h, d = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    q_chunk, kv_chunk = query_chunk_size, key_chunk_size
    n_q, n_kv = sq // q_chunk, sk // kv_chunk
    q, q_seg, kv_seg, q_pos, kv_pos = _tie_masks_to(q, q_seg, kv_seg, q_pos, kv_pos)
    kinds = chunk_pair_kinds(q_seg, kv_seg, q_pos, kv_pos, causal, q_chunk, kv_chunk)  # [n_q, n_kv]
    qh = _head_major(q * jnp.asarray(scale, q.dtype), kv_heads)  # [b, hkv, g, sq, d], scaled once here
    # k is transposed once here: as [ck, d] tiles, XLA's CPU dots copy k^T on every chunk pair.
    khT = jnp.swapaxes(_head_major(k, kv_heads)[:, :, 0], 2, 3)  # [b, hkv, d, sk]
    vh = _head_major(v, kv_heads)[:, :, 0]

    def one_query_chunk(i):
        q_i = lax.dynamic_slice_in_dim(qh, i * q_chunk, q_chunk, axis=3)  # [b, hkv, g, cq, d]
        q_pos_i = lax.dynamic_slice_in_dim(q_pos, i * q_chunk, q_chunk)
        q_seg_i = None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, i * q_chunk, q_chunk, axis=1)

        def kv_step(j, carry):
            def attend(carry, masked):
                acc, m, l = carry
                kT_j = lax.dynamic_slice_in_dim(khT, j * kv_chunk, kv_chunk, axis=3)  # [b, hkv, d, ck]
                v_j = lax.dynamic_slice_in_dim(vh, j * kv_chunk, kv_chunk, axis=2)
                s = jnp.einsum("bhgqd,bhdk->bhgqk", q_i, kT_j, preferred_element_type=jnp.float32)
                mask = None
                if masked:
                    kv_pos_j = lax.dynamic_slice_in_dim(kv_pos, j * kv_chunk, kv_chunk)
                    kv_seg_j = None if kv_seg is None else lax.dynamic_slice_in_dim(kv_seg, j * kv_chunk, kv_chunk, 1)
                    mask = block_mask(q_seg_i, kv_seg_j, q_pos_i, kv_pos_j, causal)  # [b|1, cq, ck] or None
                if mask is not None:
                    mask = mask[:, None, None]  # [b|1, 1, 1, cq, ck]
                    s = jnp.where(mask, s, MASK_VALUE)
                m_new = jnp.maximum(m, s.max(axis=-1))  # [b, hkv, g, cq]
                p = jnp.exp(s - m_new[..., None])
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)  # exact zeros even when the whole row is masked
                alpha = jnp.exp(m - m_new)
                l = alpha * l + p.sum(axis=-1)
                pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
                return alpha[..., None] * acc + pv, m_new, l

            branches = (lambda c: c, functools.partial(attend, masked=True), functools.partial(attend, masked=False))
            return lax.switch(kinds[i, j], branches, carry)  # SKIP, MASKED, FULL

        init = (jnp.zeros((b, kv_heads, g, q_chunk, d), jnp.float32),  # acc
                jnp.full((b, kv_heads, g, q_chunk), MASK_VALUE, jnp.float32),  # running max
                jnp.zeros((b, kv_heads, g, q_chunk), jnp.float32))  # denominator
        acc, m, l = lax.fori_loop(0, n_kv, kv_step, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [b, hkv, g, cq, d]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [b, hkv, g, cq]
        return out, lse

    out, lse = lax.map(one_query_chunk, jnp.arange(n_q))  # [n_q, b, hkv, g, cq, (d)]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, sq, h, d)  # -> [b, sq, h, d]
    lse = jnp.transpose(lse, (1, 2, 3, 0, 4)).reshape(b, h, sq)  # -> [b, h, sq]
    return out, lse


def blockwise_block_bwd(q, k, v, d_out, lse, delta, q_seg, kv_seg, q_pos, kv_pos, *, causal, scale,
                        query_chunk_size, key_chunk_size):
    """Gradients of one block pair given the FULL row statistics: (dq, dk, dv) float32.

    lse, delta: [b, h, sq] from the complete attention (all key blocks), so the block's
    probabilities exp(s - lse) are the final ones and per-block gradients simply add up.
    Loops over key chunks outside (dk, dv of that chunk stay local) and query chunks inside;
    dq accumulates in place in a [b, kv_heads, group, sq, d] buffer.
    """
    b, sq, h, d = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    q_chunk, kv_chunk = query_chunk_size, key_chunk_size
    n_q, n_kv = sq // q_chunk, sk // kv_chunk
    q, q_seg, kv_seg, q_pos, kv_pos = _tie_masks_to(q, q_seg, kv_seg, q_pos, kv_pos)
    kinds = chunk_pair_kinds(q_seg, kv_seg, q_pos, kv_pos, causal, q_chunk, kv_chunk)  # [n_q, n_kv]
    # q is scaled once here: s = (scale q) k^T, dk = ds^T (scale q), dq = scale * (ds k) at the end.
    qh, doh = _head_major(q * jnp.asarray(scale, q.dtype), kv_heads), _head_major(d_out, kv_heads)
    # dk and dv contract over queries. With the [q, k] probabilities as the matmul's left side
    # (p^T do) XLA's CPU dots transpose every [cq, ck] tile first (2.4x slower); as the right
    # side (do^T p, with q and do transposed once here) they need no copy, and dk^T, dv^T are
    # transposed back once per key chunk.
    qT, doT = jnp.transpose(qh, (0, 1, 4, 2, 3)), jnp.transpose(doh, (0, 1, 4, 2, 3))  # [b, hkv, d, g, sq]
    kh = _head_major(k, kv_heads)[:, :, 0]  # [b, hkv, sk, d]
    vh = _head_major(v, kv_heads)[:, :, 0]
    lse4 = jnp.where(jnp.isfinite(lse), lse, 0.0).reshape(b, kv_heads, g, sq)  # empty rows: p is masked to 0
    delta4 = delta.reshape(b, kv_heads, g, sq)

    def one_kv_chunk(dq, j):
        k_j = lax.dynamic_slice_in_dim(kh, j * kv_chunk, kv_chunk, axis=2)  # [b, hkv, ck, d]
        v_j = lax.dynamic_slice_in_dim(vh, j * kv_chunk, kv_chunk, axis=2)
        kv_pos_j = lax.dynamic_slice_in_dim(kv_pos, j * kv_chunk, kv_chunk)
        kv_seg_j = None if kv_seg is None else lax.dynamic_slice_in_dim(kv_seg, j * kv_chunk, kv_chunk, axis=1)
        kT_j, vT_j = jnp.swapaxes(k_j, 2, 3), jnp.swapaxes(v_j, 2, 3)  # [b, hkv, d, ck], once per key chunk

        def q_step(i, carry):
            start = i * q_chunk

            def backprop(grads, masked):
                dkT_j, dvT_j = grads
                q_i = lax.dynamic_slice_in_dim(qh, start, q_chunk, axis=3)  # [b, hkv, g, cq, d]
                do_i = lax.dynamic_slice_in_dim(doh, start, q_chunk, axis=3)
                lse_i = lax.dynamic_slice_in_dim(lse4, start, q_chunk, axis=3)  # [b, hkv, g, cq]
                delta_i = lax.dynamic_slice_in_dim(delta4, start, q_chunk, axis=3)
                s = jnp.einsum("bhgqd,bhdk->bhgqk", q_i, kT_j, preferred_element_type=jnp.float32)
                p = jnp.exp(s - lse_i[..., None])  # [b, hkv, g, cq, ck]
                if masked:
                    q_pos_i = lax.dynamic_slice_in_dim(q_pos, start, q_chunk)
                    q_seg_i = None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, start, q_chunk, axis=1)
                    mask = block_mask(q_seg_i, kv_seg_j, q_pos_i, kv_pos_j, causal)
                    if mask is not None:
                        p = jnp.where(mask[:, None, None], p, 0.0)
                qT_i = lax.dynamic_slice_in_dim(qT, start, q_chunk, axis=4)  # [b, hkv, d, g, cq]
                doT_i = lax.dynamic_slice_in_dim(doT, start, q_chunk, axis=4)
                dvT_j = dvT_j + jnp.einsum("bhdgq,bhgqk->bhdk", doT_i, p.astype(do_i.dtype),
                                           preferred_element_type=jnp.float32)
                dp = jnp.einsum("bhgqd,bhdk->bhgqk", do_i, vT_j, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])  # d(loss)/d(scaled q.k)
                dkT_j = dkT_j + jnp.einsum("bhdgq,bhgqk->bhdk", qT_i, ds.astype(q_i.dtype),
                                           preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
                return dq_i, dkT_j, dvT_j

            def skip(grads):
                return (jnp.zeros((b, kv_heads, g, q_chunk, d), jnp.float32),) + grads

            # Only this query chunk's dq goes through the switch: the whole [.., sq, d] dq buffer
            # passed through a conditional would be copied on every step.
            dq, dkT_j, dvT_j = carry
            branches = (skip, functools.partial(backprop, masked=True), functools.partial(backprop, masked=False))
            dq_i, dkT_j, dvT_j = lax.switch(kinds[i, j], branches, (dkT_j, dvT_j))  # SKIP, MASKED, FULL
            dq_old = lax.dynamic_slice_in_dim(dq, start, q_chunk, axis=3)
            return lax.dynamic_update_slice_in_dim(dq, dq_old + dq_i, start, axis=3), dkT_j, dvT_j

        zeros = jnp.zeros((b, kv_heads, d, kv_chunk), jnp.float32)
        dq, dkT_j, dvT_j = lax.fori_loop(0, n_q, q_step, (dq, zeros, zeros))
        return dq, (jnp.swapaxes(dkT_j, 2, 3), jnp.swapaxes(dvT_j, 2, 3))

    dq0 = jnp.zeros((b, kv_heads, g, sq, d), jnp.float32)
    dq, (dk, dv) = lax.scan(one_kv_chunk, dq0, jnp.arange(n_kv))  # dk, dv: [n_kv, b, hkv, ck, d]
    to_bshd = lambda x: jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(b, sk, kv_heads, d)
    return _from_head_major(dq) * scale, to_bshd(dk), to_bshd(dv)
