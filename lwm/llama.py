"""The LLaMA text model (flax linen) with LWM's parameter tree (docs/compatibility.md).

    transformer/wte/embedding                         [vocab, hidden]
    transformer/h/scan_decoder/attention/wq/kernel    [layers, hidden, heads*head_dim]   (scanned)
    transformer/h/0/attention/wq/kernel               [hidden, heads*head_dim]           (unscanned)
    ... attention/{wq,wk,wv,wo}, feed_forward/{w1,w2,w3}, attention_norm, ffn_norm
    transformer/ln_f/kernel                           [hidden]
    lm_head/kernel                                    [hidden, vocab]                    (unless tied)

Usage (training / scoring):
    model = LLaMAForCausalLM(config, mesh=mesh)
    out = model.apply({'params': params}, input_ids, segment_ids=segment_ids, position_ids=positions)
    out.logits  # [batch, seq, vocab]
    out = model.apply({'params': params}, input_ids, output_hidden_states=True)
    out.all_hidden_states  # layers + 1 arrays [batch, seq, hidden]: each layer's input, then the final norm's output

Decoding with a KV cache (left-padded prompt, then one token at a time):
    cache = init_cache(config, batch, max_length)
    out = model.apply(vars, prompt_ids, attention_mask=prompt_mask, cache=cache, prefill=True)
    out = model.apply(vars, next_ids, attention_mask=ones, cache=out.cache)

RoPE rotates interleaved pairs (dims 2i, 2i+1), as LWM does; Hugging Face's Llama rotates
split halves, so conversion permutes q/k rows (scripts/convert_*).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as PS

from lwm import ops
from lwm.config import LLaMAConfig
from lwm.mesh import ACTIVATION_SPEC, BATCH_AXES, mesh_shape, with_sharding_constraint

QKV_SPEC = PS(BATCH_AXES, "sp", "tp", None)  # [batch, seq, heads, head_dim]
CACHE_SPEC = PS(None, BATCH_AXES, "sp", "tp", None)  # [layers, batch, length, kv_heads, head_dim]
CACHE_MASK_SPEC = PS(BATCH_AXES, "sp")


# Values a layer tags for remat policies (besides the kernels' attention_out / attention_lse).
SAVE_ATTENTION_NAMES = ("attention_q", "attention_k", "attention_v", ops.common.OUT_NAME, ops.common.LSE_NAME)


def remat_policy(name: str):
    """A jax.checkpoint policy by name ('' means no rematerialisation: returns None).

    Besides jax.checkpoint_policies, 'save_attention' keeps the attention's inputs (q, k, v
    after RoPE) and results (output, log-sum-exp) and recomputes the rest of the layer
    (norms, RoPE, the output projection, the MLP): per token and layer it stores five
    vectors instead of about fourteen, and never re-runs the attention forward.
    """
    if not name:
        return None
    if name == "save_attention":
        return jax.checkpoint_policies.save_only_these_names(*SAVE_ATTENTION_NAMES)
    if name in ("dots_saveable", "checkpoint_dots"):
        # Inside the attention kernels every chunk pair's scores are batched dots: saving them
        # is quadratic memory (measured: 5 GB per device at 32K tokens). The layer's own dots
        # (projections, MLP) have no batch dimensions and are still saved.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return getattr(jax.checkpoint_policies, name)


# ---- KV cache ------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `length` slots, filled left to right."""

    k: jax.Array  # [layers, batch, length, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, length, kv_heads, head_dim]
    mask: jax.Array  # [batch, length] bool: the slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: the next slot to write

    @property
    def length(self) -> int:
        return self.k.shape[2]


