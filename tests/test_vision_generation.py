"""lwm.vision_generation: prompt rows and CFG pairing by hand, forced end-of-frame markers,
greedy image and video tokens equal to the argmax of uncond + s * (cond - uncond) from one full
forward of both rows, frame decoding, and the entry point writing a PNG and an mp4."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from lwm.vision_generation import (IMAGE_PROMPT, VIDEO_PROMPT, VisionGenerator, cfg_prompts, check_output,
                                   forced_markers, prompt_batch)
from lwm.vision_io import to_uint8
from lwm.vision_llama import VideoLLaMAForCausalLM
from lwm.vqgan import VQGAN, VQGANConfig, VQGANModel
from tests.test_vision_chat import ROOT, TINY_VQGAN, model_json, tiny_loaded, write_tiny_vqgan
from lwm.mesh import cpu_xla_flags

# encode('<s>You are a helpful assistant. USER: Generate an image of a red fox ASSISTANT: <vision>'):
# <s> <s> ▁You ▁are ▁a ▁helpful ▁assistant . ▁US ER : ▁Generate ▁an ▁image ▁of ▁a ▁red ▁f ox ▁ASS IST ANT : ▁< vision >
IMAGE_FOX = [1, 1, 995, 460, 264, 10865, 13892, 28723, 2223, 725, 28747, 26075, 396, 3469, 302, 264, 2760, 285, 1142,
             8602, 8048, 12738, 28747, 523, 9824, 28767]
VIDEO_FOX = IMAGE_FOX[:12] + [264, 3798] + IMAGE_FOX[14:]  # '▁an ▁image' -> '▁a ▁video'
UNCONDITIONAL = [1, 1, 523, 9824, 28767]  # encode('<s><vision>')
PAD = 2  # the tokenizer pads with eos (masked out)


def test_output_kinds():
    assert check_output("out/fox.png", 1) == "image" and check_output("fox.JPG", 1) == "image"
    assert check_output("fox.mp4", 8) == "video"
    with pytest.raises(ValueError, match="fox.png is an image, so --n_frames must be 1, got 4"):
        check_output("fox.png", 4)
    with pytest.raises(ValueError, match="fox.mp4 is a video, so --n_frames must be > 1, got 1"):
        check_output("fox.mp4", 1)
    with pytest.raises(ValueError, match="unsupported suffix '.gif'"):
        check_output("fox.gif", 1)
    with pytest.raises(ValueError, match="--output_file is required"):
        check_output("", 1)


def test_prompt_rows_and_cfg_pairing_by_hand(tokenizer):
    ids, mask = prompt_batch(tokenizer, cfg_prompts(["a red fox"], IMAGE_PROMPT, 5.0))
    assert ids.shape == mask.shape == (2, 128)
    np.testing.assert_array_equal(ids[0], [PAD] * (128 - 26) + IMAGE_FOX)  # conditional row first
    np.testing.assert_array_equal(ids[1], [PAD] * (128 - 5) + UNCONDITIONAL)  # then the unconditional one
    np.testing.assert_array_equal(mask[0], [0] * 102 + [1] * 26)
    np.testing.assert_array_equal(mask[1], [0] * 123 + [1] * 5)
    ids, _ = prompt_batch(tokenizer, cfg_prompts(["a red fox", "a cat"], VIDEO_PROMPT, 2.0))
    assert ids.shape == (4, 128)
    np.testing.assert_array_equal(ids[0, -26:], VIDEO_FOX)
    np.testing.assert_array_equal(ids[2:, -5:], [UNCONDITIONAL] * 2)
    # cfg_scale 1: uncond + 1 * (cond - uncond) is cond, so only the conditional rows run.
    ids, _ = prompt_batch(tokenizer, cfg_prompts(["a red fox"], IMAGE_PROMPT, 1.0))
    np.testing.assert_array_equal(ids, [[PAD] * 102 + IMAGE_FOX])
    # Too long: the text is cut from the left, BOS stays first.
    long_text = IMAGE_PROMPT.format(prompt="a red fox " * 60)
    ids, mask = prompt_batch(tokenizer, [long_text])
    text_ids = tokenizer.encode(long_text)  # no BOS of its own ('<s>' inside the text is still id 1)
    assert len(text_ids) > 200 and mask.sum() == 128
    np.testing.assert_array_equal(ids[0], [1] + text_ids[-127:])


def test_forced_markers():
    forced = forced_markers(3 * 257, 257)
    assert forced.shape == (771,) and forced.dtype == np.int32
    assert np.flatnonzero(forced != -1).tolist() == [256, 513, 770]
    assert set(forced[[256, 513, 770]].tolist()) == {8192}


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision_generation")
    path, config_path, params = write_tiny_vqgan(str(folder))
    gen = VisionGenerator(tiny_loaded(seed=3), VQGAN(params, VQGANConfig(**TINY_VQGAN)))
    return dict(gen=gen, vqgan_params=params, vqgan_path=path, vqgan_config=config_path, folder=folder)


def check_guided_argmax(loaded, prompt_rows, prompt_masks, prefix, sampled, first_vision: int, scale: float,
                        codebook: int):
    """Each sampled token is the argmax of uncond + scale * (cond - uncond) of the vision head, from one
    full forward of [cond; uncond] rows over prompt + prefix + sampled[:-1] (vision from column
    `first_vision` on). Positions whose top two are closer than 1e-4 (a tie up to rounding) are skipped."""
    tokens = np.concatenate([prefix, sampled[:, :-1]], axis=1)  # [1, n] shared by both rows
    ids = np.concatenate([prompt_rows, np.repeat(tokens, 2, axis=0)], axis=1)
    mask = np.concatenate([prompt_masks, np.ones((2, tokens.shape[1]), np.int32)], axis=1)
    vision = np.zeros(ids.shape, bool)
    vision[:, first_vision:] = True
    dense = VideoLLaMAForCausalLM(loaded.config.replace(  # chunk 1: any length (dense ignores chunks)
        attention_impl="dense", scan_mlp=False, scan_query_chunk_size=1, scan_key_chunk_size=1))
    logits = np.asarray(dense.apply({"params": loaded.params}, ids, vision_masks=vision, attention_mask=mask,
                                    sample_mode="vision").vision_logits, np.float64)
    start = prompt_rows.shape[1] + prefix.shape[1] - 1  # the logits there predict sampled[:, 0]
    cond, uncond = logits[0, start:], logits[1, start:]  # [n_sampled, vision_vocab]
    mixed = (uncond + scale * (cond - uncond))[:, :codebook]  # only codebook ids are sampled
    top2 = np.sort(mixed, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    clear[256::257] = False  # forced markers
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.argmax(mixed, axis=-1)[clear], sampled[0][clear])


def test_greedy_image_and_video_follow_the_guided_logits(generator, tokenizer):
    gen = generator["gen"]
    first = gen.first_frames(["a red fox"], jax.random.key(0), temperature=0.0, cfg_scale=3.0)
    assert first.shape == (1, 257) and first[0, 256] == 8192 and (first[0, :256] != 8192).sum() > 200
    ids, mask = prompt_batch(tokenizer, cfg_prompts(["a red fox"], IMAGE_PROMPT, 3.0))
    codebook = gen.vqgan.config.num_embeddings
    check_guided_argmax(gen.loaded, ids, mask, np.zeros((1, 0), np.int32), first, 128, 3.0, codebook)

    video = gen.continue_video(["a red fox"], first, 2, jax.random.key(1), temperature=0.0, cfg_scale=2.0)
    assert video.shape == (1, 514)
    np.testing.assert_array_equal(video[:, :257], first)
    assert video[0, 513] == 8192
    ids, mask = prompt_batch(tokenizer, cfg_prompts(["a red fox"], VIDEO_PROMPT, 2.0))
    check_guided_argmax(gen.loaded, ids, mask, first, video[:, 257:], 128, 2.0, codebook)


def test_decode_drops_markers_and_rejects_stray_codes(generator):
    gen = generator["gen"]
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8192, (2, 256))
    tokens = np.concatenate([codes[0], [8192], codes[1], [8192]])[None]  # [1, 514]
    frames = gen.decode(tokens)
    model = VQGANModel(VQGANConfig(**TINY_VQGAN))
    expected = model.apply({"params": generator["vqgan_params"]}, codes.reshape(2, 16, 16), method=VQGANModel.decode)
    assert frames.shape == (1, 2, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[0], to_uint8(np.asarray(expected)))
    stray = tokens.copy()
    stray[0, 5] = 8300  # a spare vision id inside a frame: sampling never produces one (vocab_limit)
    with pytest.raises(ValueError, match=r"outside the VQGAN codebook \[0, 8192\)"):
        gen.decode(stray)


def run_entry_point(generator, tmp_path, output_file, n_frames):
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(1), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "lwm.vision_generation", "--prompt=a red fox", f"--output_file={output_file}",
           f"--n_frames={n_frames}", "--cfg_scale_image=3.0", "--top_k_video=50",
           f"--vqgan_checkpoint={generator['vqgan_path']}", f"--vqgan_config={generator['vqgan_config']}",
           f"--load_llama_config=json::{model_json(tmp_path)}", "--tokenizer=builtin", "--mesh_dim=1,1,1,1",
           "--update_llama_config=dict(sample_mode='vision',scan_query_chunk_size=64,scan_key_chunk_size=64)"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_list_mode_writes_each_prompts_image_or_video_and_resumes(generator, tmp_path):
    """--prompts_file: an image and a video from one run, listed in generated.jsonl (a rerun skips
    listed ids through lwm.jobs.ResultWriter, tested with vision_chat's list mode)."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "fox", "prompt": "a red fox"}) + "\n" +
                       json.dumps({"id": "clip", "prompt": "a fox running", "n_frames": 3}) + "\n")
    out = tmp_path / "generated"
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(1), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "lwm.vision_generation", f"--prompts_file={prompts}", f"--output_dir={out}",
           "--cfg_scale_image=3.0", f"--vqgan_checkpoint={generator['vqgan_path']}",
           f"--vqgan_config={generator['vqgan_config']}", f"--load_llama_config=json::{model_json(tmp_path)}",
           "--tokenizer=builtin", "--mesh_dim=1,1,1,1",
           "--update_llama_config=dict(sample_mode='vision',scan_query_chunk_size=64,scan_key_chunk_size=64)"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated: " in result.stdout and "(2 prompts, 2 generated now)" in result.stdout
    assert sorted(os.listdir(out)) == ["clip.mp4", "fox.png", "generated.jsonl"]
    listed = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert {x["id"]: x["output_file"] for x in listed} == {"fox": "fox.png", "clip": "clip.mp4"}
    with Image.open(out / "fox.png") as image:
        assert image.size == (32, 32)
    import decord

    reader = decord.VideoReader(str(out / "clip.mp4"), ctx=decord.cpu(0))
    assert len(reader) == 3 and reader[0].shape == (32, 32, 3) and abs(reader.get_avg_fps() - 4) < 1e-6


