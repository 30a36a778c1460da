"""Shipped configs load, and the training scripts' flags parse with the meaning they had."""
import glob
import json
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

    from lwm.reproduce import load_stage, stage_tokens

    if os.path.basename(path) == "tiny_model.json":
        assert load_config(f"json::{path}").vocab_size == 2048
        return
    name = os.path.basename(path)[len("tiny_"):-len(".json")]
    stage = load_stage(name, smoke=False)  # steps computed for the ablations with "steps_for_tokens_of"
    assert stage["name"] == name
    assert {"seq_length", "theta", "init_from", "steps", "batch_size", "mesh_dim", "lr", "evals"} <= set(stage)
    for spec in stage["evals"]:
        assert spec["kind"] in ("single", "multi") and spec["min"] <= spec["max"]
        assert spec["min"] >= 320  # the haystack at least 3/4 of every context evaluated
    from lwm.retrieval_data import ANSWER_STYLES

    assert stage.get("answer_style", "number") in ANSWER_STYLES
    if "steps_for_tokens_of" in stage:  # equal tokens, as close as whole steps allow
        others = sum(stage_tokens(load_stage(other, smoke=False)) for other in stage["steps_for_tokens_of"])
        assert 0 <= others - stage_tokens(stage) < stage["batch_size"] * stage["seq_length"]


# ---- the staged training chains: run_lwm_text_stage*.sh and run_lwm_vision_stage*.sh ----------------

#              stage   length   theta     steps warmup
TEXT_STAGES = [("32k", 32768, 1000000, 1200, 100), ("128k", 131072, 10000000, 3000, 200),
               ("256k", 262144, 10000000, 3000, 200), ("512k", 524288, 25000000, 720, 50),
               ("1m", 1048576, 50000000, 450, 25)]
#                stage        length   steps  warmup lr     end_lr  (numbers from memory of the paper)
VISION_STAGES = [("1k", 1024, 45000, 1000, 6e-4, 6e-5), ("8k", 8192, 14000, 500, 6e-4, 6e-5),
                 ("chat-32k", 32768, 1200, 100, 8e-5, 8e-5), ("chat-128k", 131072, 500, 50, 8e-5, 8e-5),
                 ("chat-1m", 1048576, 50, 5, 8e-5, 8e-5)]
STAGE_KNOBS = ("stage", "output_root", "dataset_path", "tokenizer", "llama2_checkpoint", "text_checkpoint",
               "init_checkpoint", "fields_from_example", "model", "dtype", "length_divisor", "min_length",
               "steps_divisor", "batch_tokens", "chunk_size", "save_model_freq", "save_milestone_freq", "mesh_dim")


@pytest.fixture
def clean_knobs(monkeypatch):
    """The scripts read their knobs from the environment: the tests' defaults must not see the caller's."""
    for name in STAGE_KNOBS:
        monkeypatch.delenv(name, raising=False)


def _stage_flags(tmp_path, script, *extra_args, **env):
    """Run scripts/<script> (with extra command-line arguments) under the fake python; parse the
    lwm.train call as lwm.train would (an unknown flag raises). Returns (argv, train.FLAGS)."""
    from lwm import train

    if extra_args:  # a one-line caller script, given by absolute path (os.path.join keeps it as it is)
        caller = tmp_path / "call.sh"
        caller.write_text(f'exec bash {os.path.join(ROOT, "scripts", script)} ' + " ".join(extra_args) + "\n")
        script = str(caller)
    args = run_script_with_fake_python(tmp_path, script, **{"dataset_path": "/d/data.jsonl", "output_root": "/o", **env})
    assert args[:3] == ["-u", "-m", "lwm.train"]
    parse_flags_for_test(args[3:])
    return args, train.FLAGS


