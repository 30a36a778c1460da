"""Training data: text / vision-text processors, JSON and Hugging Face datasets, packing, loader state.

A dataset yields ``(batch, metrics)`` forever (files wrap at EOF). ``batch`` holds numpy
arrays shaped [local_batch, seq_length]: ``input_tokens``, ``target_tokens`` (inputs
shifted by one), ``loss_masks`` (float32), ``segment_ids``, ``positions`` (int32),
``input_vision_masks`` and ``target_vision_masks`` (bool). Three ways to lay examples
into rows:

* ``stream`` (the original default): examples concatenated into one token stream cut
  into rows; attention may cross examples (segment ids all 1), 0/1 loss masks.
* ``pad``: one example per row, truncated to the row, right-padded (segment 0).
* ``packed`` (masked sequence packing): whole examples placed into rows by best fit;
  segment ids 1.. per example, positions restart at 0, and loss weights 1/(loss tokens of
  the example) so the trainer's sum(w * ce) / sum(w) is the mean over examples of each
  example's mean loss. See ``Packer`` for a worked example.

This module never imports jax: it runs on the host and in tokenizer worker processes.
The trainer turns the host-local numpy batch into a global array. Run it alone with::

    python -c "from lwm.data import DatasetFactory; from lwm.tokenizer import load_tokenizer; \\
        c = DatasetFactory.get_default_config({'type': 'json'}); c.json_dataset.path = 'data.jsonl'; \\
        c.text_processor.fields = 'text'; b, m = next(iter(DatasetFactory.load_dataset(c, load_tokenizer('builtin')))); print(m)"
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import time
from typing import Any, Iterator, Sequence

import numpy as np
from ml_collections import ConfigDict

logger = logging.getLogger(__name__)

# Tokenizer workers are spawned, never forked: the parent usually runs JAX, whose threads
# make fork unsafe. A spawned worker rebuilds the tokenizer from its model file.
WORKER_START_METHOD = "spawn"
STATE_FORMAT_VERSION = 1
BATCH_KEYS = ("input_tokens", "target_tokens", "loss_masks", "segment_ids", "positions",
              "input_vision_masks", "target_vision_masks")
# Kinds of bad examples; each is counted in metrics as dataset_<kind>_lines.
PROBLEM_KINDS = ("malformed_json", "missing_field", "bad_field", "bad_vision")
MAX_LOGGED_PROBLEMS = 100  # per dataset object; later problems are logged every 10,000th


class DataError(ValueError):
    """A problem with one example (or a whole file); ``kind`` names its metrics counter."""

    def __init__(self, message: str, kind: str = "bad_field"):
        super().__init__(message)
        self.kind = kind


def _update_config(config: ConfigDict, updates) -> ConfigDict:
    if updates is not None:
        config.update(ConfigDict(updates).copy_and_resolve_references())
    return config


# ----------------------------------------------------------------------------------------
# Processors: one JSON example -> tokens, loss masks and vision masks
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ProcessedExample:
    """One tokenized example; ``loss_masks[i]`` is the loss weight of predicting ``tokens[i]``."""

    tokens: np.ndarray  # [n] int32
    loss_masks: np.ndarray  # [n] float32, 0 or 1
    vision_masks: np.ndarray | None = None  # [n] bool; None for text-only processors
    dropped_vision_codes: int = 0  # codes of trailing partial frames that were dropped

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One comma-separated entry of a field spec: ``a+b``, ``[a]``, ``<|bos|>``, ``<|eos|>``."""

    keys: tuple[str, ...]  # example keys joined by subfield_separator (empty for specials)
    loss: float  # 0.0 inside [...], else 1.0
    special: str = ""  # "bos" or "eos" for <|bos|> / <|eos|>

    @property
    def is_text(self) -> bool:
        return not self.special


def parse_field_spec(spec: str) -> list[FieldSpec]:
    """Parse a field spec such as ``"[question],answer+source,<|eos|>"``.

    >>> parse_field_spec("[q],a+b,<|eos|>")  # doctest: +NORMALIZE_WHITESPACE
    [FieldSpec(keys=('q',), loss=0.0, special=''), FieldSpec(keys=('a', 'b'), loss=1.0, special=''),
     FieldSpec(keys=(), loss=1.0, special='eos')]
    """
    if not isinstance(spec, str):
        raise DataError(f"field spec must be a string, got {type(spec).__name__} {spec!r}")
    fields = []
    for raw in spec.split(","):
        field, loss = raw, 1.0
        if field.startswith("[") and field.endswith("]"):
            field, loss = field[1:-1], 0.0
        if "[" in field or "]" in field:
            raise DataError(f"field spec {spec!r}: entry {raw!r} has unbalanced brackets (write [name])")
        if field in ("<|bos|>", "<|eos|>"):
            fields.append(FieldSpec((), loss, field[2:5]))
            continue
        keys = tuple(field.split("+"))
        if not all(keys):
            raise DataError(f"field spec {spec!r}: entry {raw!r} names an empty field")
        fields.append(FieldSpec(keys, loss))
    return fields


