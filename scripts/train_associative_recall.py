"""Train a model from random weights on multi-query associative recall rows and follow how
often it looks each asked key's value up (`lwm/associative_recall.py` makes and scores the rows).

    python scripts/train_associative_recall.py --load_llama_config=json::configs/reproduce/tiny_model.json \\
        --pairs=4,4 --value_tokens=1 --gap=0 --seq_length=32 --batch_size=128 --steps=2000 \\
        --output_file=recall.json

Every --eval_every steps the model predicts a fixed held-out batch (--eval_rows rows of a
separate seed); the table printed, and --output_file's "curve", give the training loss, the
accuracy on each query's first value token (the only key-dependent one) and on all answer
tokens, beside the two reference levels of those rows: a uniform pick among the row's values
(in_context) and among the values no earlier query answered (elimination).

`--max_gap=M` gives each row its own gap in [--gap, M]; each eval point then also scores the
held-out rows of each gap apart ("by_gap" in the curve).
`--first_gap=G --first_gap_steps=N` trains the first N steps on rows whose keys stand G filler
tokens from their values instead of --gap (a curriculum: the lookup learnt where key and value
are close, then moved apart); each eval point then also scores held-out rows at G
("at_first_gap" in the curve).

The file is rewritten at every eval point with "complete": false until the last, so a long run
that is stopped keeps the curve it had.
"""
import dataclasses
import json
import os
import platform
import time

from absl import app

from lwm import cli
from lwm.flags import define_flags_with_default

FLAGS, FLAGS_DEF = define_flags_with_default(
    load_llama_config="json::configs/reproduce/tiny_model.json", update_llama_config="", pairs="4,4",
    value_tokens=1, gap=0, max_gap=-1, queries="each_once", seq_length=32, batch_size=128, steps=2000, lr=2e-3,
    warmup_steps=50, eval_every=100, eval_rows=512, seed=0, mesh_dim="1,-1,1,1", output_file="associative_recall.json",
    first_gap=-1, first_gap_steps=0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lwm.associative_recall import MIN_VOCAB, RecallTask

    try:
        low, high = (int(p) for p in FLAGS.pairs.split(","))
    except ValueError:
        raise app.UsageError(f"--pairs={FLAGS.pairs!r}: expected MIN,MAX (e.g. 4,4)") from None
    # a task that cannot be built fails here, before any compile
    task = RecallTask((low, high), FLAGS.value_tokens, FLAGS.gap, FLAGS.seq_length, FLAGS.queries, FLAGS.max_gap)
    if FLAGS.steps < 1 or FLAGS.eval_every < 1 or FLAGS.batch_size < 1 or FLAGS.eval_rows < 1:
        raise app.UsageError("--steps, --eval_every, --batch_size and --eval_rows must be >= 1")
    if (FLAGS.first_gap >= 0) != (FLAGS.first_gap_steps > 0) or FLAGS.first_gap_steps >= FLAGS.steps:
        raise app.UsageError(f"--first_gap={FLAGS.first_gap} --first_gap_steps={FLAGS.first_gap_steps} --steps="
                             f"{FLAGS.steps}: give both (first_gap >= 0, 0 < first_gap_steps < steps) or neither")
    try:
        first_task = dataclasses.replace(task, gap=FLAGS.first_gap, max_gap=-1) if FLAGS.first_gap >= 0 else None
    except ValueError as e:
        raise app.UsageError(f"--first_gap={FLAGS.first_gap}: {e}") from None
    if not 0 <= FLAGS.warmup_steps < FLAGS.steps:
        raise app.UsageError(f"--warmup_steps={FLAGS.warmup_steps} --steps={FLAGS.steps}: expected "
                             "0 <= warmup_steps < steps")
    from lwm.cli import check_output_file
    from lwm.config import build_config_with_sources

    check_output_file("--output_file", FLAGS.output_file)
    chunks = dict(max_sequence_length=task.seq_length, scan_query_chunk_size=task.seq_length,
                  scan_key_chunk_size=task.seq_length, scan_mlp_chunk_size=task.seq_length,
                  scan_loss_chunk_size=task.seq_length)
    config, _ = build_config_with_sources(FLAGS.load_llama_config, {}, FLAGS.update_llama_config, explicit=())
    config = config.replace(**chunks)  # one chunk per row: rows are short
    if config.vocab_size < MIN_VOCAB:
        raise app.UsageError(f"vocab_size={config.vocab_size}: the rows use token ids up to {MIN_VOCAB - 1}")
    from lwm import storage
    from lwm.reproduce import git_commit

    commit = git_commit()  # the code that runs: read before a run that can outlast later commits
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count()}

    def write(result: dict, complete: bool):
        # rewritten at every eval point: a run stopped early keeps its curve so far
        result.update(complete=complete, commit=commit, machine=machine)
        storage.write_text(FLAGS.output_file, json.dumps(result, indent=1))

    train(config, task, first_task, write)


