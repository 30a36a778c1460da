"""Needle evals: insertion at sentence breaks and depths, scoring, resume, multi-needle cases,
plots, haystack data, and an end-to-end run of scripts/eval_needle.py on a tiny random model."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lwm.needle import (CITIES, FINAL_CONTEXT_BUFFER, NEEDLE, NeedleSettings, accuracy_grid, batch_size_for,
                        break_token_ids, check_same_checkpoint, insert_needles, load_results, multi_accuracy_table,
                        multi_case, needle_accuracy, numbers_in, period_token_ids, place_needles, placement_deviation,
                        plot_needle_results, read_haystacks, result_key, run_needle_eval, save_results, score,
                        score_strict, sentence_break_at_or_before, single_case, summary_table)
from tests.helpers import run_script_with_fake_python
from lwm.mesh import cpu_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "dict(hidden_size=64,intermediate_size=96,num_attention_heads=4,max_sequence_length=1024)"


def test_insertion_by_hand():
    # the docstring's worked example: budget 8 cuts the haystack to 6 tokens; 50% of 6 = 3; break after index 1
    assert insert_needles([1, 9, 2, 3, 9, 4, 5, 6], [([7, 7], 50)], 10, {9}, buffer=2) == [1, 9, 7, 7, 2, 3, 9, 4]
    hay = [1, 2, 9, 3, 4, 9, 5, 6, 7, 9, 8, 8]  # breaks after positions 3, 6 and 10
    assert insert_needles(hay, [([0], 0)], 100, {9}, buffer=0)[:2] == [0, 1]  # depth 0: at the start
    assert insert_needles(hay, [([0], 100)], 100, {9}, buffer=0) == hay + [0]  # depth 100: at the end
    assert insert_needles(hay, [([0], 50)], 100, {9}, buffer=0) == hay[:6] + [0] + hay[6:]  # 50% = 6 -> 6
    assert insert_needles(hay, [([0], 75)], 100, {9}, buffer=0) == hay[:6] + [0] + hay[6:]  # 9 -> back to 6
    assert insert_needles(hay, [([0], 90)], 100, {9}, buffer=0) == hay[:10] + [0] + hay[10:]  # int(10.8) = 10
    assert sentence_break_at_or_before([1, 2, 3], 2, {9}) == 0  # no break: the start
    # several needles are placed against the same haystack (in depth order, none cut off)
    got = insert_needles(hay, [([-1], 100), ([-2], 50), ([-3], 0)], 15, {9}, buffer=0)
    assert got == [-3] + hay[:6] + [-2] + hay[6:12] + [-1]
    with pytest.raises(ValueError, match="cannot hold the needles"):
        insert_needles(hay, [([0] * 5, 50)], 204, {9})


def test_actual_depths_and_sentence_end_placement(tokenizer):
    # the worked example: 50% of the cut haystack (6 tokens) is position 3, the break before it is 2: 33.3%
    assert place_needles([1, 9, 2, 3, 9, 4, 5, 6], [([7, 7], 50)], 10, {9}, buffer=2) == (
        [1, 9, 7, 7, 2, 3, 9, 4], [33.3])
    hay = [1, 2, 9, 3, 4, 9, 5, 6, 7, 9, 8, 8]
    assert place_needles(hay, [([-1], 100), ([-2], 75), ([-3], 0)], 15, {9}, buffer=0)[1] == [100.0, 50.0, 0.0]

    # sentence ends other than a lone period: '?', '!' and a period inside a closing quote
    ends = break_token_ids(tokenizer, "sentence_end")
    periods = break_token_ids(tokenizer, "period")
    assert periods < ends
    for text in ("Why?", "Stop!", 'He said "go."'):
        assert tokenizer.encode(text)[-1] in ends, text
    assert not any(t in ends for t in tokenizer.encode("no sentence ends in these words"))
    text = " ".join(f"Is question {i} here?" for i in range(40)) + " The end."
    hay = tokenizer.encode(text)
    needle = tokenizer.encode(NEEDLE.format(city="Paris", number="1234567"))
    # the original's rule finds no period before 50% and puts the needle at the very start;
    # counting every sentence end puts it within one sentence of the labelled depth
    _, (by_period,) = place_needles(hay, [(needle, 50)], 400, periods)
    _, (by_sentence,) = place_needles(hay, [(needle, 50)], 400, ends)
    assert by_period == 0.0 and 45 <= by_sentence <= 50
    records = [dict(depth_percent=50.0, actual_depth_percent=by_period),
               dict(depth_percent=50.0, actual_depth_percent=by_sentence)]
    assert placement_deviation(records) == (round((50 + 50 - by_sentence) / 2, 1), 50.0)
    with pytest.raises(ValueError, match="needle_placement='comma'; expected one of period, sentence_end"):
        NeedleSettings(haystack_file="x", needle_placement="comma")


def test_results_of_another_checkpoint_are_never_mixed_in(tmp_path, haystack_file, tiny_loaded):
    import pickle

    from lwm.checkpoint import checkpoint_identity

    run = tmp_path / "runs" / "stage1"
    run.mkdir(parents=True)
    (run / "streaming_params").write_bytes(b"weights of stage 1")
    (run / "metadata.pkl").write_bytes(pickle.dumps({"step": 40}))
    first = checkpoint_identity(f"params::{run / 'streaming_params'}")
    import hashlib

    assert first == dict(load_checkpoint=f"params::{run / 'streaming_params'}",
                         sha256=hashlib.sha256(b"weights of stage 1").hexdigest(), step=40, run="stage1")
    tok = tiny_loaded.tokenizer
    settings = NeedleSettings(haystack_file=haystack_file, output_file=str(tmp_path / "r.json"),
                              context_lengths_min=300, context_lengths_max=300, n_context_length_intervals=1,
                              n_document_depth_intervals=2, n_rounds=1, max_new_tokens=16, checkpoint=first)
    finder = ScriptedSampler(tok, lambda needles, asked: needles[asked[0]])
    results = run_needle_eval(settings, tiny_loaded, progress=False, sampler=finder)
    assert len(results) == 2 and all(r["checkpoint"] == first for r in results)
    assert all(0 <= r["actual_depth_percent"] <= r["depth_percent"] for r in results)

    (run / "streaming_params").write_bytes(b"weights of stage 1, retrained")  # the same path, other weights
    second = checkpoint_identity(f"params::{run / 'streaming_params'}")
    wider = dataclasses.replace(settings, n_document_depth_intervals=3, checkpoint=second)
    with pytest.raises(ValueError, match=r"r\.json: its results were scored on another checkpoint \(params::.*"
                                         rf"sha256 {first['sha256'][:12]}\.\.\.\), not on .*write to a new --output_file"):
        run_needle_eval(wider, tiny_loaded, progress=False, sampler=finder)
    assert load_results(settings.output_file) == results  # nothing added
    check_same_checkpoint(results, dataclasses.replace(settings, checkpoint=None))  # no identity given: no check
    legacy = [{k: v for k, v in r.items() if k != "checkpoint"} for r in results]
    check_same_checkpoint(legacy, wider)  # results that record no checkpoint are kept


def test_insertion_with_the_tokenizer(tokenizer):
    periods = period_token_ids(tokenizer)
    assert periods == {tokenizer.sp.piece_to_id("."), tokenizer.sp.piece_to_id("\u2581.")}
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    hay = tokenizer.encode(text)
    needle = tokenizer.encode(NEEDLE.format(city="Paris", number="1234567"))
    context_length = 400
    tokens = insert_needles(hay, [(needle, 40)], context_length, periods)
    assert len(tokens) == context_length - FINAL_CONTEXT_BUFFER
    kept = hay[:context_length - FINAL_CONTEXT_BUFFER - len(needle)]
    at = next(i for i in range(len(tokens)) if tokens[i:i + len(needle)] == needle)
    assert at <= int(len(kept) * 0.4) and tokens[at - 1] in periods  # the last break before 40%
    assert not any(t in periods for t in kept[at:int(len(kept) * 0.4)])
    decoded = tokenizer.decode(tokens)
    assert "is here. \nThe special magic Paris number is: 1234567\n Sentence number" in decoded


def test_scoring_and_case_determinism(tokenizer):
    assert score("The special magic number is 1234567.", ["1234567"]) == [True]
    assert score("It is 123456.", ["1234567"]) == [False]
    assert score("Paris: 1111111, Oslo: 2222222", ["2222222", "3333333"]) == [True, False]
    hay = tokenizer.encode(" ".join(f"Line {i} ends." for i in range(200)))
    periods = period_token_ids(tokenizer)
    a = single_case(tokenizer, hay, 300, 50.0, 1, 1234, periods)
    b = single_case(tokenizer, hay, 300, 50.0, 1, 1234, periods)
    assert a.prompt == b.prompt and a.key == (300, 50.0, 1) and a.record["answer"] in a.prompt
    assert a.prompt.startswith("You are a helpful assistant. USER: ") and a.prompt.endswith(
        f"{a.record['question']} Don't give information outside the document or repeat your findings. "
        "Keep your response short and direct. ASSISTANT: ")
    settings = NeedleSettings(haystack_file="x", multi=True, n_needles_total=3, n_needles_retrieve=2,
                              n_document_depth_intervals=5)
    case = multi_case(tokenizer, hay, 400, 0, settings, periods)
    info = case.record["needles_info"]
    assert len(info) == 3 and len({d for _, d in info.values()}) == 3
    assert set(case.record["cities_to_retrieve"]) <= set(info) and len(case.answers) == 2
    for city, (number, _) in info.items():
        assert city in CITIES and NEEDLE.format(city=city, number=number) in case.prompt
    a, b = case.record["cities_to_retrieve"]
    assert case.record["question"] == f"What are the special magic numbers for {a}, and {b}?"


def test_strict_scoring_by_hand():
    listing = "The numbers are 1111111, 2222222, 3333333, 4444444."
    # the original's substring score is fooled by a list, a longer number and listing everything
    assert score(listing, ["3333333"]) == [True] and score("12345678", ["1234567"]) == [True]
    assert score(listing, ["3333333", "4444444"]) == [True, True]
    assert score_strict(listing, ["3333333"]) == [False]  # the first number given is 1111111
    assert score_strict("12345678", ["1234567"]) == [False]  # a different whole number
    assert score_strict(listing, ["3333333", "4444444"]) == [False, False]  # first two are 1111111, 2222222
    assert score_strict(listing, ["2222222", "4444444"]) == [True, False]
    # correct answers, in the forms a model gives them
    assert score_strict("The special magic Paris number is: 1234567.", ["1234567"]) == [True]
    assert score_strict("1,234,567", ["1234567"]) == [True] and score_strict("1234567\n", ["1234567"]) == [True]
    assert score_strict("Oslo: 2222222 and Lima: 1111111. Also 3333333", ["1111111", "2222222"]) == [True, True]
    assert score_strict("", ["1234567"]) == [False] and score_strict("no digits", ["1234567"]) == [False]
    assert numbers_in("1111111,2222222 1,234,567 12,34 7.5") == [1111111, 2222222, 1234567, 12, 34, 7, 5]


def test_settings_grid_batching_and_bad_input(tmp_path, tokenizer):
    s = NeedleSettings(haystack_file="x", context_lengths_min=1000, context_lengths_max=32000,
                       n_context_length_intervals=3, n_document_depth_intervals=3)
    assert s.context_lengths == [1000, 16500, 32000] and s.depth_percents == [0.0, 50.0, 100.0]
    # 5000 tokens / (1024 prompt + 1024 block) = 2 rows -> data dim 8 wins; many rows capped by the cases
    assert batch_size_for(5000, 1024, 1024, 8, 30) == 8
    assert batch_size_for(10 ** 6, 1024, 1024, 8, 30) == 32
    assert batch_size_for(10 ** 6, 1024, 1024, 2, 3) == 4
    with pytest.raises(ValueError, match="n_needles_total=4 needles need as many distinct depths"):
        NeedleSettings(haystack_file="x", multi=True, n_document_depth_intervals=3)
    with pytest.raises(ValueError, match="haystack_file is required"):
        NeedleSettings(haystack_file="")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine."}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected an object with a string field 'text'"):
        read_haystacks(str(bad), tokenizer, 1, 10)
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "One. Two."}\n{"text": "Three."}\n')
    rounds = read_haystacks(str(small), tokenizer, 2, 6)  # wraps around the two lines
    assert all(len(r) >= 6 for r in rounds)
    with pytest.raises(ValueError, match="fewer than the 500 tokens"):
        read_haystacks(str(small), tokenizer, 1, 500)


def fake_result(length, depth, seed, correct, correct_strict=None):
    return dict(context_length=length, depth_percent=depth, seed=seed, answer="1234567", response="PRESET",
                correct=correct, correct_strict=correct if correct_strict is None else correct_strict)


def test_summary_and_plots(tmp_path):
    results = [fake_result(1000, 0.0, 0, True), fake_result(1000, 0.0, 1, False, True),
               fake_result(2000, 100.0, 0, True, False)]
    lengths, depths, grid = accuracy_grid(results)
    assert lengths == [1000, 2000] and depths == [0.0, 100.0]
    np.testing.assert_array_equal(grid, [[1.0, np.nan], [np.nan, 0.0]])  # strict by default
    np.testing.assert_array_equal(accuracy_grid(results, "substring")[2], [[0.5, np.nan], [np.nan, 1.0]])
    assert "| 0 | 1.00 | - |" in summary_table(results) and "score: strict" in summary_table(results)
    assert "| 0 | 0.50 | - |" in summary_table(results, "substring")
    png = plot_needle_results(results, str(tmp_path / "single.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a file written before the strict score: rescored from its responses
    old = [dict(context_length=1000, depth_percent=0.0, seed=i, answer="1234567", response=response, correct=True)
           for i, response in enumerate(["It is 1234567.", "1111111, 1234567", "12345678"])]
    assert accuracy_grid(old)[2][0, 0] == 1 / 3 and accuracy_grid(old, "substring")[2][0, 0] == 1.0
    save_results(str(tmp_path / "old.json"), old)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_needle.py"), str(tmp_path / "old.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| 0 | 0.33 |" in out.stdout and "no response to score strictly" not in out.stdout
    multi = [dict(context_length=1000, needles_info={"A": ["1", 0], "B": ["2", 50]}, correct=[True, False],
                  seed=0, n_needles_total=2, n_needles_retrieve=2),
             dict(context_length=2000, needles_info={"A": ["1", 0], "B": ["2", 50]}, correct=[True, True],
                  seed=0, n_needles_total=2, n_needles_retrieve=2),
             dict(context_length=1000, needles_info={"A": ["1", 0], "B": ["2", 50]}, correct=[False],
                  seed=0, n_needles_total=2, n_needles_retrieve=1)]
    assert multi_accuracy_table(multi) == {(2, 1): {1000: 0.0}, (2, 2): {1000: 0.5, 2000: 1.0}}
    assert "| 2, 2 | 0.50 | 1.00 | 0.75 |" in summary_table(multi)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_needle.py"), str(tmp_path / "m.json"),
                          "--output", str(tmp_path / "m.png")], capture_output=True, text=True)
    assert out.returncode != 0 and "no results" in out.stderr
    save_results(str(tmp_path / "m.json"), multi)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_needle.py"), str(tmp_path / "m.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "m.png") > 1000
    # no correct_strict and no response to rescore: their substring score counts, and the table says so
    assert "3 of 3 results have no response to score strictly" in out.stdout


def test_create_needle_data(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document. It has two sentences.")
    (folder / "sub" / "b.md").write_text("Second one.\n\nWith a paragraph.")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    script = os.path.join(ROOT, "scripts", "create_needle_data.py")
    out = tmp_path / "hay.jsonl"
    run = subprocess.run([sys.executable, script, "--source=files", "--inputs", str(folder),
                          f"--output_path={out}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == [
        "First document. It has two sentences.", "Second one.\n\nWith a paragraph."]
    run = subprocess.run([sys.executable, script, "--source=builtin", "--max_documents=2", f"--output_path={out}"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and len(out.read_text().splitlines()) == 2
    run = subprocess.run([sys.executable, script, "--source=files", "--inputs", str(tmp_path / "missing"),
                          f"--output_path={out}"], capture_output=True, text=True)
    assert run.returncode != 0 and "missing: no such file or folder" in run.stderr


@pytest.fixture(scope="module")
def haystack_file(tmp_path_factory):
    from lwm.corpus import builtin_corpus_documents, write_corpus_jsonl

    path = str(tmp_path_factory.mktemp("hay") / "pg.jsonl")
    write_corpus_jsonl(path, builtin_corpus_documents()[:3], unit="document")
    return path


@pytest.fixture(scope="module")
def tiny_loaded():
    """A tiny random model on a mesh with sp=4 and data dimension 2 (prompts padded to 4 * 32)."""
    from lwm.config import LLaMAConfig
    from lwm.loading import load_model

    flags = LLaMAConfig.get_default_config(dict(scan_query_chunk_size=32, scan_key_chunk_size=32,
                                                scan_mlp_chunk_size=32))
    return load_model(mesh_dim="1,2,1,4", load_llama_config="debug", update_llama_config=TINY, llama_flags=flags,
                      tokenizer="builtin")


def test_resume_skips_finished_cases(tmp_path, haystack_file, tiny_loaded):
    output = str(tmp_path / "results.json")
    settings = NeedleSettings(haystack_file=haystack_file, output_file=output, context_lengths_min=300,
                              context_lengths_max=300, n_context_length_intervals=1, n_document_depth_intervals=3,
                              n_rounds=1, max_new_tokens=8)
    save_results(output, [fake_result(300, 50.0, 0, True)])  # (300, 50%, round 0) is already done
    results = run_needle_eval(settings, tiny_loaded, progress=False)
    assert sorted(result_key(r, False) for r in results) == [(300, 0.0, 0), (300, 50.0, 0), (300, 100.0, 0)]
    assert [r["response"] for r in results].count("PRESET") == 1 and load_results(output) == results
    assert oct(os.stat(output).st_mode & 0o777) != "0o600"
    tok = tiny_loaded.tokenizer
    haystack = read_haystacks(haystack_file, tok, 1, 300)[0]
    for r in results[1:]:  # exactly what a fresh run asks for these cases
        fresh = single_case(tok, haystack, 300, r["depth_percent"], 0, settings.seed, period_token_ids(tok))
        assert {k: r[k] for k in fresh.record} == fresh.record
        assert isinstance(r["correct"], bool) and r["correct"] == (r["answer"] in r["response"])
    again = run_needle_eval(settings, tiny_loaded, progress=False)  # everything done: nothing runs
    assert again == results


def test_multi_needle_run(tmp_path, haystack_file, tiny_loaded):
    settings = NeedleSettings(haystack_file=haystack_file, output_file=str(tmp_path / "multi.json"),
                              context_lengths_min=300, context_lengths_max=300, n_context_length_intervals=1,
                              n_document_depth_intervals=3, n_rounds=3, multi=True, n_needles_total=3,
                              n_needles_retrieve=2, max_new_tokens=8)
    results = run_needle_eval(settings, tiny_loaded, progress=False)
    assert sorted(result_key(r, True) for r in results) == [(300, i, 3, 2) for i in range(3)]
    for r in results:
        assert len(r["needles_info"]) == 3 and len(r["correct"]) == 2
        assert r["correct"] == [a in r["response"] for a in r["answer"]]
    assert os.path.getsize(plot_needle_results(results, str(tmp_path / "multi.png"))) > 1000


class ScriptedSampler:
    """Stands in for the model's sampler: decodes each prompt and answers with answer(needles, asked),
    where needles maps every city in the haystack to its number and asked lists the questioned cities."""

    data_dim = 2

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer, self.calls = tokenizer, answer, 0

    def generate(self, ids, mask, rng, sampling):
        from lwm.generation import GenerationOutput

        self.calls += 1
        rows = []
        for row, row_mask in zip(np.asarray(ids), np.asarray(mask)):
            prompt = self.tokenizer.decode(row[row_mask.astype(bool)])
            needles = dict(re.findall(r"The special magic (.+?) number is: (\d+)", prompt))
            asked = re.search(r"What is the special magic (.+?) number\?|What is the special magic number for (.+?)\?|"
                              r"What are the special magic numbers for (.+?)\?", prompt)
            cities = [c.removeprefix("and ") for c in next(g for g in asked.groups() if g).split(", ")]
            rows.append(self.tokenizer.encode(self.answer(needles, cities))[:sampling.max_new_tokens])
        tokens = np.full((len(rows), sampling.max_new_tokens), sampling.pad_token_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        return GenerationOutput(tokens=tokens, lengths=np.array([len(r) for r in rows], np.int32))


def test_eval_with_a_model_that_finds_the_needles(tmp_path, haystack_file, tiny_loaded):
    """Correct answers score True under both scores; listing every number only under the original's."""
    tok = tiny_loaded.tokenizer
    single = NeedleSettings(haystack_file=haystack_file, output_file=str(tmp_path / "single.json"),
                            context_lengths_min=300, context_lengths_max=400, n_context_length_intervals=2,
                            n_document_depth_intervals=3, n_rounds=2, max_new_tokens=32)
    finder = ScriptedSampler(tok, lambda needles, asked: f"The special magic {asked[0]} number is {needles[asked[0]]}.")
    results = run_needle_eval(single, tiny_loaded, progress=False, sampler=finder)
    assert len(results) == 12 and finder.calls > 0
    for r in results:
        city = re.search(r"magic (.+) number", r["needle"]).group(1)
        assert r["response"] == f"The special magic {city} number is {r['answer']}."
        assert r["correct"] is True and r["correct_strict"] is True
    assert "overall accuracy 1.000 over 12 cases" in summary_table(results).splitlines()

    multi = NeedleSettings(haystack_file=haystack_file, output_file=str(tmp_path / "multi.json"),
                           context_lengths_min=400, context_lengths_max=400, n_context_length_intervals=1,
                           n_document_depth_intervals=4, n_rounds=3, multi=True, n_needles_total=4,
                           n_needles_retrieve=2, max_new_tokens=64)
    finder = ScriptedSampler(tok, lambda needles, asked: ", ".join(f"{c}: {needles[c]}" for c in asked))
    results = run_needle_eval(multi, tiny_loaded, progress=False, sampler=finder)
    assert len(results) == 3 and all(r["correct"] == r["correct_strict"] == [True, True] for r in results)

    # every number of the haystack, the unasked ones first: contains every answer, but not as the first R
    lister = ScriptedSampler(tok, lambda needles, asked: ", ".join(
        [needles[c] for c in needles if c not in asked] + [needles[c] for c in asked]))
    results = run_needle_eval(dataclasses.replace(multi, output_file=str(tmp_path / "lister.json")), tiny_loaded,
                              progress=False, sampler=lister)
    assert len(results) == 3
    for r in results:
        listed = [int(x) for x in r["response"].split(", ")]
        assert len(listed) == 4 and set(listed) == {int(n) for n, _ in r["needles_info"].values()}
        assert r["correct"] == [True, True] and r["correct_strict"] == [False, False]
    assert multi_accuracy_table(results) == {(4, 2): {400: 0.0}}
    assert multi_accuracy_table(results, "substring") == {(4, 2): {400: 1.0}}


