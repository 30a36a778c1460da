"""JSON / JSON-vision datasets end to end: batch contents in every layout, multi-process
reading, exact resume, original dataset.pkl compatibility, and malformed inputs.

References are built independently: token ids from SentencePiece directly, streams and rows
by numpy slicing of the concatenated examples.
"""
import json
import logging
import multiprocessing
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from ml_collections import ConfigDict

from lwm.assets import builtin_tokenizer_path
from lwm.data import (BATCH_KEYS, DataError, DatasetFactory, JsonDataset, Packer, PadRows,
                      ProcessedExample)

WORDS = "the red fox jumps over a lazy dog while seven tired birds sing about rivers and stone".split()
SP = spm.SentencePieceProcessor(model_file=builtin_tokenizer_path())
VISION_START, VISION_END = [1, 523, 9824, 28767], [1, 1867, 9824, 28767]


def _texts(n, seed=0, max_words=12):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words + 1)))) for _ in range(n)]


def _write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode())
    return str(path)


def _qa_file(tmp_path, n=30, seed=0, long_every=0):
    qs, answers = _texts(n, seed), _texts(n, seed + 1)
    if long_every:
        answers = [" ".join([a] * 6) if i % long_every == 0 else a for i, a in enumerate(answers)]
    rows = [json.dumps({"q": q, "a": a}) for q, a in zip(qs, answers)]
    return _write_lines(tmp_path / "qa.jsonl", rows), list(zip(qs, answers))


def _qa_reference(pairs):
    """[bos] [q] a [eos] with q loss-free, built from SentencePiece directly."""
    out = []
    for q, a in pairs:
        tq, ta = SP.encode(q), SP.encode(a)
        tokens = [1] + tq + ta + [2]
        loss = [0.0] + [0.0] * len(tq) + [1.0] * len(ta) + [1.0]
        out.append(ProcessedExample(np.array(tokens, np.int32), np.array(loss, np.float32)))
    return out


def _config(path, **dataset):
    cfg = DatasetFactory.get_default_config({"type": "json"})
    cfg.text_processor.fields = "[q],a"
    cfg.json_dataset.path = path
    cfg.json_dataset.update(dict(dict(seq_length=16, batch_size=2), **dataset))
    return cfg


def _take(dataset, n):
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (a, ma), (b, mb) in zip(batches_a, batches_b):
        assert sorted(a) == sorted(BATCH_KEYS) == sorted(b)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        for key in ("dataset_example_index", "dataset_total_tokens", "dataset_file_loc", "dataset_epoch"):
            assert ma[key] == mb[key], key


def _layout_reference(layout, examples, n_batches):
    out, i = [], 0
    while len(out) < n_batches:
        layout.add(examples[i % len(examples)])
        i += 1
        while layout.ready() and len(out) < n_batches:
            out.append(layout.pop(1)[0])
    return out


def test_stream_batches_are_the_concatenated_examples_and_wrap(tokenizer, tmp_path):
    path, pairs = _qa_file(tmp_path, n=6)
    ref = _qa_reference(pairs)
    tokens = np.concatenate([e.tokens for e in ref] * 20)
    loss = np.concatenate([e.loss_masks for e in ref] * 20)
    n_file_tokens = sum(len(e) for e in ref)
    c = 2 * 16
    n = n_file_tokens // c + 3  # past the end of the file: it wraps to line 0
    batches = _take(DatasetFactory.load_dataset(_config(path), tokenizer), n)
    for k, (batch, metrics) in enumerate(batches):
        assert batch["input_tokens"].dtype == np.int32 and batch["loss_masks"].dtype == np.float32
        assert batch["segment_ids"].dtype == np.int32 and batch["input_vision_masks"].dtype == bool
        assert batch["input_tokens"].ravel().tolist() == tokens[k * c:(k + 1) * c].tolist()
        assert batch["target_tokens"].ravel().tolist() == tokens[k * c + 1:(k + 1) * c + 1].tolist()
        assert batch["loss_masks"].ravel().tolist() == loss[k * c + 1:(k + 1) * c + 1].tolist()
        assert (batch["segment_ids"] == 1).all() and not batch["target_vision_masks"].any()
        assert batch["positions"].tolist() == [list(range(16))] * 2
        assert metrics["dataset_total_tokens"] == (k + 1) * c
    assert batches[-1][1]["dataset_epoch"] == 1


