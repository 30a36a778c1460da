"""Attention of a few new tokens against a KV cache, optionally sharded over the `sp` axis.

Generation writes each new token's k/v into a cache of L slots, then attends the new queries
to the cache. For long prompts (a 128K-token needle haystack) the cache is sharded over `sp`:
each device attends to its own L/sp slots and keeps (running max m, denominator l, numerator
acc) per query; the partial results merge across `sp` by log-sum-exp: the global max by
`pmax`, then the rescaled numerators and denominators by `psum`.

    out = cached_attention(q, k_cache, v_cache, q_index, kv_mask, mesh=mesh)  # [B, C, H, D]

Query i (cache slot q_index + i) may attend slot j iff kv_mask[b, j] and j <= q_index + i.
A query with no allowed slot returns 0.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as PS

from lwm.ops.common import MASK_VALUE

BATCH_AXES = ("dp", "fsdp")
CACHE_SPEC = PS(BATCH_AXES, "sp", "tp", None)  # [batch, slots, kv_heads, head_dim]
MASK_SPEC = PS(BATCH_AXES, "sp")  # [batch, slots]
QUERY_SPEC = PS(BATCH_AXES, None, "tp", None)  # [batch, new tokens, heads, head_dim]


def cached_attention(q, k_cache, v_cache, q_index, kv_mask, *, mesh=None, softmax_scale=None,
                     key_chunk_size=4096):
    """Attend C new tokens to a KV cache that already holds them.

    q: [batch, C, heads, head_dim]; k_cache, v_cache: [batch, L, kv_heads, head_dim];
    q_index: int32 scalar (may be traced), the cache slot of q[:, 0]; kv_mask: [batch, L] bool,
    True where a slot is written and not padding. With a mesh whose 'sp' > 1 the cache is
    sharded over 'sp' and partial results merge by log-sum-exp. The local cache is scanned in
    chunks of the largest divisor of its length <= key_chunk_size, so the score array is at
    most [batch, heads, C, key_chunk_size]. Returns [batch, C, heads, head_dim] in q's dtype.
    """
    if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, C, H, D] and equal caches [B, L, Hkv, D]; got q {q.shape}, "
                         f"k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    b, c, h, d = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"cache batch/head_dim {k_cache.shape[0]}/{k_cache.shape[3]} != q's {b}/{d}")
    if h % kv_heads:
        raise ValueError(f"query heads {h} not divisible by key/value heads {kv_heads}")
    if tuple(kv_mask.shape) != (b, cache_len):
        raise ValueError(f"kv_mask shape {tuple(kv_mask.shape)} != (batch, cache length) = {(b, cache_len)}")
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    q_index = jnp.asarray(q_index, jnp.int32)
    kv_mask = kv_mask.astype(bool)
    sp = 1 if mesh is None else mesh.shape["sp"]

    if sp == 1:
        acc, m, l = _partial_attention(q, k_cache, v_cache, q_index, kv_mask, jnp.int32(0), scale,
                                       _divisor_at_most(cache_len, key_chunk_size))
        return _normalise(acc, l, q.dtype)

    if cache_len % sp:
        raise ValueError(f"cache length {cache_len} is not divisible by sp={sp}")
    local_len = cache_len // sp
    tp = mesh.shape["tp"]
    if h % tp or kv_heads % tp:
        raise ValueError(f"query heads {h} and key/value heads {kv_heads} must be divisible by tp={tp}")
    chunk = _divisor_at_most(local_len, key_chunk_size)

    def per_device(q, k, v, q_index, kv_mask):
        first_slot = lax.axis_index("sp") * local_len  # global slot of my local slot 0
        acc, m, l = _partial_attention(q, k, v, q_index, kv_mask, first_slot, scale, chunk)
        m_all = lax.pmax(m, "sp")
        correction = jnp.exp(m - m_all)  # 0 on devices whose slots were all masked
        acc = lax.psum(acc * correction[..., None], "sp")
        l = lax.psum(l * correction, "sp")
        return _normalise(acc, l, q.dtype)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(QUERY_SPEC, CACHE_SPEC, CACHE_SPEC, PS(), MASK_SPEC),
                            out_specs=QUERY_SPEC, check_vma=False)
    return sharded(q, k_cache, v_cache, q_index, kv_mask)


def _divisor_at_most(n, limit):
    """Largest divisor of n that is <= limit (n itself when n <= limit)."""
    for chunk in range(min(n, max(int(limit), 1)), 0, -1):
        if n % chunk == 0:
            return chunk
    return 1


def _partial_attention(q, k, v, q_index, kv_mask, first_slot, scale, chunk):
    """Online-softmax statistics of q against local slots: (acc [b,hkv,g,c,d], m [b,hkv,g,c], l)."""
    b, c, h, d = q.shape
    length, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    q5 = q.reshape(b, c, kv_heads, g, d)  # grouped heads share their k/v head
    q_slots = q_index + jnp.arange(c, dtype=jnp.int32)  # [c]

    def attend_chunk(carry, j):
        acc, m, l = carry
        start = j * chunk
        k_j = lax.dynamic_slice_in_dim(k, start, chunk, axis=1)  # [b, chunk, hkv, d]
        v_j = lax.dynamic_slice_in_dim(v, start, chunk, axis=1)
        slots = first_slot + start + jnp.arange(chunk, dtype=jnp.int32)  # [chunk] global slot ids
        allowed = lax.dynamic_slice_in_dim(kv_mask, start, chunk, axis=1)[:, None, :] & (
            slots[None, None, :] <= q_slots[None, :, None])  # [b, c, chunk]
        allowed = allowed[:, None, None]  # [b, 1, 1, c, chunk]
        s = jnp.einsum("bchgd,bkhd->bhgck", q5, k_j, preferred_element_type=jnp.float32) * scale
        s = jnp.where(allowed, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bhgck,bkhd->bhgcd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
        return (alpha[..., None] * acc + pv, m_new, alpha * l + p.sum(axis=-1)), None

    init = (jnp.zeros((b, kv_heads, g, c, d), jnp.float32), jnp.full((b, kv_heads, g, c), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv_heads, g, c), jnp.float32))
    n_chunks = length // chunk
    if n_chunks == 1:
        return attend_chunk(init, 0)[0]
    return lax.scan(attend_chunk, init, jnp.arange(n_chunks))[0]


def _normalise(acc, l, dtype):
    """acc / l as [b, c, heads, d]; rows with no allowed slot (l == 0) give 0."""
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [b, hkv, g, c, d]
    b, kv_heads, g, c, d = out.shape
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, c, kv_heads * g, d).astype(dtype)
