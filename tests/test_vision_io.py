"""lwm.vision_io: LWM's frame sampling and preprocessing, image/video reading with both video
backends (and the fallback between them), clear errors, atomic writers."""
import os
import sys
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from lwm.vision_io import (VisionReadError, frame_indices, preprocess_frame, read_frames, read_image, read_video,
                           read_vision, to_uint8, write_image, write_video)

# imageio's ffmpeg reader (the 'imageio' backend) starts ffmpeg with a preexec_fn, so subprocess
# fork()s this process and JAX's at-fork hook warns once jax is imported. lwm's write_video does
# not fork (test_write_video_never_forks_the_jax_process records warnings itself).
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def brightness_video(path, n_frames=12, height=48, width=64):
    """Frame i is a flat grey of level 20 + 15 i: after lossy coding, still identifiable by its mean."""
    frames = np.stack([np.full((height, width, 3), 20 + 15 * i, np.uint8) for i in range(n_frames)])
    write_video(str(path), frames, fps=4)
    return frames


def levels(frames):
    """Which source frame each decoded frame is, from its mean grey level."""
    return [int(round((float(f.mean()) - 20) / 15)) for f in frames]


# ----------------------------------------------------------------------------- sampling and preprocessing


def test_frame_indices():
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]  # linspace 0, 14.14, ..., 99 truncated
    assert frame_indices(5, 8) == [0, 1, 2, 3, 4]  # short videos keep every frame
    assert frame_indices(8, 8) == list(range(8))
    assert frame_indices(20, 0) == list(range(20))  # max_n_frames <= 0: no limit
    with pytest.raises(ValueError, match="at least one frame"):
        frame_indices(0, 8)


def test_preprocess_frame_resizes_short_side_and_center_crops():
    rng = np.random.default_rng(0)
    # landscape 44 x 20 (w x h), size 16: resized to int(16 * 44 / 20) = 35 x 16; the crop starts
    # at (35 - 16) / 2 = 9.5, which LWM's PIL crop box rounds half to even: column 10.
    frame = rng.integers(0, 256, (20, 44, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(frame).resize((35, 16), Image.Resampling.BICUBIC), np.float64)
    expected = resized[:, 10:26] / 127.5 - 1
    got = preprocess_frame(frame, 16)
    assert got.dtype == np.float32 and got.shape == (16, 16, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # ... exactly what LWM's float crop box gives
    lwm_crop = Image.fromarray(frame).resize((35, 16), Image.Resampling.BICUBIC).crop((9.5, 0, 25.5, 16))
    np.testing.assert_allclose(got, np.asarray(lwm_crop, np.float64) / 127.5 - 1, rtol=0, atol=1e-6)
    # portrait 20 x 50 (w x h), size 16: resized to 16 x 40, rows 12..27 kept
    frame = rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(frame).resize((16, 40), Image.Resampling.BICUBIC), np.float64)
    np.testing.assert_allclose(preprocess_frame(frame, 16), resized[12:28] / 127.5 - 1, rtol=0, atol=1e-6)
    # already size x size: untouched, and the scale maps 0 -> -1, 255 -> 1 exactly
    frame = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    frame[0, 0], frame[0, 1] = 0, 255
    got = preprocess_frame(frame, 16)
    np.testing.assert_allclose(got, frame / 127.5 - 1, rtol=0, atol=1e-6)
    assert got[0, 0, 0] == -1.0 and got[0, 1, 0] == 1.0
    # grey and RGBA frames become RGB
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    np.testing.assert_allclose(preprocess_frame(grey, 16), np.repeat(grey[:, :, None], 3, -1) / 127.5 - 1, atol=1e-6)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    np.testing.assert_allclose(preprocess_frame(rgba, 16), rgba[:, :, :3] / 127.5 - 1, atol=1e-6)


def test_to_uint8():
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.7, -3.0])),
                                  [0, 64, 128, 191, 255, 255, 0])  # (x + 1) * 127.5, rounded, clipped
    with pytest.raises(ValueError, match="uint8 or float"):
        to_uint8(np.array([1, 2], np.int64))


# ----------------------------------------------------------------------------- images


def test_read_image_png_exact_jpg_close_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    write_image(str(tmp_path / "a.png"), frame)
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), frame[None])
    # flat grey 8x8 blocks on JPEG's block grid: no chroma, no block-edge ringing to speak of
    grey = np.repeat(np.repeat(rng.integers(0, 256, (3, 5), dtype=np.uint8), 8, 0), 8, 1)
    smooth = np.repeat(grey[:, :, None], 3, axis=2)
    write_image(str(tmp_path / "b.JPG"), smooth)
    got = read_frames(str(tmp_path / "b.JPG"))  # upper-case suffix is an image too
    assert got.shape == (1, 24, 40, 3) and np.abs(got[0].astype(int) - smooth).mean() < 2
    # float frames in [-1, 1] are written as their rounded uint8 values
    write_image(str(tmp_path / "c.png"), frame / 127.5 - 1)
    np.testing.assert_array_equal(read_image(str(tmp_path / "c.png"))[0], frame)
    # read_vision on an image: one preprocessed frame
    vision = read_vision(str(tmp_path / "a.png"), size=16)
    np.testing.assert_allclose(vision[0], preprocess_frame(frame, 16), atol=0)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(VisionReadError, match="broken.png: not a readable image"):
        read_image(str(tmp_path / "broken.png"))
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such file"):
        read_frames(str(tmp_path / "missing.jpg"))


