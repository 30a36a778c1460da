"""Flash attention as Pallas kernels (forward, dq, dk/dv), the ring's per-step kernel on GPU/TPU.

Algorithm (Dao et al. 2022; the blockwise formulation of Liu & Abbeel 2023, arXiv:2305.19370):
one program per (batch, head, query block) holds its queries and loops over key/value blocks
with an online softmax (running max m, denominator l, numerator acc); the backward pass
recomputes the probabilities from the saved log-sum-exp in two kernels, one per (batch,
head, query block) for dq and one per (batch, kv head, key block) for dk, dv, whose inner loop
runs over the query blocks of every query head of its group (GQA without repeating k/v).
Blocks whose every pair is masked (causal, or disjoint segment ranges) are skipped with
`lax.cond`. Masks use the tokens' global positions, so ring steps and load-balanced layouts
need no special cases.

    out = flash_attention(q, k, v, segment_ids, causal=True,
                          block_sizes=BlockSizes(block_q=64, block_k=64), interpret=True)

Platforms: the same kernel bodies lower to Mosaic on TPU and to Triton on GPU (requested
explicitly: Pallas' GPU default, Mosaic GPU, needs a different kernel structure), and run on CPU
in interpret mode. The backend follows the platform the call is *lowered for*, not the host's
`jax.default_backend()`: each call stages one variant per platform under
`lax.platform_dependent` and lowering keeps only its target's branch, so one trace compiles on a
TPU, a GPU or CPU, or exports for any one of them from a CPU host (`tests/test_pallas_export.py`).
Block sizes are chosen per variant; a variant with no legal blocks for the lengths is an error
raised only when lowering for its platform.

Operands are laid out [batch, heads, seq, head_dim]; per-query vectors (positions, segment ids,
lse) as [.., seq, 1] columns and per-key vectors as [.., 1, seq] rows, so every block's last two
dims are either full or the sequence block (TPU's (8, 128) rule) and no in-kernel transpose of a
vector is needed. `BlockSizes.for_lengths` picks sizes that each platform accepts: powers of two
>= 16 on GPU (Triton), sequence blocks that are multiples of 128 (or the full length) on TPU.
Known limit: a program loads the whole key/value sequence of its head (GPU: from HBM per block;
TPU: into VMEM), so on TPU the local sequence per device must fit VMEM (use a ring over 'sp' for
long contexts).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton
from jax.extend import core as jax_core
from jax.interpreters import mlir

from lwm.ops.blockwise import output_delta
from lwm.ops.common import MASK_VALUE, check_qkv, name_residuals


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (sequence rows per block)."""
    block_q: int = 128  # forward: query rows per program
    block_k: int = 128  # forward: key rows per inner-loop step
    block_q_dq: int = 128  # dq kernel: query rows per program
    block_k_dq: int = 128  # dq kernel: key rows per inner-loop step
    block_q_dkv: int = 128  # dk/dv kernel: query rows per inner-loop step
    block_k_dkv: int = 128  # dk/dv kernel: key rows per program

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{field.name}={value!r} must be a positive int")

    def check(self, q_len: int, kv_len: int, platform: str = "cpu") -> None:
        """Raise ValueError unless every block divides its sequence and suits `platform`."""
        for name in ("block_q", "block_q_dq", "block_q_dkv"):
            _check_block(name, getattr(self, name), q_len, "query", platform)
        for name in ("block_k", "block_k_dq", "block_k_dkv"):
            _check_block(name, getattr(self, name), kv_len, "key/value", platform)

    @classmethod
    def for_lengths(cls, q_len, kv_len, query_chunk_size=1024, key_chunk_size=1024, platform="cpu"):
        """Largest legal blocks for `platform` that are at most the chunk sizes (and platform caps).

        Example: for_lengths(512, 512, 1024, 1024, "gpu") -> block_q 128, block_k 64 (Triton
        keeps a [block_q, head_dim] tile and a [block_q, block_k] tile in registers).
        """
        q_cap, k_cap = {"gpu": (128, 64), "tpu": (512, 512)}.get(platform, (q_len, kv_len))
        block_q = _largest_block(q_len, min(query_chunk_size, q_cap), "query", platform)
        block_k = _largest_block(kv_len, min(key_chunk_size, k_cap), "key/value", platform)
        return cls(block_q=block_q, block_k=block_k, block_q_dq=block_q, block_k_dq=block_k,
                   block_q_dkv=block_q, block_k_dkv=block_k)


