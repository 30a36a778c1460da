"""Attention kernels behind one interface.

`attention(q, k, v, segment_ids, causal=..., impl=..., mesh=..., layout=...)` is what the model
calls. The masking rule every kernel shares (see `lwm/ops/reference.py`): query i attends key j
iff they carry the same segment id and, when causal, j's global position <= i's. Padding is
segment 0, so it never mixes with real tokens.

impl:
  "auto"       Pallas flash kernel on GPU/TPU, blockwise jnp on CPU (from jax.default_backend()).
  "dense"      the reference: materialises [seq, seq]; with a mesh, GSPMD gathers what it needs.
  "blockwise"  pure jnp, chunked with online softmax (`lwm/ops/blockwise.py`).
  "pallas"     the Pallas flash kernel (`lwm/ops/pallas_flash.py`): Mosaic on TPU, Triton on GPU,
               interpret mode on CPU, chosen by the platform the call is lowered for.
With a mesh (and impl != "dense") the call runs inside `shard_map` and loops over the `sp` ring
(`lwm/ops/ring.py`); with sp == 1 that is just the block kernel on local shapes.

Chunk sizes: the effective chunk is min(chunk, limit) where limit is the local length seq / sp
(seq / (2*sp) for the zigzag layout, whose shard is two separate runs of the sequence); it must
divide the local length. On CPU, chunks of 128-512 are fastest (a [chunk, chunk] score tile
per head stays in cache); 1024 (the LWM default) suits TPU/GPU. For impl="pallas" the chunk
sizes cap the kernel's block sizes (further capped per platform, `BlockSizes.for_lengths`, for
the platform being lowered for).

Decoding against a KV cache is separate: `lwm.ops.decode.cached_attention`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lwm.ops.blockwise import blockwise_attention
from lwm.ops.common import check_qkv, fit_chunk
from lwm.ops.decode import cached_attention
from lwm.ops.layout import LAYOUTS, chunk_limit, from_layout, global_index, to_layout
from lwm.ops.reference import reference_attention
from lwm.config import SP_ATTENTION
from lwm.ops import ring as _ring
from lwm.ops.ring import ring_attention

IMPLS = ("auto", "dense", "blockwise", "pallas")

__all__ = ["attention", "cached_attention", "reference_attention", "blockwise_attention", "ring_attention",
           "IMPLS", "LAYOUTS", "global_index", "to_layout", "from_layout", "resolve_impl", "plan_attention",
           "AttentionPlan"]


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The concrete kernel for `impl` on `platform` (default: jax.default_backend())."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend() if platform is None else platform
    return "pallas" if platform in ("gpu", "tpu") else "blockwise"


def attention(q, k, v, segment_ids=None, *, causal=True, impl="auto", query_chunk_size=1024,
              key_chunk_size=1024, mesh=None, layout="contiguous", softmax_scale=None, sp_attention="auto"):
    """Masked (causal, segment) self-attention with grouped-query heads.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], heads % kv_heads == 0;
    segment_ids: [batch, seq] int32 (padding 0, examples 1, 2, ...) or None.
    mesh: jax.sharding.Mesh with axes ('dp', 'fsdp', 'tp', 'sp') or None; activations are expected
    sharded PS(('dp','fsdp'), 'sp', 'tp', None). layout: how the sequence is stored relative to
    sp = mesh.shape['sp'] (see `lwm.ops.layout`); causal masking follows that global order.
    sp_attention: how k, v reach the queries of other sp shards: "ring" (blocks passed around,
    memory per device independent of the sequence), "all_gather" (gathered once per layer; fewer
    collectives), "auto" (all_gather while one layer's k, v fit `ring.GATHER_KV_MAX_BYTES` per
    device, else ring).
    Returns [batch, seq, heads, head_dim] in q's dtype.

    >>> out = attention(q, k, v, segment_ids, impl="blockwise", query_chunk_size=512,
    ...                 key_chunk_size=512, mesh=mesh, layout="zigzag")
    """
    check_qkv(q, k, v, segment_ids)
    plan = plan_attention(k, impl=impl, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
                          mesh=mesh, layout=layout, sp_attention=sp_attention, seq=q.shape[1])
    impl, query_chunk_size, key_chunk_size, sp = plan.impl, plan.query_chunk_size, plan.key_chunk_size, plan.sp
    seq = q.shape[1]
    if mesh is not None and q.shape[2] % mesh.shape["tp"]:
        raise ValueError(f"query heads {q.shape[2]} not divisible by tp={mesh.shape['tp']}")
    if mesh is not None and k.shape[2] % mesh.shape["tp"]:
        raise ValueError(f"key/value heads {k.shape[2]} not divisible by tp={mesh.shape['tp']}")

    if impl == "dense":
        positions = None if sp == 1 or layout == "contiguous" else jnp.asarray(global_index(layout, seq, sp))
        return reference_attention(q, k, v, segment_ids, causal=causal, q_index=positions, kv_index=positions,
                                   softmax_scale=softmax_scale)

    if impl == "pallas" and mesh is None:
        from lwm.ops import pallas_flash  # the Pallas module is imported only when asked for

        # block sizes and backend are chosen per platform when the call is lowered
        return pallas_flash.flash_attention(q, k, v, segment_ids, causal=causal, softmax_scale=softmax_scale,
                                            query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size)
    if impl == "blockwise" and mesh is None:
        return blockwise_attention(q, k, v, segment_ids, causal=causal, query_chunk_size=query_chunk_size,
                                   key_chunk_size=key_chunk_size, softmax_scale=softmax_scale)
    return ring_attention(q, k, v, segment_ids, mesh=mesh, causal=causal, layout=layout, block_impl=impl,
                          query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
                          softmax_scale=softmax_scale, gather_kv=plan.sp_strategy == "all_gather")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What `attention` runs for given shapes: the kernel, its chunks, how k/v cross sp shards."""

    impl: str  # dense | blockwise | pallas
    query_chunk_size: int
    key_chunk_size: int
    sp: int
    sp_strategy: str  # none (sp = 1) | gspmd (dense) | ring | all_gather
    why: str  # how impl and sp_strategy were chosen

    def describe(self) -> str:
        chunks = "" if self.impl == "dense" else f", chunks {self.query_chunk_size}/{self.key_chunk_size} (query/key)"
        across = "no sequence sharding" if self.sp == 1 else f"k/v across sp={self.sp}: {self.sp_strategy}"
        return f"{self.impl} kernel{chunks}; {across} ({self.why})"


