"""The synthetic vision world: drawings, the pixel classifier that scores generations, the
generator script's lists, and the tiny VQGAN fitted to its frames."""
import json
import os
import subprocess
import sys

import numpy as np

from lwm.synthetic_vision import (COLOURS, DIRECTIONS, NEEDLE_SHAPE, POSITIONS, SHAPES, Scene, classify_frame,
                                  draw, draw_image, motion_direction, motion_frames, needle_index, needle_video)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_pixel_classifier_reads_back_every_drawn_scene():
    """Every (shape, colour, position) drawn, also shifted by a few pixels, is classified as
    drawn: the classifier that scores generated images is exact on the ground truth."""
    for shape in SHAPES:
        for colour in COLOURS:
            for position, (cx, cy) in POSITIONS.items():
                for dx, dy in ((0, 0), (3, -2), (-3, 3)):
                    frame = draw([(shape, colour, cx + dx, cy + dy)])
                    assert classify_frame(frame) == Scene(shape, colour, position), (shape, colour, position, dx)
    assert classify_frame(draw([])) is None  # an empty frame is no scene
    assert classify_frame(draw([(NEEDLE_SHAPE, "blue", 16, 16)])).shape == NEEDLE_SHAPE


def test_motion_and_needle_videos_carry_their_ground_truth():
    for direction in DIRECTIONS:
        frames = motion_frames("circle", "green", direction, n_frames=5)
        assert frames.shape == (5, 64, 64, 3) and motion_direction(frames) == direction
    assert motion_direction(np.stack([draw_image(Scene("square", "red", "top left"))] * 3)) is None  # still
    rng = np.random.default_rng(0)
    for n, depth in ((8, 0.0), (8, 0.5), (32, 0.75), (32, 1.0)):
        at = needle_index(n, depth)
        frames = needle_video(rng, n, "yellow", at)
        shapes = [classify_frame(f).shape for f in frames]
        assert shapes.count(NEEDLE_SHAPE) == 1 and shapes[at] == NEEDLE_SHAPE
        assert classify_frame(frames[at]).colour == "yellow"
    assert (needle_index(8, 0.0), needle_index(8, 0.5), needle_index(8, 1.0)) == (0, 4, 7)


def test_the_generator_writes_lists_tokenize_vision_reads(tmp_path):
    """A small world: media files exist, each line's fields follow the entry points' streams,
    held-out (colour, shape) pairs never occur in training, and the answers match the pictures."""
    from lwm.synthetic_vision import classify_frame as classify
    from lwm.vision_io import read_vision

    out = tmp_path / "world"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_vision.py"),
                           f"--output_dir={out}", "--n_images=12", "--n_motion=4", "--n_needle=4",
                           "--needle_eval_frames=8", "--needle_eval_rounds=1", "--unconditional_fraction=0.5",
                           "--clip_questions", "--motion_step=8"],
                          capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    uncond = {k: counts["train"].pop(k, 0) for k in ("image_uncond", "video_uncond")}
    assert counts["train"].pop("clip_qa") == 2 * 4  # a colour and a shape question a clip
    assert counts["train"] == {"image_qa": 48, "image_gen": 12, "motion_qa": 4, "video_gen": 4, "needle_qa": 4}
    assert 0 < uncond["image_uncond"] < 12 and 0 < uncond["image_uncond"] + uncond["video_uncond"] < 16
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    from scripts.make_synthetic_vision import HELD_OUT

    assert all((x["colour"], x["position"]) not in HELD_OUT for x in train if "position" in x)
    assert all((x["colour"], x["position"]) in HELD_OUT for x in held if "position" in x)
    assert sorted({x["depth"] for x in held if x["kind"] == "needle_qa"}) == [0.0, 0.25, 0.5, 0.75, 1.0]
    for line in train + held:
        assert (out / line["path"]).exists(), line["path"]
    for line in [x for x in train if x["kind"] == "image_qa"][:8]:
        frame = np.round((read_vision(str(out / line["path"]), size=64)[0] + 1) * 127.5).astype(np.uint8)
        seen = classify(frame)
        assert (seen.colour, seen.shape, seen.position) == (line["colour"], line["shape"], line["position"])
        assert line["fields"] == "[prompt],[vision],[cue],answer"
        assert line["prompt"].startswith("<s>You are a helpful assistant. USER: ") and line["cue"] == " ASSISTANT:"
        assert line["answer"] == (seen.caption() if line["question"] == "describe" else line[line["question"]])
    gen = next(x for x in train if x["kind"] == "image_gen")
    assert gen["fields"] == "[prompt],vision" and gen["prompt"].endswith(f"Generate an image of {gen['caption']} "
                                                                         "ASSISTANT:")
    assert gen["marker_bos"] is False  # the generation prompt has no BOS before <vision>
    uncond = next(x for x in train if x["kind"] == "image_uncond")
    assert (uncond["prompt"], uncond["fields"], uncond["marker_bos"]) == ("<s>", "[prompt],vision", False)
    needle = next(x for x in held if x["kind"] == "needle_qa")
    frames = np.round((read_vision(str(out / needle["path"]), max_n_frames=0, size=64) + 1) * 127.5).astype(np.uint8)
    assert len(frames) == 8 and classify(frames[needle["needle_frame"]]).shape == NEEDLE_SHAPE  # survives H.264
    assert needle["answer"] == needle["colour"] == classify(frames[needle["needle_frame"]]).colour