def test_write_image_is_atomic_and_checks_its_input(tmp_path):
    frame = np.zeros((8, 8, 3), np.uint8)
    write_image(str(tmp_path / "x.png"), frame)
    write_image(str(tmp_path / "x.png"), frame + 7)  # replaces the old file
    np.testing.assert_array_equal(read_image(str(tmp_path / "x.png"))[0], frame + 7)
    with pytest.raises(ValueError, match=r"y.gif: image suffix must be one of \['.jpeg', '.jpg', '.png'\]"):
        write_image(str(tmp_path / "y.gif"), frame)
    with pytest.raises(ValueError, match=r"z.png: expected one \[H, W, 3\] or \[H, W\] frame, got shape \(2, 8, 8, 3\)"):
        write_image(str(tmp_path / "z.png"), np.zeros((2, 8, 8, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["x.png"]  # no partial or temp files


# ----------------------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "levels.mp4"
    brightness_video(path)
    return str(path)


@pytest.mark.parametrize("backend", ["decord", "imageio"])
def test_read_video_samples_uniformly(video_path, backend):
    frames = read_video(video_path, max_n_frames=4, backend=backend)
    assert frames.dtype == np.uint8 and frames.shape == (4, 48, 64, 3)
    assert levels(frames) == [0, 3, 7, 11]  # linspace(0, 11, 4) = 0, 3.67, 7.33, 11
    for f, level in zip(frames, [0, 3, 7, 11]):
        assert np.abs(f.astype(int) - (20 + 15 * level)).max() <= 3  # flat grey survives H.264 closely
    everything = read_video(video_path, max_n_frames=0, backend=backend)
    assert levels(everything) == list(range(12))


def test_backends_agree_and_fallbacks(video_path, tmp_path, monkeypatch):
    by_decord = read_video(video_path, 6, backend="decord")
    by_imageio = read_video(video_path, 6, backend="imageio")
    assert levels(by_decord) == levels(by_imageio) == [0, 2, 4, 6, 8, 11]
    assert np.abs(by_decord.astype(int) - by_imageio.astype(int)).max() <= 2  # two decoders, same stream
    # decord 0.6 mis-sizes 48-pixel-wide frames: 'auto' notices and reads them with imageio
    narrow = tmp_path / "narrow.mp4"
    brightness_video(narrow, n_frames=5, height=32, width=48)
    frames = read_video(str(narrow), 8)
    assert frames.shape == (5, 32, 48, 3) and levels(frames) == [0, 1, 2, 3, 4]
    # without decord installed, 'auto' uses imageio
    monkeypatch.setitem(sys.modules, "decord", None)
    np.testing.assert_array_equal(read_video(video_path, 6), by_imageio)
    with pytest.raises(ImportError):
        read_video(video_path, 6, backend="decord")


def test_video_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(VisionReadError, match=r"garbage.mp4: not a readable video \(decord: .*; imageio: .*\)"):
        read_video(str(bad))
    with pytest.raises(FileNotFoundError, match="nothing.mp4: no such file"):
        read_vision(str(tmp_path / "nothing.mp4"))

    class EmptyReader:  # a container whose video stream has no frames
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return 0

    import decord
    monkeypatch.setattr(decord, "VideoReader", EmptyReader)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VisionReadError, match="empty.mp4: the video has zero frames"):
        read_video(str(tmp_path / "empty.mp4"))


def test_read_vision_video_and_write_video_checks(video_path, tmp_path):
    vision = read_vision(video_path, max_n_frames=3, size=32)
    assert vision.dtype == np.float32 and vision.shape == (3, 32, 32, 3)
    assert vision.min() >= -1 and vision.max() <= 1
    np.testing.assert_allclose(vision, np.stack([preprocess_frame(f, 32) for f in read_video(video_path, 3)]), atol=0)
    # float frames are accepted; the file only appears once complete
    out = tmp_path / "f.mp4"
    write_video(str(out), np.zeros((3, 16, 16, 3), np.float32), fps=2)
    assert read_video(str(out), 0).shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="needs even height and width, got 15x16"):
        write_video(str(tmp_path / "odd.mp4"), np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="written as .mp4"):
        write_video(str(tmp_path / "v.avi"), np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expected frames \[T>0, H, W, 3\], got shape \(0, 16, 16, 3\)"):
        write_video(str(tmp_path / "empty.mp4"), np.zeros((0, 16, 16, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["f.mp4"]


def test_write_video_never_forks_the_jax_process(tmp_path, monkeypatch):
    """ffmpeg starts without os.fork() of this multithreaded JAX process (JAX's at-fork hook
    would warn); the video reads back; a failing ffmpeg is an error that leaves no file."""
    jax.numpy.zeros(2).block_until_ready()  # the backend is up, and with it JAX's at-fork warning
    frames = np.stack([np.full((16, 24, 3), 20 + 40 * i, np.uint8) for i in range(5)])
    out = tmp_path / "clip.mp4"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_video(str(out), frames, fps=4)
    assert [str(w.message) for w in caught if "fork" in str(w.message)] == []
    back = read_video(str(out), 0)
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames.astype(int)).max() <= 3
    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")  # exits 1
    with pytest.raises(RuntimeError, match=r"bad.mp4: ffmpeg failed writing the video \(exit status 1\)"):
        write_video(str(tmp_path / "bad.mp4"), frames)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]