@pytest.mark.parametrize("layout", ["pad", "packed"])
def test_pad_and_packed_batches(tokenizer, tmp_path, layout):
    path, pairs = _qa_file(tmp_path, n=12, long_every=5)
    ref = _qa_reference(pairs)
    cfg = _config(path, pad=layout == "pad", packed=layout == "packed", batch_size=3)
    batches = _take(DatasetFactory.load_dataset(cfg, tokenizer), 6)
    if layout == "pad":
        for k, (batch, metrics) in enumerate(batches):
            for r in range(3):
                ex = ref[(3 * k + r) % len(ref)].tokens[:17]  # one example per row, truncated to 16 pairs
                n = len(ex) - 1
                assert batch["input_tokens"][r].tolist() == ex[:-1].tolist() + [1] * (16 - n)
                assert batch["target_tokens"][r].tolist() == ex[1:].tolist() + [1] * (16 - n)
                assert batch["segment_ids"][r].tolist() == [1] * n + [0] * (16 - n)
        assert batches[-1][1]["dataset_truncated_examples"] == sum(len(e) > 17 for e in ref) + sum(
            len(e) > 17 for e in ref[:6])
    else:
        expected = _layout_reference(Packer(16, 3), ref, 6)
        for (batch, metrics), exp in zip(batches, expected):
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(batch[key], exp[key], err_msg=key)
        assert batches[-1][1]["dataset_split_examples"] > 0
        assert 0 < batches[0][1]["dataset_batch_fill"] <= 1


def test_packed_loss_weighting_per_token(tokenizer, tmp_path):
    """packed_loss_weighting="token": the same rows as LWM's packing, but every loss-bearing
    target weighs 1 instead of 1/(its example's loss-bearing targets); an unknown value is one line."""
    path, pairs = _qa_file(tmp_path, n=12, long_every=5)
    per_example = _take(DatasetFactory.load_dataset(_config(path, packed=True, batch_size=3), tokenizer), 4)
    per_token = _take(DatasetFactory.load_dataset(_config(path, packed=True, batch_size=3,
                                                          packed_loss_weighting="token"), tokenizer), 4)
    for (a, _), (b, _) in zip(per_example, per_token):
        for key in BATCH_KEYS:
            if key != "loss_masks":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_array_equal(b["loss_masks"], (a["loss_masks"] > 0).astype(np.float32))
        for r in range(3):  # per example: its weights sum to 1 (or to the share of it in this row)
            for segment in set(a["segment_ids"][r].tolist()) - {0}:
                in_segment = a["segment_ids"][r] == segment
                assert a["loss_masks"][r][in_segment].sum() <= 1 + 1e-6
    assert any((a["loss_masks"] != b["loss_masks"]).any() for (a, _), (b, _) in zip(per_example, per_token))
    with pytest.raises(ValueError, match="packed_loss_weighting='tokens'; expected one of example, token"):
        DatasetFactory.load_dataset(_config(path, packed=True, packed_loss_weighting="tokens"), tokenizer)


def test_always_start_with_bos(tokenizer, tmp_path):
    path, _ = _qa_file(tmp_path, n=6)
    batches = _take(DatasetFactory.load_dataset(_config(path, always_start_with_bos=True), tokenizer), 3)
    assert all((b["input_tokens"][:, 0] == 1).all() for b, _ in batches)


