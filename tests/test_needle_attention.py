"""The multi-needle attention probe: its attention probabilities are Hugging Face Llama's
`output_attentions` (eager, an independent implementation) on random weights, left padding and
grouped-query heads included; needles are found in a real prompt; the summary's shares are
computed by hand on a made-up case."""
import numpy as np
import pytest
import torch

from lwm.hf_conversion import convert_hf_to_lwm
from lwm.checkpoint import load_streaming
from lwm.llama import LLaMAForCausalLM
from lwm.needle_attention import answer_prefix, attention_probe, find_last, needle_spans, summarize
from tests.test_llama import hf_model


@pytest.mark.parametrize("kv_heads, scan", [(4, True), (2, False)])
def test_probabilities_are_hugging_faces_output_attentions(tmp_path, kv_heads, scan):
    model, path = hf_model(tmp_path, kv_heads=kv_heads, theta=5e4, layers=2)
    config = convert_hf_to_lwm(str(path), str(tmp_path / "params"), str(tmp_path / "config.json"), scan_layers=scan)
    config = config.replace(scan_query_chunk_size=8, scan_key_chunk_size=8, scan_mlp_chunk_size=8)
    params = load_streaming(str(tmp_path / "params"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, (2, 32)).astype(np.int32)
    mask = np.ones((2, 32), np.int32)
    mask[1, :11] = 0  # left padding, as the eval pads its prompts
    queries = np.array([[31, 5, 20], [31, 12, 25]], np.int32)
    probs, logits = attention_probe(LLaMAForCausalLM(config))(params, ids, mask, queries)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0)), output_attentions=True)
    for layer, attn in enumerate(ref.attentions):  # [batch, heads, query, key]
        for b in range(2):
            expected = attn[b][:, queries[b]].numpy()
            assert np.abs(probs[b, layer] - expected).max() < 1e-5, (layer, b)
    assert np.abs(probs[1, :, :, :, :11]).max() == 0  # padding gets no attention
    assert np.abs(logits - ref.logits[:, -1].numpy()).max() < 1e-4


