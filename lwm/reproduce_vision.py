"""Evidence that the vision half learns: a tiny video-language world trained and evaluated on a CPU.

    python -m lwm.reproduce_vision                       # the study and its ablation (make reproduce-vision), ~77 min
    python -m lwm.reproduce_vision --publish             # and docs/reproduction_vision.json + pictures
    python -m lwm.reproduce_vision --smoke --out /tmp/v  # every step in minutes (tests)

Steps, each resumable (a finished step is skipped; a stage in progress autoresumes):
  world      scripts/make_synthetic_vision.py: shapes, motion clips, needle videos, with answers
  tokenizer  scripts/train_tokenizer.py on the world's text (prompts, answers, captions)
  vqgan      lwm.tiny_vqgan: the project's VQGAN at 32 x 32 -> 4 x 4 codes, fitted to the frames
  tokens     scripts/tokenize_vision.py: the lists -> json_vision lines
  stages     python -m lwm.train --modality=vision,text on them (configs/reproduce_vision/)
  evals      python -m lwm.vision_chat and python -m lwm.vision_generation on held-out examples
  ablation   stage 1 again with naive packing (configs/reproduce_vision/stage1_unmasked.json), its questions,
             then stage 2 from it (stage2_after_unmasked.json) and every eval
  --extra    variants named on the command line (a config with `ablation_of` and `start_from`), each
             trained after the study and given every eval

Outputs go under --out (default outputs/reproduce_vision, git-ignored); the summary is
<out>/reproduction_vision.json, printed as a table with the study's targets.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

from lwm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "reproduce_vision")


def log(message: str) -> None:
    print(f"[reproduce_vision {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], what: str, devices: int = 8) -> None:
    """A step's `python` command (lwm.reproduce.run_python): training sees 8 virtual CPU devices
    (its mesh), evals one (a batch of one prompt)."""
    from lwm.reproduce import run_python

    log(f"{what}: {' '.join(cmd[:3])} ...")
    run_python(cmd[1:], devices)


# ---- world, tokenizer, VQGAN, tokens ---------------------------------------------------------------


def prepare_world(out: str, smoke: bool) -> str:
    world = os.path.join(out, "world")
    if os.path.exists(os.path.join(world, "heldout.jsonl")):
        return world
    recipe = world_recipe("first")
    if smoke:
        recipe.update(n_images=24, n_motion=8, n_needle=8, needle_eval_frames="8", needle_eval_rounds=1,
                      heldout_images=4, heldout_motion=2)
    make_world(world, recipe, "world")
    return world


def world_recipe(part: str) -> dict:
    """configs/reproduce_vision/world.json's flags of scripts/make_synthetic_vision.py for `part`."""
    with open(os.path.join(CONFIGS, "world.json")) as f:
        return json.load(f)[part]


def make_world(folder: str, recipe: dict, what: str) -> None:
    run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_vision.py"), f"--output_dir={folder}",
         *(f"--{k}" if v is True else f"--{k}={v}" for k, v in recipe.items() if v is not False)], what)


def prepare_tokenizer(world: str, out: str) -> str:
    """A 512-piece SentencePiece model of the world's text and the entry points' templates."""
    from lwm.vision_chat import VISION_END, VISION_START
    from lwm.vision_generation import IMAGE_PROMPT, UNCONDITIONAL_PROMPT, VIDEO_PROMPT
    from scripts.train_tokenizer import train_tokenizer

    path = os.path.join(out, "tokenizer", "tokenizer.model")
    if os.path.exists(path):
        return path
    texts = []
    with open(os.path.join(world, "train.jsonl")) as f:
        for line in f:
            x = json.loads(line)
            texts.append(" ".join([x["prompt"], VISION_START, VISION_END, x.get("cue", ""), x.get("answer", ""),
                                   x["caption"]]))
    texts += [IMAGE_PROMPT.format(prompt=""), VIDEO_PROMPT.format(prompt=""), UNCONDITIONAL_PROMPT] * 100
    corpus = os.path.join(out, "tokenizer", "input.jsonl")
    os.makedirs(os.path.dirname(corpus), exist_ok=True)
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    train_tokenizer(corpus, path, vocab_size=512)
    log(f"tokenizer: {path} (512 pieces)")
    return path


