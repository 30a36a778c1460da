"""Layouts: processed examples -> rows of a batch, in one of three ways (stream, pad, packed).

Each layout (``StreamRows``, ``PadRows``, ``Packer``) takes examples with ``add``, says when a
batch is ``ready``, hands it out with ``pop`` as numpy arrays [n_rows, seq_length] under
``BATCH_KEYS``, and keeps what it holds between batches in a small picklable ``state``.
``Packer`` (masked sequence packing) has a worked example in its docstring.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import numpy as np

from lwm.data.processors import ProcessedExample

BATCH_KEYS = ("input_tokens", "target_tokens", "loss_masks", "segment_ids", "positions",
              "input_vision_masks", "target_vision_masks")


@dataclasses.dataclass
class Piece:
    """A run of one example placed in one row: n input/target pairs."""

    tokens: np.ndarray  # [n + 1] int32: inputs are tokens[:-1], targets tokens[1:]
    loss: np.ndarray  # [n] float32: loss weight of each target
    vision: np.ndarray  # [n + 1] bool

    def __len__(self) -> int:
        return len(self.loss)


def _vision_or_zeros(example: ProcessedExample) -> np.ndarray:
    return example.vision_masks if example.vision_masks is not None else np.zeros(len(example), bool)


def build_rows(rows: Sequence[Sequence[Piece]], seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lay pieces into [len(rows), seq_length] arrays; piece j of a row gets segment id j + 1.

    Padding: token ``pad_id``, loss 0, segment 0, position 0, vision False.
    """
    b = len(rows)
    batch = {
        "input_tokens": np.full((b, seq_length), pad_id, np.int32),
        "target_tokens": np.full((b, seq_length), pad_id, np.int32),
        "loss_masks": np.zeros((b, seq_length), np.float32),
        "segment_ids": np.zeros((b, seq_length), np.int32),
        "positions": np.zeros((b, seq_length), np.int32),
        "input_vision_masks": np.zeros((b, seq_length), bool),
        "target_vision_masks": np.zeros((b, seq_length), bool),
    }
    for r, pieces in enumerate(rows):
        offset = 0
        for j, piece in enumerate(pieces):
            n = len(piece)
            if offset + n > seq_length:
                raise ValueError(f"row {r}: pieces hold {offset + n} tokens, more than seq_length={seq_length}")
            span = slice(offset, offset + n)
            batch["input_tokens"][r, span] = piece.tokens[:-1]
            batch["target_tokens"][r, span] = piece.tokens[1:]
            batch["loss_masks"][r, span] = piece.loss
            batch["segment_ids"][r, span] = j + 1
            batch["positions"][r, span] = np.arange(n)
            batch["input_vision_masks"][r, span] = piece.vision[:-1]
            batch["target_vision_masks"][r, span] = piece.vision[1:]
            offset += n
    return batch


def example_to_pieces(example: ProcessedExample, seq_length: int, weighted: bool = True) -> list[Piece]:
    """Cut an example into pieces of at most ``seq_length`` input/target pairs.

    An example of n tokens has n - 1 pairs; it stays whole when n - 1 <= seq_length.
    A longer one is cut into consecutive pieces of seq_length pairs (the last one shorter);
    piece k holds tokens[k*L : k*L + L + 1], so every token is still a target exactly once.
    With ``weighted``, every loss-bearing target gets weight 1 / (the example's number of
    loss-bearing targets), so the example's weights sum to 1 over all its pieces.
    Returns [] for examples with no pair, or (when weighted) no loss-bearing target.
    """
    n_pairs = len(example) - 1
    if n_pairs <= 0:
        return []
    loss = example.loss_masks[1:].astype(np.float64)  # [n_pairs], weight of each target
    if weighted:
        n_loss = float(np.count_nonzero(loss))
        if n_loss == 0:
            return []
        loss = loss / n_loss
    loss = loss.astype(np.float32)
    vision = _vision_or_zeros(example)
    pieces = []
    for start in range(0, n_pairs, seq_length):
        stop = min(start + seq_length, n_pairs)
        pieces.append(Piece(example.tokens[start:stop + 1], loss[start:stop], vision[start:stop + 1]))
    return pieces