def test_needle_eval_past_max_sequence_length_fails_before_decoding(tmp_path, haystack_file, tiny_loaded):
    sampler = ScriptedSampler(tiny_loaded.tokenizer, lambda needles, asked: needles[asked[0]])
    settings = NeedleSettings(haystack_file=haystack_file, output_file=str(tmp_path / "r.json"),
                              context_lengths_min=300, context_lengths_max=2000, n_context_length_intervals=2,
                              n_document_depth_intervals=1, n_rounds=1, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_sequence_length=1024"):
        run_needle_eval(settings, tiny_loaded, progress=False, sampler=sampler)
    assert sampler.calls == 0 and not os.path.exists(tmp_path / "r.json")  # not even the 300-token cases ran


def test_eval_needle_script_end_to_end(tmp_path, haystack_file):
    """scripts/eval_needle.py on a 2 x 2 grid: results JSON, heatmap PNG, summary table."""
    output = tmp_path / "results.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "eval_needle.py"), "--load_llama_config=debug",
           f"--update_llama_config={TINY}", "--llama.scan_query_chunk_size=64", "--llama.scan_key_chunk_size=64",
           "--llama.scan_mlp_chunk_size=64", "--tokenizer=builtin", f"--haystack_file={haystack_file}",
           f"--output_file={output}", "--context_lengths_min=300", "--context_lengths_max=500",
           "--n_context_length_intervals=2", "--n_document_depth_intervals=2", "--n_rounds=1",
           "--max_new_tokens=8", "--max_tokens_per_batch=5000", "--score=substring"]
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(output.read_text())
    assert sorted(result_key(r, False) for r in results) == [(300, 0.0, 0), (300, 100.0, 0), (500, 0.0, 0),
                                                             (500, 100.0, 0)]
    assert all(r["correct"] == (r["answer"] in r["response"]) for r in results)
    assert all(isinstance(r["correct_strict"], bool) for r in results)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| depth % \\ context | 300 | 500 |" in run.stdout and "score: substring" in run.stdout


