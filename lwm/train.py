"""Train LWM text or video-language models: `python -m lwm.train` with the original's flags.

    python -m lwm.train --modality=text --mesh_dim='1,1,1,8' --load_llama_config=debug \\
        --update_llama_config="dict(max_sequence_length=2048)" --tokenizer=builtin \\
        --train_dataset.type=json --train_dataset.text_processor.fields=text \\
        --train_dataset.json_dataset.path=data.jsonl --train_dataset.json_dataset.seq_length=2048 \\
        --train_dataset.json_dataset.batch_size=8 --total_steps=100 --logger.output_dir=runs

The run folder is `logger.output_dir/<experiment_id>`: checkpoints in the original's layout
(docs/train.md), `metrics.jsonl` and the wandb files. `--autoresume=True` continues a run
from that folder (use `--logger.append_uuid=False` so the folder name is stable): every save
keeps an exact float32 train state and commits as a whole, so a run killed at any moment
and restarted logs the same losses as one that never stopped.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: glibc reads its tunables at start-up only
    from lwm.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()

import logging
import math
import os
import sys
import time

import jax
import numpy as np
from absl import app
from tqdm import tqdm

from lwm import cli, storage
from lwm.checkpoint import (StreamingCheckpointer, checkpoint_origin, failed_processes, float_dtype_by_name,
                            load_pickle, saved_step)
from lwm.config import LLaMAConfig, VideoLLaMAConfig, build_config_with_sources, describe_runtime_fields
from lwm.data import DatasetFactory
from lwm.distributed import JaxDistributedConfig
from lwm.flags import define_flags_with_default
from lwm.loading import checkpoint_file, compute_dtype
from lwm.llama import check_positions
from lwm.logger import MetricsLogger
from lwm.mesh import batch_to_global, build_mesh, data_rank_and_world, sharding_table
from lwm.optimizers import OptimizerFactory
from lwm.run_folder import RunFolderError, RunLock, check_shared_folder, shared_token
from lwm.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, resolve_tokenizer_file
from lwm.trainer import LOSS_AVERAGING, Trainer

log = logging.getLogger("lwm.train")

FLAGS, FLAGS_DEF = define_flags_with_default(
    modality="text",  # 'text' or 'vision,text'
    use_data_sharded_loader=True,
    seed=42,
    mesh_dim="1,-1,1,1",
    dtype="fp32",  # compute dtype: fp32, bf16, fp16 (parameters and optimizer stay fp32)
    total_steps=10000,
    load_llama_config="",
    update_llama_config="",
    load_checkpoint="",
    load_dataset_state="",
    log_freq=50,
    save_model_freq=0,
    save_milestone_freq=0,
    eval_steps=0,
    tokenizer=DEFAULT_TOKENIZER,
    train_dataset=DatasetFactory.get_default_config(),
    eval_dataset=DatasetFactory.get_default_config(),
    optimizer=OptimizerFactory.get_default_config(),
    checkpointer=StreamingCheckpointer.get_default_config(),
    llama=VideoLLaMAConfig.get_default_config(),
    logger=MetricsLogger.get_default_config(),
    log_all_worker=False,
    jax_distributed=JaxDistributedConfig.get_default_config(),
    autoresume=False,
    trainable_params="",  # comma-separated regexes: train only matching params (e.g. 'vte,vision_head')
    loss_averaging="auto",  # per_row (the original's), per_token, or auto: per_token for packed data, else per_row
    micro_batches=1,  # split each batch into this many micro-batches inside the step (memory, same gradient)
    peak_tflops_per_device=0.0,  # for the MFU estimate; 0 = report model TFLOP/s only
)


def dataset_options(config):
    """The options group of a DatasetFactory config's type (json_dataset, ...)."""
    sub = {"json": "json_dataset", "json_vision": "json_vision_dataset",
           "huggingface": "huggingface_dataset"}.get(config.type)
    if sub is None:
        raise ValueError(f"unknown dataset type {config.type!r}; expected json, json_vision or huggingface")
    return config[sub]


def dataset_shape(config) -> tuple[int, int]:
    """(global batch size, sequence length) of a DatasetFactory config."""
    options = dataset_options(config)
    return int(options.batch_size), int(options.seq_length)


def resolve_loss_averaging(choice: str, dataset_config) -> str:
    """`auto`: the original's per-row mean, except for packed rows, whose loss weights already
    give every example the same total weight, so a per-token sum is the mean over examples."""
    if choice != "auto":
        return choice
    options = dataset_options(dataset_config)
    packed = options.mode == "packed" if dataset_config.type == "json_vision" else options.packed
    return "per_token" if packed else "per_row"


