"""The tokenizer's unknown token: text a tokenizer cannot represent, counted so a mismatch is seen.

A corpus or a query written in words the model's tokenizer does not know (a word-level
vocabulary, another language, the wrong ``model.tokenizer``) tokenizes to the unknown
token: the job then runs, but documents and queries that differed in those words become
the same sequence. Byte-level tokenizers (GPT-2's BPE) never produce it; some name their
end-of-text token as the unknown one, so an unknown id that is also the BOS, EOS or
padding id is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WARN_SHARE = 0.05  # the corpus share of unknown tokens above which tokenize warns


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token, or None (none, or it doubles as BOS / EOS / padding)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    special = {getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return None if unk is None or unk in special else int(unk)


def count_unknown(ids: Sequence[int], unk: int | None) -> int:
    """How many of ``ids`` are the unknown token (0 when there is none)."""
    return 0 if unk is None else sum(1 for t in ids if t == unk)