def _todays_text_args(stage, length, theta, steps, warmup):
    """The lwm.train call of run_lwm_text_stage.sh before its scale-down knobs (less the
    --checkpointer.save_optimizer_state=True it then passed), written out flag by flag."""
    previous = {"128k": "32k", "256k": "128k", "512k": "256k", "1m": "512k"}
    start = (f"params::/o/lwm-text-{previous[stage]}/streaming_params" if stage in previous
             else "params::/path/to/llama-2-7b/streaming_params")
    return ["-u", "-m", "lwm.train", "--modality=text", f"--mesh_dim=1,-1,1,{length // 32768}", "--dtype=bf16",
            f"--total_steps={steps}", "--log_freq=1", "--save_model_freq=50", f"--save_milestone_freq={steps // 4}",
            "--load_llama_config=7b",
            f"--update_llama_config=dict(theta={theta},max_sequence_length={length},scan_attention=True,"
            "scan_query_chunk_size=1024,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=1024,"
            "scan_layers=True,remat_block='save_attention')",
            f"--load_checkpoint={start}", "--tokenizer=LargeWorldModel/LWM-Text-1M", "--optimizer.type=adamw",
            "--optimizer.adamw_optimizer.lr=4e-5", "--optimizer.adamw_optimizer.end_lr=4e-5",
            "--optimizer.adamw_optimizer.init_lr=0.0", f"--optimizer.adamw_optimizer.lr_warmup_steps={warmup}",
            f"--optimizer.adamw_optimizer.lr_decay_steps={steps}", "--optimizer.adamw_optimizer.weight_decay=0.0",
            "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
            "--train_dataset.json_dataset.path=/d/data.jsonl", f"--train_dataset.json_dataset.seq_length={length}",
            f"--train_dataset.json_dataset.batch_size={4 * 2**20 // length}", "--train_dataset.json_dataset.packed=True",
            "--autoresume=True", "--logger.append_uuid=False", f"--logger.experiment_id=lwm-text-{stage}",
            "--logger.output_dir=/o"]


def test_every_stage_wrapper_is_tested():
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "scripts", "run_lwm_*_stage_*.sh"))}
    tested = {f"run_lwm_text_stage_{s[0]}.sh" for s in TEXT_STAGES} | {f"run_lwm_vision_stage_{s[0]}.sh"
                                                                       for s in VISION_STAGES}
    assert on_disk == tested


@pytest.mark.parametrize("stage", TEXT_STAGES, ids=[s[0] for s in TEXT_STAGES])
def test_text_stage_defaults_are_the_paper_run(tmp_path, clean_knobs, stage):
    """With no knob set, each stage's call is the paper-scale one, flag for flag; checkpoints keep
    the trainer's default (exact float32 train state for --autoresume + the streaming_params export)."""
    name, length, theta, steps, warmup = stage
    args, flags = _stage_flags(tmp_path, f"run_lwm_text_stage_{name}.sh")
    assert args == _todays_text_args(*stage)
    assert not flags.checkpointer.save_optimizer_state and flags.checkpointer.exact_resume
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config)
    assert (config.max_sequence_length, config.theta, config.hidden_size) == (length, theta, 4096)
    assert flags.optimizer.adamw_optimizer.lr_warmup_steps == warmup and flags.total_steps == steps


@pytest.mark.parametrize("stage", VISION_STAGES, ids=[s[0] for s in VISION_STAGES])
def test_vision_stage_defaults_parse_to_their_stage(tmp_path, clean_knobs, stage):
    name, length, steps, warmup, lr, end_lr = stage
    args, flags = _stage_flags(tmp_path, f"run_lwm_vision_stage_{name}.sh")
    assert "--checkpointer.save_optimizer_state=True" not in args
    assert not flags.checkpointer.save_optimizer_state and flags.checkpointer.exact_resume
    assert flags.modality == "vision,text" and flags.train_dataset.type == "json_vision"
    assert flags.train_dataset.vision_text_processor.fields_from_example == "fields"
    data = flags.train_dataset.json_vision_dataset
    assert (data.path, data.seq_length, data.mode) == ("/d/data.jsonl", length, "packed")
    assert data.batch_size * length == 8 * 2**20
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config)
    assert (config.max_sequence_length, config.theta, config.hidden_size) == (length, 5e7, 4096)
    opt = flags.optimizer.adamw_optimizer
    assert (flags.total_steps, opt.lr_warmup_steps, opt.lr_decay_steps, opt.lr, opt.end_lr) == (steps, warmup, steps, lr, end_lr)
    assert flags.mesh_dim == f"1,-1,1,{max(length // 32768, 1)}" and flags.autoresume


