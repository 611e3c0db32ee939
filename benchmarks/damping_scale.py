"""What does a smaller relative damping do to the exact, lds and stability suites? (issue 8)

Usage:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/damping_scale.py [--parts exact,lds,stability] \
        [--seeds 0,1,2] [--out benchmarks/eval]

The default damping is 0.1 x mean(Lambda) per layer (``factors.damping`` unset). The facts study
(``facts_mrr.md``) found 0.001 x mean(Lambda) lifts corpus-phrasing MRR; this measures the scales
c = 1, 0.1 (today), 0.01, 0.001 on the other accuracy suites, reusing their modules (nothing here changes a
default):

- ``exact`` (``pipelines/eval/exact.py``): the MLP classifier and 2-block GPT-2 of the suite, exact influence
  with damping c x trace(F_ll)/P_l (= c x mean of the exact eigenvalue correction) and EK-FAC (default topm
  k=3, mean over 3 fit seeds; expected Fisher) with the SAME damping; Pearson / Spearman per query against
  exact, mean (min) over queries. The layer-block-diagonal exact GGN at the same damping is the bound; the
  exact scores at 0.1 against those at c say how much the reference itself changes with the damping.
- ``lds`` (``pipelines/eval/lds.py``): digits MLP and tiny GPT-2, the suite's subsets and retrainings (done
  once; they do not depend on damping), EK-FAC default topm k=3 (seed 0) scored at c x mean(Lambda) of the
  fit, LDS mean with 95% bootstrap interval over queries and the paired difference to c = 0.1.
- ``stability`` (``pipelines/eval/stability.py``): the demo planted-fact corpus and GPT-2, topm k=3 (and the
  other Fisher variants named in ``--stability-variants``) fitted with each seed, every query scored against every document with dense queries at c x mean(Lambda) per
  layer; Spearman and top-10 overlap between every pair of seeds (mean and min over pairs and queries).

Each part is written to ``damping_scale.md`` / ``.parquet`` as soon as it finishes (earlier parts kept).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import influence_ops as ops  # noqa: E402
from influence_ops.queries import query_gradients  # noqa: E402
from pipelines.eval import exact, lds, stability  # noqa: E402
from pipelines.eval.datamodels import bootstrap_interval, random_subsets  # noqa: E402
from pipelines.eval.ggn import exact_ggn  # noqa: E402
from pipelines.eval.lds_cases import digits_case, lm_case  # noqa: E402
from pipelines.eval.metrics import per_query_correlations, spearman, top_overlap  # noqa: E402
from pipelines.eval.report import Progress, environment, markdown_table  # noqa: E402

SCALES = (1.0, 0.1, 0.01, 0.001)  # damping = c x mean(Lambda) per layer; 0.1 is today's default
DEFAULT_SCALE = 0.1
TOP = stability.TOP
TOPM = stability.Variant("topm k=3", ops.Fisher.TOPM, 3)
PARTS = ("exact", "lds", "stability")


def relative(factors: ops.EKFACFactors, c: float) -> dict[str, float]:
    """name -> c x mean(Lambda) of the fitted layer."""
    return {n: c * float(lf.eigenvalues.mean()) for n, lf in factors.layers.items()}


def part_exact(seeds: tuple[int, ...], echo: Any, quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    for make in (exact.classifier_setup, exact.lm_setup):
        t0 = time.perf_counter()
        s = make(quick)
        ggn = exact_ggn(s.examples, s.layers) / len(s.examples)
        base = exact.layer_damping(ggn, s.layers)  # 0.1 x trace(F_ll) / P_l
        echo(f"exact: {s.name}: GGN {ggn.shape[0]}^2 ({time.perf_counter() - t0:.0f} s)")
        fisher, k, k_lambda = exact.DEFAULT_FIT
        fits = {exact.DEFAULT: [ops.fit_ekfac(s.model, s.layers, s.fit_batches, fisher=fisher, seed=seed,
                                              objective=s.objective, samples=k, lambda_samples=k_lambda)
                                for seed in seeds],
                "EK-FAC expected": [ops.fit_ekfac(s.model, s.layers, s.fit_batches, fisher=ops.Fisher.EXPECTED,
                                                  seed=0, objective=s.objective)]}
        blocks = exact.block_diagonal(ggn, s.layers)
        today = exact.exact_scores(s, ggn, base)
        for c in SCALES:
            damping = {n: v * c / DEFAULT_SCALE for n, v in base.items()}
            ref = exact.exact_scores(s, ggn, damping)
            methods = {label: [exact.factor_scores(s, f, damping) for f in fs] for label, fs in fits.items()}
            methods["exact GGN, layer-block-diagonal (bound)"] = [exact.exact_scores(s, blocks, damping)]
            methods["exact at 0.1 x (today's damping): how much the reference itself moves"] = [today]
            for label, scores in methods.items():
                stats = [per_query_correlations(sc, ref) for sc in scores]
                rows.append({"suite": "exact", "model": s.name, "scale": c, "method": label, "seeds": len(scores),
                             **{k: sum(st[k] for st in stats) / len(stats) for k in stats[0]}})
            echo(f"exact: {s.name}: scale {c}: " + ", ".join(f"{r['method']} spearman {r['spearman']:.3f}"
                                                              for r in rows[-len(methods):]))
    return rows


def part_lds(echo: Any, quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    _, fisher, k, k_lambda = lds.FITS[0]  # the job's default
    for setup, make in (("digits", digits_case), ("lm", lm_case)):
        t0 = time.perf_counter()
        case = make(quick)
        m, reps = lds.SIZES[setup][1 if quick else 0]
        masks = random_subsets(case.train_grads.shape[0], m, 0.5, seed=0)
        losses = lds.retrained_losses(case, masks, reps, echo)
        echo(f"lds: {case.name}: retrained on {m} halves x {reps} seed(s) ({time.perf_counter() - t0:.0f} s)")
        f = ops.fit_ekfac(case.model, case.layers, case.fit_batches, fisher=fisher, seed=0, objective=case.objective,
                          samples=k, lambda_samples=k_lambda)
        per_query = {c: lds.lds(exact.factor_scores(case, f, relative(f, c)), masks, losses) for c in SCALES}
        for c in SCALES:
            lo, hi = bootstrap_interval(per_query[c])
            diff = per_query[c] - per_query[DEFAULT_SCALE]
            dlo, dhi = bootstrap_interval(diff)
            rows.append({"suite": "lds", "model": case.name, "scale": c, "method": lds.DEFAULT, "subsets": m,
                         "seeds": reps, "lds": float(per_query[c].mean()), "ci95_low": lo, "ci95_high": hi,
                         "vs_0.1": float(diff.mean()), "vs_0.1_ci95_low": dlo, "vs_0.1_ci95_high": dhi})
            echo(f"lds: {case.name}: scale {c}: {rows[-1]['lds']:.3f} [{lo:.3f}, {hi:.3f}]")
    return rows


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def part_stability(seeds: tuple[int, ...], echo: Any, quick: bool = False,
                   variants: tuple[str, ...] = (TOPM.label,)) -> list[dict[str, Any]]:
    case = stability.build_case(quick, echo)
    obj = ops.LanguageModelObjective()
    qg, _ = query_gradients(case.model, case.layers, case.queries, obj)  # name -> [Q, d_out, d_in']
    train: dict[str, list[torch.Tensor]] = {n: [] for n in qg}
    for b in case.batches:  # per-document training gradients, as score_batch (the data's labels)
        out = ops.backward_pass(case.model, case.layers, obj, b, ops.Fisher.EMPIRICAL)
        for n, g in ops.per_sequence_gradients(out.captured).items():
            train[n].append(flat(g.detach()))
    G = {n: torch.cat(x) for n, x in train.items()}  # name -> [N, d_out * d_in']
    by_label = {v.label: v for v in stability.VARIANTS}
    progress = Progress(len(seeds) * len(variants), echo)
    rows = []
    pairs = list(itertools.combinations(range(len(seeds)), 2))
    for label in variants:
        v = by_label[label]
        scores: dict[float, list[torch.Tensor]] = {c: [] for c in SCALES}
        for seed in seeds:
            t0 = time.perf_counter()
            f = v.fit(case, seed)
            for c in SCALES:
                d = relative(f, c)
                scores[c].append(sum(flat(ops.apply_inverse(f.layers[n], q.double(), d[n])) @ G[n].T
                                     for n, q in qg.items()))  # [Q, N]
            if seed == seeds[0] and label == variants[0]:  # the hand-made scores at 0.1 are the suite's
                ref = stability.all_scores(case, f)
                gap = float((scores[DEFAULT_SCALE][-1] - ref).abs().max() / ref.abs().max())
                echo(f"stability: scores at 0.1 vs the suite's all_scores: max relative difference {gap:.1e}")
                if gap > 1e-4:  # score_batch accumulates in float32 in places
                    raise RuntimeError(f"hand-made scores differ from stability.all_scores by {gap:.1e}")
            progress.step(f"stability: {label} seed {seed}", t0)
        for c in SCALES:
            s = scores[c]
            rho = torch.stack([spearman(s[i], s[j]) for i, j in pairs])  # (pairs, Q)
            top = torch.stack([top_overlap(s[i], s[j], TOP) for i, j in pairs])
            rows.append({"suite": "stability", "model": case.description, "scale": c, "method": f"EK-FAC {label}",
                         "seeds": len(seeds), "spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
                         f"top{TOP}_overlap_mean": float(top.mean()), f"top{TOP}_overlap_min": float(top.min())})
            echo(f"stability: {label}: scale {c}: spearman {rows[-1]['spearman_mean']:.3f}, top-{TOP} "
                 f"{rows[-1][f'top{TOP}_overlap_mean']:.3f}")
    return rows


COLUMNS = {"exact": ("model", "scale", "method", "seeds", "pearson", "spearman", "pearson_min", "spearman_min"),
           "lds": ("model", "scale", "method", "subsets", "seeds", "lds", "ci95_low", "ci95_high", "vs_0.1",
                   "vs_0.1_ci95_low", "vs_0.1_ci95_high"),
           "stability": ("model", "scale", "method", "seeds", "spearman_mean", "spearman_min",
                         f"top{TOP}_overlap_mean", f"top{TOP}_overlap_min")}
RUN = ("date_utc", "machine", "load_average_1_5_15", "torch", "seconds", "command")


def render(rows: list[dict[str, Any]]) -> str:
    text = ["# Damping scale on the exact, lds and stability suites (issue 8)", "",
            __doc__.split("\n\n", 2)[2].split("Each part is written")[0].strip(), ""]
    for part in PARTS:
        sub = [r for r in rows if r["suite"] == part]
        text += [f"## {part}", "", markdown_table(sub, COLUMNS[part]) if sub else "(not run)", ""]
    runs = [next(r for r in rows if r["suite"] == p) for p in PARTS if any(r["suite"] == p for r in rows)]
    text += ["## Runs", "", markdown_table(runs, ("suite",) + RUN), ""]
    return "\n".join(text)


def save(out: Path, rows: list[dict[str, Any]], command: str, started: float) -> None:
    """Merge ``rows`` with the parts already in ``<out>/damping_scale.parquet`` and rewrite both files."""
    env = environment()
    run = {"date_utc": env["date_utc"], "machine": env["machine"], "load_average_1_5_15": env["load_average_1_5_15"],
           "torch": env["torch"], "seconds": round(time.perf_counter() - started), "command": command}
    rows = [{**r, **run} for r in rows]
    parquet = out / "damping_scale.parquet"
    done = {r["suite"] for r in rows}
    old = [r for r in pq.read_table(parquet).to_pylist() if r["suite"] not in done] if parquet.exists() else []
    merged = sorted(old + rows, key=lambda r: PARTS.index(r["suite"]))
    keys = list(dict.fromkeys(k for r in merged for k in r))  # from_pylist takes the first row's keys only
    merged = [{k: r.get(k) for k in keys} for r in merged]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(merged), parquet)
    (out / "damping_scale.md").write_text(render([{k: v for k, v in r.items() if v is not None} for r in merged]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--seeds", default="0,1,2", help="fit seeds (exact: topm; stability: the pairs)")
    ap.add_argument("--stability-variants", default=TOPM.label,
                    help="comma-separated labels of stability.VARIANTS (default: the default topm k=3)")
    ap.add_argument("--quick", action="store_true", help="the suites' --quick sizes (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "eval"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    command = "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/damping_scale.py " + " ".join(sys.argv[1:])
    echo = (lambda s: print(s, flush=True))
    for part in args.parts.split(","):
        started = time.perf_counter()
        rows = {"exact": lambda: part_exact(seeds, echo, args.quick), "lds": lambda: part_lds(echo, args.quick),
                "stability": lambda: part_stability(seeds, echo, args.quick,
                                                     tuple(args.stability_variants.split(",")))}[part]()
        save(Path(args.out), rows, f"{command} (part {part})", started)
        echo(f"{part}: written ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