def init_cache(config: LLaMAConfig, batch_size: int, length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `length` slots (prompt + new tokens)."""
    if length > config.max_sequence_length:
        raise ValueError(f"cache length {length} exceeds max_sequence_length={config.max_sequence_length}")
    shape = (config.num_hidden_layers, batch_size, length, config.num_key_value_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch_size, length), bool), index=jnp.zeros((), jnp.int32))


def cache_specs() -> KVCache:
    """PartitionSpecs of a KVCache: slots sharded over sp, kv heads over tp."""
    return KVCache(k=CACHE_SPEC, v=CACHE_SPEC, mask=CACHE_MASK_SPEC, index=PS())


@flax.struct.dataclass
class CausalLMOutput:
    logits: jax.Array | None  # [batch, seq, vocab] (None when compute_logits=False)
    hidden_states: jax.Array  # [batch, seq, hidden] after the final norm
    cache: KVCache | None = None
    vision_logits: jax.Array | None = None  # video-language model only
    # With output_hidden_states=True: num_hidden_layers + 1 arrays [batch, seq, hidden], the hidden
    # state entering each layer (the embeddings first) and then the final normed output (= hidden_states),
    # as LWM's and Hugging Face's Llama return them. None otherwise.
    all_hidden_states: tuple[jax.Array, ...] | None = None


# ---- building blocks -------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * kernel, normalised in float32 whatever the compute dtype."""

    dim: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.ones, (self.dim,), self.param_dtype)
        x32 = x.astype(jnp.promote_types(self.dtype, jnp.float32))
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * jnp.asarray(kernel, self.dtype)


_ROPE_SPLIT = 1024  # positions = hi * _ROPE_SPLIT + lo


