"""lwm.vision_chat: LWM's vision-chat token stream built by hand for a video the test writes and
decord reads back, greedy answers equal to the full forward's argmax, clear errors, and the
real entry point end to end on a tiny random model with a tiny VQGAN."""
import dataclasses
import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from PIL import Image

from lwm.cli import guarded
from lwm.config import VideoLLaMAConfig
from lwm.flags import parse_flags_for_test
from lwm.loading import LoadedModel
from lwm.mesh import build_mesh, match_partition_rules, partition_rules
from lwm.tokenizer import load_tokenizer
from lwm.vision_chat import PromptTooLongError, VisionChat, decode_answer, main
from lwm.vision_io import VisionReadError, preprocess_frame
from lwm.vision_llama import VideoLLaMAForCausalLM
from lwm.vqgan import VQGAN, VQGANConfig, VQGANModel, save_vqgan_params
from tests.helpers import run_script_with_fake_python
from tests.test_vision_llama import host_random_params
from lwm.mesh import cpu_xla_flags

# imageio runs ffmpeg through subprocess (fork + immediate exec, which is safe); JAX's at-fork
# hook warns about any fork once jax is imported.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny VQGAN with LWM's 16 x 16 code grid (257 tokens per frame) and full 8192-code book.
TINY_VQGAN = dict(resolution=32, hidden_channels=32, channel_mult=[1, 2], z_channels=8, num_embeddings=8192,
                  quantized_embed_dim=8)
TINY_MODEL = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_sequence_length=2048, vision_vocab_size=8448, theta=5e7,
                  scan_query_chunk_size=64, scan_key_chunk_size=64, scan_mlp_chunk_size=64)
QUESTION = "What is happening in this video?"
# encode('<s>You are a helpful assistant. USER: What is happening in this video?\n'), piece by piece:
# <s> <s> ▁You ▁are ▁a ▁helpful ▁assistant . ▁US ER : ▁What ▁is ▁happening ▁in ▁this ▁video ? <0x0A>
QUESTION_IDS = [1, 1, 995, 460, 264, 10865, 13892, 28723, 2223, 725, 28747, 1824, 349, 9615, 297, 456, 3798, 28804, 13]
VISION_START_IDS = [1, 523, 9824, 28767]
VISION_END_IDS = [1, 1867, 9824, 28767]
ASSISTANT_IDS = [1, 28705, 8602, 8048, 12738, 28747]


