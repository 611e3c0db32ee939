"""Readable text for the merged rows: a sequence's text and the string of each of its tokens.

The text of a sequence is the shard's ``text`` column when it has one, else
the token ids decoded with the model's tokenizer. A token's string is what the
token adds to the decoded sequence, *including the whitespace in front of it*,
so that the strings of a sequence's tokens, concatenated, give its decoded
text (a word-level tokenizer that decodes ``[the, cat]`` to ``"the cat"``
yields ``"the"`` and ``" cat"``; a byte-level BPE already carries the space).
Without a tokenizer a token is shown by its id, ``⟨id⟩``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The string of each token of ``ids`` (len(ids) strings; joined they give the decoded text where they align).

    Each token is decoded alone, then found in the decoding of the whole
    sequence from where the previous one ended; the characters skipped on the
    way (whitespace) are put in front of it. A token that decodes to nothing
    findable (part of a multi-byte character, a dropped special token) keeps
    its own decoding and the cursor stays put.
    """
    ids = [int(i) for i in ids]
    full = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    singles = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    out, cursor = [], 0
    for piece in singles:
        at = full.find(piece, cursor) if piece else -1
        if at < 0 or (at > cursor and full[cursor:at].strip()):
            out.append(piece)
            continue
        out.append(full[cursor:at + len(piece)])
        cursor = at + len(piece)
    return out


def id_piece(token_id: int) -> str:
    """A token shown by its id, where there is no tokenizer to give its string."""
    return f"⟨{token_id}⟩"


def id_text(ids: Sequence[int], limit: int = 48) -> str:
    """Token ids as ``⟨id⟩ ⟨id⟩ ...``: the first ``limit`` of them, then how many there are."""
    shown = " ".join(id_piece(int(t)) for t in ids[:limit])
    return shown + (f" … ({len(ids)} tokens)" if len(ids) > limit else "")


def read_texts(shard: str, doc_ids: set[str]) -> dict[str, str]:
    """``{doc_id: text}`` of the rows of ``shard`` named in ``doc_ids`` (empty when the shard has no text column)."""
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if "text" not in pf.schema_arrow.names:
            return {}
        out: dict[str, str] = {}
        wanted = list(doc_ids)
        for batch in pf.iter_batches(columns=["doc_id", "text"], batch_size=8192):
            keep = pc.is_in(batch.column("doc_id"), value_set=pc.cast(wanted, batch.column("doc_id").type))
            sel = batch.filter(keep)
            out.update(zip(sel.column("doc_id").to_pylist(), sel.column("text").to_pylist()))
    return {d: t for d, t in out.items() if t is not None}
