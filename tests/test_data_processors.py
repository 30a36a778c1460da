"""TextProcessor / VisionTextProcessor outputs checked by hand on small examples.

Token ids are those of the LLaMA-style tokenizer (bos 1, eos 2); each one used here is
re-derived from SentencePiece directly in ``test_reference_ids``.
"""
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from lwm.assets import builtin_tokenizer_path
from lwm.data import DataError, TextProcessor, VisionTextProcessor, parse_field_spec

HI, YES, Q_HI, RED, FOX, RED_FOX = [15359, 28804], [5592, 28723], [1186, 28747, 15359, 28804], [2760], [285, 1142], [2760, 285, 1142]
VISION_START, VISION_END = [1, 523, 9824, 28767], [1, 1867, 9824, 28767]


def test_reference_ids():
    sp = spm.SentencePieceProcessor(model_file=builtin_tokenizer_path())
    assert sp.encode("Hi?") == HI and sp.encode("Yes.") == YES and sp.encode("Q: Hi?") == Q_HI
    assert sp.encode("red") == RED and sp.encode("fox") == FOX and sp.encode("red fox") == RED_FOX
    assert (sp.bos_id(), sp.eos_id()) == (1, 2)


def test_text_fields_masks_and_prepend(tokenizer):
    proc = TextProcessor({"fields": "[q],a+b,<|eos|>", "prepend_text": "Q: "}, tokenizer)
    out = proc({"q": "Hi?", "a": "red", "b": "fox"})
    assert out.tokens.tolist() == [1] + Q_HI + RED_FOX + [2] + [2]
    assert out.loss_masks.tolist() == [0.0] + [0.0] * 4 + [1.0] * 3 + [1.0] + [1.0]
    assert out.vision_masks is None and out.tokens.dtype == np.int32 and out.loss_masks.dtype == np.float32


def test_text_special_fields_and_framing(tokenizer):
    proc = TextProcessor({"fields": "[<|bos|>],q,[<|eos|>]", "add_bos_token": False, "add_eos_token": False}, tokenizer)
    out = proc({"q": "Yes."})
    assert out.tokens.tolist() == [1] + YES + [2]
    assert out.loss_masks.tolist() == [0.0, 1.0, 1.0, 0.0]
    # The per-call switches drop the framing tokens too.
    out = TextProcessor({"fields": "q"}, tokenizer)({"q": "Yes."}, add_bos_token=False)
    assert out.tokens.tolist() == YES + [2]


def test_fields_from_example_string_and_list(tokenizer):
    proc = TextProcessor({"fields_from_example": "spec"}, tokenizer)
    out = proc({"spec": "[a],b", "a": "red", "b": "fox"})
    assert out.tokens.tolist() == [1] + RED + FOX + [2]
    assert out.loss_masks.tolist() == [0, 0, 1, 1, 1]
    specs = ["a", "b", "[a],b"]
    expected = {"a": [1] + RED + [2], "b": [1] + FOX + [2], "[a],b": [1] + RED + FOX + [2]}
    picked = set()
    for line in range(12):
        choice = random.Random(line).choice(specs)  # the spec: seeded by the line number
        picked.add(choice)
        ex = {"spec": specs, "a": "red", "b": "fox"}
        assert proc(ex, line_index=line).tokens.tolist() == expected[choice]
        assert proc(ex, line_index=line).tokens.tolist() == expected[choice]  # same line, same pick
    assert len(picked) > 1


def test_field_spec_errors(tokenizer):
    assert parse_field_spec("[q],a+b")[1].keys == ("a", "b")
    for bad in ("a,,b", "[a", "a+", "[a]]"):
        with pytest.raises(DataError, match="field spec"):
            parse_field_spec(bad)
    with pytest.raises(ValueError, match="fields"):
        TextProcessor({}, tokenizer)
    with pytest.raises(ValueError, match="prepend_text"):
        TextProcessor({"fields": "<|bos|>,a", "prepend_text": "x"}, tokenizer)
    proc = TextProcessor({"fields": "a+b"}, tokenizer)
    with pytest.raises(DataError, match="missing field 'b'") as e:
        proc({"a": "x"})
    assert e.value.kind == "missing_field"
    with pytest.raises(DataError, match="field 'a' must be a string, got int") as e:
        proc({"a": 3, "b": "x"})
    assert e.value.kind == "bad_field"
    with pytest.raises(DataError, match="JSON object") as e:
        proc(["a"])
    assert e.value.kind == "malformed_json"


def _vision(tokenizer, **cfg):
    return VisionTextProcessor(dict({"fields_from_example": "fields", "n_tokens_per_frame": 4}, **cfg), tokenizer)