def test_data_sharded_reading(tokenizer, tmp_path):
    path, pairs = _qa_file(tmp_path, n=20, seed=3)
    ref = _qa_reference(pairs)
    for rank in range(2):
        ds = DatasetFactory.load_dataset(_config(path, batch_size=4, pad=True), tokenizer, data_rank=rank, data_world=2)
        assert ds.local_batch_size == 2
        batches = _take(ds, 3)
        expected = _layout_reference(PadRows(16, 2), ref[rank::2], 3)
        for (batch, metrics), exp in zip(batches, expected):
            np.testing.assert_array_equal(batch["input_tokens"], exp["input_tokens"])
        assert batches[-1][1]["dataset_example_index"] == 2 * 5 + rank  # lines rank, rank+2, ...
    # Without the sharded loader every process reads everything, with the whole batch.
    ds = DatasetFactory.load_dataset(_config(path, batch_size=4, pad=True, use_data_sharded_loader=False),
                                     tokenizer, data_rank=1, data_world=2)
    assert ds.local_batch_size == 4
    np.testing.assert_array_equal(_take(ds, 1)[0][0]["input_tokens"],
                                  _layout_reference(PadRows(16, 4), ref, 1)[0]["input_tokens"])
    with pytest.raises(ValueError, match="batch_size=3 is the global batch"):
        DatasetFactory.load_dataset(_config(path, batch_size=3), tokenizer, data_rank=0, data_world=2)
    with pytest.raises(ValueError, match="data_rank=2"):
        DatasetFactory.load_dataset(_config(path), tokenizer, data_rank=2, data_world=2)


def _resume_file(tmp_path):
    qs, answers = _texts(9, 5), _texts(9, 6)
    answers[4] = " ".join(WORDS * 2)  # longer than a row: truncated (pad) or split (packed)
    rows = [json.dumps({"q": q, "a": a}) for q, a in zip(qs, answers)]
    rows.insert(3, "{not json")
    rows.insert(6, "")  # a blank line (its marker must survive the trip through worker processes)
    return _write_lines(tmp_path / "resume.jsonl", rows)


@pytest.mark.parametrize("layout", ["stream", "pad", "packed"])
def test_resume_continues_at_the_exact_next_batch(tokenizer, tmp_path, layout):
    path = _resume_file(tmp_path)
    cfg = _config(path, pad=layout == "pad", packed=layout == "packed", batch_size=2)
    n = 14  # several passes over the 10-line file
    full = _take(DatasetFactory.load_dataset(cfg, tokenizer), n)
    assert full[-1][1]["dataset_epoch"] >= 1
    for k in (1, 4, 9):
        ds = DatasetFactory.load_dataset(cfg, tokenizer)
        it = iter(ds)
        head = [next(it) for _ in range(k)]
        state = pickle.loads(pickle.dumps(ds.get_state_dict()))
        resumed = DatasetFactory.load_dataset(cfg, tokenizer)
        resumed.load_state_dict(state)
        _assert_same(head + _take(resumed, n - k), full)
        assert len(pickle.dumps(state)) < 20_000


def test_resume_with_tokenizer_processes(tokenizer, tmp_path):
    path = _resume_file(tmp_path)
    cfg = _config(path, packed=True, batch_size=2)
    n, k = 10, 4
    full = _take(DatasetFactory.load_dataset(cfg, tokenizer), n)
    cfg.json_dataset.update(tokenizer_processes=2, tokenizer_parallel_batch_size=3, tokenizer_parallel_chunk_size=2)
    ds = DatasetFactory.load_dataset(cfg, tokenizer)
    it = iter(ds)
    head = [next(it) for _ in range(k)]
    assert len(multiprocessing.active_children()) == 2
    state = pickle.loads(pickle.dumps(ds.get_state_dict()))
    it.close()  # ends the worker pool
    assert multiprocessing.active_children() == []
    resumed = DatasetFactory.load_dataset(cfg, tokenizer)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(n - k)]
    it.close()
    _assert_same(head + tail, full)
    assert tail[-1][1]["dataset_blank_lines"] == full[-1][1]["dataset_blank_lines"] >= 1
    assert tail[-1][1]["dataset_malformed_json_lines"] == full[-1][1]["dataset_malformed_json_lines"] >= 1


