"""The text model: HF parity, scan/unscan, blockwise MLP, KV cache, sharding, parameter tree,
all hidden states, and no import of the vision model."""
import ast
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from lwm.checkpoint import load_streaming
from lwm.config import VideoLLaMAConfig
from lwm.hf_conversion import convert_hf_to_lwm
from lwm.llama import LLaMAForCausalLM, check_positions, init_cache, init_params, rotary_sin_cos
from lwm.mesh import build_mesh, match_partition_rules, partition_rules, shard_tree
from tests.helpers import max_rel_error, random_ids, tiny_config, tree_max_rel_error, unstack_layers


def hf_model(tmp_path, kv_heads=4, theta=10000.0, tie=False, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=theta, tie_word_embeddings=tie,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a misplaced norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, path


def hf_logits(model, ids, mask=None):
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    kwargs = {}
    if mask is not None:
        mask = np.asarray(mask)
        kwargs = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0)))
    with torch.no_grad():
        return model(ids_t, **kwargs).logits.numpy()


@pytest.mark.parametrize("scan, kv_heads, theta, tie, impl", [
    (True, 4, 10000.0, False, "blockwise"),
    (False, 2, 1e6, False, "dense"),
    (True, 1, 5e5, True, "blockwise"),
])
def test_hf_parity(tmp_path, scan, kv_heads, theta, tie, impl):
    model, path = hf_model(tmp_path, kv_heads, theta, tie)
    config = convert_hf_to_lwm(str(path), str(tmp_path / "params"), str(tmp_path / "config.json"), scan_layers=scan)
    config = config.replace(attention_impl=impl, scan_query_chunk_size=8, scan_key_chunk_size=8, scan_mlp_chunk_size=8)
    assert (config.num_key_value_heads, config.theta, config.tie_word_embeddings) == (kv_heads, theta, tie)
    params = load_streaming(str(tmp_path / "params"))
    ids = random_ids(1, (2, 32), 256)
    ours = LLaMAForCausalLM(config).apply({"params": params}, ids).logits
    ref = hf_logits(model, ids)
    assert max_rel_error(ours, ref) <= 1e-4
    # Left-padded batch: the padded row's real tokens match HF given the same mask and positions.
    mask = np.ones((2, 32), np.int32)
    mask[1, :8] = 0
    ours = LLaMAForCausalLM(config).apply({"params": params}, ids, attention_mask=mask).logits
    ref = hf_logits(model, ids, mask)
    real = mask.astype(bool)
    assert max_rel_error(np.asarray(ours)[real], ref[real]) <= 1e-4


@pytest.mark.parametrize("scan, remat_block", [(True, "nothing_saveable"), (False, "")])
def test_all_hidden_states_match_hf(tmp_path, scan, remat_block):
    """output_hidden_states: the embeddings, each later layer's input, then the final normed output
    (num_hidden_layers + 1 arrays), as HF's LlamaForCausalLM returns them; nothing else changes."""
    model, path = hf_model(tmp_path, kv_heads=2, layers=3)
    config = convert_hf_to_lwm(str(path), str(tmp_path / "params"), str(tmp_path / "config.json"), scan_layers=scan)
    config = config.replace(scan_query_chunk_size=8, scan_key_chunk_size=8, scan_mlp_chunk_size=8,
                            remat_block=remat_block)
    params = load_streaming(str(tmp_path / "params"))
    ids = random_ids(7, (2, 32), 256)
    lm = LLaMAForCausalLM(config)
    out = lm.apply({"params": params}, ids, output_hidden_states=True)
    with torch.no_grad():
        ref = model(torch.tensor(np.asarray(ids), dtype=torch.long), output_hidden_states=True).hidden_states
    assert len(out.all_hidden_states) == len(ref) == 4
    for i, (ours, theirs) in enumerate(zip(out.all_hidden_states, ref)):
        assert ours.shape == (2, 32, 64), i
        assert max_rel_error(ours, theirs.numpy()) <= 1e-4, i
    np.testing.assert_array_equal(out.all_hidden_states[-1], out.hidden_states)
    plain = lm.apply({"params": params}, ids)
    assert plain.all_hidden_states is None
    np.testing.assert_array_equal(plain.logits, out.logits)