@pytest.mark.parametrize("output_root", ["/o", "gs://bucket/runs"])
def test_stage_chain_hands_over_streaming_params(tmp_path, clean_knobs, output_root):
    """Text 32k -> ... -> 1m -> vision 1k -> ... -> chat-1m: each stage loads the streaming_params of
    the run folder (output_dir/experiment_id) the stage before it writes; a bucket URL passes through."""
    chain = [f"run_lwm_text_stage_{s[0]}.sh" for s in TEXT_STAGES] + [f"run_lwm_vision_stage_{s[0]}.sh"
                                                                      for s in VISION_STAGES]
    folders, starts = [], []
    for script in chain:
        _, flags = _stage_flags(tmp_path, script, output_root=output_root)
        assert flags.autoresume and not flags.logger.append_uuid and flags.logger.output_dir == output_root
        folders.append(f"{flags.logger.output_dir}/{flags.logger.experiment_id}")
        starts.append(flags.load_checkpoint)
    assert folders[4] == f"{output_root}/lwm-text-1m" and folders[5] == f"{output_root}/lwm-vision-1k"
    assert starts[0] == "params::/path/to/llama-2-7b/streaming_params"
    assert starts[1:] == [f"params::{folder}/streaming_params" for folder in folders[:-1]]
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.mark.parametrize("script, knobs, want", [
    # text 32k: 32768 / 1024 = 32 -> min_length 64; 1200 / 150 = 8 steps; 100 / 150 -> warmup 1; 8192 / 64 = 128 rows
    ("run_lwm_text_stage_32k.sh", dict(min_length="64", llama2_checkpoint=""),
     dict(length=64, steps=8, warmup=1, batch=128, chunk=64, milestone=2, start="", theta=1e6)),
    # text 1m: 1048576 / 1024 = 1024 tokens; 450 / 150 = 3 steps; 8192 / 1024 = 8 rows; chunk 64 < 1024
    ("run_lwm_text_stage_1m.sh", dict(min_length="64"),
     dict(length=1024, steps=3, warmup=1, batch=8, chunk=64, milestone=1, theta=5e7,
          start="params::/o/lwm-text-512k/streaming_params")),
    # one step: warmup kept below steps (0), so the schedule is valid
    ("run_lwm_text_stage_512k.sh", dict(steps_divisor="10000", chunk_size="4096"),
     dict(length=512, steps=1, warmup=0, batch=16, chunk=512, milestone=1, theta=2.5e7,
          start="params::/o/lwm-text-256k/streaming_params")),
    # vision 1k: 1024 / 1024 = 1 -> min_length 512 (a frame is 257 tokens); 45000 / 150 = 300 steps
    ("run_lwm_vision_stage_1k.sh", dict(min_length="512", model="json::configs/tiny_vision.json"),
     dict(length=512, steps=300, warmup=6, batch=16, chunk=64, milestone=75, theta=5e7,
          start="params::/o/lwm-text-1m/streaming_params")),
    # vision chat-1m from a text checkpoint elsewhere is only the 1k stage's business
    ("run_lwm_vision_stage_chat-1m.sh", dict(min_length="512", model="json::configs/tiny_vision.json",
                                             text_checkpoint="params::/elsewhere"),
     dict(length=1024, steps=1, warmup=0, batch=8, chunk=64, milestone=1, theta=5e7,
          start="params::/o/lwm-vision-chat-128k/streaming_params")),
])
def test_stage_scale_down_knobs(tmp_path, clean_knobs, script, knobs, want):
    from lwm.optimizers import OptimizerFactory

    env = dict(length_divisor="1024", steps_divisor="150", batch_tokens="8192", chunk_size="64",
               model="json::configs/tiny_text.json", dtype="fp32")
    env.update(knobs)
    _, flags = _stage_flags(tmp_path, script, **env)
    vision = "vision" in script
    data = flags.train_dataset.json_vision_dataset if vision else flags.train_dataset.json_dataset
    opt = flags.optimizer.adamw_optimizer
    assert (data.seq_length, data.batch_size, flags.total_steps, opt.lr_warmup_steps, opt.lr_decay_steps) == \
        (want["length"], want["batch"], want["steps"], want["warmup"], want["steps"])
    assert flags.save_milestone_freq == want["milestone"] and flags.save_model_freq == 50
    assert flags.load_checkpoint == want["start"] and flags.dtype == "fp32" and flags.mesh_dim == "1,-1,1,1"
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config)
    assert (config.max_sequence_length, config.theta, config.hidden_size) == (want["length"], want["theta"], 128)
    assert config.scan_query_chunk_size == config.scan_key_chunk_size == config.scan_mlp_chunk_size == want["chunk"]
    OptimizerFactory.get_optimizer(flags.optimizer)  # the scaled schedule is a valid one


