"""A run's results as typed rows, for the terminal view and the report (read through DuckDB views)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..io import storage
from ..io.token_text import id_piece
from .tables import Output, connect, open_output


@dataclass(frozen=True)
class QueryInfo:
    """One query: text, measurement f = log p(completion | prompt), truncation error of its rank-r form per layer."""

    query_id: str
    prompt: str | None
    completion: str | None
    measurement: float
    truncation_error: list[float]
    prompt_tokens_dropped: int
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None

    @property
    def truncation_error_max(self) -> float:
        return max(self.truncation_error, default=0.0)

    @property
    def cut_prompt_note(self) -> str | None:
        """What was left out of a prompt too long for the model's context (None: nothing)."""
        if not self.prompt_tokens_dropped:
            return None
        return (f"the prompt's first {self.prompt_tokens_dropped} tokens did not fit the model's context with the "
                "completion and were left out: the measurement conditions on the rest")


def _ids(value: Any) -> list[int] | None:
    return None if value is None else [int(x) for x in value]


@dataclass(frozen=True)
class ResultRow:
    """One row of topk/: a proponent (sign 'top') or an opponent ('bottom') of a query."""

    query_id: str
    sign: str
    rank: int
    doc_id: str
    score: float
    score_normalized: float
    shard: str
    tokens: int | None
    text: str | None
    found_by: str | None = None  # scan, or index / tfidf / index+tfidf: a candidate re-scored (None: older outputs)

    @property
    def of_its_side(self) -> bool:
        """Whether the score has its side's sign (+ for a proponent, - for an opponent). A candidate mode
        ranks only its re-scored candidates, so a side's top-k can hold rows of the other sign."""
        return self.score > 0 if self.sign == "top" else self.score < 0

    @property
    def found_note(self) -> str:
        """", found by <how>" for a re-scored candidate (index or tfidf mode), "" for a scanned row."""
        return f", found by {self.found_by}" if self.found_by not in (None, "scan") else ""


@dataclass(frozen=True)
class TokenScores:
    """Per-token contributions of one row: token strings (None without a tokenizer), ids and raw scores."""

    pieces: list[str | None]
    token_ids: list[int]
    scores: list[float]

    def shown(self) -> TokenScores:
        """The same row with every missing string replaced by the token's id, `` ⟨id⟩`` (no tokenizer)."""
        if all(p is not None for p in self.pieces):
            return self
        pieces = [p if p is not None else f" {id_piece(t)}" for p, t in zip(self.pieces, self.token_ids)]
        return TokenScores(pieces, self.token_ids, self.scores)


def of_their_side(rows: list[ResultRow], sign: str) -> tuple[list[ResultRow], str | None]:
    """(the rows whose score has the side's sign, a note on the others or None): what a view lists of a side."""
    kept = [r for r in rows if r.of_its_side]
    n = len(rows) - len(kept)
    if not n:
        return kept, None
    other, verb = ("negative", "raise") if sign == "top" else ("positive", "lower")
    return kept, (f"{n} more {'row' if n == 1 else 'rows'} of this side in topk/ {'has' if n == 1 else 'have'} a "
                  f"{other} score, not listed: fewer scored sequences than asked {verb} the completion's "
                  "log-probability (in index or tfidf mode: of the re-scored candidates)")


@dataclass(frozen=True)
class Tail:
    """The exactly known top of a query's score distribution (normalized scores, descending).

    Every scored sequence whose score is above ``threshold`` is in ``values``:
    a sequence missing from the shards' top-k lists is at most its shard's
    k-th score, and ``threshold`` is the largest such k-th score.
    """

    values: list[float]
    threshold: float
    ties: int = 0  # listed sequences whose score equals ``threshold`` (not in ``values``: more may tie unlisted)