@pytest.mark.parametrize("mode", ["no_pad", "packed"])
def test_vision_resume(tokenizer, tmp_path, mode):
    rng = np.random.default_rng(0)
    rows = [json.dumps({"fields": "[t],vision", "t": t, "vision": rng.integers(0, 8192, 4 * int(rng.integers(1, 4))).tolist()})
            for t in _texts(7, 9)]
    path = _write_lines(tmp_path / "v.jsonl", rows)
    cfg = DatasetFactory.get_default_config({"type": "json_vision"})
    cfg.vision_text_processor.update(fields_from_example="fields", n_tokens_per_frame=4)
    cfg.json_vision_dataset.update(path=path, seq_length=12, batch_size=2, mode=mode)
    full = _take(DatasetFactory.load_dataset(cfg, tokenizer), 9)
    ds = DatasetFactory.load_dataset(cfg, tokenizer)
    head = _take(ds, 5)
    resumed = DatasetFactory.load_dataset(cfg, tokenizer)
    resumed.load_state_dict(pickle.loads(pickle.dumps(ds.get_state_dict())))
    _assert_same(head + _take(resumed, 4), full)


def test_vision_packed_loss_weighting_per_token(tokenizer, tmp_path):
    """json_vision mode=packed with packed_loss_weighting="token": the same rows, every
    loss-bearing target (text and vision codes) weighs 1; an unknown value is one line."""
    rng = np.random.default_rng(1)
    rows = [json.dumps({"fields": "[t],vision" if i % 2 else "[vision],t", "t": t,
                        "vision": rng.integers(0, 8192, 4 * int(rng.integers(1, 4))).tolist()})
            for i, t in enumerate(_texts(8, 9))]
    path = _write_lines(tmp_path / "v.jsonl", rows)
    cfg = DatasetFactory.get_default_config({"type": "json_vision"})
    cfg.vision_text_processor.update(fields_from_example="fields", n_tokens_per_frame=4)
    cfg.json_vision_dataset.update(path=path, seq_length=24, batch_size=2, mode="packed")
    per_example = _take(DatasetFactory.load_dataset(cfg, tokenizer), 3)
    cfg.json_vision_dataset.packed_loss_weighting = "token"
    per_token = _take(DatasetFactory.load_dataset(cfg, tokenizer), 3)
    for (a, _), (b, _) in zip(per_example, per_token):
        for key in a:
            if key != "loss_masks":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_array_equal(b["loss_masks"], (a["loss_masks"] > 0).astype(np.float32))
    assert any((a["loss_masks"] != b["loss_masks"]).any() for (a, _), (b, _) in zip(per_example, per_token))
    cfg.json_vision_dataset.packed_loss_weighting = "tokens"
    with pytest.raises(ValueError, match="json_vision_dataset.packed_loss_weighting='tokens'; expected one of"):
        DatasetFactory.load_dataset(cfg, tokenizer)


def test_original_lwm_state_loads(tokenizer, tmp_path, caplog):
    path, pairs = _qa_file(tmp_path, n=10)
    ref = _qa_reference(pairs)
    with open(path, "rb") as f:
        ends = np.cumsum([len(line) for line in f]).tolist()
    original_config = ConfigDict(JsonDataset.get_default_config({"path": path, "seq_length": 64}))
    state = {"config": original_config, "index": 4, "file_loc": ends[4], "total_tokens": 1000}
    ds = DatasetFactory.load_dataset(_config(path), tokenizer)
    with caplog.at_level(logging.WARNING, logger="lwm.data"):
        ds.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert "seq_length" in caplog.text  # the saved config is compared, not applied
    batch, metrics = _take(ds, 1)[0]
    stream = np.concatenate([e.tokens for e in ref[5:]])  # resumes at line 5, after the one recorded
    assert batch["input_tokens"].ravel().tolist() == stream[:32].tolist()
    assert metrics["dataset_total_tokens"] == 1000 + 32
    state = ds.get_state_dict()
    assert {"index", "file_loc", "total_tokens", "config"} <= set(state)


