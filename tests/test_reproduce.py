"""The tiny progressive-context-extension study end to end, at smoke size (accuracy targets are
a benchmark run, not a test): every stage and eval runs through the real entry points, every
artifact appears, the summary parses, and a rerun skips what is done."""
import json
import os
import subprocess
import sys

import pytest

from lwm.mesh import cpu_xla_flags
from lwm.needle import MULTI_ERROR_KINDS, load_results, needle_accuracy

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reproduce(tmp_path, *args):
    # The second seed's steps and evals have the first's shapes: a compilation cache spares their compiles.
    # Its third stage runs 16K-token steps: bound by running, not compiling, so XLA's default code
    # generation instead of the suite's quick compiles (tests/conftest.py) saves time here.
    flags = cpu_xla_flags(8).replace("--xla_backend_optimization_level=0", "")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", WANDB_MODE="disabled",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args = args or ("--seeds=2", f"--results={tmp_path / 'reproduction.json'}", f"--assets={tmp_path / 'assets'}")
    return subprocess.run([sys.executable, "-m", "lwm.reproduce", "--smoke", f"--out={tmp_path / 'out'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_smoke_study_runs_every_stage_and_eval(tmp_path):
    proc = reproduce(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "reproduction.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2", "stage3"]
    assert [s["length"] for s in summary["stages"]] == [summary["first_stage_length"] * k for k in (1, 4, 16)]
    assert [s["init_from"] for s in summary["stages"]] == [None, "stage1", "stage2"]
    assert summary["stages"][0]["theta"] < summary["stages"][1]["theta"] < summary["stages"][2]["theta"]
    assert summary["seeds"] == 2 and len(summary["seed_stages"]) == 2
    for key in ("single_needle_up_to_first_stage", "multi_needle_4_2_at_first_stage",
                "single_needle_up_to_4x_after_extension", "multi_needle_4_2_at_4x_after_extension",
                "single_needle_up_to_16x_after_stage3", "multi_needle_4_2_at_4x", "multi_needle_4_2_at_16x"):
        per_seed = summary[f"{key}_seeds"]  # one value per seed, each from that seed's own results
        assert len(per_seed) == 2 and summary[key] == pytest.approx(sum(per_seed) / 2), key
        low, high = summary[f"{key}_ci95"]  # a 95% bootstrap interval over seeds and cases
        assert 0.0 <= low <= summary[key] <= high <= 1.0, key
        entry = summary["evals"][key]
        if key.startswith("multi"):  # every asked needle's slot is classified (lwm.needle.multi_needle_errors)
            assert sum(entry["errors"][k] for k in MULTI_ERROR_KINDS) == pytest.approx(1.0, abs=1e-3)
            assert entry["errors"]["found"] == pytest.approx(per_seed[0], abs=1e-3)
        assert not os.path.isabs(entry["results"])  # relative to the project: no machine's paths
        assert entry["results_seeds"][0] == entry["results"] and "seed1" in entry["results_seeds"][1]
        for seed, path in enumerate(entry["results_seeds"]):
            results = load_results(os.path.join(ROOT, path))
            assert results and all("correct_strict" in r for r in results)
            assert per_seed[seed] == pytest.approx(sum(needle_accuracy(r, "strict") for r in results) / len(results))
        assert (tmp_path / "assets" / f"{key}.png").exists()
    for stage in summary["stages"] + summary["seed_stages"][1]:
        assert not os.path.isabs(stage["checkpoint"])
        assert os.path.exists(os.path.join(ROOT, stage["checkpoint"])) and stage["wall_s"] > 0
    seed0, seed1 = (os.path.join(ROOT, s["checkpoint"]) for s in (summary["stages"][0], summary["seed_stages"][1][0]))
    assert "seed1" in seed1 and open(seed0, "rb").read() != open(seed1, "rb").read()  # another init and data
    out = tmp_path / "out"
    assert {"train.jsonl", "eval.jsonl"} <= set(os.listdir(out / "data"))
    assert (out / "tokenizer" / "tokenizer.model").exists()
    # stage 1 starts with repeated spans (each answer its prompt's span), then needles
    stage1_data = [json.loads(line) for name in os.listdir(out / "data") if name.startswith("retrieval_stage1_")
                   for line in (out / "data" / name).read_text().splitlines()]
    kinds = ["span" if "Repeat the text above." in x["prompt"] else "needle" for x in stage1_data]
    assert kinds == sorted(kinds, reverse=True) and "span" in kinds and "needle" in kinds
    assert all(x["prompt"].endswith(f" {x['answer0']} Repeat the text above. ASSISTANT: ") for x in stage1_data
               if "Repeat the text above." in x["prompt"])
    # No held-out essay is trained on: no eval paragraph appears in the training split.
    train = set((out / "data" / "train.jsonl").read_text().splitlines())
    assert not train & set((out / "data" / "eval.jsonl").read_text().splitlines())
    assert "main study wall time" in proc.stdout
    # The study's compute is what its stages and evals took, not how long this rerun-able command ran.
    assert summary["total_wall_s"] >= sum(s["wall_s"] for run in summary["seed_stages"] for s in run) > 0
    assert summary["commit"].split("+")[0] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                                             capture_output=True).stdout.strip()
    rerun = reproduce(tmp_path)  # everything is done: skipped, evals resumed with nothing left
    # 3 stages and 7 evals per seed (the smoke run leaves out the two that repeat a kind on the same weights)
    assert rerun.returncode == 0 and rerun.stdout.count("done already") == 20, rerun.stdout[-3000:]

    # --only: one variant stage (its own model) and its evals, nothing of the study again
    study_summary = (tmp_path / "reproduction.json").read_text()
    # (for seed 1 alone: --first_seed)
    only = reproduce(tmp_path, "--seeds=2", "--first_seed=1", "--only=stage1_more_heads")
    assert only.returncode == 0, only.stdout[-3000:] + only.stderr[-3000:]
    assert "stage1: done already" not in only.stdout and "stage1_more_heads: training 3 steps" in only.stdout
    assert not (out / "runs" / "stage1_more_heads").exists()  # seed 0 is not run
    variant = json.loads((out / "only_stage1_more_heads.from_seed1.json").read_text())
    assert variant["seed"] == 1 and variant["first_seed"] == 1
    assert [s["name"] for s in variant["extra_stages"]] == ["stage1_more_heads"] and variant["stages"] == []
    assert set(variant["evals"]) == {"single_needle_up_to_first_stage_more_heads",
                                     "multi_needle_4_2_at_first_stage_more_heads"}
    assert (tmp_path / "reproduction.json").read_text() == study_summary  # the study's summary untouched
    from lwm.checkpoint import load_pickle

    heads = {name: load_pickle(str(out / "seed1" / "runs" / name / "metadata.pkl"))["llama_config"]
             ["num_attention_heads"] for name in ("stage1", "stage1_more_heads")}
    assert heads == {"stage1": 4, "stage1_more_heads": 8}
    # --only with --ablations: an ablation's eval of a stage trained already, for a later seed
    only = reproduce(tmp_path, "--seeds=2", "--first_seed=1", "--only=stage1", "--ablations=no_extension")
    assert only.returncode == 0, only.stdout[-3000:] + only.stderr[-3000:]
    assert "stage1: done already" in only.stdout
    ablation = json.loads((out / "only_stage1.from_seed1.json").read_text())["evals"]["ablation_no_extension_at_4x"]
    assert "seed1" in ablation["results"] and ablation["stage"] == "stage1"
    assert ablation["accuracy"] == pytest.approx(sum(needle_accuracy(r, "strict") for r in load_results(
        os.path.join(ROOT, ablation["results"]))) / len(load_results(os.path.join(ROOT, ablation["results"]))))


def test_a_spread_phase_is_whole_rows_through_the_tokens_the_stage_reads(tmp_path, monkeypatch):
    from lwm import reproduce as study

    stage = dict(name="s", steps=10, batch_size=1, seq_length=1024, curriculum=[
        {"length": 256, "share": 0.5, "needles": [1, 2]}, {"length": 1024, "share": 0.25, "needles": [2, 4]},
        {"length": 128, "share": 0.25, "needles": [1, 1], "spread": True}])
    # 10,240 tokens: 20 + 2 examples used of the ordered phases (7,168 tokens), each phase 10% more; the
    # loader reads the first phase's 23 (5,888 tokens) and 2 of the second's to reach 7,168: 25 examples
    assert study.data_phases(stage) == [
        dict(length=256, needles=[1, 2], used=20, examples=23), dict(length=1024, needles=[2, 4], used=2, examples=3),
        dict(length=128, needles=[1, 1], used=20, examples=24, spread=8, spread_over=25)]  # 3 whole rows of 8
    # an ablation that takes a stage's phases in turn refuses one whose phases are interleaved
    (tmp_path / "tiny_s.json").write_text(json.dumps(stage))
    monkeypatch.setattr(study, "CONFIGS", str(tmp_path))
    with pytest.raises(ValueError, match="c: data_of takes each of s's phases in turn, but s spreads a phase"):
        study.concatenated_data(dict(name="c", data_of=["s"]), "train.jsonl", "tok.model", str(tmp_path / "data"),
                                seed=0, smoke=False)
    assert not (tmp_path / "data").exists()


def test_a_repeated_span_phase_needs_no_needles_and_any_other_phase_does():
    from lwm import reproduce as study

    stage = dict(name="s", steps=10, batch_size=1, seq_length=1024, curriculum=[
        {"length": 256, "share": 0.5, "repeat_spans": True}, {"length": 1024, "share": 0.5, "needles": [2, 4]}])
    assert study.data_phases(stage) == [dict(length=256, needles=None, used=20, examples=23, repeat_spans=True),
                                        dict(length=1024, needles=[2, 4], used=5, examples=6)]
    del stage["curriculum"][1]["needles"]
    with pytest.raises(ValueError, match=r'^s: curriculum phase 1 has no "needles"'):
        study.data_phases(stage)


def test_a_stage_s_own_model_reaches_the_config_and_must_match_the_weights_it_starts_from(tmp_path, monkeypatch):
    from lwm import reproduce as study
    from lwm.config import parse_config_updates

    updates = parse_config_updates(study.model_updates(1088, 10000.0, 64, {"num_attention_heads": 8}))
    assert updates == dict(max_sequence_length=1088, theta=10000.0, scan_query_chunk_size=64, scan_key_chunk_size=64,
                           scan_mlp_chunk_size=256, scan_loss_chunk_size=64, num_attention_heads=8)
    assert "num_attention_heads" not in parse_config_updates(study.model_updates(1088, 10000.0, 64))
    monkeypatch.setattr(study, "CONFIGS", str(tmp_path))
    (tmp_path / "tiny_a.json").write_text(json.dumps(dict(name="a", init_from="")))
    (tmp_path / "tiny_b.json").write_text(json.dumps(dict(name="b", init_from="a", model={"num_attention_heads": 8})))
    with pytest.raises(ValueError, match=r"tiny_b.json: its model \({'num_attention_heads': 8}\) is not a's"):
        study.load_stage("b", smoke=False)


def test_only_refuses_a_stage_whose_start_is_not_trained_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage3_rehearsal", f"--out={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []
    assert f"--only stage3_rehearsal starts from stage2, which is not trained in {tmp_path}; name stage2 before it" \
        in proc.stderr
    # for one later seed alone: its own folder is the one that must hold stage 2
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage3_rehearsal", "--seeds=3",
                           "--first_seed=2", f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []
    assert f"which is not trained in {tmp_path / 'seed2'}; name stage2 before it" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage1", "--seeds=2", "--first_seed=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--first_seed must be below --seeds=2 and goes with --only" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage1", "--publish"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--only runs the named stages alone" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage1", "--ablations=no_staging",
                           f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []
    assert "--ablations no_staging: no stage in --only trains or evaluates it; name ablation_no_staging there" \
        in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage1_more_heads",
                           "--ablations=no_extension", f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # (a) is an eval of stage1, which is not run
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []
    assert "--ablations no_extension: no stage in --only trains or evaluates it; name stage1 there" in proc.stderr


def test_a_stage_started_with_other_settings_stops_the_run_before_any_work(tmp_path):
    from lwm import reproduce as study

    stage = study.load_stage("stage1", smoke=False)
    runs = tmp_path / "runs" / "stage1"
    runs.mkdir(parents=True)
    (runs / "settings.json").write_text(json.dumps(study.stage_settings({**stage, "steps": 400}, seed=0)))
    proc = subprocess.run([sys.executable, "-m", "lwm.reproduce", "--only=stage1", f"--out={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and sorted(os.listdir(tmp_path)) == ["runs"]  # no data, no tokenizer made
    assert (f"{runs} was started with other settings than configs/reproduce/tiny_stage1.json holds now "
            f"(steps: 400 -> {stage['steps']}); move or delete that folder") in proc.stderr
    # the wording and the evals are not settings; the seed is
    changed = dict(stage, description="reworded", evals=[])
    (runs / "settings.json").write_text(json.dumps(study.stage_settings(changed, seed=0)))
    study.check_stage_settings(str(tmp_path), stage, seed=0)
    with pytest.raises(SystemExit, match="seed: 0 -> 1"):
        study.check_stage_settings(str(tmp_path), stage, seed=1)


def test_results_of_retrained_weights_are_set_aside_and_published_copies_name_themselves(tmp_path, monkeypatch):
    import hashlib

    from lwm import reproduce as study
    from lwm.needle import save_results

    checkpoint = tmp_path / "streaming_params"
    checkpoint.write_bytes(b"stage 1 weights")
    scored = dict(load_checkpoint=f"params::{checkpoint}", sha256=hashlib.sha256(b"stage 1 weights").hexdigest(),
                  step=3, run="stage1")
    results = tmp_path / "single.json"
    save_results(str(results), [dict(context_length=256, depth_percent=0.0, seed=0, correct=True, checkpoint=scored)])
    assert study.set_aside_if_stale(str(results), str(checkpoint)) == 1 and results.exists()
    checkpoint.write_bytes(b"stage 1 weights, retrained")
    assert study.set_aside_if_stale(str(results), str(checkpoint)) == 0
    assert not results.exists() and (tmp_path / f"single.stale-{scored['sha256'][:12]}.json").exists()
    save_results(str(results), [dict(context_length=256, depth_percent=0.0, seed=0, correct=True)])  # no identity
    assert study.set_aside_if_stale(str(results), str(checkpoint)) == 0
    assert (tmp_path / "single.stale-unknown.json").exists()

    # --publish: the summary, heatmap and per-case results into docs-like folders, paths relative
    monkeypatch.setattr(study, "ROOT", str(tmp_path))
    evals = tmp_path / "outputs" / "evals"
    evals.mkdir(parents=True)
    scored = dict(scored, load_checkpoint=f"params::{tmp_path}/outputs/runs/stage1/streaming_params")
    save_results(str(evals / "k.json"), [dict(context_length=256, depth_percent=0.0, seed=0, correct=True,
                                              checkpoint=scored)])
    (evals / "k.png").write_bytes(b"\x89PNG")
    summary = {"evals": {"k": {"accuracy": 1.0, "results": "outputs/evals/k.json"}}, "k": 1.0}
    docs = tmp_path / "docs"
    published = study.publish(summary, str(docs / "reproduction.json"), str(docs / "assets"), str(docs / "cases"))
    assert published["evals"]["k"]["results"] == "docs/cases/k.json" and summary["evals"]["k"]["results"] == \
        "outputs/evals/k.json"
    assert json.loads((docs / "reproduction.json").read_text()) == published
    copied = load_results(str(docs / "cases" / "k.json"))  # the same results, the checkpoint named in the project
    assert copied[0]["checkpoint"] == dict(scored, load_checkpoint="params::outputs/runs/stage1/streaming_params")
    assert {k: v for k, v in copied[0].items() if k != "checkpoint"} == \
        {k: v for k, v in load_results(str(evals / "k.json"))[0].items() if k != "checkpoint"}
    assert (docs / "assets" / "k.png").read_bytes() == b"\x89PNG"


def test_published_paths_name_checkpoints_in_the_project_also_through_a_linked_outputs(tmp_path, monkeypatch):
    # Two checkouts sharing one outputs folder (each `outputs` a link to it): a result written by
    # the other checkout names the same file as this one's outputs/ does.
    from lwm import reproduce as study

    shared = tmp_path / "shared_outputs"
    (shared / "runs" / "stage1").mkdir(parents=True)
    for checkout in ("this", "other"):
        (tmp_path / checkout).mkdir()
        (tmp_path / checkout / "outputs").symlink_to(shared)
    monkeypatch.setattr(study, "ROOT", str(tmp_path / "this"))
    assert study.project_relative(f"{tmp_path}/other/outputs/runs/stage1/streaming_params") == \
        "outputs/runs/stage1/streaming_params"
    assert study.project_relative(f"{shared}/runs/stage1/streaming_params") == "outputs/runs/stage1/streaming_params"
    assert study.project_relative(f"{tmp_path}/this/configs/x.json") == "configs/x.json"
    assert study.project_relative(f"{tmp_path}/other/configs/x.json") is None  # not this project's file


def test_an_eval_run_by_fewer_seeds_averages_over_those_it_has(tmp_path, monkeypatch):
    # --ablation_seeds 1: the main study's accuracy is the mean of both seeds, the ablation's is seed 0's alone.
    from lwm import reproduce as study
    from lwm.needle import save_results
    from lwm.stats import bootstrap_interval

    monkeypatch.setattr(study, "ROOT", str(tmp_path))

    def run(seed, found):
        evals = {}
        for key, hits in found.items():
            path = tmp_path / f"seed{seed}" / f"{key}.json"
            path.parent.mkdir(exist_ok=True)
            save_results(str(path), [dict(context_length=256, depth_percent=0.0, seed=i, correct=i < hits,
                                          correct_strict=i < hits) for i in range(10)])
            evals[key] = dict(accuracy=hits / 10, results=f"seed{seed}/{key}.json")
        return dict(seed=seed, stages=[], evals=evals)

    main, ablation = "single_needle_up_to_first_stage", "ablation_no_staging_at_4x"
    summary = study.combine_seeds([run(0, {main: 10, ablation: 3}), run(1, {main: 6})])
    assert summary[main] == pytest.approx(0.8) and summary[f"{main}_seeds"] == [1.0, 0.6]
    assert summary[ablation] == pytest.approx(0.3) and summary[f"{ablation}_seeds"] == [0.3]
    assert summary[f"{ablation}_ci95"] == bootstrap_interval([1.0] * 3 + [0.0] * 7)
    with pytest.raises(SystemExit, match="--ablation_seeds must be between 1 and --seeds=2, got 3"):
        study.reproduce(str(tmp_path / "out"), "", "", ("no_staging",), True, seeds=2, ablation_seeds=3)
    with pytest.raises(SystemExit, match="no ablation named staging; expected some of no_extension, extension_wi"):
        study.reproduce(str(tmp_path / "out"), "", "", ("staging", "no_staging"), True)
    assert not (tmp_path / "out").exists()  # refused before any work