class StreamRows:
    """The original layout: examples concatenated into one stream cut into rows.

    The batch takes the first rows * seq_length + 1 tokens of the stream: inputs
    stream[:C], targets stream[1:C+1], loss masks mask[1:C+1] (C = rows * seq_length);
    the stream then drops its first C tokens, so the last token of one batch's last row is
    the first input of the next batch. Segment ids are all 1, positions 0..seq_length-1.
    """

    def __init__(self, seq_length: int, n_rows: int, state: dict | None = None):
        self.seq_length, self.n_rows = seq_length, n_rows
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n = 0
        if state:
            self._chunks = [(state["tokens"], state["loss_masks"], state["vision_masks"])]
            self._n = len(state["tokens"])

    def add(self, example: ProcessedExample) -> dict:
        self._chunks.append((example.tokens, example.loss_masks, _vision_or_zeros(example)))
        self._n += len(example)
        return {}

    def ready(self) -> bool:
        return self._n >= self.n_rows * self.seq_length + 1

    def pop(self, pad_id: int) -> tuple[dict[str, np.ndarray], dict]:
        c, shape = self.n_rows * self.seq_length, (self.n_rows, self.seq_length)
        tokens, loss, vision = (np.concatenate(parts) for parts in zip(*self._chunks))
        batch = {
            "input_tokens": tokens[:c].reshape(shape).astype(np.int32),
            "target_tokens": tokens[1:c + 1].reshape(shape).astype(np.int32),
            "loss_masks": loss[1:c + 1].reshape(shape).astype(np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_length, dtype=np.int32), shape).copy(),
            "input_vision_masks": vision[:c].reshape(shape).copy(),
            "target_vision_masks": vision[1:c + 1].reshape(shape).copy(),
        }
        self._chunks = [(tokens[c:].copy(), loss[c:].copy(), vision[c:].copy())]
        self._n = len(tokens) - c
        return batch, {"dataset_batch_fill": 1.0}

    def state(self) -> dict:
        if not self._chunks:
            empty = np.zeros(0, np.int32)
            return {"tokens": empty, "loss_masks": empty.astype(np.float32), "vision_masks": empty.astype(bool)}
        tokens, loss, vision = (np.concatenate(parts) for parts in zip(*self._chunks))
        self._chunks = [(tokens, loss, vision)]
        return {"tokens": tokens, "loss_masks": loss, "vision_masks": vision}


class PadRows:
    """One example per row: tokens[:L+1] give the row's L pairs, the rest is padding.

    Longer examples are truncated (counted in dataset_truncated_examples). Loss masks stay 0/1.
    """

    def __init__(self, seq_length: int, n_rows: int, state: dict | None = None):
        self.seq_length, self.n_rows = seq_length, n_rows
        self._rows: list[Piece] = list(state["rows"]) if state else []

    def add(self, example: ProcessedExample) -> dict:
        pieces = example_to_pieces(example, self.seq_length, weighted=False)
        if not pieces:
            return {"dataset_empty_examples": 1}
        self._rows.append(pieces[0])
        return {"dataset_truncated_examples": 1} if len(pieces) > 1 else {}

    def ready(self) -> bool:
        return len(self._rows) >= self.n_rows

    def pop(self, pad_id: int) -> tuple[dict[str, np.ndarray], dict]:
        rows, self._rows = self._rows[: self.n_rows], self._rows[self.n_rows:]
        fill = sum(len(p) for p in rows) / (self.n_rows * self.seq_length)
        return build_rows([[p] for p in rows], self.seq_length, pad_id), {
            "dataset_batch_fill": fill, "dataset_batch_examples": len(rows)}

    def state(self) -> dict:
        return {"rows": list(self._rows)}