@pytest.mark.parametrize("scan", [True, False])
def test_all_hidden_states_with_kv_cache_match_full_forward(scan):
    config = tiny_config(num_key_value_heads=2, scan_layers=scan, num_hidden_layers=3)
    params = init_params(config, jax.random.key(2))
    ids = random_ids(8, (2, 24), 256)
    mask = np.ones((2, 24), np.int32)
    mask[1, :3] = 0  # left padding in the prompt
    model = LLaMAForCausalLM(config)
    full = model.apply({"params": params}, ids, attention_mask=mask, output_hidden_states=True).all_hidden_states
    out = model.apply({"params": params}, ids[:, :16], attention_mask=mask[:, :16], cache=init_cache(config, 2, 32),
                      prefill=True, output_hidden_states=True)
    steps, cache = [out.all_hidden_states], out.cache
    step = jax.jit(lambda c, x: model.apply({"params": params}, x, cache=c, output_hidden_states=True))
    for t in range(16, 24):
        out = step(cache, ids[:, t:t + 1])
        steps.append(out.all_hidden_states)
        cache = out.cache
    real = mask.astype(bool)
    assert len(full) == 4 and all(len(s) == 4 for s in steps)
    for i in range(4):
        got = np.concatenate([s[i] for s in steps], axis=1)
        assert max_rel_error(got[real], np.asarray(full[i])[real]) <= 1e-5, i


