"""Decode attention against a KV cache, unsharded and sharded over 'sp', vs a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh

from tests.attention_utils import relative_error
from lwm.ops import attention, cached_attention


def make_mesh(sp, batch_shards=1):
    devices = np.array(jax.devices()[: batch_shards * sp])
    return Mesh(devices.reshape(1, batch_shards, 1, sp), ("dp", "fsdp", "tp", "sp"))


def numpy_cached_attention(q, k, v, q_index, kv_mask, scale=None):
    """float64: query i sees slot j iff kv_mask[b, j] and j <= q_index + i; rows with no slot give 0."""
    b, c, h, d = q.shape
    kv_heads = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.astype(np.float64).reshape(b, c, kv_heads, h // kv_heads, d)
    s = np.einsum("bchgd,bkhd->bhgck", qg, k.astype(np.float64)) * scale
    allowed = kv_mask[:, None, :] & (np.arange(k.shape[1])[None, None, :] <= (q_index + np.arange(c))[None, :, None])
    s = np.where(allowed[:, None, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.where(allowed[:, None, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    return np.einsum("bhgck,bkhd->bchgd", p, v.astype(np.float64)).reshape(b, c, h, d)


def random_cache(seed, batch, new, length, heads, kv_heads, head_dim, q_index, pad):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, new, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
    kv_mask = np.zeros((batch, length), bool)
    kv_mask[:, : q_index + new] = True  # written slots
    kv_mask[0, :pad] = False  # left padding of row 0
    return q, k, v, kv_mask


CASES = [  # (batch, new tokens, cache length, heads, kv_heads, head_dim, q_index, pad, sp, key chunk)
    (1, 1, 64, 4, 4, 16, 40, 0, 2, 8),
    (2, 1, 128, 8, 2, 32, 100, 9, 4, 16),
    (2, 4, 128, 4, 1, 64, 60, 3, 8, 4096),
    (1, 3, 256, 6, 3, 16, 250, 17, 8, 8),
]


@pytest.mark.parametrize("batch, new, length, heads, kv_heads, head_dim, q_index, pad, sp, chunk", CASES)
def test_sharded_and_unsharded_decode_match_reference(batch, new, length, heads, kv_heads, head_dim, q_index, pad,
                                                      sp, chunk):
    q, k, v, kv_mask = random_cache(sp, batch, new, length, heads, kv_heads, head_dim, q_index, pad)
    want = numpy_cached_attention(q, k, v, q_index, kv_mask)
    plain = jax.jit(lambda *a: cached_attention(*a, key_chunk_size=chunk))(q, k, v, q_index, kv_mask)
    mesh = make_mesh(sp, batch_shards=batch if batch * sp <= 8 else 1)
    sharded = jax.jit(lambda *a: cached_attention(*a, mesh=mesh, key_chunk_size=chunk))(q, k, v, q_index, kv_mask)
    assert relative_error(plain, want) <= 1e-5
    assert relative_error(sharded, want) <= 1e-5
    np.testing.assert_allclose(sharded, plain, rtol=0, atol=1e-5 * np.abs(want).max())


def test_traced_query_index_inside_a_loop():
    """Token-by-token decoding with q_index carried by lax.fori_loop over an sp-sharded cache."""
    q, k, v, kv_mask = random_cache(5, 1, 6, 64, 4, 2, 16, 20, 2)
    kv_mask[:, 20:26] = True
    mesh = make_mesh(4)

    @jax.jit
    def decode_all(q, k, v, kv_mask):
        def step(i, out):
            token = lax.dynamic_slice_in_dim(q, i, 1, axis=1)  # [b, 1, h, d]
            o = cached_attention(token, k, v, 20 + i, kv_mask, mesh=mesh, key_chunk_size=8)
            return lax.dynamic_update_slice_in_dim(out, o, i, axis=1)

        return lax.fori_loop(0, q.shape[1], step, jnp.zeros_like(q))

    got = decode_all(q, k, v, kv_mask)
    assert relative_error(got, numpy_cached_attention(q, k, v, 20, kv_mask)) <= 1e-5


def test_query_with_no_allowed_slot_returns_zero():
    q, k, v, kv_mask = random_cache(6, 2, 2, 32, 2, 2, 16, 10, 0)
    kv_mask[1] = False  # row 1: nothing written
    kv_mask[0, :11] = False  # row 0: query 0 (slot 10) sees nothing, query 1 sees slot 11
    for mesh in (None, make_mesh(2)):
        out = np.asarray(jax.jit(lambda *a: cached_attention(*a, mesh=mesh))(q, k, v, 10, kv_mask))
        assert np.all(out[1] == 0) and np.all(out[0, 0] == 0)
        np.testing.assert_allclose(out[0, 1], np.broadcast_to(v[0, 11], (2, 16)), rtol=1e-6)


def test_prefill_matches_self_attention_on_real_tokens():
    """A whole left-padded prompt as one chunk gives the same outputs as causal self-attention
    with padding as segment 0 (on the real tokens; padded queries differ by design)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 64, 4, 16)).astype(np.float32) for _ in range(3))
    pad = np.array([0, 13])
    real = np.arange(64)[None, :] >= pad[:, None]
    mesh = make_mesh(4)
    prefill = jax.jit(lambda *a: cached_attention(*a, mesh=mesh, key_chunk_size=8))(q, k, v, 0, real)
    full = jax.jit(lambda *a: attention(*a, impl="dense"))(q, k, v, real.astype(np.int32))
    np.testing.assert_allclose(np.asarray(prefill)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)


def test_decode_rejects_bad_shapes():
    q, k, v, kv_mask = random_cache(8, 1, 1, 64, 4, 2, 16, 3, 0)
    with pytest.raises(ValueError, match=r"kv_mask shape \(1, 32\)"):
        cached_attention(q, k, v, 3, kv_mask[:, :32])
    with pytest.raises(ValueError, match="query heads 4 not divisible by key/value heads 3"):
        k3 = np.zeros((1, 64, 3, 16), np.float32)
        cached_attention(q, k3, k3, 3, kv_mask)
    with pytest.raises(ValueError, match="cache length 60 is not divisible by sp=8"):
        k60 = np.zeros((1, 60, 2, 16), np.float32)
        cached_attention(q, k60, k60, 3, kv_mask[:, :60], mesh=make_mesh(8))
