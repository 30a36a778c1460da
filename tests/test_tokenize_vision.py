"""scripts/tokenize_vision.py on a tiny folder of drawn images and a short video, with a tiny
VQGAN: the JSONL holds exactly the VQGAN's codes for those frames, resumes, reports failures,
and feeds lwm.data's VisionTextProcessor."""
import importlib.util
import json
import os
import sys

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image, ImageDraw

from lwm.vqgan import VQGAN, VQGANConfig, VQGANModel, save_vqgan_params

# imageio runs ffmpeg through subprocess (fork + immediate exec, which is safe); JAX's at-fork
# hook warns about any fork once jax is imported.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 2), z_channels=8,
                   num_embeddings=64, quantized_embed_dim=8)
BATCH = 4  # frames per VQGAN call in these tests


def load_script():
    name = "tokenize_vision_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", "tokenize_vision.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def draw_image(rng, width, height):
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        draw.rectangle([x0, y0, x0 + int(rng.integers(3, 12)), y0 + int(rng.integers(3, 12))],
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of media with captions, a tiny VQGAN checkpoint with a data-drawn codebook."""
    root = tmp_path_factory.mktemp("tokenize")
    media = root / "media"
    (media / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    draw_image(rng, 32, 32).save(media / "a.png")
    draw_image(rng, 32, 32).save(media / "sub" / "b.png")
    draw_image(rng, 48, 40).save(media / "wide.png")  # resized to 38 x 32, center-cropped
    with imageio.get_writer(str(media / "clip.mp4"), fps=4, macro_block_size=2) as writer:
        for i in range(6):
            writer.append_data(np.asarray(draw_image(np.random.default_rng(10 + i), 32, 32)))
    (media / "broken.mp4").write_bytes(b"\x00 not a video" * 20)
    draw_image(rng, 32, 32).save(media / "uncaptioned.png")
    captions = {"a": "a red square", "sub/b": "two boxes", "wide": "a wide picture", "clip": "boxes moving",
                "broken": "never read"}
    for stem, text in captions.items():
        (media / f"{stem}.txt").write_text(text + "\n")

    params = VQGAN.init_params(TINY, jax.random.PRNGKey(0))
    # a codebook drawn from real latents, so codes spread over many rows (the init's tiny
    # codebook would map everything to a handful of codes)
    frames = np.stack([np.asarray(Image.open(media / n), np.float32) / 127.5 - 1 for n in ("a.png", "sub/b.png")])
    z = np.asarray(jax.jit(lambda p, x: VQGANModel(TINY).apply({"params": p}, x, method=VQGANModel.encode_latents))(
        params, frames)).reshape(-1, 8)
    params["quantize"]["embeddings"] = z[rng.choice(len(z), 64, replace=False)] + 0.01 * rng.standard_normal((64, 8))
    params["quantize"]["embeddings"] = params["quantize"]["embeddings"].astype(np.float32)
    ckpt = root / "vqgan.pkl"
    save_vqgan_params(str(ckpt), params)
    config_file = root / "vqgan.json"
    config_file.write_text(json.dumps(TINY.to_dict()))
    return {"root": root, "media": media, "ckpt": str(ckpt), "config": str(config_file), "params": params}


def expected_frames(media):
    """The frames LWM's preprocessing gives, computed here without lwm.vision_io."""
    out = {}
    for name in ("a.png", "sub/b.png"):
        out[name] = (np.asarray(Image.open(media / name), np.float32) / 127.5 - 1)[None]
    wide = Image.open(media / "wide.png").resize((38, 32), Image.Resampling.BICUBIC).crop((3, 0, 35, 32))
    out["wide.png"] = (np.asarray(wide, np.float32) / 127.5 - 1)[None]
    import decord

    reader = decord.VideoReader(str(media / "clip.mp4"), ctx=decord.cpu(0))
    assert len(reader) == 6
    picked = reader.get_batch([0, 1, 3, 5]).asnumpy()  # linspace(0, 5, 4) = 0, 1.67, 3.33, 5
    out["clip.mp4"] = picked.astype(np.float32) / 127.5 - 1
    return out


def run_main(script, argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tokenize_vision"] + argv)
    script.main([])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_folder_to_json_vision_codes_resume_and_failures(world, tmp_path, capsys):
    script = load_script()
    out = tmp_path / "train.jsonl"
    argv = [f"--input={world['media']}", f"--output={out}", f"--vqgan_checkpoint={world['ckpt']}",
            f"--vqgan_config={world['config']}", "--max_n_frames=4", f"--batch_size={BATCH}",
            "--mode=understanding", "--progress=False"]
    run_main(script, argv)
    printed = capsys.readouterr().out
    lines = read_jsonl(out)
    by_id = {line["id"]: line for line in lines}
    assert sorted(by_id) == ["a.png", "clip.mp4", "sub/b.png", "wide.png"]
    # codes equal the VQGAN's codes for the frames, 256 per frame, frame after frame
    frames = expected_frames(world["media"])
    names = sorted(frames)
    reference = VQGAN(world["params"], TINY, frames_per_chunk=BATCH).encode(np.concatenate([frames[n] for n in names]))[1]
    reference = np.asarray(reference)
    assert len(np.unique(reference)) > 16  # the codes are informative, not one row repeated
    start = 0
    for name in names:
        k = len(frames[name])
        line = by_id[name]
        assert line["n_frames"] == k and len(line["vision"]) == 256 * k
        assert all(type(c) is int for c in line["vision"])
        np.testing.assert_array_equal(np.asarray(line["vision"]), reference[start:start + k].reshape(-1), err_msg=name)
        assert line["fields"] == "[<|bos|>],[vision],caption"
        start += k
    assert by_id["clip.mp4"]["caption"] == "boxes moving" and by_id["sub/b.png"]["caption"] == "two boxes"
    # failures are counted, listed, and written next to the output (never a silent skip)
    assert "wrote 4 examples (7 frames)" in printed and "2 inputs failed" in printed
    assert "FAILED broken.mp4: VisionReadError" in printed
    assert "FAILED uncaptioned.png: no caption file uncaptioned.txt" in printed
    failures = read_jsonl(str(out) + ".failures.jsonl")
    assert sorted(f["path"] for f in failures) == ["broken.mp4", "uncaptioned.png"]

    # a re-run does nothing new
    run_main(script, argv)
    again = capsys.readouterr().out
    assert "wrote 0 examples (0 frames)" in again and "4 were already there" in again
    assert read_jsonl(out) == lines
    # a run killed mid-line: the torn line is cut off and that input is redone
    data = out.read_bytes()
    out.write_bytes(data[:-40])
    run_main(script, argv)
    err = capsys.readouterr().err
    assert "cutting off an incomplete last line" in err
    assert read_jsonl(out) == lines
    # --strict turns failures into exit status 1
    with pytest.raises(SystemExit) as exit_info:
        run_main(script, argv + ["--strict=True"])
    assert exit_info.value.code == 1


def test_jsonl_input_modes_and_loader_compatibility(world, tmp_path, tokenizer):
    script = load_script()
    media = world["media"]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join([
        json.dumps({"path": str(media / "a.png"), "caption": "a red square"}),
        "{not json",
        json.dumps({"path": str(media / "a.png"), "caption": "the same image, captioned again", "id": "a-2"}),
        json.dumps({"caption": "no path"}),
    ]) + "\n")
    items, failures = script.list_jsonl(str(listing))
    assert [i.id for i in items] == [str(media / "a.png"), "a-2"]
    assert [f[0] for f in failures] == [f"{listing}:2", f"{listing}:4"]
    assert "malformed JSON" in failures[0][1] and "'path' and 'caption'" in failures[1][1]
    vqgan = VQGAN(world["ckpt"], TINY, frames_per_chunk=BATCH)
    out = tmp_path / "both.jsonl"
    report = script.tokenize_vision(items, str(out), vqgan, mode="both", batch_size=BATCH, progress=False)
    assert report.written == 2 and not report.failures
    lines = read_jsonl(out)
    assert lines[0]["fields"] == ["[<|bos|>],[vision],caption", "[<|bos|>],[caption],vision"]
    assert lines[0]["vision"] == lines[1]["vision"]
    # relative paths resolve against the listing's folder; a duplicate id is refused up front
    (tmp_path / "rel.jsonl").write_text(json.dumps({"path": os.path.relpath(media / "a.png", tmp_path),
                                                     "caption": "x"}) + "\n")
    rel_items, _ = script.list_jsonl(str(tmp_path / "rel.jsonl"))
    assert os.path.samefile(rel_items[0].file, media / "a.png")
    with pytest.raises(ValueError, match="1 ids occur more than once"):
        script.tokenize_vision(items + items[:1], str(tmp_path / "dup.jsonl"), vqgan, progress=False)
    with pytest.raises(ValueError, match="must contain 'vision'"):
        script.tokenize_vision(items, str(tmp_path / "x.jsonl"), vqgan, vision_key="codes", progress=False)
    # generation order, read by the training loader: caption without loss, then the codes with loss
    out_gen = tmp_path / "gen.jsonl"
    script.tokenize_vision(items[:1], str(out_gen), vqgan, mode="generation", batch_size=BATCH, progress=False)
    line = read_jsonl(out_gen)[0]
    assert line["fields"] == "[<|bos|>],[caption],vision"
    from lwm.data import VisionTextProcessor

    processor = VisionTextProcessor({"fields_from_example": "fields"}, tokenizer)
    example = processor(line)
    codes_at = np.flatnonzero(example.vision_masks)
    assert len(codes_at) == 257  # 256 codes + the end-of-vision marker
    np.testing.assert_array_equal(example.tokens[codes_at[:-1]], line["vision"])
    assert example.tokens[codes_at[-1]] == 8193
    assert np.all(example.loss_masks[codes_at] == 1.0)  # generation: the vision span carries the loss


def test_question_answer_lines_keep_their_fields_and_train_on_the_chat_stream(world, tmp_path, tokenizer):
    """A listed line's own keys and fields go through (scripts/make_synthetic_vision.py writes
    such lines), and the loader turns a question line into exactly the token stream
    lwm.vision_chat asks with, followed by the answer: the loss falls on the answer and eos only.
    A listed key holding 'vision' would be read as codes: that line is a failure, not data."""
    from lwm.data import VisionTextProcessor
    from lwm.vision_chat import ANSWER_CUE, SYSTEM_PROMPT, chat_tokens

    script = load_script()
    media = world["media"]
    question = "What colour is the shape?"
    listing = tmp_path / "qa.jsonl"
    listing.write_text("\n".join([
        json.dumps({"path": str(media / "a.png"), "caption": "a red square", "id": "q1", "kind": "image_qa",
                    "prompt": SYSTEM_PROMPT.format(question=question), "cue": ANSWER_CUE, "answer": "red",
                    "fields": "[prompt],[vision],[cue],answer"}),
        json.dumps({"path": str(media / "a.png"), "caption": "x", "id": "q2", "vision_note": "oops"}),
    ]) + "\n")
    items, failures = script.list_jsonl(str(listing))
    assert [i.id for i in items] == ["q1"] and "would be read as VQGAN codes" in failures[0][1]
    out = tmp_path / "qa_tokens.jsonl"
    script.tokenize_vision(items, str(out), VQGAN(world["ckpt"], TINY, frames_per_chunk=BATCH), batch_size=BATCH,
                           progress=False)
    line = read_jsonl(out)[0]
    assert (line["kind"], line["answer"], line["fields"]) == ("image_qa", "red", "[prompt],[vision],[cue],answer")
    processor = VisionTextProcessor({"fields_from_example": "fields", "add_bos_token": False}, tokenizer)
    example = processor(line)
    codes = np.asarray(line["vision"]).reshape(1, 16, 16)
    asked, vision = chat_tokens(tokenizer, question, codes)
    answer = tokenizer.encode("red", add_bos=True) + [tokenizer.eos_token_id]
    assert example.tokens.tolist() == asked + answer
    assert example.vision_masks.tolist() == vision + [False] * len(answer)
    assert example.loss_masks.tolist() == [0.0] * len(asked) + [1.0] * len(answer)


def test_generation_lines_train_on_the_prompts_vision_generation_feeds(tokenizer):
    """The synthetic world's text-to-image lines (and the unconditional ones that classifier-free
    guidance mixes in) become exactly lwm.vision_generation's prompt row followed by the codes:
    no BOS before `<vision>` there, unlike the chat stream's (`"marker_bos": false`)."""
    from lwm.data import VisionTextProcessor
    from lwm.vision_generation import IMAGE_PROMPT, UNCONDITIONAL_PROMPT, VIDEO_PROMPT, prompt_batch
    from scripts.make_synthetic_vision import generation_example

    processor = VisionTextProcessor({"fields_from_example": "fields", "add_bos_token": False,
                                     "n_tokens_per_frame": 4}, tokenizer)
    codes = [5, 6, 7, 8, 9, 10, 11, 12]  # two frames of 4 codes
    for template, caption in ((IMAGE_PROMPT, "a red square at the top left"), (VIDEO_PROMPT, "a circle moving up"),
                              (UNCONDITIONAL_PROMPT, "")):
        example = processor({**generation_example(template, caption), "vision": codes})
        ids, mask = prompt_batch(tokenizer, [template.format(prompt=caption)])
        prompt = ids[0][mask[0].astype(bool)].tolist()
        first_code = int(np.flatnonzero(example.vision_masks)[0])
        assert example.tokens[:first_code].tolist() == prompt, template
        assert example.tokens[first_code:first_code + 10].tolist() == [5, 6, 7, 8, 8192, 9, 10, 11, 12, 8193]
        marker = len(tokenizer.encode("<vision>", add_bos=False))  # the markers carry the vision field's loss
        assert example.loss_masks[:first_code - marker].max() == 0 and example.loss_masks[first_code - marker:].min() == 1
    # the chat stream keeps the original loader's BOS before <vision>
    with_bos = processor({"prompt": "a", "fields": "[prompt],vision", "vision": codes})
    assert with_bos.tokens[:len(tokenizer.encode("a", add_bos=True)) + 1].tolist()[-1] == tokenizer.bos_token_id
    with pytest.raises(ValueError, match="'marker_bos' must be true or false, got 'no'"):
        processor({"prompt": "a", "fields": "[prompt],vision", "vision": codes, "marker_bos": "no"})