@dataclass
class Run:
    """A run's output folder opened for reading."""

    out: Output
    con: Any
    queries: list[QueryInfo] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    layer_names: list[str] = field(default_factory=list)
    factor_tokens: int | None = None

    def rows(self, query_id: str, sign: str = "top", k: int | None = None) -> list[ResultRow]:
        cols = self.topk_columns  # one DESCRIBE per call
        sql = ("SELECT query_id, sign, rank, doc_id, score, score_normalized, shard, "
               + ("tokens, text" if {"text", "tokens"} <= cols else "NULL, NULL")
               + (", found_by" if "found_by" in cols else ", NULL")
               + " FROM topk WHERE query_id = ? AND sign = ? " + ("AND rank <= ? " if k else "") + "ORDER BY rank")
        params = [query_id, sign] + ([k] if k else [])
        return [ResultRow(*r) for r in self.con.execute(sql, params).fetchall()]

    def query_form(self, q: QueryInfo) -> str:
        """How exact the query's preconditioned gradient is, in words: its rank (as `build-queries` applied it,
        ``scoring.rank`` clipped to the layers' widths; else ``scoring.rank``; None: not recorded)."""
        built = ((self.record.get("stages") or {}).get("build-queries") or {}).get("rank")
        rank = built if built is not None else (self.config.get("scoring") or {}).get("rank")
        if rank == 0:
            return "dense queries (no low-rank truncation)"
        name = f"rank-{rank}" if rank else "low-rank"
        if q.truncation_error_max == 0:
            return f"{name} queries, exact on every layer (truncation error 0)"
        return f"{name} truncation error (relative, max over layers) {q.truncation_error_max:.3g}"

    @property
    def normalize(self) -> str:
        """The run's ``scoring.normalize`` (``none`` for outputs that do not record it)."""
        return str((self.config.get("scoring") or {}).get("normalize") or "none")

    @property
    def scale(self) -> float:
        """score / score_normalized, for token scores too: 1 for ``cosine``, else the tokens the factors were fitted on."""
        return 1.0 if self.normalize == "cosine" else float(self.factor_tokens or 1)

    @property
    def score_meaning(self) -> str:
        """What ``score_normalized`` is, in words."""
        if self.normalize == "cosine":
            return ("the cosine of the query's and the sequence's gradients in the preconditioner's metric "
                    "(scoring.normalize = \"cosine\"; in [-1, 1])")
        tokens = f"{self.factor_tokens:,}" if self.factor_tokens else "the number of"
        per = " / the norm of the sequence's gradient" if self.normalize == "train_norm" else ""
        return f"influence{per} / {tokens} tokens the factors were fitted on"

    @property
    def has_text(self) -> bool:
        return {"text", "tokens"} <= self.topk_columns

    @property
    def topk_columns(self) -> set[str]:
        """The columns of the topk view (older outputs lack some: text, tokens, found_by)."""
        return {c[0] for c in self.con.execute("DESCRIBE topk").fetchall()}

    def token_scores(self, query_id: str, doc_ids: list[str]) -> dict[str, TokenScores]:
        if "token_scores" not in self.out.tables or not doc_ids:
            return {}
        cols = {c[0] for c in self.con.execute("DESCRIBE token_scores").fetchall()}
        piece = "token" if "token" in cols else "NULL"
        got = self.con.execute(
            f"SELECT doc_id, list({piece} ORDER BY token_index), list(token_id ORDER BY token_index), "
            "list(score ORDER BY token_index) FROM token_scores WHERE query_id = ? AND list_contains(?, doc_id) "
            "GROUP BY doc_id", [query_id, doc_ids]).fetchall()
        return {d: TokenScores(list(p), list(i), list(s)) for d, p, i, s in got}

    def layer_totals(self, query_id: str) -> dict[str, list[tuple[str, float]]]:
        """Per sign: (layer, sum of normalized layer scores over that side's rows), in layer order."""
        if "layer_scores" not in self.out.tables:
            return {}
        got = self.con.execute(
            "SELECT t.sign, l.layer_index, l.layer, sum(l.score_normalized) FROM layer_scores l JOIN topk t "
            "ON l.query_id = t.query_id AND l.doc_id = t.doc_id WHERE l.query_id = ? "
            "GROUP BY ALL ORDER BY t.sign, l.layer_index", [query_id]).fetchall()
        out: dict[str, list[tuple[str, float]]] = {}
        for sign, _, layer, total in got:
            out.setdefault(sign, []).append((layer, total))
        return out

    def distribution(self, query_id: str) -> list[tuple[str, float, float, int, float]]:
        """(sign, bin_lower, bin_upper, sequences, score_sum) over every scored sequence (all shards added)."""
        if "distribution" not in self.out.tables:
            return []
        return self.con.execute(
            "SELECT sign, bin_lower, bin_upper, sum(sequences), sum(score_sum) FROM distribution "
            "WHERE query_id = ? GROUP BY ALL ORDER BY sign, bin_lower", [query_id]).fetchall()

    def tail(self, query_id: str) -> Tail:
        """The exactly known positive top of the distribution, from the shards' top-k lists (``scores``)."""
        k = int(self.config.get("scoring", {}).get("top_k") or 0)
        full = self.con.execute(
            "SELECT max(kth) FROM (SELECT shard, min(score_normalized) AS kth, count(*) AS n FROM scores "
            "WHERE query_id = ? AND sign = 'top' GROUP BY shard) WHERE n >= ?", [query_id, k]).fetchone()[0]
        threshold = -math.inf if full is None else float(full)
        best = [v for (v,) in self.con.execute(
            "SELECT max(score_normalized) AS v FROM scores WHERE query_id = ? AND sign = 'top' GROUP BY doc_id "
            "HAVING v >= ? ORDER BY v DESC", [query_id, threshold if math.isfinite(threshold) else -1e308]).fetchall()]
        values = [v for v in best if v > threshold]
        return Tail(values, threshold, len(best) - len(values))

    def index_health(self) -> dict[str, Any] | None:
        """The index health summary (``stages/index_health.summarize``) of an index-mode run, from its
        index_health table and the run's settings; None without the table."""
        if "index_health" not in self.out.tables:
            return None
        from ..stages.index_health import HEALTH, summarize

        cur = self.con.execute(f"SELECT {', '.join(HEALTH.names)} FROM index_health ORDER BY query_id, sign")
        table = pa.Table.from_pylist([dict(zip(HEALTH.names, r)) for r in cur.fetchall()], schema=HEALTH)
        return summarize(table, int(self.config.get("scoring", {}).get("candidates") or 0), self.config.get("index"))

    @property
    def sequences(self) -> int | None:
        counts = self.record.get("counts") or {}
        return counts.get("sequences")


