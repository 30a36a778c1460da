"""Every path an entry point accepts may be a bucket URL: tokenizer, needle eval (haystack, results,
heatmap, resume), VQGAN pickle, vision files, tokenize_vision, configs, haystack writers, and a
missing object is one line naming it. fsspec's in-memory file system (`memory://`) stands in for
gs:// and s3://: lwm.storage treats it as remote, so these tests take the bucket code paths."""
import json
import re
import sys
import types
import uuid

import numpy as np
import pytest

fsspec = pytest.importorskip("fsspec")

from lwm import cli, storage  # noqa: E402
from lwm.assets import builtin_tokenizer_path  # noqa: E402
from lwm.vqgan import VQGAN, VQGANConfig, load_vqgan_params, param_shapes, save_vqgan_params  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

TINY_VQGAN = VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 2), z_channels=8,
                         num_embeddings=64, quantized_embed_dim=8)


@pytest.fixture
def bucket():
    """A fresh memory:// prefix, emptied afterwards."""
    url = f"memory://lwm-test-{uuid.uuid4().hex[:8]}"
    yield url
    storage.rmtree(url)


def upload(url: str, local_path: str) -> str:
    with open(local_path, "rb") as f:
        storage.write_bytes(url, f.read())
    return url


def test_tokenizer_loads_from_a_bucket_file_or_folder(bucket):
    from lwm.data.processors import TextProcessor
    from lwm.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_file

    url = upload(f"{bucket}/tok/tokenizer.model", builtin_tokenizer_path())
    local = Tokenizer(builtin_tokenizer_path())
    for spec in (url, f"{bucket}/tok", f"{bucket}/tok/"):
        assert resolve_tokenizer_file(spec) == url
        tok = load_tokenizer(spec)
        assert tok.model_file == url and tok.vocab_size == local.vocab_size
        assert tok.encode(" ASSISTANT: 1234567", add_bos=True) == local.encode(" ASSISTANT: 1234567", add_bos=True)
    # data-loader workers get the model file and reload it: the URL works there too
    import pickle

    clone = pickle.loads(pickle.dumps(TextProcessor({"fields": "t"}, load_tokenizer(url))))
    assert clone.tokenizer.model_file == url and clone.tokenizer.encode("hi") == local.encode("hi")
    storage.write_text(f"{bucket}/empty/readme.txt", "no model here")
    with pytest.raises(FileNotFoundError, match=f"^tokenizer folder {bucket}/empty holds no tokenizer.model$"):
        resolve_tokenizer_file(f"{bucket}/empty")
    with pytest.raises(FileNotFoundError, match=f"^tokenizer {bucket}/nothing: no such file or object$"):
        load_tokenizer(f"{bucket}/nothing")


