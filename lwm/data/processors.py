"""Processors: one JSON example -> tokens, loss masks and vision masks, following a field spec.

``parse_field_spec`` reads specs such as ``"[question],answer,<|eos|>"``; ``TextProcessor``
encodes text examples, ``VisionTextProcessor`` examples that mix text and VQGAN codes. Both
are picklable (a spawned tokenizer worker rebuilds the tokenizer from its model file) and
raise ``DataError`` for a bad example.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
from ml_collections import ConfigDict

from lwm.data.common import DataError, _update_config


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
    A line with ``"marker_bos": false`` gets its markers without the BOS: the stream of
    ``lwm.vision_generation``'s prompts (``... ASSISTANT: <vision>`` is one encode call there).
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
        # The markers as the original's loader encodes them (BOS first), and without the BOS: a
        # line with "marker_bos": false trains on lwm.vision_generation's prompt stream, where
        # `<vision>` ends the prompt text (`... ASSISTANT: <vision>`, one encode call).
        self.markers = {bos: (list(tokenizer.encode("<vision>", add_bos=bos)),
                              list(tokenizer.encode("</vision>", add_bos=bos))) for bos in (True, False)}

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
        marker_bos = example.get("marker_bos", True)
        if not isinstance(marker_bos, bool):
            raise DataError(f"'marker_bos' must be true or false, got {marker_bos!r}", "bad_field")
        specs = self._field_specs(example, line_index, None, self.config.fields_index)
        for i, spec in enumerate(specs):
            if spec.special:
                add([self._special_id(spec)], spec.loss, False)
            elif any("vision" in key for key in spec.keys):
                # The whole entry names the codes' key, '+' included, as the original reads it.
                body, n_dropped = self._vision_codes(example, "+".join(spec.keys))
                dropped += n_dropped
                start, end = self.markers[marker_bos]
                add(start, spec.loss, False)
                add(body, spec.loss, True)
                add(end, spec.loss, False)
            else:
                if i == 0 and self.config.prepend_text:
                    text = self.config.prepend_text + self._text(example, spec)
                else:
                    text = self._text(example, spec)
                add(self._encode(text), spec.loss, False)
        if add_eos_token and self.config.add_eos_token:
            add([self.tokenizer.eos_token_id], 1.0, False)
        return ProcessedExample(np.concatenate(tokens), np.concatenate(masks), np.concatenate(vision), dropped)
