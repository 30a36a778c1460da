"""The video-language model: parameter tree, per-position embeddings, both heads vs a float64
numpy forward, sample modes, KV-cache decoding in text and vision mode, sharding, rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lwm.config import LLaMAConfig, VideoLLaMAConfig
from lwm.llama import LLaMAForCausalLM, init_cache
from lwm.llama import init_params as init_text_params
from lwm.mesh import build_mesh, match_partition_rules, partition_rules, shard_tree
from lwm.vision_llama import VideoLLaMAForCausalLM, init_params, vision_head_kernel
from tests.helpers import max_rel_error, tree_max_rel_error, unstack_layers

VOCAB, VISION_VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 8448, 64, 96, 2, 4, 2


def tiny_vision_config(**overrides) -> VideoLLaMAConfig:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_sequence_length=128,
                scan_query_chunk_size=8, scan_key_chunk_size=8, scan_mlp_chunk_size=8, scan_loss_chunk_size=8,
                theta=5e4)
    base.update(overrides)
    return VideoLLaMAConfig(**base)


@pytest.fixture(scope="module")
def config():
    return tiny_vision_config()


def host_random_params(config, seed: int = 0):
    """Random params with the model's tree, drawn on the host (no init forward to compile):
    kernels and embeddings N(0, initializer_range), norm scales 1 + N(0, 0.2) so a misplaced or
    missing norm cannot hide behind all-ones."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        if any(name in jax.tree_util.keystr(path) for name in ("attention_norm", "ffn_norm", "ln_f")):
            return (1.0 + 0.2 * noise).astype(np.float32)
        return (config.initializer_range * noise).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params(config):
    return host_random_params(config)


def mixed_inputs(seed: int, batch: int, seq: int):
    """Random ids whose vision positions hold vision ids (< VISION_VOCAB), text positions text ids."""
    rng = np.random.default_rng(seed)
    vision = rng.random((batch, seq)) < 0.5
    ids = np.where(vision, rng.integers(0, VISION_VOCAB, (batch, seq)), rng.integers(0, VOCAB, (batch, seq)))
    return ids.astype(np.int32), vision


# ---- an independent float64 numpy forward ------------------------------------------------------


