"""Associative recall rows (lwm/associative_recall.py): the layout read back by hand, the two
reference levels computed by hand, and the scoring of an oracle and of an eliminating guesser."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lwm.associative_recall import BOS_ID, FILLER_IDS, KEY_IDS, QUERY_ID, RecallTask, recall_batch, score


def _parse(row_ids, task, n, gap=None):
    """(key -> value) of the pairs and the queries' (key, value, first value index), read back
    from a row whose keys stand `gap` (default the task's) tokens from their values."""
    gap = task.gap if gap is None else gap
    item = 1 + gap + task.value_tokens
    assert row_ids[0] == BOS_ID
    pairs = {}
    for i in range(n):
        chunk = row_ids[1 + i * item: 1 + (i + 1) * item]
        assert list(chunk[1:1 + gap]) == list(FILLER_IDS[:gap])
        pairs[int(chunk[0])] = list(chunk[1 + gap:])
    queries, at = [], 1 + n * item
    for _ in range(n):
        assert row_ids[at] == QUERY_ID
        key = int(row_ids[at + 1])
        start = at + 2 + gap
        queries.append((key, list(row_ids[start:start + task.value_tokens]), start))
        at += 1 + item
    return pairs, queries


@pytest.mark.parametrize("value_tokens,gap", [(1, 0), (7, 4)])
def test_rows_ask_every_key_once_and_carry_loss_only_on_the_answers(value_tokens, gap):
    task = RecallTask((3, 3), value_tokens, gap, seq_length=96)
    recall = recall_batch(np.random.default_rng(0), task, 4)
    ids = np.concatenate([recall.batch["input_tokens"], recall.batch["target_tokens"][:, -1:]], axis=1)
    for r in range(4):
        pairs, queries = _parse(ids[r], task, 3)
        assert set(pairs) <= set(KEY_IDS.tolist()) and len(pairs) == 3
        assert sorted(k for k, _, _ in queries) == sorted(pairs)
        expected_loss = np.zeros(task.seq_length)
        expected_first = np.zeros(task.seq_length)
        for key, value, start in queries:
            assert value == pairs[key]
            expected_loss[start - 1:start - 1 + value_tokens] = 1  # targets are the inputs shifted by one
            expected_first[start - 1] = 1
        np.testing.assert_array_equal(recall.batch["loss_masks"][r], expected_loss)
        np.testing.assert_array_equal(recall.first_value[r], expected_first)
    np.testing.assert_array_equal(recall.batch["target_tokens"][:, :-1], recall.batch["input_tokens"][:, 1:])


@pytest.mark.parametrize("value_tokens,queries", [(1, "each_once"), (7, "each_once"), (7, "any")])
def test_reference_levels_by_hand(value_tokens, queries):
    """Each query's two levels recomputed from the row read back: the share of the row's values
    (in_context), or of those no earlier query answered (elimination), whose first token is the
    asked value's. Seven-digit values share first digits, so those levels are not just 1/n."""
    task = RecallTask((2, 5), value_tokens, 1, seq_length=128, queries=queries)
    recall = recall_batch(np.random.default_rng(1), task, 100)
    ids = np.concatenate([recall.batch["input_tokens"], recall.batch["target_tokens"][:, -1:]], axis=1)
    in_context, elimination = [], []
    for r in range(100):
        pairs, asked = _parse(ids[r], task, int(recall.first_value[r].sum()))
        left = list(pairs)
        for key, value, _ in asked:
            in_context.append(sum(pairs[k][0] == value[0] for k in pairs) / len(pairs))
            elimination.append(sum(pairs[k][0] == value[0] for k in left) / len(left))
            if queries == "each_once":
                left.remove(key)
    np.testing.assert_allclose(recall.in_context, in_context)
    np.testing.assert_allclose(recall.elimination, elimination)
    if value_tokens == 7:
        assert max(in_context) > 1 / 2  # some rows' values do share a first digit


def test_an_oracle_scores_one_and_an_eliminating_guesser_scores_the_elimination_level():
    task = RecallTask((2, 5), 1, 2, seq_length=64)
    recall = recall_batch(np.random.default_rng(3), task, 300)
    oracle = score(recall.batch["target_tokens"].copy(), recall)
    assert oracle["first_value_acc"] == 1.0 and oracle["answer_acc"] == 1.0
    # a guesser that picks, for each query, a value of the row no earlier query answered
    rng = np.random.default_rng(4)
    guesses = np.zeros_like(recall.batch["target_tokens"])
    ids = np.concatenate([recall.batch["input_tokens"], recall.batch["target_tokens"][:, -1:]], axis=1)
    for r in range(300):
        n = int(np.sum(recall.first_value[r]))
        pairs, queries = _parse(ids[r], task, n)
        left = list(pairs)
        for key, _, start in queries:
            guesses[r, start - 1] = pairs[left[rng.integers(len(left))]][0]
            left.remove(key)
    guessed = score(guesses, recall)
    assert abs(guessed["first_value_acc"] - guessed["elimination"]) < 0.04, guessed
    assert guessed["elimination"] > guessed["in_context"] + 0.1


def test_rows_of_varied_gaps_read_back_and_score_apart():
    """With max_gap each row has its own gap, the same for all its keys, and every gap of the
    range occurs; scoring a subset of rows counts only their queries and their levels."""
    task = RecallTask((3, 3), 1, 0, max_gap=2, seq_length=40)
    recall = recall_batch(np.random.default_rng(6), task, 60)
    assert set(recall.gaps.tolist()) == {0, 1, 2}
    ids = np.concatenate([recall.batch["input_tokens"], recall.batch["target_tokens"][:, -1:]], axis=1)
    for r in range(60):
        pairs, queries = _parse(ids[r], task, 3, gap=int(recall.gaps[r]))
        assert all(value == pairs[key] for key, value, _ in queries)
    # right on the gap-0 rows only
    predictions = np.where((recall.gaps == 0)[:, None], recall.batch["target_tokens"], 0)
    rows = recall.gaps == 0
    assert score(predictions, recall, rows=rows)["first_value_acc"] == 1.0
    assert score(predictions, recall, rows=~rows)["first_value_acc"] == 0.0
    per_query_rows = np.repeat(np.arange(60), 3)
    sub = score(predictions, recall, rows=~rows)
    assert sub["elimination"] == pytest.approx(recall.elimination[~rows[per_query_rows]].mean())
    with pytest.raises(ValueError, match="max_gap=1"):
        RecallTask((3, 3), 1, 2, max_gap=1)


def test_a_task_that_does_not_fit_names_what_to_change():
    with pytest.raises(ValueError, match="seq_length=32 holds 33"):
        RecallTask((8, 8), 7, 4, seq_length=32)
    with pytest.raises(ValueError, match="pairs=\\(5, 2\\)"):
        RecallTask((5, 2))


def test_queries_drawn_with_replacement_leave_nothing_to_eliminate():
    task = RecallTask((4, 4), 1, 0, seq_length=32, queries="any")
    recall = recall_batch(np.random.default_rng(5), task, 100)
    np.testing.assert_array_equal(recall.elimination, recall.in_context)
    ids = np.concatenate([recall.batch["input_tokens"], recall.batch["target_tokens"][:, -1:]], axis=1)
    repeated = 0
    for r in range(100):
        pairs, queries = _parse(ids[r], task, 4)
        assert all(value == pairs[key] for key, value, _ in queries)
        repeated += len({key for key, _, _ in queries}) < 4
    assert repeated > 50  # 1 - 4!/4^4 = 0.91 of rows ask some key twice


def test_the_script_trains_and_writes_its_curve(tmp_path):
    """A 1-layer model for 4 steps through the script, the first 2 at gap 0, then rows of gap 1
    or 2: the curve (scored on all held-out rows, on those of each gap, and at the first gap),
    the task and the commit written (the file marked complete after the last eval point); a bad
    --pairs or a --first_gap without its steps stops before any compile with the flags named."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "recall.json"
    args = [sys.executable, "scripts/train_associative_recall.py", "--steps=4", "--warmup_steps=1", "--eval_every=2",
            "--eval_rows=64", "--batch_size=16",
            "--update_llama_config=dict(num_hidden_layers=1,hidden_size=32,intermediate_size=64)",
            "--pairs=2,3", "--gap=1", "--max_gap=2", "--first_gap=0", "--first_gap_steps=2", f"--output_file={out}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [p["step"] for p in result["curve"]] == [2, 4] and result["complete"] is True
    assert result["task"] == dict(pairs=[2, 3], value_tokens=1, gap=1, max_gap=2, seq_length=32, queries="each_once")
    assert result["commit"] and result["model"]["num_hidden_layers"] == 1
    assert result["model"]["scan_query_chunk_size"] == 32  # one attention chunk per row
    assert result["train"]["first_gap"] == 0 and result["train"]["first_gap_steps"] == 2
    for point in result["curve"]:
        assert sorted(point["by_gap"]) == ["1", "2"]
        for scored in (point, point["at_first_gap"], *point["by_gap"].values()):
            assert 0 <= scored["first_value_acc"] <= 1 and scored["in_context"] < scored["elimination"]
    bad = subprocess.run(args[:2] + ["--pairs=4"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--pairs='4'" in bad.stderr, bad.stderr[-2000:]
    bad = subprocess.run(args[:2] + ["--first_gap=0"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--first_gap=0 --first_gap_steps=0" in bad.stderr, bad.stderr[-2000:]
