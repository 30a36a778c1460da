"""Every entry point turns a bad input into one line `<program>: <message>` on stderr and exit
status 1, before it builds a model; `--verbose` shows the traceback instead (lwm/cli.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lwm import cli
from lwm.loading import checkpoint_file
from lwm.mesh import cpu_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--load_llama_config=debug", "--tokenizer=builtin"]
# log records, not messages to the user: logging.basicConfig's, absl's and logging's default formats
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|[IWEF]\d{4} \d\d:\d\d:\d\d|(DEBUG|INFO|WARNING|ERROR):)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "hay.jsonl").write_text(json.dumps({"text": "A short haystack. It has two sentences."}) + "\n")
    (folder / "malformed.jsonl").write_text('{"text": "cut off\n' + json.dumps({"text": "fine"}) + "\n")
    (folder / "results.json").write_text("[1, 2")
    return folder


def script(name):
    return [os.path.join(ROOT, "scripts", name)]


def module(name):
    return ["-m", name]


def cases(f):
    """(id, command after `python`, program, what its one line must say)."""
    hay, malformed, missing = f / "hay.jsonl", f / "malformed.jsonl", f / "missing"
    needle = MODEL + [f"--haystack_file={hay}", f"--output_file={f / 'out' / 'results.json'}"]
    return [
        ("eval_needle missing haystack", script("eval_needle.py") + needle + [f"--haystack_file={missing}.jsonl"],
         "eval_needle.py", f"--haystack_file: file not found: {missing}.jsonl"),
        ("eval_needle missing checkpoint", script("eval_needle.py") + needle + [f"--load_checkpoint=params::{missing}"],
         "eval_needle.py", f"--load_checkpoint: file not found: {missing}"),
        ("eval_needle malformed haystack", script("eval_needle.py") + needle + [f"--haystack_file={malformed}"],
         "eval_needle.py", f"{malformed}, line 1: not valid JSON"),
        ("eval_needle bad score", script("eval_needle.py") + needle + ["--score=bogus"],
         "eval_needle.py", "--score='bogus'; expected one of strict, substring"),
        ("eval_needle output under a file", script("eval_needle.py") + needle + [f"--output_file={hay}/results.json"],
         "eval_needle.py", f"--output_file: cannot write {hay}/results.json: {hay} is a file, not a folder"),
        ("eval_needle bad tokenizer", script("eval_needle.py") + needle + [f"--tokenizer={missing}.model"],
         "eval_needle.py", f"tokenizer '{missing}.model': no such file or folder"),
        ("eval_needle_multi missing checkpoint", script("eval_needle_multi.py") + needle +
         ["--n_document_depth_intervals=4", f"--load_checkpoint=trainstate::{missing}"],
         "eval_needle_multi.py", f"--load_checkpoint: file not found: {missing}"),
        ("chat missing checkpoint", module("lwm.chat") + MODEL + ["--prompt=hi",
                                                                  f"--load_checkpoint=params::{missing}"],
         "lwm.chat", f"--load_checkpoint: file not found: {missing}"),
        ("vision_chat missing input", module("lwm.vision_chat") + MODEL +
         ["--prompt=hi", f"--input_file={missing}.png", f"--vqgan_checkpoint={missing}.pkl"],
         "lwm.vision_chat", f"--input_file: file not found: {missing}.png"),
        ("vision_generation missing vqgan", module("lwm.vision_generation") + MODEL +
         [f"--output_file={f / 'x.png'}", f"--vqgan_checkpoint={missing}.pkl"],
         "lwm.vision_generation", f"--vqgan_checkpoint: file not found: {missing}.pkl"),
        ("train missing dataset", module("lwm.train") + ["--tokenizer=builtin", "--train_dataset.type=json",
                                                         f"--train_dataset.json_dataset.path={missing}.jsonl"],
         "lwm.train", f"--train_dataset.json_dataset.path: file not found: {missing}.jsonl"),
        ("convert_lwm_to_hf missing checkpoint", script("convert_lwm_to_hf.py") +
         [f"--load_checkpoint=params::{missing}", "--load_llama_config=debug", f"--output_dir={f / 'hf'}"],
         "convert_lwm_to_hf.py", f"--load_checkpoint: file not found: {missing}"),
        ("convert_hf_to_lwm missing model", script("convert_hf_to_lwm.py") +
         [f"--hf_model={missing}", f"--output_checkpoint={f / 'o'}", f"--output_config={f / 'o.json'}"],
         "convert_hf_to_lwm.py", f"--hf_model: file not found: {missing}/config.json"),
        ("tokenize_vision missing vqgan", script("tokenize_vision.py") +
         [f"--input={hay}", f"--output={f / 'tv.jsonl'}", f"--vqgan_checkpoint={missing}.pkl"],
         "tokenize_vision.py", f"--vqgan_checkpoint: file not found: {missing}.pkl"),
        ("plot_needle malformed results", script("plot_needle.py") + [str(f / "results.json")],
         "plot_needle.py", f"{f / 'results.json'}: not valid JSON"),
        ("train_tokenizer missing input", script("train_tokenizer.py") + [f"--input={missing}.jsonl",
                                                                          f"--output={f / 't.model'}"],
         "train_tokenizer.py", f"{missing}.jsonl: No such file or directory"),
        ("create_needle_data missing input", script("create_needle_data.py") +
         ["--source=files", "--inputs", str(missing), f"--output_path={f / 'h.jsonl'}"],
         "create_needle_data.py", f"input {missing}: no such file or folder"),
        ("corpus bad count", module("lwm.corpus") + [str(f / "corpus"), "999"],
         "lwm.corpus", "eval_documents must be in [1, "),
        # bad flag values (nothing may be written for these either)
        ("eval_needle bad dtype", script("eval_needle.py") + needle + ["--dtype=f32"],
         "eval_needle.py", "--dtype: unknown float dtype 'f32'"),
        ("eval_needle_multi bad rounds", script("eval_needle_multi.py") + needle + ["--n_rounds=0"],
         "eval_needle_multi.py", "--n_rounds must be positive, got 0"),
        ("vision_generation frames for an image", module("lwm.vision_generation") + MODEL +
         [f"--output_file={f / 'out' / 'x.png'}", "--n_frames=2"],
         "lwm.vision_generation", f"--output_file={f / 'out' / 'x.png'} is an image, so --n_frames must be 1"),
        ("tokenize_vision bad vision key", script("tokenize_vision.py") +
         [f"--input={hay}", f"--output={f / 'out' / 'tv.jsonl'}", f"--vqgan_checkpoint={missing}.pkl",
          "--vision_key=codes"], "tokenize_vision.py", "--vision_key='codes' must contain 'vision'"),
        ("convert_lwm_to_hf bad dtype", script("convert_lwm_to_hf.py") +
         [f"--load_checkpoint=params::{hay}", "--load_llama_config=debug", f"--output_dir={f / 'out' / 'hf'}",
          "--dtype=fp8"], "convert_lwm_to_hf.py", "--dtype='fp8': expected one of float32, float16, bfloat16"),
        ("convert_hf_to_lwm bad dtype", script("convert_hf_to_lwm.py") +
         [f"--hf_model={f}", f"--output_checkpoint={f / 'out' / 'o'}", f"--output_config={f / 'out' / 'o.json'}",
          "--float_dtype=f33"], "convert_hf_to_lwm.py", "--float_dtype"),
    ]


CASE_IDS = [c[0] for c in cases(Path("."))]


def run(argv):
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                          stdin=subprocess.DEVNULL)


def messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def tree(folder) -> set[str]:
    """Every file and folder under `folder`, relative to it."""
    return {os.path.relpath(os.path.join(d, n), folder) for d, dirs, names in os.walk(folder) for n in dirs + names}


@pytest.mark.parametrize("case", CASE_IDS)
def test_a_bad_input_is_one_line_before_any_model_is_built(files, case):
    """... and before anything is written: no output file, folder or run folder appears."""
    _, argv, program, named = next(c for c in cases(files) if c[0] == case)
    before = tree(files)
    proc = run(argv)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = messages(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{program}: ") and named in lines[0], proc.stderr[-3000:]
    assert "parameters on mesh" not in proc.stderr  # lwm.loading logs it once a model is built
    assert tree(files) == before, tree(files) - before


TRAIN_DRIVER = """
import json, sys
from lwm import cli, flags
import lwm.train as train
out = []
for argv in json.loads(sys.argv[1]):
    flags.parse_flags_for_test(argv)
    try:
        cli.guarded(train.main, program="lwm.train")(["lwm.train"])
        out.append("no error")
    except SystemExit as e:
        out.append(str(e.code))
