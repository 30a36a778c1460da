"""A synthetic vision world with a known ground truth: shapes of colours at positions, shapes
that move, and long videos with one odd frame (the video needle).

Every picture is drawn from its attributes, so every caption, question and answer is known:

    from lwm.synthetic_vision import Scene, draw_image, motion_frames
    frame = draw_image(Scene("circle", "red", "top left"))          # uint8 [64, 64, 3]
    frames = motion_frames("square", "blue", "left", n_frames=6)      # uint8 [6, 64, 64, 3]
    classify_frame(frame)  # -> Scene('circle', 'red', 'top left'): the pixel classifier scoring generations

`scripts/make_synthetic_vision.py` writes a data set of these (PNG images, MP4 videos, captions,
questions and answers) in the layout `scripts/tokenize_vision.py` reads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

SIZE = 64  # frames are SIZE x SIZE RGB
BACKGROUND = (16, 16, 16)
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
NEEDLE_SHAPE = "diamond"  # appears only in the video needle's one odd frame
POSITIONS = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
RADIUS = 11  # half the side of a shape's bounding box, in pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    """One shape in one frame."""

    shape: str
    colour: str
    position: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}"


def shape_mask(shape: str, cx: float, cy: float, radius: float = RADIUS, size: int = SIZE) -> np.ndarray:
    """bool [size, size]: the pixels a shape centred at (cx, cy) covers."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + (NEEDLE_SHAPE,)}")


def draw(objects: Sequence[tuple[str, str, float, float]], size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: each (shape, colour, cx, cy) painted in order over the background."""
    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = BACKGROUND
    for shape, colour, cx, cy in objects:
        frame[shape_mask(shape, cx, cy, size=size)] = COLOURS[colour]
    return frame


def draw_image(scene: Scene) -> np.ndarray:
    cx, cy = POSITIONS[scene.position]
    return draw([(scene.shape, scene.colour, cx, cy)])


def motion_frames(shape: str, colour: str, direction: str, n_frames: int, step: float = 6.0,
                  start: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 [n_frames, SIZE, SIZE, 3]: the shape moving `step` pixels a frame in `direction`,
    centred on the frame's middle over the clip (or from `start`)."""
    dx, dy = DIRECTIONS[direction]
    travel = step * (n_frames - 1)
    if start is None:
        start = (SIZE / 2 - dx * travel / 2, SIZE / 2 - dy * travel / 2)
    return np.stack([draw([(shape, colour, start[0] + dx * step * t, start[1] + dy * step * t)])
                     for t in range(n_frames)])


def needle_video(rng: np.random.Generator, n_frames: int, needle_colour: str, needle_index: int) -> np.ndarray:
    """uint8 [n_frames, SIZE, SIZE, 3]: distractor frames (a random square, circle or triangle of a
    random colour at a random position) with a diamond of `needle_colour` in frame `needle_index`."""
    frames = []
    for t in range(n_frames):
        cx, cy = POSITIONS[list(POSITIONS)[rng.integers(len(POSITIONS))]]
        if t == needle_index:
            frames.append(draw([(NEEDLE_SHAPE, needle_colour, cx, cy)]))
        else:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            frames.append(draw([(shape, colour, cx, cy)]))
    return np.stack(frames)


def scattered_frames(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """uint8 [n_frames, SIZE, SIZE, 3]: one random shape of a random colour each, anywhere in the
    frame (kept inside it): frames for fitting a tokenizer whose codes do not depend on where a
    shape is (no captions; every colour at every place, as the needle videos' distractors)."""
    colours = list(COLOURS)
    return np.stack([draw([(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))],
                            *rng.uniform(RADIUS, SIZE - RADIUS, 2))]) for _ in range(n_frames)])


def needle_index(n_frames: int, depth: float) -> int:
    """The frame at `depth` (0 = first, 1 = last) of a video of n_frames."""
    return min(n_frames - 1, max(0, int(round(depth * (n_frames - 1)))))


# ---- the pixel classifier: scores generated images and videos ----------------------------------


def foreground(frame: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """bool [H, W]: pixels far from the background colour."""
    return np.linalg.norm(frame.astype(np.float32) - np.asarray(BACKGROUND, np.float32), axis=-1) > threshold


def dominant_colour(frame: np.ndarray) -> str | None:
    """The palette colour nearest to most foreground pixels (None for an empty frame)."""
    mask = foreground(frame)
    if mask.sum() < 8:
        return None
    pixels = frame[mask].astype(np.float32)
    palette = np.asarray(list(COLOURS.values()), np.float32)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return list(COLOURS)[int(np.bincount(nearest, minlength=len(COLOURS)).argmax())]


def centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the foreground's centre of mass, in pixels (None for an empty frame)."""
    mask = foreground(frame)
    if mask.sum() < 8:
        return None
    y, x = np.nonzero(mask)
    return float(x.mean()) + 0.5, float(y.mean()) + 0.5


def bounding_box(frame: np.ndarray) -> tuple[float, float, float] | None:
    """(cx, cy, radius) of the foreground's bounding box (None for an empty frame)."""
    mask = foreground(frame)
    if mask.sum() < 8:
        return None
    y, x = np.nonzero(mask)
    return ((x.min() + x.max() + 1) / 2, (y.min() + y.max() + 1) / 2,
            max(x.max() + 1 - x.min(), y.max() + 1 - y.min()) / 2)


def classify_shape(frame: np.ndarray) -> str | None:
    """The shape (of SHAPES and the diamond) whose mask, fitted to the foreground's bounding box,
    agrees best with the foreground (intersection over union)."""
    box = bounding_box(frame)
    if box is None:
        return None
    mask = foreground(frame)
    scores = {}
    for shape in SHAPES + (NEEDLE_SHAPE,):
        template = shape_mask(shape, *box, size=frame.shape[0])
        scores[shape] = (mask & template).sum() / max(1, (mask | template).sum())
    return max(scores, key=scores.get)


def classify_position(frame: np.ndarray) -> str | None:
    """The named position nearest to the foreground's bounding-box centre."""
    box = bounding_box(frame)
    if box is None:
        return None
    scale = SIZE / frame.shape[0]  # a frame read at another resolution
    return min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], (box[0] * scale, box[1] * scale)))


def classify_frame(frame: np.ndarray) -> Scene | None:
    """The scene the pixel classifier sees in one frame (None when the frame is empty)."""
    colour = dominant_colour(frame)
    if colour is None:
        return None
    return Scene(classify_shape(frame), colour, classify_position(frame))


def motion_direction(frames: np.ndarray) -> str | None:
    """The direction the foreground's centroid moves from the first to the last frame."""
    start, end = centroid(frames[0]), centroid(frames[-1])
    if start is None or end is None:
        return None
    dx, dy = end[0] - start[0], end[1] - start[1]
    if max(abs(dx), abs(dy)) < 2.0:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
