"""``influence show``: a terminal view of a run's results.

Per query: the prompt and completion, the measurement, and its top proponents
(``--bottom``: also its opponents) with rank, normalized score, document id
and an excerpt of the text around its most influential tokens, which are
highlighted (bold green for proponents, red for opponents; ``[[...]]``
without colours).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import click

from ..io.token_text import id_text
from .load import ResultRow, Run, TokenScores, of_their_side, open_run

EXCERPT_CHARS = 240
HIGHLIGHT = 3  # tokens highlighted per row


def _fmt_score(x: float) -> str:
    return f"{x:+.3e}"


def excerpt(row: ResultRow, tokens: TokenScores | None, width: int = EXCERPT_CHARS,
            highlight: int = HIGHLIGHT) -> list[tuple[str, bool]]:
    """The row's text as (piece, highlighted) segments, about ``width`` characters around its strongest tokens.

    Strongest: the largest contributions of the row's own sign (positive for a
    proponent, negative for an opponent). Without token strings (no tokenizer), the
    token ids as ``⟨id⟩``. Without token scores, the start of the text, or ``(no text)``.
    """
    if tokens is None or not tokens.pieces:
        text = " ".join((row.text or "").split()) or "(no text)"
        return [(text if len(text) <= width else text[:width - 1] + "…", False)]
    tokens = tokens.shown()
    sign = 1.0 if row.sign == "top" else -1.0
    order = sorted(range(len(tokens.scores)), key=lambda i: -sign * tokens.scores[i])
    strong = {i for i in order[:highlight] if sign * tokens.scores[i] > 0}
    pieces = [" ".join(p.split()) if p.strip() else " " for p in tokens.pieces]
    pieces = [(" " if tokens.pieces[i][:1].isspace() and p != " " else "") + p for i, p in enumerate(pieces)]
    centre = min(strong) if strong else 0
    lo = hi = centre
    length = len(pieces[centre])
    while length < width and (lo > 0 or hi < len(pieces) - 1):
        if hi < len(pieces) - 1:
            hi += 1
            length += len(pieces[hi])
        if lo > 0 and length < width:
            lo -= 1
            length += len(pieces[lo])
    out = [("… " if lo > 0 else "", False)] if lo > 0 else []
    for i in range(lo, hi + 1):
        out.append((pieces[i], i in strong))
    if hi < len(pieces) - 1:
        out.append((" …", False))
    if out:  # no space before the excerpt's first piece, highlighted or not
        out[0] = (out[0][0].lstrip(), out[0][1])
    return out


def render_excerpt(segments: list[tuple[str, bool]], sign: str, color: bool) -> str:
    """Segments as text: highlighted pieces in bold colour (rich markup) or inside [[ ]]."""
    from rich.markup import escape

    style = "bold black on green" if sign == "top" else "bold white on red"
    out = []
    for piece, strong in segments:
        if not strong:
            out.append(escape(piece) if color else piece)
        elif color:
            lead = piece[: len(piece) - len(piece.lstrip())]
            out.append(f"{lead}[{style}]{escape(piece.lstrip())}[/]")
        else:
            lead = piece[: len(piece) - len(piece.lstrip())]
            out.append(f"{lead}[[{piece.lstrip()}]]")
    return "".join(out)


def query_lines(run: Run, query_index: int, k: int, bottom: bool, color: bool) -> list[str]:
    q = run.queries[query_index]
    lines = [f"[bold]query {q.query_id}[/]" if color else f"query {q.query_id}"]
    if q.prompt is not None:
        prompt = f"  prompt:     {q.prompt!r}\n  completion: {q.completion!r}"
        lines.append(_escape(prompt, color))
    elif q.prompt_ids is not None:
        ids = f"  prompt ids:     {id_text(q.prompt_ids)}\n  completion ids: {id_text(q.completion_ids or [])}"
        lines.append(_escape(ids, color))
    if q.cut_prompt_note:
        lines.append(f"  note: {q.cut_prompt_note}")
    if not math.isnan(q.measurement):
        lines.append(f"  measurement: log p(completion | prompt) = {q.measurement:.4f} nats "
                     f"(p = {math.exp(q.measurement):.3g}); {run.query_form(q)}")
    sides = [("top", "proponents (training on them makes the completion more likely)")]
    if bottom:
        sides.append(("bottom", "opponents (training on them makes the completion less likely)"))
    for sign, title in sides:
        rows, note = of_their_side(run.rows(q.query_id, sign, k), sign)
        tokens = run.token_scores(q.query_id, [r.doc_id for r in rows])
        lines.append(f"  top {len(rows)} {title}:" if sign == "top" else f"  bottom {len(rows)} {title}:")
        for r in rows:
            size = f", {r.tokens} tokens" if r.tokens is not None else ""
            where = f"{_short(r.shard)}{size}{r.found_note}"
            head = f"    #{r.rank:<3} {_fmt_score(r.score_normalized)}  {r.doc_id}  ({where})"
            lines.append(_escape(head, color))
            body = render_excerpt(excerpt(r, tokens.get(r.doc_id)), sign, color)
            lines.append("         " + body)
        if note:
            lines.append(f"    ({note})")
    return lines


def _short(shard: str) -> str:
    return shard.rsplit("/", 1)[-1]


def _escape(text: str, color: bool) -> str:
    if not color:
        return text
    from rich.markup import escape

    return escape(text)


def legend(run: Run, color: bool) -> list[str]:
    mark = "highlighted" if color else "in [[ ]]"
    return [f"scores: normalized = {run.score_meaning}; + = training on the sequence raises log p(completion | prompt), "
            f"- = lowers it.",
            f"tokens {mark}: the {HIGHLIGHT} largest per-token contributions of the row's sign (a token's "
            "activations times the loss gradient at its position, mostly from predicting the token after it)."]


def health_line(run: Run, color: bool) -> list[str]:
    """One line for an index-mode run: how closely the index ranked the candidates (``stages/index_health.py``)."""
    from ..stages.index_health import LOOSE, advice, describe

    health = run.index_health()
    if health is None:
        return []
    line = (f"index health (k = {health.get('k_out')} x {health.get('k_in')}, {health.get('projection')}, "
            f"{health['candidates']} candidates a side): {describe(health)}")
    if health["loose"]:
        line += f"; LOOSE: {LOOSE}; {advice(health)}"
    return [_escape(line, color) if not (color and health["loose"]) else f"[bold red]{_escape(line, color)}[/]"]


def show_lines(run: Run, query: str | None = None, k: int = 5, bottom: bool = False, color: bool = False,
               limit: int | None = None) -> list[str]:
    """The whole view as lines (rich markup when ``color``)."""
    ids = [q.query_id for q in run.queries]
    if query is not None:
        if query not in ids:
            raise click.ClickException(f"{run.out.url}: no query {query!r} (queries: {', '.join(ids)})")
        chosen = [ids.index(query)]
    else:
        chosen = list(range(len(ids)))[:limit]
    lines = legend(run, color) + health_line(run, color)
    for i in chosen:
        lines.append("")
        lines += query_lines(run, i, k, bottom, color)
    if limit is not None and len(ids) > len(chosen):
        lines.append(f"\n({len(ids) - len(chosen)} more queries: influence show {run.out.url})")
    return lines


def print_lines(lines: list[str], color: bool, file: Any = None) -> None:
    from rich.console import Console

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True, no_color=not color,
                      force_terminal=color or None, markup=color, emoji=False)
    for line in lines:
        console.print(line)


@click.command(name="show")
@click.argument("output")
@click.option("--query", "query", default=None, help="Only this query id.")
@click.option("--k", "k", default=5, show_default=True, help="Rows per side.")
@click.option("--bottom", is_flag=True, help="Also the opponents (the most negative scores).")
@click.option("--color/--no-color", default=None, help="Colours (default: when printing to a terminal).")
def show_command(output: str, query: str | None, k: int, bottom: bool, color: bool | None) -> None:
    """Each query's most influential training sequences, in the terminal.
    OUTPUT is the job's output folder (local or s3://) or its job file."""
    try:
        run = open_run(output)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    color = sys.stdout.isatty() if color is None else color
    print_lines(show_lines(run, query, k, bottom, color), color)


def next_steps(output: str, prefix: str = "influence") -> list[str]:
    """Where to look next (the closing lines of `influence run` and `influence demo`)."""
    return ["next steps:",
            f"  {prefix} show {output} --bottom      # every query: proponents, opponents, highlighted tokens",
            (f"  {prefix} sql {output} \"SELECT query_id, rank, score, doc_id, text FROM topk"
             f" WHERE sign = 'top' AND rank <= 3 ORDER BY query_id, rank\"   # proponents; 'bottom': opponents"),
            f"  {prefix} sql {output}                # interactive SQL: topk, token_scores, layer_scores, ...",
            f"  {prefix} report {output}             # one static HTML page: {output}/report.html"]


def closing_view(output: str, queries: int = 3, k: int = 3) -> list[str]:
    """The view of the first few queries (plain text) and the next steps; [] when there are no results yet."""
    try:
        run = open_run(output)
    except (ValueError, FileNotFoundError):
        return []
    return show_lines(run, k=k, limit=queries) + [""] + next_steps(output)
