"""`influence show` and the report on rows a small job produces (the functions, on hand-made rows).

- Without a tokenizer: a job with pre-tokenized shards (no text column), token-id queries and a model
  folder without tokenizer files has no strings to show; the views then show ``⟨id⟩`` for every token,
  highlight the strongest of them as usual, and print the query's prompt and completion ids.
- What score_normalized is, by ``scoring.normalize``: cosine scores are not divided by the fitted tokens.
- A side's top-k with rows of the other sign (a candidate mode ranks only its candidates): those rows are
  not listed as proponents (opponents); a note says how many there are.
"""

from __future__ import annotations

import math

import pytest

from pipelines.results.load import QueryInfo, ResultRow, Run, TokenScores
from pipelines.results.report.page import heatmap
from pipelines.results.show import excerpt, legend, query_lines, render_excerpt


def row(sign: str = "top", text: str | None = None, score: float | None = None, doc: str = "doc-1") -> ResultRow:
    score = (4.0 if sign == "top" else -4.0) if score is None else score
    return ResultRow("q0", sign, 1, doc, score, score / 8, "s3://b/shards/part-0.parquet", 5, text)


IDS = [5, 20, 13, 12, 40]
SCORES = [0.1, 2.0, -3.0, 0.2, 1.5]  # proponent: 20 and 40 (and 12) are strongest; opponent: 13


def test_excerpt_shows_ids_and_highlights_the_strongest_tokens():
    tokens = TokenScores([None] * 5, IDS, SCORES)
    top = render_excerpt(excerpt(row("top"), tokens, highlight=2), "top", color=False)
    assert top == "⟨5⟩ [[⟨20⟩]] ⟨13⟩ ⟨12⟩ [[⟨40⟩]]"
    first = render_excerpt(excerpt(row("top"), TokenScores([None] * 5, IDS, [9.0] + SCORES[1:]), highlight=1), "top",
                           color=False)
    assert first == "[[⟨5⟩]] ⟨20⟩ ⟨13⟩ ⟨12⟩ ⟨40⟩"  # a highlighted first token has no space before it
    bottom = render_excerpt(excerpt(row("bottom"), tokens, highlight=2), "bottom", color=False)
    assert bottom == "⟨5⟩ ⟨20⟩ [[⟨13⟩]] ⟨12⟩ ⟨40⟩"  # only the one negative contribution


def test_excerpt_with_strings_is_unchanged_and_without_anything_says_so():
    tokens = TokenScores(["the", " cat", " sat", " on", " mats"], IDS, SCORES)
    assert render_excerpt(excerpt(row(), tokens, highlight=2), "top", False) == "the [[cat]] sat on [[mats]]"
    assert render_excerpt(excerpt(row(text=None), None), "top", False) == "(no text)"
    assert render_excerpt(excerpt(row(text="a  b\nc"), None), "top", False) == "a b c"


def test_report_heatmap_shows_ids():
    html = heatmap(TokenScores([None, "x"], [7, 8], [1.0, -1.0]), scale=1.0, normalizer=1.0)
    assert "⟨7⟩</span>" in html and ">x</span>" in html and "id 7" in html


class _Run:
    """The readers ``query_lines`` calls, over one query and its rows (default: one row a side)."""

    def __init__(self, query: QueryInfo, rows: dict[str, list[ResultRow]] | None = None):
        self.queries = [query]
        self.by_sign = rows

    def rows(self, query_id: str, sign: str, k: int) -> list[ResultRow]:
        return self.by_sign[sign][:k] if self.by_sign else [row(sign)]

    def token_scores(self, query_id: str, doc_ids: list[str]) -> dict[str, TokenScores]:
        return {d: TokenScores([None] * 5, IDS, SCORES) for d in doc_ids}

    def query_form(self, q: QueryInfo) -> str:
        return Run.query_form(self, q)

    config = {"scoring": {"rank": 8}}
    record: dict = {}


