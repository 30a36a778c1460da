"""Reproduce LWM's progressive context extension at tiny scale: data, tokenizer, stages, evals.

    python -m lwm.reproduce                         # the main study: 1K -> 4K -> 16K (make reproduce)
    python -m lwm.reproduce --ablations             # and the ablations at 4x
    python -m lwm.reproduce --ablations=no_staging  # and only the ones named
    python -m lwm.reproduce --seeds 3               # each of them three times (other data and init seeds)
    python -m lwm.reproduce --smoke --out /tmp/r    # a few steps per stage, a tiny grid (tests)

Every stage is a `python -m lwm.train` run and every eval a `scripts/eval_needle.py` or
`scripts/eval_needle_multi.py` run, with the flags a TPU user would pass; this module only
prepares their inputs and reads their outputs. Each stage is described by a JSON file in
configs/reproduce/ (length, theta, steps, batch, mesh, learning rate, which stage it starts
from, and the evals that follow it). Rerunning after a kill continues where it stopped: the
data and tokenizer are kept, a finished stage is skipped, a stage in progress autoresumes
from its last save, and an eval resumes its results file.

Outputs go under --out (default outputs/reproduce, git-ignored): data/, tokenizer/, runs/,
evals/, the summary reproduction.json and the heatmaps in assets/. With --seeds N, seed k > 0
trains and evaluates in seed<k>/ (its own data/, runs/, evals/; the corpus and tokenizer are
shared), and the summary gives every accuracy as the mean over seeds, the per-seed values and
an interval over seeds and cases. `--publish` then copies the
summary, the heatmaps and every eval's per-case results into docs/ (docs/reproduction.json,
docs/assets/reproduction/, docs/reproduction_results/): tracked files change only when asked.
An eval's results record the checkpoint they scored (its content hash): when a stage has been
retrained since, its old results are set aside and the eval runs again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from lwm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "reproduce")
MAIN_STAGES = ("stage1", "stage2", "stage3")
ABLATION_STAGES = ("ablation_extension_without_theta", "ablation_no_staging", "ablation_long_from_start")
# (a) is stage 1's weights evaluated at 4x (an eval of stage 1); the others train their own stage.
ABLATIONS = ("no_extension",) + tuple(name.removeprefix("ablation_") for name in ABLATION_STAGES)
ACCURACY_KEYS = ("single_needle_up_to_first_stage", "multi_needle_4_2_at_first_stage",
                 "single_needle_up_to_4x_after_extension", "single_needle_up_to_first_stage_after_extension",
                 "multi_needle_4_2_at_4x_after_extension", "single_needle_up_to_16x_after_stage3",
                 "single_needle_up_to_4x_after_stage3", "multi_needle_4_2_at_4x", "multi_needle_4_2_at_16x",
                 "ablation_no_extension_at_4x", "ablation_extension_without_theta_at_4x", "ablation_no_staging_at_4x",
                 "ablation_long_from_start_at_4x")
EVAL_EVERY = 6  # every 6th essay (by name) is held out: eval haystacks only
PROMPT_BUFFER = 56  # the eval prompt (41 tokens with the study's tokenizer), answer and margin


def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_stage(name: str, smoke: bool) -> dict:
    with open(os.path.join(CONFIGS, f"tiny_{name}.json")) as f:
        stage = json.load(f)
    if stage.get("init_from") and load_stage(stage["init_from"], smoke).get("model") != stage.get("model"):
        raise ValueError(f"configs/reproduce/tiny_{name}.json: its model ({stage.get('model') or 'tiny_model.json'}) "
                         f"is not {stage['init_from']}'s, whose weights it starts from; give both the same `model`")
    if "steps_for_tokens_of" in stage:  # an ablation with as many tokens as these stages together
        tokens = sum(stage_tokens(load_stage(other, smoke)) for other in stage["steps_for_tokens_of"])
        stage["steps"] = tokens // (stage["batch_size"] * stage["seq_length"])
    if smoke:  # the whole pipeline in minutes: a few steps, one round, two lengths, short contexts
        scale = 4
        length = stage["seq_length"] // scale
        curriculum = [{"length": length // 2, "share": 0.5, "needles": [1, 2]},
                      {"length": length, "share": 0.5, "needles": [1, 2]}]
        if any(p.get("repeat_spans") for p in stage.get("curriculum", [])):  # a warm-up's data goes through too
            curriculum.insert(0, {"length": length // 2, "share": 0.25, "repeat_spans": True})
        stage.update(steps=3, warmup_steps=1, seq_length=length, needles=[1, 2], curriculum=curriculum)
        # one length per eval (its longest), and no eval that only repeats another's kind on the same weights
        stage["evals"] = [e for e in stage["evals"] if e.get("smoke", True)]
        for e in stage["evals"]:
            e.update(min=e["max"] // scale, max=e["max"] // scale, lengths=1, rounds=1)
            if e["kind"] == "multi":
                e["rounds"] = 2
    return stage


def stage_tokens(stage: dict) -> int:
    return stage["steps"] * stage["batch_size"] * stage["seq_length"]


# ---- data and tokenizer ------------------------------------------------------------------------


def prepare_corpus(data_dir: str) -> tuple[str, str]:
    """train.jsonl and eval.jsonl: paragraphs of the built-in essays, split by essay; a paragraph
    that also appears in a held-out essay (a quotation) is left out of training."""
    from lwm.corpus import builtin_corpus_documents, split_paragraphs

    paths = {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("train", "eval")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths["train"], paths["eval"]
    os.makedirs(data_dir, exist_ok=True)
    lines = {"train": [], "eval": []}
    for index, (_, text) in enumerate(builtin_corpus_documents()):
        split = "eval" if index % EVAL_EVERY == EVAL_EVERY - 1 else "train"
        lines[split] += [json.dumps({"text": p}) for p in split_paragraphs(text)]
    held_out = set(lines["eval"])  # a paragraph quoted in both kinds of essay stays held out
    lines["train"] = [line for line in lines["train"] if line not in held_out]
    for split, path in paths.items():
        write_lines(path, lines[split])
    log(f"corpus: {len(lines['train'])} training and {len(lines['eval'])} held-out paragraphs")
    return paths["train"], paths["eval"]


def prepare_tokenizer(train_path: str, out_dir: str, vocab_size: int = 2048) -> str:
    """A SentencePiece model trained on the training split plus the chat/needle template text."""
    import random

    from lwm.needle import CITIES, MULTI_PROMPT, NEEDLE, PROMPT, QUESTION, multi_question
    from lwm.retrieval_data import FOLLOW_UP
    from scripts.train_tokenizer import train_tokenizer

    path = os.path.join(out_dir, "tokenizer.model")
    if os.path.exists(path):
        return path
    rng = random.Random(0)
    corpus = os.path.join(out_dir, "tokenizer_input.jsonl")
    with open(train_path) as f:
        lines = [line.rstrip("\n") for line in f]
    for _ in range(3000):  # the prompts' words become whole pieces (41 tokens instead of 78)
        a, b = rng.sample(CITIES, 2)
        template = rng.choice([PROMPT, MULTI_PROMPT])
        text = template.format(context=NEEDLE.format(city=a, number="0"), question=QUESTION.format(city=a))
        text += FOLLOW_UP.format(question=multi_question([a, b]))
        lines.append(json.dumps({"text": text}))
    write_lines(corpus, lines)
    train_tokenizer(corpus, path, vocab_size)
    log(f"tokenizer: {path} ({vocab_size} pieces)")
    return path


# a curriculum phase's optional data settings (lwm.retrieval_data.curriculum_examples)
PHASE_DATA_KEYS = ("reverse_fraction", "short_needle_fraction", "asked_fraction", "needles_only",
                   "first_digit_fraction", "adjacent_needle_fraction", "repeat_spans")


def data_phases(stage: dict) -> list[dict]:
    """The stage's data, phase by phase: its `curriculum` (shares of the stage's tokens at
    shorter lengths first), or one phase at the stage's length. Each phase gets 10% more
    examples than its share needs, so packing losses never run the loader into a second pass."""
    tokens = stage_tokens(stage)
    phases = stage.get("curriculum") or [{"length": stage["seq_length"], "share": 1.0, "needles": stage["needles"]}]
    for i, p in enumerate(phases):
        if not p.get("repeat_spans") and "needles" not in p:
            raise ValueError(f"{stage['name']}: curriculum phase {i} has no \"needles\" ([low, high] per example); "
                             "give them, or \"repeat_spans\": true for a phase of repeated spans")
    rows = [{"length": p["length"], "needles": p.get("needles"), "used": int(p["share"] * tokens / p["length"]),
             "examples": int(1.1 * p["share"] * tokens / p["length"]) + 1,
             **{k: p[k] for k in PHASE_DATA_KEYS if k in p}} for p in phases]
    # A `spread` phase (a rehearsal of a shorter length) comes back in whole rows (its examples
    # rounded up to them, no surplus) through the examples the stage reads: the other phases'
    # used tokens, the earlier phases' surplus included as the loader reads it.
    remaining, read = sum(r["used"] * r["length"] for p, r in zip(phases, rows) if not p.get("spread")), 0
    for p, r in zip(phases, rows):
        if not p.get("spread") and remaining > 0:
            taken = min(r["examples"], -(-remaining // r["length"]))
            read, remaining = read + taken, remaining - taken * r["length"]
    for p, r in zip(phases, rows):
        if p.get("spread"):
            group = stage["seq_length"] // p["length"]
            r.update(examples=-(-r["used"] // group) * group, spread=group, spread_over=read)
    return rows


def prepare_retrieval_data(stage: dict, train_path: str, tokenizer_path: str, data_dir: str, seed: int = 0,
                           smoke: bool = False) -> str:
    """The stage's JSONL of retrieval examples (written once; `seed` > 0 draws other examples, as
    does a stage config's `data_seed`, which defaults to its length).
    A stage with `data_of` trains on those stages' own examples instead, in their order: each
    phase's share of them (its surplus left out), then the last phase's surplus."""
    from lwm.retrieval_data import curriculum_examples, read_texts, write_retrieval_jsonl
    from lwm.tokenizer import load_tokenizer

    if stage.get("data_of"):
        return concatenated_data(stage, train_path, tokenizer_path, data_dir, seed, smoke)
    phases = data_phases(stage)
    n = sum(p["examples"] for p in phases)
    tag = "-".join(f"{p['length']}x{p['examples']}" for p in phases)
    path = os.path.join(data_dir, f"retrieval_{stage['name']}_{tag}.jsonl")
    if os.path.exists(path):
        return path
    examples = curriculum_examples(load_tokenizer(tokenizer_path), read_texts(train_path), phases,
                                   seed=stage.get("data_seed", stage["seq_length"]) + 1_000_000 * seed,
                                   multi_fraction=stage["multi_fraction"],
                                   answer_style=stage.get("answer_style", "number"))
    write_retrieval_jsonl(path, _progress(examples, n, f"retrieval data {stage['name']}"))
    return path


def concatenated_data(stage: dict, train_path: str, tokenizer_path: str, data_dir: str, seed: int,
                      smoke: bool) -> str:
    path = os.path.join(data_dir, f"retrieval_{stage['name']}_{'+'.join(stage['data_of'])}.jsonl")
    if os.path.exists(path):
        return path
    lines, surplus = [], []
    for name in stage["data_of"]:
        source = load_stage(name, smoke)
        if any(p.get("spread") for p in source.get("curriculum", [])):
            raise ValueError(f"{stage['name']}: data_of takes each of {name}'s phases in turn, but {name} spreads a "
                             f"phase through the others; list a stage without `spread` phases")
        with open(prepare_retrieval_data(source, train_path, tokenizer_path, data_dir, seed, smoke)) as f:
            examples = f.readlines()
        start = 0
        for phase in data_phases(source):
            lines += examples[start:start + phase["used"]]
            surplus = examples[start + phase["used"]:start + phase["examples"]]
            start += phase["examples"]
    write_lines(path, (line.rstrip("\n") for line in lines + surplus))
    return path


# ---- stages and evals ----------------------------------------------------------------------------


def model_updates(seq_length: int, theta: float, chunk: int, model: dict | None = None) -> str:
    """--update_llama_config for a stage or eval (chunk sizes are run-time fields: set here, since
    --load_llama_config takes them from --llama.*, whose defaults are 1024); `model`: a stage's
    changes to tiny_model.json (its config's `model`, e.g. more heads)."""
    changes = "".join(f",{key}={value!r}" for key, value in sorted((model or {}).items()))
    return (f"dict(max_sequence_length={seq_length},theta={theta},scan_query_chunk_size={chunk},"
            f"scan_key_chunk_size={chunk},scan_mlp_chunk_size={max(chunk, 256)},scan_loss_chunk_size={chunk}{changes})")


def run_folder(out: str, name: str) -> str:
    return os.path.join(out, "runs", name)


def stage_done(out: str, stage: dict) -> bool:
    from lwm.checkpoint import load_pickle

    meta = os.path.join(run_folder(out, stage["name"]), "metadata.pkl")
    return os.path.exists(meta) and load_pickle(meta).get("step") == stage["steps"]


def stage_settings(stage: dict, seed: int) -> dict:
    """What a stage's weights depend on: its config but for the wording and the evals, and the seed."""
    return {"seed": seed, **{k: v for k, v in stage.items() if k not in ("description", "evals")}}


def check_stage_settings(out: str, stage: dict, seed: int) -> None:
    """Stops with one line when the stage's run folder in `out` was started with other settings
    than its config holds now: resuming (or calling it done) would pass the old weights off as new.
    Folders from before settings were recorded are checked on their step count only (stage_done)."""
    record = os.path.join(run_folder(out, stage["name"]), "settings.json")
    if not os.path.exists(record):
        return
    with open(record) as f:
        started = json.load(f)
    now = json.loads(json.dumps(stage_settings(stage, seed)))  # as JSON gives it back: lists, not tuples
    stop_if_settings_changed(started, now, set(started) | set(now), f"reproduce: {os.path.dirname(record)} was started",
                             f"configs/reproduce/tiny_{stage['name']}.json")


def stop_if_settings_changed(recorded: dict, now: dict, keys, run: str, config: str) -> None:
    """Stops with one line naming each of `keys` whose value differs between a run folder's record
    and its config now (`run`: the folder and what the record is of, e.g. "... was started")."""
    changed = sorted(k for k in keys if recorded.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise SystemExit(f"{run} with other settings than {config} holds now ({diff}); move or delete that folder to "
                         "train it again")


def train_stage(stage: dict, data_path: str, tokenizer: str, out: str, seed: int = 0) -> float:
    """Run (or finish) one stage through `python -m lwm.train`; returns its wall seconds. (Its
    settings are checked against the folder's record up front, in reproduce().)"""
    if stage_done(out, stage):
        log(f"{stage['name']}: done already")
        return recorded_wall(out, stage["name"])
    settings = os.path.join(run_folder(out, stage["name"]), "settings.json")
    if not os.path.exists(settings):  # a resumed run keeps the record of its start (checked above)
        write_lines(settings, [json.dumps(stage_settings(stage, seed), indent=2)])
    chunk = min(256, stage["seq_length"] // 4)
    args = [
        "-m", "lwm.train", "--modality=text", f"--mesh_dim={stage['mesh_dim']}", "--dtype=fp32",
        f"--total_steps={stage['steps']}", "--log_freq=10", f"--save_model_freq={max(1, stage['steps'] // 5)}",
        f"--load_llama_config=json::{os.path.join(CONFIGS, 'tiny_model.json')}",
        f"--update_llama_config={model_updates(stage['seq_length'], stage['theta'], chunk, stage.get('model'))}",
        f"--tokenizer={tokenizer}", "--train_dataset.type=json",
        "--train_dataset.text_processor.fields_from_example=fields",
        f"--train_dataset.json_dataset.path={data_path}", "--train_dataset.json_dataset.packed=True",
        f"--train_dataset.json_dataset.seq_length={stage['seq_length']}",
        f"--train_dataset.json_dataset.batch_size={stage['batch_size']}",
        "--train_dataset.json_dataset.tokenizer_processes=1",
        f"--optimizer.adamw_optimizer.lr={stage['lr']}", f"--optimizer.adamw_optimizer.end_lr={stage['end_lr']}",
        "--optimizer.adamw_optimizer.init_lr=0.0", f"--optimizer.adamw_optimizer.lr_warmup_steps={stage['warmup_steps']}",
        f"--optimizer.adamw_optimizer.lr_decay_steps={stage['steps']}",
        "--optimizer.adamw_optimizer.weight_decay=0.0", "--checkpointer.float_dtype=fp32",
        f"--logger.output_dir={os.path.join(out, 'runs')}", f"--logger.experiment_id={stage['name']}",
        "--logger.append_uuid=False", "--autoresume=True"]
    if stage.get("packed_loss_weighting"):
        args.append(f"--train_dataset.json_dataset.packed_loss_weighting={stage['packed_loss_weighting']}")
    if seed:  # seed 0 keeps lwm.train's default, so its commands are those of the single-seed study
        args.append(f"--seed={42 + 1000 * seed}")
    if stage["init_from"]:
        args.append(f"--load_checkpoint=params::{os.path.join(run_folder(out, stage['init_from']), 'streaming_params')}")
    log(f"{stage['name']}: training {stage['steps']} steps of {stage['batch_size']} x {stage['seq_length']} tokens, "
        f"theta {stage['theta']:g}, mesh {stage['mesh_dim']}" + (f", from {stage['init_from']}" if stage["init_from"]
                                                                else ", from random weights"))
    return add_wall(out, stage["name"], run_python(args))


def run_eval(stage: dict, spec: dict, tokenizer: str, out: str, haystack: str) -> tuple[str, float]:
    """One needle eval of a stage's checkpoint over the held-out `haystack`; returns (results file,
    wall seconds)."""
    multi = spec["kind"] == "multi"
    length = max(spec["max"], stage["seq_length"]) + 64  # the model's positions for the longest prompt
    output = os.path.join(out, "evals", f"{spec['key']}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    script = os.path.join(ROOT, "scripts", "eval_needle_multi.py" if multi else "eval_needle.py")
    args = [script, f"--haystack_file={haystack}", f"--output_file={output}",
            f"--context_lengths_min={spec['min']}", f"--context_lengths_max={spec['max']}",
            f"--n_context_length_intervals={spec['lengths']}", f"--n_document_depth_intervals={spec['depths']}",
            f"--n_rounds={spec['rounds']}", f"--prompt_buffer_tokens={PROMPT_BUFFER}",
            f"--max_new_tokens={spec.get('max_new_tokens', 24)}",  # longer answers (sentences) need more
            "--max_tokens_per_batch=65536", "--mesh_dim=1,8,1,1", "--dtype=fp32",
            f"--load_llama_config=json::{os.path.join(CONFIGS, 'tiny_model.json')}",
            f"--update_llama_config={model_updates(length, stage['theta'], 64, stage.get('model'))}",
            f"--load_checkpoint=params::{os.path.join(run_folder(out, stage['name']), 'streaming_params')}",
            f"--tokenizer={tokenizer}"]
    if multi:
        args += [f"--n_needles_total={spec['needles_total']}", f"--n_needles_retrieve={spec['needles_retrieve']}"]
    cases = spec["lengths"] * spec["rounds"] * (1 if multi else spec["depths"])
    if os.path.exists(output) and set_aside_if_stale(output, os.path.join(run_folder(out, stage["name"]),
                                                                          "streaming_params")) >= cases:
        log(f"{stage['name']}: eval {spec['key']} done already")
        return output, recorded_wall(out, f"eval:{spec['key']}")
    log(f"{stage['name']}: eval {spec['key']} ({spec['kind']}, lengths {spec['min']}..{spec['max']})")
    return output, add_wall(out, f"eval:{spec['key']}", run_python(args))


def set_aside_if_stale(results_file: str, checkpoint: str) -> int:
    """How many results of `results_file` score `checkpoint` as it is now. Results of other
    weights (the stage was retrained since) move to <file>.stale-<their hash>.json, so the eval
    runs again on the new weights; results that record no checkpoint are counted as stale too."""
    from lwm.needle import load_results
    from lwm.storage import content_sha256

    results = load_results(results_file)
    current = content_sha256(checkpoint)
    scored = {r.get("checkpoint", {}).get("sha256") for r in results}
    if results and scored != {current}:
        tag = next((h for h in sorted(scored, key=str) if h), "unknown")[:12]
        stale = f"{os.path.splitext(results_file)[0]}.stale-{tag}.json"
        os.replace(results_file, stale)
        log(f"{project_path(results_file)}: scored other weights than {project_path(checkpoint)} now holds; moved "
            f"to {os.path.basename(stale)}, the eval runs again")
        return 0
    return len(results)


def case_scores(results: list[dict]) -> list[float]:
    """Each case's strict score (the fraction of its asked needles found, for the multi-needle eval)."""
    from lwm.needle import needle_accuracy

    return [needle_accuracy(r, "strict") for r in results]


def eval_entry(results_file: str, kind: str) -> dict:
    """An eval's summary: mean strict accuracy over its cases, the 95% bootstrap interval over
    them, and for the multi-needle eval what came back instead of a missed needle."""
    from lwm.needle import load_results, multi_needle_errors
    from lwm.stats import bootstrap_interval

    results = load_results(results_file)
    scores = case_scores(results)
    entry = {"accuracy": float(sum(scores) / max(len(scores), 1)), "ci95": bootstrap_interval(scores)}
    if kind == "multi":
        entry["errors"] = multi_needle_errors(results)
    return entry


# ---- the study -----------------------------------------------------------------------------------


def seed_folder(out: str, seed: int) -> str:
    return out if seed == 0 else os.path.join(out, f"seed{seed}")


def reproduce(out: str, results_path: str, assets: str, ablations: tuple[str, ...], smoke: bool, seeds: int = 1,
              extra: tuple[str, ...] = (), ablation_seeds: int | None = None, only: tuple[str, ...] = (),
              first_seed: int = 0) -> dict:
    """The study once per seed, the named `ablations` (of ABLATIONS) and any `extra` stage configs
    for the first `ablation_seeds` of them (default: every seed); writes and returns the summary.
    With `only`, just those stage configs (and their evals) per seed, each starting from a stage
    named before it or trained in the seed's folder already, for seeds `first_seed`..`seeds`-1."""
    start = time.time()
    ablation_seeds = seeds if ablation_seeds is None else ablation_seeds
    if seeds < 1:
        raise SystemExit(f"reproduce: --seeds must be at least 1, got {seeds}")
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"reproduce: no ablation named {', '.join(unknown)}; expected some of {', '.join(ABLATIONS)}")
    if not 1 <= ablation_seeds <= seeds:
        raise SystemExit(f"reproduce: --ablation_seeds must be between 1 and --seeds={seeds}, got {ablation_seeds}")
    if not 0 <= first_seed < seeds or (first_seed and not only):
        raise SystemExit(f"reproduce: --first_seed must be below --seeds={seeds} and goes with --only (the study "
                         f"and its summary need every seed from 0), got {first_seed}")
    if only:
        check_only(out, only, range(first_seed, seeds), smoke)
        # with --only, --ablations runs only what the named stages train or evaluate
        for name in ablations:
            home = ablation_stage(name, smoke)
            if home not in only:
                raise SystemExit(f"reproduce: --ablations {name}: no stage in --only trains or evaluates it; "
                                 f"name {home} there")
    for seed in range(first_seed, seeds):  # no stage resumes, or counts as done, with changed settings
        variants = seed < ablation_seeds
        for name in seed_stage_names(ablations if variants else (), extra if variants else (), only):
            check_stage_settings(seed_folder(out, seed), load_stage(name, smoke), seed)
    train_path, eval_path = prepare_corpus(os.path.join(out, "data"))
    tokenizer = prepare_tokenizer(train_path, os.path.join(out, "tokenizer"))
    runs = []
    for seed in range(first_seed, seeds):
        if seeds > 1:
            log(f"seed {seed} of {seeds}: {project_path(seed_folder(out, seed))}")
        variants = seed < ablation_seeds
        runs.append(study_one_seed(seed_folder(out, seed), seed, train_path, eval_path, tokenizer,
                                   ablations if variants else (), smoke, assets if seed == 0 else "",
                                   extra if variants else (), only))
    summary = combine_seeds(runs) if len(runs) > 1 else runs[0]
    # The study's compute: every stage and eval of every seed, over all their attempts (a rerun
    # that finds them done takes seconds, which is not what they cost).
    records = [r for run in runs for r in all_stages(run)]
    recorded = sum(r["wall_s"] + r["evals_wall_s"] + r.get("ablation_evals_wall_s", 0.0) for r in records)
    summary.update(ablations_run=list(ablations), smoke=smoke, seeds=seeds, first_seed=first_seed,
                   ablation_seeds=ablation_seeds,
                   total_wall_s=round(recorded, 1), this_run_wall_s=round(time.time() - start, 1),
                   commit=git_commit(), machine={"platform": platform.platform(),
                                                 "processor": platform.processor() or platform.machine(),
                                                 "cpu_count": os.cpu_count()})
    if results_path:
        os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
        write_lines(results_path, [json.dumps(summary, indent=2)])
    print(summary_table(summary), flush=True)
    return summary


def study_one_seed(out: str, seed: int, train_path: str, eval_path: str, tokenizer: str, ablations: tuple[str, ...],
                   smoke: bool, assets: str, extra: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> dict:
    """Every stage of one seed (or the `only` ones), each followed by its evals; the seed's summary
    (without the run's commit and machine, which reproduce() adds)."""
    data_dir = os.path.join(out, "data")
    summary = {"first_stage_length": None, "seed": seed, "stages": [], "evals": {}}
    main_wall = 0.0
    asked = tuple(f"ablation_{name}" for name in ablations)
    for name in seed_stage_names(ablations, extra, only):
        stage = load_stage(name, smoke)
        data_path = prepare_retrieval_data(stage, train_path, tokenizer, data_dir, seed, smoke)
        wall = train_stage(stage, data_path, tokenizer, out, seed)
        record = {"name": name, "length": stage["seq_length"], "theta": stage["theta"], "steps": stage["steps"],
                  "tokens": stage_tokens(stage), "wall_s": round(wall, 1), "init_from": stage["init_from"] or None,
                  "mesh_dim": stage["mesh_dim"],
                  "checkpoint": project_path(os.path.join(run_folder(out, name), "streaming_params")),
                  "evals_wall_s": 0.0}
        for spec in stage["evals"]:
            if spec["key"].startswith("ablation") and name in MAIN_STAGES and \
                    not spec["key"].startswith(tuple(f"{a}_" for a in asked)):
                continue  # an ablation that evaluates a main stage, not asked for
            results_file, eval_wall = run_eval(stage, spec, tokenizer, out, eval_path)
            # An ablation's eval of a main stage is the ablation's time, not the main study's.
            wall_key = "ablation_evals_wall_s" if spec["key"].startswith("ablation") and name in MAIN_STAGES \
                else "evals_wall_s"
            record[wall_key] = round(record.get(wall_key, 0.0) + eval_wall, 1)
            summary["evals"][spec["key"]] = {**eval_entry(results_file, spec["kind"]), "stage": name,
                                             "results": project_path(results_file), "lengths": [spec["min"], spec["max"]]}
            heatmap = os.path.splitext(results_file)[0] + ".png"
            if os.path.exists(heatmap) and assets:
                os.makedirs(assets, exist_ok=True)
                shutil.copy(heatmap, os.path.join(assets, os.path.basename(heatmap)))
        if name in MAIN_STAGES:
            summary["stages"].append(record)
            main_wall += wall + record["evals_wall_s"]
        else:
            summary.setdefault("ablation_stages" if name in ABLATION_STAGES else "extra_stages", []).append(record)
    summary["first_stage_length"] = summary["stages"][0]["length"] if summary["stages"] else None
    for key in ACCURACY_KEYS:
        summary[key] = summary["evals"].get(key, {}).get("accuracy")
        summary[f"{key}_ci95"] = summary["evals"].get(key, {}).get("ci95")
    summary["main_study_wall_s"] = round(main_wall, 1)
    return summary


def ablation_stage(name: str, smoke: bool) -> str:
    """The stage an ablation (of ABLATIONS) needs: its own, or the main stage whose eval it is."""
    if f"ablation_{name}" in ABLATION_STAGES:
        return f"ablation_{name}"
    return next(stage for stage in MAIN_STAGES
                if any(e["key"].startswith(f"ablation_{name}_") for e in load_stage(stage, smoke)["evals"]))


def seed_stage_names(ablations: tuple[str, ...], extra: tuple[str, ...], only: tuple[str, ...]) -> tuple[str, ...]:
    """The stages one seed trains, in order: the `only` ones, or the study's, the asked ablations' and the extras."""
    asked = tuple(f"ablation_{name}" for name in ablations)
    return only or MAIN_STAGES + tuple(stage for stage in ABLATION_STAGES if stage in asked) + tuple(extra)


def check_only(out: str, only: tuple[str, ...], seeds: range, smoke: bool) -> None:
    """Before any work: every `--only` stage exists and starts from random weights, from a stage
    named before it, or from one trained (to its last step) in the folder of every seed it runs for."""
    for i, name in enumerate(only):
        if not os.path.exists(os.path.join(CONFIGS, f"tiny_{name}.json")):
            raise SystemExit(f"reproduce: --only {name}: no configs/reproduce/tiny_{name}.json")
        start = load_stage(name, smoke)["init_from"]
        if start and start not in only[:i]:
            missing = [seed for seed in seeds if not stage_done(seed_folder(out, seed), load_stage(start, smoke))]
            if missing:
                raise SystemExit(f"reproduce: --only {name} starts from {start}, which is not trained in "
                                 f"{seed_folder(out, missing[0])}; name {start} before it, or run the study first")


def all_stages(summary: dict) -> list[dict]:
    """A (seed's) summary's stage records: the main stages, then the ablations' and the extras'."""
    return summary["stages"] + summary.get("ablation_stages", []) + summary.get("extra_stages", [])


def combine_seeds(runs: list[dict]) -> dict:
    """One summary of several seeds' summaries: seed 0's stages, heatmaps and per-case results
    stand for the study; every accuracy becomes the mean over seeds, with `<key>_seeds` (one
    value per seed) and `<key>_ci95` over seeds and cases (lwm.stats.seeds_bootstrap_interval);
    `main_study_wall_s` stays one seed's (seed 0's)."""
    from lwm.needle import load_results
    from lwm.stats import seeds_bootstrap_interval

    summary = json.loads(json.dumps(runs[0]))
    summary.pop("seed")
    summary["seed_stages"] = [all_stages(run) for run in runs]
    for key, entry in summary["evals"].items():
        per_seed = [run["evals"][key] for run in runs if key in run["evals"]]
        values = [e["accuracy"] for e in per_seed]
        entry.update(accuracy=sum(values) / len(values), seeds=values, results_seeds=[e["results"] for e in per_seed],
                     ci95=seeds_bootstrap_interval([case_scores(load_results(os.path.join(ROOT, e["results"])))
                                                    for e in per_seed]))
    for key in ACCURACY_KEYS:
        entry = summary["evals"].get(key, {})
        summary[key], summary[f"{key}_ci95"] = entry.get("accuracy"), entry.get("ci95")
        summary[f"{key}_seeds"] = entry.get("seeds")
    return summary


def summary_table(summary: dict) -> str:
    stages = all_stages(summary)
    width = max(16, *(len(s["name"]) for s in stages))
    rows = [f"{'stage':{width}} length   theta      steps   tokens      wall s  evals s",
            *(f"{s['name']:{width}} {s['length']:6d}   {s['theta']:<9g}  {s['steps']:5d}   {s['tokens']:<10d}  "
              f"{s['wall_s']:7.0f}  {s['evals_wall_s'] + s.get('ablation_evals_wall_s', 0.0):7.0f}" for s in stages),
            "", "eval (strict score)                                  accuracy  95% interval" +
            ("  per seed" if summary.get("seeds", 1) > 1 else "")]
    for key, e in summary["evals"].items():
        interval = e.get("ci95")
        rows.append(f"{key:52} {e['accuracy']:.3f}" + (f"     {interval[0]:.3f}-{interval[1]:.3f}" if interval else "")
                    + ("  " + " ".join(f"{v:.3f}" for v in e["seeds"]) if "seeds" in e else ""))
    rows.append(f"\nmain study wall time (one seed): {summary['main_study_wall_s']:.0f} s; every stage and eval "
                f"of every seed: {summary['total_wall_s']:.0f} s")
    return "\n".join(rows)


# ---- helpers -------------------------------------------------------------------------------------


def run_python(args: list[str], devices: int | None = None) -> float:
    """Seconds of `python ARGS` run from the project (8 virtual CPU devices unless XLA_FLAGS sets a
    count, or exactly `devices`); a failure stops the study with one line saying how to resume."""
    start = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("WANDB_MODE", "offline")
    from lwm.mesh import cpu_xla_flags

    if devices is not None:
        env["XLA_FLAGS"] = cpu_xla_flags(devices)
    elif "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = cpu_xla_flags(8)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"reproduce: {' '.join(args[:2])} failed (exit {proc.returncode}); rerun the same command "
                         "to continue from where it stopped")
    return time.time() - start


def _wall_file(out: str) -> str:
    return os.path.join(out, "runs", "wall_seconds.json")


def recorded_walls(out: str) -> dict[str, float]:
    """{step: seconds over all its attempts} of a study folder."""
    path = _wall_file(out)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def recorded_wall(out: str, name: str) -> float:
    return float(recorded_walls(out).get(name, 0.0))


def add_wall(out: str, name: str, seconds: float) -> float:
    """Add a run's seconds to what earlier (killed) attempts of the same step took; the total."""
    walls = recorded_walls(out)
    walls[name] = walls.get(name, 0.0) + seconds
    write_lines(_wall_file(out), [json.dumps(walls)])
    return walls[name]


def git_commit() -> str | None:
    """The project's commit (with '+changes' when the work tree differs from it), for provenance."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def project_path(path: str) -> str:
    """A path as the published summary holds it: relative to the project, not to this machine."""
    return os.path.relpath(os.path.abspath(path), ROOT)


def project_relative(path: str) -> str | None:
    """An absolute path inside the project, relative to it; also one written by another checkout
    whose `outputs` is the same folder (a link to this one's, or this one's a link to it): the
    path below `outputs/` names the same file. None for a path outside the project."""
    real = os.path.realpath(path)
    for base in (ROOT, os.path.join(ROOT, "outputs")):
        below = os.path.relpath(real, os.path.realpath(base))
        if not below.startswith(".."):
            return os.path.normpath(os.path.join(os.path.relpath(base, ROOT), below))
    return None


def write_lines(path: str, lines) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


PUBLISHED = dict(results=os.path.join(ROOT, "docs", "reproduction.json"),
                 assets=os.path.join(ROOT, "docs", "assets", "reproduction"),
                 cases=os.path.join(ROOT, "docs", "reproduction_results"))


def publish(summary: dict, results: str = PUBLISHED["results"], assets: str = PUBLISHED["assets"],
            cases: str = PUBLISHED["cases"]) -> dict:
    """The study as the docs hold it: the summary, the heatmaps and every eval's per-case results
    file (the responses scored), copied from the run's outputs; the summary's `results` paths
    then name the copies. Returns the published summary."""
    published = json.loads(json.dumps(summary))
    os.makedirs(cases, exist_ok=True)
    os.makedirs(assets, exist_ok=True)
    for key, entry in published["evals"].items():
        source = os.path.join(ROOT, entry["results"])
        target = os.path.join(cases, f"{key}.json")
        publish_results(source, target)
        entry["results"] = project_path(target)
        heatmap = os.path.splitext(source)[0] + ".png"
        if os.path.exists(heatmap):
            shutil.copy(heatmap, os.path.join(assets, f"{key}.png"))
        for seed, path in enumerate(entry.get("results_seeds", [])):
            target = os.path.join(cases, f"{key}.json" if seed == 0 else f"{key}.seed{seed}.json")
            if seed:
                publish_results(os.path.join(ROOT, path), target)
            entry["results_seeds"][seed] = project_path(target)
    write_lines(results, [json.dumps(published, indent=2)])
    log(f"published {project_path(results)}, {project_path(assets)}/ and {project_path(cases)}/")
    return published


def publish_results(source: str, target: str) -> None:
    """Copy a per-case results file, naming each scored checkpoint by its path in the project
    (its sha256, step and run unchanged) rather than by this machine's absolute path."""
    from lwm.needle import load_results, save_results

    results = load_results(source)
    for r in results:
        scored = r.get("checkpoint", {})
        path = scored.get("load_checkpoint", "").partition("::")[2]
        inside = project_relative(path) if os.path.isabs(path) else None
        if inside is not None:
            scored["load_checkpoint"] = scored["load_checkpoint"].replace(path, inside)
    save_results(target, results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "reproduce"),
                        help="working folder (data, tokenizer, runs, evals); a rerun resumes there")
    parser.add_argument("--results", default="", help="the summary JSON (default <out>/reproduction.json)")
    parser.add_argument("--assets", default="", help="the heatmaps' folder (default <out>/assets)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the summary, heatmaps and per-case results into docs/ (tracked files: only "
                             "when asked)")
    parser.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="",
                        help=f"also run the ablations at 4x: all of them, or those named (comma-separated, of "
                             f"{', '.join(ABLATIONS)}); with --only, the ablation evals of the stages it names "
                             "(no_extension: stage1's)")
    parser.add_argument("--extra", default="", help="comma-separated names of more stage configs to run after the "
                        "study (configs/reproduce/tiny_<name>.json: a variant of a stage, with its own evals)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run the study (and ablations) this many times, with other data and init seeds")
    parser.add_argument("--ablation_seeds", type=int, default=None,
                        help="run the ablations and --extra stages for the first this many seeds only (default: all "
                             "of --seeds); their accuracies then average over fewer seeds, as `<key>_seeds` shows")
    parser.add_argument("--only", default="", help="comma-separated stage configs to run (with their evals) "
                        "instead of the study, each from random weights, from one named before it, or from one "
                        "trained in --out already; the summary goes to <out>/only_<names>.json")
    parser.add_argument("--first_seed", type=int, default=0,
                        help="with --only: run the named stages for seeds first_seed..seeds-1 only (e.g. --seeds 3 "
                             "--first_seed 2: seed 2 alone, in <out>/seed2)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage and a tiny grid")
    args = parser.parse_args(argv)
    only = tuple(name for name in args.only.split(",") if name)
    if only and (args.publish or args.extra):
        parser.error("--only runs the named stages alone: it takes no --publish or --extra")
    from_seed = f".from_seed{args.first_seed}" if args.first_seed else ""
    default_results = f"only_{'+'.join(only)}{from_seed}.json" if only else "reproduction.json"
    summary = reproduce(args.out, args.results or os.path.join(args.out, default_results),
                        args.assets or os.path.join(args.out, "assets"),
                        tuple(name for name in args.ablations.split(",") if name), args.smoke, args.seeds,
                        tuple(name for name in args.extra.split(",") if name), args.ablation_seeds, only,
                        args.first_seed)
    if args.publish:
        publish(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