def _block_ok(block, length, kind, platform):
    if length % block:
        return False
    if platform == "gpu":
        return block >= 16 and block & (block - 1) == 0
    if platform == "tpu":  # sequence blocks sit in the lane dim of [.., 1, seq] rows: 128-multiples or full
        return block == length or (block % 128 == 0 if kind == "key/value" else block % 8 == 0)
    return True


def _check_block(name, block, length, kind, platform):
    if length % block:
        raise ValueError(f"BlockSizes.{name}={block} does not divide the {kind} length {length}")
    if not _block_ok(block, length, kind, platform):
        rule = {"gpu": "a power of two >= 16", "tpu": "a multiple of 128 (keys) / 8 (queries) or the full length"}
        raise ValueError(f"BlockSizes.{name}={block} is not legal on {platform}: must be {rule[platform]}")


def _largest_block(length, cap, kind, platform):
    for block in range(min(cap, length), 0, -1):
        if _block_ok(block, length, kind, platform):
            return block
    raise ValueError(f"no legal {platform} block size <= {cap} divides the {kind} length {length}")


# ----------------------------------------------------------------------------- public function


def flash_attention(q, k, v, segment_ids=None, *, causal=True, softmax_scale=None, block_sizes=None,
                    query_chunk_size=1024, key_chunk_size=1024, interpret=None, positions=None, platform=None):
    """Masked attention with Pallas kernels; differentiable.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids:
    [batch, seq] or None; positions: [seq] global token order (default arange). block_sizes:
    used on every platform, or None for each platform's largest legal blocks <= the chunk sizes
    (`BlockSizes.for_lengths`). platform: None follows the platform the call is lowered for
    (Mosaic on TPU, Triton on cuda/rocm, interpret mode elsewhere); "tpu" / "gpu" / "cpu" pins
    one. interpret: None = only where no kernel compiler exists; True = everywhere; False =
    never. Returns [batch, seq, heads, head_dim].
    """
    check_qkv(q, k, v, segment_ids)
    seq = q.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    positions = jnp.arange(seq, dtype=jnp.int32) if positions is None else jnp.asarray(positions, jnp.int32)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    config = _KernelConfig(causal=bool(causal), scale=scale, block_sizes=block_sizes,
                           chunk_sizes=(int(query_chunk_size), int(key_chunk_size)),
                           interpret=None if interpret is None else bool(interpret), platform=platform)
    config.check(seq, seq)
    return _flash(config, q, k, v, segment_ids, positions)


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """The static settings of one kernel call (hashable: a custom_vjp nondiff argument)."""
    causal: bool
    scale: float  # softmax scale applied to q.k
    block_sizes: BlockSizes | None  # None: per platform, BlockSizes.for_lengths(.., *chunk_sizes)
    chunk_sizes: tuple = (1024, 1024)  # (query, key/value) caps on auto-picked blocks
    interpret: bool | None = None  # see flash_attention
    platform: str | None = None  # None, "cpu", "gpu" or "tpu"; see flash_attention

    def check(self, q_len, kv_len):
        """Errors every platform would raise, raised now (platform-specific ones wait for lowering)."""
        if self.platform not in (None, "cpu", "gpu", "tpu"):
            raise ValueError(f"platform={self.platform!r}; expected None, 'cpu', 'gpu' or 'tpu'")
        if self.block_sizes is not None:
            self.block_sizes.check(q_len, kv_len)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(config, q, k, v, segment_ids, positions):
    return _flash_fwd(config, q, k, v, segment_ids, positions)[0]


def _flash_fwd(config, q, k, v, segment_ids, positions):
    out, lse = flash_block_fwd(q, k, v, segment_ids, segment_ids, positions, positions, **_kwargs(config))
    out, lse = name_residuals(out.astype(q.dtype), lse)
    return out, (q, k, v, segment_ids, positions, out, lse)


