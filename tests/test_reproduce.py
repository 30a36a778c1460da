"""The tiny progressive-context-extension study end to end, at smoke size (accuracy targets are
a benchmark run, not a test): every stage and eval runs through the real entry points, every
artifact appears, the summary parses, and a rerun skips what is done."""
import json
import os
import subprocess
import sys

import pytest

from lwm.mesh import cpu_xla_flags
from lwm.needle import load_results

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reproduce(tmp_path):
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "lwm.reproduce", "--smoke", f"--out={tmp_path / 'out'}",
                           f"--results={tmp_path / 'reproduction.json'}", f"--assets={tmp_path / 'assets'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_smoke_study_runs_every_stage_and_eval(tmp_path):
    proc = reproduce(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "reproduction.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert summary["stages"][1]["length"] == 4 * summary["first_stage_length"]
    assert summary["stages"][1]["theta"] > summary["stages"][0]["theta"]
    for key in ("single_needle_up_to_first_stage", "single_needle_up_to_4x_after_extension",
                "single_needle_up_to_first_stage_after_extension", "multi_needle_4_2_at_first_stage"):
        assert 0.0 <= summary[key] <= 1.0, key
        assert not os.path.isabs(summary["evals"][key]["results"])  # relative to the project: no machine's paths
        results = load_results(os.path.join(ROOT, summary["evals"][key]["results"]))
        assert results and all("correct_strict" in r for r in results)
        assert (tmp_path / "assets" / f"{key}.png").exists()
    for stage in summary["stages"]:
        assert not os.path.isabs(stage["checkpoint"])
        assert os.path.exists(os.path.join(ROOT, stage["checkpoint"])) and stage["wall_s"] > 0
    out = tmp_path / "out"
    assert {"train.jsonl", "eval.jsonl"} <= set(os.listdir(out / "data"))
    assert (out / "tokenizer" / "tokenizer.model").exists()
    # No held-out essay is trained on: no eval paragraph appears in the training split.
    train = set((out / "data" / "train.jsonl").read_text().splitlines())
    assert not train & set((out / "data" / "eval.jsonl").read_text().splitlines())
    assert "main study wall time" in proc.stdout
    rerun = reproduce(tmp_path)  # everything is done: skipped, evals resumed with nothing left
    assert rerun.returncode == 0 and rerun.stdout.count("done already") == 6, rerun.stdout[-3000:]