class _FieldProcessor:
    """Shared logic of the two processors; subclasses choose how text is encoded."""

    def __init__(self, config: ConfigDict, tokenizer):
        self.tokenizer = tokenizer

    # Workers get the tokenizer's model file, not the SentencePiece object.
    def __getstate__(self):
        state = dict(self.__dict__)
        model_file = getattr(self.tokenizer, "model_file", None)
        if model_file is not None:
            state["tokenizer"] = ("__model_file__", model_file)
        return state

    def __setstate__(self, state):
        tok = state["tokenizer"]
        if isinstance(tok, tuple) and len(tok) == 2 and tok[0] == "__model_file__":
            from lwm.tokenizer import Tokenizer

            state["tokenizer"] = Tokenizer(tok[1])
        self.__dict__.update(state)

    def _field_specs(self, example: dict, line_index: int, static: list[FieldSpec] | None,
                     fields_index: int = -1) -> list[FieldSpec]:
        if static is not None:
            return static
        key = self.config.fields_from_example
        if key not in example:
            raise DataError(f"missing field {key!r} (fields_from_example); the example has keys "
                            f"{sorted(example)[:20]}", "missing_field")
        value = example[key]
        if isinstance(value, (list, tuple)):
            if not value:
                raise DataError(f"field {key!r} holds an empty list of field specs")
            if fields_index >= 0:
                if fields_index >= len(value):
                    raise DataError(f"fields_index={fields_index} but field {key!r} holds {len(value)} specs")
                value = value[fields_index]
            else:
                # Seeded by the line number, as the original: the same line always picks the same spec.
                value = random.Random(line_index).choice(list(value))
        return parse_field_spec(value)

    def _text(self, example: dict, spec: FieldSpec) -> str:
        parts = []
        for key in spec.keys:
            if key not in example:
                raise DataError(f"missing field {key!r}; the example has keys {sorted(example)[:20]}",
                                "missing_field")
            value = example[key]
            if not isinstance(value, str):
                raise DataError(f"field {key!r} must be a string, got {type(value).__name__}")
            parts.append(value)
        return self.config.subfield_separator.join(parts)

    def _special_id(self, spec: FieldSpec) -> int:
        return self.tokenizer.bos_token_id if spec.special == "bos" else self.tokenizer.eos_token_id


