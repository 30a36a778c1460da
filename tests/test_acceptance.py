"""The original's workflows end to end, each step a real entry point run as a user runs it,
with the flag sets of LWM's scripts (scripts/run_*.sh); only paths, mesh and sizes differ.

Text:   lwm.train (run_train_text.sh) -> scripts/eval_needle.py (run_eval_needle.sh) on the
        trained train state -> scripts/convert_lwm_to_hf.py -> transformers.LlamaForCausalLM,
        whose logits equal ours for the same trained weights.
Vision: scripts/tokenize_vision.py (an image and a video) -> lwm.train --modality=vision,text
        (run_train_vision_text.sh) -> lwm.vision_chat (run_vision_chat.sh) -> lwm.vision_generation
        (run_sample_image.sh, run_sample_video.sh), all on the trained train state.
"""
import json
import os
import sys

import numpy as np
import pytest

from lwm.corpus import builtin_corpus_documents, write_corpus_jsonl
from lwm.logger import read_metrics
from tests.test_train_cli import run

# imageio runs ffmpeg through subprocess (fork + immediate exec, which is safe); JAX's at-fork
# hook warns about any fork once jax is imported.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")]

# 'debug' shrunk: 8 query heads over 4 kv heads (GQA) so that the needle eval's tp=4 divides both.
TINY = "hidden_size=64,intermediate_size=128,num_attention_heads=8,num_key_value_heads=4"
STEPS = 2  # total_steps, and save_milestone_freq (the original's 10 of 200) so the run ends on a milestone


def logger_flags(out, experiment_id):
    return ["--autoresume=False", "--logger.append_uuid=False", "--logger.online=False", "--logger.project_id=lwm",
            f"--logger.experiment_id={experiment_id}", "--logger.experiment_note=", f"--logger.output_dir={out}",
            f"--logger.wandb_dir={out}/wandb"]


def optimizer_flags():
    return ["--optimizer.type=adamw", "--optimizer.accumulate_gradient_steps=1",
            "--optimizer.adamw_optimizer.weight_decay=0.1", "--optimizer.adamw_optimizer.lr=8e-5",
            "--optimizer.adamw_optimizer.end_lr=8e-5", "--optimizer.adamw_optimizer.lr_warmup_steps=5",
            "--optimizer.adamw_optimizer.lr_decay_steps=200"]


def check_trained(folder, vision=False):
    """The run logged every step with a finite loss and ended on its milestone train state."""
    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    if vision:
        assert all(np.isfinite(r["vision_loss"]) and np.isfinite(r["text_loss"]) for r in records)
    names = set(os.listdir(folder))
    assert {f"streaming_train_state_{STEPS}", f"metadata_{STEPS}.pkl", f"dataset_{STEPS}.pkl"} <= names, names
    assert not {"streaming_params", "streaming_train_state"} & names  # save_model_freq=0: milestones only
    return folder / f"streaming_train_state_{STEPS}"


# ----------------------------------------------------------------------------- text


