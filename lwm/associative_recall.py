"""Multi-query associative recall (MQAR) rows: can a model learn a keyed lookup at all?

The multi-needle eval asks for one key's value among several; every stage-1 variant of the text
study picks the asked needle about as often as elimination allows. These rows strip the task to
its core, in token ids (no tokenizer, no haystack): `pairs` keys each followed (after `gap`
filler tokens) by a value, then every key asked once in a random order, each followed by its
value again (or, with `queries="any"`, n keys of the row drawn with replacement). Only the
asked values carry loss, as only answers do in the study:

    <bos> k1 [f..] v1  k2 [f..] v2 ... kn [f..] vn   Q k2 [f..] v2  Q kn [f..] vn ...

A value is one token (`value_tokens=1`, from `VALUE_IDS`) or a run of digit tokens (`value_tokens=7`,
like a needle's number). Keys come from 69 ids, as many as the eval's cities; `gap=4` puts the
key as far before its value as a needle's city stands before its first digit ("▁number ▁is : ▁");
with `max_gap`, each row draws its own gap in [gap, max_gap] (the same for all its keys), so no
fixed distance from key to value holds across rows.

What a model gets right is scored on each query's first value token, the only one that needs the
key (the rest of a multi-token value continues the value it starts). Two reference levels:
`in_context` (a value of the row, uniformly: what "copy some value" earns) and `elimination` (a
value no earlier query answered, uniformly: queries ask each key once, so the last one is
forced). Both are exact expectations for each query of the rows scored.
"""
from __future__ import annotations

import dataclasses

import numpy as np

BOS_ID = 1
DIGIT_IDS = np.arange(10, 20)
FILLER_IDS = (20, 21, 22, 23)
QUERY_ID = 30
KEY_IDS = np.arange(100, 169)  # 69 keys, as many as the needle eval's cities
VALUE_IDS = np.arange(200, 264)
MIN_VOCAB = int(VALUE_IDS[-1]) + 1


@dataclasses.dataclass(frozen=True)
class RecallTask:
    pairs: tuple[int, int] = (4, 4)  # key-value pairs per row, drawn uniformly in [min, max]
    value_tokens: int = 1  # 1: one token of VALUE_IDS; more: that many digit tokens
    gap: int = 0  # filler tokens between a key and its value, in the pairs and in the answers
    seq_length: int = 32
    # "each_once": every key asked once, in a random order (the study's rows); "any": each query
    # a key of the row drawn with replacement, so that which values were already answered says
    # nothing about the next (elimination = in_context) and only the key can do better
    queries: str = "each_once"
    max_gap: int = -1  # -1: every row at `gap`; else each row's gap drawn uniformly in [gap, max_gap]

    def __post_init__(self):
        if self.queries not in ("each_once", "any"):
            raise ValueError(f"queries={self.queries!r}: expected 'each_once' or 'any'")
        low, high = self.pairs
        if not 1 <= low <= high <= len(KEY_IDS):
            raise ValueError(f"pairs={self.pairs}: expected 1 <= min <= max <= {len(KEY_IDS)}")
        if self.value_tokens < 1 or not 0 <= self.gap <= self.gaps[1] <= len(FILLER_IDS):
            raise ValueError(f"value_tokens={self.value_tokens}, gap={self.gap}, max_gap={self.max_gap}: expected "
                             f"value_tokens >= 1 and 0 <= gap <= max_gap <= {len(FILLER_IDS)} (max_gap -1: gap)")
        if self.row_tokens(high) > self.seq_length + 1:
            raise ValueError(f"{high} pairs need {self.row_tokens(high)} tokens; seq_length={self.seq_length} holds "
                             f"{self.seq_length + 1} (inputs and shifted targets): raise seq_length or lower pairs")

    @property
    def gaps(self) -> tuple[int, int]:
        """The smallest and largest gap of a row."""
        return self.gap, self.gap if self.max_gap < 0 else self.max_gap

    def row_tokens(self, n_pairs: int) -> int:
        item = 1 + self.gaps[1] + self.value_tokens
        return 1 + n_pairs * item + n_pairs * (1 + item)