def numpy_forward(params, config: VideoLLaMAConfig, ids, vision, mask, hidden_states: list | None = None):
    """(text logits, vision logits) [b, s, vocab] / [b, s, vision_vocab] in float64; appends each
    layer's input and then the final normed output to `hidden_states` when given.

    Interleaved RoPE (dims 2i, 2i+1 rotate together), causal attention over real keys only
    (positions = count of real tokens before), GQA with q head h reading kv head h // group."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    t = p["transformer"]
    b, s = ids.shape
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    x = np.where(vision[..., None], t["vte"]["embedding"][np.where(vision, ids, 0)],
                 t["wte"]["embedding"][np.where(vision, 0, ids)])  # [b, s, hidden]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # [b, s]
    freqs = 1.0 / config.theta ** (np.arange(0, hd, 2) / hd)
    angles = positions[..., None] * freqs  # [b, s, hd/2]
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]

    def rope(u):  # u [b, s, h, hd]
        re, im = u[..., 0::2], u[..., 1::2]
        out = np.empty_like(u)
        out[..., 0::2], out[..., 1::2] = re * cos - im * sin, re * sin + im * cos
        return out

    def rms(u, scale):
        return u / np.sqrt(np.mean(u ** 2, -1, keepdims=True) + config.rms_norm_eps) * scale

    allowed = np.tril(np.ones((s, s), bool))[None] & mask[:, None, :].astype(bool)  # [b, q, k]
    allowed |= np.eye(s, dtype=bool)[None]  # padded queries see themselves (no NaN rows); unused
    layers = t["h"]["scan_decoder"]
    for i in range(config.num_hidden_layers):
        if hidden_states is not None:
            hidden_states.append(x)
        layer = jax.tree.map(lambda w: w[i], layers)
        a = layer["attention"]
        h = rms(x, layer["attention_norm"]["kernel"])
        q = rope((h @ a["wq"]["kernel"]).reshape(b, s, heads, hd))
        k = rope((h @ a["wk"]["kernel"]).reshape(b, s, kv_heads, hd))
        v = (h @ a["wv"]["kernel"]).reshape(b, s, kv_heads, hd)
        group = heads // kv_heads
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = np.where(allowed[:, None], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, heads * hd)
        x = x + out @ a["wo"]["kernel"]
        f = layer["feed_forward"]
        h = rms(x, layer["ffn_norm"]["kernel"])
        gate = h @ f["w1"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ f["w3"]["kernel"])) @ f["w2"]["kernel"]
    x = rms(x, t["ln_f"]["kernel"])
    if hidden_states is not None:
        hidden_states.append(x)
    vision_kernel = t["vte"]["embedding"].T if config.tie_vision_embeddings else p["vision_head"]["kernel"]
    return x @ p["lm_head"]["kernel"], x @ vision_kernel


# ---- tests ---------------------------------------------------------------------------------


def test_parameter_tree_and_partition_rules(config):
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    flat = {"/".join(k): v.shape for k, v in flatten_dict(shapes).items()}
    text_shapes = jax.eval_shape(lambda: init_text_params(LLaMAConfig(**{
        k: v for k, v in config.to_dict().items() if k in LLaMAConfig.field_names()}), jax.random.key(0)))
    text_flat = {"/".join(k): v.shape for k, v in flatten_dict(text_shapes).items()}
    assert flat == text_flat | {"transformer/vte/embedding": (VISION_VOCAB, HIDDEN),
                                "vision_head/kernel": (HIDDEN, VISION_VOCAB)}
    assert flat["transformer/h/scan_decoder/attention/wk/kernel"] == (LAYERS, HIDDEN, KV_HEADS * HIDDEN // HEADS)
    tied = jax.eval_shape(lambda: init_params(config.replace(tie_vision_embeddings=True), jax.random.key(0)))
    assert "vision_head" not in tied and tied["transformer"]["vte"]["embedding"].shape == (VISION_VOCAB, HIDDEN)
    unscanned = jax.eval_shape(lambda: init_params(config.replace(scan_layers=False), jax.random.key(0)))
    assert unscanned["transformer"]["h"]["1"]["attention"]["wq"]["kernel"].shape == (HIDDEN, HIDDEN)
    for tree, scan in ((shapes, True), (unscanned, False)):  # every parameter matches a rule
        specs = flatten_dict(match_partition_rules(partition_rules(scan, 0), tree), sep="/")
        assert set(specs) == {"/".join(k) for k in flatten_dict(tree)}
    specs = flatten_dict(match_partition_rules(partition_rules(True, 0), shapes), sep="/")
    assert specs["transformer/vte/embedding"] == jax.sharding.PartitionSpec("tp", ("fsdp", "sp"))
    assert specs["vision_head/kernel"] == jax.sharding.PartitionSpec(("fsdp", "sp"), "tp")


def test_text_positions_match_the_text_model(config, params):
    """All-text input gives the text model's hidden states and logits exactly; with vision tokens
    later in the row, the text positions before the first one are unchanged (causality)."""
    text_config = LLaMAConfig(**{k: v for k, v in config.to_dict().items() if k in LLaMAConfig.field_names()})
    text_params = {"transformer": {k: v for k, v in params["transformer"].items() if k != "vte"},
                   "lm_head": params["lm_head"]}
    ids, _ = mixed_inputs(1, 2, 24)
    ids = ids % VOCAB
    vision = np.zeros(ids.shape, bool)
    vision[:, 10:] = True
    vision_model = VideoLLaMAForCausalLM(config)

    @jax.jit
    def run(params, text_params):
        text_out = LLaMAForCausalLM(text_config).apply({"params": text_params}, ids)
        out = vision_model.apply({"params": params}, ids, vision_masks=np.zeros(ids.shape, bool), sample_mode="all")
        mixed = vision_model.apply({"params": params}, np.where(vision, ids + 4000, ids), vision_masks=vision)
        return text_out, out, mixed

    text_out, out, mixed = run(params, text_params)
    np.testing.assert_array_equal(out.hidden_states, text_out.hidden_states)
    np.testing.assert_array_equal(out.logits, text_out.logits)
    np.testing.assert_allclose(mixed.hidden_states[:, :10], text_out.hidden_states[:, :10], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(mixed.hidden_states[:, 10:] - text_out.hidden_states[:, 10:])).max() > 1e-2


@pytest.mark.parametrize("scan, tie, impl", [(True, False, "blockwise"), (False, True, "dense")])
def test_both_heads_match_float64_numpy(config, params, scan, tie, impl):
    cfg = config.replace(scan_layers=scan, tie_vision_embeddings=tie, attention_impl=impl)
    p = dict(params)
    if tie:
        del p["vision_head"]
    model_params = p if scan else unstack_layers(p, LAYERS)
    ids, vision = mixed_inputs(2, 2, 24)
    mask = np.ones(ids.shape, np.int32)
    mask[1, :5] = 0  # left padding
    out = VideoLLaMAForCausalLM(cfg).apply({"params": model_params}, ids, vision_masks=vision, attention_mask=mask,
                                           sample_mode="all")
    ref_text, ref_vision = numpy_forward(p, cfg, ids, vision, mask)
    real = mask.astype(bool)
    assert out.logits.shape == (2, 24, VOCAB) and out.vision_logits.shape == (2, 24, VISION_VOCAB)
    assert max_rel_error(np.asarray(out.logits)[real], ref_text[real]) <= 1e-5
    assert max_rel_error(np.asarray(out.vision_logits)[real], ref_vision[real]) <= 1e-5
    np.testing.assert_array_equal(vision_head_kernel(p, cfg), p["transformer"]["vte"]["embedding"].T if tie
                                  else p["vision_head"]["kernel"])


@pytest.mark.parametrize("scan", [True, False])
def test_all_hidden_states_match_float64_numpy(config, params, scan):
    """output_hidden_states: num_hidden_layers + 1 arrays (each layer's input, then the final normed
    output, which is `hidden_states`), with either layer stack and with a KV cache."""
    cfg = config.replace(scan_layers=scan)
    model = VideoLLaMAForCausalLM(cfg)
    model_params = params if scan else unstack_layers(params, LAYERS)
    ids, vision = mixed_inputs(6, 2, 16)
    mask = np.ones(ids.shape, np.int32)
    mask[1, :4] = 0  # left padding

    @jax.jit
    def run():
        out = model.apply({"params": model_params}, ids, vision_masks=vision, attention_mask=mask,
                          output_hidden_states=True)
        cached = model.apply({"params": model_params}, ids, vision_masks=vision, attention_mask=mask,
                             cache=init_cache(cfg, 2, 16), prefill=True, output_hidden_states=True)
        plain = model.apply({"params": model_params}, ids, vision_masks=vision, attention_mask=mask)
        return out, cached, plain

    out, cached, plain = run()
    ref = []
    numpy_forward(params, cfg, ids, vision, mask, hidden_states=ref)
    real = mask.astype(bool)
    assert len(out.all_hidden_states) == len(cached.all_hidden_states) == len(ref) == LAYERS + 1
    for ours, from_cache, expected in zip(out.all_hidden_states, cached.all_hidden_states, ref):
        assert max_rel_error(np.asarray(ours)[real], expected[real]) <= 1e-5
        assert max_rel_error(np.asarray(from_cache)[real], expected[real]) <= 1e-5
    np.testing.assert_array_equal(out.all_hidden_states[-1], out.hidden_states)
    assert plain.all_hidden_states is None
    np.testing.assert_array_equal(plain.logits, out.logits)


def test_sample_modes_select_heads(config, params):
    ids, vision = mixed_inputs(3, 1, 16)
    model = VideoLLaMAForCausalLM(config)

    def run(mode, model=model):
        return model.apply({"params": params}, ids, vision_masks=vision, sample_mode=mode)

    both, text, vis = jax.jit(lambda: (run("all"), run("text"), run("vision")))()
    assert text.vision_logits is None and vis.logits is None
    np.testing.assert_array_equal(text.logits, both.logits)
    np.testing.assert_array_equal(vis.vision_logits, both.vision_logits)
    # The default comes from the config (shapes only: nothing to compute).
    default = jax.eval_shape(lambda: run(None, VideoLLaMAForCausalLM(config.replace(sample_mode="vision"))))
    assert default.logits is None and default.vision_logits.shape == (1, 16, VISION_VOCAB)
    with pytest.raises(ValueError, match="sample_mode='both'"):
        jax.eval_shape(lambda: run("both"))


@pytest.mark.parametrize("mode", ["text", "vision"])
def test_cached_decoding_matches_full_forward(config, params, mode):
    """Prefill a left-padded mixed prompt, then feed tokens one at a time with the vision mask of
    the mode; every step's logits equal the full forward over the whole row."""
    prompt_len, total = 16, 24
    ids, vision = mixed_inputs(4, 2, total)
    step_is_vision = mode == "vision"
    vision[:, prompt_len:] = step_is_vision
    ids[:, prompt_len:] = ids[:, prompt_len:] % (VISION_VOCAB if step_is_vision else VOCAB)
    mask = np.ones(ids.shape, np.int32)
    mask[0, :6] = 0
    model = VideoLLaMAForCausalLM(config)
    head = "vision_logits" if step_is_vision else "logits"

    @jax.jit
    def full_and_prefill():
        full = model.apply({"params": params}, ids, vision_masks=vision, attention_mask=mask, sample_mode=mode)
        prefill = model.apply({"params": params}, ids[:, :prompt_len], vision_masks=vision[:, :prompt_len],
                              attention_mask=mask[:, :prompt_len], cache=init_cache(config, 2, 32), prefill=True,
                              sample_mode=mode)
        return getattr(full, head), prefill

    full, out = full_and_prefill()
    steps, cache = [getattr(out, head)], out.cache
    step = jax.jit(lambda c, x, vm: model.apply({"params": params}, x, vision_masks=vm, cache=c, sample_mode=mode))
    for t in range(prompt_len, total):
        out = step(cache, ids[:, t:t + 1], vision[:, t:t + 1])
        steps.append(getattr(out, head))
        cache = out.cache
    assert int(cache.index) == total
    got = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert max_rel_error(got[real], np.asarray(full)[real]) <= 1e-5


