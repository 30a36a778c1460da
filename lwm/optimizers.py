"""Optax optimizers with LWM's flags and schedules: `adamw` (warmup + cosine) and `palm`.

    optimizer, info = OptimizerFactory.get_optimizer(FLAGS.optimizer, weight_decay_mask)
    lr_now = info["learning_rate_schedule"](train_state.step)   # what the trainer logs

Flags (`--optimizer.type=adamw --optimizer.adamw_optimizer.lr=8e-5 ...`) and defaults are
those of the original LWM/EasyLM optimizer factory, and so are the update rules:

* adamw: clip by global norm, then Adam (bias-corrected, eps 1e-8) with decoupled weight
  decay lr(t) * weight_decay * param on the masked parameters. The learning rate warms up
  linearly from init_lr to lr over lr_warmup_steps, then follows a half cosine down to end_lr
  at lr_decay_steps and stays there. `multiply_by_parameter_scale=True` swaps Adam for
  Adafactor-style updates (unfactored second moment, updates scaled by each parameter's RMS,
  momentum b1 without bias correction) with decay lr(t) * weight_decay * param.
* palm (Chowdhery et al. 2022, arXiv:2204.02311): the same Adafactor-style update with
  lr(t) = (lr / 0.01) / sqrt(max(t, lr_warmup_steps)) (so the default lr=0.01 and 10000
  warmup steps give 0.01 flat for 10k steps, then 1/sqrt(t)), second-moment decay
  beta2(t) = 1 - (t + 1)^(-b2), and decoupled weight decay (weight_decay / 1e-4) * lr(t)^2 * param.

Both are clipped by global norm first. `accumulate_gradient_steps=k > 1` wraps the optimizer in
`optax.MultiSteps(optimizer, k)`, as the original does: every train step takes a whole batch, the
gradients of k consecutive steps are averaged, and the parameters change once every k steps
(an effective batch of k x batch_size). The schedules count updates, not train steps: the
learning rate at train step s is schedule(s // k) (`update_count`).

A `trainable_mask` freezes parameters: frozen ones get exactly zero updates and no optimizer
state (`optax.multi_transform` with `set_to_zero`), e.g. to train only the vision embedding
and head: `mask_from_regex(params, ["transformer/vte/", "vision_head/"])`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

OPTIMIZER_TYPES = ("adamw", "palm")


def _updated(defaults: ConfigDict, updates, where: str) -> ConfigDict:
    """defaults overridden by `updates` (dict or ConfigDict, nested groups merged key by key);
    an unknown (e.g. misspelt) key or a value of the wrong type is an error naming the field."""
    if updates is None:
        return defaults
    if isinstance(updates, ConfigDict):
        updates = updates.to_dict()
    for key, value in updates.items():
        field = f"{where}.{key}"
        if key not in defaults:
            raise ValueError(f"unknown option {field} (known: {', '.join(sorted(defaults.keys()))})")
        if isinstance(defaults[key], ConfigDict):
            if not isinstance(value, (dict, ConfigDict)):
                raise ValueError(f"{field} is a group of options; got {value!r}")
            _updated(defaults[key], value, field)
            continue
        try:
            setattr(defaults, key, value)
        except TypeError as err:
            raise ValueError(f"bad value for {field}: {err}") from None
    return defaults


class OptimizerFactory:
    """Builds the optax optimizer named by `config.type` from a ConfigDict of flags."""

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.type = "adamw"  # 'adamw' or 'palm'
        config.accumulate_gradient_steps = 1  # train steps (batches) per update: optax.MultiSteps
        config.palm_optimizer = PalmOptimizerFactory.get_default_config()
        config.adamw_optimizer = AdamWOptimizerFactory.get_default_config()
        return _updated(config, updates, "optimizer")

    @classmethod
    def get_optimizer(cls, config=None, weight_decay_mask=None, trainable_mask=None):
        """-> (optax.GradientTransformation, info dict with 'learning_rate_schedule').

        weight_decay_mask: pytree of bools (True = decay) or a function params -> such a tree.
        trainable_mask: pytree of bools (True = train) or a function params -> such a tree;
            None trains everything.
        """
        config = cls.get_default_config(config)
        if config.type not in OPTIMIZER_TYPES:
            raise ValueError(f"--optimizer.type must be one of {OPTIMIZER_TYPES}, got {config.type!r}")
        if int(config.accumulate_gradient_steps) < 1:
            raise ValueError("--optimizer.accumulate_gradient_steps must be >= 1, "
                             f"got {config.accumulate_gradient_steps}")
        if config.type == "palm":
            optimizer, info = PalmOptimizerFactory.get_optimizer(config.palm_optimizer,
                                                                 weight_decay_mask)
        else:
            optimizer, info = AdamWOptimizerFactory.get_optimizer(config.adamw_optimizer,
                                                                  weight_decay_mask)
        if trainable_mask is not None:
            optimizer = freeze_untrainable(optimizer, trainable_mask)
        k = int(config.accumulate_gradient_steps)
        if k > 1:
            optimizer = optax.MultiSteps(optimizer, k).gradient_transformation()
        info["accumulate_gradient_steps"] = k
        return optimizer, info


class AdamWOptimizerFactory:
    """AdamW (or Adafactor-style with multiply_by_parameter_scale) with warmup + cosine decay."""

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.init_lr = 0.0  # learning rate at step 0
        config.end_lr = 0.001  # learning rate from lr_decay_steps on
        config.lr = 0.01  # peak learning rate, reached at lr_warmup_steps
        config.lr_warmup_steps = 2000  # linear warmup init_lr -> lr
        config.lr_decay_steps = 500000  # cosine lr -> end_lr ends here (counted from step 0)
        config.b1 = 0.9  # first-moment decay (momentum in Adafactor mode)
        config.b2 = 0.95  # second-moment decay (decay exponent in Adafactor mode)
        config.clip_gradient = 1.0  # global-norm clipping threshold
        config.weight_decay = 1e-4  # decoupled, times the learning rate
        config.bf16_momentum = False  # keep the first moment in bfloat16
        config.multiply_by_parameter_scale = False  # Adafactor-style updates instead of Adam
        return _updated(config, updates, "adamw_optimizer")

    @classmethod
    def get_optimizer(cls, config=None, weight_decay_mask=None):
        config = cls.get_default_config(config)
        _check_common(config, "--optimizer.adamw_optimizer")
        if not 0 <= config.b2 < 1:
            raise ValueError(f"--optimizer.adamw_optimizer.b2 must be in [0, 1), got {config.b2}")
        if config.lr_warmup_steps < 0 or config.lr_decay_steps <= config.lr_warmup_steps:
            raise ValueError("--optimizer.adamw_optimizer needs 0 <= lr_warmup_steps < lr_decay_steps, got "
                             f"lr_warmup_steps={config.lr_warmup_steps}, "
                             f"lr_decay_steps={config.lr_decay_steps}")
        schedule = warmup_cosine_schedule(config.init_lr, config.lr, config.end_lr,
                                          config.lr_warmup_steps, config.lr_decay_steps)
        momentum_dtype = jnp.bfloat16 if config.bf16_momentum else jnp.float32
        if config.multiply_by_parameter_scale:
            optimizer = optax.chain(
                optax.clip_by_global_norm(config.clip_gradient),
                _adafactor_update(schedule, config.b1, config.b2, momentum_dtype),
                scheduled_weight_decay(lambda step: schedule(step) * config.weight_decay,
                                       weight_decay_mask),
            )
        else:
            optimizer = optax.chain(
                optax.clip_by_global_norm(config.clip_gradient),
                optax.adamw(learning_rate=schedule, b1=config.b1, b2=config.b2,
                            weight_decay=config.weight_decay, mask=weight_decay_mask,
                            mu_dtype=momentum_dtype),
            )
        return optimizer, dict(learning_rate_schedule=schedule)


class PalmOptimizerFactory:
    """The PaLM recipe: Adafactor-style updates, 1/sqrt(step) learning rate, lr^2 weight decay."""

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.lr = 0.01  # lr(t) = (lr / 0.01) / sqrt(max(t, lr_warmup_steps))
        config.lr_warmup_steps = 10000  # steps at the flat initial learning rate
        config.b1 = 0.9  # momentum
        config.b2 = 0.99  # second-moment decay exponent: beta2(t) = 1 - (t + 1)^(-b2)
        config.clip_gradient = 1.0  # global-norm clipping threshold
        config.weight_decay = 1e-4  # decay = (weight_decay / 1e-4) * lr(t)^2 * param
        config.bf16_momentum = False  # keep the momentum in bfloat16
        return _updated(config, updates, "palm_optimizer")

    @classmethod
    def get_optimizer(cls, config=None, weight_decay_mask=None):
        config = cls.get_default_config(config)
        _check_common(config, "--optimizer.palm_optimizer")
        if config.lr_warmup_steps < 1:  # lr(0) would be 1/sqrt(0)
            raise ValueError(f"--optimizer.palm_optimizer.lr_warmup_steps must be >= 1, got {config.lr_warmup_steps}")
        if config.b2 <= 0:
            raise ValueError(f"--optimizer.palm_optimizer.b2 (a decay exponent) must be > 0, got {config.b2}")
        schedule = palm_schedule(config.lr, config.lr_warmup_steps)

        def weight_decay_schedule(step):
            return (config.weight_decay / 1e-4) * jnp.square(schedule(step))

        momentum_dtype = jnp.bfloat16 if config.bf16_momentum else jnp.float32
        optimizer = optax.chain(
            optax.clip_by_global_norm(config.clip_gradient),
            _adafactor_update(schedule, config.b1, config.b2, momentum_dtype),
            scheduled_weight_decay(weight_decay_schedule, weight_decay_mask),
        )
        return optimizer, dict(learning_rate_schedule=schedule,
                               weight_decay_schedule=weight_decay_schedule)


def _check_common(config: ConfigDict, where: str) -> None:
    if config.clip_gradient <= 0:
        raise ValueError(f"{where}.clip_gradient must be > 0, got {config.clip_gradient}")
    if not 0 <= config.b1 < 1:
        raise ValueError(f"{where}.b1 must be in [0, 1), got {config.b1}")
    if config.weight_decay < 0:
        raise ValueError(f"{where}.weight_decay must be >= 0, got {config.weight_decay}")


def warmup_cosine_schedule(init_lr, peak_lr, end_lr, warmup_steps, decay_steps):
    """Linear init_lr -> peak_lr over [0, warmup_steps], then a half cosine peak_lr -> end_lr
    over [warmup_steps, decay_steps], then end_lr.

    >>> f = warmup_cosine_schedule(0.0, 1.0, 0.1, 10, 110)
    >>> [round(float(f(s)), 4) for s in (0, 5, 10, 60, 110, 500)]
    [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """
    init_lr, peak_lr, end_lr = float(init_lr), float(peak_lr), float(end_lr)
    warmup_steps, decay_steps = int(warmup_steps), int(decay_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = init_lr + (peak_lr - init_lr) * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def palm_schedule(lr, warmup_steps):
    """lr(t) = (lr / 0.01) / sqrt(max(t, warmup_steps)): flat, then inverse square root.

    >>> f = palm_schedule(0.01, 100)
    >>> [round(float(f(s)), 4) for s in (0, 100, 400)]
    [0.1, 0.1, 0.05]
    """
    multiplier, warmup_steps = float(lr) / 0.01, int(warmup_steps)

    def schedule(step):
        return multiplier / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), warmup_steps))

    return schedule


def _adafactor_update(schedule, b1, b2, momentum_dtype):
    """Unfactored Adafactor as the original uses it: g / sqrt(v_t) with
    v_t = beta2(t) v + (1 - beta2(t)) (g^2 + 1e-30), beta2(t) = 1 - (t + 1)^(-b2), times lr(t)
    and max(rms(param), 1e-3), then momentum b1 (no bias correction), negated."""
    return optax.adafactor(learning_rate=schedule, multiply_by_parameter_scale=True, momentum=b1,
                           decay_rate=b2, factored=False, clipping_threshold=None,
                           dtype_momentum=momentum_dtype)


class ScheduledWeightDecayState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied so far


def scheduled_weight_decay(schedule: Callable, mask=None) -> optax.GradientTransformation:
    """Decoupled weight decay: updates - schedule(step) * params (on masked params only)."""

    def init_fn(params):
        del params
        return ScheduledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scheduled_weight_decay needs params: call update(grads, state, params)")
        rate = schedule(state.count)
        updates = jax.tree.map(lambda u, p: u - rate * p, updates, params)
        return updates, ScheduledWeightDecayState(count=optax.safe_increment(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    return transform if mask is None else optax.masked(transform, mask)


def freeze_untrainable(optimizer, trainable_mask) -> optax.GradientTransformation:
    """Run `optimizer` on the trainable params only; the rest get zero updates and no state."""

    def labels_from(mask_tree):
        return jax.tree.map(lambda trainable: "trainable" if trainable else "frozen", mask_tree)

    if callable(trainable_mask):
        labels = lambda params: labels_from(trainable_mask(params))  # noqa: E731
    else:
        labels = labels_from(trainable_mask)
    return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def update_count(step, accumulate_gradient_steps: int):
    """Optimizer updates made before train step `step` (what the schedules are evaluated at)."""
    return step // accumulate_gradient_steps


def at_train_step(opt_state, step, accumulate_gradient_steps: int = 1):
    """A fresh optimizer state moved to train step `step`: every schedule counter (optax's
    `count` fields) at the number of updates made so far, and MultiSteps' counters at the
    same place in the accumulation cycle, so a run restarted without its saved optimizer
    state continues the learning-rate schedule instead of warming up again. Moments (and
    gradients accumulated in an unfinished cycle) stay zero: they were not saved.
    """
    k = int(accumulate_gradient_steps)
    updates = update_count(step, k)
    position = {"count": updates, "gradient_step": updates, "mini_step": step % k}

    def move(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        if name in position and jnp.issubdtype(jnp.result_type(leaf), jnp.integer) and jnp.ndim(leaf) == 0:
            return jnp.full_like(leaf, position[name])
        return leaf

    return jax.tree_util.tree_map_with_path(move, opt_state)


def param_path(key_path) -> str:
    """A jax key path as 'transformer/h/0/attention/wq/kernel'."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def mask_from_regex(params, patterns: str | Sequence[str], *, invert: bool = False,
                    require_match: bool = True) -> Any:
    """Pytree of bools shaped like params: True where the '/'-joined parameter path
    matches (re.search) any pattern; `invert=True` gives the complement.

    >>> params = {"transformer": {"wte": {"embedding": 0}, "vte": {"embedding": 0}},
    ...           "vision_head": {"kernel": 0}}
    >>> mask_from_regex(params, ["transformer/vte/", "vision_head/"])
    {'transformer': {'vte': {'embedding': True}, 'wte': {'embedding': False}}, 'vision_head': {'kernel': True}}

    A pattern that matches no parameter is an error (usually a typo) unless require_match=False.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"bad parameter regex {pattern!r}: {err}") from None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [param_path(path) for path, _ in leaves]
    if require_match:
        for pattern in compiled:
            if not any(pattern.search(name) for name in names):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(f"parameter regex {pattern.pattern!r} matches no parameter "
                                 f"(parameters: {shown})")
    matched = [any(p.search(name) for p in compiled) != invert for name in names]
    return jax.tree_util.tree_unflatten(treedef, matched)