def _flash_bwd(config, residuals, d_out):
    q, k, v, segment_ids, positions, out, lse = residuals
    dq, dk, dv = flash_block_bwd(q, k, v, d_out, lse, output_delta(out, d_out), segment_ids, segment_ids,
                                 positions, positions, **_kwargs(config))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _kwargs(config):
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}


# ----------------------------------------------------------------------------- platforms
#
# A call stages one kernel variant per platform under lax.platform_dependent; lowering (jit on a
# device, or jax.export for any platform from any host) keeps only the branch of its target. A
# variant is "tpu" (Mosaic TPU), "gpu" (Triton, for cuda and rocm) or "cpu" (interpret mode).

_LOWERS_FOR = {"tpu": ("tpu",), "gpu": ("cuda", "rocm")}  # variant -> lax.platform_dependent names


def _compiler_params(variant):
    """Pallas picks its backend from the compiler params' type: Triton on GPU, not the default
    Mosaic GPU (which needs a differently structured kernel: this one exceeds its shared memory)."""
    if variant == "gpu":
        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    if variant == "tpu":
        return pltpu.CompilerParams()
    return None


def _per_platform(kernels, args, out_shapes, q_len, kv_len, *, causal, scale, block_sizes, chunk_sizes,
                  interpret, platform):
    """`kernels(block_sizes, interpret, compiler_params, *args)` for the platform being lowered for.

    interpret=True or platform="cpu": interpret mode only; platform="gpu"/"tpu": that compiler only
    (block size errors raise now). Otherwise a lax.platform_dependent over the compiled variants
    with a default branch of interpret mode (interpret=None) or an error (interpret=False). A
    variant with no legal block sizes for these lengths becomes an error raised when lowering for
    its platform, so a CPU run of a short sequence still traces.
    """
    def build(variant):
        if block_sizes is None:
            sizes = BlockSizes.for_lengths(q_len, kv_len, *chunk_sizes, platform=variant)
        else:
            sizes = block_sizes
            sizes.check(q_len, kv_len, variant)
        return functools.partial(kernels, sizes, variant == "cpu", _compiler_params(variant), causal=causal,
                                 scale=scale)

    if interpret or platform == "cpu":
        return build("cpu")(*args)
    if platform is not None:
        return build(platform)(*args)
    branches = {}
    for variant, names in _LOWERS_FOR.items():
        try:
            branch = build(variant)
        except ValueError as err:
            branch = _fails_when_lowered(out_shapes, f"the Pallas flash kernel cannot lower for {variant}: {err}")
        branches.update(dict.fromkeys(names, branch))
    if interpret is None:
        default = build("cpu")
    else:
        default = _fails_when_lowered(out_shapes, "interpret=False: Pallas compiles only for GPU and TPU")
    return lax.platform_dependent(*args, default=default, **branches)


# A stand-in for a kernel variant that cannot be built: it has the kernel's output shapes and its
# lowering raises, so the error reaches whoever lowers for that platform, and nobody else.
_unlowerable_p = jax_core.Primitive("pallas_flash_unlowerable")
_unlowerable_p.multiple_results = True
_unlowerable_p.def_abstract_eval(
    lambda *, out_shapes, message: [jax.core.ShapedArray(s.shape, s.dtype) for s in out_shapes])


def _raise_when_lowered(ctx, *, out_shapes, message):
    raise ValueError(message)


mlir.register_lowering(_unlowerable_p, _raise_when_lowered)


def _fails_when_lowered(out_shapes, message):
    return lambda *args: tuple(_unlowerable_p.bind(out_shapes=tuple(out_shapes), message=message))


# ----------------------------------------------------------------------------- block API (ring)


def _vector_operands(q_seg, kv_seg, q_pos, kv_pos):
    """Positions / segment ids as query columns [.., sq, 1] and key rows [.., 1, sk]."""
    vectors = [q_pos.astype(jnp.int32)[:, None], kv_pos.astype(jnp.int32)[None, :]]
    if q_seg is not None:
        vectors += [q_seg.astype(jnp.int32)[:, :, None], kv_seg.astype(jnp.int32)[:, None, :]]
    return vectors


