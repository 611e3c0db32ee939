"""Scoring throughput of ``influence_ops.score_batch`` relative to a plain training step.

docs/design.md section 2 ("Floor"): scoring a token cannot cost much less than one training
step on it, so the headline number is

    ratio = (tokens/s of score_batch) / (tokens/s of a training step)
          = t_train / t_score            (same model, batch, device, dtype)

where the training step is forward + backward with weight gradients
(``loss.backward()``, summed token NLL), no optimizer. Target: ratio >= 0.8 at Q = 32.

Model: GPT-2-small shapes (n_embd 768, 12 layers, 12 heads, vocab 50257, random
weights), shrinkable with --layers/--embd/--vocab/--seq-len/--batch for CPU. Queries
are random preconditioned queries (``PreconditionedQueries`` with dense [Q, d_out, d_in']
or rank-r left/right factors): speed does not depend on their values, so no factors are fitted.

For each query kind (dense, rank r) and Q, score_batch runs with each strategy forced
(MATERIALIZE, PER_TOKEN) in rounds: a training step, then each strategy, back to back.
On a shared machine other processes can slow a call several-fold; since the training
step is the same work in every round, a round counts as quiet when its training step is
within --quiet-tol of the best one seen, and ratios are medians of per-round ratios over
quiet rounds (rounds continue until --repeats quiet ones or --max-rounds). The cost
model's pick (what AUTO runs; GPT-2's c_fc and c_proj always get the same pick, else
AUTO is timed too) is checked against the faster forced strategy. A configuration is
skipped when its query tensors or transient buffers would exceed --max-gb; a strategy
whose warm-up call exceeds --max-call-s is timed once.

Run (CPU, sizes used in benchmarks/RESULTS.md):
    .venv/bin/python benchmarks/kernel.py --layers 4 --vocab 16384 --batch 2 --seq-len 128
GPU (full GPT-2-small shapes; add --tf32 to see what TF32 does to the float32 products):
    python benchmarks/kernel.py --device cuda --bf16 --batch 8 --seq-len 512 --max-gb 40
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import influence_ops as io
from influence_ops.strategy import choose_strategy, materialize_cost, per_token_cost

GB = 2**30


def build_model(args) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=args.embd, n_layer=args.layers, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(1024, args.seq_len), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(cfg).to(args.device).eval()


def random_queries(layers: list[io.TrackedLayer], Q: int, rank: int | None, device: str,
                   seed: int) -> io.PreconditionedQueries:
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = (lambda *shape: torch.randn(*shape, generator=gen, device=device) * 1e-3)
    per_layer = {}
    for l in layers:
        d_out, d_in = l.shape
        per_layer[l.name] = (io.LayerQuery(dense=rand(Q, d_out, d_in)) if rank is None
                             else io.LayerQuery(left=rand(Q, d_out, rank), right=rand(Q, d_in, rank)))
    return io.PreconditionedQueries(
        layers=per_layer, measurement=torch.zeros(Q, dtype=torch.float64),
        truncation_error=torch.zeros(Q, len(layers), dtype=torch.float64), rank=rank, fingerprint="random",
        factor_tokens=1, damping={l.name: 0.0 for l in layers})


def query_bytes(layers, Q: int, rank: int | None) -> int:
    """float32 bytes of the queries held for all layers."""
    return 4 * sum(Q * (l.d_out * l.d_in_h if rank is None else rank * (l.d_out + l.d_in_h)) for l in layers)


def transient_bytes(layers, B: int, T: int, Q: int, rank: int | None, strategy: io.Strategy) -> int:
    """float32 bytes of the largest per-layer temporary of a strategy."""
    worst = 0
    for l in layers:
        d_out, d_in = l.shape
        if strategy == io.Strategy.MATERIALIZE:
            size = B * d_out * d_in + (Q * d_out * d_in if rank is not None else 0)  # G, dense P rebuilt
        else:
            size = B * T * Q * (d_out if rank is None else 2 * rank)  # P a_t per token, or (g U, a V)
        worst = max(worst, 4 * size)
    return worst


class Timer:
    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def train_step(model, batch, autocast_dtype) -> None:
    """forward + backward with weight gradients (summed token NLL), as in training."""
    model.zero_grad(set_to_none=True)
    ctx = (torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with ctx:
        losses = io.LanguageModelObjective().sequence_losses(model, batch, io.Fisher.EMPIRICAL, None)
    losses.float().sum().backward()


def measure(model, batch, queries, strategies: list[io.Strategy], args, timer) -> dict:
    """Rounds of (training step, then score_batch with each strategy), back to back.

    The training step is the same work in every configuration, so its best time over the
    whole run (``args.best_train``) is the quiet-machine reference: a round counts as quiet
    when its training step is within --quiet-tol of it. Rounds run until --repeats quiet
    rounds were seen or --max-rounds were run. Reported per strategy: times and the median
    of per-round ratios t_train / t_score over quiet rounds (over all rounds if none was
    quiet, flagged), and best-of-all-rounds times. A strategy whose warm-up call exceeds
    --max-call-s is not repeated (its warm-up time is reported, against the best training step).
    """
    used: dict[io.Strategy, dict] = {s: {} for s in strategies}

    def score(strategy):
        def call():
            res = io.score_batch(model, queries, batch, strategy=strategy, autocast_dtype=args.autocast)
            used[strategy].update(res.strategies)
        return call

    def train():
        t = timer(lambda: train_step(model, batch, args.autocast))
        args.best_train = min(args.best_train, t)
        return t

    first: dict[io.Strategy, float] = {}
    for _ in range(args.warmup):
        train()
        first = {s: timer(score(s)) for s in strategies}
    slow = {s for s in strategies if first.get(s, 0.0) > args.max_call_s}
    t_train: list[float] = []
    t_score: dict[io.Strategy, list[float]] = {s: [] for s in strategies}
    quiet = (lambda t: t <= args.quiet_tol * args.best_train)
    while len(t_train) < args.max_rounds and sum(map(quiet, t_train)) < args.repeats:
        t_train.append(train())
        for s in strategies:
            if s not in slow:
                t_score[s].append(timer(score(s)))
    model.zero_grad(set_to_none=True)
    keep = [i for i, t in enumerate(t_train) if quiet(t)]
    out = {}
    for s in strategies:
        if s in slow:
            times, ratios, rounds = [first[s]], [min(t_train) / first[s]], "1 warm-up call"
        else:
            times = t_score[s]
            idx = keep or list(range(len(times)))
            ratios = [t_train[i] / times[i] for i in idx]
            rounds = f"{len(keep)} quiet of {len(times)} rounds" if keep else f"0 quiet of {len(times)} rounds"
        picks: dict[str, int] = {}
        for used_s in used[s].values():
            picks[used_s.value] = picks.get(used_s.value, 0) + 1
        quiet_times = [times[i] for i in keep] if keep and s not in slow else times
        out[s.value] = {
            "picked": picks, "repeats": len(times), "rounds": rounds, "quiet_rounds": len(keep) if s not in slow else 0,
            "score_s": statistics.median(quiet_times), "train_s": statistics.median([t_train[i] for i in keep]
                                                                                    if keep else t_train),
            "ratio": statistics.median(ratios),
            "score_best_s": min(times), "train_best_s": min(t_train),
            "score_s_all": times, "train_s_all": t_train, "quiet_round_index": keep,
        }
    return out


def summarize(rows: list[dict], best_train: float, quiet_tol: float) -> None:
    """Recompute each strategy's medians over the rounds that were quiet by the run's final
    best training step (the running best used while measuring may have come from a loaded
    stretch). Strategies timed by a single warm-up call are compared with the best step."""
    for row in rows:
        for res in row.get("results", {}).values():
            if "score_s_all" not in res:
                continue
            t_train, times = res["train_s_all"], res["score_s_all"]
            if res["repeats"] == 1 and len(t_train) != 1:  # one warm-up call
                res.update(ratio=best_train / times[0], score_s=times[0], train_s=best_train, rounds="1 call")
                continue
            keep = [i for i, t in enumerate(t_train) if t <= quiet_tol * best_train]
            idx = keep or list(range(len(times)))
            res.update(
                quiet_round_index=keep,
                score_s=statistics.median(times[i] for i in idx),
                train_s=statistics.median(t_train[i] for i in idx),
                ratio=statistics.median(t_train[i] / times[i] for i in idx),
                rounds=f"{len(keep)} quiet of {len(times)}" + ("" if keep else " (all loaded: unreliable)"),
            )


def model_costs(layers, B, T, Q, rank) -> dict[str, int]:
    """Cost-model multiply-adds summed over layers, per strategy."""
    return {
        "materialize": sum(materialize_cost(B, T, Q, l.d_out, l.d_in_h, rank) for l in layers),
        "per_token": sum(per_token_cost(B, T, Q, l.d_out, l.d_in_h, rank) for l in layers),
    }


def run(args) -> list[dict]:
    model = build_model(args)
    layers = io.find_mlp_layers(model)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(args.vocab, (args.batch, args.seq_len), generator=gen)
    batch = io.TokenBatch(ids, torch.ones_like(ids), ids.clone()).to(args.device)
    timer = Timer(args.device)
    B, T = args.batch, args.seq_len
    rows = []
    for rank in ([None] if not args.no_dense else []) + [args.rank]:
        for Q in args.queries:
            kind = "dense" if rank is None else f"rank-{rank}"
            base = {"queries": kind, "Q": Q, "tokens": B * T, "costs": model_costs(layers, B, T, Q, rank),
                    "query_gb": query_bytes(layers, Q, rank) / GB}
            if query_bytes(layers, Q, rank) > args.max_gb * GB:
                rows.append({**base, "skipped": f"queries need {base['query_gb']:.1f} GB > --max-gb {args.max_gb}"})
                print(f"{kind} Q={Q}: skipped ({rows[-1]['skipped']})", flush=True)
                continue
            queries = random_queries(layers, Q, rank, args.device, args.seed + Q)
            costs = base["costs"]
            pick = io.Strategy.PER_TOKEN if costs["per_token"] < costs["materialize"] else io.Strategy.MATERIALIZE
            row = {**base, "cost_model_pick": pick.value, "results": {}}
            # AUTO runs the same code as the forced strategy it picks when every layer picks the same
            # (the case for GPT-2, whose c_fc and c_proj cost the same), so it is timed through that one.
            strategies = []
            for strategy in (io.Strategy.MATERIALIZE, io.Strategy.PER_TOKEN):
                need = transient_bytes(layers, B, T, Q, rank, strategy)
                if need > args.max_gb * GB:
                    row["results"][strategy.value] = {"skipped": f"temporaries {need / GB:.1f} GB > --max-gb"}
                    print(f"{kind} Q={Q} {strategy.value}: skipped ({need / GB:.1f} GB)", flush=True)
                else:
                    strategies.append(strategy)
            picks = {choose_strategy(B, T, Q, l.d_out, l.d_in_h, rank) for l in layers}
            if len(picks) > 1 and len(strategies) == 2:
                strategies.append(io.Strategy.AUTO)
            row["results"].update(measure(model, batch, queries, strategies, args, timer))
            for name, res in row["results"].items():
                if "score_s" in res:
                    print(f"{kind} Q={Q} {name}: score {res['score_s']:.3f}s train {res['train_s']:.3f}s "
                          f"ratio {res['ratio']:.3f} picked {res['picked']} (x{res['repeats']})", flush=True)
            del queries
            rows.append(row)
    return rows


def auto_result(row: dict) -> dict:
    """The timing of what AUTO runs: its own if timed, else the forced strategy it picks."""
    res = row["results"]
    return res.get("auto") or res.get(row["cost_model_pick"], {})


def verdict(row: dict) -> str:
    """Whether the cost model's pick was faster than the other strategy (median over quiet rounds)."""
    res = row["results"]
    pick = row["cost_model_pick"]
    other = "per_token" if pick == "materialize" else "materialize"
    if "score_s" not in res.get(pick, {}) or "score_s" not in res.get(other, {}):
        return "other not timed"
    a, b = res[pick], res[other]
    rounds = ""
    if a["repeats"] == b["repeats"] > 1:
        wins = sum(x < y for x, y in zip(a["score_s_all"], b["score_s_all"]))
        rounds = f", faster in {wins}/{a['repeats']} rounds"
    if a["score_s"] <= b["score_s"]:
        return f"yes ({b['score_s'] / a['score_s']:.2f}x{rounds})"
    return f"NO ({other} {a['score_s'] / b['score_s']:.2f}x faster{rounds})"


