"""Dense masked attention: the reference every kernel is checked against (and the `dense` impl).

Masking rule shared by every kernel in `lwm.ops`: query i may attend key j iff
    segment_q[i] == segment_kv[j]  and  (not causal or kv_index[j] <= q_index[i])
where q_index / kv_index are the tokens' global order in the sequence (default: arange).
Padding is a segment of its own (the model gives padded tokens segment id 0), so every
query attends at least itself and no row is empty in self-attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(segment_ids, causal, q_len, kv_len, q_index=None, kv_index=None):
    """Boolean mask [batch or 1, 1, q_len, kv_len] of allowed (query, key) pairs."""
    mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    if causal:
        q_index = jnp.arange(q_len) if q_index is None else q_index
        kv_index = jnp.arange(kv_len) if kv_index is None else kv_index
        q_index = jnp.broadcast_to(q_index, (1, q_len)) if q_index.ndim == 1 else q_index
        kv_index = jnp.broadcast_to(kv_index, (1, kv_len)) if kv_index.ndim == 1 else kv_index
        mask = mask & (kv_index[:, None, None, :] <= q_index[:, None, :, None])
    return mask


def reference_attention(q, k, v, segment_ids=None, *, causal=True, q_index=None, kv_index=None,
                        softmax_scale=None):
    """softmax(q k^T * scale + mask) v, computed densely in the inputs' dtype (float32 at least).

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with
    heads % kv_heads == 0 (grouped-query attention). segment_ids: [batch, len] for
    self-attention or a pair (q_segment_ids, kv_segment_ids). Rows with no allowed key give 0.
    """
    b, q_len, h, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if h % kv_heads:
        raise ValueError(f"query heads {h} not divisible by key/value heads {kv_heads}")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(dtype).reshape(b, q_len, kv_heads, h // kv_heads, d)  # [b, q, kvh, group, d]
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(dtype),
                        precision=jax.lax.Precision.HIGHEST) * scale
    mask = attention_mask(segment_ids, causal, q_len, kv_len, q_index, kv_index)[:, :, None]  # [b,1,1,q,k]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, q_len, h, d).astype(q.dtype)
