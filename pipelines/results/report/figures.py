"""The report's figures, drawn with matplotlib as inline SVG (no scripts, no fonts or files to fetch).

matplotlib because it writes a self-contained static SVG: the page stays one
offline file that runs no JavaScript at all (its Content-Security-Policy
forbids scripts), and figures are deterministic (fixed hash salt, no dates).
"""

from __future__ import annotations

import io
import math
import re

from .tail_fit import PowerLawFit

GREEN, RED, GREY, BLUE = "#1a9850", "#d73027", "#9e9e9e", "#3b5b92"


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: the SVG is inline HTML
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF boilerplate
    text = re.sub(r' xmlns:xlink="[^"]*"', "", text)
    return re.sub(r'(<svg[^>]*?) width="[^"]*" height="[^"]*"', r'\1 class="fig"', text, count=1)


def _setup():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.hashsalt": "influence-report", "svg.fonttype": "none", "font.size": 9,
                                "axes.spines.top": False, "axes.spines.right": False})
    import matplotlib.pyplot as plt

    return plt


def layer_bars(layers: list[str], top: list[float], bottom: list[float]) -> str:
    """Horizontal bars: per layer, the summed normalized scores of the proponents (green) and opponents (red).

    Values are drawn in units of 10^p (p from the largest |value|, named in the axis label), so the tick
    labels stay short and do not run into each other.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _setup()
    largest = max((abs(v) for v in [*top, *bottom] if math.isfinite(v)), default=0.0)
    p = math.floor(math.log10(largest)) if largest > 0 and not 1e-2 <= largest < 1e3 else 0
    unit = 10.0 ** p
    fig, ax = plt.subplots(figsize=(4.6, 0.36 * len(layers) + 0.8))
    ys = list(range(len(layers)))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], [v / unit for v in top], height=h, color=GREEN, label="proponents (sum)")
    if bottom:
        ax.barh([y + h / 2 for y in ys], [v / unit for v in bottom], height=h, color=RED, label="opponents (sum)")
    ax.set_yticks(ys, layers)
    ax.invert_yaxis()
    ax.axvline(0, color="#444", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.set_xlabel("summed normalized influence of the rows shown" + (f" (x 1e{p})" if p else ""))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 1.1 / (len(layers) + 2)), ncol=2, frameon=False,
              fontsize=8)
    return _svg(fig)


def distribution_plot(bins: list[tuple[float, float, int]], total: int, tail: list[float], fit: PowerLawFit) -> str:
    """Log-log survival function P(score > x) of the positive normalized scores.

    ``bins``: (lower, upper, count) of the positive scores over every scored
    sequence (histogram: a step at each bin's upper edge); ``total``: every
    scored sequence (positive or not); ``tail``: the exactly known top scores
    (descending), drawn as points; the fitted power law as a dashed line.
    """
    plt = _setup()
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    if bins and total:
        xs, ys = [], []
        above = sum(c for _, _, c in bins)
        for lower, upper, count in sorted(bins):
            xs += [lower, upper]
            ys += [above / total, (above - count) / total]
            above -= count
        pairs = [(x, y) for x, y in zip(xs, ys) if y > 0]
        ax.step([p[0] for p in pairs], [p[1] for p in pairs], where="post", color=GREY, linewidth=1.2,
                label=f"every scored sequence (histogram, n = {total:,})")
    if tail and total:
        ranks = [(i + 1) / total for i in range(len(tail))]
        ax.plot(tail, ranks, "o", color=BLUE, markersize=3.2, label=f"exact top scores ({len(tail)})")
    if fit.ok and total:
        hi = max(tail)
        grid = [fit.x_min * (hi / fit.x_min) ** (i / 40) for i in range(41)]
        scale = fit.n / total
        ax.plot(grid, [scale * (x / fit.x_min) ** (1 - fit.alpha) for x in grid], "--", color=RED, linewidth=1.2,
                label=f"power law, alpha = {fit.alpha:.2f} ± {fit.stderr:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("normalized influence x (positive scores)")
    ax.set_ylabel("share of sequences with score > x")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=7.5, loc="lower left")
    if not bins and not tail:
        ax.text(0.5, 0.5, "no positive scores", transform=ax.transAxes, ha="center", color=GREY)
    return _svg(fig)


def truncation_bars(layers: list[str], errors: list[float]) -> str:
    """Relative error of the rank-r query per layer (0 = exact)."""
    plt = _setup()
    fig, ax = plt.subplots(figsize=(4.6, 0.3 * len(layers) + 0.7))
    ax.barh(range(len(layers)), errors, color=GREY)
    ax.set_yticks(range(len(layers)), layers)
    ax.invert_yaxis()
    ax.set_xlabel("relative Frobenius error of the low-rank query")
    ax.set_xlim(0, max(max(errors, default=0.0) * 1.15, 1e-3) if not math.isnan(max(errors, default=0.0)) else 1)
    return _svg(fig)