def rotary_sin_cos(position_ids, head_dim: int, theta: float, max_length: int):
    """sin, cos [batch, seq, head_dim/2] float32 of position * theta^(-2i/head_dim).

    fp32 loses the angle at long range (at position 1e6 a float32 product is off by ~0.06 rad),
    so the angles are evaluated in float64 on the host for the two halves of the position
    (hi * 1024 and lo) and combined with the angle-addition formulas on device.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim/2]
    n_hi = max(1, -(-max_length // _ROPE_SPLIT))
    ang_hi = (np.arange(n_hi, dtype=np.float64) * _ROPE_SPLIT)[:, None] * freqs
    ang_lo = np.arange(_ROPE_SPLIT, dtype=np.float64)[:, None] * freqs
    hi, lo = position_ids // _ROPE_SPLIT, position_ids % _ROPE_SPLIT
    cos_hi, sin_hi = (jnp.asarray(f(ang_hi), jnp.float32)[hi] for f in (np.cos, np.sin))
    cos_lo, sin_lo = (jnp.asarray(f(ang_lo), jnp.float32)[lo] for f in (np.cos, np.sin))
    sin = sin_hi * cos_lo + cos_hi * sin_lo
    cos = cos_hi * cos_lo - sin_hi * sin_lo
    return sin, cos


def check_positions(position_ids, config: LLaMAConfig) -> None:
    """Raise unless every position is in [0, max_sequence_length).

    Inside jit the RoPE table lookup cannot fail: a position past the table silently reuses
    an earlier angle (out-of-range gathers clamp). Call this where positions are concrete:
    on the host batch before it enters a jitted step (any [batch, seq] int array).
    """
    positions = np.asarray(position_ids)
    if positions.size == 0:
        return
    low, high = int(positions.min()), int(positions.max())
    if low < 0:
        raise ValueError(f"position {low} is negative; positions count from 0")
    if high >= config.max_sequence_length:
        raise ValueError(f"position {high} is beyond max_sequence_length {config.max_sequence_length} (RoPE has no "
                         "angles past it); raise max_sequence_length via --update_llama_config")


def apply_rotary(x, sin, cos):
    """Rotate interleaved pairs of x [batch, seq, heads, head_dim] by the angles (sin, cos)."""
    b, s, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return out.reshape(b, s, h, d).astype(x.dtype)


def embedding_lookup(tables, ids, which=None, mesh=None):
    """tables[which][ids]: rows of one of several [vocab, hidden] tables per position.

    `which` (int or bool [batch, seq], default 0) picks the table per position (the video
    model's text `wte` and vision `vte`); ids out of a table's range give row 0 of it, which
    is never picked. All lookups run in one pass so a sharded mesh needs one set of collectives
    (XLA's CPU runtime can deadlock when independent collectives run concurrently).
    """
    which = None if len(tables) == 1 else which
    sizes = mesh_shape(mesh)
    b, s = ids.shape
    if sizes["fsdp"] * sizes["sp"] * sizes["tp"] > 1 and b % (sizes["dp"] * sizes["fsdp"]) == 0 \
            and s % sizes["sp"] == 0:
        return _sharded_lookup(tuple(tables), ids, which, mesh)
    # Decoding steps (one token, not divisible by sp) or no sharding: gather each table, so the
    # lookup stays local (a lookup from the sharded table makes XLA replicate its output).
    rows = [jnp.take(with_sharding_constraint(t, PS(None, None), mesh), ids, axis=0, mode="clip") for t in tables]
    return _pick(rows, which)


def _pick(rows, which):
    out = rows[0]
    for i, r in enumerate(rows[1:], start=1):
        out = jnp.where((which == i)[..., None], r, out)
    return out


def _sharded_lookup(tables, ids, which, mesh):
    """`embedding_lookup` for tables sharded PS('tp', ('fsdp','sp')) and ids PS(('dp','fsdp'), 'sp').

    Every device holds a [vocab/tp, hidden/(fsdp*sp)] slice of each table. It gathers the ids
    of all (fsdp, sp) shards (a few bytes per token), looks up its hidden slice for all of them
    (summing over tp, which splits the vocabulary), and one all_to_all regroups the slices into
    its own tokens' full rows: [batch, seq, hidden] sharded PS(('dp','fsdp'), 'sp', None).
    No device ever holds a whole table or its whole gradient (2 x 32 MB per device for a
    32000 x 256 table otherwise); the backward pass is the same collectives reversed.
    """
    sizes = mesh_shape(mesh)
    slices = sizes["fsdp"] * sizes["sp"]  # hidden slices, ordered fsdp-major as PS(('fsdp','sp')) lays them out

    def gather_tokens(x):  # [batch_l, seq_l] -> [fsdp*batch_l, sp*seq_l]
        return jax.lax.all_gather(jax.lax.all_gather(x, "fsdp", axis=0, tiled=True), "sp", axis=1, tiled=True)

    def lookup(tables, ids_shard, which_shard):
        b, s = ids_shard.shape
        ids_all = gather_tokens(ids_shard)
        rows = []
        for table in tables:  # [vocab/tp, hidden/slices]
            local = ids_all - jax.lax.axis_index("tp") * table.shape[0]
            valid = (local >= 0) & (local < table.shape[0])
            rows.append(jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0) * valid[..., None])
        rows = _pick(rows, None if which_shard is None else gather_tokens(which_shard))
        rows = jax.lax.psum(rows, "tp")  # [fsdp*b, sp*s, h_slice]
        h = rows.shape[-1]
        rows = rows.reshape(sizes["fsdp"], b, sizes["sp"], s, h).transpose(0, 2, 1, 3, 4).reshape(slices, b, s, h)
        rows = jax.lax.all_to_all(rows, ("fsdp", "sp"), 0, 0, tiled=False)  # [slices (of hidden), b, s, h]
        return rows.transpose(1, 2, 0, 3).reshape(b, s, slices * h)

    table_specs = tuple(PS("tp", ("fsdp", "sp")) for _ in tables)
    token_spec = PS(BATCH_AXES, "sp")
    if which is None:
        fn = jax.shard_map(lambda t, i: lookup(t, i, None), mesh=mesh, in_specs=(table_specs, token_spec),
                           out_specs=PS(BATCH_AXES, "sp", None))
        return fn(tables, ids)
    fn = jax.shard_map(lookup, mesh=mesh, in_specs=(table_specs, token_spec, token_spec),
                       out_specs=PS(BATCH_AXES, "sp", None))
    return fn(tables, ids, which.astype(jnp.int32))


class Embedding(nn.Module):
    """Holds one token embedding table `embedding` [vocab, hidden] (sharded PS('tp', ('fsdp','sp')))."""

    num_embeddings: int
    features: int
    init_std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.normal(self.init_std), (self.num_embeddings, self.features),
                          self.param_dtype)


class Kernel(nn.Module):
    """Holds one [in, out] `kernel` parameter (a bias-free Dense used functionally)."""

    shape: tuple[int, ...]
    init_std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.normal(self.init_std), self.shape, self.param_dtype)


def chunked_over_sequence(fn, x, chunk_size: int, mesh=None, policy=None, *args):
    """fn(x, *args) applied to chunks of the sequence axis of x [batch, seq, ...], rematerialised.

    `fn` must act on each position independently (an MLP, a norm). The scan runs over chunks
    *within* each sequence shard (the mesh's `sp`), so a sharded sequence is never gathered:
    [b, s, ...] -> [n, b, sp * chunk, ...]. A length that does not divide is padded (and the
    padding dropped), which only costs a reshard when sp > 1.
    """
    b, s = x.shape[:2]
    seq_shards = mesh_shape(mesh)["sp"]
    chunk = max(1, min(chunk_size, s // seq_shards))
    step = jax.checkpoint(fn, policy=policy or jax.checkpoint_policies.nothing_saveable)
    padded = -(-s // (seq_shards * chunk)) * seq_shards * chunk
    n = padded // (seq_shards * chunk)
    if n == 1 and padded == s:
        return step(x, *args)
    rest = x.shape[2:]
    if padded != s:
        x = jnp.pad(x, [(0, 0), (0, padded - s)] + [(0, 0)] * len(rest))
    # The stacked chunks are pinned to [None, batch, sp, replicated...]: without it XLA's CPU
    # SPMD partitioner miscomputes this scan when the result is constrained with the hidden
    # axis over tp (measured: wrong outputs on mesh 2,2,2,1).
    chunk_spec = PS(None, BATCH_AXES, "sp", *([None] * len(rest)))
    xs = x.reshape(b, seq_shards, n, chunk, *rest)
    xs = jnp.moveaxis(xs, 2, 0).reshape(n, b, seq_shards * chunk, *rest)
    xs = with_sharding_constraint(xs, chunk_spec, mesh)

    def body(carry, c):
        return carry, step(c, *args)

    _, ys = jax.lax.scan(body, None, xs)  # [n, b, sp*chunk, ...]
    ys = with_sharding_constraint(ys, PS(None, BATCH_AXES, "sp", *([None] * (ys.ndim - 3))), mesh)
    out_rest = ys.shape[3:]
    ys = ys.reshape(n, b, seq_shards, chunk, *out_rest)
    return jnp.moveaxis(ys, 0, 2).reshape(b, padded, *out_rest)[:, :s]


def swiglu(x, w1, w2, w3, dtype, precision=None):
    dot = partial(jnp.dot, precision=precision)
    x = x.astype(dtype)
    gate = jax.nn.silu(dot(x, w1.astype(dtype)))
    return dot(gate * dot(x, w3.astype(dtype)), w2.astype(dtype))


class ModelModule(nn.Module):
    """Fields shared by the model's modules."""

    config: LLaMAConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    precision: Any = None  # of the matmuls
    mesh: Any = None  # jax.sharding.Mesh with axes (dp, fsdp, tp, sp), or None


class LayerModule(ModelModule):
    """Fields shared by the parts of a decoder layer."""

    deterministic: bool = True  # no dropout
    prefill: bool = False  # with a cache: the cache is empty and x is the whole (padded) prompt

    def fields(self) -> dict:
        """These fields as keyword arguments for the next level's modules."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    mesh=self.mesh, deterministic=self.deterministic, prefill=self.prefill)


class FeedForward(LayerModule):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x); over sequence chunks with remat when scan_mlp."""

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h, i = cfg.hidden_size, cfg.intermediate_size
        w1 = Kernel((h, i), cfg.initializer_range, self.param_dtype, name="w1")()
        w2 = Kernel((i, h), cfg.initializer_range, self.param_dtype, name="w2")()
        w3 = Kernel((h, i), cfg.initializer_range, self.param_dtype, name="w3")()
        fn = partial(swiglu, dtype=self.dtype, precision=self.precision)
        if cfg.scan_mlp:
            out = chunked_over_sequence(fn, x, cfg.scan_mlp_chunk_size, self.mesh, remat_policy(cfg.remat_mlp),
                                        w1, w2, w3)
        else:
            out = fn(x, w1, w2, w3)
        return nn.Dropout(rate=cfg.resid_pdrop)(out, deterministic=self.deterministic)


class Attention(LayerModule):
    """Multi-head (grouped-query) attention with interleaved RoPE and an optional KV cache."""

    @nn.compact
    def __call__(self, x, sin, cos, segment_ids, layer_cache, cache_mask, cache_index):
        cfg = self.config
        b, s, _ = x.shape
        hd, heads, kv_heads = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        dense = partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, kernel_init=nn.initializers.normal(cfg.initializer_range))
        q = dense(heads * hd, name="wq")(x).reshape(b, s, heads, hd)
        k = dense(kv_heads * hd, name="wk")(x).reshape(b, s, kv_heads, hd)
        v = dense(kv_heads * hd, name="wv")(x).reshape(b, s, kv_heads, hd)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        q, k, v = (with_sharding_constraint(t, QKV_SPEC, self.mesh) for t in (q, k, v))
        q, k, v = (checkpoint_name(t, n) for t, n in zip((q, k, v), SAVE_ATTENTION_NAMES))

        new_cache = None
        if layer_cache is None or self.prefill:
            layout = cfg.sequence_layout if layer_cache is None else "contiguous"
            attend = partial(ops.attention, causal=True, impl=cfg.resolved_attention_impl(),
                             query_chunk_size=cfg.scan_query_chunk_size,
                             key_chunk_size=cfg.scan_key_chunk_size, mesh=self.mesh, layout=layout,
                             sp_attention=cfg.sp_attention)
            if cfg.remat_attention:
                attend = jax.checkpoint(attend, policy=remat_policy(cfg.remat_attention))
            out = attend(q, k, v, segment_ids)
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k_cache, v_cache)
            if not self.prefill:
                out = ops.cached_attention(q, k_cache, v_cache,
                                           cache_index, cache_mask, mesh=self.mesh)
        out = dense(cfg.hidden_size, name="wo")(out.reshape(b, s, heads * hd))
        out = nn.Dropout(rate=cfg.resid_pdrop)(out, deterministic=self.deterministic)
        return out, new_cache


class DecoderLayer(LayerModule):
    keep_input: bool = False  # also return the hidden state entering the layer (output_hidden_states)

    @nn.compact
    def __call__(self, x, layer_cache, sin, cos, segment_ids, cache_mask, cache_index):
        """-> (output [batch, seq, hidden], (new layer cache or None, x if keep_input else None))."""
        cfg = self.config
        norm = partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        h, new_cache = Attention(name="attention", **self.fields())(
            norm(name="attention_norm")(x), sin, cos, segment_ids, layer_cache, cache_mask, cache_index)
        out = x + h
        out = out + FeedForward(name="feed_forward", **self.fields())(norm(name="ffn_norm")(out))
        return with_sharding_constraint(out, ACTIVATION_SPEC, self.mesh), (new_cache, x if self.keep_input else None)


class LayerStack(LayerModule):
    """The decoder layers: one nn.scan ('scan_decoder') or a Python loop ('0', '1', ...)."""

    @nn.compact
    def __call__(self, x, sin, cos, segment_ids, cache: KVCache | None, output_hidden_states: bool = False):
        """-> (output, new (k, v) caches or None, the layers' inputs: a tuple of num_hidden_layers
        [batch, seq, hidden] arrays with output_hidden_states, else None)."""
        cfg = self.config
        layer_cls = DecoderLayer
        if cfg.remat_block:
            layer_cls = nn.remat(DecoderLayer, policy=remat_policy(cfg.remat_block),
                                 prevent_cse=not cfg.scan_layers)
        kwargs = dict(self.fields(), keep_input=output_hidden_states)
        cache_mask = None if cache is None else cache.mask
        cache_index = None if cache is None else cache.index
        layer_caches = None if cache is None else (cache.k, cache.v)
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": cfg.param_scan_axis},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
            )
            # The layers' inputs come out of the scan stacked: [layers, batch, seq, hidden].
            x, (new_caches, inputs) = scanned(name="scan_decoder", **kwargs)(
                x, layer_caches, sin, cos, segment_ids, cache_mask, cache_index)
            inputs = None if inputs is None else tuple(inputs[i] for i in range(cfg.num_hidden_layers))
        else:
            outs, inputs = [], []
            for i in range(cfg.num_hidden_layers):
                layer_cache = None if cache is None else (cache.k[i], cache.v[i])
                x, (c, layer_input) = layer_cls(name=str(i), **kwargs)(
                    x, layer_cache, sin, cos, segment_ids, cache_mask, cache_index)
                outs.append(c)
                inputs.append(layer_input)
            new_caches = None if cache is None else tuple(jnp.stack(t) for t in zip(*outs))
            inputs = tuple(inputs) if output_hidden_states else None
        return x, new_caches, inputs


