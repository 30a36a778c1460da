"""Optimizers: flags and defaults, schedules at hand-computed steps, updates against numpy
re-implementations of the update rules, frozen parameters, bf16 momentum."""
import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lwm.optimizers
from lwm.optimizers import OptimizerFactory, mask_from_regex


def tiny_tree(seed=0):
    """Params and grads with a matrix, a vector and a near-zero vector (rms below 1e-3)."""
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
              "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
              "tiny": {"bias": (rng.normal(size=(5,)) * 1e-5).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(3)]
    return params, grads


DECAY_MASK = {"dense": {"kernel": True}, "norm": {"scale": False}, "tiny": {"bias": True}}


def run_steps(optimizer, params, grads_list, jit=True):
    state = optimizer.init(params)
    update = jax.jit(optimizer.update) if jit else optimizer.update
    history = []
    for grads in grads_list:
        updates, state = update(grads, state, params)
        history.append(updates)
        params = optax.apply_updates(params, updates)
    return params, history, state


def clip_np(grads, max_norm):
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    return {k: g * (max_norm / max(norm, max_norm)) for k, g in grads.items()}, norm


def flat(tree):
    """{'dense/kernel': float64 array, ...}"""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {lwm.optimizers.param_path(path): np.asarray(x, np.float64) for path, x in leaves}


def numpy_adamw(params, grads_list, lr_fn, b1, b2, weight_decay, clip, decay_mask):
    params, mask = flat(params), flat(decay_mask)
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(grads_list, start=1):
        g, norm = clip_np(flat(grads), clip)
        assert norm > clip  # the test data exercises clipping
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            adam = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + 1e-8)
            params[k] = params[k] - lr_fn(t - 1) * (adam + weight_decay * mask[k] * params[k])
    return params


def numpy_adafactor(params, grads_list, lr_fn, decay_fn, b1, b2, clip, decay_mask):
    """Unfactored Adafactor with parameter scaling and undebiased momentum, then
    decoupled weight decay decay_fn(step) * param on the masked params."""
    params, mask = flat(params), flat(decay_mask)
    v = {k: np.zeros_like(p) for k, p in params.items()}
    mom = {k: np.zeros_like(p) for k, p in params.items()}
    for step, grads in enumerate(grads_list):
        g, _ = clip_np(flat(grads), clip)
        beta2 = 1.0 - (step + 1.0) ** (-b2)
        for k in params:
            v[k] = beta2 * v[k] + (1 - beta2) * (g[k] ** 2 + 1e-30)
            scale = max(math.sqrt(np.mean(params[k] ** 2)), 1e-3)
            u = g[k] / np.sqrt(v[k]) * lr_fn(step) * scale
            mom[k] = b1 * mom[k] + (1 - b1) * u
            params[k] = params[k] - mom[k] - decay_fn(step) * mask[k] * params[k]
    return params


def assert_tree_close(got, want, rtol=1e-5, atol=1e-7):
    got = flat(got)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def test_default_flags_match_the_original():
    config = OptimizerFactory.get_default_config()
    assert config.type == "adamw" and config.accumulate_gradient_steps == 1
    assert config.adamw_optimizer.to_dict() == dict(
        init_lr=0.0, end_lr=0.001, lr=0.01, lr_warmup_steps=2000, lr_decay_steps=500000,
        b1=0.9, b2=0.95, clip_gradient=1.0, weight_decay=1e-4, bf16_momentum=False,
        multiply_by_parameter_scale=False)
    assert config.palm_optimizer.to_dict() == dict(
        lr=0.01, lr_warmup_steps=10000, b1=0.9, b2=0.99, clip_gradient=1.0, weight_decay=1e-4,
        bf16_momentum=False)


