"""`python -m lwm.reproduce_vision --smoke`: every step and entry point of the vision study runs,
every artifact appears and the summary parses (accuracy targets are for the real study)."""
import collections
import json
import os
import subprocess
import sys

import pytest

from lwm.mesh import cpu_xla_flags

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_caption_s_score_is_the_mean_of_its_draws():
    from lwm.reproduce_vision import per_caption

    results = [dict(truth="a.png"), dict(truth="b.png"), dict(truth="a.png"), dict(truth="b.png"),
               dict(truth="a.png")]
    assert per_caption(results, [1, 0, 0, 0, 1]) == {"a.png": 2 / 3, "b.png": 0.0}  # a: 1, 0, 1; b: 0, 0


def test_a_guidance_gain_pairs_each_caption_with_its_own_unguided_score():
    from lwm.reproduce_vision import guidance_gains, per_caption

    # the three settings' draws come in different orders; a gain is per caption, whatever the order
    unguided = per_caption([dict(truth=t) for t in ("a", "b", "c", "a")], [0.0, 1.0, 0.5, 1.0])  # a 0.5, b 1, c 0.5
    light = per_caption([dict(truth=t) for t in ("c", "b", "a")], [1.0, 0.5, 0.5])
    strong = per_caption([dict(truth=t) for t in ("b", "a", "c")], [1.0, 1.0, 0.0])
    gains = guidance_gains({"text_to_image_attributes_no_cfg": unguided,
                            "text_to_image_attributes_light_cfg": light, "text_to_image_attributes_cfg": strong})
    # in the unguided order a, b, c: light 0.5-0.5, 0.5-1, 1-0.5; strong 1-0.5, 1-1, 0-0.5
    assert gains == {"text_to_image_attributes_gain_light_cfg": [0.0, -0.5, 0.5],
                     "text_to_image_attributes_gain_cfg": [0.5, 0.0, -0.5]}
    with pytest.raises(ValueError, match=r"with cfg and without guidance scored other captions \(\['d'\]"):
        guidance_gains({"text_to_image_attributes_no_cfg": unguided, "text_to_image_attributes_light_cfg": light,
                        "text_to_image_attributes_cfg": {**strong, "d": 1.0}})


