"""The queries file: encoding, one JSON object a line (or Parquet), fields, duplicate ids, tokens.

The checks themselves are ``io.queries_file.read_queries`` (which `build-queries`
uses too); this adds the warnings. The leading-space trap of byte-level BPE tokenizers (GPT-2 style):
a completion that does not start with whitespace after a prompt that does not
end with it is tokenized as if glued to the prompt's last word (``"Chardet."``
and ``" Chardet."`` are different tokens), so it gets a warning showing both
tokenizations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..io.queries_file import has_text, read_queries, text_tokens

__all__ = ["QueriesCheck", "check_queries", "has_text", "leading_space_warning"]


@dataclass
class QueriesCheck:
    queries: int = 0
    warnings: list[str] = field(default_factory=list)


def leading_space_warning(url: str, where: str, qid: str, prompt: str, completion: str, tokenizer: Any) -> str | None:
    """The warning for a completion glued to its prompt (byte-level BPE), showing both tokenizations."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return None
    as_written = text_tokens(tokenizer, completion)
    spaced = text_tokens(tokenizer, " " + completion)
    if as_written == spaced:
        return None

    def shown(ids: list[int]) -> str:
        return f"{tokenizer.convert_ids_to_tokens(ids)} {ids}"

    return (f"{url}: {where} (query {qid!r}), field 'completion': {completion!r} does not start with a space and "
            f"the prompt does not end with one; this byte-level BPE tokenizer reads it as {shown(as_written)}, "
            f"while {' ' + completion!r} is {shown(spaced)}; add the leading space unless the completion "
            "continues the prompt's last word")


def check_queries(url: str, tokenizer: Any, vocab_size: int | None, context: int | None,
                  byte_level: bool = False) -> QueriesCheck:
    """Check every query (``io.queries_file.read_queries``); the first problem raises, the leading-space
    trap and a prompt that loses its first tokens to the model's context are warnings."""
    out = QueriesCheck()
    for q in read_queries(url, tokenizer, vocab_size, context):
        if byte_level and q.row.get("prompt_ids") is None:
            warning = leading_space_warning(url, q.where, q.query_id, q.row["prompt"], q.row["completion"], tokenizer)
            if warning:
                out.warnings.append(warning)
        cut = q.prompt_cut(context)
        if cut:
            out.warnings.append(f"{url}: {q.where} (query {q.query_id!r}), field 'prompt': prompt + completion are "
                                f"{len(q.prompt_ids) + len(q.completion_ids)} tokens, more than the model's context "
                                f"of {context}: the prompt's first {cut} tokens will be left out")
        out.queries += 1
    return out