class Answerer:
    """A sampler that answers every needle question correctly (no model compiles)."""

    data_dim = 2

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def generate(self, ids, mask, rng, sampling):
        from lwm.generation import GenerationOutput

        self.calls += 1
        rows = []
        for row, row_mask in zip(np.asarray(ids), np.asarray(mask)):
            prompt = self.tokenizer.decode(row[row_mask.astype(bool)])
            numbers = dict(re.findall(r"The special magic (.+?) number is: (\d+)", prompt))
            city = re.search(r"What is the special magic (.+?) number\?", prompt).group(1)
            rows.append(self.tokenizer.encode(numbers[city])[:sampling.max_new_tokens])
        tokens = np.full((len(rows), sampling.max_new_tokens), sampling.pad_token_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        return GenerationOutput(tokens=tokens, lengths=np.array([len(r) for r in rows], np.int32))


def test_needle_eval_reads_writes_and_resumes_in_a_bucket(bucket):
    from lwm.config import load_config
    from lwm.corpus import builtin_corpus_documents, write_corpus_jsonl
    from lwm.mesh import build_mesh
    from lwm.needle import (NeedleSettings, check_needle_files, load_results, plot_needle_results, plot_path_for,
                            run_needle_eval, save_results)
    from lwm.tokenizer import load_tokenizer

    haystack = f"{bucket}/data/pg.jsonl"
    write_corpus_jsonl(haystack, builtin_corpus_documents()[:3], unit="document")  # the haystack writer, too
    output = f"{bucket}/needle/results.json"
    settings = NeedleSettings(haystack_file=haystack, output_file=output, context_lengths_min=300,
                              context_lengths_max=300, n_context_length_intervals=1, n_document_depth_intervals=3,
                              n_rounds=1, max_new_tokens=8)
    check_needle_files(settings)  # the entry point's early checks accept both URLs
    tokenizer = load_tokenizer(upload(f"{bucket}/tok/tokenizer.model", builtin_tokenizer_path()))
    config = load_config("debug").replace(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                          max_sequence_length=1024, scan_query_chunk_size=32, scan_key_chunk_size=32)
    loaded = types.SimpleNamespace(tokenizer=tokenizer, config=config, mesh=build_mesh("1,2,1,4"))
    preset = dict(context_length=300, depth_percent=50.0, seed=0, answer="1", response="PRESET", correct=False,
                  correct_strict=False)
    save_results(output, [preset])  # (300, 50%, round 0) is already done
    sampler = Answerer(tokenizer)
    results = run_needle_eval(settings, loaded, progress=False, sampler=sampler)
    assert sampler.calls > 0 and len(results) == 3 and results[0] == preset
    assert all(r["correct_strict"] for r in results[1:])
    assert load_results(output) == results == json.loads(storage.read_text(output))
    again = Answerer(tokenizer)
    assert run_needle_eval(settings, loaded, progress=False, sampler=again) == results and again.calls == 0
    png = plot_needle_results(results, plot_path_for(output))
    assert png == f"{bucket}/needle/results.png" and storage.read_bytes(png)[:4] == b"\x89PNG"
    assert sorted(storage.listdir(f"{bucket}/needle")) == ["results.json", "results.png"]


def test_plot_needle_script_reads_and_writes_a_bucket(bucket):
    from lwm.needle import save_results
    from scripts.plot_needle import main

    results = [dict(context_length=n, depth_percent=d, seed=0, answer="7", response="7", correct=True,
                    correct_strict=True) for n in (1000, 2000) for d in (0.0, 100.0)]
    save_results(f"{bucket}/r.json", results)
    assert main([f"{bucket}/r.json", f"--output={bucket}/plots/r.jpg"]) == 0
    assert storage.read_bytes(f"{bucket}/plots/r.jpg")[:3] == b"\xff\xd8\xff"  # the suffix picks the format
    with pytest.raises(SystemExit, match=f"^[^:]+: {bucket}/gone.json: no results \\(no such file\\)$"):
        main([f"{bucket}/gone.json"])


def test_vqgan_pickle_round_trips_through_a_bucket(bucket):
    import jax

    params = jax.tree.map(lambda s: np.arange(np.prod(s.shape), dtype=s.dtype).reshape(s.shape) % 7,
                          param_shapes(TINY_VQGAN))
    url = f"{bucket}/vqgan/vqgan.pkl"
    save_vqgan_params(url, params)
    loaded = load_vqgan_params(url, TINY_VQGAN)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    storage.write_text(f"{bucket}/vqgan/config.json", json.dumps(TINY_VQGAN.to_dict()))
    assert VQGANConfig.from_json(f"{bucket}/vqgan/config.json") == TINY_VQGAN
    with pytest.raises(FileNotFoundError, match=f"VQGAN checkpoint '{bucket}/vqgan/none.pkl' does not exist"):
        load_vqgan_params(f"{bucket}/vqgan/none.pkl", TINY_VQGAN)


def test_vision_files_and_tokenize_vision_in_a_bucket(bucket, tmp_path):
    import importlib.util
    import os

    from lwm.vision_io import read_image, read_video, write_image, write_video

    frame = np.zeros((32, 32, 3), np.uint8)
    frame[8:20, 4:30] = (200, 40, 90)
    write_image(f"{bucket}/media/a.png", frame)  # vision generation's image output
    np.testing.assert_array_equal(read_image(f"{bucket}/media/a.png")[0], frame)
    video = np.stack([np.full((16, 16, 3), 30 * i, np.uint8) for i in range(4)])
    write_video(f"{bucket}/media/clip.mp4", video, fps=2)  # and its video output
    assert read_video(f"{bucket}/media/clip.mp4", 0).shape == (4, 16, 16, 3)
    assert os.listdir(tmp_path) == []  # nothing was staged next to the test's files

    storage.write_text(f"{bucket}/media/a.txt", "a red bar\n")
    storage.write_text(f"{bucket}/media/clip.txt", "getting brighter\n")
    name = "tokenize_vision_script"  # as tests/test_tokenize_vision.py loads it: its flags are defined once
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "tokenize_vision.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    script = sys.modules[name]
    items, failures = script.list_folder(f"{bucket}/media")
    assert [(i.id, i.caption) for i in items] == [("a.png", "a red bar"), ("clip.mp4", "getting brighter")]
    assert failures == []
    import jax

    ckpt = f"{bucket}/vqgan.pkl"
    save_vqgan_params(ckpt, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(TINY_VQGAN)))
    vqgan = VQGAN(ckpt, TINY_VQGAN, frames_per_chunk=4)
    output = f"{bucket}/out/train.jsonl"
    report = script.tokenize_vision(items[:1], output, vqgan, batch_size=1, progress=False)
    assert report.written == 1
    report = script.tokenize_vision(items, output, vqgan, max_n_frames=2, batch_size=1, progress=False)
    assert (report.written, report.already_done) == (1, 1)  # resumed from the bucket object
    lines = [json.loads(line) for line in storage.read_text(output).splitlines()]
    per_frame = TINY_VQGAN.tokens_per_frame
    assert [(r["id"], r["n_frames"], len(r["vision"])) for r in lines] == [("a.png", 1, per_frame),
                                                                           ("clip.mp4", 2, 2 * per_frame)]
    storage.write_bytes(output, storage.read_bytes(output) + b'{"id": "torn')  # a crash mid-upload cannot do this,
    assert script.completed_ids(output) == {"a.png", "clip.mp4"}  # but a torn line is cut off all the same
    assert storage.read_text(output).endswith("}\n")
    assert script.write_failures(output, [("x.png", "broken")]) == f"{output}.failures.jsonl"
    assert json.loads(storage.read_text(f"{output}.failures.jsonl")) == {"path": "x.png", "error": "broken"}
    script.write_failures(output, [])
    assert not storage.exists(f"{output}.failures.jsonl")