def test_query_lines_print_the_query_ids_when_there_is_no_text():
    q = QueryInfo("q0", None, None, -1.5, [0.0], 0, prompt_ids=[53, 12], completion_ids=list(range(60)))
    lines = query_lines(_Run(q), 0, k=1, bottom=False, color=False)
    text = "\n".join(lines)
    assert "prompt ids:     ⟨53⟩ ⟨12⟩" in text
    assert "completion ids: ⟨0⟩ ⟨1⟩" in text and "⟨47⟩ … (60 tokens)" in text and "⟨48⟩" not in text
    assert "[[⟨20⟩]]" in text and f"p = {math.exp(-1.5):.3g}" in text
    with_text = QueryInfo("q0", "the cat", " sat", -1.5, [0.0], 0, prompt_ids=[1], completion_ids=[2])
    assert "prompt ids" not in "\n".join(query_lines(_Run(with_text), 0, k=1, bottom=False, color=False))


def test_rows_of_the_other_sign_are_not_listed_as_proponents():
    q = QueryInfo("q0", "the cat", " sat", -1.5, [0.0], 0)
    top = [row("top", "a", 3.0, "d1"), row("top", "b", 1.0, "d2"), row("top", "c", -0.5, "d3")]
    bottom = [row("bottom", "d", -2.0, "d4")]
    text = "\n".join(query_lines(_Run(q, {"top": top, "bottom": bottom}), 0, k=10, bottom=True, color=False))
    assert "top 2 proponents" in text and "d1" in text and "d2" in text and "d3" not in text
    assert "1 more row of this side in topk/ has a negative score, not listed" in text
    assert "bottom 1 opponents" in text and "more row" not in text.split("bottom 1 opponents")[1]


@pytest.mark.parametrize("normalize, scale, words", [
    (None, 603.0, "normalized = influence / 603 tokens the factors were fitted on;"),
    ("none", 603.0, "normalized = influence / 603 tokens the factors were fitted on;"),
    ("train_norm", 603.0, "influence / the norm of the sequence's gradient / 603 tokens"),
    ("cosine", 1.0, "normalized = the cosine of the query's and the sequence's gradients"),
])
def test_the_legend_says_what_the_normalized_score_is(normalize, scale, words):
    run = Run(None, None, config={"scoring": {"normalize": normalize}} if normalize else {}, factor_tokens=603)
    assert run.scale == scale and words in legend(run, color=False)[0]



def test_query_form_says_whether_the_query_is_exact():
    """The measurement line names the query's form: dense, rank r exact on every layer, or its truncation error."""
    q = QueryInfo("q0", "a", " b", -1.0, [0.0, 0.0], 0)
    lossy = QueryInfo("q0", "a", " b", -1.0, [0.01, 0.25], 0)
    run = Run(out=None, con=None, config={"scoring": {"rank": 32}})
    assert run.query_form(q) == "rank-32 queries, exact on every layer (truncation error 0)"
    assert run.query_form(lossy) == "rank-32 truncation error (relative, max over layers) 0.25"
    assert Run(out=None, con=None, config={"scoring": {"rank": 0}}).query_form(q) == \
        "dense queries (no low-rank truncation)"
    assert Run(out=None, con=None).query_form(lossy) == "low-rank truncation error (relative, max over layers) 0.25"
    clipped = Run(out=None, con=None, config={"scoring": {"rank": 32}}, record={"stages": {"build-queries": {"rank": 17}}})
    assert clipped.query_form(q) == "rank-17 queries, exact on every layer (truncation error 0)"  # as build-queries says


def test_a_cut_prompt_is_noted_under_the_query():
    """A prompt that lost its first tokens to the model's context says so under the query (show and report)."""
    q = QueryInfo("q0", "a long prompt", " b", -1.0, [0.0], 7)
    text = "\n".join(query_lines(_Run(q), 0, k=1, bottom=False, color=False))
    assert "note: the prompt's first 7 tokens did not fit the model's context with the completion" in text
    assert "note:" not in "\n".join(query_lines(_Run(QueryInfo("q0", "a", " b", -1.0, [0.0], 0)), 0, k=1,
                                                 bottom=False, color=False))