def test_vision_layout_by_hand(tokenizer):
    codes = [10, 11, 12, 13, 20, 21, 22, 23, 30, 31]  # 2 frames of 4 and a partial frame of 2
    out = _vision(tokenizer)({"fields": "[text],vision", "text": "Hi?", "vision": codes})
    body = [10, 11, 12, 13, 8192, 20, 21, 22, 23, 8193]
    assert out.tokens.tolist() == [1] + [1] + HI + VISION_START + body + VISION_END + [2]
    n_text = 1 + 3
    assert out.loss_masks.tolist() == [0.0] * n_text + [1.0] * (4 + 10 + 4) + [1.0]
    assert out.vision_masks.tolist() == [False] * (n_text + 4) + [True] * 10 + [False] * 4 + [False]
    assert out.dropped_vision_codes == 2


def test_a_vision_field_name_with_plus_is_one_key(tokenizer):
    """`vision+extra` names one key holding codes (the original reads the whole entry), not
    two text fields joined."""
    codes = [10, 11, 12, 13, 20, 21, 22, 23]
    out = _vision(tokenizer)({"fields": "[text],vision+extra", "text": "Hi?", "vision+extra": codes})
    body = [10, 11, 12, 13, 8192, 20, 21, 22, 23, 8193]
    assert out.tokens.tolist() == [1] + [1] + HI + VISION_START + body + VISION_END + [2]
    assert out.vision_masks.sum() == 10


def test_vision_no_loss_field_and_prepend(tokenizer):
    codes = list(range(8))
    out = _vision(tokenizer, prepend_text="Q: ", add_bos_token=False)({"fields": "t,[vision],<|eos|>", "t": "Hi?", "vision": codes})
    body = [0, 1, 2, 3, 8192, 4, 5, 6, 7, 8193]
    assert out.tokens.tolist() == [1] + Q_HI + VISION_START + body + VISION_END + [2] + [2]
    assert out.loss_masks.tolist() == [1.0] * 5 + [0.0] * 18 + [1.0, 1.0]
    assert out.dropped_vision_codes == 0


@pytest.mark.parametrize("n_frames,max_frames,kept", [(5, 3, [0, 2, 4]), (6, 4, [0, 1, 3, 5]), (3, 4, [0, 1, 2])])
def test_vision_uniform_frame_sampling(tokenizer, n_frames, max_frames, kept):
    codes = [100 * f + j for f in range(n_frames) for j in range(4)]
    out = _vision(tokenizer, max_n_frames=max_frames, add_bos_token=False, add_eos_token=False)(
        {"fields": "vision", "vision": codes})
    body = out.tokens[out.vision_masks].reshape(len(kept), 5)
    assert body[:, :4].tolist() == [[100 * f + j for j in range(4)] for f in kept]
    assert body[:, 4].tolist() == [8192] * (len(kept) - 1) + [8193]


def test_vision_fields_index_and_list(tokenizer):
    ex = {"fields": ["[t],vision", "vision,t"], "t": "Hi?", "vision": list(range(4))}
    out = _vision(tokenizer, fields_index=1)(ex)
    assert out.tokens.tolist() == [1] + VISION_START + [0, 1, 2, 3, 8193] + VISION_END + [1] + HI + [2]
    for line in range(4):
        choice = random.Random(line).choice(ex["fields"])
        first_text = choice.startswith("[t]")
        out = _vision(tokenizer)(ex, line_index=line)
        assert (out.tokens[1:4].tolist() == [1] + HI) == first_text


@pytest.mark.parametrize("value,match,kind", [
    ([1, 2, 3], "fewer than one frame", "bad_vision"),
    ([1, 2, 3, 4.5], "integer codes", "bad_vision"),
    ([1, 2, 3, 8192], r"\[0, 8192\)", "bad_vision"),
    ("1 2 3 4", "list of codes", "bad_vision"),
])
def test_vision_errors(tokenizer, value, match, kind):
    with pytest.raises(DataError, match=match) as e:
        _vision(tokenizer)({"fields": "vision", "vision": value})
    assert e.value.kind == kind
    with pytest.raises(DataError, match="missing field 'fields'"):
        _vision(tokenizer)({"vision": [1, 2, 3, 4]})
    with pytest.raises(DataError, match="fields_index=3"):
        _vision(tokenizer, fields_index=3)({"fields": ["vision"], "vision": [1, 2, 3, 4]})


def test_processors_pickle_through_model_file(tokenizer):
    ex = {"fields": "t,vision", "t": "red fox", "vision": list(range(4))}
    for proc, example in ((TextProcessor({"fields": "t"}, tokenizer), ex), (_vision(tokenizer), ex)):
        blob = pickle.dumps(proc)
        assert len(blob) < 10_000  # the SentencePiece model is not shipped, only its path
        clone = pickle.loads(blob)
        assert clone.tokenizer.model_file == tokenizer.model_file
        a, b = proc(example), clone(example)
        assert a.tokens.tolist() == b.tokens.tolist() and a.loss_masks.tolist() == b.loss_masks.tolist()
