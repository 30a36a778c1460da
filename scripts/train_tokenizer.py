"""Train a small LLaMA-style SentencePiece tokenizer on a JSONL corpus (for tiny worlds).

    python scripts/train_tokenizer.py --input=train.jsonl --output=tok/tokenizer.model --vocab_size=2048

The model has LLaMA's layout of special ids (unk 0, <s> 1, </s> 2, no pad), byte fallback (no
text is ever unknown) and one piece per digit, so a 7-digit number is always 7 tokens and a
model can copy it digit by digit. Use it anywhere a tokenizer is asked for
(`--tokenizer=tok/tokenizer.model`). Why a small one: at width 128 a 32K-word LM head costs
about ten times the FLOPs of two transformer layers per token. --input and --output may be
bucket URLs (gs://bucket/tok/tokenizer.model).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import sentencepiece as spm

from lwm import cli, storage


def read_texts(path: str, field: str = "text"):
    """The `field` of every JSON line; a line that is not JSON or lacks it is an error naming the line."""
    with storage.open_file(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected a JSON object with a {field!r} string ({e})") from None


def train_tokenizer(input_path: str, output: str, vocab_size: int = 2048, field: str = "text",
                    model_type: str = "bpe") -> str:
    """Train on the texts of `input_path`; writes `output` (a .model file) and returns its path."""
    if not output.endswith(".model"):
        raise ValueError(f"--output must end in .model (SentencePiece's file), got {output!r}")
    storage.makedirs(storage.dirname(storage.display(output)))  # a local folder fails here, before training
    with tempfile.TemporaryDirectory() as tmp:
        text_file = os.path.join(tmp, "text.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            for text in read_texts(input_path, field):
                f.write(" ".join(text.split()) + "\n")  # one sentencepiece "sentence" per example
        prefix = os.path.join(tmp, "tokenizer")
        spm.SentencePieceTrainer.train(
            input=text_file, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            character_coverage=1.0, max_sentence_length=1 << 20, num_threads=os.cpu_count() or 1,
            minloglevel=2)
        with open(prefix + ".model", "rb") as f:
            storage.write_bytes(output, f.read())  # atomic: a local rename, or one object upload
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python scripts/train_tokenizer.py --input=train.jsonl --output=tok/tokenizer.model [--vocab_size=2048]",
        formatter_class=cli.HelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL corpus, one {\"text\": ...} a line (a path or bucket URL)")
    parser.add_argument("--output", required=True, help="where the tokenizer.model goes (a path or bucket URL)")
    parser.add_argument("--vocab_size", type=int, default=2048, help="pieces in the model, special ids included")
    parser.add_argument("--field", default="text", help="the JSON key holding the text")
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece's algorithm")
    cli.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    with cli.user_errors(args.verbose, expected=(RuntimeError,)):  # sentencepiece's errors are RuntimeErrors
        path = train_tokenizer(args.input, args.output, args.vocab_size, args.field, args.model_type)
    pieces = spm.SentencePieceProcessor(model_proto=storage.read_bytes(path)).get_piece_size()
    print(f"tokenizer: {path} ({pieces} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