def tiny_loaded(seed: int = 0, **overrides) -> LoadedModel:
    """A random tiny video-language model on one device, as load_model would return it."""
    tokenizer = load_tokenizer("builtin")
    config = VideoLLaMAConfig(**(TINY_MODEL | overrides), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    mesh = build_mesh("1,1,1,1", devices=jax.devices()[:1])
    params = host_random_params(config, seed)
    specs = match_partition_rules(partition_rules(config.scan_layers, config.param_scan_axis), params)
    return LoadedModel(config, VideoLLaMAForCausalLM(config, mesh=mesh), params, specs, mesh, tokenizer)


def write_tiny_vqgan(folder) -> tuple[str, str, dict]:
    params = VQGAN.init_params(VQGANConfig(**TINY_VQGAN), jax.random.key(1))
    path, config_path = os.path.join(folder, "vqgan.pkl"), os.path.join(folder, "vqgan.json")
    save_vqgan_params(path, params)
    with open(config_path, "w") as f:
        json.dump(TINY_VQGAN, f)
    return path, config_path, params


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and VQGAN, a 12-frame 56x40 video written with imageio, and a PNG."""
    folder = tmp_path_factory.mktemp("vision_chat")
    vqgan_path, vqgan_config, vqgan_params = write_tiny_vqgan(str(folder))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (12, 40, 56, 3)).astype(np.uint8)
    video = str(folder / "clip.mp4")
    with imageio.get_writer(video, format="FFMPEG", fps=4, codec="libx264", macro_block_size=8) as writer:
        for frame in frames:
            writer.append_data(frame)
    image = str(folder / "still.png")
    Image.fromarray(rng.integers(0, 256, (30, 44, 3)).astype(np.uint8)).save(image)
    vqgan = VQGAN(vqgan_params, VQGANConfig(**TINY_VQGAN))
    return dict(folder=folder, vqgan_path=vqgan_path, vqgan_config=vqgan_config, vqgan_params=vqgan_params,
                vqgan=vqgan, video=video, image=image, loaded=tiny_loaded())


def reference_codes(params, pixels):
    """VQGAN codes [n, 16, 16] straight from the flax module, no chunking or jit."""
    model = VQGANModel(VQGANConfig(**TINY_VQGAN))
    return np.asarray(model.apply({"params": params}, pixels, method=VQGANModel.encode)[1])


def test_video_input_is_the_section_11_stream(world):
    chat = VisionChat(world["loaded"], world["vqgan"], max_new_tokens=8)
    codes = chat.encode_vision(world["video"], max_n_frames=4)
    # Independently: decord reads frames linspace(0, 11, 4).astype(int) = [0, 3, 7, 11], each is
    # resized (short side 32 for this VQGAN), center-cropped, scaled, and coded.
    import decord

    raw = decord.VideoReader(world["video"], ctx=decord.cpu(0)).get_batch([0, 3, 7, 11]).asnumpy()
    assert raw.shape == (4, 40, 56, 3)
    expected_codes = reference_codes(world["vqgan_params"], np.stack([preprocess_frame(f, 32) for f in raw]))
    np.testing.assert_array_equal(codes, expected_codes)

    batch = chat.build_input(QUESTION, codes)
    vision = []
    for i in range(4):
        vision += expected_codes[i].ravel().tolist() + [8193 if i == 3 else 8192]
    stream = QUESTION_IDS + VISION_START_IDS + vision + VISION_END_IDS + ASSISTANT_IDS
    n = len(stream)
    assert n == 19 + 4 + 4 * 257 + 4 + 6 == 1061
    assert batch.input_ids.shape == (1, 1088)  # the next multiple of the block size 64
    pad = 1088 - n
    np.testing.assert_array_equal(batch.input_ids[0, pad:], stream)
    np.testing.assert_array_equal(batch.attention_mask[0], [0] * pad + [1] * n)
    np.testing.assert_array_equal(batch.vision_masks[0], [False] * (pad + 23) + [True] * 1028 + [False] * 10)
    assert batch.n_frames == 4


def test_image_input_is_one_frame_ending_in_8193(world):
    chat = VisionChat(world["loaded"], world["vqgan"], max_new_tokens=8)
    codes = chat.encode_vision(world["image"], max_n_frames=8)
    with Image.open(world["image"]) as image:
        expected = reference_codes(world["vqgan_params"], preprocess_frame(np.asarray(image), 32)[None])
    np.testing.assert_array_equal(codes, expected)
    batch = chat.build_input(QUESTION, codes)
    tail = expected[0].ravel().tolist() + [8193] + VISION_END_IDS + ASSISTANT_IDS
    np.testing.assert_array_equal(batch.input_ids[0, -len(tail):], tail)
    assert batch.input_ids.shape == (1, 320) and int(batch.attention_mask.sum()) == 19 + 4 + 257 + 4 + 6


def test_greedy_answer_is_the_full_forward_argmax(world):
    """Temperature 0: every answer token is the argmax of the text head of one full forward over
    prompt + answer (answer tokens are text: vision mask False), and answer() decodes them."""
    loaded = world["loaded"]
    chat = VisionChat(loaded, world["vqgan"], temperature=0.0, max_new_tokens=6)
    batch = chat.build_input(QUESTION, chat.encode_vision(world["image"], 8))
    tokens = chat.generate(batch, jax.random.key(0))
    assert len(tokens) == 6 and 2 not in tokens.tolist()  # a random model rarely says eos
    ids = np.concatenate([batch.input_ids, tokens[None, :-1]], axis=1)
    vision = np.concatenate([batch.vision_masks, np.zeros((1, 5), bool)], axis=1)
    mask = np.concatenate([batch.attention_mask, np.ones((1, 5), np.int32)], axis=1)
    dense = VideoLLaMAForCausalLM(loaded.config.replace(  # chunk 1: any length (dense ignores chunks)
        attention_impl="dense", scan_mlp=False, scan_query_chunk_size=1, scan_key_chunk_size=1))
    logits = dense.apply({"params": loaded.params}, ids, vision_masks=vision, attention_mask=mask,
                         sample_mode="text").logits[0, batch.input_ids.shape[1] - 1:]  # [6, vocab]
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), tokens)
    assert chat.answer(QUESTION, world["image"], 8) == decode_answer(loaded.tokenizer, tokens)
    assert decode_answer(loaded.tokenizer, [1, 2]) == ""  # up to the first eos only


def test_errors_name_the_problem(world, tmp_path, monkeypatch):
    chat = VisionChat(world["loaded"], world["vqgan"], max_new_tokens=8)
    with pytest.raises(FileNotFoundError, match="nothing.mp4: no such file"):
        chat.answer(QUESTION, str(tmp_path / "nothing.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(VisionReadError, match="garbage.mp4: not a readable video"):
        chat.answer(QUESTION, str(garbage))
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"not a png")
    with pytest.raises(VisionReadError, match="broken.png: not a readable image"):
        chat.answer(QUESTION, str(broken_png))

    short = dataclasses.replace(world["loaded"], config=world["loaded"].config.replace(max_sequence_length=1024))
    codes = np.zeros((4, 16, 16), np.int32)
    with pytest.raises(PromptTooLongError, match=r"the prompt \(4 frames x 257 vision tokens .*\) is 1061 tokens, "
                                                  r"padded to 1088 .* needs 1096 positions, more than "
                                                  r"max_sequence_length=1024. To fit: .*fewer frames \(--max_n_frames\)"):
        VisionChat(short, world["vqgan"], max_new_tokens=8).build_input(QUESTION, codes)

    class EmptyReader:  # a container whose video stream has no frames
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return 0

    import decord

    monkeypatch.setattr(decord, "VideoReader", EmptyReader)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VisionReadError, match="empty.mp4: the video has zero frames"):
        chat.answer(QUESTION, str(empty))
    # The entry point (its main as `lwm.cli.run` runs it) turns it into one line and exit status 1.
    parse_flags_for_test([f"--prompt={QUESTION}", f"--input_file={empty}", f"--vqgan_checkpoint={world['vqgan_path']}",
                          f"--vqgan_config={world['vqgan_config']}", f"--load_llama_config=json::{model_json(tmp_path)}",
                          "--tokenizer=builtin", "--max_new_tokens=4"])
    with pytest.raises(SystemExit, match="^lwm.vision_chat: .*empty.mp4: the video has zero frames$"):
        guarded(main, "lwm.vision_chat")(["vision_chat"])


def test_a_vqgan_of_another_config_is_one_line_that_names_vqgan_config(tmp_path):
    """The tiny VQGAN's pickle without --vqgan_config mismatches ~280 leaves of LWM's: one line."""
    vqgan_path, _, _ = write_tiny_vqgan(str(tmp_path))
    (tmp_path / "unused.png").write_bytes(b"")  # exists (checked first); never read
    parse_flags_for_test([f"--prompt={QUESTION}", f"--input_file={tmp_path / 'unused.png'}",
                          f"--vqgan_checkpoint={vqgan_path}", "--tokenizer=builtin"])
    with pytest.raises(SystemExit) as err:
        guarded(main, "lwm.vision_chat")(["vision_chat"])
    msg = str(err.value)
    assert msg.startswith(f"lwm.vision_chat: {vqgan_path}: VQGAN params do not match the config (") and "\n" not in msg
    assert "mis-shaped leaf decoder/" in msg and msg.endswith("pass --vqgan_config (a JSON file or string of "
                                                            "VQGANConfig fields)")


def model_json(folder) -> str:
    path = os.path.join(folder, "tiny_vision_model.json")
    with open(path, "w") as f:
        json.dump(TINY_MODEL, f)
    return path


def test_entry_point_answers_and_exits_0(world, tmp_path):
    """`python -m lwm.vision_chat` as a user runs it (one CPU device here, for speed)."""
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(1), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "lwm.vision_chat", f"--prompt={QUESTION}", f"--input_file={world['video']}",
           f"--vqgan_checkpoint={world['vqgan_path']}", f"--vqgan_config={world['vqgan_config']}",
           f"--load_llama_config=json::{model_json(tmp_path)}", "--tokenizer=builtin",
           # Chunk sizes are run-time settings: they come from the command line, not the config file.
           "--update_llama_config=dict(sample_mode='text',scan_query_chunk_size=64,scan_key_chunk_size=64)", "--max_n_frames=3", "--max_new_tokens=8", "--mesh_dim=1,1,1,1", "--seed=7"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"Question: {QUESTION}"
    assert lines[1].startswith("Answer: ") and len(lines[1]) > len("Answer: ")
    assert "3 frames, prompt 804 tokens (padded 832); generated 8 tokens" in result.stderr


def test_run_vision_chat_script_flags_parse(tmp_path):
    from lwm import vision_chat
    from lwm.config import build_config
    from lwm.flags import tokenizer_spec

    # Without the paths it stops with a message naming the variable.
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_vision_chat.sh")], capture_output=True,
                            text=True, env={k: v for k, v in os.environ.items() if k != "vqgan_checkpoint"})
    assert result.returncode != 0 and "set vqgan_checkpoint" in result.stderr
    args = run_script_with_fake_python(tmp_path, "run_vision_chat.sh", vqgan_checkpoint="/m/vqgan.pkl",
                                       lwm_checkpoint="/m/params", input_file="/m/clip.mp4",
                                       llama_tokenizer_path="/m/tokenizer.model")
    assert args[:3] == ["-u", "-m", "lwm.vision_chat"]
    parse_flags_for_test(args[3:])
    flags = vision_chat.FLAGS
    assert (flags.input_file, flags.vqgan_checkpoint, flags.load_checkpoint) == ("/m/clip.mp4", "/m/vqgan.pkl",
                                                                                 "params::/m/params")
    assert tokenizer_spec() == "/m/tokenizer.model" and flags.max_n_frames == 8 and flags.temperature == 0.2
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config, None, flags.mesh_dim,
                          VideoLLaMAConfig)
    assert (config.sample_mode, config.theta, config.max_sequence_length, config.hidden_size) == (
        "text", 5e7, 131072, 4096)
    assert (config.scan_query_chunk_size, config.scan_attention, config.vision_vocab_size) == (128, False, 8448)


def test_list_mode_answers_every_question_once_and_resumes(world, tmp_path):
    """--questions_file: each job answered as `answer()` would (greedy), written as its line plus
    "answer"; a rerun answers only the ids missing (a torn last line is dropped and redone)."""
    from lwm.jobs import read_jobs
    from lwm.vision_chat import answer_list

    chat = VisionChat(world["loaded"], world["vqgan"], temperature=0.0, max_new_tokens=4)
    listing = tmp_path / "questions.jsonl"
    rel = os.path.relpath(world["image"], tmp_path)
    listing.write_text("\n".join(json.dumps(j) for j in [
        {"id": "still", "input_file": rel, "question": QUESTION},
        {"id": "clip", "input_file": world["video"], "question": "What moves?", "max_n_frames": 2}]) + "\n")
    jobs = read_jobs(str(listing), ("id", "input_file", "question"), paths=("input_file",))
    assert jobs[0]["input_file"] == world["image"] or os.path.samefile(jobs[0]["input_file"], world["image"])
    output = tmp_path / "answers.jsonl"
    answer_list(chat, jobs, str(output), max_n_frames=8, seed=0)
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["still", "clip"]
    assert lines[0]["answer"] == chat.answer(QUESTION, world["image"], 8)
    assert lines[1]["answer"] == chat.answer("What moves?", world["video"], 2)
    output.write_text(output.read_text().splitlines()[0] + "\n" + '{"id": "cl')  # killed mid-line
    answer_list(chat, jobs, str(output), max_n_frames=8, seed=0)
    assert [json.loads(x) for x in output.read_text().splitlines()] == lines
    listing.write_text(listing.read_text() + json.dumps({"id": "still", "input_file": rel, "question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"questions.jsonl, line 3: id 'still' occurs twice"):
        read_jobs(str(listing), ("id", "input_file", "question"))