class LLaMAModel(ModelModule):
    """Embeddings, decoder layers and the final norm (`transformer` in the parameter tree)."""

    @nn.compact
    def __call__(self, input_ids, segment_ids, position_ids, vision_masks=None, cache=None,
                 prefill=False, deterministic=True, output_hidden_states=False):
        """-> (final normed hidden states [batch, seq, hidden], new (k, v) caches or None), and with
        output_hidden_states a third element: the num_hidden_layers + 1 hidden states of
        `CausalLMOutput.all_hidden_states`."""
        cfg = self.config
        embed = partial(Embedding, features=cfg.hidden_size, init_std=cfg.initializer_range,
                        param_dtype=self.param_dtype)
        tables = [embed(cfg.vocab_size, name="wte")()]
        if hasattr(cfg, "vision_vocab_size"):  # positions under the vision mask use `vte`
            tables.append(embed(cfg.vision_vocab_size, name="vte")())
            vision_masks = jnp.zeros(input_ids.shape, bool) if vision_masks is None else vision_masks
        x = embedding_lookup(tables, input_ids, vision_masks, self.mesh).astype(self.dtype)
        x = nn.Dropout(rate=cfg.embd_pdrop)(x, deterministic=deterministic)
        x = with_sharding_constraint(x, ACTIVATION_SPEC, self.mesh)
        max_position = cfg.max_sequence_length if cache is None else max(cfg.max_sequence_length, cache.length)
        sin, cos = rotary_sin_cos(position_ids, cfg.head_dim, cfg.theta, max_position)
        x, new_caches, layer_inputs = LayerStack(cfg, self.dtype, self.param_dtype, self.precision, self.mesh,
                                                 deterministic, prefill, name="h")(
            x, sin, cos, segment_ids, cache, output_hidden_states)
        x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype, self.param_dtype, name="ln_f")(x)
        if output_hidden_states:
            return x, new_caches, layer_inputs + (x,)
        return x, new_caches


