"""The report as one HTML string: every piece of corpus text escaped, no scripts, figures inline.

The page carries a Content-Security-Policy that allows no script, no
connection and no external resource (styles and images inline only), so even
a document crafted to break out of its escaping could run nothing.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from importlib import metadata
from typing import Any

from ...io.token_text import id_text
from ..load import ResultRow, Run, TokenScores, of_their_side
from . import figures
from .style import CSS
from .tail_fit import fit_power_law

SATURATE = 0.98  # token colours saturate at this quantile of |contribution| over the query's rows shown
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def anchor(query_id: str) -> str:
    return "q-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in query_id)


def token_color(value: float, scale: float) -> str:
    """Background of a token: green for a positive contribution, red for a negative one, alpha = |value| / scale."""
    a = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    rgb = "26,152,80" if value > 0 else "215,48,39"
    return f"rgba({rgb},{a:.3f})"


def heatmap(tokens: TokenScores, scale: float, normalizer: float) -> str:
    """The row's tokens as coloured spans (leading whitespace left uncoloured), each with its score / ``normalizer``
    (``Run.scale``) in a tooltip."""
    out = []
    for i, (piece, tid, s) in enumerate(zip(tokens.shown().pieces, tokens.token_ids, tokens.scores)):
        lead = piece[: len(piece) - len(piece.lstrip())]
        word = piece.lstrip() or piece
        v = s / normalizer
        out.append(f'{esc(lead)}<span class="tok" style="background:{token_color(v, scale)}" '
                   f'title="token {i} (id {tid}): {v:+.3e}">{esc(word)}</span>')
    return "".join(out)


def _fmt(x: float | None, spec: str = "+.3e") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def row_card(row: ResultRow, tokens: TokenScores | None, scale: float, normalizer: float) -> str:
    if tokens is not None and tokens.pieces:
        body = f'<div class="text heat">{heatmap(tokens, scale, normalizer)}</div>'
    else:
        body = f'<div class="text">{esc(row.text) if row.text is not None else "<em>(no text)</em>"}</div>'
    size = f" · {row.tokens} tokens" if row.tokens is not None else ""
    cls = "pro" if row.sign == "top" else "con"
    return (f'<div class="row {cls}"><div class="rowhead"><span class="rank">#{row.rank}</span>'
            f'<span class="score">{_fmt(row.score_normalized)}</span>'
            f'<span class="doc">{esc(row.doc_id)}</span>'
            f'<span class="meta">{esc(row.shard.rsplit("/", 1)[-1])}{size} · raw {_fmt(row.score, ".4g")}'
            f'{f" · found by {esc(row.found_by)}" if row.found_note else ""}</span>'
            f"</div>{body}</div>")


def legend(scale: float) -> str:
    ticks = "".join(f"<span>{label}</span>" for label in (f"≤ {-scale:.1e}", f"{-scale / 2:.1e}", "0",
                                                          f"{scale / 2:+.1e}", f"≥ {scale:+.1e}"))
    return ('<div class="legend"><div class="ramp"></div><div class="ticks">' + ticks + "</div>"
            "<p>Token colour: the token's contribution to the row's score (normalized; green raises the "
            "completion's log-probability, red lowers it). A token's contribution comes from its activations and "
            "the loss gradient at its position (mostly from predicting the token after it); a row's contributions "
            "add up to its score. "
            f"Colours saturate at the {SATURATE:.0%} quantile of |contribution| of this query's rows. "
            "Hover a token for its value.</p></div>")


def concentration(run: Run, query_id: str, positives: list[tuple[float, float, int, float]], total: int) -> str:
    """A sentence: the share of the total positive influence held by the top 1% of the scored sequences."""
    positive_sum = sum(s for _, _, _, s in positives)
    if not total or positive_sum <= 0:
        return ""
    n1 = max(1, math.ceil(0.01 * total))
    top = run.rows(query_id, "top")
    if n1 > len(top):
        return (f"The top 1% of sequences ({n1:,}) is more than the {len(top)} rows kept per side "
                "(scoring.top_k): their share of the positive influence is not known exactly.")
    share = sum(max(r.score, 0.0) for r in top[:n1]) / positive_sum
    return (f"The top 1% of the {total:,} scored sequences ({n1:,}) hold <b>{share:.1%}</b> of the total "
            "positive influence.")


def query_section(run: Run, index: int, k: int | None) -> str:
    q = run.queries[index]
    ft = run.scale  # raw score / score_normalized
    top, bottom = run.rows(q.query_id, "top", k), run.rows(q.query_id, "bottom", k)
    tokens = run.token_scores(q.query_id, [r.doc_id for r in top + bottom])
    values = sorted(abs(s) / ft for t in tokens.values() for s in t.scores)
    scale = values[min(len(values) - 1, int(SATURATE * len(values)))] if values else 0.0
    parts = [f'<section class="query" id="{anchor(q.query_id)}"><h2>Query <code>{esc(q.query_id)}</code></h2>']
    if q.prompt is not None:
        parts.append(f'<p class="qtext"><span class="prompt">{esc(q.prompt)}</span> '
                     f'<span class="completion">{esc(q.completion)}</span></p>')
    elif q.prompt_ids is not None:  # token-id queries and no tokenizer
        parts.append(f'<p class="qtext"><span class="prompt">{esc(id_text(q.prompt_ids))}</span> '
                     f'<span class="completion">{esc(id_text(q.completion_ids or []))}</span></p>')
    if q.cut_prompt_note:
        parts.append(f'<p class="note">Note: {esc(q.cut_prompt_note)}.</p>')
    if not math.isnan(q.measurement):
        parts.append(f'<p class="measure">Measurement f = log p(completion | prompt) = <b>{q.measurement:.4f}</b> '
                     f"nats (p = {math.exp(q.measurement):.3g}); {esc(run.query_form(q))}.</p>")
    # figures
    layers = run.layer_totals(q.query_id)
    names = [n for n, _ in layers.get("top", [])]
    figs = []
    if names:
        figs.append('<figure><figcaption>Influence by layer: the rows shown, summed per tracked layer'
                    "</figcaption>" + figures.layer_bars(names, [v for _, v in layers.get("top", [])],
                                                         [v for _, v in layers.get("bottom", [])]) + "</figure>")
    dist = run.distribution(q.query_id)
    total = sum(n for _, _, _, n, _ in dist)
    positives = [(lo, hi, n, s) for sign, lo, hi, n, s in dist if sign == "positive"]
    tail = run.tail(q.query_id) if "scores" in run.out.tables else None
    fit = fit_power_law(tail.values if tail else [])
    if dist or tail:
        figs.append('<figure><figcaption>Distribution of influence over every scored sequence</figcaption>'
                    + figures.distribution_plot([(lo, hi, n) for lo, hi, n, _ in positives], total,
                                                tail.values if tail else [], fit) + "</figure>")
    if q.truncation_error_max > 0 and run.layer_names and len(q.truncation_error) == len(run.layer_names):
        figs.append('<figure><figcaption>Low-rank truncation error of the query, per layer</figcaption>'
                    + figures.truncation_bars(run.layer_names, q.truncation_error) + "</figure>")
    parts.append('<div class="figs">' + "".join(figs) + "</div>")
    notes = []
    if fit.ok:
        notes.append(f"Tail: the {fit.n} largest scores (known exactly) follow a power law p(x) ∝ x<sup>−α</sup> "
                     f"with α = {fit.alpha:.2f} ± {fit.stderr:.2f} above x<sub>min</sub> = {fit.x_min:.3e} "
                     f"(maximum likelihood; Kolmogorov-Smirnov distance {fit.ks:.2f}).")
    elif tail is None and not dist:  # index / tfidf mode: only the candidates were scored
        mode = (run.config.get("scoring") or {}).get("mode", "index")
        notes.append(f"No distribution and no power-law fit: in {esc(mode)} mode only each query's candidates are "
                     "scored exactly, not every sequence (<code>scoring.mode = \"scan\"</code> scores them all).")
    else:
        notes.append(f"No power-law fit: {esc(fit.reason)}.")
        if tail is not None and tail.ties > 1 and tail.threshold > 0:  # more than the shard's own k-th row
            notes.append(f"{tail.ties:,} listed sequences share the score {tail.threshold:.3e}, the lowest a full "
                         "shard kept (identical sequences score alike): how many unlisted ones share it too is not "
                         "known, so none of them counts as known exactly.")
    notes.append(concentration(run, q.query_id, positives, total))
    parts.append('<p class="note">' + " ".join(n for n in notes if n) + "</p>")
    parts.append(legend(scale))
    for sign, rows, title in (("top", top, "Proponents: training on these makes the completion more likely"),
                              ("bottom", bottom, "Opponents: training on these makes the completion less likely")):
        kept, note = of_their_side(rows, sign)
        cards = "".join(row_card(r, tokens.get(r.doc_id), scale, ft) for r in kept)
        if note:
            cards += f'<p class="note">{esc(note.capitalize())}.</p>'
        parts.append(f'<details class="side {sign}" open><summary>{title} ({len(kept)})</summary>{cards}'
                     "</details>")
    parts.append("</section>")
    return "".join(parts)


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs) + "</table>"


def run_summary(run: Run) -> str:
    cfg, rec = run.config, run.record
    data, scoring, factors = cfg.get("data", {}), cfg.get("scoring", {}), cfg.get("factors", {})
    model = cfg.get("model", {})
    settings = [("model", model.get("path") or model.get("factory")), ("dtype", model.get("dtype")),
                ("corpus", data.get("corpus")), ("queries", data.get("queries")), ("output", run.out.url),
                ("Fisher", factors.get("fisher")), ("fitting sample", factors.get("sample_sequences")
                                                    or factors.get("sample_tokens") or "whole corpus"),
                ("damping", factors.get("damping") if factors.get("damping") is not None
                 else "0.1 × mean(Lambda) per layer"),
                ("query rank", scoring.get("rank") or "dense"), ("top_k", scoring.get("top_k")),
                ("strategy", scoring.get("strategy")), ("tracked layers", ", ".join(run.layer_names))]
    stages = rec.get("stages", {})
    fit = stages.get("fit-factors", {})
    score = stages.get("score", {})
    counts = [("run", rec.get("run_id")), ("status", rec.get("status")), ("finished", rec.get("finished")),
              ("factor tokens (normalizer)", f"{run.factor_tokens:,}" if run.factor_tokens else None),
              ("fitting sequences", fit.get("sequences")), ("shards", score.get("shards")),
              ("shards failed", score.get("failed")), ("sequences scored in this run", score.get("sequences")),
              ("tokens scored in this run", score.get("tokens")), ("queries", len(run.queries))]
    timings = [(name, f"{info.get('seconds', 0):.1f} s" + (" (already complete, skipped)" if info.get("skipped")
                                                           is True else ""))
               for name, info in stages.items() if isinstance(info, dict)]
    timings.append(("whole run", f"{rec.get('seconds', 0):.1f} s"))
    versions = dict(rec.get("versions", {}))
    for pkg in ("duckdb", "matplotlib"):
        try:
            versions[f"{pkg} (report)"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return ('<section class="summary"><h2>Run</h2><div class="cols">'
            f"<div><h3>Settings</h3>{_kv(settings)}</div><div><h3>Counts</h3>{_kv(counts)}</div>"
            f"<div><h3>Timings</h3>{_kv(timings)}<h3>Versions</h3>{_kv(sorted(versions.items()))}</div>"
            "</div></section>")


def _code_keys(text: str) -> str:
    """The job keys of an escaped sentence set as code."""
    for key in ("index.k_out", "index.k_in", "scoring.candidates", "scoring.tfidf_candidates",
                "scoring.mode = &quot;scan&quot;"):
        text = text.replace(key, f"<code>{key}</code>")
    return text


def health_paragraph(run: Run) -> str:
    """A short paragraph for an index-mode run: how closely the index ranked the candidates ('' otherwise)."""
    from ...stages.index_health import advice, describe

    health = run.index_health()
    if health is None:
        return ""
    head = (f"<b>Index health</b> (<code>scoring.mode = \"index\"</code>, k = {esc(health.get('k_out'))} × "
            f"{esc(health.get('k_in'))}, {esc(health.get('projection'))}, {esc(health['candidates'])} candidates "
            f"a side, re-scored exactly): {esc(describe(health))}.")
    if health["loose"]:
        tail = (" <b>The index ranks this model's candidates loosely</b>: the final top-10 rows come from deep in "
                "the candidate lists, so sequences past the cut may be missing and the results may differ from a "
                f"full scan's. To do: {_code_keys(esc(advice(health)))}.")
        return f'<p class="health loose">{head}{tail}</p>'
    return (f'<p class="health">{head} The final rows come from the head of the candidate lists: the index ranks '
            "this model's candidates closely enough for the re-scoring to recover the top rows.</p>")


TOC_PROMPT = 160  # characters of a prompt in the list of queries (its end: what leads to the completion)


def toc_prompt(prompt: str | None) -> str:
    """The prompt as the list of queries shows it: whole, or its last ``TOC_PROMPT`` characters after '…'."""
    text = prompt or ""
    return text if len(text) <= TOC_PROMPT else "…" + text[-(TOC_PROMPT - 1):]


def render_report(run: Run, k: int | None = None) -> str:
    """The whole page."""
    toc = "".join(f'<li><a href="#{anchor(q.query_id)}"><code>{esc(q.query_id)}</code></a> '
                  f'{esc(toc_prompt(q.prompt))} <b>{esc(q.completion or "")}</b></li>' for q in run.queries)
    sections = "".join(query_section(run, i, k) for i in range(len(run.queries)))
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Influence report: {esc(run.record.get('run_id', run.out.url))}</title>
<style>{CSS}</style></head>
<body><header><h1>Which training sequences made the model say this?</h1>
<p>EK-FAC influence (Grosse et al. 2023) of run <code>{esc(run.record.get('run_id', '?'))}</code>,
<code>{esc(run.out.url)}</code>; report made {now}.
Scores are <b>normalized</b>: {esc(run.score_meaning)}.
<b>Positive</b>: training on the sequence makes the completion more likely; <b>negative</b>: less likely.</p>
{health_paragraph(run)}
<nav><h2>Queries</h2><ul>{toc}</ul></nav></header>
<main>{sections}{run_summary(run)}</main></body></html>
"""