def open_run(path: str) -> Run:
    """Open a run's output folder (or the output of a job file) for reading."""
    out = open_output(path)
    con = connect(out)
    run = Run(out, con)
    run.config = storage.read_json(storage.join(out.url, "resolved_config.json")) or {}
    run.record = latest_record(out.url)
    meta = storage.read_json(storage.join(out.url, "queries", "queries.json")) or {}
    run.layer_names = list(meta.get("layers", []))
    run.factor_tokens = meta.get("factor_tokens")
    if "queries" in out.tables:
        for r in con.execute("SELECT query_id, prompt, completion, measurement, truncation_error, "
                             "prompt_tokens_dropped, prompt_ids, completion_ids FROM queries").fetchall():
            run.queries.append(QueryInfo(r[0], r[1], r[2], float(r[3]), list(r[4] or []), int(r[5] or 0),
                                         _ids(r[6]), _ids(r[7])))
    else:
        for (qid,) in con.execute("SELECT DISTINCT query_id FROM topk ORDER BY 1").fetchall():
            run.queries.append(QueryInfo(qid, None, None, math.nan, [], 0))
    return run


def latest_record(url: str) -> dict[str, Any]:
    """The most recent ``runs/<run_id>.json`` (by its ``finished`` time), or {}."""
    records = [storage.read_json(f) for f in storage.list_files(storage.join(url, "runs"), ".json")]
    records = [r for r in records if r]
    return max(records, key=lambda r: r.get("finished", ""), default={})
