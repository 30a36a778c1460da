"""`python -m lwm.reproduce_vision --smoke`: every step and entry point of the vision study runs,
every artifact appears and the summary parses (accuracy targets are for the real study)."""
import json
import os
import subprocess
import sys

import pytest

from lwm.mesh import cpu_xla_flags

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_study_runs_every_step_and_eval(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce_vision", "--smoke", f"--out={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "reproduction_vision.json").read_text())
    for key in ("image_qa", "video_needle", "motion_qa", "text_to_image_attributes_cfg",
                "text_to_image_attributes_no_cfg", "text_to_image_code_agreement_cfg", "text_to_video_motion"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["video_needle_lengths"] == [8]
    assert set(summary["tokenizer_attribute_code_agreement"]) == {"colour", "shape", "position"}
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert summary["stages"][1]["mesh_dim"] == "1,2,1,4"  # the long stage runs ring attention over sp = 4
    for stage in summary["stages"]:
        assert os.path.exists(os.path.join(ROOT, stage["checkpoint"]))  # recorded relative to the project
    generated = out / "evals" / "stage2" / "generated"
    listed = [json.loads(line) for line in (generated / "generated.jsonl").read_text().splitlines()]
    assert {x["setting"] for x in listed} == {"cfg", "no_cfg", "video"}
    assert all((generated / x["output_file"]).exists() for x in listed)
    answers = [json.loads(line) for line in (out / "evals" / "stage2" / "qa" / "answers.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in answers} == {"image_qa", "motion_qa", "needle_qa"}
    # a second run finds every step done and only rewrites the summary
    again = subprocess.run([sys.executable, "-m", "lwm.reproduce_vision", "--smoke", f"--out={out}"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "train stage" not in again.stdout, again.stdout[-3000:]