class TextProcessor(_FieldProcessor):
    """Turn a JSON example into tokens and loss masks following a field spec.

    ``fields="[question],answer"`` on ``{"question": "Hi?", "answer": "Yes."}`` gives
    ``[bos] + encode("Hi?") + encode("Yes.") + [eos]`` with loss masks
    ``[0] + [0]*len(encode("Hi?")) + [1]*len(encode("Yes.")) + [1]``. Text is encoded without
    special tokens; ``prepend_text`` is prefixed to the text of the first field when that
    field is text.
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.fields_from_example = ""  # key whose value is this example's field spec (or a list of them)
        config.fields = ""  # field spec shared by every example, e.g. "[question],answer"
        config.subfield_separator = " "  # joins the parts of a+b
        config.add_bos_token = True  # BOS first (loss mask 0)
        config.add_eos_token = True  # EOS last (loss mask 1)
        config.prepend_text = ""  # text put before the first field's text
        return _update_config(config, updates)

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.config = self.get_default_config(config)
        if not self.config.fields and not self.config.fields_from_example:
            raise ValueError("text_processor: set fields (e.g. 'text') or fields_from_example")
        self._static_fields = parse_field_spec(self.config.fields) if not self.config.fields_from_example else None
        if self._static_fields and self.config.prepend_text and not self._static_fields[0].is_text:
            raise ValueError(f"text_processor.prepend_text is set but the first field of {self.config.fields!r} "
                             "is not a text field")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def __call__(self, example: dict, line_index: int = 0, add_bos_token: bool = True,
                 add_eos_token: bool = True) -> ProcessedExample:
        if not isinstance(example, dict):
            raise DataError(f"an example must be a JSON object, got {type(example).__name__}", "malformed_json")
        tokens: list[int] = []
        masks: list[float] = []
        if add_bos_token and self.config.add_bos_token:
            tokens.append(self.tokenizer.bos_token_id)
            masks.append(0.0)
        for i, spec in enumerate(self._field_specs(example, line_index, self._static_fields)):
            if spec.special:
                ids = [self._special_id(spec)]
            else:
                text = self._text(example, spec)
                ids = self._encode(self.config.prepend_text + text if i == 0 else text)
            tokens.extend(ids)
            masks.extend([spec.loss] * len(ids))
        if add_eos_token and self.config.add_eos_token:
            tokens.append(self.tokenizer.eos_token_id)
            masks.append(1.0)
        return ProcessedExample(np.asarray(tokens, np.int32), np.asarray(masks, np.float32))


class VisionTextProcessor(_FieldProcessor):
    """Like ``TextProcessor`` for examples that mix text and VQGAN codes.

    Every text field and each ``<vision>`` / ``</vision>`` marker is encoded with a BOS in
    front (the stream the released vision models saw; docs/vision_inference.md). A field whose name
    contains ``vision`` (the whole entry, ``+`` included: ``vision+extra`` is one key) holds a flat list of codes (``n_tokens_per_frame`` per frame); it
    becomes ``encode('<vision>')``, each frame's codes followed by ``eof_token`` (or
    ``eov_token`` after the last frame), then ``encode('</vision>')``. The vision mask is
    True on the codes and the eof/eov markers only. With ``max_n_frames > 0`` longer videos
    keep frames ``np.linspace(0, n - 1, max_n_frames).astype(int)``. A trailing partial frame
    is dropped (reported in ``dropped_vision_codes``); fewer codes than one frame is an error.
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.fields_from_example = ""  # key holding the field spec (string or list of strings)
        config.subfield_separator = " "  # joins the parts of a+b
        config.add_bos_token = True  # BOS first (loss mask 0)
        config.add_eos_token = True  # EOS last (loss mask 1)
        config.prepend_text = ""  # text put before the first field's text
        config.fields_index = -1  # with a list of specs: >= 0 picks that one, -1 picks one per line (seeded)
        config.eof_token = 8192  # end of each frame
        config.eov_token = 8193  # end of the last frame (end of vision)
        config.n_tokens_per_frame = 256  # 16 x 16 VQGAN codes
        config.max_n_frames = -1  # > 0: sample at most this many frames uniformly
        return _update_config(config, updates)

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.config = self.get_default_config(config)
        if not self.config.fields_from_example:
            raise ValueError("vision_text_processor: fields_from_example must name the key holding each example's fields")
        if self.config.n_tokens_per_frame <= 0:
            raise ValueError(f"vision_text_processor.n_tokens_per_frame must be positive, got {self.config.n_tokens_per_frame}")
        self.vision_start = list(tokenizer.encode("<vision>", add_bos=True))
        self.vision_end = list(tokenizer.encode("</vision>", add_bos=True))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True)

    def _vision_codes(self, example: dict, key: str) -> tuple[np.ndarray, int]:
        """Frames' codes with eof/eov markers ([n_frames * (tpf + 1)]) and the count of dropped codes."""
        if key not in example:
            raise DataError(f"missing field {key!r}; the example has keys {sorted(example)[:20]}", "missing_field")
        codes = example[key]
        if not isinstance(codes, list):
            raise DataError(f"vision field {key!r} must be a list of codes, got {type(codes).__name__}", "bad_vision")
        tpf = self.config.n_tokens_per_frame
        if len(codes) < tpf:
            raise DataError(f"vision field {key!r} holds {len(codes)} codes, fewer than one frame "
                            f"(n_tokens_per_frame={tpf})", "bad_vision")
        if not all(type(c) is int for c in codes):
            bad = next(c for c in codes if type(c) is not int)
            raise DataError(f"vision field {key!r} must hold integer codes, found {bad!r}", "bad_vision")
        arr = np.asarray(codes, dtype=np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.config.eof_token:
            raise DataError(f"vision field {key!r}: codes must lie in [0, {self.config.eof_token}), "
                            f"found range [{lo}, {hi}]", "bad_vision")
        n_frames, dropped = divmod(len(arr), tpf)
        frames = arr[: n_frames * tpf].reshape(n_frames, tpf)  # [n_frames, tpf]
        if 0 < self.config.max_n_frames < n_frames:
            frames = frames[np.linspace(0, n_frames - 1, self.config.max_n_frames).astype(int)]
            n_frames = self.config.max_n_frames
        markers = np.full((n_frames, 1), self.config.eof_token, np.int64)
        markers[-1, 0] = self.config.eov_token
        return np.concatenate([frames, markers], axis=1).reshape(-1), dropped  # [n_frames * (tpf + 1)]

    def __call__(self, example: dict, line_index: int = 0, add_bos_token: bool = True,
                 add_eos_token: bool = True) -> ProcessedExample:
        if not isinstance(example, dict):
            raise DataError(f"an example must be a JSON object, got {type(example).__name__}", "malformed_json")
        tokens: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        vision: list[np.ndarray] = []
        dropped = 0

        def add(ids, loss, is_vision):
            ids = np.asarray(ids, np.int32)
            tokens.append(ids)
            masks.append(np.full(len(ids), loss, np.float32))
            vision.append(np.full(len(ids), is_vision, bool))

        if add_bos_token and self.config.add_bos_token:
            add([self.tokenizer.bos_token_id], 0.0, False)
        specs = self._field_specs(example, line_index, None, self.config.fields_index)
        for i, spec in enumerate(specs):
            if spec.special:
                add([self._special_id(spec)], spec.loss, False)
            elif any("vision" in key for key in spec.keys):
                # The whole entry names the codes' key, '+' included, as the original reads it.
                body, n_dropped = self._vision_codes(example, "+".join(spec.keys))
                dropped += n_dropped
                add(self.vision_start, spec.loss, False)
                add(body, spec.loss, True)
                add(self.vision_end, spec.loss, False)
            else:
                if i == 0 and self.config.prepend_text:
                    text = self.config.prepend_text + self._text(example, spec)
                else:
                    text = self._text(example, spec)
                add(self._encode(text), spec.loss, False)
        if add_eos_token and self.config.add_eos_token:
            add([self.tokenizer.eos_token_id], 1.0, False)
        return ProcessedExample(np.concatenate(tokens), np.concatenate(masks), np.concatenate(vision), dropped)


# ----------------------------------------------------------------------------------------
# Rows: the three layouts (stream, pad, packed)
# ----------------------------------------------------------------------------------------

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
    examples of each example's mean token loss.
    """

    def __init__(self, seq_length: int, n_rows: int, state: dict | None = None):
        self.seq_length, self.n_rows = seq_length, n_rows
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
        pieces = example_to_pieces(example, self.seq_length, weighted=True)
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


_LAYOUTS = {"stream": StreamRows, "pad": PadRows, "packed": Packer}


# ----------------------------------------------------------------------------------------
# Reading: lines (or Hugging Face rows) -> processed examples, in a deterministic order
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Wrap:
    """End of one pass over the source; ``from_start`` when the pass began at its first line."""

    from_start: bool
    n_read: int  # lines (rows) read in this pass, all ranks


@dataclasses.dataclass
class _Problem:
    kind: str
    message: str


@dataclasses.dataclass
class _Blank:
    """A blank line (results cross process boundaries, so markers are types, not identities)."""


_WORKER_PROCESSOR = None


def _init_worker(processor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _process_line(processor, item):
    """(index, end_loc, raw bytes) -> ProcessedExample | _Problem | _Blank; markers pass through."""
    if isinstance(item, _Wrap):
        return item
    index, _, raw = item
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Problem("malformed_json", f"not valid UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return _Blank()
    try:
        example = json.loads(text)
    except json.JSONDecodeError as e:
        return _Problem("malformed_json", f"invalid JSON ({e.msg} at column {e.colno}): {text.strip()[:120]!r}")
    try:
        return processor(example, line_index=index)
    except DataError as e:
        return _Problem(e.kind, str(e))


def _process_line_in_worker(item):
    return _process_line(_WORKER_PROCESSOR, item)


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = [next(iterator) for _ in range(size)]
        yield chunk


def _open_binary(path: str):
    if "://" in path:
        import fsspec  # optional: remote or in-memory files (gs://, s3://, memory://)

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


# ----------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------

class _Dataset:
    """Shared loop of the datasets: source items -> layout -> (batch, metrics), with state.

    Subclasses set ``self.config``, ``self._processor``, ``self._layout_name`` and implement
    ``_items()``: an endless iterator of (index, loc, result) in source order, where result is
    a ProcessedExample, a _Problem, a _Blank or a _Wrap marker (index, loc = None).
    """

    _source_label = "source"

    def __init__(self, config, tokenizer, processor, data_rank: int, data_world: int, sharded: bool):
        self._tokenizer = tokenizer
        self._processor = processor
        if data_world < 1 or not 0 <= data_rank < data_world:
            raise ValueError(f"data_rank={data_rank} must lie in [0, data_world={data_world})")
        self.sharded = bool(sharded and data_world > 1)
        self.data_rank, self.data_world = (data_rank, data_world) if self.sharded else (0, 1)
        c = self.config
        if c.seq_length <= 0 or c.batch_size <= 0:
            raise ValueError(f"seq_length={c.seq_length} and batch_size={c.batch_size} must be positive")
        if self.sharded and c.batch_size % data_world:
            raise ValueError(f"batch_size={c.batch_size} is the global batch and must be divisible by the "
                             f"number of data-reading processes data_world={data_world}")
        # batch_size is global (the original): each of data_world readers yields its share.
        self.local_batch_size = c.batch_size // self.data_world
        self._next_index = 0  # index of the next line/row to read
        self._last_index = -1  # index of the last line/row consumed (metrics, original 'index')
        self._file_loc = 0  # byte offset of the next line (JSON files)
        self._total_tokens = 0
        self._epoch = 0
        self._counters: dict[str, int] = collections.Counter()
        self._buffer: dict | None = None
        self._snapshot: dict | None = None
        self._n_reported = 0

    # -- state ------------------------------------------------------------------------------
    def _layout_key(self) -> dict:
        return dict(layout=self._layout_name, seq_length=self.config.seq_length,
                    local_batch_size=self.local_batch_size, data_rank=self.data_rank,
                    data_world=self.data_world)

    def _position_state(self) -> dict:
        return dict(index=self._last_index, next_index=self._next_index, file_loc=self._file_loc,
                    total_tokens=self._total_tokens, epoch=self._epoch, counters=dict(self._counters))

    def _make_state(self) -> dict:
        return dict(self._position_state(), version=STATE_FORMAT_VERSION, config=self.config.to_dict(),
                    buffer=self._buffer, layout=self._layout_key())

    def get_state_dict(self) -> dict:
        """Small picklable state; loading it makes iteration continue at exactly the next batch.

        Keys: file_loc (byte offset of the next line), index (last line read), total_tokens
        (as the original's dataset.pkl), next_index (index of the line at file_loc), buffer
        (tokens read but not yet yielded), epoch, counters, config, layout, version.
        """
        return copy.copy(self._snapshot) if self._snapshot is not None else self._make_state()

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``get_state_dict`` (or an original LWM ``dataset.pkl``).

        The saved config is compared, not applied: fields that differ are logged and the
        current config wins. A partial buffer saved under another layout (seq_length, batch,
        mode, data rank) is dropped with a warning; reading then resumes at the next line.
        """
        if not isinstance(state, dict):
            raise ValueError(f"dataset state must be a dict, got {type(state).__name__}")
        saved = state.get("config")
        if saved is not None:
            saved = saved.to_dict() if hasattr(saved, "to_dict") else dict(saved)
            now = self.config.to_dict()
            diff = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
            if diff:
                logger.warning("dataset state was saved with other config values (saved, now): %s; "
                               "using the current ones", diff)
        self._total_tokens = int(state.get("total_tokens", self._total_tokens))
        if "version" not in state:
            # An original LWM state: 'index' is the last line read, 'file_loc' the offset after it;
            # its partial buffer was not saved, so reading resumes at the next line.
            self._last_index = int(state.get("index", self._last_index))
            self._file_loc = int(state.get("file_loc", self._file_loc))
            self._next_index = 0 if self._file_loc == 0 else self._last_index + 1
            self._buffer = None
        else:
            self._last_index = int(state["index"])
            self._next_index = int(state["next_index"])
            self._file_loc = int(state.get("file_loc") or 0)
            self._epoch = int(state.get("epoch", 0))
            self._counters = collections.Counter(state.get("counters", {}))
            self._buffer = state.get("buffer")
            if self._buffer is not None and state.get("layout") != self._layout_key():
                logger.warning("dataset state holds a partial batch made for %s but this loader uses %s; "
                               "dropping it and resuming at the next unread example",
                               state.get("layout"), self._layout_key())
                self._buffer = None
        self._snapshot = None

    # -- iteration ----------------------------------------------------------------------------
    def _problem_where(self, index: int) -> str:
        raise NotImplementedError

    def _items(self) -> Iterator[tuple[int | None, int | None, Any]]:
        raise NotImplementedError

    def _metrics(self, batch_stats: dict, start_time: float, start_tokens: int, step_times) -> dict:
        now = time.time()
        metrics = {
            "dataset_file_loc": self._file_loc,
            "dataset_example_index": self._last_index,
            "dataset_total_tokens": self._total_tokens,
            "dataset_accumulated_tps": (self._total_tokens - start_tokens) / max(now - start_time, 1e-9),
            "dataset_average_tps": self.config.batch_size * self.config.seq_length / max(float(np.mean(step_times)), 1e-9),
            "dataset_epoch": self._epoch,
        }
        for kind in PROBLEM_KINDS:
            metrics[f"dataset_{kind}_lines"] = self._counters.get(f"dataset_{kind}_lines", 0)
        for key in ("dataset_blank_lines", "dataset_partial_frame_lines", "dataset_truncated_examples",
                    "dataset_split_examples", "dataset_empty_examples", "dataset_no_loss_examples"):
            metrics[key] = self._counters.get(key, 0)
        metrics.update(batch_stats)
        return metrics

    def _report(self, message: str) -> None:
        """Log a problem; past MAX_LOGGED_PROBLEMS only every 10,000th (all are counted in metrics)."""
        self._n_reported += 1
        if self._n_reported <= MAX_LOGGED_PROBLEMS or self._n_reported % 10_000 == 0:
            logger.warning(message)
        if self._n_reported == MAX_LOGGED_PROBLEMS:
            logger.warning("%s: %d problems so far; from now on only every 10,000th is logged, all are "
                           "counted in the dataset_*_lines metrics", self._source_label, MAX_LOGGED_PROBLEMS)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        c = self.config
        rows = _LAYOUTS[self._layout_name](c.seq_length, self.local_batch_size, self._buffer)
        pad_id = self._tokenizer.bos_token_id
        global_chunk = c.batch_size * c.seq_length
        start_time = last_time = time.time()
        start_tokens = self._total_tokens
        step_times: collections.deque[float] = collections.deque(maxlen=max(1, c.throughput_average_window_size))
        usable_in_pass, first_problem = 0, None
        items = self._items()
        try:
            while True:
                # A restored partial batch may already be complete: yield it before reading on.
                while rows.ready():
                    batch, stats = rows.pop(pad_id)
                    if c.always_start_with_bos:
                        batch["input_tokens"][:, 0] = self._tokenizer.bos_token_id
                    self._total_tokens += global_chunk
                    now = time.time()
                    step_times.append(now - last_time)
                    last_time = now
                    self._buffer = rows.state()
                    self._snapshot = self._make_state()
                    yield batch, self._metrics(stats, start_time, start_tokens, step_times)
                index, loc, result = next(items)
                if isinstance(result, _Wrap):
                    if result.from_start and usable_in_pass == 0:
                        what = "is empty" if result.n_read == 0 else (
                            f"has no usable example for data rank {self.data_rank} of {self.data_world} in a "
                            f"full pass over {result.n_read} lines; counts: "
                            f"{ {k: v for k, v in self._counters.items() if v} }; first problem: {first_problem}")
                        raise DataError(f"{self._source_label} {what}", "empty")
                    usable_in_pass = 0
                    self._epoch += 1
                    self._next_index, self._file_loc = 0, 0
                    continue
                self._last_index, self._next_index = index, index + 1
                if loc is not None:
                    self._file_loc = loc
                if isinstance(result, _Blank):
                    self._counters["dataset_blank_lines"] += 1
                    continue
                if isinstance(result, _Problem):
                    self._counters[f"dataset_{result.kind}_lines"] += 1
                    message = f"{self._problem_where(index)}: {result.message}; skipped"
                    first_problem = first_problem or message
                    self._report(message)
                    continue
                usable_in_pass += 1
                if result.dropped_vision_codes:
                    self._counters["dataset_partial_frame_lines"] += 1
                    self._report(f"{self._problem_where(index)}: {result.dropped_vision_codes} vision codes are not "
                                 "a multiple of n_tokens_per_frame; dropped the trailing partial frame")
                self._counters.update(rows.add(result))
        finally:
            items.close()  # stops the tokenizer workers, if any

    # -- original properties --------------------------------------------------------------------
    @property
    def seq_length(self) -> int:
        return self.config.seq_length

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def text_processor(self):
        return self._processor

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size


class JsonDataset(_Dataset):
    """Newline-delimited JSON, one example per line, tokenized by a (Vision)TextProcessor.

    Process ``data_rank`` of ``data_world`` reads lines data_rank, data_rank + data_world, ...
    (0-based line indices; when use_data_sharded_loader is on) and yields batches of
    batch_size // data_world rows. Tokenization can run in ``tokenizer_processes`` spawned
    workers; results are consumed in file order, so batches do not depend on the count.
    """

    _layout_name = "stream"

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.path = ""  # the .jsonl file (local path, or an fsspec URL such as gs://...)
        config.seq_length = 1024  # tokens per row
        config.batch_size = 8  # global rows per step, summed over the data-reading processes
        config.always_start_with_bos = False  # overwrite column 0 of input_tokens with BOS
        config.start_seek_loc = 0  # byte offset of the first line to read
        config.example_index_at_start = 0  # line index of the line at start_seek_loc
        config.tokens_count_at_start = 0  # initial value of dataset_total_tokens
        config.tokenizer_processes = 1  # > 1: tokenize in that many worker processes
        config.tokenizer_parallel_chunk_size = 32  # lines per task sent to a worker
        config.tokenizer_parallel_batch_size = 1024  # lines read ahead per round of tasks
        config.throughput_average_window_size = 200  # batches averaged in dataset_average_tps
        config.pad = False  # one example per row (truncated, padded) instead of a stream
        config.packed = False  # masked sequence packing (see Packer); excludes pad
        config.use_data_sharded_loader = True  # each data-reading process reads its own lines
        config.return_local_batch = False  # read by the trainer: keep batches host-local
        return _update_config(config, updates)

    def __init__(self, config, tokenizer, text_processor, data_rank: int = 0, data_world: int = 1):
        self.config = self.get_default_config(config)
        self._set_layout()
        if not self.config.path:
            raise ValueError(f"{type(self).__name__}: set path to a JSONL file")
        if "://" not in self.config.path and not os.path.isfile(self.config.path):
            raise FileNotFoundError(f"{type(self).__name__}: no such file: {self.config.path}")
        super().__init__(self.config, tokenizer, text_processor, data_rank, data_world,
                         self.config.use_data_sharded_loader)
        self._file_loc = int(self.config.start_seek_loc)
        self._next_index = int(self.config.example_index_at_start)
        self._last_index = self._next_index - 1
        self._total_tokens = int(self.config.tokens_count_at_start)
        self._source_label = self.config.path

    def _set_layout(self) -> None:
        if self.config.pad and self.config.packed:
            raise ValueError("json_dataset: pad and packed are exclusive; choose one")
        self._layout_name = "packed" if self.config.packed else "pad" if self.config.pad else "stream"

    def _problem_where(self, index: int) -> str:
        return f"{self.config.path} line {index + 1}"

    def _lines(self) -> Iterator:
        """(index, end_loc, raw) of this rank's lines from the saved position, then _Wrap at each EOF."""
        with _open_binary(self.config.path) as f:
            f.seek(self._file_loc)
            index, from_start, n_read = self._next_index, self._file_loc == 0, 0
            while True:
                raw = f.readline()
                if not raw:
                    yield _Wrap(from_start, n_read)
                    f.seek(0)
                    index, from_start, n_read = 0, True, 0
                    continue
                n_read += 1
                if index % self.data_world == self.data_rank:
                    yield index, f.tell(), raw
                index += 1

    def _items(self) -> Iterator:
        lines = self._lines()
        # More workers than cores only adds start-up (each loads the tokenizer): the original
        # scripts' 16 cost 36 s on 2 cores. The stream is the same for any count.
        n_procs = min(self.config.tokenizer_processes, os.cpu_count() or 1)
        if n_procs < self.config.tokenizer_processes:
            logger.info("tokenizer_processes=%d capped at the %d cores of this host", self.config.tokenizer_processes,
                     n_procs)
        if n_procs <= 1:
            for item in lines:
                result = _process_line(self._processor, item)
                yield (None, None, result) if isinstance(item, _Wrap) else (item[0], item[1], result)
            return
        # Workers tokenize rounds of tokenizer_parallel_batch_size lines; two rounds stay in flight and
        # results come back in submission order, so the stream is the same as with one process.
        ctx = multiprocessing.get_context(WORKER_START_METHOD)
        rounds = _chunks(lines, max(1, self.config.tokenizer_parallel_batch_size))
        chunk = max(1, self.config.tokenizer_parallel_chunk_size)
        with ctx.Pool(n_procs, initializer=_init_worker, initargs=(self._processor,)) as pool:
            in_flight = collections.deque()
            for _ in range(2):
                items = next(rounds)
                in_flight.append((items, pool.map_async(_process_line_in_worker, items, chunksize=chunk)))
            while True:
                items, pending = in_flight.popleft()
                results = pending.get()
                nxt = next(rounds)
                in_flight.append((nxt, pool.map_async(_process_line_in_worker, nxt, chunksize=chunk)))
                for item, result in zip(items, results):
                    yield (None, None, result) if isinstance(item, _Wrap) else (item[0], item[1], result)


class JsonVisionDataset(JsonDataset):
    """JSONL with pre-tokenized vision codes, processed by a VisionTextProcessor.

    ``mode``: ``pad`` (one example per row, the original default), ``no_pad`` (examples
    concatenated into a stream) or ``packed`` (masked sequence packing).
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.path = ""  # the .jsonl file (local path, or an fsspec URL)
        config.seq_length = 384  # tokens per row
        config.batch_size = 4  # global rows per step, summed over the data-reading processes
        config.always_start_with_bos = False  # overwrite column 0 of input_tokens with BOS
        config.start_seek_loc = 0  # byte offset of the first line to read
        config.example_index_at_start = 0  # line index of the line at start_seek_loc
        config.tokens_count_at_start = 0  # initial value of dataset_total_tokens
        config.tokenizer_processes = 1  # > 1: tokenize in that many worker processes
        config.tokenizer_parallel_chunk_size = 32  # lines per task sent to a worker
        config.tokenizer_parallel_batch_size = 1024  # lines read ahead per round of tasks
        config.throughput_average_window_size = 200  # batches averaged in dataset_average_tps
        config.use_data_sharded_loader = True  # each data-reading process reads its own lines
        config.return_local_batch = False  # read by the trainer: keep batches host-local
        config.mode = "pad"  # pad | no_pad | packed
        return _update_config(config, updates)

    def _set_layout(self) -> None:
        modes = {"pad": "pad", "no_pad": "stream", "packed": "packed"}
        if self.config.mode not in modes:
            raise ValueError(f"json_vision_dataset.mode must be one of {sorted(modes)}, got {self.config.mode!r}")
        self._layout_name = modes[self.config.mode]


class HuggingfaceDataset(_Dataset):
    """A ``datasets.load_dataset`` split (hub name, or a builder such as ``json`` / ``text``
    with ``data_files`` for local files), tokenized by a TextProcessor in the main process.

    ``datasets`` is imported only here (optional dependency). With data_world > 1, process
    data_rank keeps rows data_rank, data_rank + data_world, ... The state records the next row.
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.path = "c4"  # dataset name on the hub, a local folder, or a builder (json, text, csv, parquet)
        config.name = "en"  # dataset configuration name ('' for none)
        config.split = "train"
        config.streaming = False
        config.data_files = ""  # comma-separated files for builders such as json / text ('' for none)
        config.cache_dir = ""  # datasets cache folder ('' for the default)
        config.seq_length = 1024  # tokens per row
        config.batch_size = 8  # global rows per step, summed over the data-reading processes
        config.always_start_with_bos = False  # overwrite column 0 of input_tokens with BOS
        config.packed = False  # masked sequence packing instead of the concatenated stream
        config.throughput_average_window_size = 200  # batches averaged in dataset_average_tps
        return _update_config(config, updates)

    def __init__(self, config, tokenizer, text_processor, data_rank: int = 0, data_world: int = 1):
        self.config = self.get_default_config(config)
        self._layout_name = "packed" if self.config.packed else "stream"
        super().__init__(self.config, tokenizer, text_processor, data_rank, data_world, True)
        try:
            import datasets
        except ImportError:
            raise ImportError("huggingface_dataset needs the `datasets` package: pip install datasets") from None
        c = self.config
        files = [f.strip() for f in c.data_files.split(",") if f.strip()] or None
        if not c.split:
            raise ValueError("huggingface_dataset.split must name a split (e.g. 'train')")
        try:
            self._dataset = datasets.load_dataset(
                c.path, c.name or None, data_files=files, split=c.split, streaming=c.streaming,
                cache_dir=c.cache_dir or None)
        except Exception as e:
            cause = f"{type(e).__name__}: {e}" + (f" (caused by {type(e.__cause__).__name__}: {e.__cause__})"
                                                 if e.__cause__ else "")
            raise DataError(f"datasets.load_dataset could not load path={c.path!r} name={c.name!r} "
                            f"data_files={files} split={c.split!r}: {cause}. A JSONL file with malformed lines "
                            f"loads with type=json, which skips and reports them.", "malformed_json") from e
        self._source_label = f"huggingface dataset {c.path!r} ({c.name or '-'}, split {c.split!r})"

    @property
    def dataset(self):
        return self._dataset

    def _problem_where(self, index: int) -> str:
        return f"{self._source_label} row {index}"

    def _items(self) -> Iterator:
        start = self._next_index
        while True:
            rows = self._dataset.skip(start) if start > 0 else self._dataset
            index = start
            for example in rows:
                if index % self.data_world == self.data_rank:
                    try:
                        result = self._processor(dict(example), line_index=index)
                    except DataError as e:
                        result = _Problem(e.kind, str(e))
                    yield index, None, result
                index += 1
            yield None, None, _Wrap(start == 0, index - start)
            start = 0


class DatasetFactory:
    """Builds the dataset that ``config.type`` names: ``huggingface``, ``json`` or ``json_vision``."""

    def __init__(self):
        raise ValueError("DatasetFactory is a static class; call DatasetFactory.load_dataset(config, tokenizer)")

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.type = "huggingface"  # huggingface | json | json_vision
        config.text_processor = TextProcessor.get_default_config()
        config.huggingface_dataset = HuggingfaceDataset.get_default_config()
        config.json_dataset = JsonDataset.get_default_config()
        config.vision_text_processor = VisionTextProcessor.get_default_config()
        config.json_vision_dataset = JsonVisionDataset.get_default_config()
        return _update_config(config, updates)

    @classmethod
    def load_dataset(cls, config, tokenizer, data_rank: int = 0, data_world: int = 1):
        """The dataset for this process: ``data_rank`` of ``data_world`` processes reading distinct data."""
        config = cls.get_default_config(config)
        if config.type == "huggingface":
            return HuggingfaceDataset(config.huggingface_dataset, tokenizer,
                                      TextProcessor(config.text_processor, tokenizer), data_rank, data_world)
        if config.type == "json":
            return JsonDataset(config.json_dataset, tokenizer,
                               TextProcessor(config.text_processor, tokenizer), data_rank, data_world)
        if config.type == "json_vision":
            return JsonVisionDataset(config.json_vision_dataset, tokenizer,
                                     VisionTextProcessor(config.vision_text_processor, tokenizer),
                                     data_rank, data_world)
        raise ValueError(f"dataset type must be huggingface, json or json_vision, got {config.type!r}")
