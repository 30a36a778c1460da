"""Row layouts: stream (original), pad, and masked sequence packing (segment ids, positions,
per-example loss weights), checked against hand-written rows and numpy float64 references."""
import numpy as np
import pytest

from lwm.data import Packer, PadRows, ProcessedExample, StreamRows, example_to_pieces

PAD = 1


def _example(tokens, loss=None, vision=None):
    tokens = np.asarray(tokens, np.int32)
    loss = np.ones(len(tokens), np.float32) if loss is None else np.asarray(loss, np.float32)
    return ProcessedExample(tokens, loss, None if vision is None else np.asarray(vision, bool))


def _random_examples(rng, n, max_len, vocab=1000):
    out = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        tokens = rng.integers(3, vocab, size=length)
        loss = (rng.random(length) < 0.7).astype(np.float32)
        loss[1] = 1.0  # at least one loss-bearing target
        out.append(_example(tokens, loss, rng.random(length) < 0.3))
    return out


def _drain(layout, examples):
    batches = []
    for ex in examples:
        layout.add(ex)
        while layout.ready():
            batches.append(layout.pop(PAD))
    return batches


def test_packer_worked_example_from_docstring():
    # Examples of 6, 3, 4, 2, 5 tokens: A..E with 5, 2, 3, 1, 4 pairs (token ids encode letter * 10 + position).
    lengths = dict(A=6, B=3, C=4, D=2, E=5)
    examples = {k: _example([10 * (i + 1) + j for j in range(n)]) for i, (k, n) in enumerate(lengths.items())}
    packer = Packer(seq_length=8, n_rows=2)
    batches = _drain(packer, list(examples.values()) + [_example([99, 98, 97])])
    assert len(batches) == 1
    batch, stats = batches[0]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 3], [1, 1, 1, 2, 2, 2, 2, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0], [0, 1, 2, 0, 1, 2, 3, 0]]
    a, b, c, d, e = (examples[k].tokens.tolist() for k in "ABCDE")
    assert batch["input_tokens"].tolist() == [a[:-1] + b[:-1] + d[:-1], c[:-1] + e[:-1] + [PAD]]
    assert batch["target_tokens"].tolist() == [a[1:] + b[1:] + d[1:], c[1:] + e[1:] + [PAD]]
    w = batch["loss_masks"]
    np.testing.assert_allclose(w, [[1 / 5] * 5 + [1 / 2] * 2 + [1.0], [1 / 3] * 3 + [1 / 4] * 4 + [0.0]], rtol=1e-7)
    assert w.sum() == pytest.approx(5.0)
    assert stats == {"dataset_batch_fill": 15 / 16, "dataset_batch_examples": 5}
    # F, which did not fit, opens the next batch.
    assert packer.state()["rows"][0][0].tokens.tolist() == [99, 98, 97]


def test_packed_loss_is_mean_over_examples_of_per_example_mean():
    rng = np.random.default_rng(0)
    seq, rows = 32, 3
    examples = _random_examples(rng, 120, max_len=seq + 1)
    ce_table = rng.random(1000) * 5  # a per-token "cross entropy": any function of the target works
    batches = _drain(Packer(seq, rows), examples)
    assert len(batches) >= 10
    start = 0
    for batch, stats in batches:
        n = stats["dataset_batch_examples"]
        group = examples[start:start + n]
        start += n
        # The trainer's formula over the batch.
        w = batch["loss_masks"].astype(np.float64)
        ce = ce_table[batch["target_tokens"]]
        trainer_loss = (w * ce).sum() / w.sum()
        # Reference: per-example mean over its loss-bearing targets, then mean over examples (float64).
        per_example = [ce_table[ex.tokens[1:]][ex.loss_masks[1:] > 0].mean() for ex in group]
        np.testing.assert_allclose(trainer_loss, np.mean(per_example), rtol=1e-6)
        np.testing.assert_allclose(w.sum(), len(group), rtol=1e-6)
        # Every example is one contiguous segment with positions 0..n-1 and its own tokens.
        segments = []
        for r in range(rows):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert idx.tolist() == list(range(idx[0], idx[0] + len(idx)))
                assert batch["positions"][r, idx].tolist() == list(range(len(idx)))
                segments.append((tuple(batch["input_tokens"][r, idx]), tuple(batch["target_tokens"][r, idx]),
                                 tuple(batch["target_vision_masks"][r, idx])))
            pad = seg == 0
            assert (batch["loss_masks"][r, pad] == 0).all() and (batch["positions"][r, pad] == 0).all()
            assert pad.tolist() == sorted(pad.tolist())  # padding only at the end of a row
        expected = [(tuple(ex.tokens[:-1]), tuple(ex.tokens[1:]), tuple(ex.vision_masks[1:])) for ex in group]
        assert sorted(segments) == sorted(expected)