@pytest.mark.parametrize("name, n_frames", [("fox.png", 1)])
def test_entry_point_writes_image_and_video(generator, tmp_path, name, n_frames):
    output = tmp_path / "out" / name
    result = run_entry_point(generator, tmp_path, str(output), n_frames)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output} ({n_frames} frame" in result.stdout
    assert sorted(os.listdir(output.parent)) == [name]  # no temp file left behind
    assert "os.fork() was called" not in result.stderr  # ffmpeg starts without forking the JAX process
    if n_frames == 1:
        with Image.open(output) as image:
            assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    else:
        import decord

        reader = decord.VideoReader(str(output), ctx=decord.cpu(0))
        assert len(reader) == 3 and reader[0].shape == (32, 32, 3)
        assert abs(reader.get_avg_fps() - 4) < 1e-6


@pytest.mark.parametrize("script, output, n_frames, top_k_video, cfg_scale_image", [
    ("run_sample_image.sh", "fireworks.png", 1, 100, 5.0),
    ("run_sample_video.sh", "fireworks.mp4", 8, 1000, 5.0),
])
def test_sample_scripts_flags_parse(tmp_path, script, output, n_frames, top_k_video, cfg_scale_image):
    from lwm import vision_generation
    from lwm.config import VideoLLaMAConfig, build_config
    from lwm.flags import parse_flags_for_test, tokenizer_spec
    from tests.helpers import run_script_with_fake_python

    args = run_script_with_fake_python(tmp_path, script, vqgan_checkpoint="/m/vqgan.pkl", lwm_checkpoint="/m/params",
                                       llama_tokenizer_path="/m/tok")
    assert args[:3] == ["-u", "-m", "lwm.vision_generation"]
    parse_flags_for_test(args[3:])
    flags = vision_generation.FLAGS
    assert check_output(flags.output_file, flags.n_frames) == ("image" if n_frames == 1 else "video")
    assert (flags.output_file, flags.n_frames, flags.top_k_video, flags.cfg_scale_image) == (
        output, n_frames, top_k_video, cfg_scale_image)
    assert (flags.prompt, flags.top_k_image, flags.load_checkpoint) == ("Fireworks over the city", 8192,
                                                                        "params::/m/params")
    assert tokenizer_spec() == "/m/tok"
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config, None, flags.mesh_dim,
                          VideoLLaMAConfig)
    assert (config.sample_mode, config.theta, config.max_sequence_length) == ("vision", 5e7, 32768)
