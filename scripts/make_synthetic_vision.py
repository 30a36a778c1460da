"""Write the synthetic vision world (lwm/synthetic_vision.py) as images, videos and JSONL lists
that scripts/tokenize_vision.py reads, with every answer known.

    python scripts/make_synthetic_vision.py --output_dir=data/world --seed=0
    python scripts/tokenize_vision.py --input=data/world/train.jsonl --output=data/world/train_tokens.jsonl \\
        --vqgan_checkpoint=vqgan.pkl --vqgan_config=vqgan.json --max_n_frames=0

Each line of `train.jsonl` / `heldout.jsonl` is one training or evaluation example:
{"id", "path" (relative to the list), "caption", "kind", "fields", text fields, attributes}.
`fields` is the loader's field spec, in the streams the entry points build:
  chat (questions, descriptions)   [prompt],[vision],[cue],answer      as lwm.vision_chat asks
  generation (images, videos)      [prompt],vision                      as lwm.vision_generation prompts
Kinds: `image_qa` (colour / shape / position / describe), `image_gen`, `motion_qa` (which
way it moves), `video_gen`, `needle_qa` (the colour of the one diamond in a long video), and
`image_uncond` / `video_uncond` (a tenth of the media again, after the unconditional prompt),
and with --clip_questions `clip_qa` (colour and shape questions about a motion clip).
The held-out list has images of (colour, position) pairs never drawn together in training
(HELD_OUT: red is never at the top left, ...), motion clips of other random seeds, and needle
videos `--needle_eval_frames` long at five depths.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from tqdm import tqdm

from lwm import cli, storage
from lwm.synthetic_vision import (COLOURS, DIRECTIONS, NEEDLE_SHAPE, POSITIONS, RADIUS, SHAPES, SIZE, Scene, draw,
                                  motion_frames, needle_index, needle_video)
from lwm.vision_chat import ANSWER_CUE, SYSTEM_PROMPT
from lwm.vision_generation import IMAGE_PROMPT, UNCONDITIONAL_PROMPT, VIDEO_PROMPT
from lwm.vision_io import write_image, write_video

# (colour, position) pairs never drawn together in training images: every colour is still seen
# at three positions, every position with three colours, every shape everywhere. (Held-out
# (colour, shape) pairs would ask for VQGAN codes the language model never saw: at 4 x 4 codes a
# code holds colour and shape together, measured as their code agreement.)
HELD_OUT = {("red", "top left"), ("green", "top right"), ("blue", "bottom left"), ("yellow", "bottom right")}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "position": "Where is the shape?", "describe": "Describe the image."}
MOTION_QUESTION = "Which way does the shape move?"
NEEDLE_QUESTION = f"What colour was the {NEEDLE_SHAPE}?"
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHAT_FIELDS = "[prompt],[vision],[cue],answer"
GENERATION_FIELDS = "[prompt],vision"


def chat_example(question: str, answer: str) -> dict:
    return dict(prompt=SYSTEM_PROMPT.format(question=question), cue=ANSWER_CUE, answer=answer, fields=CHAT_FIELDS)


def generation_example(template: str, caption: str = "") -> dict:
    """A line training on lwm.vision_generation's prompt stream: the loader puts `<vision>` before
    the codes itself, without a BOS ("marker_bos": false), as the prompt `... ASSISTANT: <vision>`
    has none there. UNCONDITIONAL_PROMPT (`<s><vision>`) gives the guidance row's stream."""
    text = template.format(prompt=caption)
    if not text.endswith("<vision>"):
        raise ValueError(f"a generation template ends with <vision>, got {template!r}")
    return dict(prompt=text.removesuffix("<vision>").rstrip(" "), fields=GENERATION_FIELDS, marker_bos=False)


def combos(held_out: bool) -> list[tuple[str, str]]:
    """(colour, position) pairs of the training images (held_out=False) or of the held-out ones."""
    return [(c, p) for c in COLOURS for p in POSITIONS if ((c, p) in HELD_OUT) == held_out]


