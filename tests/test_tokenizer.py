"""The tokenizer must rebuild exactly the legacy LLaMA token streams the released vision models
saw (docs/vision_inference.md)."""
import sentencepiece as spm

from lwm.assets import builtin_tokenizer_path


def test_spec_section_11_streams(tokenizer):
    assert tokenizer.encode("<vision>", add_bos=True) == [1, 523, 9824, 28767]
    assert tokenizer.encode("</vision>", add_bos=True) == [1, 1867, 9824, 28767]
    assert tokenizer.encode(" ASSISTANT:", add_bos=True) == [1, 28705, 8602, 8048, 12738, 28747]
    ids = tokenizer.encode("<s>You are a helpful assistant. USER: hi\n", add_bos=True)
    assert ids[:2] == [1, 1]
    sp = spm.SentencePieceProcessor(model_file=builtin_tokenizer_path())
    # After the special token, the rest is plain SentencePiece (legacy behaviour: '▁You').
    assert ids[2:] == sp.encode("You are a helpful assistant. USER: hi\n")
    assert tokenizer.id_to_piece(ids[2]) == "▁You"


def test_special_strings_split_anywhere(tokenizer):
    assert tokenizer.encode("a</s>b") == tokenizer.encode("a") + [2] + tokenizer.encode("b")
    assert tokenizer.encode("x", add_bos=True, add_eos=True) == [1] + tokenizer.encode("x") + [2]


def test_batch_padding_and_truncation(tokenizer):
    a, b = tokenizer.encode("hello world"), tokenizer.encode("a")
    ids, mask = tokenizer.batch_encode(["hello world", "a"], add_bos=False)
    assert ids.shape == (2, len(a))
    assert list(ids[0]) == a and list(ids[1, -len(b):]) == b
    assert mask.tolist() == [[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)]
    ids, mask = tokenizer.batch_encode(["hello world"], max_length=2, add_bos=True, truncation_side="left")
    assert ids.tolist() == [a[-2:]] and mask.tolist() == [[1, 1]]
    ids, _ = tokenizer.batch_encode(["a"], add_bos=True, padding_side="right", pad_to_multiple_of=4)
    assert ids.shape == (1, 4) and ids[0, 0] == 1


def test_decode_round_trip(tokenizer):
    text = "The special magic Paris number is: 1234567."
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True, add_eos=True)) == text