def test_updates_merge_into_defaults_and_unknown_keys_raise():
    # The flags of scripts/run_train_vision_text.sh.
    config = OptimizerFactory.get_default_config(dict(
        type="adamw", accumulate_gradient_steps=1,
        adamw_optimizer=dict(weight_decay=0.1, lr=8e-5, end_lr=8e-5, lr_warmup_steps=5,
                             lr_decay_steps=200)))
    assert config.adamw_optimizer.lr == 8e-5 and config.adamw_optimizer.b2 == 0.95
    _, info = OptimizerFactory.get_optimizer(config)
    lr = info["learning_rate_schedule"]
    np.testing.assert_allclose([lr(0), lr(1), lr(5), lr(100), lr(200), lr(1000)],
                               [0.0, 1.6e-5, 8e-5, 8e-5, 8e-5, 8e-5], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown option optimizer.bf16_accumulate_gradient"):
        OptimizerFactory.get_default_config(dict(bf16_accumulate_gradient=True))
    with pytest.raises(ValueError, match=r"unknown option optimizer.adamw_optimizer.learning_rate "
                                         r"\(known: b1, b2, bf16_momentum"):
        OptimizerFactory.get_default_config(dict(adamw_optimizer=dict(learning_rate=1.0)))
    with pytest.raises(ValueError, match="bad value for optimizer.palm_optimizer.lr"):
        OptimizerFactory.get_default_config(dict(palm_optimizer=dict(lr="fast")))


def test_adamw_schedule_at_hand_computed_steps():
    _, info = OptimizerFactory.get_optimizer(dict(type="adamw"))  # the defaults
    lr = info["learning_rate_schedule"]
    # warmup 0 -> 0.01 over 2000 steps; cosine 0.01 -> 0.001 over steps 2000..500000.
    steps = [0, 500, 1000, 2000, 2000 + 124500, 251000, 500000, 600000]
    want = [0.0, 0.0025, 0.005, 0.01, 0.001 + 0.0045 * (1 + math.sqrt(0.5)), 0.0055, 0.001, 0.001]
    np.testing.assert_allclose([float(lr(s)) for s in steps], want, rtol=1e-5)
    np.testing.assert_allclose(lr(jnp.array(steps)), want, rtol=1e-5)  # vectorised, traced steps
    # The original used optax's warmup_cosine_decay_schedule with these arguments.
    original = optax.warmup_cosine_decay_schedule(0.0, 0.01, 2000, 500000, 0.001)
    probe = np.random.default_rng(0).integers(0, 700000, size=50)
    np.testing.assert_allclose(lr(probe), original(probe), rtol=1e-5, atol=1e-9)


def test_palm_schedule_at_hand_computed_steps():
    _, info = OptimizerFactory.get_optimizer(dict(type="palm"))  # lr 0.01, warmup 10000
    lr, decay = info["learning_rate_schedule"], info["weight_decay_schedule"]
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5000, 10000, 40000, 1000000)],
                               [0.01, 0.01, 0.01, 0.005, 0.001], rtol=1e-6)
    np.testing.assert_allclose(float(decay(40000)), 0.005 ** 2, rtol=1e-6)  # (1e-4/1e-4) lr^2
    _, info = OptimizerFactory.get_optimizer(dict(
        type="palm", palm_optimizer=dict(lr=0.02, lr_warmup_steps=100, weight_decay=3e-4)))
    lr, decay = info["learning_rate_schedule"], info["weight_decay_schedule"]
    # (0.02 / 0.01) / sqrt(max(t, 100)): 0.2 up to step 100, then 2 / sqrt(t).
    np.testing.assert_allclose([float(lr(s)) for s in (0, 50, 100, 400, 10000)],
                               [0.2, 0.2, 0.2, 0.1, 0.02], rtol=1e-6)
    np.testing.assert_allclose(float(decay(400)), 3.0 * 0.1 ** 2, rtol=1e-6)


