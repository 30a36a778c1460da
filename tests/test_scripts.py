"""Shipped configs load, and the training scripts' flags parse with the meaning they had."""
import glob
import os
import subprocess

import pytest

from lwm.config import build_config, load_config
from lwm.flags import parse_flags_for_test, tokenizer_spec
from tests.helpers import run_script_with_fake_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))))
def test_every_shipped_config_loads(path):
    config = load_config(f"json::{path}")
    assert config.num_params() > 0


def test_train_script_requires_its_dataset():
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_train_text.sh")], capture_output=True,
                            text=True, env={k: v for k, v in os.environ.items() if k != "dataset_path"})
    assert result.returncode != 0 and "set dataset_path" in result.stderr


@pytest.mark.parametrize("script, modality, dataset_type", [
    ("run_train_text.sh", "text", "json"),
    ("run_train_vision_text.sh", "vision,text", "json_vision"),
])
def test_train_scripts_flags_parse(tmp_path, script, modality, dataset_type):
    from lwm import train

    args = run_script_with_fake_python(tmp_path, script, dataset_path="/d/data.jsonl", output_dir="/o",
                                       llama_tokenizer_path="/m/tokenizer.model")
    assert args[:3] == ["-u", "-m", "lwm.train"]
    parse_flags_for_test(args[3:])
    flags = train.FLAGS
    assert flags.modality == modality and flags.train_dataset.type == dataset_type
    assert tokenizer_spec() == "/m/tokenizer.model" and flags.logger.output_dir == "/o"
    assert flags.mesh_dim == "!1,-1,2,2" and flags.checkpointer.save_optimizer_state
    assert flags.optimizer.adamw_optimizer.lr == 8e-5 and flags.optimizer.adamw_optimizer.weight_decay == 0.1
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config, None, flags.mesh_dim)
    assert config.hidden_size == 256 and config.max_sequence_length == 2048  # 'debug' + the update string
    sub = flags.train_dataset.json_dataset if dataset_type == "json" else flags.train_dataset.json_vision_dataset
    assert sub.path == "/d/data.jsonl" and sub.seq_length == 2048


def test_demo_script_flags_parse(tmp_path):
    from lwm import train

    calls = run_script_with_fake_python(tmp_path, "run_demo.sh", all_calls=True, OUT=str(tmp_path / "demo"), STEPS="7")
    assert [c[:2] for c in calls] == [["-m", "lwm.corpus"], ["-u", "-m"], ["-", str(tmp_path / "demo/runs/demo/metrics.jsonl")],
                                      ["-m", "lwm.chat"]]
    args = calls[1]
    assert args[:3] == ["-u", "-m", "lwm.train"]
    parse_flags_for_test(args[3:])
    flags = train.FLAGS
    assert flags.total_steps == 7 and flags.mesh_dim == "1,1,1,8" and tokenizer_spec() == "builtin"
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config, None, flags.mesh_dim)
    assert config.hidden_size == 128 and config.scan_query_chunk_size == 64


PAPER_STAGES = [("32k", 32768, 1e6, 128), ("128k", 131072, 1e7, 32), ("256k", 262144, 1e7, 16),
                ("512k", 524288, 2.5e7, 8), ("1m", 1048576, 5e7, 4)]


@pytest.mark.parametrize("name, length, theta, batch", PAPER_STAGES)
def test_paper_stage_scripts_parse_to_their_stage(tmp_path, name, length, theta, batch):
    """LWM-Text stage I recipes: each stage's length, theta and 4M-token batch, from the previous
    stage's export; the model config the flags build has that length and theta."""
    from lwm import train

    args = run_script_with_fake_python(tmp_path, f"run_lwm_text_stage_{name}.sh", dataset_path="/d/books.jsonl",
                                       output_root="/o")
    parse_flags_for_test(args[3:])
    flags = train.FLAGS
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config)
    assert (config.max_sequence_length, config.theta, config.hidden_size) == (length, theta, 4096)
    assert flags.train_dataset.json_dataset.seq_length == length
    assert flags.train_dataset.json_dataset.batch_size * length == 4 * 2**20
    previous = dict(zip([s[0] for s in PAPER_STAGES[1:]], [s[0] for s in PAPER_STAGES]))
    if name in previous:
        assert flags.load_checkpoint == f"params::/o/lwm-text-{previous[name]}/streaming_params"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "reproduce", "tiny_*.json"))))
def test_reproduction_configs_are_complete(path):
    import json

    with open(path) as f:
        stage = json.load(f)
    if os.path.basename(path) == "tiny_model.json":
        assert load_config(f"json::{path}").vocab_size == 2048
        return
    assert {"name", "seq_length", "theta", "init_from", "steps", "batch_size", "mesh_dim", "lr", "evals"} <= set(stage)
    for spec in stage["evals"]:
        assert spec["kind"] in ("single", "multi") and spec["min"] <= spec["max"]