def shared_experiment_id(logger_config) -> str:
    """The run id every process agrees on (process 0's uuid when append_uuid is set)."""
    base = logger_config.experiment_id
    if base and not logger_config.append_uuid:
        return base
    suffix = shared_token(16)
    return f"{base}-{suffix}" if base else suffix


class NonFiniteLoss(FloatingPointError):
    pass


def check_finite(metrics: dict, step: int, last_saved: int | None) -> None:
    """Stop on a non-finite loss, or on updated parameters (their norm) that are no longer finite."""
    values = jax.device_get({k: metrics[k] for k in ("loss", "gradient_norm", "param_norm") if k in metrics})
    bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
    if bad:
        kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written"
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise NonFiniteLoss(f"{what} at step {step}; stopping the run ({kept}). Lower the learning rate, "
                            "check the data, or use fp32 compute.")


def main(argv):
    del argv
    JaxDistributedConfig.initialize(FLAGS.jax_distributed)
    try:
        train()
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A collective failed: another process died (or its host). Waiting would hang until the
        # coordination service's own timeout; say what happened and leave at once, skipping
        # jax's shutdown barrier, which would wait for the dead peer.
        log.error("a collective with another process failed (%s); another process has probably stopped, so this "
                  "one stops too. Restart every process with --autoresume=True to continue from the last save.",
                  str(e).splitlines()[0][:300])
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)