def train(config, task, first_task, write) -> None:
    import jax
    import numpy as np

    from lwm.associative_recall import recall_batch, score
    from lwm.mesh import batch_to_global, build_mesh
    from lwm.trainer import Trainer

    mesh = build_mesh(FLAGS.mesh_dim)
    opt = {"adamw_optimizer": {"lr": FLAGS.lr, "init_lr": 0.0, "lr_warmup_steps": FLAGS.warmup_steps,
                               "lr_decay_steps": FLAGS.steps, "end_lr": FLAGS.lr / 10, "weight_decay": 0.0}}
    trainer = Trainer(config, mesh, opt, seed=FLAGS.seed)
    state = trainer.init_state()
    logits = jax.jit(lambda params, tokens: trainer.model.apply({"params": params}, tokens).logits)
    rng = np.random.default_rng(FLAGS.seed)
    held_out = recall_batch(np.random.default_rng(FLAGS.seed + 10_000), task, FLAGS.eval_rows)
    held_out_first = (recall_batch(np.random.default_rng(FLAGS.seed + 20_000), first_task, FLAGS.eval_rows)
                      if first_task else None)

    def predict(recall):
        return np.concatenate([np.asarray(logits(state.params, recall.batch["input_tokens"][i:i + 128])).argmax(-1)
                               for i in range(0, FLAGS.eval_rows, 128)])

    curve, start = [], time.time()
    print(f"{'step':>6} {'loss':>7} {'first value':>12} {'answer':>7} {'elimination':>12} {'in context':>11}"
          + (f" {'first value at first gap':>25}" if first_task else ""))
    for step in range(1, FLAGS.steps + 1):
        rows = first_task if first_task and step <= FLAGS.first_gap_steps else task
        state, metrics = trainer.train_step(state, batch_to_global(recall_batch(rng, rows, FLAGS.batch_size).batch,
                                                                   mesh))
        if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
            predictions = predict(held_out)
            point = dict(step=step, loss=float(metrics["loss"]), wall_s=round(time.time() - start, 1),
                         **score(predictions, held_out))
            if first_task:
                point["at_first_gap"] = score(predict(held_out_first), held_out_first)
            if task.gaps[0] < task.gaps[1]:
                point["by_gap"] = {str(g): score(predictions, held_out, rows=held_out.gaps == g)
                                   for g in range(task.gaps[0], task.gaps[1] + 1)}
            curve.append(point)
            print(f"{step:>6} {point['loss']:>7.3f} {point['first_value_acc']:>12.3f} {point['answer_acc']:>7.3f} "
                  f"{point['elimination']:>12.3f} {point['in_context']:>11.3f}"
                  + (f" {point['at_first_gap']['first_value_acc']:>25.3f}" if first_task else "")
                  + "".join(f"  gap {g}: {v['first_value_acc']:.3f}" for g, v in point.get("by_gap", {}).items()),
                  flush=True)
            write(summary(config, task, curve, time.time() - start), complete=step == FLAGS.steps)


def summary(config, task, curve: list, wall_s: float) -> dict:
    return dict(task=dict(pairs=list(task.pairs), value_tokens=task.value_tokens, gap=task.gap, max_gap=task.max_gap,
                          seq_length=task.seq_length, queries=task.queries),
                train=dict(steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=FLAGS.lr, end_lr=FLAGS.lr / 10,
                           warmup_steps=FLAGS.warmup_steps, seed=FLAGS.seed, eval_rows=FLAGS.eval_rows,
                           mesh_dim=FLAGS.mesh_dim, first_gap=FLAGS.first_gap, first_gap_steps=FLAGS.first_gap_steps),
                model=config.to_dict(), curve=curve, wall_s=round(wall_s, 1))


if __name__ == "__main__":
    cli.run(main)
