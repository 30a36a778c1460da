"""`python -m lwm.train` end to end: smoke runs, SIGKILL + autoresume, two processes, NaN stop."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lwm.corpus import builtin_corpus_documents, write_corpus_jsonl
from lwm.logger import read_metrics
from lwm.mesh import cpu_xla_flags

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPDATE = ("dict(vocab_size=32000,hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,"
          "num_key_value_heads=2,max_sequence_length=256,scan_query_chunk_size=16,scan_key_chunk_size=16,"
          "scan_mlp_chunk_size=32,scan_loss_chunk_size=32)")


def env(devices=8):
    e = dict(os.environ, XLA_FLAGS=cpu_xla_flags(devices), JAX_PLATFORMS="cpu",
             WANDB_MODE="disabled", PYTHONPATH=ROOT)
    return e


def train_args(data, out, steps, extra=()):
    return [sys.executable, "-m", "lwm.train", "--modality=text", "--mesh_dim=1,2,1,4", f"--total_steps={steps}",
            "--log_freq=1", f"--update_llama_config={UPDATE}", "--tokenizer=builtin",
            "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
            f"--train_dataset.json_dataset.path={data}", "--train_dataset.json_dataset.seq_length=64",
            "--train_dataset.json_dataset.batch_size=4", "--optimizer.adamw_optimizer.lr=1e-3",
            "--optimizer.adamw_optimizer.lr_warmup_steps=2", f"--logger.output_dir={out}",
            "--logger.experiment_id=run", "--logger.append_uuid=False", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_corpus_jsonl(str(path), builtin_corpus_documents()[:4])
    return str(path)


def losses(path):
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for record in read_metrics(path):
        out[record["step"]] = record["loss"]
    return out


def run(args, devices=8, check=True, timeout=600):
    proc = subprocess.run(args, env=env(devices), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_text_run_writes_checkpoints_and_metrics(corpus, tmp_path):
    run(train_args(corpus, tmp_path, 4, ["--save_model_freq=2", "--save_milestone_freq=4", "--eval_steps=1",
                                         "--eval_dataset.type=json", "--eval_dataset.text_processor.fields=text",
                                         f"--eval_dataset.json_dataset.path={corpus}",
                                         "--eval_dataset.json_dataset.seq_length=64",
                                         "--eval_dataset.json_dataset.batch_size=4"]))
    folder = tmp_path / "run"
    names = set(os.listdir(folder))
    assert {"streaming_params", "metadata.pkl", "dataset.pkl", "streaming_params_4", "metadata_4.pkl",
            "dataset_4.pkl", "metrics.jsonl"} <= names
    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "acc", "learning_rate", "gradient_norm", "param_norm", "tokens_per_second",
                "model_tflops_per_second", "eval_loss", "dataset_total_tokens"):
        assert np.isfinite(records[-1][key]), key
    assert records[0]["loss"] > 10.0  # ln(32000) = 10.37 at initialisation


def test_vision_text_run(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    path = tmp_path / "vision.jsonl"
    with open(path, "w") as f:
        for i in range(6):
            f.write(json.dumps({"vision": rng.integers(0, 8192, 2 * 256).tolist(), "caption": f"frame pair {i}",
                                "fields": "vision,caption"}) + "\n")
    args = [sys.executable, "-m", "lwm.train", "--modality=vision,text", "--mesh_dim=1,2,1,4", "--total_steps=2",
            "--log_freq=1", f"--update_llama_config={UPDATE.replace('max_sequence_length=256', 'max_sequence_length=1024')}",
            "--tokenizer=builtin", "--train_dataset.type=json_vision",
            "--train_dataset.vision_text_processor.fields_from_example=fields",
            f"--train_dataset.json_vision_dataset.path={path}", "--train_dataset.json_vision_dataset.seq_length=1024",
            "--train_dataset.json_vision_dataset.batch_size=2", "--train_dataset.json_vision_dataset.mode=pad",
            f"--logger.output_dir={tmp_path}", "--logger.experiment_id=v", "--logger.append_uuid=False"]
    run(args)
    record = read_metrics(tmp_path / "v" / "metrics.jsonl")[-1]
    assert abs(record["loss"] - 0.5 * (record["vision_loss"] + record["text_loss"])) < 1e-5
    assert record["vision_loss"] > 8.0  # ln(8448) = 9.04 at initialisation


def test_sigkill_and_autoresume_reproduce_the_uninterrupted_run(corpus, tmp_path):
    steps = 10
    resumable = ["--save_model_freq=1", "--checkpointer.save_optimizer_state=True", "--checkpointer.float_dtype=fp32",
                 "--autoresume=True", "--train_dataset.json_dataset.packed=True"]
    run(train_args(corpus, tmp_path / "a", steps, resumable))
    reference = losses(tmp_path / "a" / "run" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, steps + 1))

    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    proc = subprocess.Popen(train_args(corpus, tmp_path / "b", steps, resumable), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and len(read_metrics(metrics)) >= 4:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(metrics))
    assert killed_at < steps
    run(train_args(corpus, tmp_path / "b", steps, resumable))
    resumed = losses(metrics)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(corpus, tmp_path):
    steps = 3
    common = ["--use_data_sharded_loader=False", "--mesh_dim=1,-1,1,1", "--train_dataset.json_dataset.batch_size=8"]
    run(train_args(corpus, tmp_path / "single", steps, common))
    port = free_port()
    procs = []
    for pid in range(2):
        args = train_args(corpus, tmp_path / "multi", steps, common + [
            "--jax_distributed.initialize_jax_distributed=True",
            f"--jax_distributed.coordinator_address=127.0.0.1:{port}", "--jax_distributed.num_processes=2",
            f"--jax_distributed.process_id={pid}"])
        procs.append(subprocess.Popen(args, env=env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-6000:]
    single = losses(tmp_path / "single" / "run" / "metrics.jsonl")
    multi = losses(tmp_path / "multi" / "run" / "metrics.jsonl")
    assert sorted(multi) == [1, 2, 3]
    for step in multi:
        assert abs(multi[step] - single[step]) <= 1e-5 * abs(single[step]), (step, multi[step], single[step])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from lwm.checkpoint import load_pickle, load_streaming

    keep = ["--save_model_freq=1", "--checkpointer.save_optimizer_state=True", "--checkpointer.float_dtype=fp32",
            "--autoresume=True"]
    run(train_args(corpus, tmp_path, 3, keep))  # three good steps, checkpointed
    folder = tmp_path / "run"
    good = load_streaming(str(folder / "streaming_train_state"))
    # Resume with an absurd learning rate: the parameters blow up at step 4.
    proc = run(train_args(corpus, tmp_path, 8, keep + ["--optimizer.adamw_optimizer.lr=1e30",
                                                        "--optimizer.adamw_optimizer.lr_warmup_steps=0",
                                                        "--optimizer.adamw_optimizer.clip_gradient=1e30"]), check=False)
    err = proc.stderr.lower()
    assert proc.returncode != 0
    assert "at step 4; stopping the run (the last good checkpoint (step 3) is kept)" in err, proc.stderr[-3000:]
    assert " is nan" in err or " is inf" in err
    assert load_pickle(str(folder / "metadata.pkl"))["step"] == 3
    after = load_streaming(str(folder / "streaming_train_state"))
    import jax

    jax.tree.map(np.testing.assert_array_equal, after, good)