def test_config_json_and_pickle_in_a_bucket(bucket):
    import pickle

    from lwm.config import load_config

    config = load_config("debug").replace(theta=5e7)
    config.save_json(f"{bucket}/config.json")
    assert load_config(f"json::{bucket}/config.json") == config
    storage.write_bytes(f"{bucket}/metadata.pkl", pickle.dumps({"llama_config": config.to_dict()}))
    assert load_config(f"pickle::{bucket}/metadata.pkl") == config


def test_hugging_face_folders_stay_local(bucket):
    from lwm.hf_conversion import config_from_hf, convert_lwm_to_hf

    with pytest.raises(ValueError, match="^output_dir=memory://.*: the Hugging Face folder must be a local path .*"
                                         "gcloud storage cp -r DIR memory://"):
        convert_lwm_to_hf(f"{bucket}/params", None, f"{bucket}/hf")
    with pytest.raises(ValueError, match="^hf_dir=memory://.*copy it down first"):
        config_from_hf(f"{bucket}/hf")


def test_a_missing_object_is_one_line_naming_it(bucket):
    from lwm.needle import haystack_texts
    from lwm.vision_io import read_vision

    missing = f"{bucket}/nowhere/pg19.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        cli.check_input_files([("--haystack_file", missing)])
    assert cli.one_line(e.value) == f"--haystack_file: no such object: {missing}"
    with pytest.raises(FileNotFoundError) as e:
        next(haystack_texts(missing))
    assert cli.one_line(e.value) == f"{missing}: no such file or object"
    with pytest.raises(FileNotFoundError, match=f"^{bucket}/clip.mp4: no such file$"):
        read_vision(f"{bucket}/clip.mp4")
