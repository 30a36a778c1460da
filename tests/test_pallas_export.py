"""Every Pallas path lowers for TPU (Mosaic) and CUDA (Triton) from this CPU host, via jax.export.

No GPU or TPU is needed: `jax.export` lowers a jitted function for a named platform, which runs
Pallas' Mosaic TPU / Triton lowering of every kernel (block shapes, every primitive in the
bodies). Nothing is executed and the final Triton / Mosaic compilation happens only on a device
(`test_pallas_flash.py::test_flash_compiled_on_accelerator`), so this catches lowering
regressions for hardware we do not have, not device-compile or numeric ones.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/test_pallas_export.py

Matrix: {flash kernel alone, inside the sp ring, inside the gathered-k/v ring} x {tpu, cuda} x
head_dim {64, 128} x {bfloat16, float32}, forward and backward (vjp) in one export, with the
impl and block sizes `attention_impl="auto"` picks on that platform (default chunk sizes 1024).
The cached decode path (`lwm.ops.decode`) is pure jnp, with no Pallas kernel to lower.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as PS

from lwm.mesh import build_mesh
from lwm.ops import attention, resolve_impl
from lwm.ops.pallas_flash import BlockSizes, flash_attention

# the Triton custom call is not on jax.export's list of stable targets; Mosaic's tpu_custom_call is
TRITON = "__gpu$xla.gpu.triton"
DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON)]
KERNEL_TARGET = {"tpu": "tpu_custom_call", "cuda": TRITON}
KERNELS = ("flash_fwd", "flash_dq", "flash_dkv")
HEADS, KV_HEADS = 4, 2  # GQA group of 2; tp=2 leaves 2 and 1 per device

# path -> (sequence length, mesh "dp,fsdp,tp,sp" or None, layout, sp_attention). The ring lengths
# give a local length of 512 on sp=4; zigzag caps chunks at its half-shard (256), so the two ring
# paths get different TPU blocks (256 / 512); GPU blocks are 128 x 64 everywhere.
PATHS = {
    "flash": (1024, None, "contiguous", "ring"),
    "ring": (2048, "1,1,2,4", "zigzag", "ring"),
    "all_gather": (2048, "1,1,2,4", "contiguous", "all_gather"),
}


def export_fwd_bwd(path, platforms, head_dim, dtype, causal=True, segments=True):
    """jax.export of attention's forward and vjp for `platforms`; returns the Exported."""
    seq, mesh_dim, layout, sp_attention = PATHS[path]
    mesh = None if mesh_dim is None else build_mesh(mesh_dim)
    impl = resolve_impl("auto", "gpu" if platforms[0] == "cuda" else platforms[0])
    qkv_sharding = seg_sharding = None
    if mesh is not None:
        qkv_sharding = NamedSharding(mesh, PS(("dp", "fsdp"), "sp", "tp", None))
        seg_sharding = NamedSharding(mesh, PS(("dp", "fsdp"), "sp"))
    args = [jax.ShapeDtypeStruct((2 if mesh is None else 1, seq, h, head_dim), dtype, sharding=qkv_sharding)
            for h in (HEADS, KV_HEADS, KV_HEADS)]
    args.append(jax.ShapeDtypeStruct(args[0].shape[:2], jnp.int32, sharding=seg_sharding))

    def fwd_bwd(q, k, v, segment_ids):
        def attend(q, k, v):
            return attention(q, k, v, segment_ids if segments else None, causal=causal, impl=impl, mesh=mesh,
                             layout=layout, sp_attention=sp_attention)

        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(out)

    return export.export(jax.jit(fwd_bwd), platforms=platforms, disabled_checks=DISABLED_CHECKS)(*args)


def assert_kernels(module, platform):
    assert module.count(KERNEL_TARGET[platform]) >= len(KERNELS), f"no {platform} kernel calls"
    for kernel in KERNELS:
        assert f'name = "{kernel}"' in module, f"{kernel} missing from the {platform} lowering"
    assert "mosaic_gpu" not in module  # GPU goes through Triton, never Pallas' Mosaic GPU default


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("path", list(PATHS))
def test_pallas_paths_lower(path, platform, head_dim, dtype):
    exported = export_fwd_bwd(path, (platform,), head_dim, dtype)
    assert exported.platforms == (platform,)
    assert exported.nr_devices == (1 if PATHS[path][1] is None else 8)
    assert_kernels(exported.mlir_module(), platform)


# ids "to-tpu": conftest skips tests whose keywords include a bare "tpu" / "gpu"
@pytest.mark.parametrize("platform", ["tpu", "cuda"], ids=lambda p: f"to-{p}")
def test_unmasked_kernels_lower(platform):
    """causal=False without segment ids: the kernel bodies with no mask at all."""
    assert_kernels(export_fwd_bwd("flash", (platform,), 128, jnp.bfloat16, causal=False, segments=False)
                   .mlir_module(), platform)


def test_one_trace_lowers_for_every_platform():
    """The platform is chosen at lowering: one trace of the ring lowers to Mosaic, Triton and
    interpret mode. (A single multi-platform export is not possible: JAX 0.10 lowers each kept
    branch of `lax.platform_dependent` for every platform of the module, and a Pallas call
    lowers for one backend only.)"""
    mesh = build_mesh(PATHS["ring"][1])
    args = [jax.ShapeDtypeStruct((1, 1024, h, 64), jnp.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS)]

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl="pallas", mesh=mesh, layout="zigzag",
                                                     sp_attention="ring"), q, k, v)
        return out, vjp(out)

    traced = jax.jit(fwd_bwd).trace(*args)
    for platform in ("tpu", "cuda"):
        assert_kernels(traced.lower(lowering_platforms=(platform,)).as_text(), platform)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "custom_call @tpu_custom_call" not in cpu and TRITON not in cpu


def test_auto_block_sizes_of_the_matrix():
    """The block sizes the kernels get above (per platform, from the ring's local lengths)."""
    assert BlockSizes.for_lengths(1024, 1024, platform="tpu").block_k == 512
    assert BlockSizes.for_lengths(512, 512, 256, 256, platform="tpu").block_k == 256  # zigzag half-shard
    assert BlockSizes.for_lengths(512, 2048, 512, 512, platform="tpu").block_k == 512  # gathered k/v
    gpu = BlockSizes.for_lengths(512, 2048, 512, 512, platform="gpu")
    assert (gpu.block_q, gpu.block_k) == (128, 64)


def test_unbuildable_variant_fails_only_when_lowered_for_its_platform():
    """40 tokens: no power-of-two block >= 16 divides 40, so there is no Triton variant; the call
    still runs on CPU and exports for TPU (full-length blocks), and a CUDA export says why not."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 64)), jnp.float32) for _ in range(3))
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v))
    assert np.isfinite(np.asarray(fn(q, k, v))).all()
    args = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (q, k, v)]
    export.export(fn, platforms=["tpu"])(*args)
    with pytest.raises(ValueError, match="cannot lower for gpu: no legal gpu block size <= 128 divides the query"):
        export.export(fn, platforms=["cuda"], disabled_checks=DISABLED_CHECKS)(*args)


def test_interpret_false_has_no_cpu_lowering():
    fn = jax.jit(lambda q: flash_attention(q, q, q, interpret=False))
    with pytest.raises(ValueError, match="interpret=False: Pallas compiles only for GPU and TPU"):
        fn.lower(jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32))
