"""Train and eval steps: sharded state, blockwise loss, the original's loss and update rules.

    trainer = Trainer(config, mesh, optimizer_config, dtype=jnp.float32, vision=False)
    state = trainer.init_state()                       # sharded by the partition rules
    state, metrics = trainer.train_step(state, batch)  # batch: global arrays PS(('dp','fsdp'), 'sp')

The loss never materialises [sequence, vocab] logits: the model returns final hidden states
and `lwm.loss.lm_head_loss` evaluates the head chunk by chunk on per-token weights.
`loss_averaging` chooses those weights:
  per_row   (default, the original's): each row's masked token losses averaged over that row's
            loss weight, then the mean over rows: loss = mean_b(sum_t w*ce / max(sum_t w, 1e-10));
  per_token: sum(w * ce) / sum(w) over the whole (global) batch.
They agree when every row carries the same loss weight (packed text with all-ones masks) and
differ otherwise: a row with 1 answer token at ce 10 and one with 99 at ce 1 give 5.5 per row
and 1.09 per token. Vision+text is 0.5 * (vision + text), each head averaged on its own mask.

`accumulate_gradient_steps=k` (the optimizer's flag) is the original's `optax.MultiSteps`:
one batch per step, one update per k steps. `micro_batches=m` is a memory knob of this
project: the step's batch is split into m micro-batches inside one jitted step and their
gradients summed, which gives exactly the whole batch's gradient. Dropout keys are
fold_in(seed, step): a resumed run draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from flax.serialization import from_state_dict
from flax.traverse_util import flatten_dict, unflatten_dict

from lwm.checkpoint import flat_fns, load_checkpoint, train_state_dict
from lwm.config import LLaMAConfig
from lwm.llama import init_params, lm_head_kernel
from lwm.loading import model_class
from lwm.loss import lm_head_loss
from lwm.mesh import BATCH_SPEC, make_shard_and_gather_fns, match_partition_rules, mesh_shape, partition_rules
from lwm.optimizers import OptimizerFactory, at_train_step, mask_from_regex, update_count

TEXT_KEYS = ("input_tokens", "target_tokens", "loss_masks", "segment_ids", "positions")
VISION_KEYS = TEXT_KEYS + ("input_vision_masks", "target_vision_masks")
LOSS_AVERAGING = ("per_row", "per_token")
# What a vision-language model has beyond a text model (a text checkpoint starts it without them).
VISION_ONLY_PARAMS = (("transformer", "vte", "embedding"), ("vision_head", "kernel"))
log = logging.getLogger("lwm.trainer")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: completed optimizer steps
    params: Any
    opt_state: Any


class Trainer:
    def __init__(self, config: LLaMAConfig, mesh, optimizer_config=None, dtype=jnp.float32, seed: int = 42,
                 vision: bool = False, trainable_params: str = "", loss_averaging: str = "per_row",
                 micro_batches: int = 1):
        if loss_averaging not in LOSS_AVERAGING:
            raise ValueError(f"loss_averaging must be one of {LOSS_AVERAGING}, got {loss_averaging!r}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.config = config
        self.mesh = mesh
        self.dtype = dtype
        self.vision = vision
        self.seed = seed
        self.loss_averaging = loss_averaging
        self.micro_batches = int(micro_batches)
        config.check_mesh(mesh_shape(mesh))
        self.model = model_class(config)(config, dtype=dtype, mesh=mesh)
        self.optimizer_config = OptimizerFactory.get_default_config(optimizer_config)
        self.accumulate_steps = int(self.optimizer_config.accumulate_gradient_steps)
        trainable = None
        if trainable_params:
            trainable = partial(mask_from_regex, patterns=trainable_params.split(","))
        self.tx, self.optimizer_info = OptimizerFactory.get_optimizer(self.optimizer_config, trainable_mask=trainable)
        self.dropout = any(getattr(config, k) > 0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))

        shapes = jax.eval_shape(self._init_state, jax.random.key(seed))
        rules = partition_rules(config.scan_layers, config.param_scan_axis)
        self.state_specs = TrainState(
            step=PS(), params=match_partition_rules(rules, shapes.params),
            opt_state=match_partition_rules(rules, shapes.opt_state, optimizer_state=True))
        self.state_shapes = shapes
        self.state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.state_specs,
                                            is_leaf=lambda x: isinstance(x, PS))
        self.batch_keys = VISION_KEYS if vision else TEXT_KEYS
        batch_sharding = {k: NamedSharding(mesh, BATCH_SPEC) for k in self.batch_keys}
        replicated = NamedSharding(mesh, PS())
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sharding),
                                  out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_shardings.params, batch_sharding),
                                 out_shardings=replicated)

    # ---- state --------------------------------------------------------------------------
    def _init_state(self, rng) -> TrainState:
        params = init_params(self.config, rng, model_class(self.config))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def init_state(self) -> TrainState:
        """Random parameters and fresh optimizer state, created directly on their shards."""
        return jax.jit(self._init_state, out_shardings=self.state_shardings)(jax.random.key(self.seed))

    def state_from_params(self, params, step: int = 0) -> TrainState:
        """A train state around loaded (sharded) params at train step `step`, with fresh optimizer
        moments whose schedule counters are moved to `step` (see `optimizers.at_train_step`)."""
        fresh = lambda p, s: at_train_step(self.tx.init(p), s, self.accumulate_steps)  # noqa: E731
        opt_state = jax.jit(fresh, out_shardings=self.state_shardings.opt_state)(params, jnp.int32(step))
        return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)

    def load_state(self, spec: str) -> TrainState:
        """A TrainState from any `--load_checkpoint` form, each tensor placed on its shard as it is
        read (floats restored to float32). `trainstate::` restores step and optimizer state too;
        the params-only forms start a fresh optimizer at step 0."""
        if spec.startswith("trainstate::"):
            shapes, specs = self.state_shapes, self.state_specs
            target = train_state_dict(shapes.step, shapes.params, shapes.opt_state)
            shard_fns, _ = make_shard_and_gather_fns(train_state_dict(specs.step, specs.params, specs.opt_state),
                                                     self.mesh, jnp.float32)
            raw, _ = load_checkpoint(spec, trainstate_target=target, trainstate_shard_fns=flat_fns(shard_fns))
            return TrainState(step=jnp.asarray(raw["step"], jnp.int32), params=raw["params"]["params"],
                              opt_state=from_state_dict(shapes.opt_state, raw["opt_state"]))
        shard_fns, _ = make_shard_and_gather_fns(self.state_specs.params, self.mesh, jnp.float32)
        optional = VISION_ONLY_PARAMS if self.vision else ()
        _, params = load_checkpoint(spec, params_target=self.state_shapes.params, params_shard_fns=flat_fns(shard_fns),
                                    optional_params=optional)
        flat = flatten_dict(params)
        missing = [key for key in optional if key not in flat]
        if missing:
            # A text model's weights starting a vision-language stage (the paper's LWM-1K from
            # LWM-Text-1M): the vision embedding and head start from their random initialisation.
            log.info("%s holds a text model: %s start from random initialisation (seed %d)", spec,
                     ", ".join("/".join(k) for k in missing), self.seed)
            fresh = flatten_dict(self.init_state().params)
            params = unflatten_dict({**flat, **{key: fresh[key] for key in missing}})
        return self.state_from_params(params)

    # ---- loss ---------------------------------------------------------------------------
    def _head_sums(self, hidden, kernel, targets, weights):
        return lm_head_loss(hidden, kernel.astype(self.dtype), targets, weights,
                            chunk_size=self.config.scan_loss_chunk_size, mesh=self.mesh)

    def head_masks(self, batch) -> dict:
        """{head: (targets [B, S], loss mask [B, S] float32)}: text only, or text and vision."""
        targets, masks = batch["target_tokens"], batch["loss_masks"].astype(jnp.float32)
        if not self.vision:
            return {"text": (targets, masks)}
        is_vision = batch["target_vision_masks"]
        return {"text": (jnp.where(is_vision, 0, targets), masks * (1.0 - is_vision)),
                "vision": (jnp.where(is_vision, targets, 0), masks * is_vision)}

    def loss_weights(self, batch) -> tuple[dict, dict]:
        """({head: per-token weights [B, S]}, {head: the loss's denominator}) of a whole batch.

        per_row folds each row's normaliser into its weights (w / max(row sum, 1e-10) / B), so
        the denominator is 1 and the weights split into micro-batches unchanged."""
        masks = {head: m for head, (_, m) in self.head_masks(batch).items()}
        if self.loss_averaging == "per_token":
            return masks, {head: jnp.sum(m) for head, m in masks.items()}
        rows = batch["target_tokens"].shape[0]
        weights = {head: m / (jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1e-10) * rows)
                   for head, m in masks.items()}
        return weights, {head: jnp.ones((), jnp.float32) for head in masks}

    def loss_sums(self, params, batch, rng=None, weights=None) -> dict:
        """{head: `lwm.loss.LossSums`} of sum(weight * ce) and sum(weight * correct); the weights
        are the batch's loss masks unless given (`loss_weights`)."""
        kwargs = dict(segment_ids=batch["segment_ids"], position_ids=batch["positions"], compute_logits=False,
                      deterministic=rng is None or not self.dropout)
        if self.vision:
            kwargs["vision_masks"] = batch["input_vision_masks"]
        rngs = {"dropout": rng} if rng is not None and self.dropout else {}
        hidden = self.model.apply({"params": params}, batch["input_tokens"], rngs=rngs, **kwargs).hidden_states
        kernels = {"text": lambda: lm_head_kernel(params, self.config)}
        if self.vision:
            from lwm.vision_llama import vision_head_kernel

            kernels["vision"] = lambda: vision_head_kernel(params, self.config)
        return {head: self._head_sums(hidden, kernels[head](), targets, masks if weights is None else weights[head])
                for head, (targets, masks) in self.head_masks(batch).items()}

    def _objective(self, params, batch, weights, rng, totals):
        """The batch loss contributed by this (micro-)batch: its sums over the whole batch's totals."""
        sums = self.loss_sums(params, batch, rng, weights)
        terms = [s.loss_sum / jnp.maximum(totals[k], 1e-30) for k, s in sums.items()]
        return sum(terms) / len(terms), sums

    @staticmethod
    def _metrics_from(sums: dict, totals: dict) -> dict:
        out = {}
        for head, s in sums.items():
            w = jnp.maximum(totals[head], 1e-30)
            out[f"{head}_loss"], out[f"{head}_acc"] = s.loss_sum / w, s.correct_sum / w
        if len(sums) == 1:
            return {"loss": out["text_loss"], "acc": out["text_acc"]}
        out["loss"] = 0.5 * (out["vision_loss"] + out["text_loss"])
        return out

    # ---- steps --------------------------------------------------------------------------
    def gradients(self, params, batch, rng=None):
        """(grads, loss sums, loss denominators) of the whole batch, over micro-batches if configured."""
        batch = {k: batch[k] for k in self.batch_keys}
        weights, totals = self.loss_weights(batch)
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)
        m = self.micro_batches
        if m == 1:
            (_, sums), grads = grad_fn(params, batch, weights, rng, totals)
            return grads, sums, totals
        b = batch["input_tokens"].shape[0]
        if b % m:
            raise ValueError(f"batch size {b} is not divisible by micro_batches={m}")
        # Micro-batch i takes rows i, i+m, i+2m, ...: each device's block of rows splits locally.
        split = lambda x: jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)  # noqa: E731
        micro = jax.tree.map(split, (batch, weights))

        def accumulate(carry, xs):
            i, (mb, mw) = xs
            (_, sums), grads = grad_fn(params, mb, mw, None if rng is None else jax.random.fold_in(rng, i), totals)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, params, *first, rng, totals)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, sums_shape))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(m), micro))
        return grads, sums, totals

    def _train_step(self, state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
        grads, sums, totals = self.gradients(state.params, batch, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = self._metrics_from(sums, totals)
        updates_made = update_count(state.step, self.accumulate_steps)
        metrics.update(learning_rate=self.optimizer_info["learning_rate_schedule"](updates_made),
                       gradient_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, params, batch):
        batch = {k: batch[k] for k in self.batch_keys}
        weights, totals = self.loss_weights(batch)
        metrics = self._metrics_from(self.loss_sums(params, batch, weights=weights), totals)
        return {f"eval_{k}": v for k, v in metrics.items()}

    # ---- accounting ---------------------------------------------------------------------
    def flops_per_token(self, seq_length: int) -> float:
        """Model FLOPs per trained token: 6 x matmul params + causal attention (fwd + bwd).

        Embedding lookups are not matmuls; a tied embedding is, as the head."""
        c = self.config
        matmul_params = c.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
        if self.vision and not c.tie_vision_embeddings:
            matmul_params -= c.vision_vocab_size * c.hidden_size
        attention = 6 * c.num_hidden_layers * c.hidden_size * seq_length  # 12 * L * H * S, halved by causality
        return 6.0 * matmul_params + attention