def _vector_specs(has_segments, q_block, kv_block, q_index, kv_index):
    """BlockSpecs for _vector_operands: q_index/kv_index map grid ids -> (batch, block number)."""
    specs = [pl.BlockSpec((q_block, 1), lambda *g: (q_index(*g)[1], 0)),
             pl.BlockSpec((1, kv_block), lambda *g: (0, kv_index(*g)[1]))]
    if has_segments:
        specs += [pl.BlockSpec((None, q_block, 1), lambda *g: (q_index(*g)[0], q_index(*g)[1], 0)),
                  pl.BlockSpec((None, 1, kv_block), lambda *g: (kv_index(*g)[0], 0, kv_index(*g)[1]))]
    return specs


def flash_block_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, causal, scale, block_sizes=None,
                    chunk_sizes=(1024, 1024), interpret=None, platform=None):
    """One query block against one key/value block: (out float32 [b, sq, h, d], lse [b, h, sq]).

    Same contract as `blockwise.blockwise_block_fwd`: lse = -inf and out = 0 on rows with no key.
    block_sizes, chunk_sizes, interpret, platform: as in `flash_attention`.
    """
    b, sq, h, d = q.shape
    out_shapes = (jax.ShapeDtypeStruct((b, sq, h, d), jnp.float32), jax.ShapeDtypeStruct((b, h, sq), jnp.float32))
    return _per_platform(_fwd_calls, (q, k, v, q_seg, kv_seg, q_pos, kv_pos), out_shapes, sq, k.shape[1],
                         causal=causal, scale=scale, block_sizes=block_sizes, chunk_sizes=chunk_sizes,
                         interpret=interpret, platform=platform)


def flash_block_bwd(q, k, v, d_out, lse, delta, q_seg, kv_seg, q_pos, kv_pos, *, causal, scale, block_sizes=None,
                    chunk_sizes=(1024, 1024), interpret=None, platform=None):
    """Gradients of one block pair given full-row lse, delta [b, h, sq]: (dq, dk, dv) float32."""
    out_shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),) + (jax.ShapeDtypeStruct(k.shape, jnp.float32),) * 2
    return _per_platform(_bwd_calls, (q, k, v, d_out, lse, delta, q_seg, kv_seg, q_pos, kv_pos), out_shapes,
                         q.shape[1], k.shape[1], causal=causal, scale=scale, block_sizes=block_sizes,
                         chunk_sizes=chunk_sizes, interpret=interpret, platform=platform)


