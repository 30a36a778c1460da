"""Blockwise attention and the `lwm.ops.attention` dispatcher against the float64 dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention_utils import (assert_matches_reference, make_inputs, output_and_grads, reference_output_and_grads,
                             relative_error, sample_cases)
from lwm.ops import attention, resolve_impl
from lwm.ops.layout import from_layout, to_layout
from lwm.ops.blockwise import blockwise_attention
from lwm.ops.common import FULL, MASKED, SKIP, chunk_pair_kinds, merge_partials

BLOCKWISE_CASES = sample_cases(seed=1, count=8)


@pytest.mark.parametrize("case", BLOCKWISE_CASES, ids=str)
def test_blockwise_matches_reference(case):
    q, k, v, seg, d_out = make_inputs(case)
    fn = lambda q, k, v: blockwise_attention(q, k, v, seg, causal=case.causal, query_chunk_size=case.q_chunk,
                                             key_chunk_size=case.kv_chunk)
    out, grads = output_and_grads(fn, q, k, v, d_out)
    assert_matches_reference(out, grads, *reference_output_and_grads(q, k, v, seg, d_out, case.causal), str(case))


def test_blockwise_custom_scale_and_positions():
    """A softmax scale and a permuted token order (positions) are both honoured."""
    rng = np.random.default_rng(7)
    q, k, v, d_out = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(4))
    positions = rng.permutation(64).astype(np.int32)
    fn = lambda q, k, v: blockwise_attention(q, k, v, causal=True, query_chunk_size=16, key_chunk_size=32,
                                             softmax_scale=0.3, positions=positions)
    out, grads = output_and_grads(fn, q, k, v, d_out)
    ref = reference_output_and_grads(q, k, v, None, d_out, True, positions=positions, softmax_scale=0.3)
    assert_matches_reference(out, grads, *ref)


def test_blockwise_skips_chunks_above_the_causal_diagonal():
    """NaNs in the last key chunk can only stay out of earlier queries if that chunk is skipped
    (a computed-then-masked chunk would give 0 * NaN = NaN in the p @ v product)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
    v_nan = v.copy()
    v_nan[:, 48:] = np.nan
    fn = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, causal=True, query_chunk_size=16, key_chunk_size=16))
    out, clean = fn(q, k, v_nan), fn(q, k, v)
    assert np.isfinite(np.asarray(out[:, :48])).all()
    np.testing.assert_array_equal(np.asarray(out[:, :48]), np.asarray(clean[:, :48]))
    assert np.isnan(np.asarray(out[:, 48:])).all()


def test_blockwise_skips_chunks_of_other_segments():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 64, 2, 16)).astype(np.float32) for _ in range(3))
    seg = np.repeat(np.array([[1, 2], [1, 2]], np.int32), 32, axis=1)  # two examples of 32 tokens
    v_nan = v.copy()
    v_nan[:, 32:] = np.nan
    out = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, causal=False, query_chunk_size=16,
                                                      key_chunk_size=16))(q, k, v_nan)
    assert np.isfinite(np.asarray(out[:, :32])).all()


def test_chunk_pair_kinds_worked_example():
    pos = jnp.arange(4)
    np.testing.assert_array_equal(chunk_pair_kinds(None, None, pos, pos, True, 2, 2), [[MASKED, SKIP], [FULL, MASKED]])
    seg = jnp.array([[1, 1, 2, 2]])
    np.testing.assert_array_equal(chunk_pair_kinds(seg, seg, pos, pos, False, 2, 2), [[FULL, SKIP], [SKIP, FULL]])
    seg = jnp.array([[1, 1, 1, 2], [1, 1, 2, 2]])  # a pair is FULL only if it is FULL in every row
    np.testing.assert_array_equal(chunk_pair_kinds(seg, seg, pos, pos, False, 2, 2), [[FULL, MASKED], [MASKED, MASKED]])
    np.testing.assert_array_equal(chunk_pair_kinds(None, None, pos, pos, False, 2, 2), [[FULL, FULL], [FULL, FULL]])


