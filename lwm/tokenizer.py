"""The LLaMA SentencePiece tokenizer, with the exact behaviour LWM's token streams rely on.

The released LWM checkpoints were trained on streams built by the *slow* (sentencepiece,
``legacy=True``) ``transformers.LlamaTokenizer``: text is split on the special-token
strings (``<s>``, ``</s>``, ``<unk>``), every other chunk goes through SentencePiece as
it is (so ``' ASSISTANT:'`` keeps its leading ``'▁'`` piece, 28705), and ``encode``
prepends BOS when asked. transformers 5 no longer has that tokenizer (its
``LlamaTokenizer`` drops the leading-space piece), so we call SentencePiece directly:

    >>> tok = load_tokenizer("builtin")
    >>> tok.encode(" ASSISTANT:", add_bos=True)
    [1, 28705, 8602, 8048, 12738, 28747]
    >>> tok.encode("<s>You", add_bos=True)[:2]
    [1, 1]

``load_tokenizer`` accepts what the original ``--tokenizer`` / ``--tokenizer.vocab_file``
flags accepted: a ``tokenizer.model`` file, a folder holding one, or a Hugging Face hub
name (downloaded when the hub is reachable), plus ``builtin`` for the tiny-world tokenizer.
The file or folder may be in a bucket (``gs://bucket/LWM-Text-1M/tokenizer.model``, or the
folder URL): SentencePiece then loads the model's bytes, read through ``lwm.storage``.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from lwm import storage
from lwm.assets import BUILTIN_TOKENIZER, builtin_tokenizer_path

DEFAULT_TOKENIZER = "LargeWorldModel/LWM-Text-1M"


class Tokenizer:
    """SentencePiece LLaMA tokenizer: ``encode``/``decode`` and padded batch encoding."""

    def __init__(self, model_file: str):
        self.model_file = model_file  # a path or URL: data-loader workers reload the tokenizer from it
        if storage.is_remote(model_file):  # sentencepiece opens only local files; give it the bytes
            self.sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_file))
        else:
            if not os.path.isfile(model_file):
                raise FileNotFoundError(f"tokenizer model file not found: {model_file}")
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        # LLaMA has no pad piece; padded positions are always masked, so any id works.
        self.pad_token_id = self.eos_token_id
        self.special_tokens = {
            self.sp.id_to_piece(i): i
            for i in (self.unk_token_id, self.bos_token_id, self.eos_token_id)
            if i >= 0
        }
        self._special_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)) + ")"
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in the text become their ids."""
        ids = [self.bos_token_id] if add_bos else []
        for chunk in self._special_re.split(text):
            if not chunk:
                continue
            if chunk in self.special_tokens:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def batch_encode(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        add_bos: bool = True,
        padding_side: str = "left",
        truncation_side: str = "right",
        pad_to_multiple_of: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad a batch: (ids [batch, length] int32, attention_mask [batch, length] int32).

        ``max_length`` truncates (from ``truncation_side``) and pads every row to exactly that
        length; without it rows pad to the longest (rounded up to ``pad_to_multiple_of``).
        """
        return self.pad([self.encode(t, add_bos=add_bos) for t in texts], max_length,
                        padding_side, truncation_side, pad_to_multiple_of)

    def pad(
        self,
        rows: Sequence[Sequence[int]],
        max_length: int | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        pad_to_multiple_of: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad lists of ids to one length; see ``batch_encode``."""
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        if max_length is not None:
            rows = [r[-max_length:] if truncation_side == "left" else r[:max_length] for r in rows]
            length = max_length
        else:
            length = max((len(r) for r in rows), default=0)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        for i, r in enumerate(rows):
            n = len(r)
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[i, sl] = r
            mask[i, sl] = 1
        return ids, mask


def resolve_tokenizer_file(spec: str) -> str:
    """Path of the SentencePiece model that ``spec`` names (see the module docstring)."""
    spec = (spec or "").strip()
    if spec in ("", BUILTIN_TOKENIZER):
        return builtin_tokenizer_path()
    if storage.is_remote(spec):
        return _resolve_remote(spec)
    spec = os.path.expanduser(spec)
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer folder {spec} holds no tokenizer.model")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(spec, "tokenizer.model")
        except Exception as e:  # offline, unknown repo, no huggingface_hub
            raise FileNotFoundError(
                f"tokenizer {spec!r} is not a local file or folder and could not be fetched from the "
                f"Hugging Face hub ({type(e).__name__}: {e}). Pass --tokenizer=PATH to a tokenizer.model "
                f"(or a folder holding one), or --tokenizer=builtin for the tiny-world tokenizer."
            ) from None
    raise FileNotFoundError(f"tokenizer {spec!r}: no such file or folder")


def _resolve_remote(url: str) -> str:
    """A tokenizer.model object, or a bucket folder holding one."""
    if storage.isfile(url):
        return url
    path = storage.join(url, "tokenizer.model")
    if storage.isfile(path):
        return path
    if storage.isdir(url):
        raise FileNotFoundError(f"tokenizer folder {url} holds no tokenizer.model")
    raise FileNotFoundError(f"tokenizer {url}: no such file or object")


_CACHE: dict[str, Tokenizer] = {}


def load_tokenizer(spec: str = DEFAULT_TOKENIZER) -> Tokenizer:
    """A (cached) ``Tokenizer`` from a file, folder, hub name or ``builtin``."""
    path = resolve_tokenizer_file(spec)
    path = path if storage.is_remote(path) else os.path.abspath(path)
    if path not in _CACHE:
        _CACHE[path] = Tokenizer(path)
    return _CACHE[path]
