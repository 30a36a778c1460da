"""The shared sampler: greedy vs the full forward's argmax, sampling filters on crafted logits,
classifier-free guidance, forced tokens, eos, left padding, and sp-sharded decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.config import VideoLLaMAConfig
from lwm.generation import (Sampler, SamplingParams, block_size, filter_logits, mix_cfg, padded_prompt_length,
                            sample_tokens)
from lwm.llama import LLaMAForCausalLM, init_params
from lwm.mesh import build_mesh
from lwm.vision_llama import VideoLLaMAForCausalLM, init_params as init_vision_params
from tests.helpers import max_rel_error, tiny_config

VOCAB = 256


@pytest.fixture(scope="module")
def text_model():
    config = tiny_config(num_key_value_heads=2, max_sequence_length=256)
    params = init_params(config, jax.random.key(3))
    return config, params


@pytest.fixture(scope="module")
def text_sampler(text_model):
    config, params = text_model
    return Sampler(LLaMAForCausalLM(config), params)


def prompts(seed=0):
    """Two left-padded prompts of 13 columns: row 0 has 5 padding columns, row 1 none."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (2, 13)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    return ids, mask


def reference_continuation(apply_fn, ids, mask, n_new, *, cfg_scale=1.0, forced=None, vision=False):
    """Greedy tokens by the full forward (no cache) in float64 on the host: at step t take the
    argmax of the last position's logits (mixed by cfg), append it, repeat."""
    b, length = ids.shape
    total = -(-(length + n_new) // 8) * 8  # the blockwise kernel's chunk divides the length
    seq = np.zeros((b, total), np.int32)
    seq[:, :length] = ids
    full_mask = np.ones((b, total), np.int32)
    full_mask[:, :length] = mask
    vmask = np.zeros((b, total), bool)
    fwd = jax.jit(apply_fn)
    out = []
    for t in range(n_new):
        logits = np.asarray(fwd(seq, full_mask, vmask), np.float64)[:, length + t - 1]
        if cfg_scale != 1.0:
            cond, uncond = np.split(logits, 2)
            logits = uncond + cfg_scale * (cond - uncond)
        token = logits.argmax(-1)
        if forced is not None and forced[t] >= 0:
            token = np.full_like(token, forced[t])
        out.append(token)
        fed = np.concatenate([token, token]) if cfg_scale != 1.0 else token
        seq[:, length + t] = fed
        vmask[:, length + t] = vision
    return np.stack(out, axis=1)


def test_greedy_equals_argmax_of_full_forward_and_stream_agrees(text_model, text_sampler):
    config, params = text_model
    ids, mask = prompts()
    model = LLaMAForCausalLM(config)
    expected = reference_continuation(
        lambda s, m, vm: model.apply({"params": params}, s, attention_mask=m).logits, ids, mask, 7)
    greedy = SamplingParams(max_new_tokens=7, temperature=0.0)
    out = text_sampler.generate(ids, mask, jax.random.key(0), greedy)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, [7, 7])
    streamed = np.stack(list(text_sampler.stream(ids, mask, jax.random.key(0), greedy)), axis=1)
    np.testing.assert_array_equal(streamed, expected)
    state = text_sampler.prefill(ids, mask, jax.random.key(0), greedy)
    np.testing.assert_array_equal(text_sampler.decode(state, greedy).tokens, expected)  # generate = prefill + decode
    # Left padding: row 0 alone, without any padding, continues exactly as inside the batch.
    alone = text_sampler.generate(ids[:1, 5:], mask[:1, 5:], jax.random.key(0), greedy)
    np.testing.assert_array_equal(alone.tokens[0], expected[0])


def test_top_k_top_p_temperature_on_crafted_logits():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = jnp.asarray(np.log(np.where(probs > 0, probs, 1e-30)), jnp.float32)[None]  # [1, 5]
    # filter_logits: which tokens survive
    kept = lambda lg: set(np.flatnonzero(np.isfinite(np.asarray(lg[0]))))  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {0, 1}
    assert kept(filter_logits(logits, top_p=0.75)) == {0, 1}  # mass before token 2 is 0.8
    assert kept(filter_logits(logits, top_p=0.85)) == {0, 1, 2}  # 0.8 < 0.85 keeps token 2
    assert kept(filter_logits(logits, top_p=0.01)) == {0}  # the top token always survives
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == {0, 1}
    assert kept(filter_logits(logits)) == {0, 1, 2, 3, 4}

    keys = jax.random.split(jax.random.key(7), 20000)

    def draw(sampling):
        return np.asarray(jax.jit(jax.vmap(lambda k: sample_tokens(logits, k, sampling)[0]))(keys))

    drawn = draw(SamplingParams(1, temperature=1.0, top_k=3))
    assert set(drawn) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(drawn, minlength=5)[:3] / len(drawn), probs[:3] / 0.95, atol=0.015)
    assert set(draw(SamplingParams(1, temperature=1.0, top_p=0.75))) == {0, 1}
    # temperature 2: p ~ probs ** (1/2), renormalised over all five tokens (token 4 ~ 0)
    drawn = draw(SamplingParams(1, temperature=2.0))
    tempered = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(drawn, minlength=5) / len(drawn), tempered, atol=0.015)
    assert set(draw(SamplingParams(1, temperature=0.0))) == {0}  # greedy
    assert set(draw(SamplingParams(1, temperature=1.0, vocab_limit=3))) == {0, 1, 2}
    assert set(draw(SamplingParams(1, temperature=0.0, vocab_limit=1))) == {0}