def test_packed_long_example_is_split_into_full_rows():
    rng = np.random.default_rng(1)
    seq = 8
    tokens = rng.integers(3, 500, size=2 * seq + 4)  # 19 pairs: pieces of 8, 8, 3
    loss = np.ones(len(tokens), np.float32)
    loss[5:9] = 0  # targets 4..7 carry no loss -> 15 loss-bearing targets
    long_example = _example(tokens, loss)
    pieces = example_to_pieces(long_example, seq)
    assert [len(p) for p in pieces] == [8, 8, 3]
    assert np.concatenate([p.tokens[:-1] for p in pieces]).tolist() == tokens[:-1].tolist()
    assert np.concatenate([p.tokens[1:] for p in pieces]).tolist() == tokens[1:].tolist()
    assert np.concatenate([p.loss for p in pieces]).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pieces[0].loss, [1 / 15] * 4 + [0] * 4)
    packer = Packer(seq, n_rows=2)
    counts = packer.add(_example([5, 6, 7]))
    counts.update(packer.add(long_example))
    assert counts == {"dataset_split_examples": 1}
    batch, _ = packer.pop(PAD)  # row 0 holds the short example, row 1 the first piece
    assert batch["segment_ids"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1] * 8]
    assert batch["input_tokens"][1].tolist() == tokens[:8].tolist()
    # The second full piece takes a fresh row 0, the last piece row 1: no batch is complete yet.
    assert not packer.ready()
    assert [[len(p) for p in row] for row in packer.state()["rows"]] == [[8], [3]]
    packer.add(_example(list(range(40, 47))))  # 6 pairs: row 1 has 5 free -> the batch is complete
    assert packer.ready()
    batch, _ = packer.pop(PAD)
    assert batch["input_tokens"][0].tolist() == tokens[8:16].tolist()
    assert batch["input_tokens"][1, :3].tolist() == tokens[16:19].tolist()
    assert batch["positions"][1].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(batch["loss_masks"][1, :3], [1 / 15] * 3)


def test_packer_skips_examples_without_pairs_or_loss():
    packer = Packer(8, 1)
    assert packer.add(_example([5])) == {"dataset_empty_examples": 1}
    assert packer.add(_example([5, 6, 7], loss=[1, 0, 0])) == {"dataset_no_loss_examples": 1}
    assert packer.state() == {"rows": [[]], "queue": []}


def test_stream_rows_match_concatenation():
    rng = np.random.default_rng(2)
    seq, rows = 16, 2
    examples = _random_examples(rng, 40, max_len=20)
    batches = _drain(StreamRows(seq, rows), examples)
    tokens = np.concatenate([ex.tokens for ex in examples])
    loss = np.concatenate([ex.loss_masks for ex in examples])
    vision = np.concatenate([ex.vision_masks for ex in examples])
    c = seq * rows
    assert len(batches) == (len(tokens) - 1) // c
    for k, (batch, _) in enumerate(batches):
        s = k * c
        assert batch["input_tokens"].ravel().tolist() == tokens[s:s + c].tolist()
        assert batch["target_tokens"].ravel().tolist() == tokens[s + 1:s + c + 1].tolist()
        assert batch["loss_masks"].ravel().tolist() == loss[s + 1:s + c + 1].tolist()
        assert batch["input_vision_masks"].ravel().tolist() == vision[s:s + c].tolist()
        assert batch["target_vision_masks"].ravel().tolist() == vision[s + 1:s + c + 1].tolist()
        assert (batch["segment_ids"] == 1).all()
        assert batch["positions"].tolist() == [list(range(seq))] * rows


def test_pad_rows_one_example_per_row_truncated():
    seq = 6
    short, long_ = _example([5, 6, 7], loss=[0, 0, 1]), _example(list(range(10, 20)))
    layout = PadRows(seq, 2)
    assert layout.add(short) == {}
    assert layout.add(long_) == {"dataset_truncated_examples": 1}
    batch, stats = layout.pop(PAD)
    assert batch["input_tokens"].tolist() == [[5, 6, PAD, PAD, PAD, PAD], list(range(10, 16))]
    assert batch["target_tokens"].tolist() == [[6, 7, PAD, PAD, PAD, PAD], list(range(11, 17))]
    assert batch["loss_masks"].tolist() == [[0, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["segment_ids"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["positions"].tolist() == [[0, 1, 0, 0, 0, 0], list(range(6))]
    assert stats == {"dataset_batch_fill": 8 / 12, "dataset_batch_examples": 2}
