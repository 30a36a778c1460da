"""HuggingfaceDataset on local files through `datasets`, and the built-in corpus writer."""
import json
import logging
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from lwm.assets import builtin_tokenizer_path
from lwm.corpus import builtin_corpus_documents, split_paragraphs, write_corpus_jsonl
from lwm.data import BATCH_KEYS, DataError, DatasetFactory, Packer

pytest.importorskip("datasets")
SP = spm.SentencePieceProcessor(model_file=builtin_tokenizer_path())
WORDS = "one two three four five six seven eight nine ten apple river stone cloud".split()


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"q": " ".join(rng.choice(WORDS, 3)), "a": " ".join(rng.choice(WORDS, int(rng.integers(1, 14))))}
            for _ in range(n)]


def _reference(rows):
    out = []
    for r in rows:
        tq, ta = SP.encode(r["q"]), SP.encode(r["a"])
        out.append(([1] + tq + ta + [2], [0.0] * (1 + len(tq)) + [1.0] * (len(ta) + 1)))
    return out


def _hf_config(tmp_path, data_files, **dataset):
    cfg = DatasetFactory.get_default_config({"type": "huggingface"})
    cfg.text_processor.fields = "[q],a"
    cfg.huggingface_dataset.update(dict(dict(path="json", name="", data_files=data_files,
                                             cache_dir=str(tmp_path / "hf_cache"), seq_length=16, batch_size=2),
                                        **dataset))
    return cfg


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    rows = _rows(9)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


@pytest.mark.parametrize("streaming", [False, True])
def test_local_json_stream_batches(tokenizer, tmp_path, jsonl, streaming):
    path, rows = jsonl
    ref = _reference(rows)
    tokens = np.concatenate([t for t, _ in ref] * 10)
    loss = np.concatenate([m for _, m in ref] * 10)
    c = 32
    n = sum(len(t) for t, _ in ref) // c + 2  # wraps past the last row
    batches = _take(DatasetFactory.load_dataset(_hf_config(tmp_path, path, streaming=streaming), tokenizer), n)
    for k, (batch, metrics) in enumerate(batches):
        assert sorted(batch) == sorted(BATCH_KEYS)
        assert batch["input_tokens"].ravel().tolist() == tokens[k * c:(k + 1) * c].tolist()
        assert batch["target_tokens"].ravel().tolist() == tokens[k * c + 1:(k + 1) * c + 1].tolist()
        assert batch["loss_masks"].ravel().tolist() == loss[k * c + 1:(k + 1) * c + 1].tolist()
    assert batches[-1][1]["dataset_epoch"] == 1


def test_packed_sharded_and_resumed(tokenizer, tmp_path, jsonl):
    path, rows = jsonl
    cfg = _hf_config(tmp_path, path, packed=True, batch_size=4)
    ds = DatasetFactory.load_dataset(cfg, tokenizer, data_rank=1, data_world=2)
    full = _take(ds, 6)
    # Rank 1 of 2 packs rows 1, 3, 5, 7 (then wraps) into 2-row batches.
    from lwm.data import ProcessedExample

    mine = [ProcessedExample(np.array(t, np.int32), np.array(m, np.float32)) for t, m in _reference(rows)[1::2]]
    packer, expected, i = Packer(16, 2), [], 0
    while len(expected) < 6:
        packer.add(mine[i % len(mine)])
        i += 1
        while packer.ready() and len(expected) < 6:
            expected.append(packer.pop(1)[0])
    for (batch, _), exp in zip(full, expected):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], exp[key], err_msg=key)
    head_ds = DatasetFactory.load_dataset(cfg, tokenizer, data_rank=1, data_world=2)
    head = _take(head_ds, 2)
    resumed = DatasetFactory.load_dataset(cfg, tokenizer, data_rank=1, data_world=2)
    resumed.load_state_dict(pickle.loads(pickle.dumps(head_ds.get_state_dict())))
    for (a, ma), (b, mb) in zip(head + _take(resumed, 4), full):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert ma["dataset_example_index"] == mb["dataset_example_index"]


def test_text_builder_and_problems(tokenizer, tmp_path, caplog):
    path = tmp_path / "lines.txt"
    path.write_text("red fox\nlazy dog sings\n")
    cfg = _hf_config(tmp_path, str(path), path="text")
    cfg.text_processor.fields = "text"
    batch, _ = _take(DatasetFactory.load_dataset(cfg, tokenizer), 1)[0]
    stream = ([1] + SP.encode("red fox") + [2] + [1] + SP.encode("lazy dog sings") + [2]) * 6
    assert batch["input_tokens"].ravel().tolist() == stream[:32]
    # A missing field names the dataset and row, and is counted.
    cfg.text_processor.fields = "q"
    with caplog.at_level(logging.WARNING, logger="lwm.data"), pytest.raises(DataError, match="no usable example"):
        _take(DatasetFactory.load_dataset(cfg, tokenizer), 1)
    assert "huggingface dataset 'text' (-, split 'train') row 1: missing field 'q'" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "b"}\n{oops\n')
    with pytest.raises(DataError, match="could not load .*bad.jsonl.* type=json"):
        DatasetFactory.load_dataset(_hf_config(tmp_path, str(bad)), tokenizer)


def test_builtin_corpus_documents_and_jsonl(tmp_path):
    docs = builtin_corpus_documents()
    assert len(docs) == 49 and docs == sorted(docs)
    names = dict(docs)
    assert "apple" in names and "App Store approval process" in names["apple"]
    out = tmp_path / "sub" / "corpus.jsonl"
    out.parent.mkdir()
    out.write_text("old content\n")  # replaced whole, never appended
    n = write_corpus_jsonl(str(out), docs[:3])
    lines = out.read_text().splitlines()
    assert n == len(lines) > 3 * 5
    texts = [json.loads(line)["text"] for line in lines]
    assert texts == [p for _, text in docs[:3] for p in split_paragraphs(text)]
    assert all(t and t == " ".join(t.split()) for t in texts)
    assert os.listdir(out.parent) == ["corpus.jsonl"]  # no temp file left behind
    assert write_corpus_jsonl(str(out), docs[:3], unit="document") == 3
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [t.strip() for _, t in docs[:3]]
    with pytest.raises(ValueError, match="unit must be one of"):
        write_corpus_jsonl(str(out), docs, unit="sentence")
    with pytest.raises(ValueError, match="no text"):
        write_corpus_jsonl(str(out), ["  \n"])


def test_split_paragraphs_rules():
    # Blank lines and glued sentence ends ("here.Second", closing quote + capital) split; "P.G." does not.
    text = "Title line\n\n\nFirst one\ncontinues here.Second (P.G. Wodehouse) said \"stop.\"Third 2009."
    assert split_paragraphs(text) == ["Title line", "First one continues here.",
                                      "Second (P.G. Wodehouse) said \"stop.\"", "Third 2009."]