def markdown(rows: list[dict]) -> str:
    cell = (lambda r: ("skipped" if "score_s" not in r else
                       f"{r['score_s']:.3f}" + ("" if r["repeats"] > 1 else " (1 call)")))
    lines = ["| queries | Q | cost-model pick (layers) | materialize s | per_token s | train step s | "
             "score tok/s (pick) | train tok/s | ratio (pick) | rounds | pick right? |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['queries']} | {row['Q']} | - | {row['skipped']} | | | | | | | |")
            continue
        res = row["results"]
        auto = auto_result(row)
        if "score_s" not in auto:
            lines.append(f"| {row['queries']} | {row['Q']} | {row['cost_model_pick']} | pick not timed | | | | | | | |")
            continue
        picks = ", ".join(f"{k} x{v}" for k, v in auto["picked"].items())
        tokens = row["tokens"]
        lines.append(
            f"| {row['queries']} | {row['Q']} | {picks} | {cell(res['materialize'])} | "
            f"{cell(res['per_token'])} | {auto['train_s']:.3f} | {tokens / auto['score_s']:.0f} | "
            f"{tokens / auto['train_s']:.0f} | {auto['ratio']:.2f} | {auto['rounds']} | {verdict(row)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--no-dense", action="store_true", help="only rank-r queries")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in score_batch and the training step")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for float32 matmuls on CUDA (score_batch keeps its G / P products in float32)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="quiet rounds wanted per configuration")
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--quiet-tol", type=float, default=1.3,
                        help="a round is quiet if its training step is within this factor of the best one")
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip configs whose tensors exceed this")
    parser.add_argument("--max-call-s", type=float, default=8.0, help="time once if the warm-up call is slower")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_output/kernel.json")
    parser.add_argument("--quiet-ref", type=float, default=None,
                        help="best training-step seconds of an earlier run with the same sizes (quiet reference)")
    parser.add_argument("--table-from", help="print the table of a saved results JSON and exit")
    args = parser.parse_args()
    args.autocast = torch.bfloat16 if args.bf16 else None
    args.best_train = args.quiet_ref or float("inf")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        summarize(saved["rows"], saved["meta"]["best_train_s"], saved["meta"]["args"]["quiet_tol"])
        print(markdown(saved["rows"]))
        return
    t0 = time.perf_counter()
    rows = run(args)
    summarize(rows, args.best_train, args.quiet_tol)
    table = markdown(rows)
    print()
    print(table)
    meta = {"torch": torch.__version__, "influence_ops": io.__version__, "machine": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "total_s": time.perf_counter() - t0,
            "best_train_s": args.best_train,
            "args": {k: v for k, v in vars(args).items() if k not in ("autocast", "best_train")}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\ntotal {meta['total_s']:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