def default_positions(attention_mask, segment_ids, seq_len: int, cache: KVCache | None):
    """Positions when the caller gives none: count of real tokens before each one."""
    if cache is not None:
        prior = jnp.sum(cache.mask, axis=-1, keepdims=True, dtype=jnp.int32)  # real tokens already cached
        return jnp.maximum(prior + jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (1, seq_len))


def prepare_inputs(config: LLaMAConfig, mesh, input_ids, attention_mask, segment_ids, position_ids,
                   cache: KVCache | None):
    """Validate lengths and derive segment ids, positions and the updated cache mask."""
    b, s = input_ids.shape
    if s > config.max_sequence_length:
        raise ValueError(f"input length {s} exceeds max_sequence_length={config.max_sequence_length}")
    config.check_mesh(mesh_shape(mesh))
    if cache is not None and attention_mask is None:
        attention_mask = jnp.ones((b, s), jnp.int32)
    if attention_mask is not None:
        attention_mask = attention_mask.astype(jnp.int32)
        segment_ids = attention_mask if segment_ids is None else segment_ids * attention_mask
    if position_ids is not None and _is_host_checkable(position_ids):
        check_positions(position_ids, config)
    if position_ids is None:
        if cache is None and config.sequence_layout != "contiguous" and attention_mask is None:
            from lwm.ops.layout import global_index

            position_ids = jnp.asarray(global_index(config.sequence_layout, s, mesh_shape(mesh)["sp"]))[None]
        else:
            position_ids = default_positions(attention_mask, segment_ids, s, cache)
    position_ids = jnp.broadcast_to(position_ids, (b, s)).astype(jnp.int32)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    if cache is not None:
        mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(bool), (0, cache.index))
        cache = cache.replace(mask=mask)
    return segment_ids, position_ids, cache