def test_malformed_lines_are_reported_and_counted(tokenizer, tmp_path, caplog):
    good = [json.dumps({"q": q, "a": a}) for q, a in zip(_texts(8, 1), _texts(8, 2))]
    lines = [good[0], "{bad json", "", json.dumps({"other": 1}), json.dumps({"q": "x", "a": 5}),
             b"\xff\xfe\n", "[1, 2]"] + good[1:]
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="lwm.data"):
        batch, metrics = _take(DatasetFactory.load_dataset(_config(path, pad=True, batch_size=4), tokenizer), 1)[0]
    text = caplog.text
    assert f"{path} line 2: invalid JSON" in text
    assert f"{path} line 4: missing field 'q'" in text
    assert f"{path} line 5: field 'a' must be a string, got int" in text
    assert f"{path} line 6: not valid UTF-8" in text
    assert f"{path} line 7: an example must be a JSON object" in text
    assert metrics["dataset_malformed_json_lines"] == 3
    assert metrics["dataset_missing_field_lines"] == 1
    assert metrics["dataset_bad_field_lines"] == 1
    assert metrics["dataset_blank_lines"] == 1
    assert metrics["dataset_example_index"] == 9  # rows: lines 0, 7, 8, 9 (0-based)


def test_vision_problems_are_reported_and_counted(tokenizer, tmp_path, caplog):
    rows = [
        {"fields": "[t],vision", "t": "a", "vision": list(range(10))},  # 2 frames + 2 codes: kept, partial dropped
        {"fields": "[t],vision", "t": "b", "vision": [1, 2]},  # fewer than one frame: skipped
        {"fields": "[t],vision", "t": "c", "vision": list(range(4))},
        {"fields": "[t],vision", "t": "d"},  # missing field
    ]
    path = _write_lines(tmp_path / "v.jsonl", [json.dumps(r) for r in rows])
    cfg = DatasetFactory.get_default_config({"type": "json_vision"})
    cfg.vision_text_processor.update(fields_from_example="fields", n_tokens_per_frame=4)
    cfg.json_vision_dataset.update(path=path, seq_length=32, batch_size=2, mode="pad")
    with caplog.at_level(logging.WARNING, logger="lwm.data"):
        batches = _take(DatasetFactory.load_dataset(cfg, tokenizer), 2)
    assert f"{path} line 1: 2 vision codes are not a multiple of n_tokens_per_frame" in caplog.text
    assert f"{path} line 2: vision field 'vision' holds 2 codes, fewer than one frame" in caplog.text
    assert f"{path} line 4: missing field 'vision'" in caplog.text
    metrics = batches[-1][1]
    assert metrics["dataset_partial_frame_lines"] == 2 and metrics["dataset_bad_vision_lines"] == 2
    assert metrics["dataset_missing_field_lines"] == 1
    batch = batches[0][0]
    # Row 0 by hand: [bos] [bos a] <vision> f0 8192 f1 8193 </vision> [eos]
    a = SP.encode("a")
    tokens = [1, 1] + a + VISION_START + [0, 1, 2, 3, 8192, 4, 5, 6, 7, 8193] + VISION_END + [2]
    vision = [False] * (2 + len(a) + 4) + [True] * 10 + [False] * 5
    loss = [0.0] * (2 + len(a)) + [1.0] * 19
    n = len(tokens) - 1
    assert batch["input_tokens"][0].tolist() == tokens[:-1] + [1] * (32 - n)
    assert batch["target_tokens"][0].tolist() == tokens[1:] + [1] * (32 - n)
    assert batch["input_vision_masks"][0].tolist() == vision[:-1] + [False] * (32 - n)
    assert batch["target_vision_masks"][0].tolist() == vision[1:] + [False] * (32 - n)
    assert batch["loss_masks"][0].tolist() == loss[1:] + [0.0] * (32 - n)


