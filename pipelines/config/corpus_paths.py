"""What ``data.corpus`` names: a folder (prefix) of shards, a glob of them, or one Parquet file.

One rule for every reader of the setting (the job file's checks, tokenize, the
readers' views, the DDL): a corpus with a glob character (``*?[``) is a glob, one
ending in ``.parquet`` is a single file, anything else is a folder.
"""

from __future__ import annotations

import re

GLOB_CHARS = "*?["


def corpus_is_folder(corpus: str) -> bool:
    """Whether ``corpus`` names a folder (not a glob, not a single ``.parquet`` file)."""
    return not any(c in corpus for c in GLOB_CHARS) and not corpus.endswith(".parquet")


def corpus_root(corpus: str) -> str:
    """The folder of a corpus prefix or glob (the part before the first glob character, up to its last '/')."""
    if any(c in corpus for c in GLOB_CHARS):
        return re.split(r"[*?\[]", corpus, maxsplit=1)[0].rsplit("/", 1)[0]
    if corpus.endswith(".parquet"):
        return corpus.rsplit("/", 1)[0]
    return corpus.rstrip("/")
