"""Train steps: sharding invariance, the original's loss averaging and MultiSteps accumulation,
micro-batches, schedule position on resume, learning, bf16, checkpoint round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def one_step(mesh_dim, config, batch, opt=OPT, vision=False, devices=None, **trainer_args):
    """(gradients, params after one step, metrics) on a mesh."""
    mesh = build_mesh(mesh_dim, devices)
    trainer = Trainer(config, mesh, opt, vision=vision, seed=0, **trainer_args)
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


@pytest.mark.parametrize("averaging", ["per_row", "per_token"])
def test_micro_batches_give_the_whole_batch_gradient(averaging):
    config = tiny_config()
    batch = random_batch(1)
    full_grads, _, full = one_step("1,2,2,2", config, batch, loss_averaging=averaging)
    acc_grads, _, acc = one_step("1,2,2,2", config, batch, loss_averaging=averaging, micro_batches=2)
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["gradient_norm"], full["gradient_norm"], rtol=1e-5)
    assert tree_max_rel_error(acc_grads, full_grads) <= 1e-5


def test_accumulate_gradient_steps_is_multisteps():
    """k=2: one whole batch per step, parameters unchanged after odd steps, and after each pair
    exactly one plain optimizer update with the mean of the two batches' gradients (computed
    here with the k=1 optimizer). Batch 8 on mesh 1,8,1,1 (rows over 8 devices) must work."""
    config = tiny_config()
    opt = {"adamw_optimizer": {"lr": 1e-2, "init_lr": 0.0, "lr_warmup_steps": 4, "lr_decay_steps": 100,
                               "end_lr": 1e-3, "weight_decay": 0.0}}
    mesh = build_mesh("1,8,1,1")
    accumulating = Trainer(config, mesh, dict(opt, accumulate_gradient_steps=2), seed=0)
    plain = Trainer(config, mesh, opt, seed=0)
    state = accumulating.init_state()
    ref_params = jax.device_get(state.params)
    ref_opt = plain.tx.init(ref_params)
    batches = [batch_to_global(random_batch(10 + i, fractional=False), mesh) for i in range(4)]
    rates = []
    for i, batch in enumerate(batches):
        grads = jax.device_get(jax.jit(plain.gradients)(jax.device_put(ref_params), batch)[0])
        before = jax.device_get(state.params)
        state, metrics = accumulating.train_step(state, batch)
        rates.append(float(metrics["learning_rate"]))
        if i % 2 == 0:
            first = grads
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
            continue
        mean = jax.tree.map(lambda a, b: (a + b) / 2, first, grads)
        updates, ref_opt = plain.tx.update(mean, ref_opt, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        assert tree_max_rel_error(jax.device_get(state.params), ref_params) <= 1e-5
    # The schedule counts updates: 0 before the first, 1 before the second (warmup 4: lr/4).
    np.testing.assert_allclose(rates, [0.0, 0.0, 2.5e-3, 2.5e-3], rtol=1e-6)


def test_loss_weights_average_rows_as_the_original():
    """Row 0: one loss token; row 1: 99. With ce 10 on row 0 and 1 on row 1 the original's loss
    is (10 + 1) / 2 = 5.5 (per row); per token it is (10 + 99) / 100 = 1.09."""
    masks = np.zeros((2, 100), np.float32)
    masks[0, 0] = 1.0
    masks[1, :99] = 1.0
    ce = np.where(np.arange(2)[:, None] == 0, 10.0, 1.0)
    batch = {"target_tokens": np.zeros((2, 100), np.int32), "loss_masks": masks}
    mesh = build_mesh("1,1,1,1", jax.devices()[:1])
    for averaging, expected in (("per_row", 5.5), ("per_token", 1.09)):
        trainer = Trainer(tiny_config(), mesh, OPT, loss_averaging=averaging)
        weights, totals = trainer.loss_weights(batch)
        np.testing.assert_allclose(np.sum(weights["text"] * ce) / totals["text"], expected, rtol=1e-6)


def test_per_row_loss_matches_the_original_formula():
    """The trainer's loss and accuracy against the original's cross_entropy_loss_and_accuracy on
    dense float64 logits, with rows of very different loss counts and one row without loss."""
    config = tiny_config()
    batch = random_batch(6, fractional=False)
    batch["loss_masks"][1, 3:] = 0.0  # three loss tokens
    batch["loss_masks"][2] = 0.0  # none: the row still counts in the mean, as a zero
    mesh = build_mesh("1,2,2,2")
    trainer = Trainer(config, mesh, OPT, seed=0)
    state = trainer.init_state()
    global_batch = batch_to_global(batch, mesh)
    out = trainer.model.apply({"params": state.params}, global_batch["input_tokens"],
                              segment_ids=global_batch["segment_ids"], position_ids=global_batch["positions"],
                              compute_logits=True)
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    token_logp = np.take_along_axis(logp, batch["target_tokens"][..., None], -1)[..., 0]
    valid = batch["loss_masks"]
    length = np.maximum(valid.sum(-1), 1e-10)
    loss = -np.mean(np.where(valid > 0, token_logp, 0).sum(-1) / length)
    acc = np.mean(np.where(valid > 0, logits.argmax(-1) == batch["target_tokens"], False).sum(-1) / length)
    metrics = jax.device_get(trainer.eval_step(state.params, global_batch))
    np.testing.assert_allclose(metrics["eval_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["eval_acc"], acc, rtol=1e-5)
    per_token = Trainer(config, mesh, OPT, seed=0, loss_averaging="per_token")
    tokens_mean = -np.sum(np.where(valid > 0, token_logp, 0)) / valid.sum()
    np.testing.assert_allclose(jax.device_get(per_token.eval_step(state.params, global_batch))["eval_loss"],
                               tokens_mean, rtol=1e-5)
    assert abs(loss - tokens_mean) > 1e-3  # the batch tells the two apart


def test_resume_without_optimizer_state_continues_the_schedule():
    """A state rebuilt from params at step 5 (what autoresume does without saved optimizer state)
    makes the update an independent numpy Adam computes at update count 5: warmup lr(5) = 5e-3,
    bias corrections of the 6th step, fresh moments. Restarting the count at 0 gives lr 0."""
    config = tiny_config()
    opt = {"adamw_optimizer": {"lr": 1e-2, "init_lr": 0.0, "lr_warmup_steps": 10, "lr_decay_steps": 100,
                               "end_lr": 1e-3, "weight_decay": 0.0, "clip_gradient": 1e9}}
    mesh = build_mesh("1,2,2,2")
    trainer = Trainer(config, mesh, opt, seed=0)
    state = trainer.init_state()
    batch = batch_to_global(random_batch(7), mesh)
    for _ in range(5):
        state, _ = trainer.train_step(state, batch)
    resumed = trainer.state_from_params(state.params, step=5)
    counts = [int(x) for x in jax.tree.leaves(resumed.opt_state) if np.ndim(x) == 0]
    assert counts and all(c == 5 for c in counts), counts
    params = jax.device_get(resumed.params)
    grads = jax.device_get(jax.jit(trainer.gradients)(resumed.params, batch)[0])
    after, metrics = trainer.train_step(resumed, batch)
    assert float(metrics["learning_rate"]) == pytest.approx(5e-3)
    b1, b2, eps, t = 0.9, 0.95, 1e-8, 6

    def adam(p, g):
        g = np.asarray(g, np.float64)
        m_hat, v_hat = (1 - b1) * g / (1 - b1 ** t), (1 - b2) * g * g / (1 - b2 ** t)
        return p - 5e-3 * m_hat / (np.sqrt(v_hat) + eps)

    expected = jax.tree.map(adam, params, grads)
    assert tree_max_rel_error(jax.device_get(after.params), expected) <= 1e-5


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
    per_row = np.mean(np.sum(ce * text_w, -1) / np.maximum(text_w.sum(-1), 1e-10))  # the original's averaging
    np.testing.assert_allclose(metrics["text_loss"], per_row, rtol=1e-5)


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
    """bf16 activations and matmuls, float32 parameters and optimizer state. Weights drawn wide
    (init 0.1) so the logits are far from uniform: per-position logits and the gradient agree
    with fp32 to bf16 precision (measured: mean error 0.008 of the logits' spread), while
    zeroing one layer's MLP moves them far outside that (0.6)."""
    config = tiny_config(initializer_range=0.1)
    batch = random_batch(5, fractional=False)
    mesh = build_mesh("1,2,2,2")
    global_batch = batch_to_global(batch, mesh)
    logits, grads = {}, {}

    def forward(model, params):  # jitted: one compile instead of op-by-op dispatch on 8 devices
        return np.asarray(jax.jit(lambda p: model.apply(
            {"params": p}, global_batch["input_tokens"], segment_ids=global_batch["segment_ids"],
            position_ids=global_batch["positions"], compute_logits=True).logits)(params), np.float32)

    for dtype in (jnp.float32, jnp.bfloat16):
        trainer = Trainer(config, mesh, OPT, dtype=dtype, seed=0)
        state = trainer.init_state()
        logits[dtype] = forward(trainer.model, state.params)
        grads[dtype] = np.concatenate([np.ravel(g) for g in jax.tree.leaves(
            jax.device_get(jax.jit(trainer.gradients)(state.params, global_batch)[0]))])
        state, _ = trainer.train_step(state, global_batch)
        assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
    ref = logits[jnp.float32]
    scale = np.std(ref)
    assert scale > 0.5  # far from uniform
    bf16_error = np.mean(np.abs(logits[jnp.bfloat16] - ref)) / scale
    assert bf16_error < 0.02, bf16_error
    g32, g16 = grads[jnp.float32], grads[jnp.bfloat16]
    assert np.dot(g32, g16) / (np.linalg.norm(g32) * np.linalg.norm(g16)) > 0.99
    # Control: the same comparison can fail. One layer's MLP output zeroed, fp32.
    trainer = Trainer(config, mesh, OPT, seed=0)
    params = jax.tree.map(np.array, jax.device_get(trainer.init_state().params))
    layer = params["transformer"]["h"]["scan_decoder"]["feed_forward"]["w2"]["kernel"]  # [layers, ...]
    layer[0] = 0.0
    damaged = forward(trainer.model, params)
    assert np.mean(np.abs(damaged - ref)) / scale > 10 * bf16_error


def test_a_text_checkpoint_starts_a_vision_language_stage(tmp_path):
    """The paper's LWM-1K stage starts from LWM-Text-1M: a params file without the vision
    embedding and head loads into the vision-language model, every text weight as saved and
    the two vision tensors from their initialisation; any other missing key is still an error."""
    from lwm.checkpoint import load_streaming, save_streaming

    mesh = build_mesh("1,2,1,4")
    text = Trainer(tiny_config(), mesh, OPT, seed=0)
    text_params = jax.device_get(text.init_state().params)
    save_streaming(str(tmp_path / "text"), text_params)
    vision_config = VideoLLaMAConfig(**{**tiny_config().to_dict(), "vision_vocab_size": 8448})
    vision = Trainer(vision_config, mesh, OPT, vision=True, seed=3)
    state = vision.load_state(f"params::{tmp_path}/text")
    loaded = jax.device_get(state.params)
    fresh = jax.device_get(vision.init_state().params)
    np.testing.assert_array_equal(loaded["transformer"]["wte"]["embedding"], text_params["transformer"]["wte"]["embedding"])
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], text_params["lm_head"]["kernel"])
    np.testing.assert_array_equal(loaded["vision_head"]["kernel"], fresh["vision_head"]["kernel"])
    np.testing.assert_array_equal(loaded["transformer"]["vte"]["embedding"], fresh["transformer"]["vte"]["embedding"])
    partial = load_streaming(str(tmp_path / "text"))
    del partial["lm_head"]
    save_streaming(str(tmp_path / "broken"), partial)
    with pytest.raises(ValueError, match=r"missing keys \(1\): lm_head/kernel"):
        vision.load_state(f"params::{tmp_path}/broken")
