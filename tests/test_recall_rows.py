"""The key-digit probe of retrieval rows (lwm/recall_rows.py): where each answered number's first
digit is, and the model's prediction of it checked against separate forward passes of its prefix."""
import json

import numpy as np
import pytest

from lwm.recall_rows import (answered_numbers, loss_runs, needle_form, probe_rows, read_rows, row_needles, summarize,
                             summary_table)

ROW = {"fields": "[prompt],answer0,[turn1],answer1",
       "prompt": "You are a helpful assistant. USER: The special magic Oslo number is: 4829173 Some text. The special "
                 "magic Doha number is: 3302981 What is the special magic Doha number? ASSISTANT: ",
       "answer0": "Doha: 3302981.", "turn1": " USER: What is the special magic Oslo number? ASSISTANT: ",
       "answer1": "Oslo: 4829173."}


def _processed(tokenizer, row):
    from lwm.data.processors import TextProcessor

    config = TextProcessor.get_default_config()
    config.fields_from_example = "fields"
    return TextProcessor(config, tokenizer)(row)


def test_loss_runs_are_the_answer_fields():
    assert loss_runs([0, 1, 1, 0, 0, 1, 0, 1]) == [(1, 3), (5, 6), (7, 8)]


def test_answered_numbers_point_at_each_first_digit(tokenizer):
    processed = _processed(tokenizer, ROW)
    needles = row_needles(ROW)
    assert needles == ["4829173", "3302981"]
    numbers = answered_numbers(tokenizer, processed.tokens, processed.loss_masks, needles)
    assert [(a.turn, a.number, a.candidates) for a in numbers] == [(0, "3302981", 2), (1, "4829173", 1)]
    for a in numbers:
        digits = [tokenizer.sp.id_to_piece(int(t)).lstrip("\u2581") for t in processed.tokens[a.position:a.position + 7]]
        assert "".join(digits) == a.number and processed.loss_masks[a.position] == 1
        # the position before it is the answer's own (the ' ' or ':' after the city), not the prompt's
        assert processed.loss_masks[a.position - 1] == 1


def test_predictions_match_a_forward_pass_of_each_prefix(tmp_path, tokenizer):
    # The probe reads every position of a batch of whole rows at once; the reference runs the
    # model on each loss-bearing token's prefix alone and reads the prefix's last position.
    import jax
    import jax.numpy as jnp

    from lwm.loading import load_model
    from tests.helpers import tiny_config

    tiny_config(max_sequence_length=256).save_json(str(tmp_path / "config.json"))
    loaded = load_model(mesh_dim="1,-1,1,1", load_llama_config=f"json::{tmp_path}/config.json", tokenizer="builtin")
    rows = [ROW, {**ROW, "answer0": "3302981.", "answer1": "4829173."}]
    records, token_accuracy = probe_rows(loaded, rows)
    assert [r["row"] for r in records] == [0, 0, 1, 1] and [r["turn"] for r in records] == [0, 1, 0, 1]
    assert {r["form"] for r in records} == {"eval"}
    copies = loaded.mesh.shape["fsdp"]
    logits_of = jax.jit(lambda params, ids: loaded.model.apply({"params": params}, ids).logits)
    for row, row_records, accuracy in zip(rows, (records[:2], records[2:]), token_accuracy):
        processed = _processed(tokenizer, row)
        tokens = processed.tokens.tolist()
        first_digits = {a.position: r for a, r in zip(
            answered_numbers(tokenizer, processed.tokens, processed.loss_masks, row_needles(row)), row_records)}
        hits = []
        for i in np.flatnonzero(processed.loss_masks):
            prefix = tokens[:i] + [tokenizer.pad_token_id] * (-i % 64)
            logits = np.asarray(logits_of(loaded.params, jnp.asarray([prefix] * copies))[0, i - 1], np.float64)
            hits.append(int(np.argmax(logits)) == tokens[i])
            if i in first_digits:
                p = np.exp(logits - logits.max())
                assert first_digits[i]["hit"] == hits[-1]
                assert first_digits[i]["p_first_digit"] == pytest.approx(p[tokens[i]] / p.sum(), rel=1e-4, abs=1e-7)
        assert accuracy == pytest.approx(np.mean(hits)) and len(first_digits) == 2
    json.dumps(records)  # the script writes them as they are


def test_summary_by_hand():
    records = [dict(turn=0, candidates=4, hit=True, p_first_digit=0.5, other_needles_digit=False),
               dict(turn=0, candidates=2, hit=False, p_first_digit=0.1, other_needles_digit=True),
               dict(turn=1, candidates=1, hit=True, p_first_digit=0.9, other_needles_digit=False)]
    summary = summarize(records, [0.5, 1.0])
    assert summary["answer_token_accuracy"] == 0.75
    first = summary["first_turn"]
    assert (first["numbers"], first["first_digit_accuracy"], first["chance"]) == (2, 0.5, 0.375)
    assert first["p_first_digit"] == pytest.approx(0.3) and first["another_needles_digit"] == 0.5
    assert summary["later_turns"]["first_digit_accuracy"] == 1.0 and summary["later_turns"]["chance"] == 1.0


def test_needle_forms_and_the_summary_by_form():
    context = ("The special magic Oslo number is: 4829173 text \nDoha 3302981\n Lima: 1111111 Los Angeles number: "
               "2222222 \nMexico City3333333\n Seoul4444444 9999999")
    assert [needle_form(context, n) for n in ("4829173", "3302981", "1111111", "2222222", "3333333", "4444444",
                                              "9999999")] == ["eval", "short", "short", "short", "adjacent", "adjacent",
                                                              None]
    records = [dict(turn=0, candidates=4, hit=True, form="adjacent", p_first_digit=0.5, other_needles_digit=False),
               dict(turn=1, candidates=2, hit=True, form="adjacent", p_first_digit=0.5, other_needles_digit=False),
               dict(turn=1, candidates=3, hit=False, form="eval", p_first_digit=0.1, other_needles_digit=True),
               dict(turn=2, candidates=1, hit=True, form="eval", p_first_digit=0.9, other_needles_digit=False)]
    by_form = summarize(records, [1.0])["by_form"]
    assert list(by_form) == ["adjacent", "eval"]
    assert (by_form["adjacent"]["numbers"], by_form["adjacent"]["first_digit_accuracy"]) == (2, 1.0)
    assert by_form["adjacent"]["chance"] == pytest.approx(0.375)
    assert by_form["eval"]["first_digit_accuracy"] == 0.5 and by_form["eval"]["chance"] == pytest.approx(2 / 3)
    assert "| eval | 2 | 0.500 |" in summary_table(summarize(records, [1.0]))


def test_read_rows_names_the_line_and_the_count(tmp_path):
    rows, short = tmp_path / "rows.jsonl", tmp_path / "short.jsonl"
    rows.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n" + '{"text": "a haystack line"}\n{oops\n')
    short.write_text(json.dumps(ROW) + "\n")
    assert read_rows(str(rows), 1, 1) == [ROW]
    with pytest.raises(ValueError, match=r"short.jsonl: asked for lines 0..1 \(0-based\), the file has 1 lines"):
        read_rows(str(short), 0, 2)
    with pytest.raises(ValueError, match=r"rows.jsonl, line 3: no 'fields' key"):
        read_rows(str(rows), 1, 2)
    with pytest.raises(ValueError, match=r"rows.jsonl, line 4: not JSON"):
        read_rows(str(rows), 3, 1)