def test_smoke_study_runs_every_step_and_eval(tmp_path):
    out = tmp_path / "study"
    # Its stages and evals repeat shapes (the ablation stage, chat and generation per stage): a
    # compilation cache spares the repeated compiles.
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, WANDB_MODE="disabled",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce_vision", "--smoke", f"--out={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "reproduction_vision.json").read_text())
    for key in ("image_qa", "video_needle", "motion_qa", "text_to_image_attributes_cfg",
                "text_to_image_attributes_light_cfg", "text_to_image_attributes_no_cfg",
                "text_to_image_code_agreement_cfg", "text_to_video_motion"):
        assert 0.0 <= summary[key] <= 1.0, key
        low, high = summary[f"{key}_ci95"]  # a 95% bootstrap interval over the eval's cases
        assert 0.0 <= low <= summary[key] <= high <= 1.0, key
    assert summary["video_needle_lengths"] == [8]
    assert set(summary["tokenizer_attribute_code_agreement"]) == {"colour", "shape", "position"}
    ceiling = summary["tokenizer_ceiling"]  # the scorers on the VQGAN's reconstructions of the true media
    assert set(ceiling) == {"text_to_image_attributes", "text_to_image_exact", "text_to_image_code_agreement",
                            "text_to_video_motion"}
    assert all(0.0 <= value <= 1.0 for value in ceiling.values()), ceiling
    reconstructions = out / "evals" / "tokenizer_ceiling"
    assert len(list(reconstructions.glob("*.png"))) == 4 and len(list(reconstructions.glob("*.mp4"))) == 2
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert summary["stages"][1]["mesh_dim"] == "1,2,1,4"  # the long stage runs ring attention over sp = 4
    assert [s["frames_per_example"] for s in summary["stages"]] == ["1-8", "12-16 (and 1-8 replayed)"]
    ablation = summary["ablation"]
    assert ablation["name"] == "masked_packing_off" and ablation["stage"]["mode"] == "no_pad"
    assert ablation["stage"]["tokens"] == summary["stages"][0]["tokens"]  # equal compute
    then = ablation["then_stage2"]  # stage 2 from the naive-packed stage 1, every eval
    assert then["stage"]["name"] == "stage2_after_unmasked" and then["stage"]["mode"] == "packed"
    assert then["stage"]["tokens"] == summary["stages"][1]["tokens"]
    assert 0.0 <= then["results"]["image_qa"] <= 1.0 and 0.0 <= then["results"]["text_to_video_motion"] <= 1.0
    for stage in summary["stages"] + [ablation["stage"], then["stage"]]:
        assert os.path.exists(os.path.join(ROOT, stage["checkpoint"]))  # recorded relative to the project
    for stage in summary["stages"]:  # every eval folder names the weights it scored
        recorded = json.loads((out / "evals" / stage["name"] / "checkpoint.json").read_text()) \
            if (out / "evals" / stage["name"]).exists() else None
        assert recorded is None or recorded["sha256"] == stage["checkpoint_sha256"]
    assert json.loads((out / "evals" / "stage2" / "checkpoint.json").read_text())["step"] == 3
    walls = json.loads((out / "runs" / "wall_seconds.json").read_text())
    assert summary["total_wall_s"] == pytest.approx(sum(walls.values()), abs=0.1) and summary["total_wall_s"] > 0
    assert summary["extra_stages"] == [] and summary["extra_stages_wall_s"] == 0.0  # no --extra asked
    generated = out / "evals" / "stage2" / "generated"
    listed = [json.loads(line) for line in (generated / "generated.jsonl").read_text().splitlines()]
    from lwm.reproduce_vision import GENERATION_DRAWS

    draws = collections.Counter((x["setting"], x["truth"]) for x in listed)  # 4 held-out captions, 2 clips
    assert {setting for setting, _ in draws} == {"cfg", "light_cfg", "no_cfg", "video"}
    assert len(draws) == 4 * 3 + 2 and set(draws.values()) == {GENERATION_DRAWS} and GENERATION_DRAWS > 1
    assert summary["generation_scoring"]["draws"] == GENERATION_DRAWS
    for setting in ("light_cfg", "cfg"):  # each guidance's gain over none, caption by caption
        gain = summary[f"text_to_image_attributes_gain_{setting}"]
        assert gain == pytest.approx(summary[f"text_to_image_attributes_{setting}"]
                                     - summary["text_to_image_attributes_no_cfg"], abs=2e-4)
        low, high = summary[f"text_to_image_attributes_gain_{setting}_ci95"]
        assert -1.0 <= low <= gain <= high <= 1.0
    assert all((generated / x["output_file"]).exists() for x in listed)
    answers = [json.loads(line) for line in (out / "evals" / "stage2" / "qa" / "answers.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in answers} == {"image_qa", "motion_qa", "needle_qa"}
    # the pictures of --publish (written here to a temporary folder, not to docs/)
    from lwm.reproduce_vision import publish

    assets = tmp_path / "assets"
    publish(str(out), summary, str(tmp_path / "published.json"), str(assets))
    assert json.loads((tmp_path / "published.json").read_text()) == summary
    import imageio.v2 as imageio

    gif = imageio.mimread(assets / "text_to_video.gif")
    n_videos = len({x["truth"] for x in listed if x["setting"] == "video"})  # each caption once
    assert len(gif) >= 2 and gif[0].shape[1] == 128 * n_videos + 8 * (n_videos - 1)  # clips side by side, 2x
    assert (assets / "text_to_image.png").stat().st_size > 0 and (assets / "video_needle.png").stat().st_size > 0
    # A second run, with a variant: every step of the study is found done; only the variant trains
    # (from stage 1's weights, on the study's stage-2 lines) and is evaluated, and its time is kept
    # out of the study's.
    again = subprocess.run([sys.executable, "-m", "lwm.reproduce_vision", "--smoke", f"--out={out}",
                            "--extra=stage2_same_theta"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    trained = [line.split("train ")[1].split(":")[0] for line in again.stdout.splitlines() if "] train " in line]
    assert trained == ["stage2_same_theta"], trained
    rerun = json.loads((out / "reproduction_vision.json").read_text())
    (variant,) = rerun["extra_stages"]
    assert variant["start_from"] == "stage1" and variant["stage"]["theta"] == 10000
    assert variant["stage"]["tokens"] == summary["stages"][1]["tokens"] and variant["stage"]["mesh_dim"] == "1,2,1,4"
    assert 0.0 <= variant["results"]["image_qa"] <= 1.0 and 0.0 <= variant["results"]["text_to_video_motion"] <= 1.0
    assert json.loads((out / "evals" / "stage2_same_theta" / "checkpoint.json").read_text())["step"] == 3
    assert rerun["extra_stages_wall_s"] > 0 and rerun["total_wall_s"] < summary["total_wall_s"] + 60
    assert rerun["image_qa"] == summary["image_qa"]  # the study's own results untouched
    shuffled = sorted(p.name for p in (out / "tokens").glob("shuffled_*"))
    assert len(shuffled) == 2, shuffled  # the variant read the study's stage-2 file, not a copy of it



def test_an_eval_folder_holds_one_checkpoints_answers(tmp_path):
    from lwm.reproduce_vision import eval_folder_for

    params = tmp_path / "streaming_params"
    params.write_bytes(b"stage 1")
    folder = tmp_path / "evals" / "stage1"
    assert eval_folder_for(str(folder), str(params)) == str(folder)
    (folder / "qa").mkdir()
    (folder / "qa" / "answers.jsonl").write_text('{"id": "a", "answer": "red"}\n')
    assert eval_folder_for(str(folder), str(params)) == str(folder)  # the same weights: answers kept, resumed
    assert (folder / "qa" / "answers.jsonl").exists()
    first = json.loads((folder / "checkpoint.json").read_text())["sha256"]
    params.write_bytes(b"stage 1, retrained")
    assert eval_folder_for(str(folder), str(params)) == str(folder)
    assert not (folder / "qa").exists()  # a fresh folder for the new weights; the old answers set aside
    assert (tmp_path / "evals" / f"stage1.stale-{first[:12]}" / "qa" / "answers.jsonl").exists()
    assert json.loads((folder / "checkpoint.json").read_text())["sha256"] != first


@pytest.mark.parametrize("name", sorted(os.path.basename(p)[:-5] for p in os.listdir(os.path.join(ROOT, "configs",
                                                                                               "reproduce_vision"))
                                        if p not in ("world.json", "tiny_model.json")))
def test_every_stage_config_is_complete(name):
    from lwm.reproduce_vision import STUDY_STAGES, load_stage

    stage = load_stage(name, smoke=False)
    assert stage["name"] == name and "ablation_of" not in stage  # variants resolved through every base
    assert {"seq_length", "batch_size", "steps", "lr", "end_lr", "theta", "mesh_dim", "mode", "epochs"} <= set(stage)
    if name not in STUDY_STAGES:
        assert stage["what"]  # a variant says what it asks
        assert stage.get("start_from") in (None, *STUDY_STAGES, "stage1_per_token")


def test_an_unknown_extra_or_its_start_stops_before_any_work(tmp_path, capsys):
    from lwm.reproduce_vision import main

    with pytest.raises(SystemExit):
        main([f"--out={tmp_path}", "--extra=stage2_gentle,stage2_nope"])
    assert "--extra stage2_nope: no configs/reproduce_vision/stage2_nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"--out={tmp_path}", "--extra=stage2_after_per_token"])  # its stage 1 variant is not asked for
    assert "its start_from 'stage1_per_token' is not trained before it" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_stage_trained_with_other_settings_stops_before_any_work(tmp_path):
    from lwm.reproduce_vision import load_stage, reproduce, trained_record

    stage2 = load_stage("stage2", smoke=False)
    run_dir = tmp_path / "runs" / "stage2"
    run_dir.mkdir(parents=True)
    # a record from before the whole stage was kept: its steps are compared
    (run_dir / "done.json").write_text(json.dumps({"wall_s": 1.0, "steps": stage2["steps"] + 1}))
    with pytest.raises(SystemExit, match=f"steps: {stage2['steps'] + 1} -> {stage2['steps']}"):
        reproduce(str(tmp_path), str(tmp_path / "summary.json"), smoke=False)
    (run_dir / "done.json").write_text(json.dumps({"wall_s": 1.0, "steps": stage2["steps"],
                                                   "stage": dict(stage2, lr=stage2["lr"] * 2, what="old words")}))
    with pytest.raises(SystemExit, match=r"stage2 was trained with other settings .* \(lr: .*; move or delete"):
        reproduce(str(tmp_path), str(tmp_path / "summary.json"), smoke=False)
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # nothing made before the stop
    (run_dir / "done.json").write_text(json.dumps({"wall_s": 1.0, "steps": stage2["steps"],
                                                   "stage": dict(stage2, what="other words")}))
    assert trained_record(stage2, str(tmp_path))["wall_s"] == 1.0  # the same settings (a variant's words aside)


def test_the_study_s_time_leaves_out_variants(tmp_path):
    from lwm.reproduce_vision import study_wall

    (tmp_path / "runs").mkdir()
    walls = {"vision:world": 1.0, "vision:train stage1": 10.0, "vision:evals stage1": 2.0,
             "vision:train stage2_after_unmasked": 5.0, "vision:train stage2_gentle": 100.0,
             "vision:evals stage2_gentle": 20.0, "vision:train stage2_same_theta": 1000.0, "text:stage1": 7.0}
    (tmp_path / "runs" / "wall_seconds.json").write_text(json.dumps(walls))
    # stage2_same_theta was trained by an earlier run with --extra: in neither sum when not asked for
    assert study_wall(str(tmp_path), extra=("stage2_gentle",)) == (18.0, 120.0)
    assert study_wall(str(tmp_path)) == (18.0, 0.0)