class WorldWriter:
    """Draws examples into `output_dir/media/...` and collects their list lines."""

    def __init__(self, output_dir: str, rng: np.random.Generator, jitter: float = 3.0):
        self.output_dir, self.rng, self.jitter = output_dir, rng, jitter
        self.lines: list[dict] = []

    def _place(self, position: str) -> tuple[float, float]:
        # kept whole inside the frame (a no-op for jitter <= 5)
        return tuple(float(np.clip(c + self.rng.uniform(-self.jitter, self.jitter), RADIUS, SIZE - RADIUS))
                     for c in POSITIONS[position])

    def _add(self, media_id: str, path: str, caption: str, kind: str, example: dict, **attributes) -> None:
        self.lines.append(dict(id=f"{media_id}:{kind}:{len(self.lines)}", path=path, caption=caption, kind=kind,
                               **example, **attributes))

    def image(self, index: int, colour: str, shape: str, position: str, questions=tuple(QUESTIONS),
              generation: bool = True, unconditional: bool = False) -> None:
        scene = Scene(shape, colour, position)
        media_id = f"image_{index:06d}"
        path = f"media/images/{media_id}.png"
        write_image(storage.join(self.output_dir, path), draw([(shape, colour, *self._place(position))]))
        attributes = dict(colour=colour, shape=shape, position=position)
        for q in questions:
            answer = scene.caption() if q == "describe" else attributes[q]
            self._add(media_id, path, scene.caption(), "image_qa", chat_example(QUESTIONS[q], answer), question=q,
                      **attributes)
        if generation:
            self._add(media_id, path, scene.caption(), "image_gen", generation_example(IMAGE_PROMPT, scene.caption()),
                      **attributes)
        if unconditional:
            self._add(media_id, path, scene.caption(), "image_uncond", generation_example(UNCONDITIONAL_PROMPT),
                      **attributes)

    def motion(self, index: int, colour: str, shape: str, direction: str, n_frames: int,
               generation: bool = True, unconditional: bool = False, step: float = 6.0,
               attribute_questions: bool = False) -> None:
        media_id = f"motion_{index:06d}"
        path = f"media/motion/{media_id}.mp4"
        start = (32 + self.rng.uniform(-4, 4), 32 + self.rng.uniform(-4, 4))
        dx, dy = DIRECTIONS[direction]
        travel = step * (n_frames - 1)
        start = (start[0] - dx * travel / 2, start[1] - dy * travel / 2)
        write_video(storage.join(self.output_dir, path),
                    motion_frames(shape, colour, direction, n_frames, step=step, start=start))
        caption = f"a {colour} {shape} moving {direction}"
        attributes = dict(colour=colour, shape=shape, direction=direction, n_frames=n_frames)
        self._add(media_id, path, caption, "motion_qa", chat_example(MOTION_QUESTION, direction), **attributes)
        if attribute_questions:  # colours and shapes seen along the frame's middle, not only at its corners
            for q in ("colour", "shape"):
                self._add(media_id, path, caption, "clip_qa", chat_example(QUESTIONS[q], attributes[q]), question=q,
                          **attributes)
        if generation:
            self._add(media_id, path, caption, "video_gen", generation_example(VIDEO_PROMPT, caption), **attributes)
        if unconditional:
            self._add(media_id, path, caption, "video_uncond", generation_example(UNCONDITIONAL_PROMPT), **attributes)

    def needle(self, index: int, n_frames: int, colour: str, depth: float) -> None:
        media_id = f"needle_{index:06d}"
        path = f"media/needle/{media_id}.mp4"
        at = needle_index(n_frames, depth)
        write_video(storage.join(self.output_dir, path), needle_video(self.rng, n_frames, colour, at))
        self._add(media_id, path, f"a video of {n_frames} frames with a {colour} {NEEDLE_SHAPE} in frame {at + 1}",
                  "needle_qa", chat_example(NEEDLE_QUESTION, colour), colour=colour, n_frames=n_frames, depth=depth,
                  needle_frame=at)


