"""The video-language model: the text model plus vision-token embeddings and a vision head.

Parameter tree (LWM's; docs/compatibility.md): the text model's tree plus
    transformer/vte/embedding   [vision_vocab, hidden]
    vision_head/kernel          [hidden, vision_vocab]      (unless tie_vision_embeddings)

Each position embeds through `wte` or `vte` as its vision mask says (VQGAN codes and the
8192/8193 frame markers are vision tokens, everything else text). Everything else (RoPE,
attention kernels, scan, GQA, KV cache, sharding rules) is the text model's own code.

    params = init_params(config, jax.random.key(0))  # random weights (this module's init_params)
    model = VideoLLaMAForCausalLM(config, mesh=mesh)
    out = model.apply({'params': params}, input_ids, vision_masks=vision_masks, sample_mode='all')
    out.logits, out.vision_logits  # [batch, seq, vocab], [batch, seq, vision_vocab]
"""
from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp

from lwm import llama
from lwm.config import VideoLLaMAConfig
from lwm.llama import (CausalLMOutput, KVCache, Kernel, LLaMAModel, ModelModule, finish_cache, head_logits,
                       prepare_inputs)


class VideoLLaMAForCausalLM(ModelModule):
    """`transformer` (with `wte` and `vte`) + `lm_head` + `vision_head`; config: VideoLLaMAConfig."""

    @nn.compact
    def __call__(self, input_ids, vision_masks=None, attention_mask=None, segment_ids=None, position_ids=None,
                 cache: KVCache | None = None, prefill: bool = False, deterministic: bool = True,
                 compute_logits: bool = True, sample_mode: str | None = None,
                 output_hidden_states: bool = False) -> CausalLMOutput:
        """As `LLaMAForCausalLM.__call__`, plus vision_masks [batch, seq] bool and the heads to
        evaluate: sample_mode 'all' (both), 'text' or 'vision' (default: config.sample_mode)."""
        cfg = self.config
        mode = sample_mode or cfg.sample_mode
        if mode not in ("all", "text", "vision"):
            raise ValueError(f"sample_mode={mode!r}; expected 'all', 'text' or 'vision'")
        if vision_masks is None:
            vision_masks = jnp.zeros(input_ids.shape, bool)
        segment_ids, position_ids, cache = prepare_inputs(
            cfg, self.mesh, input_ids, attention_mask, segment_ids, position_ids, cache)
        transformer = LLaMAModel(cfg, self.dtype, self.param_dtype, self.precision, self.mesh, name="transformer")
        hidden, new_caches, *all_hidden = transformer(
            input_ids, segment_ids, position_ids, vision_masks=vision_masks, cache=cache, prefill=prefill,
            deterministic=deterministic, output_hidden_states=output_hidden_states)
        embeddings = transformer.variables["params"]
        if cfg.tie_word_embeddings:
            text_kernel = embeddings["wte"]["embedding"].T
        else:
            text_kernel = Kernel((cfg.hidden_size, cfg.vocab_size), cfg.initializer_range, self.param_dtype,
                                 name="lm_head")()
        if cfg.tie_vision_embeddings:
            vision_kernel = embeddings["vte"]["embedding"].T
        else:
            vision_kernel = Kernel((cfg.hidden_size, cfg.vision_vocab_size), cfg.initializer_range,
                                   self.param_dtype, name="vision_head")()
        logits = vision_logits = None
        if compute_logits and mode in ("all", "text"):
            logits = head_logits(hidden, text_kernel, self.dtype, self.precision)
        if compute_logits and mode in ("all", "vision"):
            vision_logits = head_logits(hidden, vision_kernel, self.dtype, self.precision)
        return CausalLMOutput(logits=logits, hidden_states=hidden, vision_logits=vision_logits,
                              cache=finish_cache(cache, new_caches, input_ids.shape[1], self.mesh),
                              all_hidden_states=all_hidden[0] if all_hidden else None)


def vision_head_kernel(params, config: VideoLLaMAConfig):
    """The [hidden, vision_vocab] vision head of a params tree (vte transposed when tied)."""
    if config.tie_vision_embeddings:
        return params["transformer"]["vte"]["embedding"].T
    return params["vision_head"]["kernel"]


def init_params(config: VideoLLaMAConfig, rng):
    """Random float32 parameters of the video-language model; wrap in `jax.eval_shape` for shapes only."""
    return llama.init_params(config, rng, VideoLLaMAForCausalLM)