@pytest.mark.parametrize("script,multi", [("run_eval_needle.sh", False), ("run_eval_needle_multi.sh", True)])
def test_run_scripts_pass_flags_the_evals_accept(tmp_path, script, multi):
    import importlib.util

    from lwm.config import build_config
    from lwm.flags import parse_flags_for_test, tokenizer_spec

    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "lwm_text_checkpoint"})
    assert run.returncode != 0 and "set lwm_text_checkpoint" in run.stderr
    args = run_script_with_fake_python(tmp_path, script, lwm_text_checkpoint="/m/params", haystack_file="/d/pg19.jsonl",
                                 output_file="/o/results.json", llama_tokenizer_path="/m/tokenizer.model")
    name = "eval_needle_multi" if multi else "eval_needle"
    assert args[:2] == ["-u", f"scripts/{name}.py"]
    spec = importlib.util.spec_from_file_location(f"needle_script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the script's flags
    parse_flags_for_test(args[2:])
    flags = module.FLAGS
    assert (flags.haystack_file, flags.output_file, flags.load_checkpoint) == ("/d/pg19.jsonl", "/o/results.json",
                                                                              "params::/m/params")
    assert tokenizer_spec() == "/m/tokenizer.model" and flags.max_tokens_per_batch == 5000
    config = build_config(flags.load_llama_config, flags.llama, flags.update_llama_config, None, flags.mesh_dim)
    assert (config.theta, config.max_sequence_length, config.hidden_size, config.scan_query_chunk_size) == (
        1e7, 131072, 4096, 1024)
    if multi:
        assert (flags.n_needles_total, flags.n_needles_retrieve, flags.n_rounds) == (4, 2, 10)
    else:
        assert (flags.n_context_length_intervals, flags.n_document_depth_intervals, flags.n_rounds) == (20, 20, 3)


def test_length_tick_labels_read_as_people_write_lengths():
    from lwm.needle import _length_label

    assert [_length_label(n) for n in (256, 1000, 2048, 3000, 32768, 131072, 1048576, 1536)] == [
        "256", "1,000", "2K", "3,000", "32K", "128K", "1M", "1,536"]


def test_eval_script_refuses_another_checkpoints_results_before_loading_a_model(tmp_path, haystack_file):
    """The refusal comes from the checkpoint's hash alone: here the 'checkpoint' is not even a
    loadable file, so reaching the model would fail differently."""
    weights = tmp_path / "streaming_params"
    weights.write_bytes(b"other weights")
    output = tmp_path / "results.json"
    save_results(str(output), [dict(fake_result(300, 0.0, 0, True), checkpoint=dict(
        load_checkpoint="params::/old/streaming_params", sha256="ab" * 32, step=5, run="old"))])
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "eval_needle.py"), "--load_llama_config=debug",
           f"--load_checkpoint=params::{weights}", "--tokenizer=builtin", f"--haystack_file={haystack_file}",
           f"--output_file={output}", "--context_lengths_min=300", "--context_lengths_max=300"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, XLA_FLAGS=cpu_xla_flags(1), JAX_PLATFORMS="cpu"))
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert run.returncode != 0 and len(lines) == 1, run.stderr[-2000:]
    assert ("its results were scored on another checkpoint (params::/old/streaming_params, sha256 abababababab...)"
            in lines[0]) and f"not on params::{weights}" in lines[0]
    assert len(load_results(str(output))) == 1  # untouched