class Packer:
    """Masked sequence packing: whole examples placed into rows by best fit, in order.

    Each example becomes one piece (or, when it has more than seq_length pairs, several:
    see ``example_to_pieces``). Pieces are placed in arrival order, each into the row with
    the least free room that still holds it (ties: the lowest row). When the next piece fits
    in no row, the batch is complete and that piece opens the next batch; examples are
    never reordered across batches. Worked example, seq_length 8, 2 rows, examples of
    6, 3, 4, 2, 5 tokens (5, 2, 3, 1, 4 pairs), every target loss-bearing:

        A (5 pairs) -> row 0 [AAAAA...]            free 3, 8
        B (2 pairs) -> row 0 [AAAAABB.]            best fit: free 1, 8
        C (3 pairs) -> row 1 [CCC.....]            free 1, 5
        D (1 pair)  -> row 0 [AAAAABBD]            free 0, 5
        E (4 pairs) -> row 1 [CCCEEEE.]            free 0, 1
        F (2 pairs) fits in no row: the batch is complete and F opens the next one

        segment_ids  [[1 1 1 1 1 2 2 3]      positions [[0 1 2 3 4 0 1 0]
                      [1 1 1 2 2 2 2 0]]                [0 1 2 0 1 2 3 0]]
        loss_masks   A: 1/5 each, B: 1/2, C: 1/3, D: 1, E: 1/4; padding 0

    sum(loss_masks) = 5 (examples), so sum(w * ce) / sum(w) is the mean over the five
    examples of each example's mean token loss. With ``weighted=False`` (layout
    "packed_per_token") every loss-bearing target weighs 1: the mean over the tokens.
    """

    def __init__(self, seq_length: int, n_rows: int, state: dict | None = None, weighted: bool = True):
        self.seq_length, self.n_rows, self.weighted = seq_length, n_rows, weighted
        self._rows: list[list[Piece]] = [[] for _ in range(n_rows)]
        self._free = [seq_length] * n_rows
        self._queue: collections.deque[Piece] = collections.deque()
        self._full = False
        if state:
            for r, pieces in enumerate(state["rows"]):
                self._rows[r] = list(pieces)
                self._free[r] = seq_length - sum(len(p) for p in pieces)
            self._queue.extend(state["queue"])
            self._place_queue()

    def _place_queue(self) -> None:
        while self._queue and not self._full:
            piece = self._queue[0]
            fits = [(free, r) for r, free in enumerate(self._free) if free >= len(piece)]
            if not fits:
                self._full = True
                return
            _, r = min(fits)
            self._rows[r].append(piece)
            self._free[r] -= len(piece)
            self._queue.popleft()

    def add(self, example: ProcessedExample) -> dict:
        pieces = example_to_pieces(example, self.seq_length, weighted=self.weighted)
        if not pieces:
            kind = "dataset_empty_examples" if len(example) <= 1 else "dataset_no_loss_examples"
            return {kind: 1}
        self._queue.extend(pieces)
        self._place_queue()
        return {"dataset_split_examples": 1} if len(pieces) > 1 else {}

    def ready(self) -> bool:
        return self._full

    def pop(self, pad_id: int) -> tuple[dict[str, np.ndarray], dict]:
        rows = self._rows
        used = self.n_rows * self.seq_length - sum(self._free)
        stats = {"dataset_batch_fill": used / (self.n_rows * self.seq_length),
                 "dataset_batch_examples": sum(len(r) for r in rows)}
        self._rows = [[] for _ in range(self.n_rows)]
        self._free = [self.seq_length] * self.n_rows
        self._full = False
        self._place_queue()
        return build_rows(rows, self.seq_length, pad_id), stats

    def state(self) -> dict:
        return {"rows": [list(r) for r in self._rows], "queue": list(self._queue)}


_LAYOUTS = {"stream": StreamRows, "pad": PadRows, "packed": Packer,
            "packed_per_token": functools.partial(Packer, weighted=False)}  # every loss-bearing target weighs 1
