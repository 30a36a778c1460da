"""The Pallas flash kernel (interpret mode on CPU; compiled on GPU/TPU when present) vs float64 dense."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention_utils import (Case, assert_matches_reference, make_inputs, output_and_grads,
                                   reference_output_and_grads, sample_cases)
from tests.test_ring import run_ring
from lwm.ops import attention
from lwm.ops.pallas_flash import BlockSizes, flash_attention

PALLAS_CASES = sample_cases(seed=5, count=5, seqs=(64, 128, 256))


def block_sizes_for(case):
    return BlockSizes(block_q=case.q_chunk, block_k=case.kv_chunk, block_q_dq=case.q_chunk,
                      block_k_dq=case.kv_chunk, block_q_dkv=case.q_chunk, block_k_dkv=case.kv_chunk)


@pytest.mark.parametrize("case", PALLAS_CASES, ids=str)
def test_flash_interpret_matches_reference(case):
    q, k, v, seg, d_out = make_inputs(case)
    fn = lambda q, k, v: flash_attention(q, k, v, seg, causal=case.causal, block_sizes=block_sizes_for(case),
                                         interpret=True)
    out, grads = output_and_grads(fn, q, k, v, d_out)
    assert_matches_reference(out, grads, *reference_output_and_grads(q, k, v, seg, d_out, case.causal), str(case))


def test_flash_backward_blocks_differ_from_forward_blocks():
    case = Case(batch=1, seq=128, kv_heads=2, group=4, head_dim=16, q_chunk=32, kv_chunk=64, causal=True,
                segments=3, left_pad=7, seed=21)
    q, k, v, seg, d_out = make_inputs(case)
    sizes = BlockSizes(block_q=32, block_k=64, block_q_dq=64, block_k_dq=16, block_q_dkv=16, block_k_dkv=128)
    fn = lambda q, k, v: flash_attention(q, k, v, seg, block_sizes=sizes, interpret=True)
    out, grads = output_and_grads(fn, q, k, v, d_out)
    assert_matches_reference(out, grads, *reference_output_and_grads(q, k, v, seg, d_out, True))


@pytest.mark.parametrize("sp, layout, sp_attention", [(2, "zigzag", "ring"), (4, "striped", "ring"),
                                                      (8, "contiguous", "ring"), (4, "zigzag", "all_gather")])
def test_ring_with_pallas_block_kernel(sp, layout, sp_attention):
    case = sample_cases(seed=30 + sp, count=1, seqs=(64, 128), min_chunk=8, sp=sp)[0]
    out, grads, (q, k, v, seg, d_out) = run_ring(case, sp, layout, impl="pallas", sp_attention=sp_attention)
    assert_matches_reference(out, grads, *reference_output_and_grads(q, k, v, seg, d_out, case.causal),
                             f"{case} sp={sp} {layout}")


def test_flash_skips_blocks_above_the_diagonal():
    rng = np.random.default_rng(22)
    q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
    v[:, 32:] = np.nan
    sizes = BlockSizes(32, 32, 32, 32, 32, 32)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, block_sizes=sizes, interpret=True))(q, k, v)
    assert np.isfinite(np.asarray(out[:, :32])).all() and np.isnan(np.asarray(out[:, 32:])).all()


def test_dispatcher_pallas_on_cpu_uses_interpret_mode():
    case = PALLAS_CASES[0]
    q, k, v, seg, d_out = make_inputs(case)
    out = jax.jit(lambda q, k, v: attention(q, k, v, seg, causal=case.causal, impl="pallas",
                                            query_chunk_size=case.q_chunk, key_chunk_size=case.kv_chunk))(q, k, v)
    ref_out, _ = reference_output_and_grads(q, k, v, seg, d_out, case.causal)
    assert np.max(np.abs(np.asarray(out) - ref_out)) <= 1e-5 * np.max(np.abs(ref_out))


def test_block_sizes_per_platform():
    gpu = BlockSizes.for_lengths(512, 512, 1024, 1024, "gpu")
    assert (gpu.block_q, gpu.block_k) == (128, 64)
    assert BlockSizes.for_lengths(96, 96, 1024, 1024, "gpu").block_q == 32  # largest power of two dividing 96
    tpu = BlockSizes.for_lengths(1024, 1024, 256, 256, "tpu")
    assert (tpu.block_q, tpu.block_k) == (256, 256)
    assert BlockSizes.for_lengths(200, 200, 1024, 1024, "tpu").block_k == 200  # full length is legal
    cpu = BlockSizes.for_lengths(96, 96, 64, 64, "cpu")
    assert (cpu.block_q, cpu.block_k) == (48, 48)
    with pytest.raises(ValueError, match="BlockSizes.block_k=48 is not legal on gpu: must be a power of two"):
        BlockSizes(64, 48, 64, 64, 64, 64).check(192, 192, "gpu")
    with pytest.raises(ValueError, match="BlockSizes.block_q=24 does not divide the query length 64"):
        BlockSizes(24, 32, 32, 32, 32, 32).check(64, 64)
    with pytest.raises(ValueError, match="BlockSizes.block_k_dkv=64 is not legal on tpu"):
        BlockSizes(128, 128, 128, 128, 128, 64).check(256, 256, "tpu")
    with pytest.raises(ValueError, match="BlockSizes.block_q=0 must be a positive int"):
        BlockSizes(block_q=0)
    with pytest.raises(ValueError, match="no legal gpu block size <= 64 divides the query length 40"):
        BlockSizes.for_lengths(40, 40, 64, 64, "gpu")


@pytest.mark.parametrize("platform, target", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(platform, target):
    """Without an accelerator: the three kernels go through Pallas' Triton (GPU) and Mosaic (TPU)
    lowering via jax.export, which checks block shapes and every primitive used in the bodies.
    (The final Triton/Mosaic compilation runs only on the device, in the marked test below.)"""
    from jax import export

    seq, heads, kv_heads, head_dim = 256, 6, 2, 64  # GQA group of 3
    sizes = BlockSizes.for_lengths(seq, seq, 128, 128, platform)
    segment_ids = jnp.ones((2, seq), jnp.int32)

    def fwd_bwd(q, k, v):
        attend = lambda q, k, v: flash_attention(q, k, v, segment_ids, block_sizes=sizes, interpret=False,
                                                 platform=platform)
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(out)

    args = [jax.ShapeDtypeStruct((2, seq, h, head_dim), jnp.bfloat16) for h in (heads, kv_heads, kv_heads)]
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    module = export.export(jax.jit(fwd_bwd), platforms=[target], disabled_checks=checks)(*args).mlir_module()
    for kernel in ("flash_fwd", "flash_dq", "flash_dkv"):
        assert f'name = "{kernel}"' in module, f"{kernel} missing from the {target} lowering"


@pytest.mark.parametrize("platform", [pytest.param("gpu", marks=pytest.mark.gpu),
                                      pytest.param("tpu", marks=pytest.mark.tpu)])
def test_flash_compiled_on_accelerator(platform):
    """The same kernels compiled by Triton (GPU) or Mosaic (TPU); runs only where one is present."""
    case = Case(batch=2, seq=512, kv_heads=2, group=2, head_dim=64, q_chunk=128, kv_chunk=128, causal=True,
                segments=3, left_pad=10, seed=23)
    q, k, v, seg, d_out = make_inputs(case)
    sizes = BlockSizes.for_lengths(case.seq, case.seq, 128, 128, platform)
    fn = lambda q, k, v: flash_attention(q, k, v, seg, block_sizes=sizes, interpret=False)
    out, grads = output_and_grads(fn, q, k, v, d_out)
    # accelerators run fp32 matmuls at reduced precision by default: compare at bf16-level tolerance
    ref_out, ref_grads = reference_output_and_grads(q, k, v, seg, d_out, True)
    assert np.max(np.abs(out - ref_out)) <= 2e-2 * np.max(np.abs(ref_out))
    for g, rg in zip(grads, ref_grads):
        assert np.max(np.abs(g - rg)) <= 5e-2 * np.max(np.abs(rg))