print(json.dumps(out))
"""


def test_bad_training_flags_are_one_line_naming_the_flag_and_create_nothing(files):
    """The values a user got wrong (the first four from the issue report): each is one line
    naming its flag, and no run folder, metrics.jsonl or wandb run appears. One process runs
    them all (lwm.train's main on freshly parsed flags), since each would pay jax's start-up."""
    data, out = files / "hay.jsonl", files / "runs"
    base = ["--tokenizer=builtin", "--load_llama_config=debug", "--train_dataset.type=json",
            f"--train_dataset.json_dataset.path={data}", "--train_dataset.text_processor.fields=text",
            "--train_dataset.json_dataset.seq_length=64", "--train_dataset.json_dataset.batch_size=8",
            f"--logger.output_dir={out}", "--logger.experiment_id=run", "--logger.append_uuid=False",
            "--total_steps=1"]
    bad = {
        "--train_dataset.type=jsonl": "--train_dataset.type: unknown dataset type 'jsonl'",
        "--dtype=f32": "--dtype: unknown float dtype 'f32'",
        "--mesh_dim=1,1,1,9": "--mesh_dim: mesh_dim '1,1,1,9' gives",
        "--update_llama_config=__import__('os').system('true')": "--update_llama_config: config updates must be "
                                                                 "dict(key=value, ...)",
        "--llama.scan_query_chunk_size=0": "--llama.scan_query_chunk_size: scan_query_chunk_size must be positive",
        "--llama.attention_impl=flash": "--llama.attention_impl: attention_impl='flash'; expected one of",
        "--optimizer.type=sgd": "--optimizer.type must be one of",
        "--train_dataset.json_dataset.packed=True": "--train_dataset: json_dataset: pad and packed are exclusive",
        "--checkpointer.float_dtype=f16": "--checkpointer.float_dtype: unknown float dtype 'f16'",
    }
    argvs = [base + [flag] + (["--train_dataset.json_dataset.pad=True"] if "packed" in flag else [])
             for flag in bad]
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, WANDB_MODE="offline")
    before = tree(files)
    proc = subprocess.run([sys.executable, "-c", TRAIN_DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json.loads(proc.stdout.strip().splitlines()[-1])
    for (flag, named), line in zip(bad.items(), lines):
        assert line.startswith("lwm.train: ") and named in line and "\n" not in line, (flag, line)
    assert tree(files) == before and not out.exists(), tree(files) - before  # wandb was on: offline, not disabled


@pytest.mark.parametrize("argv", [
    script("eval_needle.py") + MODEL + ["--haystack_file=/nonexistent/hay.jsonl", "--verbose"],
    script("plot_needle.py") + ["/nonexistent/results.json", "--verbose"],
], ids=["absl", "argparse"])
def test_verbose_shows_the_traceback(argv):
    proc = run(argv)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert "/nonexistent/" in proc.stderr.strip().splitlines()[-1]


def test_help_lists_verbose_and_verbosity_is_still_absls():
    proc = run(script("eval_needle.py") + ["--help"])
    assert "  --[no]verbose: on a bad input, show the full traceback" in proc.stdout
    assert "  --haystack_file:" in proc.stdout  # the script's own flags are still listed
    proc = run(script("eval_needle.py") + MODEL + ["--haystack_file=/nonexistent/hay.jsonl", "-v", "1"])
    assert proc.returncode == 1 and messages(proc.stderr) == [
        "eval_needle.py: --haystack_file: file not found: /nonexistent/hay.jsonl"], proc.stderr[-3000:]


# ---- the pieces, in process ------------------------------------------------------------------


def test_user_errors_make_one_line_and_leave_bugs_alone():
    with pytest.raises(SystemExit) as exit_info:
        with cli.user_errors(program="prog"):
            raise ValueError("--x must be\n  positive")
    assert str(exit_info.value) == "prog: --x must be positive"  # SystemExit(str): stderr and exit status 1
    with pytest.raises(SystemExit, match=r"^prog: /a/b: No such file or directory$"):
        with cli.user_errors(program="prog"):
            open("/a/b")
    with pytest.raises(ValueError):  # --verbose: the error itself, traceback and all
        with cli.user_errors(verbose=True, program="prog"):
            raise ValueError("x")
    with pytest.raises(KeyError):  # not a bad input: a bug keeps its traceback
        with cli.user_errors(program="prog"):
            raise KeyError("x")
    with pytest.raises(SystemExit, match="^prog: loss is nan"):
        with cli.user_errors(program="prog", expected=(FloatingPointError,)):
            raise FloatingPointError("loss is nan")


def test_file_checks(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    cli.check_input_files([("--a", str(tmp_path / "a.txt")), ("--unset", "")])
    with pytest.raises(FileNotFoundError, match=f"^--b: file not found: {tmp_path}/b$"):
        cli.check_input_files([("--b", str(tmp_path / "b"))])
    with pytest.raises(FileNotFoundError, match="^--c: is a folder, not a file"):
        cli.check_input_files([("--c", str(tmp_path))])
    cli.check_output_file("--o", str(tmp_path / "new" / "deeper" / "r.json"))  # folders that can be made
    assert not (tmp_path / "new").exists()
    with pytest.raises(IsADirectoryError, match="^--o: .* is a folder"):
        cli.check_output_file("--o", str(tmp_path))
    with pytest.raises(NotADirectoryError, match="a.txt is a file, not a folder"):
        cli.check_output_file("--o", str(tmp_path / "a.txt" / "r.json"))
    assert checkpoint_file("") == "" and checkpoint_file("trainstate_params::/p::q") == "/p::q"
    with pytest.raises(ValueError, match="expected TYPE::PATH with TYPE one of params, trainstate"):
        checkpoint_file("/no/type")


def test_a_multi_process_run_leaves_at_once(monkeypatch, capsys):
    """With jax.distributed up, the line is printed and the process exits without the shutdown
    barrier (os._exit), which would wait for peers that may be blocked in a collective."""
    class Exited(BaseException):
        pass

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setattr(cli, "_multi_process", lambda: True)
    monkeypatch.setattr(cli, "_exit_now", fake_exit)
    with pytest.raises(Exited) as exit_info:
        with cli.user_errors(program="prog"):
            raise FileNotFoundError("--f: file not found: /x")
    assert exit_info.value.args == (1,)
    assert capsys.readouterr().err == "prog: --f: file not found: /x\n"


def test_file_checks_look_up_urls_too(tmp_path):
    """A URL is looked up through its client (here fsspec's in-memory store) before any work:
    an existing object passes, a missing one is one line naming the flag and the URL."""
    import fsspec

    from lwm import cli

    url = "memory://lwm-cli-check/run/streaming_params"
    with fsspec.open(url, "wb") as f:
        f.write(b"x")
    cli.check_input_files([("--load_checkpoint", url)])  # no error
    with pytest.raises(FileNotFoundError, match="--load_checkpoint: no such object: memory://lwm-cli-check/nope"):
        cli.check_input_files([("--load_checkpoint", "memory://lwm-cli-check/nope")])
    with pytest.raises(FileNotFoundError, match="--haystack_file: file not found"):
        cli.check_input_files([("--haystack_file", str(tmp_path / "missing.jsonl"))])
