"""Ring attention over the 'sp' axis of 8 virtual devices, and the sequence layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from tests.attention_utils import (Case, assert_matches_reference, make_inputs, output_and_grads,
                             reference_output_and_grads, relative_error, sample_cases)
from lwm.ops import attention
from lwm.ops.layout import LAYOUTS, from_layout, global_index, to_layout
from lwm.ops.ring import causal_work


def make_mesh(sp, tp=1, batch_shards=1):
    """A ('dp', 'fsdp', 'tp', 'sp') mesh on the first batch_shards*tp*sp virtual devices."""
    devices = np.array(jax.devices()[: batch_shards * tp * sp])
    return Mesh(devices.reshape(1, batch_shards, tp, sp), ("dp", "fsdp", "tp", "sp"))


def ring_cases():
    """(case, sp, layout, tp): a seeded sample with every sp in {1, 2, 4, 8} and every layout."""
    plan = [(1, "contiguous"), (2, "zigzag"), (2, "striped"), (4, "contiguous"), (4, "zigzag"), (4, "striped"),
            (8, "contiguous"), (8, "zigzag"), (8, "striped")]
    out = []
    for i, (sp, layout) in enumerate(plan):
        case = sample_cases(seed=100 + i, count=1, seqs=(64, 128, 256), min_chunk=8, sp=sp)[0]
        out.append((case, sp, layout, 1))
    return out


def run_ring(case, sp, layout, tp=1, impl="blockwise", sp_attention="ring"):
    q, k, v, seg, d_out = make_inputs(case)
    mesh = make_mesh(sp, tp, batch_shards=case.batch if case.batch * tp * sp <= 8 else 1)
    stored = [None if x is None else to_layout(x, layout, sp) for x in (q, k, v, seg, d_out)]
    q_l, k_l, v_l, seg_l, d_out_l = stored
    fn = lambda q, k, v: attention(q, k, v, seg_l, causal=case.causal, impl=impl, mesh=mesh, layout=layout,
                                   query_chunk_size=case.q_chunk, key_chunk_size=case.kv_chunk,
                                   sp_attention=sp_attention)
    out, grads = output_and_grads(fn, q_l, k_l, v_l, d_out_l)
    # back to natural order, where the reference lives
    return from_layout(out, layout, sp), [from_layout(g, layout, sp) for g in grads], (q, k, v, seg, d_out)


@pytest.mark.parametrize("sp_attention", ["ring", "all_gather"])
@pytest.mark.parametrize("case, sp, layout, tp", ring_cases(), ids=lambda x: str(x))
def test_ring_matches_reference(case, sp, layout, tp, sp_attention):
    out, grads, (q, k, v, seg, d_out) = run_ring(case, sp, layout, tp, sp_attention=sp_attention)
    ref = reference_output_and_grads(q, k, v, seg, d_out, case.causal)
    assert_matches_reference(out, grads, *ref, f"{case} sp={sp} {layout}")


@pytest.mark.parametrize("sp_attention", ["ring", "all_gather"])
def test_ring_with_tensor_parallel_heads_and_sharded_inputs(sp_attention):
    """tp=2 splits heads; inputs arrive sharded PS(('dp','fsdp'), 'sp', 'tp', None) under jit."""
    case = Case(batch=2, seq=128, kv_heads=2, group=2, head_dim=32, q_chunk=16, kv_chunk=32, causal=True,
                segments=3, left_pad=5, seed=11)
    q, k, v, seg, d_out = make_inputs(case)
    mesh = make_mesh(sp=2, tp=2, batch_shards=2)
    act = NamedSharding(mesh, PS(("dp", "fsdp"), "sp", "tp", None))
    q_l, k_l, v_l, d_l = (jax.device_put(to_layout(x, "zigzag", 2), act) for x in (q, k, v, d_out))
    seg_l = jax.device_put(to_layout(seg, "zigzag", 2), NamedSharding(mesh, PS(("dp", "fsdp"), "sp")))
    fn = lambda q, k, v: attention(q, k, v, seg_l, mesh=mesh, layout="zigzag", query_chunk_size=16, key_chunk_size=32,
                                   sp_attention=sp_attention)
    out, grads = output_and_grads(fn, q_l, k_l, v_l, d_l)
    ref = reference_output_and_grads(q, k, v, seg, d_out, True)
    assert_matches_reference(from_layout(out, "zigzag", 2), [from_layout(g, "zigzag", 2) for g in grads], *ref)


def test_layouts_give_the_contiguous_result():
    case = Case(batch=1, seq=128, kv_heads=2, group=2, head_dim=16, q_chunk=8, kv_chunk=8, causal=True,
                segments=2, left_pad=0, seed=12)
    contiguous, _, _ = run_ring(case, 4, "contiguous")
    for layout in ("zigzag", "striped"):
        out, _, _ = run_ring(case, 4, layout)
        assert relative_error(out, np.asarray(contiguous, np.float64)) <= 1e-6


def test_dense_impl_follows_the_layout_order():
    case = Case(batch=1, seq=64, kv_heads=1, group=2, head_dim=16, q_chunk=8, kv_chunk=8, causal=True,
                segments=2, left_pad=3, seed=13)
    q, k, v, seg, d_out = make_inputs(case)
    mesh = make_mesh(sp=4)
    stored = [to_layout(x, "striped", 4) for x in (q, k, v, seg)]
    out = jax.jit(lambda q, k, v, s: attention(q, k, v, s, impl="dense", mesh=mesh, layout="striped"))(*stored)
    ref_out, _ = reference_output_and_grads(q, k, v, seg, d_out, True)
    assert relative_error(from_layout(out, "striped", 4), ref_out) <= 1e-5


def test_ring_skips_blocks_after_the_diagonal():
    """With the contiguous layout, NaN keys on the last device never reach earlier devices' queries."""
    rng = np.random.default_rng(14)
    q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
    v[:, 48:] = np.nan
    out = jax.jit(lambda q, k, v: attention(q, k, v, mesh=make_mesh(4), query_chunk_size=16))(q, k, v)
    assert np.isfinite(np.asarray(out[:, :48])).all() and np.isnan(np.asarray(out[:, 48:])).all()