def plan_attention(k, *, impl="auto", query_chunk_size=1024, key_chunk_size=1024, mesh=None, layout="contiguous",
                   sp_attention="auto", seq=None, platform=None, requested=None) -> AttentionPlan:
    """The plan for keys/values shaped like `k` ([batch, seq, kv_heads, head_dim], an array or a
    jax.ShapeDtypeStruct): the one `attention` follows, and what entry points log. `requested`:
    the user's setting `impl` was derived from, for the plan's `why` (default: impl)."""
    requested = requested or impl
    impl = resolve_impl(impl, platform)
    seq = k.shape[1] if seq is None else seq
    sp = 1 if mesh is None else mesh.shape["sp"]
    limit = chunk_limit(layout, seq, sp)  # validates layout, seq % sp (and % 2*sp for zigzag)
    local = seq // sp
    if impl != "dense":  # the dense kernel has no chunks, so any length works
        query_chunk_size = fit_chunk(min(query_chunk_size, limit), local, "query_chunk_size")
        key_chunk_size = fit_chunk(min(key_chunk_size, limit), local, "key_chunk_size")
    if sp_attention not in SP_ATTENTION:
        raise ValueError(f"sp_attention={sp_attention!r}; expected one of {SP_ATTENTION}")
    why = [f"attention_impl={requested}"]
    if requested == "auto":
        why[0] += ", scan_attention=False" if impl == "dense" else f" on {platform or jax.default_backend()}"
    if sp == 1:
        strategy = "none"
    elif impl == "dense":
        strategy = "gspmd"
    elif sp_attention == "auto":
        strategy = "all_gather" if _ring.gather_kv_fits(k, mesh) else "ring"
        per_device, max_bytes = _ring.kv_bytes_per_device(k, mesh), _ring.GATHER_KV_MAX_BYTES  # read now: tests lower it
        why.append(f"sp_attention=auto: one layer's gathered k/v take {per_device / 2**20:.2f} MiB per device, "
                   f"{'within' if strategy == 'all_gather' else 'over'} the {max_bytes / 2**20:g} MiB limit")
    else:
        strategy = sp_attention
        why.append(f"sp_attention={sp_attention}")
    return AttentionPlan(impl, query_chunk_size, key_chunk_size, sp, strategy, "; ".join(why))
