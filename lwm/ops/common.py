"""Pieces every attention kernel in `lwm.ops` shares: the per-block mask, the chunk-pair
visibility table used to skip work, and the log-sum-exp merge of partial results.

The masking rule (also in `lwm/ops/reference.py`): query i may attend key j iff
    q_segment[i] == kv_segment[j]  and  (not causal or kv_position[j] <= q_position[i])
where positions are the tokens' global order in the sequence. Kernels work on blocks whose
positions need not be contiguous (load-balanced ring layouts), so positions are arrays.

Partial results are carried as (out, lse): `out` normalised over the keys seen so far and
`lse` = log sum_j exp(score_j), with lse = -inf (and out = 0) for a row that saw no allowed key.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf on masked logits: keeps the running max finite so exp(m_old - m_new)
# never evaluates inf - inf. Masked probabilities are zeroed explicitly, so its value never leaks.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def block_mask(q_seg, kv_seg, q_pos, kv_pos, causal):
    """Allowed (query, key) pairs of one block: bool [batch or 1, q_len, kv_len], or None if all.

    q_seg: [batch, q_len] int or None; kv_seg: [batch, kv_len] int or None;
    q_pos: [q_len] int; kv_pos: [kv_len] int (global token order).
    """
    mask = None
    if q_seg is not None:
        mask = q_seg[:, :, None] == kv_seg[:, None, :]  # [b, q, k]
    if causal:
        causal_mask = (kv_pos[None, :] <= q_pos[:, None])[None]  # [1, q, k]
        mask = causal_mask if mask is None else mask & causal_mask
    return mask


SKIP, MASKED, FULL = 0, 1, 2  # chunk-pair kinds: fully masked / needs the mask / all pairs allowed


def chunk_pair_kinds(q_seg, kv_seg, q_pos, kv_pos, causal, q_chunk, kv_chunk):
    """int32 [n_q_chunks, n_kv_chunks]: SKIP, MASKED or FULL for every chunk pair.

    From each chunk's position and segment ranges (cheap). SKIP is certain (every pair masked);
    FULL is certain (no pair masked, so the mask need not be built); MASKED is everything else
    (with unsorted segment ids it may still hide an all-masked pair, which then computes zeros).
    Example: causal, positions [0, 1, 2, 3], chunks of 2 -> [[MASKED, SKIP], [FULL, MASKED]].
    """
    n_q, n_kv = q_pos.shape[0] // q_chunk, kv_pos.shape[0] // kv_chunk
    visible = jnp.ones((n_q, n_kv), dtype=bool)
    full = jnp.ones((n_q, n_kv), dtype=bool)
    if causal:
        q_pos, kv_pos = q_pos.reshape(n_q, q_chunk), kv_pos.reshape(n_kv, kv_chunk)
        visible = visible & (kv_pos.min(axis=1)[None, :] <= q_pos.max(axis=1)[:, None])
        full = full & (kv_pos.max(axis=1)[None, :] <= q_pos.min(axis=1)[:, None])
    if q_seg is not None:
        b = q_seg.shape[0]
        q_seg = q_seg.reshape(b, n_q, q_chunk)
        kv_seg = kv_seg.reshape(b, n_kv, kv_chunk)
        q_lo, q_hi = q_seg.min(axis=2)[:, :, None], q_seg.max(axis=2)[:, :, None]  # [b, n_q, 1]
        kv_lo, kv_hi = kv_seg.min(axis=2)[:, None, :], kv_seg.max(axis=2)[:, None, :]  # [b, 1, n_kv]
        visible = visible & ((q_lo <= kv_hi) & (kv_lo <= q_hi)).any(axis=0)
        full = full & ((q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)).all(axis=0)
    return jnp.where(visible, jnp.where(full, FULL, MASKED), SKIP).astype(jnp.int32)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets by log-sum-exp.

    out_*: [batch, q_len, heads, head_dim] float32; lse_*: [batch, heads, q_len] float32 (-inf
    for rows with no key yet). Returns (out, lse) over the union of the key sets.
    """
    lse = jnp.logaddexp(lse_a, lse_b)  # -inf only where both are -inf
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - lse_safe), 0.0)  # [b, h, q]
    w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - lse_safe), 0.0)
    to_bqh = lambda w: jnp.transpose(w, (0, 2, 1))[..., None]  # [b, q, h, 1]
    return out_a * to_bqh(w_a) + out_b * to_bqh(w_b), lse


def check_qkv(q, k, v, segment_ids=None, *, same_length=True):
    """Validate attention operand shapes; raise ValueError naming the mismatch."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got ranks "
                         f"q={q.ndim}, k={k.ndim}, v={v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {k.shape} != v shape {v.shape}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v batch and head_dim {k.shape[0]}, {k.shape[3]} must match q's {b}, {d}")
    if same_length and k.shape[1] != s:
        raise ValueError(f"self-attention needs equal lengths: q has {s}, k/v have {k.shape[1]}")
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} not divisible by key/value heads {k.shape[2]}")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, s):
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != (batch, seq) = {(b, s)}")


def fit_chunk(chunk, length, name):
    """Chunk size actually used along a sequence of `length`: min(chunk, length), which must divide it."""
    if chunk <= 0:
        raise ValueError(f"{name}={chunk} must be positive")
    chunk = min(chunk, length)
    if length % chunk:
        raise ValueError(f"{name}={chunk} does not divide the (local) sequence length {length}")
    return chunk


# Names of the attention kernels' saved results (jax.ad_checkpoint.checkpoint_name): a remat
# policy that keeps these (lwm.llama's 'save_attention') recomputes everything else of a layer
# but never re-runs the attention forward.
OUT_NAME, LSE_NAME = "attention_out", "attention_lse"


def name_residuals(out, lse):
    """Tag a kernel's output and log-sum-exp for remat policies."""
    from jax.ad_checkpoint import checkpoint_name

    return checkpoint_name(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