def test_multi_needle_errors_name_the_number_returned_instead():
    """Four hand-made multi-needle results (4 needles, 2 asked): each asked needle is found, or
    its slot holds the other asked city's number, an unasked needle's, a number of no needle, or
    nothing; the breakdown counts each by hand."""
    from lwm.needle import multi_errors_line, multi_needle_errors  # noqa: I001 (kept beside its test)

    info = {"Lima": ["1111111", 0.0], "Oslo": ["2222222", 30.0], "Doha": ["3333333", 50.0], "Rome": ["4444444", 90.0]}

    def result(asked, response):
        return dict(needles_info=info, cities_to_retrieve=asked, response=response, context_length=1024,
                    answer=[info[c][0] for c in asked], n_needles_total=4, n_needles_retrieve=2)

    results = [result(["Lima", "Doha"], "1111111, 3333333."),  # both found
               result(["Oslo", "Rome"], "3333333, 4444444."),  # Oslo -> Doha's number (unasked, nearest, after)
               result(["Lima", "Oslo"], "2222222, 2222222."),  # Lima -> Oslo's (asked): said twice
               result(["Doha", "Rome"], "1234567.")]  # Doha -> no needle's number; Rome -> nothing
    errors = multi_needle_errors(results)
    assert errors == dict(found=0.5, other_asked=0.125, distractor=0.125, not_a_needle=0.125, missing=0.125,
                          asked=8, distractor_nearest=1.0, distractor_before=0.0)
    assert "found 0.50" in multi_errors_line(results) and "1.00 the nearest" in multi_errors_line(results)
    assert sum(needle_accuracy(r) for r in results) / 4 == errors["found"]  # the strict score agrees