def test_scanned_unscanned_and_axis_one_agree():
    config = tiny_config(num_key_value_heads=2)
    params = init_params(config, jax.random.key(0))
    ids = random_ids(2, (2, 16), 256)
    ref = LLaMAForCausalLM(config).apply({"params": params}, ids).logits
    unscanned = LLaMAForCausalLM(config.replace(scan_layers=False)).apply(
        {"params": unstack_layers(params, 2)}, ids).logits
    np.testing.assert_allclose(unscanned, ref, rtol=1e-5, atol=1e-6)
    axis1 = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1) if x.ndim >= 2 and x.shape[0] == 2 else x,
                         {"transformer": {"h": params["transformer"]["h"]}})
    params1 = dict(params, transformer=dict(params["transformer"], h=axis1["transformer"]["h"]))
    out1 = LLaMAForCausalLM(config.replace(param_scan_axis=1)).apply({"params": params1}, ids).logits
    np.testing.assert_allclose(out1, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat_block", ["nothing_saveable", "save_attention", "dots_saveable"])
def test_blockwise_mlp_remat_and_dense_attention_agree(remat_block):
    config = tiny_config(remat_block=remat_block, remat_mlp="nothing_saveable")
    params = init_params(config, jax.random.key(0))
    ids = random_ids(3, (2, 24), 256)
    plain = config.replace(scan_mlp=False, attention_impl="dense", remat_block="", remat_mlp="")

    def loss(cfg, p):
        return jnp.mean(LLaMAForCausalLM(cfg).apply({"params": p}, ids).logits ** 2)

    v1, g1 = jax.value_and_grad(lambda p: loss(config, p))(params)
    v2, g2 = jax.value_and_grad(lambda p: loss(plain, p))(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    assert tree_max_rel_error(g1, g2) <= 1e-5


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_matches_full_forward(scan):
    config = tiny_config(num_key_value_heads=2, scan_layers=scan)
    params = init_params(config, jax.random.key(1))
    ids = random_ids(4, (2, 24), 256)
    mask = np.ones((2, 24), np.int32)
    mask[0, :5] = 0  # left padding in the prompt
    model = LLaMAForCausalLM(config)
    full = model.apply({"params": params}, ids, attention_mask=mask).logits
    out = model.apply({"params": params}, ids[:, :16], attention_mask=mask[:, :16],
                      cache=init_cache(config, 2, 32), prefill=True)
    steps, cache = [out.logits], out.cache
    step = jax.jit(lambda c, x: model.apply({"params": params}, x, cache=c))
    for t in range(16, 24):
        out = step(cache, ids[:, t:t + 1])
        steps.append(out.logits)
        cache = out.cache
    assert int(cache.index) == 24
    got = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert max_rel_error(got[real], np.asarray(full)[real]) <= 1e-5


@pytest.mark.parametrize("mesh_dim", ["1,2,2,2", "2,2,2,1"])
def test_sharded_forward_and_grads_match_single_device(mesh_dim):
    config = tiny_config(num_key_value_heads=2)
    params = init_params(config, jax.random.key(5))
    ids = random_ids(6, (4, 32), 256)
    mesh = build_mesh(mesh_dim)
    specs = match_partition_rules(partition_rules(True, 0), params)
    sharded = shard_tree(params, specs, mesh)

    def loss(model, p):  # a loss that depends on every logit
        logits = model.apply({"params": p}, ids).logits
        return jnp.mean(jax.nn.log_softmax(logits) * jnp.cos(jnp.arange(logits.shape[-1]))), logits

    (ref_v, ref_logits), ref_g = jax.value_and_grad(lambda p: loss(LLaMAForCausalLM(config), p), has_aux=True)(params)
    (v, logits), g = jax.jit(jax.value_and_grad(lambda p: loss(LLaMAForCausalLM(config, mesh=mesh), p),
                                                has_aux=True))(sharded)
    assert max_rel_error(logits, ref_logits) <= 1e-5
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    assert tree_max_rel_error(g, ref_g) <= 1e-4


def test_parameter_tree_matches_spec():
    config = tiny_config(num_key_value_heads=2)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    flat = {"/".join(k): v.shape for k, v in flatten_dict(shapes).items()}
    L, H, V, I, KV = 2, 64, 256, 96, 2 * 16
    assert flat == {
        "transformer/wte/embedding": (V, H),
        "transformer/h/scan_decoder/attention/wq/kernel": (L, H, H),
        "transformer/h/scan_decoder/attention/wk/kernel": (L, H, KV),
        "transformer/h/scan_decoder/attention/wv/kernel": (L, H, KV),
        "transformer/h/scan_decoder/attention/wo/kernel": (L, H, H),
        "transformer/h/scan_decoder/feed_forward/w1/kernel": (L, H, I),
        "transformer/h/scan_decoder/feed_forward/w2/kernel": (L, I, H),
        "transformer/h/scan_decoder/feed_forward/w3/kernel": (L, H, I),
        "transformer/h/scan_decoder/attention_norm/kernel": (L, H),
        "transformer/h/scan_decoder/ffn_norm/kernel": (L, H),
        "transformer/ln_f/kernel": (H,),
        "lm_head/kernel": (H, V),
    }
    unscanned = jax.eval_shape(lambda: init_params(config.replace(scan_layers=False), jax.random.key(0)))
    flat = {"/".join(k): v.shape for k, v in flatten_dict(unscanned).items()}
    assert flat["transformer/h/1/attention/wq/kernel"] == (H, H) and "transformer/h/0/ffn_norm/kernel" in flat
    for tree, scan in ((shapes, True), (unscanned, False)):  # every parameter matches a rule
        match_partition_rules(partition_rules(scan, 0), tree)


def test_too_long_input_is_rejected():
    config = tiny_config(max_sequence_length=16)
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="input length 24 exceeds max_sequence_length=16"):
        LLaMAForCausalLM(config).apply({"params": params}, jnp.zeros((1, 24), jnp.int32))
    with pytest.raises(ValueError, match="cache length 32 exceeds"):
        init_cache(config, 1, 32)


def test_rotary_angles_are_exact_at_long_range():
    positions = jnp.array([[0, 1, 1023, 1024, 999_999, 1_048_575]], jnp.int32)
    sin, cos = rotary_sin_cos(positions, 128, 5e7, 1 << 20)
    freqs = 1.0 / 5e7 ** (np.arange(0, 128, 2, dtype=np.float64) / 128)
    angles = np.asarray(positions, np.float64)[..., None] * freqs
    np.testing.assert_allclose(sin, np.sin(angles), atol=2e-6)
    np.testing.assert_allclose(cos, np.cos(angles), atol=2e-6)


def test_explicit_positions_match_hf_up_to_the_last_one(tmp_path):
    """Explicit, gapped position_ids up to max_sequence_length - 1 against HF's forward (gaps, since
    RoPE sees only differences: a shifted contiguous window would match even if positions were ignored)."""
    model, path = hf_model(tmp_path, kv_heads=2, theta=5e5)
    config = convert_hf_to_lwm(str(path), str(tmp_path / "params"), str(tmp_path / "config.json"))
    config = config.replace(scan_query_chunk_size=8, scan_key_chunk_size=8, scan_mlp_chunk_size=8)
    params = load_streaming(str(tmp_path / "params"))
    ids = random_ids(7, (2, 32), 256)
    rng = np.random.default_rng(0)
    positions = np.stack([np.append(np.sort(rng.choice(127, 31, replace=False)), 127),  # 127 = max - 1
                          np.arange(0, 64, 2)]).astype(np.int32)
    ours = LLaMAForCausalLM(config).apply({"params": params}, ids, position_ids=positions).logits
    with torch.no_grad():
        ref = model(torch.tensor(np.asarray(ids), dtype=torch.long), position_ids=torch.tensor(positions)).logits
    assert max_rel_error(ours, ref.numpy()) <= 1e-4


def test_positions_past_max_sequence_length_are_an_error():
    """Inside jit the RoPE table lookup clamps; a concrete position past the range must raise instead."""
    config = tiny_config(max_sequence_length=128)
    params = init_params(config, jax.random.key(0))
    model = LLaMAForCausalLM(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    for beyond in (128, 5000):  # just past the range, and past the 1024-position table (which would clamp)
        positions = np.arange(beyond - 7, beyond + 1, dtype=np.int32)[None]
        with pytest.raises(ValueError, match=rf"position {beyond} is beyond max_sequence_length 128 .*"
                                             "raise max_sequence_length via --update_llama_config"):
            model.apply({"params": params}, ids, position_ids=positions)
        with pytest.raises(ValueError, match=f"position {beyond} is beyond max_sequence_length 128"):
            model.apply({"params": params}, ids, position_ids=jnp.asarray(positions))  # a concrete jax array
    with pytest.raises(ValueError, match="position -1 is negative"):
        model.apply({"params": params}, ids, position_ids=np.arange(-1, 7)[None])
    # the host-side check the trainer calls on a numpy batch
    batch = np.tile(np.arange(128, dtype=np.int32), (4, 1))
    check_positions(batch, config)
    batch[2, 5] = 128
    with pytest.raises(ValueError, match="position 128 is beyond max_sequence_length 128"):
        check_positions(batch, config)


@pytest.mark.parametrize("mesh_dim", ["1,1,1,8", "1,2,2,2", "2,2,2,1", "1,1,2,4"])
def test_sharded_embedding_lookup_and_gradient(mesh_dim):
    """Two tables picked per position (as wte/vte), looked up from their shards, values and grads."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as PS

    from lwm.llama import embedding_lookup

    mesh = build_mesh(mesh_dim)
    text, vision = jax.random.normal(jax.random.key(0), (64, 32)), jax.random.normal(jax.random.key(3), (16, 32))
    ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    which = jax.random.bernoulli(jax.random.key(4), 0.3, (4, 16))
    ids = jnp.where(which, ids % 16, ids)
    place = lambda t: jax.device_put(t, NamedSharding(mesh, PS("tp", ("fsdp", "sp"))))  # noqa: E731
    weights = jax.random.normal(jax.random.key(2), (4, 16, 32))
    reference = jnp.where(which[..., None], vision[ids % 16], text[ids])

    def loss(tables):
        return jnp.sum(embedding_lookup(tables, ids, which, mesh) * weights)

    out = jax.jit(lambda t: embedding_lookup(t, ids, which, mesh))((place(text), place(vision)))
    np.testing.assert_array_equal(out, reference)
    grads = jax.jit(jax.grad(loss))((place(text), place(vision)))
    expected = jax.grad(lambda t: jnp.sum(jnp.where(which[..., None], t[1][ids % 16], t[0][ids]) * weights))(
        (text, vision))
    for g, e, table in zip(grads, expected, (text, vision)):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
        assert g.sharding.is_equivalent_to(place(table).sharding, 2)  # stays sharded like the table


def test_text_model_never_imports_the_vision_model():
    """lwm.vision_llama is built on lwm.llama, so lwm.llama must not import it back (not even lazily)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "lwm", "llama.py")).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and "vision" in name}, imported
    code = ("import sys, jax\n"
            "from lwm.llama import init_params\n"
            "from tests.helpers import tiny_config\n"
            "jax.eval_shape(lambda: init_params(tiny_config(), jax.random.key(0)))\n"
            "assert 'lwm.vision_llama' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lwm'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(ValueError, match="lwm.vision_llama.init_params"):
        init_params(VideoLLaMAConfig(**tiny_config().to_dict()), jax.random.key(0))