def test_stage_knobs_mesh_and_save_frequencies(tmp_path, clean_knobs):
    _, flags = _stage_flags(tmp_path, "run_lwm_text_stage_1m.sh", length_divisor="16", mesh_dim="1,1,1,8",
                            save_model_freq="10", save_milestone_freq="20", batch_tokens="1")
    assert flags.mesh_dim == "1,1,1,8" and flags.save_model_freq == 10 and flags.save_milestone_freq == 20
    assert flags.train_dataset.json_dataset.batch_size == 1  # at least one row
    _, flags = _stage_flags(tmp_path, "run_lwm_vision_stage_chat-128k.sh", length_divisor="2")
    assert flags.mesh_dim == "1,-1,1,2"  # sp: one shard per 32K tokens of the scaled length


@pytest.mark.parametrize("script", ["run_lwm_text_stage_32k.sh", "run_lwm_vision_stage_chat-32k.sh"])
def test_stage_scripts_append_their_arguments(tmp_path, clean_knobs, script):
    args, flags = _stage_flags(tmp_path, script, "--jax_distributed.process_id=1", "--total_steps=7")
    assert args[-2:] == ["--jax_distributed.process_id=1", "--total_steps=7"]
    assert flags.jax_distributed.process_id == 1 and flags.total_steps == 7  # the last one wins


@pytest.mark.parametrize("script", ["run_lwm_text_stage.sh", "run_lwm_vision_stage.sh"])
def test_stage_scripts_refuse_an_unknown_stage(clean_knobs, script):
    env = dict(os.environ, stage="2k", dataset_path="/d/data.jsonl")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "set stage to one of" in result.stderr and "'2k'" in result.stderr


ARGPARSE_ENTRY_POINTS = ["scripts/train_tokenizer.py", "scripts/create_needle_data.py", "scripts/plot_needle.py",
                         "lwm.corpus", "lwm.reproduce", "lwm.retrieval_data", "lwm.benchmarks.attention",
                         "lwm.benchmarks.checkpoint", "lwm.benchmarks.decode", "lwm.benchmarks.train_step",
                         "lwm.benchmarks.vqgan"]
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for entry in sys.argv[1:]:
    sys.argv = [entry, "--help"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_path(entry, run_name="__main__") if entry.endswith(".py") else \\
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    out[entry] = buffer.getvalue()
print(json.dumps(out))
"""


def test_every_argparse_entry_point_help_has_a_usage_line_and_every_default():
    """--help of every argparse entry point starts with a usage line and shows the default of
    every option that takes a value (argparse leaves options without help text bare)."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, *ARGPARSE_ENTRY_POINTS], capture_output=True,
                          text=True, cwd=root, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert helps["scripts/train_tokenizer.py"].startswith(
        "usage: python scripts/train_tokenizer.py --input=train.jsonl")
    assert "(default: 2048)" in " ".join(helps["scripts/train_tokenizer.py"].split())
    for entry, text in helps.items():
        assert text.startswith("usage: "), (entry, text[:300])
        options = re.split(r"\n(?=  -)", text.split("\noptions:\n", 1)[1])  # one chunk per option
        for option in options:
            first = option.split("\n")[0].strip()
            takes_value = re.match(r"-[-\w]+ [A-Z_{\[]", first) and not first.startswith("-h")
            if takes_value:
                assert "default" in option or "(required)" in option or option.split()[-1] == "required", \
                    (entry, option)