def test_text_train_needle_eval_and_hf_conversion(tmp_path):
    import torch
    import transformers

    from lwm.loading import load_model
    from tests.helpers import max_rel_error, random_ids

    data = tmp_path / "train.jsonl"
    write_corpus_jsonl(str(data), builtin_corpus_documents()[:2])
    update = (f"dict(theta=10000,max_sequence_length=1024,scan_attention=True,scan_query_chunk_size=32,"
              f"scan_key_chunk_size=32,scan_mlp=True,scan_mlp_chunk_size=32,scan_layers=True,{TINY})")
    out = tmp_path / "out"
    # run_train_text.sh
    run([sys.executable, "-u", "-m", "lwm.train", "--modality=text", "--mesh_dim=!1,-1,2,2", "--dtype=fp32",
         f"--total_steps={STEPS}", "--log_freq=1", "--save_model_freq=0", f"--save_milestone_freq={STEPS}",
         "--load_llama_config=debug", f"--update_llama_config={update}", "--tokenizer=builtin",
         *optimizer_flags(), "--use_data_sharded_loader=True", "--train_dataset.type=json",
         "--train_dataset.text_processor.fields=text", f"--train_dataset.json_dataset.path={data}",
         "--train_dataset.json_dataset.seq_length=128", "--train_dataset.json_dataset.batch_size=2",
         "--train_dataset.json_dataset.tokenizer_processes=16",
         "--train_dataset.json_dataset.use_data_sharded_loader=True", "--checkpointer.save_optimizer_state=True",
         *logger_flags(out, "text")], fresh_folder=out / "text")
    state = check_trained(out / "text")

    # run_eval_needle.sh on the trained train state
    haystack = tmp_path / "haystack.jsonl"
    write_corpus_jsonl(str(haystack), builtin_corpus_documents()[:1], unit="document")
    results = tmp_path / "needle.json"
    proc = run([sys.executable, "-u", "scripts/eval_needle.py", "--mesh_dim=!1,-1,4,1", "--dtype=fp32",
                "--load_llama_config=debug", f"--update_llama_config={update}",
                f"--load_checkpoint=trainstate_params::{state}", "--tokenizer=builtin", "--max_tokens_per_batch=5000",
                f"--output_file={results}", f"--haystack_file={haystack}", "--context_lengths_min=300",
                "--context_lengths_max=300", "--n_context_length_intervals=1", "--n_document_depth_intervals=2",
                "--n_rounds=1", "--max_new_tokens=8"])
    cases = json.loads(results.read_text())
    assert sorted((r["context_length"], r["depth_percent"]) for r in cases) == [(300, 0.0), (300, 100.0)]
    assert all(r["correct"] == (r["answer"] in r["response"]) for r in cases)
    assert (tmp_path / "needle.png").read_bytes()[:4] == b"\x89PNG"
    assert "| depth % \\ context | 300 |" in proc.stdout

    # Hugging Face conversion of the same file; its logits equal ours as the needle eval loads them.
    hf_dir = tmp_path / "hf"
    proc = run([sys.executable, "scripts/convert_lwm_to_hf.py", f"--load_checkpoint=trainstate_params::{state}",
                "--load_llama_config=debug", f"--update_llama_config={update}", f"--output_dir={hf_dir}",
                "--tokenizer=builtin"], devices=1, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    written = json.loads((hf_dir / "config.json").read_text())
    assert (written["num_key_value_heads"], written["rope_theta"], written["vocab_size"]) == (4, 10000, 32000)
    loaded = load_model(mesh_dim="!1,-1,4,1", load_llama_config="debug", update_llama_config=update,
                        load_checkpoint_spec=f"trainstate_params::{state}", tokenizer="builtin")
    ids = random_ids(0, (2, 64), loaded.config.vocab_size)
    ours = loaded.model.apply({"params": loaded.params}, ids).logits
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    assert max_rel_error(ours, ref) <= 1e-5  # measured 4e-7


# ----------------------------------------------------------------------------- vision


def test_vision_tokenize_train_chat_and_generate(tmp_path):
    import decord
    import imageio.v2 as imageio
    from PIL import Image

    from tests.test_tokenize_vision import draw_image
    from tests.test_vision_chat import write_tiny_vqgan  # LWM's 16 x 16 codes per frame from 32 x 32 pixels

    vqgan, vqgan_config, _ = write_tiny_vqgan(str(tmp_path))
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    draw_image(rng, 48, 40).save(media / "still.png")
    (media / "still.txt").write_text("a few boxes\n")
    with imageio.get_writer(str(media / "clip.mp4"), fps=4, macro_block_size=8) as writer:
        for _ in range(6):
            writer.append_data(np.asarray(draw_image(rng, 40, 32)))
    (media / "clip.txt").write_text("boxes jumping around\n")

    data = tmp_path / "vision.jsonl"
    proc = run([sys.executable, "scripts/tokenize_vision.py", f"--input={media}", f"--output={data}",
                f"--vqgan_checkpoint={vqgan}", f"--vqgan_config={vqgan_config}", "--max_n_frames=4",
                "--batch_size=4", "--mode=both", "--progress=False", "--strict=True"], devices=1)
    assert "wrote 2 examples (5 frames)" in proc.stdout
    lines = {line["id"]: line for line in map(json.loads, data.read_text().splitlines())}
    assert {k: (v["n_frames"], len(v["vision"])) for k, v in lines.items()} == {"still.png": (1, 256),
                                                                                "clip.mp4": (4, 1024)}

    # run_train_vision_text.sh
    update = ("dict(theta=50000000,max_sequence_length=2048,scan_attention=True,scan_query_chunk_size=64,"
              f"scan_key_chunk_size=64,scan_mlp=True,scan_mlp_chunk_size=64,scan_layers=True,{TINY})")
    out = tmp_path / "out"
    run([sys.executable, "-u", "-m", "lwm.train", "--modality=vision,text", "--mesh_dim=!1,-1,2,2", "--dtype=fp32",
         f"--total_steps={STEPS}", "--log_freq=1", "--save_model_freq=0", f"--save_milestone_freq={STEPS}",
         "--load_llama_config=debug", f"--update_llama_config={update}", "--tokenizer=builtin",
         *optimizer_flags(), "--use_data_sharded_loader=True", "--train_dataset.type=json_vision",
         "--train_dataset.vision_text_processor.fields_from_example=fields",
         "--train_dataset.vision_text_processor.max_n_frames=4", "--train_dataset.json_vision_dataset.mode=no_pad",
         f"--train_dataset.json_vision_dataset.path={data}", "--train_dataset.json_vision_dataset.seq_length=512",
         "--train_dataset.json_vision_dataset.batch_size=2",
         "--train_dataset.json_vision_dataset.tokenizer_processes=4",
         "--train_dataset.json_vision_dataset.tokenizer_parallel_chunk_size=2",
         "--train_dataset.json_vision_dataset.tokenizer_parallel_batch_size=8",
         "--train_dataset.json_vision_dataset.use_data_sharded_loader=True",
         "--checkpointer.save_optimizer_state=True", *logger_flags(out, "vision")], fresh_folder=out / "vision")
    state = check_trained(out / "vision", vision=True)

    # run_vision_chat.sh (one device: '!1,1,-1,1' puts them all on tp)
    chat_update = ("dict(sample_mode='text',theta=50000000,max_sequence_length=2048,use_flash_attention=False,"
                   "scan_attention=False,scan_query_chunk_size=64,scan_key_chunk_size=64,remat_attention='',"
                   f"scan_mlp=False,scan_mlp_chunk_size=64,remat_mlp='',remat_block='',scan_layers=True,{TINY})")
    question = "What is the video about?"
    proc = run([sys.executable, "-u", "-m", "lwm.vision_chat", f"--prompt={question}",
                f"--input_file={media / 'clip.mp4'}", f"--vqgan_checkpoint={vqgan}", f"--vqgan_config={vqgan_config}",
                "--mesh_dim=!1,1,-1,1", "--dtype=fp32", "--load_llama_config=debug", "--max_n_frames=8",
                f"--update_llama_config={chat_update}", f"--load_checkpoint=trainstate_params::{state}",
                "--tokenizer.vocab_file=builtin", "--max_new_tokens=8"], devices=1)
    printed = proc.stdout.splitlines()
    assert printed[0] == f"Question: {question}"
    assert printed[1].startswith("Answer: ") and len(printed[1]) > len("Answer: "), printed
    assert "6 frames" in proc.stderr, proc.stderr[-2000:]  # a 6-frame clip is under max_n_frames=8: all of it

    # run_sample_image.sh and run_sample_video.sh
    generation_flags = [
        "--prompt=Fireworks over the city", "--temperature_image=1.0", "--top_k_image=8192", "--cfg_scale_image=5.0",
        f"--vqgan_checkpoint={vqgan}", f"--vqgan_config={vqgan_config}", "--mesh_dim=!1,1,-1,1", "--dtype=fp32",
        "--load_llama_config=debug", f"--load_checkpoint=trainstate_params::{state}"]
    sample_update = ("dict(sample_mode='vision',theta=50000000,max_sequence_length=2048,{flash}scan_attention=False,"
                     "scan_query_chunk_size=64,scan_key_chunk_size=64,scan_mlp=False,scan_mlp_chunk_size=64,"
                     f"scan_layers=True,{TINY})")
    image = tmp_path / "fireworks.png"
    proc = run([sys.executable, "-u", "-m", "lwm.vision_generation", f"--output_file={image}", "--n_frames=1",
                *generation_flags, f"--update_llama_config={sample_update.format(flash='')}", "--tokenizer=builtin"],
               devices=1)
    assert f"wrote {image} (1 frame" in proc.stdout
    with Image.open(image) as picture:
        assert picture.format == "PNG" and picture.size == (32, 32) and picture.mode == "RGB"
    video = tmp_path / "fireworks.mp4"
    proc = run([sys.executable, "-u", "-m", "lwm.vision_generation", f"--output_file={video}",
                "--temperature_video=1.0", "--top_k_video=1000", "--cfg_scale_video=1.0", "--n_frames=2",
                *generation_flags, f"--update_llama_config={sample_update.format(flash='use_flash_attention=True,')}",
                "--tokenizer.vocab_file=builtin"], devices=1)
    assert f"wrote {video} (2 frames" in proc.stdout
    reader = decord.VideoReader(str(video), ctx=decord.cpu(0))
    assert len(reader) == 2 and reader[0].shape == (32, 32, 3) and abs(reader.get_avg_fps() - 4) < 1e-6