def test_unusable_sources_raise_with_the_file_named(tokenizer, tmp_path):
    empty = _write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=f"{empty} is empty"):
        _take(DatasetFactory.load_dataset(_config(empty), tokenizer), 1)
    broken = _write_lines(tmp_path / "broken.jsonl", ["{oops", json.dumps({"x": 1})])
    with pytest.raises(DataError, match=rf"{broken} has no usable example .* first problem: {broken} line 1: invalid JSON"):
        _take(DatasetFactory.load_dataset(_config(broken), tokenizer), 1)
    one = _write_lines(tmp_path / "one.jsonl", [json.dumps({"q": "a", "a": "b"})])
    with pytest.raises(DataError, match="no usable example for data rank 1 of 2"):
        _take(DatasetFactory.load_dataset(_config(one, batch_size=2), tokenizer, data_rank=1, data_world=2), 1)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        DatasetFactory.load_dataset(_config(str(tmp_path / "missing.jsonl")), tokenizer)


def test_factory_config_and_errors(tokenizer, tmp_path):
    cfg = DatasetFactory.get_default_config()
    assert cfg.type == "huggingface"
    assert cfg.json_dataset.seq_length == 1024 and cfg.json_dataset.batch_size == 8
    assert cfg.json_vision_dataset.seq_length == 384 and cfg.json_vision_dataset.mode == "pad"
    assert cfg.vision_text_processor.eof_token == 8192 and cfg.vision_text_processor.eov_token == 8193
    assert cfg.vision_text_processor.n_tokens_per_frame == 256 and cfg.huggingface_dataset.path == "c4"
    assert cfg.json_dataset.tokenizer_parallel_batch_size == 1024 and cfg.json_dataset.use_data_sharded_loader
    path, _ = _qa_file(tmp_path, n=3)
    with pytest.raises(ValueError, match="dataset type must be"):
        DatasetFactory.load_dataset(dict(type="csv"), tokenizer)
    with pytest.raises(ValueError, match="pad and packed are exclusive"):
        DatasetFactory.load_dataset(_config(path, pad=True, packed=True), tokenizer)
    vcfg = DatasetFactory.get_default_config({"type": "json_vision"})
    vcfg.vision_text_processor.fields_from_example = "fields"
    vcfg.json_vision_dataset.update(path=path, mode="ragged")
    with pytest.raises(ValueError, match="mode must be one of"):
        DatasetFactory.load_dataset(vcfg, tokenizer)
    with pytest.raises(ValueError):
        DatasetFactory()


def test_fsspec_url(tokenizer, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    path, pairs = _qa_file(tmp_path, n=6)
    url = "memory://lwm-test/qa.jsonl"
    with open(path, "rb") as src, fsspec.open(url, "wb") as dst:
        dst.write(src.read())
    local = _take(DatasetFactory.load_dataset(_config(path), tokenizer), 3)
    remote = _take(DatasetFactory.load_dataset(_config(url), tokenizer), 3)
    _assert_same(local, remote)


def test_problem_messages_are_rate_limited(tokenizer, tmp_path, caplog, monkeypatch):
    import lwm.data.dataset

    monkeypatch.setattr(lwm.data.dataset, "MAX_LOGGED_PROBLEMS", 2)
    lines = ["{bad"] * 5 + [json.dumps({"q": "a", "a": " ".join(WORDS)})] * 4
    path = _write_lines(tmp_path / "many.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="lwm.data"):
        _, metrics = _take(DatasetFactory.load_dataset(_config(path), tokenizer), 1)[0]
    assert f"{path} line 2: invalid JSON" in caplog.text and f"{path} line 3:" not in caplog.text
    assert f"{path}: 2 problems so far; from now on only every 10,000th is logged" in caplog.text
    assert metrics["dataset_malformed_json_lines"] == 5
