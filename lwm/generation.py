"""The one sampler every entry point uses: needle evals, text chat, vision chat and vision generation.

A left-padded prompt is prefilled into a KV cache in one call, then tokens come one at a time
from a jit-compiled `lax.while_loop` (or, for streaming, a Python loop over the *same* jitted
step function). Each step turns the last logits into a token (classifier-free guidance, then
greedy or temperature / top-k / top-p sampling, then forced tokens and eos bookkeeping) and
feeds that token back through the model.

    sampler = Sampler(loaded.model, loaded.params, mesh=loaded.mesh)
    ids, mask = tokenizer.batch_encode(prompts)                  # [B, L] left-padded
    out = sampler.generate(ids, mask, jax.random.key(0),
                           SamplingParams(max_new_tokens=64, temperature=0.0, eos_token_id=2))
    out.tokens   # [B, 64] int32, pad_token_id after each row's eos
    out.lengths  # [B] tokens generated per row, eos included

Prompt length. The prefill runs the blockwise/ring attention kernels, whose chunk sizes must
divide the per-device sequence, so the sampler pads every prompt further on the left (mask 0)
to a multiple of the *block size* `lcm(scan_query_chunk_size, scan_key_chunk_size) * sp`
(the original's `max(query_chunk, key_chunk) * sp` for the usual power-of-two chunks).
Positions come from the attention mask, so extra left padding never changes the output.
The cache holds `padded prompt + max_new_tokens` slots (rounded up to a multiple of
256 * sp where that fits, else of 64 * sp, 8 * sp or sp), which must fit `max_sequence_length`.

Batch. Rows are sharded over the mesh's data axes ('dp', 'fsdp'); a batch that does not
divide them is padded with copies of its last row (dropped from the output). With
`cfg_scale != 1` the batch is `[conditional rows; unconditional rows]`, both halves the
same size; logits mix as `uncond + cfg_scale * (cond - uncond)` and the sampled token is
appended to both rows of a pair (Ho & Salimans 2022, arXiv:2207.12598).

Forced tokens. `forced_tokens` [max_new_tokens] holds -1 (sample) or the token to emit at
that step; the vision generator forces 8192 (end of frame) at every 257th step.

Video-language model. `sample_mode='vision'` samples from `vision_logits` and feeds the
tokens back with vision mask True; `'text'` samples text tokens (vision mask False).
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from lwm.llama import KVCache, cache_specs, head_logits, init_cache, lm_head_kernel
from lwm.mesh import (BATCH_AXES, BATCH_SPEC, gather_array, match_partition_rules, mesh_shape, partition_rules,
                      shard_array)

SAMPLE_MODES = ("text", "vision")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; hashable, so one compiled loop is kept per setting."""

    max_new_tokens: int  # tokens generated per row (the loop stops earlier when every row hit eos)
    temperature: float = 1.0  # 0.0 -> greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 -> off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0 -> off
    cfg_scale: float = 1.0  # != 1.0: batch is [cond; uncond], logits = uncond + scale * (cond - uncond)
    eos_token_id: int | None = None  # None: never stop early
    pad_token_id: int = 0  # written after a row stopped
    vocab_limit: int | None = None  # sample only ids < vocab_limit (e.g. 8192 VQGAN codes); forced tokens may exceed

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.vocab_limit is not None and self.vocab_limit <= 0:
            raise ValueError(f"vocab_limit must be positive (None = off), got {self.vocab_limit}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # [batch (cond rows only with cfg), max_new_tokens] int32, pad after eos
    lengths: np.ndarray  # [batch] generated tokens per row, eos included


@flax.struct.dataclass
class DecodeState:
    """Everything the loop carries between steps (one row per model row unless noted)."""

    step: jax.Array  # int32 scalar: tokens generated so far
    cache: KVCache  # prompt and generated tokens' keys/values
    logits: jax.Array  # [model rows, vocab] float32: next-token logits
    done: jax.Array  # [output rows] bool: the row has emitted eos
    tokens: jax.Array  # [output rows, max_new_tokens] int32
    lengths: jax.Array  # [output rows] int32
    rng: jax.Array  # PRNG key


def state_specs() -> DecodeState:
    """PartitionSpecs of a DecodeState: rows over the data axes, the cache over sp."""
    rows = PS(BATCH_AXES)
    return DecodeState(step=PS(), cache=cache_specs(), logits=PS(BATCH_AXES, None), done=rows,
                       tokens=PS(BATCH_AXES, None), lengths=rows, rng=PS())


# ---- token choice (pure functions of logits) -----------------------------------------------


def mix_cfg(logits, cfg_scale: float):
    """[2n, V] logits of [cond; uncond] rows -> [n, V]: uncond + cfg_scale * (cond - uncond)."""
    if logits.shape[0] % 2:
        raise ValueError(f"classifier-free guidance needs [cond; uncond] rows, got an odd batch {logits.shape[0]}")
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + cfg_scale * (cond - uncond)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """-inf everywhere but the top_k largest logits, then outside the top_p nucleus.

    The nucleus keeps a token when the probability of the tokens ranked above it is < top_p,
    so the most likely token always survives. E.g. probs [.5, .3, .15, .05], top_p=.75 keeps
    tokens 0 and 1 (mass before them: 0 and .5), drops 2 (.8) and 3 (.95).
    Ties at the cut-off are all kept. logits: [rows, V] float32.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        if top_k <= 64:
            kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [rows, 1]
        else:  # a large k: one sort is much faster than lax.top_k on CPU (8192 of 8448: 6x)
            kth_largest = jnp.sort(logits, axis=-1)[..., vocab - top_k:vocab - top_k + 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        ranked = jnp.sort(logits, axis=-1)[..., ::-1]  # [rows, V] descending
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # [rows, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_tokens(logits, rng, sampling: SamplingParams):
    """Tokens [rows] from logits [model rows, V]: cfg mix, then argmax or filtered sampling."""
    logits = logits.astype(jnp.float32)
    if sampling.uses_cfg:
        logits = mix_cfg(logits, sampling.cfg_scale)
    if sampling.vocab_limit is not None and sampling.vocab_limit < logits.shape[-1]:
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        logits = jnp.where(ids < sampling.vocab_limit, logits, -jnp.inf)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ---- prompt and cache sizes -----------------------------------------------------------------


def block_size(config, mesh=None) -> int:
    """Prompt lengths are padded to a multiple of this: lcm(query chunk, key chunk) * sp."""
    return math.lcm(config.scan_query_chunk_size, config.scan_key_chunk_size) * mesh_shape(mesh)["sp"]


def padded_prompt_length(length: int, config, mesh=None) -> int:
    """The prefill length for a prompt of `length` tokens (>= 1): the next multiple of the block size."""
    block = block_size(config, mesh)
    return max(1, -(-length // block)) * block


def cache_length(prompt_length: int, max_new_tokens: int, config, mesh=None, unpadded: int | None = None,
                 what: str = "the prompt", fixes: str = "") -> int:
    """Cache slots for a padded prompt plus new tokens, checked against max_sequence_length
    (`unpadded`, `what` and `fixes` word the error: `room_error`)."""
    sp = mesh_shape(mesh)["sp"]
    needed = prompt_length + max_new_tokens
    # The cache splits evenly over sp, and decode attention scans each shard in chunks of the
    # largest divisor <= 4096 of its length: a round length keeps that chunk large (an odd
    # length like 16449 = 3 * 5483 would mean 5483 chunks of 3 slots, measured 16x slower).
    for granule in (256 * sp, 64 * sp, 8 * sp, sp):
        length = -(-needed // granule) * granule
        if length <= config.max_sequence_length:
            break
    if length > config.max_sequence_length:
        raise ValueError(room_error(what, prompt_length if unpadded is None else unpadded, max_new_tokens, config,
                                    mesh, fixes=fixes))
    return length


def room_for_new_tokens(prompt_length: int, config, mesh=None) -> int:
    """How many tokens fit in the cache after a prompt padded to `prompt_length`."""
    sp = mesh_shape(mesh)["sp"]
    return config.max_sequence_length // sp * sp - prompt_length


def room_error(what: str, prompt_tokens: int, answer_tokens: int, config, mesh=None, fixes: str = "") -> str:
    """Why a prompt and its answer do not fit, with the arithmetic and the changes that would fit:

    the question is 37 tokens, padded to 8192 (prompts are padded to a multiple of the block size
    8192 = attention chunk 1024 x sp 8); with 1 token for the answer that needs 8193 positions, more
    than max_sequence_length=2048. To fit: attention chunks of at most 128 (...), ... or
    max_sequence_length >= 8200 (...)
    """
    sp = mesh_shape(mesh)["sp"]
    q, k = config.scan_query_chunk_size, config.scan_key_chunk_size
    block = block_size(config, mesh)
    chunk = f"attention chunk {q}" if q == k else f"lcm(query chunk {q}, key chunk {k}) = {math.lcm(q, k)}"
    padded = padded_prompt_length(prompt_tokens, config, mesh)
    needed = padded + answer_tokens
    room = config.max_sequence_length // sp * sp - answer_tokens  # what the padded prompt may take

    def fits(chunk_size: int, shards: int) -> bool:
        return -(-prompt_tokens // (chunk_size * shards)) * chunk_size * shards <= room

    ways = []
    smaller = next((c for c in (2 ** i for i in range(min(q, k).bit_length() - 1, -1, -1)) if c < max(q, k)
                    and fits(c, sp)), None)
    if smaller:
        ways.append(f"attention chunks of at most {smaller} (--llama.scan_query_chunk_size and "
                    "--llama.scan_key_chunk_size, or the same in --update_llama_config)")
    if sp > 1 and fits(math.lcm(q, k), 1):
        ways.append(f"less sequence parallelism (sp={sp} in --mesh_dim)")
    if fixes:
        ways.append(fixes)
    ways.append(f"max_sequence_length >= {-(-needed // sp) * sp} "
                "(--update_llama_config=\"dict(max_sequence_length=...)\")")
    unit = "token" if answer_tokens == 1 else "tokens"
    return (f"{what} is {prompt_tokens} tokens, padded to {padded} (prompts are padded to a multiple of the block "
            f"size {block} = {chunk} x sp {sp}); with {answer_tokens} {unit} for the answer that needs {needed} "
            f"positions, more than max_sequence_length={config.max_sequence_length}. To fit: "
            + (f"{', '.join(ways[:-1])} or {ways[-1]}" if len(ways) > 1 else ways[0]))


def left_pad(array: np.ndarray, length: int, value=0) -> np.ndarray:
    """[B, L] -> [B, length] with `value` columns added on the left."""
    extra = length - array.shape[1]
    if extra < 0:
        raise ValueError(f"cannot left-pad a [*, {array.shape[1]}] array to the shorter length {length}")
    return np.pad(array, [(0, 0), (extra, 0)], constant_values=value)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Append copies of the last row until there are `rows` rows."""
    extra = rows - array.shape[0]
    return array if extra == 0 else np.concatenate([array, np.repeat(array[-1:], extra, axis=0)], axis=0)


# ---- the sampler ------------------------------------------------------------------------------


class Sampler:
    """Prefill + decode loop for `LLaMAForCausalLM` or `VideoLLaMAForCausalLM`.

    `model` must carry the mesh it runs on (`Model(config, mesh=mesh)`, as `load_model` builds
    it); params are placed by the partition rules (a no-op for params `load_model` returned).
    `cache_dtype` defaults to the model's compute dtype.
    """

    def __init__(self, model, params, mesh=None, cache_dtype=None):
        self.model = model
        self.config = model.config
        self.mesh = mesh if mesh is not None else model.mesh
        if mesh is not None and model.mesh is not None and model.mesh is not mesh and model.mesh != mesh:
            raise ValueError("the model was built for a different mesh than the one given to Sampler")
        if self.mesh is not None and model.mesh is None:
            raise ValueError("Sampler got a mesh but the model has none: build it as Model(config, mesh=mesh)")
        self.is_vision = hasattr(self.config, "vision_vocab_size")
        self.cache_dtype = jnp.dtype(cache_dtype if cache_dtype is not None else model.dtype)
        sizes = mesh_shape(self.mesh)
        self.data_dim = sizes["dp"] * sizes["fsdp"]
        if self.mesh is not None:
            specs = match_partition_rules(partition_rules(self.config.scan_layers, self.config.param_scan_axis), params)
            self.param_shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                                                is_leaf=lambda x: isinstance(x, PS))
            params = jax.device_put(params, self.param_shardings)
        else:
            self.param_shardings = None
        self.params = params
        self._compiled: dict[tuple, Any] = {}

    # ---- model calls (traced inside jit) -------------------------------------------------
    def _apply(self, params, ids, mask, vision_masks, cache, *, prefill: bool, sample_mode: str):
        kwargs = dict(attention_mask=mask, cache=cache, prefill=prefill, compute_logits=not prefill)
        if self.is_vision:
            kwargs.update(vision_masks=vision_masks, sample_mode=sample_mode)
        out = self.model.apply({"params": params}, ids, **kwargs)
        if prefill:  # only the last position's logits: never an [B, L, vocab] array
            logits = self._head(params, out.hidden_states[:, -1:], sample_mode)
        else:
            logits = out.vision_logits if sample_mode == "vision" else out.logits
        return logits[:, -1].astype(jnp.float32), out.cache  # [B, V]

    def _head(self, params, hidden, sample_mode):
        if sample_mode == "vision":
            from lwm.vision_llama import vision_head_kernel

            kernel = vision_head_kernel(params, self.config)
        else:
            kernel = lm_head_kernel(params, self.config)
        return head_logits(hidden, kernel, self.model.dtype, self.model.precision)

    def _prefill(self, params, ids, mask, vision_masks, key_data, *, sampling: SamplingParams, sample_mode: str,
                 cache_len: int, key_impl: str) -> DecodeState:
        # The key travels as raw uint32 data: a global array like any other input on multi-host.
        rng = jax.random.wrap_key_data(key_data, impl=key_impl)
        b = ids.shape[0]
        out_rows = b // 2 if sampling.uses_cfg else b
        cache = init_cache(self.config, b, cache_len, self.cache_dtype)
        logits, cache = self._apply(params, ids, mask, vision_masks, cache, prefill=True, sample_mode=sample_mode)
        return DecodeState(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
                           done=jnp.zeros((out_rows,), bool),
                           tokens=jnp.full((out_rows, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32),
                           lengths=jnp.zeros((out_rows,), jnp.int32), rng=rng)

    def _step(self, params, state: DecodeState, forced, *, sampling: SamplingParams, sample_mode: str):
        """Choose one token per row from state.logits, record it, and feed it through the model."""
        rng, key = jax.random.split(state.rng)
        chosen = sample_tokens(state.logits, key, sampling)  # [out rows]
        forced_now = forced[state.step]
        chosen = jnp.where(forced_now >= 0, forced_now, chosen)
        chosen = jnp.where(state.done, sampling.pad_token_id, chosen)
        lengths = state.lengths + (~state.done).astype(jnp.int32)
        done = state.done
        if sampling.eos_token_id is not None:
            done = done | (chosen == sampling.eos_token_id)
        tokens = jax.lax.dynamic_update_slice(state.tokens, chosen[:, None], (0, state.step))
        fed = jnp.concatenate([chosen, chosen]) if sampling.uses_cfg else chosen  # both halves of a cfg pair
        fed = fed[:, None]  # [model rows, 1]
        vision_masks = jnp.full(fed.shape, sample_mode == "vision")
        logits, cache = self._apply(params, fed, jnp.ones(fed.shape, jnp.int32), vision_masks, state.cache,
                                    prefill=False, sample_mode=sample_mode)
        new_state = DecodeState(step=state.step + 1, cache=cache, logits=logits, done=done, tokens=tokens,
                                lengths=lengths, rng=rng)
        return new_state, chosen

    def _loop(self, params, ids, mask, vision_masks, key_data, forced, *, sampling, sample_mode, cache_len, key_impl):
        state = self._prefill(params, ids, mask, vision_masks, key_data, sampling=sampling, sample_mode=sample_mode,
                              cache_len=cache_len, key_impl=key_impl)
        return self._decode(params, state, forced, sampling=sampling, sample_mode=sample_mode)

    def _decode(self, params, state: DecodeState, forced, *, sampling, sample_mode):
        def keep_going(s):
            return (s.step < sampling.max_new_tokens) & ~jnp.all(s.done)

        def body(s):
            return self._step(params, s, forced, sampling=sampling, sample_mode=sample_mode)[0]

        state = jax.lax.while_loop(keep_going, body, state)
        return state.tokens, state.lengths

    # ---- jitted functions, one per (kind, sampling, mode, cache length, key kind) -------
    def _jitted(self, kind: str, sampling: SamplingParams, sample_mode: str, cache_len: int, key_impl: str):
        key = (kind, sampling, sample_mode, cache_len, key_impl)
        if key in self._compiled:
            return self._compiled[key]
        static = dict(sampling=sampling, sample_mode=sample_mode)
        if self.mesh is None:
            shard = lambda spec: None  # noqa: E731
            params_sh = None
        else:
            shard = lambda spec: jax.tree.map(lambda s: NamedSharding(self.mesh, s), spec,  # noqa: E731
                                              is_leaf=lambda x: isinstance(x, PS))
            params_sh = self.param_shardings
        batch_sh, rows_sh, rep = shard(BATCH_SPEC), shard(PS(BATCH_AXES)), shard(PS())
        if kind == "loop":
            fn = jax.jit(partial(self._loop, cache_len=cache_len, key_impl=key_impl, **static),
                         in_shardings=(params_sh, batch_sh, batch_sh, batch_sh, rep, rep),
                         out_shardings=(shard(PS(BATCH_AXES, None)), rows_sh))
        elif kind == "decode":
            fn = jax.jit(partial(self._decode, **static), in_shardings=(params_sh, shard(state_specs()), rep),
                         out_shardings=(shard(PS(BATCH_AXES, None)), rows_sh))
        elif kind == "prefill":
            fn = jax.jit(partial(self._prefill, cache_len=cache_len, key_impl=key_impl, **static),
                         in_shardings=(params_sh, batch_sh, batch_sh, batch_sh, rep),
                         out_shardings=shard(state_specs()))
        else:
            fn = jax.jit(partial(self._step, **static), in_shardings=(params_sh, shard(state_specs()), rep),
                         out_shardings=(shard(state_specs()), rows_sh), donate_argnums=1)
        self._compiled[key] = fn
        return fn

    # ---- host side ------------------------------------------------------------------------
    def _prepare(self, input_ids, attention_mask, rng, sampling, vision_masks, sample_mode, forced_tokens):
        if sample_mode not in SAMPLE_MODES:
            raise ValueError(f"sample_mode={sample_mode!r}; expected one of {SAMPLE_MODES}")
        if sample_mode == "vision" and not self.is_vision:
            raise ValueError("sample_mode='vision' needs the video-language model (VideoLLaMAForCausalLM)")
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [batch, length]; got {ids.shape} and "
                             f"{mask.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"empty prompt batch {ids.shape}")
        if not np.all(mask[:, -1]):
            raise ValueError("prompts must be left-padded: the last column of attention_mask has a 0 (a "
                             "right-padded row, or an empty prompt)")
        if vision_masks is None:
            vision_masks = np.zeros(ids.shape, bool)
        else:
            if not self.is_vision:
                raise ValueError("vision_masks given, but the text model has no vision embeddings")
            vision_masks = np.asarray(vision_masks, bool)
            if vision_masks.shape != ids.shape:
                raise ValueError(f"vision_masks shape {vision_masks.shape} != input_ids shape {ids.shape}")
        text_ids = ids[(mask != 0) & ~vision_masks]
        bad = text_ids[(text_ids < 0) | (text_ids >= self.config.vocab_size)]
        if bad.size:  # an embedding lookup out of range gives garbage, not an error
            raise ValueError(f"prompt token id {int(bad[0])} is outside the model's text vocabulary "
                             f"[0, {self.config.vocab_size}): use the tokenizer the checkpoint was trained with")
        if forced_tokens is None:
            forced = np.full((sampling.max_new_tokens,), -1, np.int32)
        else:
            forced = np.asarray(forced_tokens, np.int32)
            if forced.shape != (sampling.max_new_tokens,):
                raise ValueError(f"forced_tokens shape {forced.shape} != (max_new_tokens,) = "
                                 f"{(sampling.max_new_tokens,)}")
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        rng = jnp.asarray(rng)
        if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            key_impl, key_data = str(jax.random.key_impl(rng)), np.asarray(jax.random.key_data(rng))
        else:  # a raw uint32 key (jax.random.PRNGKey) of the default implementation
            key_impl, key_data = str(jax.random.key_impl(jax.random.wrap_key_data(rng))), np.asarray(rng)

        rows = ids.shape[0]
        if sampling.uses_cfg:
            if rows % 2:
                raise ValueError(f"cfg_scale={sampling.cfg_scale} needs [cond; uncond] rows, got an odd batch {rows}")
            out_rows = rows // 2
            padded_rows = -(-out_rows // self.data_dim) * self.data_dim
            halves = lambda a: np.concatenate([_pad_rows(h, padded_rows) for h in np.split(a, 2)])  # noqa: E731
        else:
            out_rows = rows
            padded_rows = -(-rows // self.data_dim) * self.data_dim
            halves = lambda a: _pad_rows(a, padded_rows)  # noqa: E731
        length = padded_prompt_length(ids.shape[1], self.config, self.mesh)
        cache_len = cache_length(length, sampling.max_new_tokens, self.config, self.mesh)
        ids = halves(left_pad(ids.astype(np.int32), length))
        mask = halves(left_pad(mask.astype(np.int32), length))
        vision_masks = halves(left_pad(vision_masks, length, False))
        if self.mesh is not None:
            batch, replicated = NamedSharding(self.mesh, BATCH_SPEC), NamedSharding(self.mesh, PS())
            ids, mask, vision_masks = (shard_array(a, batch) for a in (ids, mask, vision_masks))
            key_data, forced = shard_array(key_data, replicated), shard_array(forced, replicated)
        return ids, mask, vision_masks, (key_impl, key_data), forced, out_rows, cache_len

    def generate(self, input_ids, attention_mask, rng, sampling: SamplingParams, *, vision_masks=None,
                 sample_mode: str = "text", forced_tokens=None) -> GenerationOutput:
        """Generate up to `sampling.max_new_tokens` per row in one compiled while_loop.

        input_ids / attention_mask [B, L] left-padded; vision_masks [B, L] bool (video-language
        model); forced_tokens None or [max_new_tokens] int (-1 = sample). With cfg the batch is
        [cond; uncond] and the output holds the cond rows.
        """
        ids, mask, vmask, (impl, key), forced, out_rows, cache_len = self._prepare(
            input_ids, attention_mask, rng, sampling, vision_masks, sample_mode, forced_tokens)
        fn = self._jitted("loop", sampling, sample_mode, cache_len, impl)
        tokens, lengths = fn(self.params, ids, mask, vmask, key, forced)
        return GenerationOutput(tokens=gather_array(tokens)[:out_rows], lengths=gather_array(lengths)[:out_rows])

    def prefill(self, input_ids, attention_mask, rng, sampling: SamplingParams, *, vision_masks=None,
                sample_mode: str = "text") -> DecodeState:
        """The state after the prompt (cache filled, first logits ready); rows padded to the mesh."""
        ids, mask, vmask, (impl, key), _, _, cache_len = self._prepare(
            input_ids, attention_mask, rng, sampling, vision_masks, sample_mode, None)
        return self._jitted("prefill", sampling, sample_mode, cache_len, impl)(self.params, ids, mask, vmask, key)

    def decode(self, state: DecodeState, sampling: SamplingParams, *, sample_mode: str = "text",
               forced_tokens=None) -> GenerationOutput:
        """The while_loop of `generate` from a `prefill` state (which is not consumed); rows as
        padded to the mesh. `generate` = `prefill` + `decode`, compiled as one program."""
        forced = np.full((sampling.max_new_tokens,), -1, np.int32) if forced_tokens is None else \
            np.asarray(forced_tokens, np.int32)
        if state.tokens.shape[1] != sampling.max_new_tokens or forced.shape != (sampling.max_new_tokens,):
            raise ValueError(f"the state was prefilled for {state.tokens.shape[1]} new tokens and forced_tokens has "
                             f"shape {forced.shape}; sampling asks for {sampling.max_new_tokens}")
        if self.mesh is not None:
            forced = shard_array(forced, NamedSharding(self.mesh, PS()))
        fn = self._jitted("decode", sampling, sample_mode, state.cache.length, "")
        tokens, lengths = fn(self.params, state, forced)
        return GenerationOutput(tokens=gather_array(tokens), lengths=gather_array(lengths))

    def stream(self, input_ids, attention_mask, rng, sampling: SamplingParams, *, vision_masks=None,
               sample_mode: str = "text", forced_tokens=None) -> Iterator[np.ndarray]:
        """Yield each step's tokens [B] (cond rows with cfg) as they are chosen; stops when every
        row has emitted eos or after max_new_tokens. Same tokens as `generate` for the same rng."""
        ids, mask, vmask, (impl, key), forced, out_rows, cache_len = self._prepare(
            input_ids, attention_mask, rng, sampling, vision_masks, sample_mode, forced_tokens)
        state = self._jitted("prefill", sampling, sample_mode, cache_len, impl)(self.params, ids, mask, vmask, key)
        step = self._jitted("step", sampling, sample_mode, cache_len, impl)
        done = np.zeros((out_rows,), bool)
        for _ in range(sampling.max_new_tokens):
            if done.all():
                return
            state, chosen = step(self.params, state, forced)
            chosen = gather_array(chosen)[:out_rows]
            yield chosen
            if sampling.eos_token_id is not None:
                done |= chosen == sampling.eos_token_id
