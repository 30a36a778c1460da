"""Reading images and videos as VQGAN-ready frames, and writing frames back out.

Preprocessing is LWM's vision chat's, so the codes match what the released models saw:
pick at most `max_n_frames` frames uniformly (`np.linspace(0, n - 1, k).astype(int)`), resize
each so its short side is `size` (PIL, bicubic), center-crop to size x size, scale to [-1, 1].

    from lwm.vision_io import read_vision, write_video
    frames = read_vision("clip.mp4", max_n_frames=8)   # float32 [8, 256, 256, 3] in [-1, 1]
    write_video("out.mp4", frames, fps=4)              # atomic: temp file, then rename

Videos are read with decord when it is installed and reads the file, otherwise with imageio's
ffmpeg plugin (decord 0.6 mis-sizes frames at some widths, e.g. 48 px; that raises and falls
back). Files that neither can read raise VisionReadError naming the file.

Paths may be bucket URLs (`gs://bucket/clip.mp4`, through `lwm.storage`): a file read from one
is copied to a local temp file first (decord, ffmpeg and PIL open local files), and a file
written to one is encoded locally, then uploaded as one object.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from fractions import Fraction
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from lwm import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_BACKENDS = ("auto", "decord", "imageio")


class VisionReadError(ValueError):
    """A file that could not be read as an image or a video; the message names the file."""


def is_image_path(path: str) -> bool:
    """True for still-image suffixes (case-insensitive); anything else is read as a video."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def frame_indices(n_frames: int, max_n_frames: int) -> list[int]:
    """All frames when n_frames <= max_n_frames (or max_n_frames <= 0), else max_n_frames picked
    uniformly, first and last included: frame_indices(10, 4) == [0, 3, 6, 9]."""
    if n_frames <= 0:
        raise ValueError(f"a video needs at least one frame, got n_frames={n_frames}")
    if max_n_frames <= 0 or n_frames <= max_n_frames:
        return list(range(n_frames))
    return np.linspace(0, n_frames - 1, max_n_frames).astype(int).tolist()


