"""Blockwise LM head + weighted cross-entropy whose memory does not grow with vocab x sequence.

The original LWM builds the full [batch, seq, vocab] logits, their log-softmax and their
gradient in float32: for a 32000-word vocabulary that is ~128 KB per token for each of those
arrays, more than the whole 256-wide model's activations. Here the head matmul, log-softmax,
cross-entropy and accuracy run one sequence chunk at a time inside a `lax.scan`. Because
the loss is the last node of the graph, its gradient is known up to one scalar (the
cotangent g of loss_sum) while the forward pass still holds each chunk's logits, so the
`custom_vjp` forward computes it right there and the backward only scales by g:

    logits_c  = hidden_c @ W                          [B, chunk, V]   (one chunk at a time)
    dlogits_c = w_c * (softmax(logits_c) - onehot(target_c))
    dhidden_c = dlogits_c @ W^T ;  dW += hidden_c^T @ dlogits_c        (kept: [B, S, H], [H, V])
    backward:   dhidden = g * dhidden ; dW = g * dW

so the largest temporary is one chunk's [B, chunk, V] logits, never [B, S, V], and the head
costs three matmuls per chunk (no recomputation). Without differentiation (eval) only the
logits and their logsumexp are computed.

Sharding: inside jit the activations are sharded PS(('dp','fsdp'), 'sp', 'tp'). A scan over a
sharded axis would make GSPMD gather it, so the sequence is split as
S -> [seq_shards, S / (seq_shards * chunk), chunk] and the scan runs over the middle axis,
which every `sp` shard holds whole (seq_shards = mesh.shape['sp'], given by the caller).
The head gradient is accumulated as one partial sum per (batch shard, sequence shard), so it
stays on its device through the scan and is reduced once at the end (batch_shards = dp * fsdp);
no collective runs inside the loop.

The functions return sums, so a trainer can combine heads and micro-batches exactly:
    sums = lm_head_loss(hidden, kernel, targets, weights)
    loss = sums.loss_sum / sums.weight_sum ; accuracy = sums.correct_sum / sums.weight_sum

Worked example (vocab 3, one token, weight 0.5): logits = [1, 2, 0], target 1:
    logsumexp = log(e + e^2 + 1) = 2.4076, nll = 2.4076 - 2 = 0.4076,
    loss_sum = 0.2038, weight_sum = 0.5, correct_sum = 0.5 (argmax 1 == target).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as PS

from lwm.mesh import BATCH_AXES, FSDP_SP, MESH_AXES, mesh_shape, with_sharding_constraint
from lwm.vocab_parallel_loss import sum_over_chunks, vocab_parallel_applies, vocab_parallel_grads


class LossSums(NamedTuple):
    """Weighted sums over all tokens (float32 scalars)."""

    loss_sum: jax.Array  # sum(weights * (logsumexp(logits) - logits[target]))
    weight_sum: jax.Array  # sum(weights)
    correct_sum: jax.Array  # sum(weights * (argmax(logits) == target))


def lm_head_loss(hidden, head_kernel, targets, weights, *, chunk_size=1024, seq_shards=1,
                 logits_dtype=jnp.float32, precision=None, batch_shards=1, mesh=None) -> LossSums:
    """Cross-entropy of the LM head, computed chunk by chunk over the sequence.

    hidden: [B, S, H] final-norm output (compute dtype); head_kernel: [H, V] (flax Dense kernel);
    targets: [B, S] int; weights: [B, S] float (0 where no loss; fractional weights allowed).
    Targets must lie in [0, V) wherever the weight is non-zero (elsewhere they are ignored).
    chunk_size: tokens per scan step within each sequence shard; min(chunk_size, S / seq_shards)
        is used, and it must divide S / seq_shards.
    seq_shards: how many pieces the sequence axis is sharded into (mesh.shape['sp']).
    logits_dtype: dtype the logits are rounded to (the softmax math itself runs in float32).
    precision: passed to the head matmuls (e.g. jax.lax.Precision.HIGHEST).
    batch_shards: how many pieces the batch axis is sharded into (mesh dp * fsdp). The head
        gradient is accumulated as [batch_shards, seq_shards, H, V] partial sums, one per
        device, and reduced once after the scan; accumulating a single [H, V] instead makes
        GSPMD all-reduce it after every chunk. On an unsharded batch keep it 1 (each partial
        costs H * V * 4 bytes).
    mesh: the ('dp', 'fsdp', 'tp', 'sp') mesh the arrays live on, if any. With it, seq_shards and
        batch_shards come from the mesh and the gradient pass splits the vocabulary over sp x tp
        (`lwm.vocab_parallel_loss`; when sp * tp divides V); otherwise its head gradient's
        partial sums are reduce-scattered straight into the kernel's sharding PS(('fsdp', 'sp'),
        'tp') (without a mesh GSPMD all-reduces the whole [H, V] to every device, then slices it).
    Differentiable w.r.t. hidden, head_kernel and weights. Peak extra memory per device is
    about 2-3 local chunks of logits (B_local * chunk * V * 4 bytes each) plus an [H, V]
    float32 gradient accumulator.
    """
    if mesh is not None and mesh.size > 1 and set(MESH_AXES) <= set(mesh.axis_names):
        shape = mesh_shape(mesh)
        seq_shards, batch_shards = shape["sp"], shape["dp"] * shape["fsdp"]
    else:
        mesh = None
    chunk = _check_inputs(hidden, head_kernel, targets, weights, chunk_size, seq_shards)
    if int(batch_shards) < 1 or hidden.shape[0] % batch_shards:
        raise ValueError(f"batch size {hidden.shape[0]} is not divisible by batch_shards={batch_shards}")
    weights = weights.astype(jnp.float32)
    return LossSums(*_chunked_loss(hidden, head_kernel, targets, weights, chunk, int(seq_shards),
                                   int(batch_shards), jnp.dtype(logits_dtype), precision, mesh))


def _check_inputs(hidden, head_kernel, targets, weights, chunk_size, seq_shards):
    """Validate shapes and chunking; return the chunk size actually used."""
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, seq, hidden], got shape {hidden.shape}")
    if head_kernel.ndim != 2:
        raise ValueError(f"head_kernel must be [hidden, vocab], got shape {head_kernel.shape}")
    b, s, h = hidden.shape
    if head_kernel.shape[0] != h:
        raise ValueError(f"head_kernel rows {head_kernel.shape[0]} != hidden size {h} "
                         f"(hidden {hidden.shape}, head_kernel {head_kernel.shape})")
    for name, arr in (("targets", targets), ("weights", weights)):
        if arr.shape != (b, s):
            raise ValueError(f"{name} must be [batch, seq] = {(b, s)}, got shape {arr.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if int(seq_shards) < 1 or int(chunk_size) < 1:
        raise ValueError(f"chunk_size and seq_shards must be >= 1, got {chunk_size=} {seq_shards=}")
    if s % seq_shards:
        raise ValueError(f"sequence length {s} is not divisible by seq_shards={seq_shards}")
    per_shard = s // seq_shards
    chunk = min(int(chunk_size), per_shard)
    if per_shard % chunk:
        raise ValueError(f"chunk_size {chunk} does not divide the per-shard sequence length "
                         f"{per_shard} (= seq {s} / seq_shards {seq_shards}); "
                         f"pick a chunk_size that divides {per_shard}")
    return chunk


def _to_chunks(x, seq_shards, chunk):
    """[B, S, ...] -> [n_chunks, B, seq_shards, chunk, ...]; the scanned axis is unsharded."""
    b, s = x.shape[:2]
    n = s // (seq_shards * chunk)
    x = x.reshape(b, seq_shards, n, chunk, *x.shape[2:])  # [B, shards, n, chunk, ...]
    return jnp.moveaxis(x, 2, 0)


def _from_chunks(x):
    """Inverse of `_to_chunks`: [n, B, shards, chunk, ...] -> [B, S, ...]."""
    n, b, shards, chunk = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(b, shards * n * chunk, *x.shape[4:])


def _chunk_logits(h_c, kernel, logits_dtype, precision):
    """[B, shards, chunk, H] @ [H, V] -> float32 logits rounded through logits_dtype."""
    compute_dtype = jnp.result_type(h_c.dtype, kernel.dtype)
    logits = jnp.einsum("bxch,hv->bxcv", h_c.astype(compute_dtype), kernel.astype(compute_dtype),
                        precision=precision, preferred_element_type=jnp.float32)
    return logits.astype(logits_dtype).astype(jnp.float32)  # [B, shards, chunk, V]


class _ChunkStats(NamedTuple):
    exp_shifted: jax.Array  # exp(logits - max) [..., V]
    exp_sum: jax.Array  # its sum over V [...]
    lse: jax.Array  # logsumexp(logits) [...]
    target_logit: jax.Array  # logits[target], 0 for out-of-range targets [...]
    correct: jax.Array  # 1.0 where target == argmax (the first maximum, as jnp.argmax), else 0


def _chunk_stats(logits, t_c) -> _ChunkStats:
    """Softmax statistics of float32 logits [..., V] for targets [...] in few passes over V.

    Those passes cost as much as the head's matmuls on a CPU, so: the target logit is gathered
    (not a one-hot sum); `correct` compares the target with the first index holding the row
    max (a single int min, not jnp.argmax's (value, index) reduction, which is 10x slower);
    and exp(logits - max) is kept so the gradient reuses it instead of a second exp.
    Out-of-range targets get target logit 0 and correct 0, never NaN."""
    vocab = logits.shape[-1]
    valid = (t_c >= 0) & (t_c < vocab)
    target_logit = jnp.take_along_axis(logits, jnp.where(valid, t_c, 0)[..., None], axis=-1, mode="clip")[..., 0]
    row_max = jnp.max(logits, axis=-1)
    vocab_ids = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    first_max = jnp.min(jnp.where(logits == row_max[..., None], vocab_ids, vocab), axis=-1)
    exp_shifted = jnp.exp(logits - row_max[..., None])
    exp_sum = jnp.sum(exp_shifted, axis=-1)
    return _ChunkStats(exp_shifted, exp_sum, row_max + jnp.log(exp_sum), jnp.where(valid, target_logit, 0.0),
                       (valid & (first_max == t_c)).astype(jnp.float32))


def _per_token(hidden, kernel, targets, chunk, seq_shards, logits_dtype, precision):
    """Per-token (logsumexp, target logit, correct) [B, S] float32, one chunk at a time."""
    def step(_, xs):
        h_c, t_c = xs  # [B, shards, chunk, H], [B, shards, chunk]
        logits = _chunk_logits(h_c, kernel, logits_dtype, precision)  # [B, shards, chunk, V]
        stats = _chunk_stats(logits, t_c)
        return None, (stats.lse, stats.target_logit, stats.correct)

    xs = tuple(_to_chunks(x, seq_shards, chunk) for x in (hidden, targets))
    _, per_token = lax.scan(step, None, xs)
    # Per-token results leave the loop and are summed once, so no collective runs per chunk.
    return tuple(_from_chunks(x) for x in per_token)


def _sum_partials(partial, mesh):
    """[batch_shards, seq_shards, H, V] per-device partial sums of the head gradient -> [H, V]."""
    if mesh is None:
        return jnp.sum(partial, axis=(0, 1))

    def reduce_scatter(local):  # this device's [1, 1, H, V / tp]
        local = local[0, 0] if mesh.shape["dp"] == 1 else lax.psum(local[0, 0], "dp")
        return lax.psum_scatter(local, FSDP_SP, scatter_dimension=0, tiled=True)

    # check_vma=False: with dp == 1 there is no psum to tell shard_map the result is dp-invariant
    # (a psum over a size-1 axis still costs a rendezvous of every device on a CPU).
    return jax.shard_map(reduce_scatter, mesh=mesh, in_specs=PS(BATCH_AXES, "sp", None, "tp"),
                         out_specs=PS(FSDP_SP, "tp"), check_vma=False)(partial)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _chunked_loss(hidden, kernel, targets, weights, chunk, seq_shards, batch_shards, logits_dtype,
                  precision, mesh):
    lse, target_logit, correct = _per_token(hidden, kernel, targets, chunk, seq_shards, logits_dtype, precision)
    return jnp.sum(weights * (lse - target_logit)), jnp.sum(weights), jnp.sum(weights * correct)


def _chunked_loss_fwd(hidden, kernel, targets, weights, chunk, seq_shards, batch_shards,
                      logits_dtype, precision, mesh):
    """Loss and, in the same pass over each chunk's logits, the gradients up to the scalar
    cotangent of loss_sum (the loss is the last node, so that is all the backward adds):
    three head matmuls per chunk and no recomputation, against four with a recomputing backward."""
    if mesh is not None and vocab_parallel_applies(mesh, kernel.shape[1]):
        nll, correct, dhidden, dkernel = vocab_parallel_grads(hidden, kernel, targets, weights, chunk=chunk,
                                                              mesh=mesh, logits_dtype=logits_dtype, precision=precision)
        sums = (jnp.sum(weights * nll), jnp.sum(weights), jnp.sum(weights * correct))
        return sums, (dhidden, dkernel, nll, correct)
    compute_dtype = jnp.result_type(hidden.dtype, kernel.dtype)
    b, _, h = hidden.shape
    if mesh is not None:  # gathered once, for the first chunk and the loop alike
        kernel = with_sharding_constraint(kernel, PS(None, "tp"), mesh)

    def chunk_grads(h_c, t_c, w_c):  # [B, x, c, H], [B, x, c], [B, x, c]
        logits = _chunk_logits(h_c, kernel, logits_dtype, precision)  # [B, x, c, V]
        stats = _chunk_stats(logits, t_c)
        onehot = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == t_c[..., None]
        # w * (softmax - onehot), the softmax from the kept exp(logits - max) / its sum
        dlogits = ((w_c / stats.exp_sum)[..., None] * stats.exp_shifted
                   - jnp.where(onehot, w_c[..., None], 0.0)).astype(compute_dtype)
        dh_c = jnp.einsum("bxcv,hv->bxch", dlogits, kernel.astype(compute_dtype),
                          precision=precision, preferred_element_type=jnp.float32)
        # Contract only the tokens each device holds: the partial sums stay on their devices
        # and are reduced once after the scan.
        split = (batch_shards, b // batch_shards) + dlogits.shape[1:3]  # [p, B/p, x, c]
        dkernel_c = jnp.einsum("pbxch,pbxcv->pxhv", h_c.astype(compute_dtype).reshape(*split, h),
                               dlogits.reshape(*split, -1), precision=precision,
                               preferred_element_type=jnp.float32)
        return dkernel_c, (stats.lse - stats.target_logit, stats.correct, dh_c.astype(hidden.dtype))

    xs = tuple(_to_chunks(x, seq_shards, chunk) for x in (hidden, targets, weights))
    dkernel_partial, per_token = sum_over_chunks(chunk_grads, xs)
    nll, correct, dhidden = (_from_chunks(x) for x in per_token)
    sums = (jnp.sum(weights * nll), jnp.sum(weights), jnp.sum(weights * correct))
    return sums, (dhidden, _sum_partials(dkernel_partial, mesh).astype(kernel.dtype), nll, correct)


def _chunked_loss_bwd(chunk, seq_shards, batch_shards, logits_dtype, precision, mesh, residuals,
                      cotangents):
    dhidden, dkernel, nll, correct = residuals  # gradients of loss_sum, per-token nll and hits
    g_loss, g_weight, g_correct = cotangents
    dweights = g_loss * nll + g_weight + g_correct * correct
    return ((g_loss * dhidden).astype(dhidden.dtype), (g_loss * dkernel).astype(dkernel.dtype), None,
            dweights.astype(nll.dtype))


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def dense_lm_head_loss(hidden, head_kernel, targets, weights, *, chunk_size=1024, seq_shards=1,
                       logits_dtype=jnp.float32, precision=None, batch_shards=1, mesh=None) -> LossSums:
    """Reference: the same sums with the full [B, S, V] logits materialised (plain autodiff).

    chunk_size, seq_shards, batch_shards and mesh are accepted for a drop-in signature and
    ignored except for validation of the first two.
    """
    _check_inputs(hidden, head_kernel, targets, weights, chunk_size, seq_shards)
    weights = weights.astype(jnp.float32)
    compute_dtype = jnp.result_type(hidden.dtype, head_kernel.dtype)
    logits = jnp.einsum("bsh,hv->bsv", hidden.astype(compute_dtype),
                        head_kernel.astype(compute_dtype), precision=precision,
                        preferred_element_type=jnp.float32)
    logits = logits.astype(logits_dtype).astype(jnp.float32)  # [B, S, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab_ids = lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return LossSums(jnp.sum(weights * (lse - target_logit)), jnp.sum(weights),
                    jnp.sum(weights * correct))