def test_adamw_update_matches_numpy():
    params, grads = tiny_tree(seed=1)
    grads = [jax.tree.map(lambda g: g * 3.0, g) for g in grads]  # global norm > clip
    config = dict(type="adamw", adamw_optimizer=dict(
        init_lr=1e-3, lr=1e-2, end_lr=1e-3, lr_warmup_steps=2, lr_decay_steps=10,
        b1=0.8, b2=0.9, clip_gradient=0.5, weight_decay=0.3))
    optimizer, info = OptimizerFactory.get_optimizer(config, weight_decay_mask=DECAY_MASK)
    got, _, _ = run_steps(optimizer, params, grads)
    lr = lambda t: float(info["learning_rate_schedule"](t))  # noqa: E731
    want = numpy_adamw(params, grads, lr, 0.8, 0.9, 0.3, 0.5, DECAY_MASK)
    assert_tree_close(got, want)


def test_palm_update_matches_numpy():
    params, grads = tiny_tree(seed=2)
    config = dict(type="palm", palm_optimizer=dict(
        lr=1e-3, lr_warmup_steps=2, b1=0.7, b2=0.8, clip_gradient=1.5, weight_decay=2e-4))
    # Weight decay mask given as a function of the params, the way the trainer builds it.
    decay_mask_fn = lambda p: mask_from_regex(p, ["norm/"], invert=True)  # noqa: E731
    optimizer, _ = OptimizerFactory.get_optimizer(config, weight_decay_mask=decay_mask_fn)
    got, _, _ = run_steps(optimizer, params, grads)
    lr = lambda t: 0.1 / math.sqrt(max(t, 2))  # noqa: E731  (1e-3 / 0.01) / sqrt(max(t, 2))
    decay = lambda t: 2.0 * lr(t) ** 2  # noqa: E731  (2e-4 / 1e-4) * lr^2
    want = numpy_adafactor(params, grads, lr, decay, 0.7, 0.8, 1.5, DECAY_MASK)
    assert_tree_close(got, want)


def test_adafactor_mode_runs_changes_params_and_matches_numpy():
    params, grads = tiny_tree(seed=3)
    config = dict(type="adamw", adamw_optimizer=dict(
        init_lr=0.01, lr=0.05, end_lr=0.0, lr_warmup_steps=1, lr_decay_steps=5, b1=0.9, b2=0.95,
        clip_gradient=1.0, weight_decay=0.1, multiply_by_parameter_scale=True))
    optimizer, info = OptimizerFactory.get_optimizer(config, weight_decay_mask=DECAY_MASK)
    got, _, _ = run_steps(optimizer, params, grads)
    for k, before in flat(params).items():
        assert np.abs(flat(got)[k] - before).max() > 0, k
    lr = lambda t: float(info["learning_rate_schedule"](t))  # noqa: E731
    decay = lambda t: lr(t) * 0.1  # noqa: E731
    want = numpy_adafactor(params, grads, lr, decay, 0.9, 0.95, 1.0, DECAY_MASK)
    assert_tree_close(got, want)


def vision_params():
    rng = np.random.default_rng(4)
    shapes = {"transformer": {"wte": {"embedding": (11, 4)}, "vte": {"embedding": (7, 4)},
                              "ln_f": {"kernel": (4,)}},
              "lm_head": {"kernel": (4, 11)}, "vision_head": {"kernel": (4, 7)}}
    return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("optimizer_type", ["adamw", "palm"])
@pytest.mark.parametrize("mask_as_function", [False, True])
def test_frozen_params_get_zero_updates_and_no_state(optimizer_type, mask_as_function):
    params = vision_params()
    rng = np.random.default_rng(5)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(2)]
    patterns = ["transformer/vte/", "vision_head/"]
    trainable = mask_from_regex(params, patterns)
    mask = (lambda p: mask_from_regex(p, patterns)) if mask_as_function else trainable
    config = dict(type=optimizer_type, adamw_optimizer=dict(lr_warmup_steps=0, lr_decay_steps=10))
    optimizer, _ = OptimizerFactory.get_optimizer(config, weight_decay_mask=decay_matrices(params),
                                                  trainable_mask=mask)
    new_params, history, state = run_steps(optimizer, params, grads)
    for updates in history:
        for name, u in flat(updates).items():
            frozen = not any(p in name for p in patterns)
            assert np.all(u == 0) if frozen else np.abs(u).max() > 0, name
    # The trainable part moves exactly as the same optimizer run on that part alone.
    sub = lambda tree: {"vte": tree["transformer"]["vte"], "vision_head": tree["vision_head"]}  # noqa: E731
    alone, _ = OptimizerFactory.get_optimizer(config, weight_decay_mask=decay_matrices(sub(params)))
    alone_params, _, _ = run_steps(alone, sub(params), [sub(g) for g in grads])
    assert_tree_close(sub(new_params), flat(alone_params), rtol=1e-6)
    # Optimizer state holds arrays shaped like the trainable params only (no frozen moments).
    # (Adafactor also keeps (1,)-shaped placeholders for its unused factored statistics.)
    state_shapes = sorted(x.shape for x in jax.tree.leaves(state) if x.size > 1)
    assert state_shapes == sorted([(7, 4), (4, 7)] * 2)  # adam mu, nu / adafactor v, momentum


