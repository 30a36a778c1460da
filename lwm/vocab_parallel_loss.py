"""The LM head's loss and gradients with the vocabulary split over the devices of `sp` x `tp`.

`lwm.loss` calls this for its forward-with-gradients pass when it has a mesh. The sequence is
sharded over `sp`, so the plain way to run the head gives every device the whole [H, V] kernel
(an all-gather of H * V floats) and leaves each with a whole [H, V] partial gradient to
reduce-scatter: two transfers of the head's size per step, plus H * V floats streamed from
memory by each of three matmuls per chunk. Here each device keeps a [H, V / (sp * tp)] slice of
the kernel and, chunk by chunk, sees every `sp` device's tokens instead (Megatron's
vocabulary-parallel cross-entropy, with the tokens gathered because they are sequence-sharded):

    per chunk (each device, c = chunk tokens per device, sp * c tokens in all):
      h_all   = all_gather_sp(h_c)                             [b, sp*c, H]
      logits  = h_all @ W_slice                                 [b, sp*c, V/(sp*tp)]
      per-slice max, sum exp, target logit, first argmax: one all_gather, combined locally
      dlogits = w * (softmax - onehot) = scale * E - w * onehot, E = exp(logits - slice max),
                never materialised: the row scale and the one-hot part are applied on the
                [sp*c, H] side
      dh      = psum_scatter_sp(scale * (E @ W_slice^T) - w * W_slice^T[target])
                                                                [b, c, H], back on its owner
      dW_slice += (scale * h_all)^T @ E, then -w * h_all scattered into the target columns
                                                                [H, V/(sp*tp)], never leaves
    after the loop: dW_slice -> the kernel's PS(('fsdp', 'sp'), 'tp') sharding (one all-to-all).

Same FLOPs and the same per-chunk logits size (b * c * V / tp floats) as the plain path; what
moves is 2 * sp * c * H floats per chunk instead of 2 * H * V per step, so it wins while the
sequence per batch shard is shorter than about V / 2 tokens (at 2K tokens and V = 32000 on
this project's 8-device CPU test machine, the head runs in 0.55x the time), and each
device's kernel slice stays in cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as PS

from lwm.mesh import BATCH_AXES, FSDP_SP, mesh_shape

VOCAB_AXES = ("sp", "tp")  # the devices holding vocabulary slices (slice tp * sp_size + sp)


def sum_over_chunks(chunk_fn, xs):
    """Run chunk_fn(*x) -> (partial, per_chunk) over the leading axis of xs: (sum of the
    partials, per_chunk outputs stacked). The first chunk's partial starts the sum, so no
    zero-filled accumulator (the head's whole size) is written and added; the rest loop."""
    total, first = chunk_fn(*(x[0] for x in xs))
    stacked = tuple(x[None] for x in first)
    if xs[0].shape[0] > 1:
        def step(total, x):
            partial, out = chunk_fn(*x)
            return total + partial, out

        total, rest = lax.scan(step, total, tuple(x[1:] for x in xs))
        stacked = tuple(jnp.concatenate([a, r]) for a, r in zip(stacked, rest))
    return total, stacked


def vocab_parallel_applies(mesh, vocab_size: int) -> bool:
    """Whether `vocab_parallel_grads` can run: a mesh whose sp * tp divides the vocabulary."""
    shape = mesh_shape(mesh)
    slices = shape["sp"] * shape["tp"]
    # token ids travel as float32 values, exact below 2^24
    return slices > 1 and vocab_size % slices == 0 and vocab_size < 2 ** 24


def vocab_parallel_grads(hidden, kernel, targets, weights, *, chunk, mesh, logits_dtype, precision):
    """Per-token (nll, correct) [B, S] and the gradients of sum(weights * nll): (dhidden
    [B, S, H] in hidden's dtype, dkernel [H, V] in the kernel's dtype and sharding).

    hidden [B, S, H] sharded PS(('dp','fsdp'), 'sp'); kernel [H, V] sharded PS(('fsdp','sp'),
    'tp'); targets, weights [B, S]; chunk: tokens per device per step (divides S / sp)."""
    shape = mesh_shape(mesh)
    sp, tp = shape["sp"], shape["tp"]
    vocab = kernel.shape[1]
    vocab_slice = vocab // (sp * tp)
    compute_dtype = jnp.result_type(hidden.dtype, kernel.dtype)

    def local(hidden, kernel, targets, weights):
        b, s_local, h = hidden.shape
        # [H / (fsdp sp), V / tp] -> [H, V / (sp tp)]: regroup over sp first, so that the fsdp
        # gather then stacks contiguous row blocks (rows are sharded fsdp-major, sp-minor).
        w_slice = lax.all_to_all(kernel, "sp", split_axis=1, concat_axis=0, tiled=True)
        if shape["fsdp"] > 1:
            w_slice = lax.all_gather(w_slice, "fsdp", axis=0, tiled=True)
        w_slice = w_slice.astype(compute_dtype)
        w_slice_t = jnp.transpose(w_slice)  # [V/(sp tp), H], once: dh's matmul and its target rows read it
        me = lax.axis_index("sp")
        offset = (lax.axis_index("tp") * sp + me) * vocab_slice  # first vocabulary id held here

        def chunk_grads(h_c, t_c, w_c):  # [b, c, H], [b, c], [b, c]
            # Every collective is a rendezvous of all devices, so a chunk makes three: the tokens'
            # gather (targets and weights ride along as extra float32 columns when hidden is
            # float32), one gather of per-slice softmax statistics, and the psum_scatter of dh.
            t_f = jnp.clip(t_c, -1, vocab).astype(jnp.float32)  # out-of-range ids stay out of range
            if h_c.dtype == jnp.float32:
                packed = lax.all_gather(jnp.concatenate([h_c, t_f[..., None], w_c[..., None]], axis=-1), "sp",
                                        axis=1, tiled=True)
                h_all, t_f, w_all = packed[..., :-2], packed[..., -2], packed[..., -1]
            else:
                h_all = lax.all_gather(h_c, "sp", axis=1, tiled=True)  # [b, sp*c, H]
                t_f, w_all = lax.all_gather(jnp.stack([t_f, w_c]), "sp", axis=2, tiled=True)
            t_all = t_f.astype(jnp.int32)
            logits = jnp.einsum("bch,hv->bcv", h_all.astype(compute_dtype), w_slice, precision=precision,
                                preferred_element_type=jnp.float32)
            logits = logits.astype(logits_dtype).astype(jnp.float32)  # [b, sp*c, V/(sp tp)]
            # Each slice reports (its max, sum exp(logits - its max), its share of the target
            # logit, the id of its first max) in one gather; every device then combines all of
            # them the same way: the row's max, logsumexp and first argmax (the lowest id
            # holding the max, as jnp.argmax picks).
            slice_max = jnp.max(logits, axis=-1)
            exp_shifted = jnp.exp(logits - slice_max[..., None])
            local_t = t_all - offset
            mine = (local_t >= 0) & (local_t < vocab_slice)
            picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, vocab_slice - 1)[..., None], axis=-1)[..., 0]
            # The first index holding the max, as a float max (ids are exact in float32): XLA's
            # CPU backend runs a float max reduction twice as fast as an integer min.
            neg_ids = -lax.broadcasted_iota(jnp.float32, logits.shape, 2)
            slice_first = offset - jnp.max(jnp.where(logits == slice_max[..., None], neg_ids, -float(vocab_slice)),
                                           axis=-1).astype(jnp.int32)
            stats = lax.all_gather(jnp.stack([slice_max, jnp.sum(exp_shifted, axis=-1), jnp.where(mine, picked, 0.0),
                                              slice_first.astype(jnp.float32)], axis=-1), VOCAB_AXES)
            maxes, sums, target_logit = stats[..., 0], stats[..., 1], jnp.sum(stats[..., 2], axis=0)
            row_max = jnp.max(maxes, axis=0)
            exp_sum = jnp.sum(sums * jnp.exp(maxes - row_max), axis=0)
            first_max = jnp.min(jnp.where(maxes == row_max, stats[..., 3], jnp.inf), axis=0)
            nll = row_max + jnp.log(exp_sum) - target_logit
            correct = (first_max == t_all).astype(jnp.float32)  # out-of-range targets never match
            scale = w_all * jnp.exp(slice_max - row_max) / exp_sum  # softmax = exp_shifted * this / w
            # dlogits = scale * exp_shifted - w * onehot(target) is never written out: the row scale
            # goes onto dh's rows and h's rows (each [sp*c, H], not [sp*c, V/(sp tp)]), and the
            # one-hot part is a gather of W's target rows for dh and a scatter into dW's target columns.
            e_c = exp_shifted.astype(compute_dtype)
            rows = jnp.clip(local_t, 0, vocab_slice - 1)
            target_w = jnp.where(mine, w_all, 0.0)
            dh = scale[..., None] * jnp.einsum("bcv,vh->bch", e_c, w_slice_t, precision=precision,
                                               preferred_element_type=jnp.float32)
            dh = dh - target_w[..., None] * jnp.take(w_slice_t, rows, axis=0).astype(jnp.float32)
            dh = lax.psum_scatter(dh, "sp", scatter_dimension=1, tiled=True)  # [b, c, H]: my tokens
            if tp > 1:
                dh = lax.psum(dh, "tp")
            h_all = h_all.astype(jnp.float32)
            # (h * scale)^T as [H, b*sp*c] rows: a plain matmul, not a transposed-operand one
            scaled_h_t = jnp.transpose((h_all * scale[..., None]).astype(compute_dtype), (2, 0, 1)).reshape(h, -1)
            dw = jnp.einsum("hn,nv->hv", scaled_h_t, e_c.reshape(-1, vocab_slice), precision=precision,
                            preferred_element_type=jnp.float32)
            dw = dw.at[:, rows.reshape(-1)].add(-(target_w[..., None] * h_all).reshape(-1, h).T)
            mine_only = lambda x: lax.dynamic_slice_in_dim(x, me * h_c.shape[1], h_c.shape[1], axis=1)
            return dw, (mine_only(nll), mine_only(correct), dh.astype(hidden.dtype))

        n = s_local // chunk
        xs = tuple(x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1) for x in (hidden, targets, weights))
        dw, per_token = sum_over_chunks(chunk_grads, xs)
        nll, correct, dhidden = (x.swapaxes(0, 1).reshape(b, s_local, *x.shape[3:]) for x in per_token)
        # [H, V / (sp tp)] -> sum over the batch shards -> [H / (fsdp sp), V / tp]
        if shape["fsdp"] > 1:
            dw = lax.psum_scatter(dw, "fsdp", scatter_dimension=0, tiled=True)
        dw = lax.all_to_all(dw, "sp", split_axis=0, concat_axis=1, tiled=True)
        if shape["dp"] > 1:
            dw = lax.psum(dw, "dp")
        return nll, correct, dhidden, dw.astype(kernel.dtype)

    tokens, kernel_spec = PS(BATCH_AXES, "sp"), PS(FSDP_SP, "tp")
    # check_vma=False: collectives over size-1 axes are skipped above, so shard_map cannot see
    # that the results are invariant over them.
    return jax.shard_map(local, mesh=mesh, in_specs=(tokens, kernel_spec, tokens, tokens),
                         out_specs=(tokens, tokens, tokens, kernel_spec), check_vma=False)(
        hidden, kernel, targets.astype(jnp.int32), weights)