def test_merge_partials_equals_attention_over_the_union():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 32, 2, 16)).astype(np.float32) for _ in range(3))
    from lwm.ops.blockwise import blockwise_block_fwd

    @jax.jit
    def merged_and_whole(q, k, v):
        pos = jnp.arange(32)
        kw = dict(causal=False, scale=0.25, query_chunk_size=16, key_chunk_size=16)
        first = blockwise_block_fwd(q, k[:, :16], v[:, :16], None, None, pos, pos[:16], **kw)
        second = blockwise_block_fwd(q, k[:, 16:], v[:, 16:], None, None, pos, pos[16:], **kw)
        empty = (jnp.zeros_like(first[0]), jnp.full_like(first[1], -jnp.inf))
        merged = merge_partials(*merge_partials(*empty, *first), *second)
        return merged, blockwise_block_fwd(q, k, v, None, None, pos, pos, **kw)

    (merged, merged_lse), (whole, whole_lse) = merged_and_whole(q, k, v)
    np.testing.assert_allclose(merged, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged_lse, whole_lse, rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_dispatcher_without_mesh(impl):
    case = BLOCKWISE_CASES[0]
    q, k, v, seg, d_out = make_inputs(case)
    out = attention(q, k, v, seg, causal=case.causal, impl=impl, query_chunk_size=case.q_chunk,
                    key_chunk_size=case.kv_chunk)
    ref_out, _ = reference_output_and_grads(q, k, v, seg, d_out, case.causal)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    assert relative_error(out, ref_out) <= 1e-5


def test_auto_impl_follows_platform():
    assert resolve_impl("auto", "cpu") == "blockwise"
    assert resolve_impl("auto", "gpu") == "pallas"
    assert resolve_impl("auto", "tpu") == "pallas"
    assert resolve_impl("dense", "tpu") == "dense"


def test_chunk_larger_than_sequence_is_reduced():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 48, 2, 16)).astype(np.float32) for _ in range(3))
    big = attention(q, k, v, impl="blockwise", query_chunk_size=1024, key_chunk_size=1024)
    dense = attention(q, k, v, impl="dense")
    assert relative_error(big, np.asarray(dense, np.float64)) <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="flash"), "unknown attention impl"),
    (dict(layout="spiral"), "unknown layout"),
    (dict(query_chunk_size=24), "query_chunk_size=24 does not divide"),
    (dict(key_chunk_size=0), "key_chunk_size=0 must be positive"),
])
def test_dispatcher_rejects_bad_arguments(kwargs, message):
    x = jnp.zeros((1, 64, 4, 16))
    with pytest.raises(ValueError, match=message):
        attention(x, x[:, :, :2], x[:, :, :2], **kwargs)


def test_dispatcher_rejects_bad_shapes():
    x = jnp.zeros((1, 64, 4, 16))
    with pytest.raises(ValueError, match="query heads 4 not divisible by key/value heads 3"):
        attention(x, jnp.zeros((1, 64, 3, 16)), jnp.zeros((1, 64, 3, 16)))
    with pytest.raises(ValueError, match="equal lengths"):
        attention(x, x[:, :32], x[:, :32])
    with pytest.raises(ValueError, match=r"segment_ids shape \(1, 32\)"):
        attention(x, x, x, jnp.zeros((1, 32), jnp.int32))


def test_remat_and_flax_scan():
    """attention works under jax.checkpoint and inside flax nn.scan with the same gradients."""
    import flax.linen as nn

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 32, 2, 16)).astype(np.float32)
    seg = np.repeat(np.array([[1, 2]], np.int32), 16, axis=1)
    attend = lambda q: attention(q, q, q, seg, impl="blockwise", query_chunk_size=8, key_chunk_size=8)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return attend(h) + h, None

    stack = nn.scan(nn.remat(Layer), variable_broadcast="params", split_rngs={"params": False}, length=2)
    loss_scan = lambda h: jnp.sum(stack().apply({}, h, None)[0] ** 2)
    loss_remat = lambda h: jnp.sum((jax.checkpoint(lambda h: attend(attend(h) + h) + attend(h) + h)(h)) ** 2)
    loss_plain = lambda h: jnp.sum((attend(attend(h) + h) + attend(h) + h) ** 2)
    g_plain = np.asarray(jax.jit(jax.grad(loss_plain))(x), np.float64)
    # fp32 vs fp32 with a different op order: compare at the scale of the gradient (max norm)
    assert relative_error(jax.jit(jax.grad(loss_remat))(x), g_plain) <= 1e-5
    assert relative_error(jax.jit(jax.grad(loss_scan))(x), g_plain) <= 1e-5


def test_bfloat16_inputs_through_every_kernel():
    """bf16 q/k/v: same dtype out, error at bf16 resolution (accumulation is float32 inside)."""
    from tests.test_ring import make_mesh

    case = BLOCKWISE_CASES[1]
    q, k, v, seg, d_out = make_inputs(case)
    ref_out, ref_grads = reference_output_and_grads(q, k, v, seg, d_out, case.causal)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, d_out)]
    local = case.seq // 2
    for kwargs in (dict(impl="blockwise"), dict(impl="pallas"), dict(impl="blockwise", mesh=make_mesh(2), layout="zigzag")):
        layout, sp = kwargs.get("layout", "contiguous"), 2 if "mesh" in kwargs else 1
        stored = [to_layout(x, layout, sp) for x in bf16] + [None if seg is None else to_layout(seg, layout, sp)]
        fn = lambda q, k, v: attention(q, k, v, stored[4], causal=case.causal, query_chunk_size=min(case.q_chunk, local),
                                       key_chunk_size=min(case.kv_chunk, local), **kwargs)
        out, grads = output_and_grads(fn, *stored[:4])
        assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
        out = from_layout(out.astype(np.float32), layout, sp)
        assert relative_error(out, ref_out) <= 2e-2, kwargs
        for g, rg in zip(grads, ref_grads):
            assert relative_error(from_layout(g.astype(np.float32), layout, sp), rg) <= 5e-2, kwargs