def _is_host_checkable(x) -> bool:
    """A concrete array whose values this process can read (not a tracer, not a multi-host shard)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def finish_cache(cache: KVCache | None, new_caches, seq_len: int, mesh) -> KVCache | None:
    if cache is None:
        return None
    k, v = new_caches
    k = with_sharding_constraint(k, CACHE_SPEC, mesh)
    v = with_sharding_constraint(v, CACHE_SPEC, mesh)
    return cache.replace(k=k, v=v, index=cache.index + seq_len)


class LLaMAForCausalLM(ModelModule):
    """The text model with its LM head: `transformer` + `lm_head`."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, segment_ids=None, position_ids=None,
                 cache: KVCache | None = None, prefill: bool = False, deterministic: bool = True,
                 compute_logits: bool = True, output_hidden_states: bool = False) -> CausalLMOutput:
        """input_ids [batch, seq]; attention_mask [batch, seq] (1 real, 0 padding);
        segment_ids [batch, seq] (packed examples; 0 = padding); position_ids [batch, seq].
        output_hidden_states: also return every layer's hidden states (`all_hidden_states`)."""
        cfg = self.config
        segment_ids, position_ids, cache = prepare_inputs(
            cfg, self.mesh, input_ids, attention_mask, segment_ids, position_ids, cache)
        transformer = LLaMAModel(cfg, self.dtype, self.param_dtype, self.precision, self.mesh, name="transformer")
        hidden, new_caches, *all_hidden = transformer(
            input_ids, segment_ids, position_ids, cache=cache, prefill=prefill, deterministic=deterministic,
            output_hidden_states=output_hidden_states)
        if cfg.tie_word_embeddings:
            kernel = transformer.variables["params"]["wte"]["embedding"].T
        else:
            kernel = Kernel((cfg.hidden_size, cfg.vocab_size), cfg.initializer_range, self.param_dtype,
                            name="lm_head")()
        logits = head_logits(hidden, kernel, self.dtype, self.precision) if compute_logits else None
        return CausalLMOutput(logits=logits, hidden_states=hidden,
                              cache=finish_cache(cache, new_caches, input_ids.shape[1], self.mesh),
                              all_hidden_states=all_hidden[0] if all_hidden else None)


def head_logits(hidden, kernel, dtype, precision=None):
    return jnp.dot(hidden.astype(dtype), kernel.astype(dtype), precision=precision)


def lm_head_kernel(params, config: LLaMAConfig):
    """The [hidden, vocab] LM head of a params tree (the embedding transposed when tied)."""
    if config.tie_word_embeddings:
        return params["transformer"]["wte"]["embedding"].T
    return params["lm_head"]["kernel"]


def init_params(config: LLaMAConfig, rng, model_cls: type[nn.Module] | None = None):
    """Random float32 parameters of `model_cls` (default: the text model); wrap in
    `jax.eval_shape` for shapes only. The video-language model's: `lwm.vision_llama.init_params`
    (this module never imports the vision model, which is built on it)."""
    if model_cls is None:
        if hasattr(config, "vision_vocab_size"):
            raise ValueError(f"{type(config).__name__} is the video-language model's config: use "
                             "lwm.vision_llama.init_params (or pass model_cls=VideoLLaMAForCausalLM)")
        model_cls = LLaMAForCausalLM
    ids = jnp.zeros((1, min(config.max_sequence_length, 8)), jnp.int32)
    return model_cls(config).init({"params": rng, "dropout": rng}, ids)["params"]