def test_large_top_k_takes_the_sort_path_and_agrees():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 300)), jnp.float32)
    for k in (5, 64, 65, 200, 299):
        kept = np.isfinite(np.asarray(filter_logits(logits, top_k=k)))
        expected = np.asarray(logits) >= np.sort(np.asarray(logits), axis=-1)[:, -k][:, None]
        np.testing.assert_array_equal(kept, expected)
        assert (kept.sum(-1) == k).all()


def test_cfg_mix_formula():
    rng = np.random.default_rng(1)
    cond, uncond = rng.normal(size=(3, 11)), rng.normal(size=(3, 11))
    mixed = mix_cfg(jnp.asarray(np.concatenate([cond, uncond]), jnp.float32), 3.5)
    np.testing.assert_allclose(mixed, uncond + 3.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="odd batch"):
        mix_cfg(jnp.zeros((3, 4)), 2.0)


def test_eos_stops_one_row_while_the_other_continues(text_sampler):
    ids, mask = prompts(seed=2)
    free = text_sampler.generate(ids, mask, 0, SamplingParams(max_new_tokens=6, temperature=0.0))
    # eos := a token row 0 emits early (not first) and row 1 never emits
    eos = next(int(t) for i, t in enumerate(free.tokens[0]) if 0 < i < 5 and t not in free.tokens[1])
    out = text_sampler.generate(ids, mask, 0, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                             eos_token_id=eos, pad_token_id=255))
    first_eos = list(free.tokens[0]).index(eos)
    np.testing.assert_array_equal(out.tokens[0, :first_eos + 1], free.tokens[0, :first_eos + 1])
    assert (out.tokens[0, first_eos + 1:] == 255).all()
    np.testing.assert_array_equal(out.tokens[1], free.tokens[1])
    np.testing.assert_array_equal(out.lengths, [first_eos + 1, 6])
    streamed = list(text_sampler.stream(ids, mask, 0, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                     eos_token_id=eos, pad_token_id=255)))
    np.testing.assert_array_equal(np.stack(streamed, 1), out.tokens)


def test_vision_mode_cfg_and_forced_tokens_match_reference():
    """What the vision generator does: [cond; uncond] rows, vision head, cfg, a forced marker."""
    config = VideoLLaMAConfig(**{**tiny_config().to_dict(), "vision_vocab_size": 8200,
                                 "num_key_value_heads": 4, "max_sequence_length": 128})
    params = init_vision_params(config, jax.random.key(4))
    model = VideoLLaMAForCausalLM(config)
    rng = np.random.default_rng(5)
    ids = rng.integers(3, VOCAB, (4, 10)).astype(np.int32)  # rows 0-1 cond, 2-3 uncond
    mask = np.ones_like(ids)
    mask[2:, :7] = 0  # the unconditional prompts are short
    ids[2:, :7] = 0
    forced = np.array([-1, -1, 8192, -1, -1], np.int32)
    expected = reference_continuation(
        lambda s, m, vm: model.apply({"params": params}, s, attention_mask=m, vision_masks=vm,
                                     sample_mode="vision").vision_logits,
        ids, mask, 5, cfg_scale=3.0, forced=forced, vision=True)
    sampler = Sampler(model, params)
    out = sampler.generate(ids, mask, 0, SamplingParams(max_new_tokens=5, temperature=0.0, cfg_scale=3.0),
                           vision_masks=np.zeros(ids.shape, bool), sample_mode="vision", forced_tokens=forced)
    assert out.tokens.shape == (2, 5)
    np.testing.assert_array_equal(out.tokens, expected)
    assert (out.tokens[:, 2] == 8192).all()


def test_sp_sharded_decoding_equals_unsharded(text_model, text_sampler):
    config, params = text_model
    mesh = build_mesh("1,2,1,4")
    sharded = Sampler(LLaMAForCausalLM(config, mesh=mesh), params, mesh=mesh)
    ids, mask = prompts(seed=3)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=40)
    state = sharded.prefill(ids, mask, 0, sampling)
    assert state.cache.k.sharding.spec == jax.sharding.PartitionSpec(None, ("dp", "fsdp"), "sp", "tp", None)
    assert len(state.cache.k.addressable_shards) == 8 and state.cache.k.addressable_shards[0].data.shape[2] == \
        state.cache.k.shape[2] // 4
    reference_state = text_sampler.prefill(ids, mask, 0, sampling)
    assert max_rel_error(state.logits, reference_state.logits) <= 1e-5
    # sampled, not greedy: equal tokens need equal logits *and* the same random stream
    got = sharded.generate(ids, mask, jax.random.key(11), sampling)
    want = text_sampler.generate(ids, mask, jax.random.key(11), sampling)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    legacy_key = text_sampler.generate(ids, mask, jax.random.PRNGKey(11), sampling)  # raw uint32 key, same stream
    np.testing.assert_array_equal(legacy_key.tokens, want.tokens)