def test_a_tiny_vqgan_fit_starts_from_k_means_and_lowers_the_reconstruction_error():
    """The mechanics of the fit (the study measures what the codes tell apart, docs/reproduction_vision.md):
    k-means puts every code in use at the start, the error falls, the result loads as a VQGAN
    and round-trips frames of the configured size, and code agreement is computed over the
    cells the shapes cover (identical frames agree fully, frames with the shape elsewhere barely)."""
    from PIL import Image

    from lwm.tiny_vqgan import TINY_CONFIG, code_agreement, fit_vqgan, kmeans, reconstruction
    from lwm.vqgan import VQGAN

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 0.01, (20, 2)) for c in ((0, 0), (1, 0), (0, 1))])
    centres = kmeans(points, 3, rng)
    assert sorted(np.round(centres, 1).tolist()) == [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]

    def small(frame):
        return np.asarray(Image.fromarray(frame).resize((32, 32), Image.BICUBIC))

    scenes = [Scene(SHAPES[i % 3], list(COLOURS)[i % 4], list(POSITIONS)[i % 4]) for i in range(48)]
    frames = np.stack([small(draw_image(s)) for s in scenes])
    params, history = fit_vqgan(frames, TINY_CONFIG, steps=20, batch_size=8, progress=False)
    assert len(history) == 5 and history[0]["codes_used"] > 30  # k-means: many codes in use from the start
    assert history[-1]["mse"] < history[0]["mse"], history
    vqgan = VQGAN(params, TINY_CONFIG)
    assert reconstruction(vqgan, frames[:4]).shape == (4, 32, 32, 3)
    assert code_agreement(vqgan, frames, frames) == 1.0
    moved = np.stack([small(draw_image(Scene(s.shape, s.colour, list(POSITIONS)[(list(POSITIONS).index(s.position)
                                                                                      + 1) % 4]))) for s in scenes])
    assert code_agreement(vqgan, frames, moved) < 0.5


def test_dead_codes_restart_at_the_latents_the_codebook_fits_worst():
    import jax.numpy as jnp

    from lwm.tiny_vqgan import restart_dead_codes

    book = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], np.float32)
    latents = np.array([[0.1, 0.0], [0.9, 0.1], [3.0, -4.0], [-6.0, 0.0]], np.float32)  # the last two fit worst
    params = {"quantize": {"embeddings": jnp.asarray(book)}, "decoder": {"w": 1}}
    dead = np.array([True, False, True])
    out = restart_dead_codes(params, dead, latents, np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(out["quantize"]["embeddings"]), [[-6.0, 0.0], [1.0, 0.0], [3.0, -4.0]])
    assert out["decoder"] is params["decoder"]
    assert restart_dead_codes(params, np.zeros(3, bool), latents, np.random.default_rng(0)) is params


def test_scattered_frames_put_every_colour_anywhere():
    from lwm.synthetic_vision import COLOURS, centroid, classify_frame, scattered_frames

    frames = scattered_frames(np.random.default_rng(0), 64)
    seen = [classify_frame(f) for f in frames]
    assert {s.colour for s in seen} == set(COLOURS) and all(s.shape in SHAPES for s in seen)
    xs = [centroid(f)[0] for f in frames]
    assert min(xs) < 20 and max(xs) > 44 and any(26 < x < 38 for x in xs)  # corners and the middle
