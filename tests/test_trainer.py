"""Train steps: sharding invariance, exact gradient accumulation, learning, checkpoint round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.checkpoint import StreamingCheckpointer
from lwm.config import VideoLLaMAConfig
from lwm.mesh import batch_to_global, build_mesh
from lwm.trainer import Trainer
from tests.helpers import tiny_config, tree_max_rel_error

OPT = {"adamw_optimizer": {"lr": 1e-2, "lr_warmup_steps": 0, "lr_decay_steps": 100, "end_lr": 1e-2,
                           "init_lr": 1e-2}}


def random_batch(seed, batch=8, seq=32, vocab=256, vision=False, fractional=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    segments = np.ones((batch, seq), np.int32)
    segments[:, seq // 2:] = 2  # two packed examples per row
    segments[0, -5:] = 0  # padding
    positions = np.where(segments == 2, np.arange(seq) - seq // 2, np.arange(seq)).astype(np.int32)
    masks = (segments > 0).astype(np.float32)
    if fractional:  # per-example weights as in packed mode
        masks = masks * rng.uniform(0.1, 1.0, (batch, 1)).astype(np.float32)
    out = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:], loss_masks=masks, segment_ids=segments,
               positions=positions)
    if vision:
        vm = np.zeros((batch, seq + 1), bool)
        vm[:, 4:20] = True
        out["input_tokens"] = np.where(vm[:, :-1], tokens[:, :-1] % 64, tokens[:, :-1])
        out["target_tokens"] = np.where(vm[:, 1:], tokens[:, 1:] % 64, tokens[:, 1:])
        out["input_vision_masks"], out["target_vision_masks"] = vm[:, :-1], vm[:, 1:]
    return out


def one_step(mesh_dim, config, batch, opt=OPT, vision=False, devices=None):
    """(gradients, params after one step, metrics) on a mesh."""
    mesh = build_mesh(mesh_dim, devices)
    trainer = Trainer(config, mesh, opt, vision=vision, seed=0)
    state = trainer.init_state()
    global_batch = batch_to_global(batch, mesh)
    grads = jax.device_get(jax.jit(trainer.gradients)(state.params, global_batch)[0])
    state, metrics = trainer.train_step(state, global_batch)
    return grads, jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_dim, layout, sp_attention", [("1,2,2,2", "contiguous", "auto"),
                                                            ("2,2,2,1", "contiguous", "auto"),
                                                            ("1,1,1,8", "zigzag", "ring")])
def test_sharded_step_matches_one_device(mesh_dim, layout, sp_attention):
    config = tiny_config(num_key_value_heads=2, scan_query_chunk_size=4, scan_key_chunk_size=4,
                         scan_loss_chunk_size=4, scan_mlp_chunk_size=4)
    batch = random_batch(0)
    ref_grads, ref_params, ref_metrics = one_step("1,1,1,1", config, batch, devices=jax.devices()[:1])
    sharded = config.replace(sequence_layout=layout, sp_attention=sp_attention)
    if layout != "contiguous":  # the data side reorders every [batch, seq] array once
        from lwm.ops.layout import to_layout

        batch = {k: to_layout(v, layout, 8, axis=1) for k, v in batch.items()}
    grads, params, metrics = one_step(mesh_dim, sharded, batch)
    for key in ("loss", "acc", "gradient_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5)
    assert tree_max_rel_error(grads, ref_grads) <= 1e-4
    # Adam's first step is lr * g / (|g| + eps) = lr * sign(g) where |g| >> eps (1e-8), so params
    # agree to rounding of lr-sized steps there. Where |g| ~ eps the step swings with the last
    # bits of g (summation order), so those entries are left out; they must stay rare.
    def check(a, b, g):
        settled = (np.abs(g) > 1e-6) | (g == 0)  # exact zeros (unused embedding rows) give no step
        assert settled.mean() > 0.98, f"{(~settled).sum()} of {g.size} gradient entries at the eps scale"
        np.testing.assert_allclose(a[settled], b[settled], atol=1e-2 * 1e-3, rtol=0)

    jax.tree.map(check, params, ref_params, ref_grads)


def test_gradient_accumulation_is_exact():
    config = tiny_config()
    batch = random_batch(1)
    full_grads, _, full = one_step("1,2,2,2", config, batch)
    acc_grads, _, acc = one_step("1,2,2,2", config, batch, opt=dict(OPT, accumulate_gradient_steps=2))
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["gradient_norm"], full["gradient_norm"], rtol=1e-5)
    assert tree_max_rel_error(acc_grads, full_grads) <= 1e-5


def test_vision_text_loss_is_half_of_each_head():
    config = VideoLLaMAConfig(**tiny_config().to_dict() | {"vision_vocab_size": 8448})
    batch = random_batch(2, vision=True, fractional=False)
    mesh = build_mesh("1,2,2,2")
    trainer = Trainer(config, mesh, OPT, vision=True, seed=0)
    state = trainer.init_state()
    global_batch = batch_to_global(batch, mesh)
    sums = jax.jit(trainer.loss_sums)(state.params, global_batch)
    # Independent check of the text head: dense logits from the params.
    hidden = trainer.model.apply({"params": state.params}, global_batch["input_tokens"],
                                 vision_masks=global_batch["input_vision_masks"],
                                 segment_ids=global_batch["segment_ids"], position_ids=global_batch["positions"],
                                 compute_logits=True)
    logp = jax.nn.log_softmax(np.asarray(hidden.logits, np.float64), -1)
    text_w = batch["loss_masks"] * ~batch["target_vision_masks"]
    text_targets = np.where(batch["target_vision_masks"], 0, batch["target_tokens"])
    ce = -np.take_along_axis(np.asarray(logp), text_targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums["text"].loss_sum, np.sum(ce * text_w), rtol=1e-5)
    _, metrics = trainer.train_step(state, global_batch)
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["loss"], 0.5 * (metrics["vision_loss"] + metrics["text_loss"]), rtol=1e-6)
    np.testing.assert_allclose(metrics["text_loss"], np.sum(ce * text_w) / text_w.sum(), rtol=1e-5)


def test_tiny_model_memorises_a_small_corpus(tokenizer):
    # Four fixed sentences repeated: a model that memorises them predicts every next token after
    # the first few of each row; the bound 0.5 nats (from ln(32000) = 10.4 at random) needs it.
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ")
    ids = np.array((tokenizer.encode(text) * 40)[: 8 * 33 + 1], np.int32)
    rows = np.stack([ids[i * 33: i * 33 + 33] for i in range(8)])
    batch = dict(input_tokens=rows[:, :32], target_tokens=rows[:, 1:], loss_masks=np.ones((8, 32), np.float32),
                 segment_ids=np.ones((8, 32), np.int32), positions=np.tile(np.arange(32, dtype=np.int32), (8, 1)))
    config = tiny_config(vocab_size=32000)
    mesh = build_mesh("1,4,1,2")
    opt = {"adamw_optimizer": {"lr": 3e-3, "init_lr": 0.0, "lr_warmup_steps": 10, "lr_decay_steps": 200,
                               "end_lr": 3e-4, "weight_decay": 0.0}}
    trainer = Trainer(config, mesh, opt, seed=0)
    state = trainer.init_state()
    global_batch = batch_to_global(batch, mesh)
    losses = []
    for _ in range(120):
        state, metrics = trainer.train_step(state, global_batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 10.0 and losses[-1] < 0.5, (losses[0], losses[-1])


def test_checkpoint_round_trip_gives_the_same_eval_loss(tmp_path):
    config = tiny_config()
    mesh = build_mesh("1,2,2,2")
    trainer = Trainer(config, mesh, OPT, seed=0)
    state = trainer.init_state()
    batch = batch_to_global(random_batch(3), mesh)
    for _ in range(2):
        state, _ = trainer.train_step(state, batch)
    before = jax.device_get(trainer.eval_step(state.params, batch))
    ckpt = StreamingCheckpointer({"float_dtype": "fp32", "save_optimizer_state": True}, str(tmp_path))
    ckpt.save_all(2, state.params, state.opt_state)
    restored = trainer.load_state(f"trainstate::{tmp_path}/streaming_train_state")
    assert int(restored.step) == 2
    after = jax.device_get(trainer.eval_step(restored.params, batch))
    assert after["eval_loss"] == before["eval_loss"]
    # the next step is identical too (optimizer state restored)
    s1, m1 = trainer.train_step(state, batch)
    s2, m2 = trainer.train_step(restored, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    assert tree_max_rel_error(jax.device_get(s2.params), jax.device_get(s1.params)) == 0.0
    params_only = trainer.load_state(f"trainstate_params::{tmp_path}/streaming_train_state")
    assert int(params_only.step) == 0
    assert jax.device_get(trainer.eval_step(params_only.params, batch))["eval_loss"] == before["eval_loss"]


def test_frozen_parameters_do_not_move():
    config = VideoLLaMAConfig(**tiny_config().to_dict() | {"vision_vocab_size": 8448})
    mesh = build_mesh("1,2,2,2")
    trainer = Trainer(config, mesh, OPT, vision=True, seed=0, trainable_params="vte,vision_head")
    state = trainer.init_state()
    before = jax.device_get(state.params)
    state, _ = trainer.train_step(state, batch_to_global(random_batch(4, vision=True), mesh))
    after = jax.device_get(state.params)
    assert not np.array_equal(after["vision_head"]["kernel"], before["vision_head"]["kernel"])
    assert not np.array_equal(after["transformer"]["vte"]["embedding"], before["transformer"]["vte"]["embedding"])
    np.testing.assert_array_equal(after["lm_head"]["kernel"], before["lm_head"]["kernel"])
    np.testing.assert_array_equal(after["transformer"]["wte"]["embedding"], before["transformer"]["wte"]["embedding"])


def test_bf16_compute_tracks_fp32():
    """bf16 activations and matmuls, float32 parameters and optimizer state: same loss to bf16 precision."""
    config = tiny_config()
    batch = random_batch(5)
    mesh = build_mesh("1,2,2,2")
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        trainer = Trainer(config, mesh, OPT, dtype=dtype, seed=0)
        state = trainer.init_state()
        state, metrics = trainer.train_step(state, batch_to_global(batch, mesh))
        assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
        losses[dtype] = float(metrics["loss"])
    assert np.isfinite(losses[jnp.bfloat16])
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=2e-2)