# ----------------------------------------------------------------------------- preprocessing


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] uint8 -> [H, W, 3] uint8."""
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an [H, W, C] frame with C in (1, 3, 4), got shape {frame.shape}")
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    return np.ascontiguousarray(frame[:, :, :3])


def preprocess_frame(frame: np.ndarray | Image.Image, size: int = 256) -> np.ndarray:
    """One RGB frame -> float32 [size, size, 3] in [-1, 1]: short side resized to `size`
    (bicubic; the long side is int(size * long / short)), then the center size x size crop.

    Example: a 640x480 (w x h) frame becomes 341x256, then columns 42..297 are kept
    (the crop offset (341 - 256) / 2 = 42.5 rounds half to even, as PIL's crop box does).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(_to_rgb(np.asarray(frame, np.uint8)))
    image = image.convert("RGB")
    width, height = image.size
    if width < height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = round((new_width - size) / 2), round((new_height - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Frames in [-1, 1] (float) -> uint8 in [0, 255], rounded; uint8 input passes through."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        return pixels
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [-1, 1], got dtype {pixels.dtype}")
    return np.clip(np.rint((pixels.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- reading


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 [1, H, W, 3] (RGB)."""
    _check_exists(path)
    with storage.local_copy(path) as local:
        try:
            with Image.open(local) as image:
                return np.asarray(image.convert("RGB"))[None]
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise VisionReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _read_video_decord(path: str, max_n_frames: int, name: str) -> np.ndarray:
    import decord  # optional dependency: only x86-64 Linux wheels exist

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    _check_not_empty(name, len(reader))
    indices = frame_indices(len(reader), max_n_frames)
    frames = reader.get_batch(indices).asnumpy()  # [k, H, W, 3] uint8
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise RuntimeError(f"decord returned frames of shape {frames.shape} for {len(indices)} RGB frames")
    return frames


def _read_video_imageio(path: str, max_n_frames: int, name: str) -> np.ndarray:
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as reader:
        n_frames = reader.count_frames()
    _check_not_empty(name, n_frames)
    keep = frame_indices(n_frames, max_n_frames)
    wanted = set(keep)
    frames = {}
    with imageio.get_reader(path, format="FFMPEG") as reader:
        for index, frame in enumerate(reader):
            if index in wanted:
                frames[index] = _to_rgb(np.asarray(frame, np.uint8))
            if index >= keep[-1]:
                break
    missing = [i for i in keep if i not in frames]
    if missing:
        raise RuntimeError(f"the decoder stopped before frames {missing} of the {n_frames} it counted")
    return np.stack([frames[i] for i in keep])


def read_video(path: str, max_n_frames: int = 8, backend: str = "auto") -> np.ndarray:
    """A video file -> uint8 [k, H, W, 3], k = min(n_frames, max_n_frames) frames picked uniformly
    (all frames when max_n_frames <= 0). backend: 'auto' (decord, else imageio), 'decord', 'imageio'."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend must be one of {VIDEO_BACKENDS}, got {backend!r}")
    _check_exists(path)
    if backend == "auto":
        try:
            import decord  # noqa: F401
            backends = [_read_video_decord, _read_video_imageio]
        except ImportError:
            backends = [_read_video_imageio]
    else:
        backends = [_read_video_decord if backend == "decord" else _read_video_imageio]
    errors = []
    with storage.local_copy(path) as local:
        for read in backends:
            try:
                return read(local, max_n_frames, path)
            except (ImportError, VisionReadError):
                raise
            except Exception as e:  # noqa: BLE001 (decord and ffmpeg raise many types on bad files)
                first_line = (str(e).strip().splitlines() or [""])[0]
                errors.append(f"{read.__name__.removeprefix('_read_video_')}: {type(e).__name__}: {first_line}")
    raise VisionReadError(f"{path}: not a readable video ({'; '.join(errors)})")


def read_frames(path: str, max_n_frames: int = 8, backend: str = "auto") -> np.ndarray:
    """Image or video -> uint8 [k, H, W, 3] (an image is one frame)."""
    return read_image(path) if is_image_path(path) else read_video(path, max_n_frames, backend)


def read_vision(path: str, max_n_frames: int = 8, size: int = 256, backend: str = "auto") -> np.ndarray:
    """Image or video -> float32 [k, size, size, 3] in [-1, 1], ready for VQGAN.encode."""
    frames = read_frames(path, max_n_frames, backend)
    return np.stack([preprocess_frame(frame, size) for frame in frames])


def _check_not_empty(path: str, n_frames: int) -> None:
    if n_frames <= 0:
        raise VisionReadError(f"{path}: the video has zero frames")


def _check_exists(path: str) -> None:
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _staged(path: str):
    """A temp file path for a writer to fill; on success it becomes `path` (a local rename, or one
    upload to a bucket), on an error it is removed and `path` is left as it was."""
    if storage.is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix="lwm-", suffix=os.path.splitext(storage.basename(path))[1])
        os.close(fd)
    else:
        tmp = _atomic_temp(path)
    try:
        yield tmp
        if storage.is_remote(path):
            with open(tmp, "rb") as f:
                storage.write_bytes(path, f.read())
        else:
            _commit(tmp, path)
    finally:
        _remove_quietly(tmp)


def _atomic_temp(path: str) -> str:
    """A fresh temp file next to `path`, keeping its suffix (writers pick formats by suffix)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=os.path.splitext(base)[1], dir=directory)
    os.close(fd)
    return tmp


def _commit(tmp: str, path: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files; give the usual umask'd mode
    os.replace(tmp, path)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_image(path: str, frame: np.ndarray) -> None:
    """Write one frame ([H, W, 3] or [H, W], uint8 or float in [-1, 1]) as PNG or JPEG (by suffix)."""
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in formats:
        raise ValueError(f"{path}: image suffix must be one of {sorted(formats)}, got {suffix!r}")
    frame = to_uint8(frame)
    if frame.ndim == 4 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[-1] not in (1, 3)):
        raise ValueError(f"{path}: expected one [H, W, 3] or [H, W] frame, got shape {frame.shape}")
    image = Image.fromarray(frame[:, :, 0] if frame.ndim == 3 and frame.shape[-1] == 1 else frame)
    with _staged(path) as tmp:
        image.save(tmp, format=formats[suffix], **({"quality": 95} if formats[suffix] == "JPEG" else {}))


def write_video(path: str, frames: np.ndarray | Sequence[np.ndarray], fps: float = 4) -> None:
    """Write frames ([T, H, W, 3], uint8 or float in [-1, 1]) as an H.264 mp4 at `fps`."""
    if os.path.splitext(path)[1].lower() != ".mp4":
        raise ValueError(f"{path}: videos are written as .mp4")
    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: expected frames [T>0, H, W, 3], got shape {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{path}: H.264 (yuv420p) needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    with _staged(path) as tmp:
        _encode_h264(tmp, frames, fps, name=path)


def _encode_h264(path: str, frames: np.ndarray, fps: float, name: str) -> None:
    """Pipe uint8 frames [T, H, W, 3] through the ffmpeg binary imageio-ffmpeg ships into `path`
    (errors say `name`).

    This is the command imageio's FFMPEG writer runs, started differently: imageio-ffmpeg passes
    preexec_fn=os.setpgrp (so a Ctrl-C reaches Python, not ffmpeg), and with a preexec_fn
    CPython must fork() the whole process and run Python code in the child before exec. In a
    process where JAX has started its threads that child can deadlock on a lock some other
    thread held (JAX's at-fork hook warns "os.fork() was called"). start_new_session=True
    detaches ffmpeg from the terminal's Ctrl-C just as well (setsid instead of setpgrp), done in
    C, so CPython spawns with vfork + exec and no Python code runs in the child.
    """
    from imageio_ffmpeg import get_ffmpeg_exe

    _, height, width, _ = frames.shape
    rate = Fraction(fps).limit_denominator()  # 30000/1001 stays exact
    cmd = [get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
           "-pix_fmt", "rgb24", "-r", str(rate), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           "-v", "error", path]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames, np.uint8).tobytes(), capture_output=True,
                          start_new_session=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{name}: ffmpeg failed writing the video (exit status {proc.returncode}): {err}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