def test_sharded_matches_single_device(config, params):
    """Mesh 1,2,2,2 (fsdp, tp, sp): both heads' logits and the gradients equal one device's."""
    ids, vision = mixed_inputs(5, 2, 32)
    mesh = build_mesh("1,2,2,2")
    specs = match_partition_rules(partition_rules(True, 0), params)
    sharded = shard_tree(params, specs, mesh)

    def loss(model, p):  # depends on every logit of both heads
        out = model.apply({"params": p}, ids, vision_masks=vision, sample_mode="all")
        value = (jnp.mean(jax.nn.log_softmax(out.logits) * jnp.cos(jnp.arange(VOCAB)))
                 + jnp.mean(jax.nn.log_softmax(out.vision_logits) * jnp.sin(jnp.arange(VISION_VOCAB))))
        return value, (out.logits, out.vision_logits)

    (ref_v, ref_logits), ref_g = jax.jit(jax.value_and_grad(
        lambda p: loss(VideoLLaMAForCausalLM(config), p), has_aux=True))(params)
    (v, logits), g = jax.jit(jax.value_and_grad(
        lambda p: loss(VideoLLaMAForCausalLM(config, mesh=mesh), p), has_aux=True))(sharded)
    assert max_rel_error(logits[0], ref_logits[0]) <= 1e-5
    assert max_rel_error(logits[1], ref_logits[1]) <= 1e-5
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    assert tree_max_rel_error(g, ref_g) <= 1e-4