def world_frames(world: str, size: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames of the training media as the tokenizer script reads them (at `size`)."""
    from lwm.vision_io import read_vision, to_uint8

    with open(os.path.join(world, "train.jsonl")) as f:
        paths = sorted({json.loads(line)["path"] for line in f})
    rng.shuffle(paths)
    frames = []
    for path in paths:
        frames.extend(to_uint8(read_vision(os.path.join(world, path), max_n_frames=4, size=size)))
        if len(frames) >= limit:
            break
    return np.stack(frames[:limit])


VQGAN_RESTART_EVERY = 50  # dead codes restart every 50 steps: 127-128 of 128 in use (29-45 without)


def resized(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 frames [N, H, W, 3] resized (bicubic) to size x size, as the tokenizer script reads them."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])


def attribute_agreement(vqgan) -> dict:
    """Code agreement (over the cells the shapes cover) between frames that differ in one
    attribute only, for every scene of the world: low means the codes tell that attribute apart."""
    from lwm.synthetic_vision import COLOURS, POSITIONS, SHAPES, Scene, draw_image
    from lwm.tiny_vqgan import code_agreement

    def frames(scenes):
        return resized(np.stack([draw_image(s) for s in scenes]), vqgan.config.resolution)

    base = [Scene(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
    colours, positions = list(COLOURS), list(POSITIONS)
    changed = {
        "colour": [Scene(s.shape, colours[(colours.index(s.colour) + 1) % 4], s.position) for s in base],
        "shape": [Scene(SHAPES[(SHAPES.index(s.shape) + 1) % 3], s.colour, s.position) for s in base],
        "position": [Scene(s.shape, s.colour, positions[(positions.index(s.position) + 1) % 4]) for s in base],
    }
    return {k: code_agreement(vqgan, frames(base), frames(v)) for k, v in changed.items()}


def prepare_vqgan(world: str, out: str, smoke: bool) -> tuple[str, str, dict]:
    """(checkpoint, config file, report) of the tiny VQGAN fitted to the world's frames."""
    from lwm.synthetic_vision import scattered_frames
    from lwm.tiny_vqgan import TINY_CONFIG, fit_vqgan
    from lwm.vqgan import VQGAN, save_vqgan_params

    folder = os.path.join(out, "vqgan")
    checkpoint, config_file, report_file = (os.path.join(folder, n) for n in ("vqgan.pkl", "vqgan.json",
                                                                            "report.json"))
    if os.path.exists(report_file):
        with open(report_file) as f:
            return checkpoint, config_file, json.load(f)
    os.makedirs(folder, exist_ok=True)
    steps = 20 if smoke else 800
    rng = np.random.default_rng(0)
    media = world_frames(world, TINY_CONFIG.resolution, 64 if smoke else 2048, rng)
    # Half as many frames again of a shape anywhere: codes that read the same wherever a shape
    # is, so a colour seen at three positions is recognised at the fourth.
    scattered = resized(scattered_frames(rng, len(media) // 2), TINY_CONFIG.resolution)
    start = time.time()
    params, history = fit_vqgan(np.concatenate([media, scattered]), TINY_CONFIG, steps=steps, batch_size=32,
                                restart_every=VQGAN_RESTART_EVERY)
    save_vqgan_params(checkpoint, params)
    with open(config_file, "w") as f:
        json.dump(TINY_CONFIG.to_dict(), f, indent=1)
    report = dict(steps=steps, frames=len(media), scattered_frames=len(scattered), restart_every=VQGAN_RESTART_EVERY,
                  wall_s=round(time.time() - start, 1), history=history,
                  attribute_code_agreement=attribute_agreement(VQGAN(params, TINY_CONFIG)))
    with open(report_file, "w") as f:
        json.dump(report, f, indent=1)
    log(f"vqgan: {checkpoint}; code agreement between frames differing in one attribute: "
        f"{report['attribute_code_agreement']}")
    return checkpoint, config_file, report


def prepare_long_world(out: str, smoke: bool) -> str:
    """Stage 2's data: longer needle videos (12-32 frames; the first stage saw 4-8)."""
    world = os.path.join(out, "world_long")
    if os.path.exists(os.path.join(world, "train.jsonl")):
        return world
    recipe = world_recipe("long")
    if smoke:
        recipe.update(n_needle=8, needle_frames="12,16")
    make_world(world, recipe, "long needle videos")
    return world


def tokenize(world: str, name: str, vqgan: tuple[str, str], out: str, tag: str = "") -> str:
    """scripts/tokenize_vision.py over world/<name>.jsonl (resumes by id)."""
    output = os.path.join(out, "tokens", f"{tag or name}.jsonl")
    done = os.path.join(out, "tokens", f"{tag or name}.done")
    if os.path.exists(done):
        return output
    os.makedirs(os.path.dirname(output), exist_ok=True)
    run([sys.executable, os.path.join(ROOT, "scripts", "tokenize_vision.py"), f"--input={world}/{name}.jsonl",
         f"--output={output}", f"--vqgan_checkpoint={vqgan[0]}", f"--vqgan_config={vqgan[1]}", "--max_n_frames=0",
         "--batch_size=64", "--strict"], f"tokenize {name}")
    open(done, "w").close()
    return output


# ---- training -----------------------------------------------------------------------------------


def load_stage(name: str, smoke: bool) -> dict:
    """configs/reproduce_vision/<name>.json; an ablation (`ablation_of`) is its stage with the keys it changes."""
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        stage = json.load(f)
    if "ablation_of" in stage:  # which may itself be a variant of another
        stage = {**load_stage(stage.pop("ablation_of"), smoke=False), **stage}
    if smoke:
        stage.update(steps=3, warmup_steps=1, batch_size=8)
    return stage


def stage_data(tokens: str, stage: dict, out: str, epochs: int, long_tokens: str = "") -> str:
    """The stage's training lines, `epochs` passes each in a new random order (the loader reads
    a file front to back, and the world lists its examples kind by kind). With `long_tokens`
    (stage 2), every pass holds all of them plus `replay_fraction` as many of the first
    stage's lines, so the longer stage does not forget the short tasks. The file is named by what
    decides its lines, so stages (and --extra variants) that read the same lines share one file."""
    seed = stage.get("seed", 0)
    kind = f"long_replay{stage['replay_fraction']}" if long_tokens else "first"
    path = os.path.join(out, "tokens", f"shuffled_{kind}_{epochs}x_seed{seed}.jsonl")
    if os.path.exists(path):
        return path
    with open(tokens) as f:
        lines = [line for line in f if line.strip()]
    rng = np.random.default_rng(seed)
    long_lines = []
    if long_tokens:
        with open(long_tokens) as f:
            long_lines = [line for line in f if line.strip()]
    with open(path + ".tmp", "w") as f:
        for _ in range(epochs):
            if long_lines:
                replay = [lines[i] for i in rng.choice(len(lines), int(stage["replay_fraction"] * len(long_lines)))]
                epoch = long_lines + replay
            else:
                epoch = lines
            f.writelines(epoch[i] for i in rng.permutation(len(epoch)))
    os.replace(path + ".tmp", path)
    return path


def trained_record(stage: dict, out: str) -> dict | None:
    """The stage's done.json record in `out` (None while it is not trained); stops with one line
    when it was trained with other settings than its config holds now (a rerun would otherwise
    score the old weights as new)."""
    from lwm.reproduce import stop_if_settings_changed

    done = os.path.join(out, "runs", stage["name"], "done.json")
    if not os.path.exists(done):
        return None
    with open(done) as f:
        record = json.load(f)
    # records from before the whole stage was kept hold its steps only
    trained = record.get("stage", {"steps": record["steps"]})
    keys = (set(trained) | set(stage)) - {"what"} if "stage" in record else {"steps"}
    stop_if_settings_changed(trained, stage, keys, f"{os.path.dirname(done)} was trained",
                             f"configs/reproduce_vision/{stage['name']}.json")
    return record


def train_stage(stage: dict, data: str, tokenizer: str, out: str, start_from: str = "") -> tuple[str, float]:
    """(streaming_params path, wall seconds) of a `python -m lwm.train` run (autoresumes)."""
    run_dir = os.path.join(out, "runs", stage["name"])
    params = os.path.join(run_dir, "streaming_params")
    done = os.path.join(run_dir, "done.json")
    record = trained_record(stage, out)
    if record:
        return params, record["wall_s"]
    steps, seq = stage["steps"], stage["seq_length"]
    updates = f"dict(theta={stage['theta']},max_sequence_length={max(2048, seq)})"
    cmd = [sys.executable, "-m", "lwm.train", "--modality=vision,text", f"--mesh_dim={stage['mesh_dim']}",
           "--dtype=fp32", f"--total_steps={steps}", f"--log_freq={min(25, steps)}",
           f"--save_model_freq={max(1, steps // 4)}",
           f"--load_llama_config=json::{os.path.join(CONFIGS, 'tiny_model.json')}",
           f"--update_llama_config={updates}", f"--tokenizer={tokenizer}", "--optimizer.type=adamw",
           f"--optimizer.adamw_optimizer.lr={stage['lr']}", f"--optimizer.adamw_optimizer.end_lr={stage['end_lr']}",
           f"--optimizer.adamw_optimizer.lr_warmup_steps={stage['warmup_steps']}",
           f"--optimizer.adamw_optimizer.lr_decay_steps={steps}", "--optimizer.adamw_optimizer.weight_decay=0.01",
           "--train_dataset.type=json_vision", "--train_dataset.vision_text_processor.fields_from_example=fields",
           "--train_dataset.vision_text_processor.n_tokens_per_frame=16",
           "--train_dataset.vision_text_processor.add_bos_token=False",
           f"--train_dataset.json_vision_dataset.mode={stage['mode']}",
           f"--train_dataset.json_vision_dataset.packed_loss_weighting={stage.get('packed_loss_weighting', 'example')}",
           f"--train_dataset.json_vision_dataset.path={data}",
           f"--train_dataset.json_vision_dataset.seq_length={seq}",
           f"--train_dataset.json_vision_dataset.batch_size={stage['batch_size']}",
           "--train_dataset.json_vision_dataset.tokenizer_processes=1",
           f"--loss_averaging={stage.get('loss_averaging', 'auto')}", "--checkpointer.float_dtype=fp32",
           f"--logger.output_dir={os.path.join(out, 'runs')}",
           f"--logger.experiment_id={stage['name']}", "--logger.append_uuid=False", "--autoresume=True"]
    if start_from:
        cmd.append(f"--load_checkpoint=params::{start_from}")
    start = time.time()
    run(cmd, f"train {stage['name']}")
    wall = round(time.time() - start, 1)
    with open(done, "w") as f:
        json.dump({"wall_s": wall, "steps": steps, "stage": stage}, f)
    return params, wall


# ---- evals, through the entry points' list modes -------------------------------------------------


def model_flags(stage: dict, params: str, tokenizer: str, vqgan: tuple[str, str]) -> list[str]:
    return [f"--load_llama_config=json::{os.path.join(CONFIGS, 'tiny_model.json')}",
            f"--update_llama_config=dict(theta={stage['theta']},max_sequence_length={max(2048, stage['seq_length'])})",
            f"--load_checkpoint=params::{params}", f"--tokenizer={tokenizer}", f"--vqgan_checkpoint={vqgan[0]}",
            f"--vqgan_config={vqgan[1]}", "--mesh_dim=1,1,1,1"]


def write_jobs(path: str, jobs: list[dict]) -> None:
    from lwm.reproduce import write_lines

    write_lines(path, [json.dumps(j) for j in jobs])


def ask(world: str, kinds: tuple[str, ...], stage: dict, params: str, tokenizer: str, vqgan: tuple[str, str],
        folder: str) -> list[dict]:
    """Answers of lwm.vision_chat (greedy) to the held-out questions of `kinds` (resumable)."""
    with open(os.path.join(world, "heldout.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    jobs = [dict(id=x["id"], input_file=os.path.join(world, x["path"]), kind=x["kind"],
                 question=x["prompt"].split("USER: ", 1)[1].rstrip("\n"), expected=x["answer"],
                 attribute=x.get("question", ""), n_frames=x.get("n_frames", 1), max_n_frames=x.get("n_frames", 1),
                 depth=x.get("depth"))
            for x in lines if x["kind"] in kinds and x.get("question") != "describe"]
    questions, answers = os.path.join(folder, "questions.jsonl"), os.path.join(folder, "answers.jsonl")
    if count_lines(answers) < len(jobs):
        write_jobs(questions, jobs)
        run([sys.executable, "-m", "lwm.vision_chat", *model_flags(stage, params, tokenizer, vqgan),
             f"--questions_file={questions}", f"--output_file={answers}", "--temperature=0", "--max_new_tokens=8"],
            f"vision_chat {','.join(kinds)}", devices=1)
    with open(answers) as f:
        results = [json.loads(line) for line in f]
    for r in results:
        r["correct"] = r["answer"].strip().lower() == r["expected"].strip().lower()
    return results


def count_lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def accuracy(results: list[dict]) -> float | None:
    return mean(r["correct"] for r in results)


def mean(values) -> float | None:
    values = [float(v) for v in values]
    return round(float(np.mean(values)), 4) if values else None


def with_intervals(summary: dict, cases: dict[str, list]) -> dict:
    """summary plus `<key>_ci95`: a 95% bootstrap interval over the cases behind each key."""
    from lwm.stats import bootstrap_interval

    return {**summary, **{f"{key}_ci95": bootstrap_interval([float(v) for v in values])
                          for key, values in cases.items()}}


# text-to-image without classifier-free guidance, with the study's guidance (3) and with a light one
# (1.5: is any guidance a gain at this scale, or only less of it a smaller loss)
IMAGE_CFG = {"no_cfg": 1.0, "light_cfg": 1.5, "cfg": 3.0}
VIDEO_CFG = 3.0
# Samples drawn per held-out caption and setting; a caption's score is their mean. One draw is
# noisy: redrawing the same weights' images moved guidance's attributes 0.78 -> 0.84 and text to
# video 0.73 -> 0.70, more than most differences between settings or stages.
GENERATION_DRAWS = 3
# What an eval summary's generation scores were computed with: a summary of other draws or an
# older scoring is scored again from the media it has (2: guidance gains, paired by caption).
GENERATION_SCORING = dict(draws=GENERATION_DRAWS, version=2)


def generate(world: str, stage: dict, params: str, tokenizer: str, vqgan: tuple[str, str], folder: str) -> list[dict]:
    """lwm.vision_generation's outputs (one list-mode run) for the held-out captions: every image
    caption GENERATION_DRAWS times per IMAGE_CFG setting, every motion caption as many times as a
    video (the first draw of each under the id of a single draw, so a folder of one draw is kept)."""
    with open(os.path.join(world, "heldout.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    jobs = []
    for draw in range(GENERATION_DRAWS):  # draw-major: the first jobs of each setting are distinct captions
        tag = f"_draw{draw}" if draw else ""
        for x in lines:
            attributes = {k: x[k] for k in ("colour", "shape", "position", "direction") if k in x}
            name = x["id"].replace(":", "_")
            if x["kind"] == "image_gen":
                jobs += [dict(id=f"{name}_{key}{tag}", prompt=x["caption"], n_frames=1, cfg_scale=scale,
                              setting=key, truth=x["path"], **attributes)
                         for key, scale in IMAGE_CFG.items()]
            elif x["kind"] == "video_gen":
                jobs.append(dict(id=f"{name}{tag}", prompt=x["caption"], n_frames=x["n_frames"],
                                 cfg_scale=VIDEO_CFG, setting="video", truth=x["path"], **attributes))
    prompts = os.path.join(folder, "prompts.jsonl")
    if count_lines(os.path.join(folder, "generated.jsonl")) < len(jobs):
        write_jobs(prompts, jobs)
        run([sys.executable, "-m", "lwm.vision_generation", *model_flags(stage, params, tokenizer, vqgan),
             f"--prompts_file={prompts}", f"--output_dir={folder}", "--temperature_image=0.3", "--top_k_image=8",
             "--temperature_video=0.3", "--top_k_video=8"],
            "vision_generation", devices=1)
    with open(os.path.join(folder, "generated.jsonl")) as f:
        return [json.loads(line) for line in f]


def score_images(results: list[dict], folder: str, world: str, vqgan: tuple[str, str]) -> dict[str, list]:
    """Per generated image: the fraction of its caption's attributes the pixel classifier reads
    back, whether all three are right, and its codes' agreement with the caption's ground-truth
    image (both read and encoded as the tokenizer script does)."""
    from lwm.synthetic_vision import classify_frame
    from lwm.vision_io import read_vision, to_uint8
    from lwm.vqgan import VQGAN, VQGANConfig

    model = VQGAN(vqgan[0], VQGANConfig.from_json(vqgan[1]))
    size = model.config.resolution
    per_image = {"attributes": [], "exact": [], "code_agreement": []}
    for r in results:
        frame = read_vision(os.path.join(folder, r["output_file"]), size=size)
        truth = read_vision(os.path.join(world, r["truth"]), size=size)
        seen = classify_frame(to_uint8(frame)[0])
        hits = [seen is not None and getattr(seen, k) == r[k] for k in ("colour", "shape", "position")]
        per_image["attributes"].append(float(np.mean(hits)))
        per_image["exact"].append(all(hits))
        codes = [np.asarray(model.encode(x, progress=False)[1]) for x in (frame, truth)]
        per_image["code_agreement"].append(float(np.mean(codes[0] == codes[1])))
    return per_image


def score_videos(results: list[dict], folder: str) -> list[bool]:
    """Per generated clip: does its object move the captioned way (pixel classifier)."""
    from lwm.synthetic_vision import motion_direction
    from lwm.vision_io import read_vision, to_uint8

    return [motion_direction(to_uint8(read_vision(os.path.join(folder, r["output_file"]), max_n_frames=0, size=64)))
            == r["direction"] for r in results]


def tokenizer_ceiling(world: str, vqgan: tuple[str, str], out: str) -> dict:
    """What the scorers read back from the tokenizer's own reconstructions of the held-out
    captions' true images and clips (encoded, decoded, written as lwm.vision_generation writes
    its outputs): the most a generated image or clip can score when every code is right."""
    from lwm.tiny_vqgan import reconstruction
    from lwm.vision_generation import VIDEO_FPS
    from lwm.vision_io import read_vision, to_uint8, write_image, write_video
    from lwm.vqgan import VQGAN, VQGANConfig

    folder = os.path.join(out, "evals", "tokenizer_ceiling")
    summary_file = os.path.join(folder, "summary.json")
    if os.path.exists(summary_file):
        with open(summary_file) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    model = VQGAN(vqgan[0], VQGANConfig.from_json(vqgan[1]))
    with open(os.path.join(world, "heldout.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    images, clips = [], []
    for x in lines:
        if x["kind"] not in ("image_gen", "video_gen"):
            continue
        frames = to_uint8(read_vision(os.path.join(world, x["path"]), max_n_frames=0, size=model.config.resolution))
        rebuilt = reconstruction(model, frames)
        name = x["id"].replace(":", "_") + (".png" if x["kind"] == "image_gen" else ".mp4")
        record = dict(output_file=name, truth=x["path"], **{k: x[k] for k in ("colour", "shape", "position",
                                                                                "direction") if k in x})
        if x["kind"] == "image_gen":
            write_image(os.path.join(folder, name), rebuilt[0])
            images.append(record)
        else:
            write_video(os.path.join(folder, name), rebuilt, fps=VIDEO_FPS)
            clips.append(record)
    per_image = score_images(images, folder, world, vqgan)
    summary = {f"text_to_image_{key}": mean(values) for key, values in per_image.items()}
    summary["text_to_video_motion"] = mean(score_videos(clips, folder))
    with open(summary_file, "w") as f:
        json.dump(summary, f, indent=1)
    log(f"tokenizer ceiling (scores of the true images' and clips' reconstructions): {summary}")
    return summary


# ---- the study --------------------------------------------------------------------------------------


def eval_folder_for(folder: str, params: str) -> str:
    """`folder`, holding evals of the weights in `params` only: it records their checkpoint
    (lwm.checkpoint.checkpoint_identity) before any answer, and a folder of other weights (the
    stage was retrained since) moves to <folder>.stale-<hash> so every eval runs again."""
    from lwm.checkpoint import checkpoint_identity

    identity = checkpoint_identity(f"params::{params}")
    record = os.path.join(folder, "checkpoint.json")
    if os.path.exists(folder):
        scored = None
        if os.path.exists(record):
            with open(record) as f:
                scored = json.load(f)["sha256"]
        if scored == identity["sha256"]:
            return folder
        stale = f"{folder}.stale-{(scored or 'unknown')[:12]}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, stale)
        log(f"{folder}: evals of other weights than {params} holds now; moved to {os.path.basename(stale)}")
    os.makedirs(folder)
    with open(record, "w") as f:
        json.dump(identity, f, indent=1)
    return folder


def evaluate(stage: dict, params: str, world: str, tokenizer: str, vqgan: tuple[str, str], out: str,
             generation: bool = True) -> dict:
    """Every held-out eval of one trained stage, through lwm.vision_chat and (with `generation`)
    lwm.vision_generation."""
    folder = eval_folder_for(os.path.join(out, "evals", stage["name"]), params)
    summary_file = os.path.join(folder, "summary.json")
    if os.path.exists(summary_file):
        with open(summary_file) as f:
            summary = json.load(f)
        # scored as generation is scored now (GENERATION_SCORING); otherwise scored again, the
        # answers and media it has kept and only missing draws made
        if not generation or summary.get("generation_scoring") == GENERATION_SCORING:
            return summary
    # The entry points answer what is not answered yet; the scores are computed from their files.
    qa = ask(world, ("image_qa", "motion_qa", "needle_qa"), stage, params, tokenizer, vqgan, os.path.join(folder, "qa"))
    needle = [r for r in qa if r["kind"] == "needle_qa"]
    lengths = sorted({r["n_frames"] for r in needle})
    cases = {"image_qa": [r["correct"] for r in qa if r["kind"] == "image_qa"],
             "motion_qa": [r["correct"] for r in qa if r["kind"] == "motion_qa"],
             "video_needle": [r["correct"] for r in needle]}
    summary = dict(
        {key: mean(values) for key, values in cases.items()},
        image_qa_by_attribute={a: accuracy([r for r in qa if r["kind"] == "image_qa" and r["attribute"] == a])
                               for a in ("colour", "shape", "position")},
        video_needle_lengths=lengths,
        video_needle_by_length={str(n): accuracy([r for r in needle if r["n_frames"] == n]) for n in lengths})
    if generation:
        generated_cases = generation_cases(stage, params, world, tokenizer, vqgan, folder)
        summary.update({key: mean(values) for key, values in generated_cases.items()},
                       generation_scoring=GENERATION_SCORING)
        cases.update(generated_cases)
    summary = with_intervals(summary, cases)
    with open(summary_file, "w") as f:
        json.dump(summary, f, indent=1)
    log(f"evals after {stage['name']}: {summary}")
    return summary


def generation_cases(stage: dict, params: str, world: str, tokenizer: str, vqgan: tuple[str, str],
                     folder: str) -> dict[str, list]:
    """{result key: per-case scores} of the generated images (with and without guidance) and clips,
    and each guidance's gain in attributes over none, caption by caption (`..._gain_<setting>`:
    its interval is then a paired one)."""
    gen_folder = os.path.join(folder, "generated")
    generated = generate(world, stage, params, tokenizer, vqgan, gen_folder)
    by_caption = {}
    for key in IMAGE_CFG:
        images = sorted((r for r in generated if r["setting"] == key), key=lambda r: r["truth"])
        for measure, values in score_images(images, gen_folder, world, vqgan).items():
            by_caption[f"text_to_image_{measure}_{key}"] = per_caption(images, values)
    videos = [r for r in generated if r["setting"] == "video"]
    by_caption["text_to_video_motion"] = per_caption(videos, score_videos(videos, gen_folder))
    return {**{key: list(scores.values()) for key, scores in by_caption.items()}, **guidance_gains(by_caption)}


def per_caption(results: list[dict], scores: list) -> dict[str, float]:
    """{caption: its mean score over its draws}, a caption named by its true media's path, in the
    order captions first appear: the cases of an accuracy and its interval are captions, not
    draws of one caption."""
    by_caption: dict[str, list[float]] = {}
    for r, score in zip(results, scores):
        by_caption.setdefault(r["truth"], []).append(float(score))
    return {truth: float(np.mean(v)) for truth, v in by_caption.items()}


def guidance_gains(by_caption: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Each guidance setting's gain in attributes over none, caption by caption, matched by the
    caption's name (`text_to_image_attributes_gain_<setting>`: its interval is a paired one)."""
    unguided = by_caption["text_to_image_attributes_no_cfg"]
    gains = {}
    for key in IMAGE_CFG:
        if key == "no_cfg":
            continue
        guided = by_caption[f"text_to_image_attributes_{key}"]
        if guided.keys() != unguided.keys():
            raise ValueError(f"text to image with {key} and without guidance scored other captions "
                             f"({sorted(guided.keys() ^ unguided.keys())[:3]} in one only): no gain can be paired")
        gains[f"text_to_image_attributes_gain_{key}"] = [guided[truth] - unguided[truth] for truth in unguided]
    return gains


@contextlib.contextmanager
def timed(out: str, step: str):
    """Add the step's seconds to <out>/runs/wall_seconds.json (a resumed study adds up every attempt)."""
    from lwm.reproduce import add_wall

    start = time.time()
    yield
    add_wall(out, f"vision:{step}", time.time() - start)


def study_wall(out: str, extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """(seconds of every step of the study and its ablation, seconds of the --extra variants'
    steps), each over all attempts. A variant trained in `out` by an earlier run and not asked
    for now counts in neither."""
    from lwm.reproduce import recorded_walls

    def steps_of(names):
        return {f"vision:{kind} {name}" for name in names for kind in ("train", "evals")}

    walls = {k: v for k, v in recorded_walls(out).items() if k.startswith("vision:")}
    of_a_stage = {k for k in walls if k.startswith(("vision:train ", "vision:evals "))}
    study = {k for k in walls if k not in of_a_stage} | steps_of(STUDY_STAGES)
    return (round(sum(v for k, v in walls.items() if k in study), 1),
            round(sum(v for k, v in walls.items() if k in steps_of(extra)), 1))


def frames_per_example(world: str) -> str:
    """'MIN-MAX' frames of the examples of a world's training list."""
    with open(os.path.join(world, "train.jsonl")) as f:
        frames = {json.loads(line).get("n_frames", 1) for line in f}
    return f"{min(frames)}-{max(frames)}"


STUDY_STAGES = ("stage1", "stage2", "stage1_unmasked", "stage2_after_unmasked")  # what an --extra can start from
UNDERSTANDING = ("image_qa", "image_qa_ci95", "image_qa_by_attribute", "motion_qa", "motion_qa_ci95", "video_needle",
                 "video_needle_ci95", "video_needle_by_length")


def reproduce(out: str, results: str, smoke: bool, extra: tuple[str, ...] = ()) -> dict:
    from lwm.reproduce import git_commit, project_path
    from lwm.storage import content_sha256

    out = os.path.abspath(out)  # job lists name media by absolute path
    for name in STUDY_STAGES + tuple(extra):  # a stage trained with other settings stops the run here
        trained_record(load_stage(name, smoke), out)
    with timed(out, "world"):
        world = prepare_world(out, smoke)
    with timed(out, "tokenizer"):
        tokenizer = prepare_tokenizer(world, out)
    with timed(out, "vqgan"):
        vqgan_checkpoint, vqgan_config, vqgan_report = prepare_vqgan(world, out, smoke)
    vqgan = (vqgan_checkpoint, vqgan_config)
    with timed(out, "tokens"):
        tokens = tokenize(world, "train", vqgan, out)
    stage1 = load_stage("stage1", smoke)
    data1 = stage_data(tokens, stage1, out, epochs=1 if smoke else stage1["epochs"])
    with timed(out, "train stage1"):
        params1, wall1 = train_stage(stage1, data1, tokenizer, out)
    with timed(out, "evals stage1"):
        evals1 = None if smoke else evaluate(stage1, params1, world, tokenizer, vqgan, out)

    with timed(out, "long world and tokens"):
        long_world = prepare_long_world(out, smoke)
        long_tokens = tokenize(long_world, "train", vqgan, out, tag="long")
    stage2 = load_stage("stage2", smoke)
    data2 = stage_data(tokens, stage2, out, epochs=1 if smoke else stage2["epochs"], long_tokens=long_tokens)
    with timed(out, "train stage2"):
        params2, wall2 = train_stage(stage2, data2, tokenizer, out, start_from=params1)
    with timed(out, "evals stage2"):
        evals = evaluate(stage2, params2, world, tokenizer, vqgan, out)
    with timed(out, "tokenizer ceiling"):
        ceiling = tokenizer_ceiling(world, vqgan, out)

    # The ablation: stage 1 again on the same lines in the same order, masked packing off.
    unmasked = load_stage("stage1_unmasked", smoke)
    with timed(out, "train stage1_unmasked"):
        params_u, wall_u = train_stage(unmasked, data1, tokenizer, out)
    with timed(out, "evals stage1_unmasked"):
        evals_u = None if smoke else evaluate(unmasked, params_u, world, tokenizer, vqgan, out, generation=False)
    # and stage 2 from it, on stage 2's lines in stage 2's order
    unmasked2 = load_stage("stage2_after_unmasked", smoke)
    with timed(out, "train stage2_after_unmasked"):
        params_u2, wall_u2 = train_stage(unmasked2, data2, tokenizer, out, start_from=params_u)
    with timed(out, "evals stage2_after_unmasked"):
        evals_u2 = evaluate(unmasked2, params_u2, world, tokenizer, vqgan, out)

    def stage_row(s, params, wall, frames):
        return dict(name=s["name"], mode=s["mode"], frames_per_example=frames, seq_length=s["seq_length"],
                    theta=s["theta"], steps=s["steps"], tokens=s["steps"] * s["batch_size"] * s["seq_length"],
                    mesh_dim=s["mesh_dim"], wall_s=wall, checkpoint=project_path(params),
                    checkpoint_sha256=content_sha256(params))

    extra_stages = []
    trained = dict(zip(STUDY_STAGES, (params1, params2, params_u, params_u2)))
    for name in extra:
        variant = load_stage(name, smoke)
        long = "replay_fraction" in variant  # a stage-2 variant: long videos and replayed stage-1 lines
        data = stage_data(tokens, variant, out, epochs=1 if smoke else variant["epochs"],
                          long_tokens=long_tokens if long else "")
        start_from = variant.get("start_from", "")
        with timed(out, f"train {name}"):
            trained[name], wall = train_stage(variant, data, tokenizer, out,
                                              start_from=trained[start_from] if start_from else "")
        with timed(out, f"evals {name}"):
            results_x = evaluate(variant, trained[name], world, tokenizer, vqgan, out)
        frames = (f"{frames_per_example(long_world)} (and {frames_per_example(world)} replayed)" if long
                  else frames_per_example(world))
        extra_stages.append(dict(what=variant["what"], start_from=start_from or None,
                                 stage=dict(stage_row(variant, trained[name], wall, frames),
                                            packed_loss_weighting=variant.get("packed_loss_weighting", "example"),
                                            lr=variant["lr"], replay_fraction=variant.get("replay_fraction")),
                                 results=results_x))

    first_frames = frames_per_example(world)
    stages = [stage_row(stage1, params1, wall1, first_frames),
              stage_row(stage2, params2, wall2, f"{frames_per_example(long_world)} (and {first_frames} replayed)")]
    ablation = dict(name="masked_packing_off", what=unmasked["what"],
                    stage=stage_row(unmasked, params_u, wall_u, first_frames),
                    results=evals_u and {k: evals_u[k] for k in UNDERSTANDING},
                    compared_with=dict(stage=stage1["name"], results=evals1 and {k: evals1[k] for k in UNDERSTANDING}),
                    then_stage2=dict(what=unmasked2["what"],
                                     stage=stage_row(unmasked2, params_u2, wall_u2, stages[1]["frames_per_example"]),
                                     results=evals_u2))
    total_wall, extra_wall = study_wall(out, extra)
    summary = dict(total_wall_s=total_wall, extra_stages_wall_s=extra_wall, commit=git_commit(), stages=stages,
                   after_stage1=evals1, ablation=ablation,
                   tokenizer_attribute_code_agreement=vqgan_report["attribute_code_agreement"],
                   tokenizer_ceiling=ceiling, extra_stages=extra_stages,
                   vqgan_fit=dict(steps=vqgan_report["steps"], wall_s=vqgan_report["wall_s"],
                                  final=vqgan_report["history"][-1]),
                   machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                                cpus=os.cpu_count()),
                   **evals)
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
        json.dump(summary, f, indent=1)
    log(f"summary: {results}")
    print(summary_table(summary), flush=True)
    return summary


TARGETS = {"image_qa": 0.90, "video_needle": 0.80, "motion_qa": 0.80, "text_to_image_attributes_cfg": 0.80,
           "text_to_video_motion": 0.80}


def summary_table(summary: dict) -> str:
    """The results as a markdown table, with the targets of the study beside them."""
    rows = ["| result | value | 95% interval | target |", "|---|---|---|---|"]
    for key in ("image_qa", "motion_qa", "video_needle", "text_to_image_attributes_cfg",
                "text_to_image_attributes_light_cfg", "text_to_image_attributes_no_cfg",
                "text_to_image_attributes_gain_light_cfg", "text_to_image_attributes_gain_cfg",
                "text_to_image_exact_cfg", "text_to_image_code_agreement_cfg", "text_to_image_code_agreement_no_cfg",
                "text_to_video_motion"):
        target = TARGETS.get(key)
        interval = summary.get(f"{key}_ci95")
        rows.append(f"| {key} | {summary[key]:.3f} | {f'{interval[0]:.2f}-{interval[1]:.2f}' if interval else ''} | "
                    f"{'>= ' + format(target, '.2f') if target else ''} |")
    for n, value in summary["video_needle_by_length"].items():
        rows.append(f"| video_needle at {n} frames | {value:.3f} | | |")
    for attribute, value in summary["tokenizer_attribute_code_agreement"].items():
        rows.append(f"| VQGAN code agreement, frames differing in {attribute} | {value:.3f} | | low |")
    for key, value in summary["tokenizer_ceiling"].items():
        rows.append(f"| {key} of the VQGAN's reconstructions of the true media (ceiling) | {value:.3f} | | |")
    ablation = summary.get("ablation") or {}
    if ablation.get("results") and ablation["compared_with"].get("results"):
        main, off = ablation["compared_with"]["results"], ablation["results"]
        for key in ("image_qa", "motion_qa", "video_needle"):
            interval = off.get(f"{key}_ci95")
            rows.append(f"| ablation {ablation['name']}: {key} ({ablation['compared_with']['stage']}: {main[key]:.3f}) "
                        f"| {off[key]:.3f} | {f'{interval[0]:.2f}-{interval[1]:.2f}' if interval else ''} | |")
    then = ablation.get("then_stage2") or {}
    if then.get("results"):
        for key in ("image_qa", "video_needle", "text_to_image_attributes_cfg", "text_to_video_motion"):
            interval = then["results"].get(f"{key}_ci95")
            rows.append(f"| ablation {ablation['name']}, then stage 2: {key} ({summary['stages'][1]['name']}: "
                        f"{summary[key]:.3f}) | {then['results'][key]:.3f} | "
                        f"{f'{interval[0]:.2f}-{interval[1]:.2f}' if interval else ''} | |")
    rows.append(f"| wall time, study and ablation | {summary['total_wall_s'] / 60:.1f} min | | main study <= 90 min |")
    for variant in summary.get("extra_stages", []):
        r = variant["results"]
        rows.append(f"| --extra {variant['stage']['name']}: image QA / text to image (guided) / text to video / "
                    f"needle | {r['image_qa']:.3f} / {r['text_to_image_attributes_cfg']:.3f} / "
                    f"{r['text_to_video_motion']:.3f} / {r['video_needle']:.3f} | | |")
    if summary.get("extra_stages"):
        rows.append(f"| wall time, --extra variants (this run's steps) | {summary['extra_stages_wall_s'] / 60:.1f} min "
                    "| | |")
    return "\n".join(rows)


def publish(out: str, summary: dict, results: str, assets: str) -> None:
    """The summary to `results` and pictures to `assets`: generated images beside their held-out
    captions' ground truth, generated videos as one GIF, and the video needle's accuracy by length and depth."""
    import imageio.v2 as imageio
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lwm.vision_io import read_vision, to_uint8

    os.makedirs(assets, exist_ok=True)
    with open(results, "w") as f:
        json.dump(summary, f, indent=1)
    evals = os.path.join(out, "evals", summary["stages"][-1]["name"])
    with open(os.path.join(evals, "generated", "generated.jsonl")) as f:
        generated = [json.loads(line) for line in f]
    first_draws, seen = [], set()  # each caption's first draw, in order
    for r in generated:
        if (r["setting"], r["truth"]) not in seen:
            seen.add((r["setting"], r["truth"]))
            first_draws.append(r)
    images = [r for r in first_draws if r["setting"] == "cfg"][:8]
    fig, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.6))
    for i, r in enumerate(images):
        for row, path in enumerate((os.path.join(evals, "generated", r["output_file"]),
                                    os.path.join(out, "world", r["truth"]))):
            axes[row, i].imshow(to_uint8(read_vision(path, size=64))[0])
            axes[row, i].axis("off")
        axes[0, i].set_title(r["prompt"].replace(" at the ", "\n"), fontsize=7)
    axes[0, 0].text(-8, 32, "generated", rotation=90, va="center", ha="right", fontsize=8)
    axes[1, 0].text(-8, 32, "truth", rotation=90, va="center", ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(assets, "text_to_image.png"), dpi=120)
    plt.close(fig)

    videos = [r for r in first_draws if r["setting"] == "video"][:6]
    if videos:
        clips = [to_uint8(read_vision(os.path.join(evals, "generated", r["output_file"]), max_n_frames=0, size=64))
                 for r in videos]
        n = min(len(c) for c in clips)
        gap = np.full((64, 4, 3), 255, np.uint8)
        strip = [np.concatenate([x for c in clips for x in (c[t], gap)][:-1], axis=1) for t in range(n)]
        imageio.mimsave(os.path.join(assets, "text_to_video.gif"), [np.kron(f, np.ones((2, 2, 1), np.uint8))
                                                                   for f in strip], duration=0.4, loop=0)
        with open(os.path.join(assets, "text_to_video.txt"), "w") as f:
            f.write("text_to_video.gif, left to right: " + "; ".join(r["prompt"] for r in videos) + "\n")

    with open(os.path.join(evals, "qa", "answers.jsonl")) as f:
        needle = [r for r in map(json.loads, f) if r["kind"] == "needle_qa"]
    lengths, depths = sorted({r["n_frames"] for r in needle}), sorted({r["depth"] for r in needle})
    grid = np.array([[np.mean([r["answer"].strip().lower() == r["expected"] for r in needle
                               if r["n_frames"] == n and r["depth"] == d]) for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 3))
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n} frames" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("video length")
    ax.set_ylabel("needle frame depth")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("video needle: colour of the one diamond", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(assets, "video_needle.png"), dpi=120)
    plt.close(fig)
    log(f"published {results} and {assets}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "reproduce_vision"),
                        help="working folder (data, runs, evals); a rerun resumes there")
    parser.add_argument("--smoke", action="store_true", help="a few steps and a tiny world (tests)")
    parser.add_argument("--extra", default="", help="comma-separated variants to train after the study and evaluate "
                        "(configs/reproduce_vision/<name>.json with `ablation_of`, `start_from` and `what`)")
    parser.add_argument("--publish", action="store_true", help="also write docs/reproduction_vision.json and the "
                        "pictures in docs/assets/reproduction_vision (tracked files: only when asked)")
    args = parser.parse_args(argv)
    extra = tuple(name for name in args.extra.split(",") if name)
    for i, name in enumerate(extra):  # before any heavy work: a typo stops here
        if not os.path.exists(os.path.join(CONFIGS, f"{name}.json")):
            parser.error(f"--extra {name}: no configs/reproduce_vision/{name}.json")
        start_from = load_stage(name, args.smoke).get("start_from", "")
        if start_from and start_from not in STUDY_STAGES + extra[:i]:
            parser.error(f"--extra {name}: its start_from {start_from!r} is not trained before it; name one of "
                         f"{', '.join(STUDY_STAGES + extra[:i])}")
    summary = reproduce(args.out, os.path.join(args.out, "reproduction_vision.json"), args.smoke, extra)
    if args.publish:
        publish(os.path.abspath(args.out), summary, os.path.join(ROOT, "docs", "reproduction_vision.json"),
                os.path.join(ROOT, "docs", "assets", "reproduction_vision"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