@dataclasses.dataclass
class RecallBatch:
    batch: dict  # input_tokens, target_tokens, loss_masks, segment_ids, positions: [rows, seq_length]
    first_value: np.ndarray  # [rows, seq_length] 1 where the target is a query's first value token
    in_context: np.ndarray  # per scored query: chance of a uniform pick among the row's values
    elimination: np.ndarray  # per scored query: chance of a uniform pick among the values not yet answered
    gaps: np.ndarray  # [rows] each row's gap


def _value(rng: np.random.Generator, task: RecallTask) -> list[int]:
    if task.value_tokens == 1:
        return [int(rng.choice(VALUE_IDS))]
    return [int(t) for t in rng.choice(DIGIT_IDS, task.value_tokens)]


def recall_batch(rng: np.random.Generator, task: RecallTask, rows: int) -> RecallBatch:
    seq = task.seq_length
    ids = np.zeros((rows, seq + 1), np.int32)
    loss = np.zeros((rows, seq), np.float32)
    first = np.zeros((rows, seq), np.float32)
    in_context, elimination = [], []
    gaps = np.zeros(rows, np.int32)
    for r in range(rows):
        n = int(rng.integers(task.pairs[0], task.pairs[1] + 1))
        # drawn only when rows vary, so that fixed-gap rows are the same as before the option
        gaps[r] = task.gap if task.max_gap < 0 else rng.integers(task.gap, task.max_gap + 1)
        gap = list(FILLER_IDS[:gaps[r]])
        keys = [int(k) for k in rng.choice(KEY_IDS, n, replace=False)]
        values = {k: _value(rng, task) for k in keys}
        tokens = [BOS_ID]
        for k in keys:
            tokens += [k, *gap, *values[k]]
        unanswered = list(keys)
        asked = rng.permutation(keys) if task.queries == "each_once" else rng.choice(keys, n)
        for k in asked:
            k = int(k)
            tokens += [QUERY_ID, k, *gap]
            start = len(tokens)  # the first value token's index in `tokens`; its target index is start - 1
            tokens += values[k]
            loss[r, start - 1: start - 1 + task.value_tokens] = 1.0
            first[r, start - 1] = 1.0
            right = values[k][0]
            in_context.append(np.mean([values[c][0] == right for c in keys]))
            elimination.append(np.mean([values[c][0] == right for c in unanswered]))
            if task.queries == "each_once":
                unanswered.remove(k)
        ids[r, :len(tokens)] = tokens
    batch = dict(input_tokens=ids[:, :seq], target_tokens=ids[:, 1:], loss_masks=loss,
                 segment_ids=np.ones((rows, seq), np.int32),
                 positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)))
    return RecallBatch(batch, first, np.asarray(in_context), np.asarray(elimination), gaps)


def score(predictions: np.ndarray, recall: RecallBatch, rows: np.ndarray | None = None) -> dict:
    """Accuracy of argmax `predictions` [rows, seq_length] on the queries' first value tokens and
    on every answer token, beside the two reference levels; of the `rows` selected (a boolean
    mask over rows) if given."""
    rows = np.ones(len(predictions), bool) if rows is None else rows
    right = (predictions == recall.batch["target_tokens"])[rows]
    first, masks = recall.first_value[rows], recall.batch["loss_masks"][rows]
    queries = np.repeat(rows, recall.first_value.sum(axis=1).astype(int))  # the rows' queries, in order
    return dict(first_value_acc=float((right * first).sum() / first.sum()),
                answer_acc=float((right * masks).sum() / masks.sum()),
                in_context=float(recall.in_context[queries].mean()),
                elimination=float(recall.elimination[queries].mean()))