def decay_matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


@pytest.mark.parametrize("config", [
    dict(type="adamw", adamw_optimizer=dict(bf16_momentum=True, lr_warmup_steps=0)),
    dict(type="adamw", adamw_optimizer=dict(bf16_momentum=True, lr_warmup_steps=0,
                                            multiply_by_parameter_scale=True)),
    dict(type="palm", palm_optimizer=dict(bf16_momentum=True)),
])
def test_bf16_momentum_keeps_first_moment_in_bf16(config):
    params, grads = tiny_tree(seed=6)
    optimizer, _ = OptimizerFactory.get_optimizer(config)
    _, _, state = run_steps(optimizer, params, grads[:1])
    floats = [x for x in jax.tree.leaves(state) if x.size > 1]
    dtypes = sorted(str(x.dtype) for x in floats)
    n = len(jax.tree.leaves(params))
    # One bf16 first moment and one float32 second moment per parameter.
    assert dtypes == ["bfloat16"] * n + ["float32"] * n, dtypes
    assert all(np.abs(np.asarray(x, np.float32)).max() > 0 for x in floats)
    _, _, state32 = run_steps(OptimizerFactory.get_optimizer(
        dict(type=config["type"]))[0], params, grads[:1])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state32) if x.size > 1)


def test_mask_from_regex():
    params = vision_params()
    mask = mask_from_regex(params, r"_head/kernel$")
    assert mask["lm_head"]["kernel"] and mask["vision_head"]["kernel"]
    assert not any(jax.tree.leaves(mask["transformer"]))
    inverted = mask_from_regex(params, r"_head/kernel$", invert=True)
    assert jax.tree.map(lambda a, b: a != b, mask, inverted) == jax.tree.map(lambda _: True, mask)
    assert mask_from_regex([np.zeros(2), {"w": np.zeros(1)}], ["^1/w$"]) == [False, {"w": True}]
    with pytest.raises(ValueError, match="'transformer/vte_typo/' matches no parameter"):
        mask_from_regex(params, ["transformer/vte_typo/"])
    assert not any(jax.tree.leaves(mask_from_regex(params, ["nothing"], require_match=False)))
    with pytest.raises(ValueError, match="bad parameter regex"):
        mask_from_regex(params, ["(unclosed"])


@pytest.mark.parametrize("config, message", [
    (dict(type="sgd"), "optimizer.type must be one of"),
    (dict(accumulate_gradient_steps=0), "accumulate_gradient_steps must be >= 1"),
    (dict(type="palm", palm_optimizer=dict(lr_warmup_steps=0)), "lr_warmup_steps must be >= 1"),
    (dict(adamw_optimizer=dict(lr_warmup_steps=10, lr_decay_steps=10)), "lr_warmup_steps < lr_decay_steps"),
    (dict(adamw_optimizer=dict(b2=1.0)), r"b2 must be in \[0, 1\)"),
    (dict(adamw_optimizer=dict(clip_gradient=0.0)), "clip_gradient must be > 0"),
])
def test_bad_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        OptimizerFactory.get_optimizer(config)


def test_docstring_examples():
    assert doctest.testmod(lwm.optimizers).failed == 0