def test_prompt_padding_and_bad_inputs(text_model, text_sampler):
    config, _ = text_model
    assert block_size(config) == 8 and block_size(config, build_mesh("1,2,1,4")) == 32
    assert [padded_prompt_length(n, config) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]
    ids, mask = prompts()
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="left-padded"):
        text_sampler.generate(ids, mask[:, ::-1], 0, greedy)
    with pytest.raises(ValueError, match="max_sequence_length=256"):
        text_sampler.generate(ids, mask, 0, SamplingParams(max_new_tokens=250))
    with pytest.raises(ValueError, match="video-language model"):
        text_sampler.generate(ids, mask, 0, greedy, sample_mode="vision")
    with pytest.raises(ValueError, match=r"forced_tokens shape \(3,\)"):
        text_sampler.generate(ids, mask, 0, greedy, forced_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match="odd batch 3"):
        text_sampler.generate(ids[:1].repeat(3, 0), mask[:1].repeat(3, 0), 0,
                              SamplingParams(max_new_tokens=4, cfg_scale=2.0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=4, top_p=0.0)
    outside = ids.copy()
    outside[1, 3] = VOCAB  # padding columns (row 0's first 5) may hold anything; prompt ids may not
    with pytest.raises(ValueError, match=rf"prompt token id {VOCAB} is outside the model's text vocabulary"):
        text_sampler.generate(outside, mask, 0, greedy)


def test_generation_past_max_sequence_length_fails_before_any_work(text_model):
    """The last cache slot holds position max_sequence_length - 1; one token more is an error up front."""
    config, params = text_model
    sampler = Sampler(LLaMAForCausalLM(config), params)
    ids, mask = prompts()  # 13 columns, padded to 16
    one_too_many = SamplingParams(max_new_tokens=config.max_sequence_length - 16 + 1, temperature=0.0)
    for call in (lambda: sampler.generate(ids, mask, 0, one_too_many),
                 lambda: sampler.prefill(ids, mask, 0, one_too_many),
                 lambda: next(sampler.stream(ids, mask, 0, one_too_many))):
        with pytest.raises(ValueError, match="241 tokens for the answer that needs 257 positions, more than "
                                             r"max_sequence_length=256. To fit: .*max_sequence_length >= 257 "
                                             r"\(--update_llama_config="):
            call()
    assert sampler._compiled == {}  # nothing was compiled, let alone run


def test_a_prompt_that_does_not_fit_is_explained_with_its_arithmetic():
    """The case a user hit: a 37-token question, chunks of 1024 and sp = 8 pad it to one block
    of 8192 > max_sequence_length=2048. The message gives that arithmetic and only changes that
    fit (computed by hand: chunks <= 128 give 128 x 8 = 1024 + 1 <= 2048; sp = 1 pads to 1024)."""
    from lwm.config import LLaMAConfig
    from lwm.generation import room_error

    class Mesh:
        shape = {"dp": 1, "fsdp": 1, "tp": 1, "sp": 8}

    config = LLaMAConfig(max_sequence_length=2048)
    message = room_error("the question", 37, 1, config, Mesh())
    assert message.startswith(
        "the question is 37 tokens, padded to 8192 (prompts are padded to a multiple of the block size 8192 = "
        "attention chunk 1024 x sp 8); with 1 token for the answer that needs 8193 positions, more than "
        "max_sequence_length=2048. To fit: attention chunks of at most 128 (--llama.scan_query_chunk_size and "
        "--llama.scan_key_chunk_size, or the same in --update_llama_config), less sequence parallelism (sp=8 in "
        "--mesh_dim) or max_sequence_length >= 8200 ("), message
    # 2000 tokens at sp = 8 and chunk 256: no chunk (a block is at least 8) leaves room, nor does sp = 1
    message = room_error("the prompt", 2000, 100, LLaMAConfig(max_sequence_length=2048, scan_query_chunk_size=256,
                                                              scan_key_chunk_size=512), Mesh())
    assert "lcm(query chunk 256, key chunk 512) = 512 x sp 8" in message and "padded to 4096" in message
    assert "attention chunks" not in message and "sequence parallelism" not in message
    assert message.endswith("To fit: max_sequence_length >= 4200 (--update_llama_config=\"dict(max_sequence_length=...)\")")
