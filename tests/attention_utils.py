"""Shared helpers for the attention kernel tests: random cases and the float64 reference."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lwm.ops.reference import reference_attention

OUT_RTOL = 1e-5  # fp32 inputs vs the float64 reference: max |err| / max |ref|
GRAD_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    kv_heads: int
    group: int  # query heads per key/value head (GQA)
    head_dim: int
    q_chunk: int
    kv_chunk: int
    causal: bool
    segments: int  # number of packed examples per row (1 = no segment ids)
    left_pad: int  # padding tokens at the start of each row (segment 0)
    seed: int

    @property
    def heads(self):
        return self.kv_heads * self.group

    def __str__(self):
        return (f"b{self.batch}-s{self.seq}-h{self.heads}kv{self.kv_heads}-d{self.head_dim}-c{self.q_chunk}x"
                f"{self.kv_chunk}-{'causal' if self.causal else 'full'}-seg{self.segments}-pad{self.left_pad}")


def sample_cases(seed, count, seqs=(64, 128, 256, 512), min_chunk=16, sp=1):
    """A seeded sample of the shape grid (batch 1-2, heads <= 8, GQA 1/2/4, head dim 16-64, ...).

    With sp > 1 the sequence is a multiple of 2*sp and chunks divide the local length seq/sp.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        seq = int(rng.choice([s for s in seqs if s % (2 * sp) == 0]))
        group = int(rng.choice([1, 2, 4]))
        kv_heads = int(rng.integers(1, 8 // group + 1))
        local = seq // sp
        chunks = [c for c in (8, 16, 32, 64, 128, 256, 512) if c >= min_chunk and local % c == 0 and c <= local]
        segments = int(rng.integers(1, 5))
        cases.append(Case(batch=int(rng.integers(1, 3)), seq=seq, kv_heads=kv_heads, group=group,
                          head_dim=int(rng.choice([16, 32, 64])), q_chunk=int(rng.choice(chunks)),
                          kv_chunk=int(rng.choice(chunks)), causal=bool(rng.random() < 0.7), segments=segments,
                          left_pad=int(rng.integers(1, seq // 4)) if rng.random() < 0.5 else 0,
                          seed=seed * 1000 + i))
    return cases


def make_segment_ids(rng, batch, seq, segments, left_pad):
    """[batch, seq] int32: left padding as segment 0, then `segments` packed examples 1, 2, ..."""
    ids = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(left_pad + 1, seq), size=segments - 1, replace=False)) if segments > 1 else []
        ids[row, left_pad:] = 1
        for cut in cuts:
            ids[row, cut:] += 1
    return ids


def make_inputs(case: Case):
    """Random q, k, v, cotangent (float32) and segment ids (None when segments == 1 and no pad)."""
    rng = np.random.default_rng(case.seed)
    q = rng.standard_normal((case.batch, case.seq, case.heads, case.head_dim)).astype(np.float32)
    k = rng.standard_normal((case.batch, case.seq, case.kv_heads, case.head_dim)).astype(np.float32)
    v = rng.standard_normal((case.batch, case.seq, case.kv_heads, case.head_dim)).astype(np.float32)
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    seg = None
    if case.segments > 1 or case.left_pad:
        seg = make_segment_ids(rng, case.batch, case.seq, case.segments, case.left_pad)
    return q, k, v, seg, d_out


def output_and_grads(fn, q, k, v, d_out):
    """(out, (dq, dk, dv)) of fn(q, k, v) under one jit, via the vjp with cotangent d_out."""
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    out, grads = jax.jit(run)(q, k, v, d_out)
    return np.asarray(out), [np.asarray(g) for g in grads]


def reference_output_and_grads(q, k, v, seg, d_out, causal, positions=None, softmax_scale=None):
    """Dense attention and its (q, k, v) gradients computed in float64."""
    with jax.enable_x64(True):
        pos = None if positions is None else jnp.asarray(positions)
        seg64 = None if seg is None else jnp.asarray(seg)

        def fn(q, k, v):
            return reference_attention(q, k, v, seg64, causal=causal, q_index=pos, kv_index=pos,
                                       softmax_scale=softmax_scale)

        def run(q, k, v, d_out):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(d_out)

        out, grads = jax.jit(run)(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, d_out)))
        return np.asarray(out), [np.asarray(g) for g in grads]


def relative_error(got, want):
    """max |got - want| / max |want| (want float64)."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def assert_matches_reference(out, grads, ref_out, ref_grads, what=""):
    err = relative_error(out, ref_out)
    assert err <= OUT_RTOL, f"{what} output relative error {err:.2e} > {OUT_RTOL}"
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        err = relative_error(g, rg)
        assert err <= GRAD_RTOL, f"{what} {name} relative error {err:.2e} > {GRAD_RTOL}"