def test_needles_are_found_in_a_prompt_and_shares_are_counted_by_hand(tmp_path):
    from lwm.needle import NEEDLE
    from lwm.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    text = ("You are a helpful assistant. USER: Some text." + NEEDLE.format(city="Cairo", number="1234567") +
            "More text." + NEEDLE.format(city="Lima", number="7654321") + " What are the special magic numbers for "
            "Lima? ASSISTANT: ")
    ids = tok.encode(text, add_bos=True)
    spans = needle_spans(tok, ids, {"Cairo": ["1234567", 0], "Lima": ["7654321", 50]})
    for span, number, city in zip(spans, ("1234567", "7654321"), ("Cairo", "Lima")):
        assert tok.decode(ids[span.end - 7:span.end]) == number
        assert tok.decode(ids[span.city_position:span.city_position + 1]).strip() in city
        assert tok.decode(ids[span.before_digits + 1:span.end]) == number
    assert spans[0].end <= spans[1].start and find_last(ids, tok.encode("Lima")) > spans[1].end
    # The probe reads the position before the first digit: the answer's lead (a sentence answer's
    # 'The special magic Lima number is: ') tokenized as a training answer field is.
    lead = answer_prefix(tok, "7654321", "The special magic Lima number is: ")
    assert lead + tok.encode("7654321")[-7:] == tok.encode("The special magic Lima number is: 7654321")
    assert [tok.sp.id_to_piece(t) for t in answer_prefix(tok, "7654321")] == ["\u2581"]
    assert tok.decode(lead).strip() == "The special magic Lima number is:"

    # Two cases, two needles, 1 layer x 2 heads. Head 0 puts 0.6 / 0.2 on the needles, head 1 0.1 / 0.3.
    def case(asked, first_digit_p):
        return dict(needles=["A", "B"], asked=[asked], distinct_first_digits=True, first_digit_p=first_digit_p,
                    attention_on_needle={"A": [[0.6, 0.1]], "B": [[0.2, 0.3]]}, attention_on_question_city=[[0, 0]],
                    attention_on_first_digit={"A": [[0.2, 0.0]], "B": [[0.4, 0.2]]},
                    needle_to_own_city=[[0.5, 0.1]], needle_to_other_cities=[[0.1, 0.2]])

    summary = summarize([case("A", {"A": 0.3, "B": 0.1}), case("B", {"A": 0.6, "B": 0.2})])
    assert summary["needle_reader_head"] == [0, 0] and summary["needle_reader_mass"] == pytest.approx(0.8)
    assert summary["needle_reader_asked_share"] == pytest.approx((0.75 + 0.25) / 2)
    assert summary["needle_reader_chosen_share"] == pytest.approx(0.75)  # A's digit is the top one both times
    assert summary["needle_best_asked_share"] == pytest.approx(0.5)
    assert summary["first_digit_reader_head"] == [0, 0] and summary["first_digit_reader_mass"] == pytest.approx(0.6)
    assert summary["first_digit_reader_chosen_share"] == pytest.approx(1 / 3)
    (reader,) = summary["first_digit_readers"]  # head 1 puts 0.2 < 0.5 on the digits: not a reader
    assert (reader["layer"], reader["head"], reader["mass"], reader["asked_share"]) == \
        (0, 0, pytest.approx(0.6), pytest.approx(0.5))
    assert list(reader["asked_share_ci95"]) == [pytest.approx(1 / 3, abs=1e-3), pytest.approx(2 / 3, abs=1e-3)]
    assert summary["per_head"]["first_digit_asked_share"] == [[pytest.approx(0.5), pytest.approx(0.5)]]
    assert summary["first_digit_binding"] == pytest.approx((0.75 + 0.25) / 2)
    assert summary["first_digit_picks_asked"] == pytest.approx(0.5)
    assert summary["needle_to_own_city_best"] == 0.5 and summary["needle_to_other_city_same_head"] == 0.1


def test_probe_runs_on_the_evals_prompts(tmp_path, answer_style="sentence"):
    # A tiny random model on the eval's own prompts: a record per case, every needle found, the
    # attention from each probed position a distribution, the summary complete.
    import json

    from lwm.loading import load_model
    from lwm.needle import NeedleSettings
    from lwm.needle_attention import probe_cases
    from tests.helpers import tiny_config

    haystack = tmp_path / "haystack.jsonl"
    haystack.write_text("\n".join(json.dumps({"text": " ".join(f"Line {i} of essay {p} is short." for i in range(60))})
                                  for p in range(4)))
    tiny_config(max_sequence_length=512).save_json(str(tmp_path / "config.json"))
    loaded = load_model(mesh_dim="1,-1,1,1", load_llama_config=f"json::{tmp_path}/config.json", tokenizer="builtin")
    settings = NeedleSettings(haystack_file=str(haystack), context_lengths_min=300, context_lengths_max=300,
                              n_context_length_intervals=1, n_document_depth_intervals=4, n_rounds=3, multi=True,
                              n_needles_total=3, n_needles_retrieve=2, prompt_buffer_tokens=56)
    records = probe_cases(settings, loaded, progress=False, answer_style=answer_style)
    assert [r["seed"] for r in records] == [0, 1, 2] and all(len(r["needles"]) == 3 for r in records)
    for r in records:
        on_needles = np.sum([r["attention_on_needle"][c] for c in r["needles"]], axis=0)  # [layers, heads]
        assert np.all(on_needles > 0) and np.all(on_needles <= 1 + 1e-6)
        assert sum(r["first_digit_p"].values()) <= 1 + 1e-6
    summary = summarize(records)
    assert summary["cases"] == 3 and summary["chance"] == pytest.approx(1 / 3)
    assert np.shape(summary["per_head"]["first_digit_asked_share"]) == (2, 4)