def train():
    """The whole run, after jax.distributed is up."""
    if FLAGS.modality not in ("text", "vision,text"):
        raise app.UsageError(f"--modality must be 'text' or 'vision,text', got {FLAGS.modality!r}")
    vision = FLAGS.modality == "vision,text"
    is_main = jax.process_index() == 0
    variant = FLAGS.flag_dict()
    check_input_files()  # before the run folder, the model or the data exist: a typo costs nothing

    with cli.naming("--mesh_dim"):
        mesh = build_mesh(FLAGS.mesh_dim)
    tokenizer = load_tokenizer(FLAGS.tokenizer)
    try:
        config, sources = build_config_with_sources(
            FLAGS.load_llama_config, FLAGS.llama, FLAGS.update_llama_config, tokenizer, FLAGS.mesh_dim,
            VideoLLaMAConfig if vision else LLaMAConfig, explicit=FLAGS.explicit("llama"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    with cli.naming("--dtype"):
        dtype = compute_dtype(FLAGS.dtype)
    check_start_checkpoint(FLAGS.load_checkpoint, FLAGS.total_steps)
    if FLAGS.loss_averaging not in ("auto", *LOSS_AVERAGING):
        raise app.UsageError(f"--loss_averaging must be auto, {' or '.join(LOSS_AVERAGING)}; got {FLAGS.loss_averaging!r}")
    if FLAGS.micro_batches < 1:
        raise app.UsageError(f"--micro_batches must be >= 1, got {FLAGS.micro_batches}")
    trainer = Trainer(config, mesh, FLAGS.optimizer, dtype=dtype, seed=FLAGS.seed, vision=vision,
                      trainable_params=FLAGS.trainable_params,
                      loss_averaging=resolve_loss_averaging(FLAGS.loss_averaging, FLAGS.train_dataset),
                      micro_batches=FLAGS.micro_batches)
    if is_main:
        log.info("loss averaging: %s", trainer.loss_averaging)
        log.info("model config: %s", config.to_json_string())
        log.info("run-time fields: %s", describe_runtime_fields(config, sources))
        log.info("parameters (%.2fM):\n%s", config.num_params() / 1e6,
                 sharding_table(trainer.state_shapes.params, trainer.state_specs.params, mesh))

    global_batch, seq_length = dataset_shape(FLAGS.train_dataset)
    batch_shards = mesh.shape["dp"] * mesh.shape["fsdp"]
    if global_batch % batch_shards:
        raise app.UsageError(f"batch_size={global_batch} is not divisible by the mesh's dp * fsdp = {batch_shards}")
    if global_batch % (batch_shards * FLAGS.micro_batches):
        raise app.UsageError(f"batch_size={global_batch} does not split into micro_batches={FLAGS.micro_batches} "
                             f"that each divide over the mesh's dp * fsdp = {batch_shards}; use a micro_batches "
                             f"that divides {global_batch // batch_shards}")
    if seq_length % mesh.shape["sp"]:
        raise app.UsageError(f"seq_length={seq_length} is not divisible by the mesh's sp = {mesh.shape['sp']}")
    if seq_length > config.max_sequence_length:
        raise app.UsageError(f"dataset seq_length={seq_length} exceeds max_sequence_length={config.max_sequence_length}")
    attention = describe_attention(config, mesh, global_batch // FLAGS.micro_batches, seq_length, dtype)
    if is_main:  # (described on every process: a bad shape stops them all)
        processes = jax.process_count()
        log.info("mesh %s over %d devices (%d process%s); attention: %s", dict(mesh.shape), jax.device_count(),
                 processes, "es" if processes > 1 else "", attention)
    checkpointer_config = StreamingCheckpointer.get_default_config(FLAGS.checkpointer)
    with cli.naming("--checkpointer.float_dtype"):  # a bad value fails now, not at step 50
        float_dtype_by_name(checkpointer_config.float_dtype)
    rank, world = data_rank_and_world(mesh, global_batch) if FLAGS.use_data_sharded_loader else (0, 1)
    dataset = open_dataset("train_dataset", tokenizer, rank, world)
    eval_iterator = None
    if FLAGS.eval_steps > 0:
        eval_iterator = iter(open_dataset("eval_dataset", tokenizer, rank, world))
    eval_batch_size = dataset_shape(FLAGS.eval_dataset)[0] if eval_iterator else 0

    # The run folder: seen by every host, held by this copy of the run only, before anything is written.
    logger_config = MetricsLogger.get_default_config(FLAGS.logger)
    logger_config.experiment_id = shared_experiment_id(logger_config)
    logger_config.append_uuid = False
    if not logger_config.output_dir:
        logger_config.output_dir = shared_temp_folder()
    run_dir = storage.join(logger_config.output_dir, logger_config.experiment_id)
    token = shared_token()
    check_shared_folder(run_dir, token)  # every host sees the same run folder, or all stop here
    lock, refused = None, None
    if is_main:
        try:
            lock = RunLock(run_dir, checkpointer_config.lock_ttl_seconds, checkpointer_config.take_over_lock)
            log.info("%s", lock.acquire())
        except RunFolderError as e:
            refused = e
    if failed_processes(refused is not None):  # every process stops on process 0's refusal, at once
        raise refused or RunFolderError(f"run folder {run_dir}: process 0 could not take the run's lock (its log "
                                        "says why)")
    try:
        logger = MetricsLogger(logger_config, variant, enable=is_main or FLAGS.log_all_worker)
        checkpointer = StreamingCheckpointer(checkpointer_config, run_dir, lock=lock, token=token)
        run_steps(trainer, checkpointer, logger, dataset, eval_iterator, eval_batch_size, config, mesh, variant,
                  global_batch, seq_length)
    finally:
        if lock is not None:
            lock.release()
    if is_main:
        print(f"run folder: {run_dir}")


def open_dataset(group: str, tokenizer, rank: int, world: int):
    """The dataset of --train_dataset.* or --eval_dataset.*, its option errors naming the group."""
    with cli.naming(f"--{group}"):
        return DatasetFactory.load_dataset(getattr(FLAGS, group), tokenizer, rank, world)


def describe_attention(config, mesh, batch: int, seq_length: int, dtype) -> str:
    """The attention plan a training step of this shape follows (lwm.ops.plan_attention)."""
    from lwm.ops import plan_attention

    k = jax.ShapeDtypeStruct((batch, seq_length, config.num_key_value_heads, config.head_dim), dtype)
    try:
        return plan_attention(k, impl=config.resolved_attention_impl(), query_chunk_size=config.scan_query_chunk_size,
                              key_chunk_size=config.scan_key_chunk_size, mesh=mesh, layout=config.sequence_layout,
                              sp_attention=config.sp_attention, requested=config.attention_impl).describe()
    except ValueError as e:
        raise app.UsageError(f"attention at seq_length={seq_length}: {e}") from None


def shared_temp_folder() -> str:
    """No --logger.output_dir: a new temporary folder (one host; with several, say where)."""
    import tempfile

    if jax.process_count() > 1:
        raise app.UsageError("--logger.output_dir is required with several processes (a bucket URL such as "
                             "gs://bucket/runs, or a shared file system)")
    return tempfile.mkdtemp(prefix="lwm-")


def run_steps(trainer, checkpointer, logger, dataset, eval_iterator, eval_batch_size, config, mesh, variant,
              global_batch, seq_length):
    """Restore (autoresume, --load_checkpoint or fresh), then train, log and save to the end."""
    is_main = jax.process_index() == 0
    state, last_saved = restore_state(trainer, checkpointer, dataset)
    start_step = int(jax.device_get(state.step))
    moved = logger.restart_at(start_step)
    if moved:
        log.info("%s: %d rows of steps after %d (logged before this restart) moved to metrics.replaced.jsonl",
                 logger.metrics_path, moved, start_step)
    last_regular = last_saved  # the resumable save (milestones are not it, unless they are the only saves)
    milestones_resume = FLAGS.save_model_freq <= 0  # then autoresume starts from the newest milestone

    def to_global(batch, n):
        check_positions(batch["positions"], config)  # RoPE has no angles past max_sequence_length
        if config.sequence_layout != "contiguous":
            from lwm.ops.layout import to_layout

            batch = {k: to_layout(v, config.sequence_layout, mesh.shape["sp"], axis=1) for k, v in batch.items()}
        return batch_to_global({k: batch[k] for k in trainer.batch_keys}, mesh, n)

    def save(state, milestone=False):
        # A CheckpointWriteError (disk full, quota, I/O, a lost lock) reaches lwm.cli: one line, and
        # with several processes an immediate exit on every one of them (they all raise it together).
        nonlocal last_saved, last_regular
        step = int(jax.device_get(state.step))
        logger.flush()
        checkpointer.save_all(step, state.params, state.opt_state, dataset_state=dataset.get_state_dict(),
                              metadata=dict(flags=variant, llama_config=config.to_dict(), modality=FLAGS.modality),
                              milestone=milestone, resumable=milestone and milestones_resume)
        last_saved = step
        if not milestone:
            last_regular = step

    flops_per_step = trainer.flops_per_token(seq_length) * global_batch * seq_length
    data_iterator = iter(dataset)
    pending = None  # the previous step's metrics, checked for a finite loss one step late
    interval_start, interval_steps = time.time(), 0
    progress = tqdm(range(start_step, FLAGS.total_steps), initial=start_step, total=FLAGS.total_steps,
                    disable=not is_main, dynamic_ncols=True, desc="train")
    for step in progress:
        batch, dataset_metrics = next(data_iterator)
        if FLAGS.logger.profile_dir and step == start_step + 3:
            jax.profiler.start_trace(FLAGS.logger.profile_dir)
        state, metrics = trainer.train_step(state, to_global(batch, global_batch))
        if FLAGS.logger.profile_dir and step == start_step + 6:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if pending is not None:
            check_finite(*pending, last_saved)
        pending = (metrics, step + 1)
        interval_steps += 1
        done = step + 1
        if done % FLAGS.log_freq == 0 or done == FLAGS.total_steps:
            metrics = jax.device_get(metrics)
            check_finite(metrics, done, last_saved)
            elapsed = time.time() - interval_start
            record = {k: float(v) for k, v in metrics.items()}
            record.update(step_time=elapsed / interval_steps,
                          tokens_per_second=interval_steps * global_batch * seq_length / elapsed,
                          model_tflops_per_second=interval_steps * flops_per_step / elapsed / 1e12)
            if FLAGS.peak_tflops_per_device > 0:
                record["mfu"] = record["model_tflops_per_second"] / (FLAGS.peak_tflops_per_device * jax.device_count())
            if eval_iterator is not None:
                evals = [trainer.eval_step(state.params, to_global(next(eval_iterator)[0], eval_batch_size))
                         for _ in range(FLAGS.eval_steps)]
                record.update({k: float(np.mean([jax.device_get(e[k]) for e in evals])) for k in evals[0]})
            record.update({k: v for k, v in dataset_metrics.items() if np.isscalar(v)})
            logger.log(record, step=done)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            interval_start, interval_steps = time.time(), 0
        milestone = FLAGS.save_milestone_freq > 0 and done % FLAGS.save_milestone_freq == 0
        regular = FLAGS.save_model_freq > 0 and done % FLAGS.save_model_freq == 0
        if milestone or regular:
            check_finite(metrics, done, last_saved)
            save(state, milestone=milestone)
            if milestone and regular:
                save(state)
    if pending is not None:
        check_finite(*pending, last_saved)
    if FLAGS.save_model_freq > 0 and last_regular != int(jax.device_get(state.step)):
        save(state)  # the last step, also when it was a milestone: the resumable save is never behind
    logger.close()


def check_input_files() -> None:
    """Every file the flags name exists, locally or in a bucket (datasets, dataset state,
    checkpoint, tokenizer)."""
    named = []
    for group, used in (("train_dataset", True), ("eval_dataset", FLAGS.eval_steps > 0)):
        config = getattr(FLAGS, group)
        if used:
            with cli.naming(f"--{group}.type"):
                dataset_options(config)
        if used and config.type in ("json", "json_vision"):
            flag, path = f"--{group}.{config.type}_dataset.path", dataset_options(config).path
            if not path:
                raise app.UsageError(f"{flag} is required (a JSONL file)")
            named.append((flag, path))
    named.append(("--load_dataset_state", FLAGS.load_dataset_state))
    named.append(("--load_checkpoint", checkpoint_file(FLAGS.load_checkpoint)))
    cli.check_input_files(named)
    resolve_tokenizer_file(FLAGS.tokenizer)


def check_start_checkpoint(spec: str, total_steps: int) -> None:
    """Refuse a full train state that is already at or past total_steps: the run would train
    nothing and save the loaded weights as if it had."""
    if not spec.startswith("trainstate::"):
        return
    path = spec.split("::", 1)[1]
    if not storage.isfile(path):
        raise app.UsageError(f"--load_checkpoint: checkpoint file not found: {path}")
    step = saved_step(path)
    if step is not None and step >= total_steps:
        raise app.UsageError(
            f"--load_checkpoint={spec} is a train state at step {step} and --total_steps={total_steps} leaves "
            f"nothing to train; to start a new stage from its weights use --load_checkpoint=trainstate_params::"
            f"{path} (fresh optimizer, step 0), or raise --total_steps above {step} to continue it")


def describe_start_checkpoint(spec: str) -> str:
    """`params::PATH (step N of run R)` when the file is a run's save whose metadata says so."""
    step, run = checkpoint_origin(spec.split("::", 1)[1])
    return spec if step is None else f"{spec} (step {step} of run {run})"


def restore_state(trainer: Trainer, checkpointer: StreamingCheckpointer, dataset):
    """The starting train state and dataset position: autoresume, --load_checkpoint, or fresh."""
    repaired = checkpointer.recover()
    if repaired:
        log.info("%s: %s", checkpointer.checkpoint_dir, repaired)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lwm-checkpoint-recovered")
    latest = checkpointer.latest() if FLAGS.autoresume else None
    if latest is not None and "checkpoint" in latest:
        spec = latest["checkpoint"]
        state = trainer.load_state(spec)
        if int(jax.device_get(state.step)) != latest["step"]:
            if spec.startswith("trainstate::"):
                raise RuntimeError(f"{checkpointer.checkpoint_dir}: streaming_train_state is at step "
                                   f"{int(state.step)} but metadata.pkl says {latest['step']} (a save was "
                                   "interrupted between the two files); resume from a milestone instead")
            log.warning("resuming at step %d without optimizer state (it was not saved: "
                        "--checkpointer.save_optimizer_state=False): Adam moments start fresh; the "
                        "learning-rate schedule continues from step %d", latest["step"], latest["step"])
            if latest["step"] % trainer.accumulate_steps:
                log.warning("the first update after resuming averages %d of %d batches' gradients "
                            "(the rest of the accumulation cycle was not saved)",
                            trainer.accumulate_steps - latest["step"] % trainer.accumulate_steps,
                            trainer.accumulate_steps)
            state = trainer.state_from_params(state.params, latest["step"])
        dataset_state = latest["dataset_state"]
        if jax.process_count() > 1:  # each process resumes its own slice of the data
            own = storage.join(checkpointer.checkpoint_dir,
                               f"dataset.process{jax.process_index()}{latest['suffix']}.pkl")
            dataset_state = load_pickle(own) if storage.exists(own) else dataset_state
        if dataset_state is not None:
            dataset.load_state_dict(dataset_state)
        log.info("resumed from %s at step %d", spec, latest["step"])
        return state, latest["step"]
    if FLAGS.load_checkpoint:
        state = trainer.load_state(FLAGS.load_checkpoint)
        log.info("loaded %s", describe_start_checkpoint(FLAGS.load_checkpoint))
    else:
        state = trainer.init_state()
    if FLAGS.load_dataset_state:
        dataset.load_state_dict(load_pickle(FLAGS.load_dataset_state))
    return state, None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cli.run(main, expected=(NonFiniteLoss,))