def _fwd_calls(block_sizes, interpret, compiler_params, q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, causal, scale):
    """The forward pallas_call of one platform variant: (out, lse) as in flash_block_fwd."""
    b, sq, h, d = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    group = h // kv_heads
    bq, bk = block_sizes.block_q, block_sizes.block_k
    qt, kt, vt = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))  # [b, heads, seq, d]
    has_segments = q_seg is not None
    kernel = functools.partial(_fwd_kernel, causal=causal, scale=scale, block_k=bk, has_segments=has_segments)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, sk, d), lambda bi, hi, i: (bi, lax.div(hi, group), 0, 0)),
        pl.BlockSpec((None, None, sk, d), lambda bi, hi, i: (bi, lax.div(hi, group), 0, 0)),
    ] + _vector_specs(has_segments, bq, sk, lambda bi, hi, i: (bi, i), lambda bi, hi, i: (bi, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, sq // bq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i: (bi, hi, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, h, sq, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, sq, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="flash_fwd",
    )(qt, kt, vt, *_vector_operands(q_seg, kv_seg, q_pos, kv_pos))
    return jnp.transpose(out, (0, 2, 1, 3)), lse[..., 0]


def _bwd_calls(block_sizes, interpret, compiler_params, q, k, v, d_out, lse, delta, q_seg, kv_seg, q_pos, kv_pos,
               *, causal, scale):
    """The dq and dk/dv pallas_calls of one platform variant: (dq, dk, dv) as in flash_block_bwd."""
    b, sq, h, d = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    group = h // kv_heads
    qt, kt, vt, dot_ = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q, k, v, d_out))  # [b, heads, seq, d]
    lse_col = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]  # [b, h, sq, 1]; empty rows are masked anyway
    delta_col = delta[..., None]
    vectors = _vector_operands(q_seg, kv_seg, q_pos, kv_pos)
    has_segments = q_seg is not None

    bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, scale=scale, block_k=bk, has_segments=has_segments),
        grid=(b, h, sq // bq),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),  # q
            pl.BlockSpec((None, None, sk, d), lambda bi, hi, i: (bi, lax.div(hi, group), 0, 0)),  # k
            pl.BlockSpec((None, None, sk, d), lambda bi, hi, i: (bi, lax.div(hi, group), 0, 0)),  # v
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),  # d_out
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i: (bi, hi, i, 0)),  # lse
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i: (bi, hi, i, 0)),  # delta
        ] + _vector_specs(has_segments, bq, sk, lambda bi, hi, i: (bi, i), lambda bi, hi, i: (bi, 0)),
        out_specs=pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, sq, d), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params,
        name="flash_dq",
    )(qt, kt, vt, dot_, lse_col, delta_col, *vectors)

    bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, causal=causal, scale=scale, block_q=bq, has_segments=has_segments),
        grid=(b, kv_heads, sk // bk),
        in_specs=[
            pl.BlockSpec((None, group, sq, d), lambda bi, hi, j: (bi, hi, 0, 0)),  # q of the group's heads
            pl.BlockSpec((None, None, bk, d), lambda bi, hi, j: (bi, hi, j, 0)),  # k
            pl.BlockSpec((None, None, bk, d), lambda bi, hi, j: (bi, hi, j, 0)),  # v
            pl.BlockSpec((None, group, sq, d), lambda bi, hi, j: (bi, hi, 0, 0)),  # d_out
            pl.BlockSpec((None, group, sq, 1), lambda bi, hi, j: (bi, hi, 0, 0)),  # lse
            pl.BlockSpec((None, group, sq, 1), lambda bi, hi, j: (bi, hi, 0, 0)),  # delta
        ] + _vector_specs(has_segments, sq, bk, lambda bi, hi, j: (bi, 0), lambda bi, hi, j: (bi, j)),
        out_specs=[pl.BlockSpec((None, None, bk, d), lambda bi, hi, j: (bi, hi, j, 0)),
                   pl.BlockSpec((None, None, bk, d), lambda bi, hi, j: (bi, hi, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, sk, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, sk, d), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="flash_dkv",
    )(qt, kt, vt, dot_, lse_col, delta_col, *vectors)
    to_bshd = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    return to_bshd(dq), to_bshd(dk), to_bshd(dv)


# ----------------------------------------------------------------------------- kernels


def _split_vector_refs(refs, has_segments):
    """(q_pos, kv_pos, q_seg|None, kv_seg|None, remaining refs)."""
    if has_segments:
        return refs[0], refs[1], refs[2], refs[3], refs[4:]
    return refs[0], refs[1], None, None, refs[2:]


def _pair_mask(q_pos, kv_pos, q_seg, kv_seg, causal):
    """bool [rows, cols] from a query column and a key row (None if nothing is masked)."""
    mask = None
    if q_seg is not None:
        mask = q_seg == kv_seg
    if causal:
        causal_mask = kv_pos <= q_pos
        mask = causal_mask if mask is None else mask & causal_mask
    return mask


def _if_any_pair_visible(q_pos, kv_pos, q_seg, kv_seg, causal, compute, carry):
    """compute(carry), skipped (carry returned) when the block pair is certainly fully masked
    (range test, cheap). Nothing to test without masking: no cond at all (Triton's lowering of a
    cond fails on a constant predicate)."""
    if not causal and q_seg is None:
        return compute(carry)
    visible = jnp.bool_(True)
    if causal:
        visible = jnp.min(kv_pos) <= jnp.max(q_pos)
    if q_seg is not None:
        visible = visible & (jnp.min(q_seg) <= jnp.max(kv_seg)) & (jnp.min(kv_seg) <= jnp.max(q_seg))
    return lax.cond(visible, compute, lambda c: c, carry)


def _dot_t(a, b):
    """a @ b.T with float32 accumulation: [m, d] x [n, d] -> [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, causal, scale, block_k, has_segments):
    q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = _split_vector_refs(refs, has_segments)
    q = q_ref[...]  # [bq, d]
    q_pos = q_pos_ref[...]  # [bq, 1]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]  # [bq, 1]

    def kv_step(j, carry):
        kv_slice = pl.ds(j * block_k, block_k)
        kv_pos = kv_pos_ref[:, kv_slice]  # [1, bk]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, kv_slice]

        def attend(carry):
            acc, m, l = carry
            s = _dot_t(q, k_ref[kv_slice, :]) * scale  # [bq, bk]
            mask = _pair_mask(q_pos, kv_pos, q_seg, kv_seg, causal)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
            p = jnp.exp(s - m_new)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)  # exact zeros for fully masked rows
            alpha = jnp.exp(m - m_new)
            v = v_ref[kv_slice, :]
            acc = alpha * acc + _dot(p.astype(v.dtype), v)
            return acc, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

        return _if_any_pair_visible(q_pos, kv_pos, q_seg, kv_seg, causal, attend, carry)

    bq, d = q.shape
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = lax.fori_loop(0, k_ref.shape[0] // block_k, kv_step, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, causal, scale, block_k, has_segments):
    q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, (dq_ref,) = _split_vector_refs(refs, has_segments)
    q, do = q_ref[...], do_ref[...]  # [bq, d]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_pos = q_pos_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def kv_step(j, dq):
        kv_slice = pl.ds(j * block_k, block_k)
        kv_pos = kv_pos_ref[:, kv_slice]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, kv_slice]

        def backprop(dq):
            k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
            p = jnp.exp(_dot_t(q, k) * scale - lse)  # [bq, bk]
            mask = _pair_mask(q_pos, kv_pos, q_seg, kv_seg, causal)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            ds = p * (_dot_t(do, v) - delta) * scale
            return dq + _dot(ds.astype(k.dtype), k)

        return _if_any_pair_visible(q_pos, kv_pos, q_seg, kv_seg, causal, backprop, dq)

    dq = lax.fori_loop(0, k_ref.shape[0] // block_k, kv_step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, causal, scale, block_q, has_segments):
    q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, (dk_ref, dv_ref) = _split_vector_refs(refs, has_segments)
    k, v = k_ref[...], v_ref[...]  # [bk, d]
    kv_pos = kv_pos_ref[...]  # [1, bk]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    group, q_len = q_ref.shape[0], q_ref.shape[1]
    n_q = q_len // block_q

    def q_step(t, carry):
        g, i = lax.div(t, n_q), lax.rem(t, n_q)  # head in the group, query block (t >= 0: plain div/rem)
        q_slice = pl.ds(i * block_q, block_q)
        q_pos = q_pos_ref[q_slice, :]  # [bq, 1]
        q_seg = None if q_seg_ref is None else q_seg_ref[q_slice, :]

        def backprop(carry):
            dk, dv = carry
            q, do = q_ref[g, q_slice, :], do_ref[g, q_slice, :]  # [bq, d]
            p = jnp.exp(_dot_t(q, k) * scale - lse_ref[g, q_slice, :])  # [bq, bk]
            mask = _pair_mask(q_pos, kv_pos, q_seg, kv_seg, causal)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype).T, do)
            ds = p * (_dot_t(do, v) - delta_ref[g, q_slice, :]) * scale
            return dk + _dot(ds.astype(q.dtype).T, q), dv

        return _if_any_pair_visible(q_pos, kv_pos, q_seg, kv_seg, causal, backprop, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group * n_q, q_step, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- reference


def flash_attention_reference(q, k, v, segment_ids=None, *, causal=True, softmax_scale=None, positions=None):
    """What flash_attention computes, densely (for tests): `lwm.ops.reference.reference_attention`."""
    from lwm.ops.reference import reference_attention

    return reference_attention(q, k, v, segment_ids, causal=causal, q_index=positions, kv_index=positions,
                               softmax_scale=softmax_scale)