def write_world(output_dir: str, seed: int = 0, n_images: int = 600, n_motion: int = 300, n_needle: int = 300,
                motion_frames_range: tuple[int, int] = (4, 6), needle_frames_range: tuple[int, int] = (4, 8),
                heldout_images: int = 48, heldout_motion: int = 32, needle_eval_frames: tuple[int, ...] = (8, 16, 32),
                needle_eval_rounds: int = 4, jitter: float = 3.0, unconditional_fraction: float = 0.1,
                motion_step: float = 6.0, clip_questions: bool = False, progress: bool = True) -> dict:
    """Write media and `train.jsonl` / `heldout.jsonl` under output_dir; returns the counts.

    jitter: how far (pixels, each axis) a training image's shape may sit from its named position,
    kept whole inside the frame (held-out images keep 3): a wider jitter moves a shape across the
    VQGAN's code cells, so the same colour and shape come out as codes at more places of the
    frame. unconditional_fraction: the share of
    training images and clips that also get an unconditional generation line (the prompt
    classifier-free guidance mixes in), so the guidance has a trained unconditional model.
    motion_step: pixels a clip's shape moves a frame. clip_questions: motion clips also get a
    colour and a shape question (kind `clip_qa`): shapes along the frame's middle, where no
    corner position is, asked about as in the images."""
    rng = np.random.default_rng(seed)
    directions, colours = list(DIRECTIONS), list(COLOURS)
    train = WorldWriter(output_dir, rng, jitter=jitter)
    seen = combos(held_out=False)
    total = n_images + n_motion + n_needle
    bar = tqdm(total=total, desc="synthetic world (train)", disable=not progress)
    shapes = list(SHAPES)
    for i in range(n_images):
        colour, position = seen[rng.integers(len(seen))]
        train.image(i, colour, shapes[rng.integers(len(shapes))], position,
                    unconditional=bool(rng.random() < unconditional_fraction))
        bar.update()
    for i in range(n_motion):
        n = int(rng.integers(motion_frames_range[0], motion_frames_range[1] + 1))
        train.motion(i, colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))],
                     directions[rng.integers(len(directions))], n,
                     unconditional=bool(rng.random() < unconditional_fraction), step=motion_step,
                     attribute_questions=clip_questions)
        bar.update()
    for i in range(n_needle):
        n = int(rng.integers(needle_frames_range[0], needle_frames_range[1] + 1))
        train.needle(i, n, colours[rng.integers(len(colours))], float(rng.uniform(0, 1)))
        bar.update()
    bar.close()

    # Held out: new (colour, position) pairs, new seeds, and needle videos longer than training's.
    held = WorldWriter(output_dir, np.random.default_rng(seed + 1_000_003))
    unseen = combos(held_out=True)
    for i in range(heldout_images):
        colour, position = unseen[i % len(unseen)]
        held.image(100_000 + i, colour, shapes[(i // len(unseen)) % len(shapes)], position)
    for i in range(heldout_motion):
        held.motion(100_000 + i, colours[i % len(colours)], shapes[(i // len(colours)) % len(shapes)],
                    directions[(i // (len(colours) * len(shapes)) + i) % len(directions)], motion_frames_range[1],
                    step=motion_step)
    index = 100_000
    for n in needle_eval_frames:
        for depth in NEEDLE_DEPTHS:
            for r in range(needle_eval_rounds):
                held.needle(index, n, colours[(r + int(depth * 4)) % len(colours)], depth)
                index += 1
    for name, writer in (("train.jsonl", train), ("heldout.jsonl", held)):
        storage.write_text(storage.join(output_dir, name), "".join(json.dumps(line) + "\n" for line in writer.lines))
    counts = {name: {} for name in ("train", "heldout")}
    for name, writer in (("train", train), ("heldout", held)):
        for line in writer.lines:
            counts[name][line["kind"]] = counts[name].get(line["kind"], 0) + 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                                     usage="python scripts/make_synthetic_vision.py --output_dir=DIR [--seed=0]")
    parser.add_argument("--output_dir", required=True, help="folder for media/, train.jsonl and heldout.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training half (held out: another)")
    parser.add_argument("--n_images", type=int, default=600, help="training images (5 examples each)")
    parser.add_argument("--n_motion", type=int, default=300, help="training motion clips (2 examples each)")
    parser.add_argument("--n_needle", type=int, default=300, help="training needle videos")
    parser.add_argument("--needle_frames", default="4,8", help="training needle video lengths, min,max frames")
    parser.add_argument("--needle_eval_frames", default="8,16,32", help="held-out needle video lengths")
    parser.add_argument("--needle_eval_rounds", type=int, default=4, help="held-out videos per length and depth")
    parser.add_argument("--heldout_images", type=int, default=48, help="held-out images (4 questions each)")
    parser.add_argument("--heldout_motion", type=int, default=32, help="held-out motion clips")
    parser.add_argument("--motion_step", type=float, default=6.0, help="pixels a clip's shape moves a frame")
    parser.add_argument("--clip_questions", action="store_true",
                        help="motion clips also get a colour and a shape question (kind clip_qa)")
    parser.add_argument("--unconditional_fraction", type=float, default=0.1,
                        help="share of training images and clips with an unconditional generation line too")
    parser.add_argument("--jitter", type=float, default=3.0,
                        help="training images: pixels a shape may sit from its named position (at most 12)")
    cli.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    with cli.user_errors(args.verbose):
        low, high = (int(x) for x in args.needle_frames.split(","))
        if not 1 <= low <= high:
            raise ValueError(f"--needle_frames={args.needle_frames}: expected MIN,MAX with 1 <= MIN <= MAX")
        eval_frames = tuple(int(x) for x in args.needle_eval_frames.split(","))
        if not 0 < args.motion_step <= 10:
            raise ValueError(f"--motion_step={args.motion_step}: expected 0 < pixels <= 10 (more leaves the frame)")
        if not 0 <= args.unconditional_fraction <= 1:
            raise ValueError(f"--unconditional_fraction={args.unconditional_fraction}: expected a share in 0..1")
        if not 0 <= args.jitter <= 12:
            raise ValueError(f"--jitter={args.jitter}: expected 0..12 pixels (more crosses into the next position)")
        for name in ("n_images", "n_motion", "n_needle", "needle_eval_rounds", "heldout_images", "heldout_motion"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
        counts = write_world(args.output_dir, args.seed, args.n_images, args.n_motion, args.n_needle,
                             needle_frames_range=(low, high), heldout_images=args.heldout_images,
                             heldout_motion=args.heldout_motion, needle_eval_frames=eval_frames,
                             needle_eval_rounds=args.needle_eval_rounds, jitter=args.jitter,
                             unconditional_fraction=args.unconditional_fraction, motion_step=args.motion_step,
                             clip_questions=args.clip_questions)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