def test_load_balanced_layouts_shorten_the_causal_ring():
    contiguous = causal_work("contiguous", 1024, 8, 32)
    np.testing.assert_array_equal(contiguous[:, 0], [10] + [0] * 7)  # device 0 idles after step 0
    assert causal_work("zigzag", 1024, 8, 32).sum() == contiguous.sum()  # same work, spread evenly
    for layout in ("zigzag", "striped"):  # a step lasts as long as its busiest device
        assert causal_work(layout, 1024, 8, 32).max(axis=1).sum() < 0.7 * contiguous.max(axis=1).sum()
    np.testing.assert_array_equal(causal_work("zigzag", 16, 2, 4), [[3, 3], [2, 2]])


# ----------------------------------------------------------------------------- layouts


def test_layout_worked_example():
    np.testing.assert_array_equal(global_index("contiguous", 8, 4), np.arange(8))
    np.testing.assert_array_equal(global_index("zigzag", 8, 4), [0, 7, 1, 6, 2, 5, 3, 4])
    np.testing.assert_array_equal(global_index("striped", 8, 4), [0, 4, 1, 5, 2, 6, 3, 7])
    for layout in LAYOUTS:
        np.testing.assert_array_equal(global_index(layout, 8, 1), np.arange(8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_round_trip_numpy_and_jax(layout):
    x = np.arange(2 * 48 * 3).reshape(2, 48, 3)
    stored = to_layout(x, layout, 4)
    assert isinstance(stored, np.ndarray)
    np.testing.assert_array_equal(stored[:, :, 0] // 3 % 48, np.broadcast_to(global_index(layout, 48, 4), (2, 48)))
    np.testing.assert_array_equal(from_layout(stored, layout, 4), x)
    stored_jax = to_layout(jnp.asarray(x), layout, 4, axis=1)
    assert isinstance(stored_jax, jax.Array)
    np.testing.assert_array_equal(stored_jax, stored)
    np.testing.assert_array_equal(from_layout(stored_jax, layout, 4), x)
    np.testing.assert_array_equal(to_layout(x[0].T, layout, 4, axis=1), stored[0].T)


def test_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match="unknown layout 'spiral'"):
        global_index("spiral", 8, 2)
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by sp=4"):
        global_index("contiguous", 10, 4)
    with pytest.raises(ValueError, match=r"zigzag layout needs the sequence length 12 divisible by 2\*sp=8"):
        global_index("zigzag", 12, 4)


def test_ring_rejects_bad_sharding():
    x = jnp.zeros((2, 64, 4, 16))
    with pytest.raises(ValueError, match="query_chunk_size=12 does not divide the .*length 16"):
        attention(x, x, x, mesh=make_mesh(4), query_chunk_size=12)
    with pytest.raises(ValueError, match="query heads 3 not divisible by tp=2"):
        y = jnp.zeros((2, 64, 3, 16))
        attention(y, y, y, mesh=make_mesh(2, tp=2))
    with pytest.raises(ValueError, match="sequence length 60 is not divisible by sp=8"):
        z = jnp.zeros((1, 60, 2, 16))
        attention(z, z, z, mesh=make_mesh(8))


def test_zigzag_chunks_stop_at_the_half_shard():
    """A chunk larger than a zigzag half-shard is reduced to it, so causal skipping still works:
    NaN keys in the last quarter of the sequence never reach the first quarter's queries."""
    from lwm.ops.layout import chunk_limit

    assert chunk_limit("zigzag", 64, 2) == 16 and chunk_limit("striped", 64, 2) == 32
    assert chunk_limit("zigzag", 64, 1) == 64
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
    v[:, 48:] = np.nan
    stored = [to_layout(x, "zigzag", 2) for x in (q, k, v)]
    fn = jax.jit(lambda q, k, v: attention(q, k, v, mesh=make_mesh(2), layout="zigzag", query_chunk_size=1024,
                                           key_chunk_size=1024))
    out = from_layout(np.asarray(fn(*stored)), "zigzag", 2)
    assert np.isfinite(out[:, :48]).all() and np.isnan(out[:, 48:]).all()


def test_auto_gathers_kv_only_while_it_fits():
    """sp_attention='auto' all-gathers one layer's k, v while they fit GATHER_KV_MAX_BYTES per
    device and passes blocks around the ring beyond that; both give the reference result."""
    from lwm.ops import ring

    case = Case(batch=1, seq=128, kv_heads=2, group=1, head_dim=16, q_chunk=8, kv_chunk=8, causal=True,
                segments=1, left_pad=0, seed=3)
    q, k, v, seg, d_out = make_inputs(case)
    mesh = make_mesh(sp=4)
    assert ring.gather_kv_fits(k, mesh)
    hlo = jax.jit(lambda q, k, v: attention(q, k, v, mesh=mesh, query_chunk_size=8, key_chunk_size=8)).lower(
        q, k, v).compile().as_text()
    assert "all-gather" in hlo and "collective-permute" not in hlo
    original = ring.GATHER_KV_MAX_BYTES
    try:
        ring.GATHER_KV_MAX_BYTES = 2 * 128 * 2 * 16 * 4 - 1  # one byte short of k and v
        assert not ring.gather_kv_fits(k, mesh)
        fn = lambda q, k, v: attention(q, k, v, mesh=mesh, query_chunk_size=8, key_chunk_size=8)
        hlo = jax.jit(fn).lower(q, k, v).compile().as_text()
        assert "collective-permute" in hlo
        out, grads = output_and_grads(fn, q, k, v, d_out)
    finally:
        ring.GATHER_KV_MAX_BYTES = original
    assert_matches_reference(out, grads, *reference_output_and_grads(q, k, v, None, d_out, True))
