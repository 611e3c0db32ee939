"""Agreement of influence_ops with kronfluence 1.0.1 (an independent EK-FAC implementation).

Same model, data and settings on both sides:
  - tiny GPT-2 (our side: the original Conv1D model; kronfluence side: a copy whose
    MLP c_fc / c_proj are nn.Linear with the Conv1D weight transposed, since
    kronfluence wraps only nn.Linear / nn.Conv2d) and a tiny Llama (gate/up/down, no bias);
  - weights briefly trained on a synthetic Markov-chain "language", then cast to float64,
    and every dtype kronfluence exposes set to float64;
  - empirical Fisher (data labels) for the covariances A, S and for Lambda;
  - damping 0.1 x mean(Lambda) per layer (kronfluence damping_factor=None, ours damping=None);
  - tracked modules: the MLP linear layers only;
  - train loss: summed token NLL per sequence; query measurement: summed NLL of the
    completion tokens (prompt labelled -100);
  - training sequences of varying length, right-padded, with attention masks.
    Both sides are padded differently on purpose (kronfluence: to the longest
    sequence of the whole set; ours: per batch), so agreement also checks padding
    invariance.

Conventions compared (see benchmarks/RESULTS.md): kronfluence's homogeneous column is
appended last, like ours; A and S are divided by the number of attention-mask tokens
(ours: the same count); Lambda by the number of sequences (ours too); its pairwise
score is q_grad^T H^-1 train_grad with q_grad the gradient of the measurement (here
the query NLL), which is our sign (positive = training on m lowers the query's loss).

Run:
    .venv/bin/python benchmarks/kronfluence_agreement.py
Writes bench_output/kronfluence_agreement.json and prints a markdown table.

GPT-2-small widths (scoring throughput; both libraries' score times include their query
preparation: query gradients, preconditioning and, at rank r, the SVD):
    .venv/bin/python benchmarks/kronfluence_agreement.py --models gpt2 --width 768 --layers 2 \
        --train-seqs 64 --min-len 128 --max-len 128 --queries 32 --ranks 0 32 --dtype float32 \
        --query-prep fast --pretrain-steps 20 --repeats 2
``--bases weight eigen auto``: time our queries kept in each basis (``influence_ops/query_basis.py``).
``--ranks 0 32``: factors are fitted once per library and repeat, then each rank is scored
(0 = dense). ``--dtype float32``: model, per-sample gradients, preconditioning and scores in
float32 on both sides, covariances/eigendecompositions/Lambda in float64 (kronfluence's
eigendecomposition default); ``--query-prep fast``: our ``QueryPrep(float32, randomized)``
(kronfluence's rank-r path is ``torch.svd_lowrank``, also randomized).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn

import influence_ops as io
from pipelines.eval.kron import linear_from_conv1d

IGNORE = io.IGNORE_INDEX


# ----------------------------------------------------------------------------- data

def markov_chain(vocab: int, fanout: int, gen: torch.Generator) -> torch.Tensor:
    """[V, V] transition matrix: each token has ``fanout`` likely successors."""
    probs = torch.full((vocab, vocab), 0.02 / vocab)
    for v in range(vocab):
        nxt = torch.randperm(vocab, generator=gen)[:fanout]
        probs[v, nxt] += torch.rand(fanout, generator=gen) + 0.2
    return probs / probs.sum(1, keepdim=True)


def sample_sequence(chain: torch.Tensor, length: int, gen: torch.Generator) -> list[int]:
    tok = int(torch.randint(chain.shape[0], (1,), generator=gen))
    out = [tok]
    for _ in range(length - 1):
        tok = int(torch.multinomial(chain[tok], 1, generator=gen))
        out.append(tok)
    return out


def make_data(args, gen: torch.Generator):
    chain = markov_chain(args.vocab, 4, gen)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.train_seqs,), generator=gen).tolist()
    train = [sample_sequence(chain, n, gen) for n in lengths]
    pretrain = [sample_sequence(chain, args.max_len, gen) for _ in range(args.pretrain_seqs)]
    queries = []
    for _ in range(args.queries):
        p = int(torch.randint(4, 9, (1,), generator=gen))
        c = int(torch.randint(2, 6, (1,), generator=gen))
        seq = sample_sequence(chain, p + c, gen)
        queries.append((seq[:p], seq[p:]))
    return train, pretrain, queries


# ----------------------------------------------------------------------------- models

def build_model(kind: str, vocab: int, max_len: int, width: int = 64, layers: int = 2) -> nn.Module:
    """``width``/``layers``: GPT-2 only (n_embd, n_layer; MLP 4 x width, heads width / 64 or 4)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=max_len, n_embd=width, n_layer=layers,
                         n_head=max(4, width // 64),
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return LlamaForCausalLM(cfg)
    raise ValueError(f"unknown model kind {kind!r}")


def pretrain(model: nn.Module, seqs: list[list[int]], steps: int, seed: int) -> float:
    """A few AdamW steps so predictions are not uniform; returns the final mean token NLL."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    data = torch.tensor(seqs)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(seqs), (16,), generator=gen)
        ids = data[idx]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def kronfluence_copy(model: nn.Module, kind: str) -> nn.Module:
    twin = copy.deepcopy(model)
    if kind == "gpt2":
        for block in twin.transformer.h:
            block.mlp.c_fc = linear_from_conv1d(block.mlp.c_fc)
            block.mlp.c_proj = linear_from_conv1d(block.mlp.c_proj)
    return twin.eval()


# ----------------------------------------------------------------------------- kronfluence side

def pad_rows(rows: list[tuple[list[int], list[int]]], width: int) -> list[dict[str, torch.Tensor]]:
    """(input_ids, labels) rows -> dicts padded to ``width`` (pad id 0, label -100, mask 0)."""
    out = []
    for ids, labels in rows:
        n = len(ids)
        pad = width - n
        out.append({
            "input_ids": torch.tensor(ids + [0] * pad),
            "attention_mask": torch.tensor([1] * n + [0] * pad),
            "labels": torch.tensor(labels + [IGNORE] * pad),
        })
    return out


def summed_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    shift_logits = logits[:, :-1]
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def make_task(module_names: list[str]):
    from kronfluence.task import Task

    class SummedNLLTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if sample:
                raise NotImplementedError("this comparison uses the empirical Fisher only")
            return summed_nll(model, batch)

        def compute_measurement(self, batch, model):
            return summed_nll(model, batch)  # NLL of completion tokens (prompt labelled -100)

        def get_influence_tracked_modules(self):
            return module_names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return SummedNLLTask()


def run_kronfluence(model: nn.Module, module_names: list[str], train_rows, query_rows, batch_size: int,
                    workdir: str, ranks: tuple[int, ...] = (0,), dtype: torch.dtype = torch.float64,
                    fit_seqs: int | None = None) -> tuple[dict[int, np.ndarray], dict[str, float]]:
    """Factors once (on the first ``fit_seqs`` training rows; None: all), then pairwise scores of every
    training row per rank (0 = dense): ({rank: [Q, N]}, times in s)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    width = max(len(r[0]) for r in train_rows + query_rows)
    train_ds = pad_rows(train_rows, width)
    query_ds = pad_rows(query_rows, width)
    task = make_task(module_names)
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="agreement", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=workdir)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True,
        activation_covariance_dtype=f64, gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=dtype, lambda_dtype=f64,
    )
    t0 = time.perf_counter()
    analyzer.fit_all_factors("ekfac", dataset=train_ds[:fit_seqs], per_device_batch_size=batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    times = {"factors_s": time.perf_counter() - t0}
    out = {}
    for rank in ranks:
        score_args = ScoreArguments(
            damping_factor=None, per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype,
            query_gradient_svd_dtype=dtype, query_gradient_low_rank=rank or None,
        )
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(f"scores_r{rank}", factors_name="ekfac", query_dataset=query_ds,
                                         train_dataset=train_ds, per_device_query_batch_size=len(query_ds),
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        times[f"scores_s_r{rank}"] = time.perf_counter() - t1
        out[rank] = analyzer.load_pairwise_scores(f"scores_r{rank}")["all_modules"].to(torch.float64).numpy()
    times["scores_s"] = times[f"scores_s_r{ranks[0]}"]
    return out, times


# ----------------------------------------------------------------------------- our side

def run_ours(model: nn.Module, train_seqs, queries, batch_size: int, ranks: tuple[int, ...] = (0,),
             prep: io.QueryPrep | None = None, fit_seqs: int | None = None, bases: tuple[str, ...] = ("weight",)
             ) -> tuple[dict[tuple[int, str], np.ndarray], dict[str, float]]:
    """Factors once (on the first ``fit_seqs`` sequences; None: all), then per rank (0 = dense) and
    query basis (``io.Basis``) query preparation + scores: ({(rank, basis): [Q, N]}, times in s).

    ``scores_s_r{rank}_{basis}`` = query gradients, preconditioning (and SVD) + scoring every batch;
    ``prep_s_r{rank}_{basis}`` is the query preparation part of it; ``scores_s_r{rank}`` and
    ``prep_s_r{rank}`` are those of the first basis. Basis ``auto`` is given the training set's
    tokens and sequences; ``basis_r{rank}_{basis}`` records what each layer got (1 = eigen).
    """
    layers = io.find_mlp_layers(model)
    batches = [io.collate(train_seqs[i:i + batch_size]) for i in range(0, len(train_seqs), batch_size)]
    t0 = time.perf_counter()
    fit = train_seqs[:fit_seqs]
    fit_batches = [io.collate(fit[i:i + batch_size]) for i in range(0, len(fit), batch_size)]
    factors = io.fit_ekfac(model, layers, fit_batches, fisher=io.Fisher.EMPIRICAL)
    times = {"factors_s": time.perf_counter() - t0}
    prompts, completions = zip(*queries)
    tokens = sum(len(s) for s in train_seqs)
    out = {}
    for rank in ranks:
        for basis in bases:
            t1 = time.perf_counter()
            pq = io.precondition_queries(model, factors, [io.query_batch(prompts, completions)], rank=rank or None,
                                         damping=None, prep=prep, basis=basis, train_tokens=tokens,
                                         train_sequences=len(train_seqs))
            t2 = time.perf_counter()
            scores = torch.cat([io.score_batch(model, pq, b).scores for b in batches], dim=1)  # (Q, N)
            times[f"prep_s_r{rank}_{basis}"] = t2 - t1
            times[f"scores_s_r{rank}_{basis}"] = time.perf_counter() - t1
            times[f"eigen_layers_r{rank}_{basis}"] = float(sum(b is io.Basis.EIGEN for b in pq.bases.values()))
            out[rank, basis] = scores.to(torch.float64).numpy()
            del pq
        times[f"prep_s_r{rank}"] = times[f"prep_s_r{rank}_{bases[0]}"]
        times[f"scores_s_r{rank}"] = times[f"scores_s_r{rank}_{bases[0]}"]
    times["scores_s"] = times[f"scores_s_r{ranks[0]}"]
    return out, times


# ----------------------------------------------------------------------------- comparison

def compare(ours: np.ndarray, kf: np.ndarray) -> list[dict[str, float]]:
    rows = []
    for q in range(ours.shape[0]):
        a, b = ours[q], kf[q]
        rows.append({
            "query": q,
            "spearman": float(spearmanr(a, b).statistic),
            "pearson": float(pearsonr(a, b).statistic),
            # max over training sequences of |ours - kf|, relative to the query's largest |kf| score
            "max_rel_diff": float(np.abs(a - b).max() / np.abs(b).max()),
            "sign_agreement": float(np.mean(np.sign(a) == np.sign(b))),
            "kf_scale": float(np.abs(b).max()),
        })
    return rows


def run_model(kind: str, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    train, pre, queries = make_data(args, gen)
    model = build_model(kind, args.vocab, args.max_len, args.width, args.layers)
    final_nll = pretrain(model, pre, args.pretrain_steps, args.seed)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype).eval()
    twin = kronfluence_copy(model, kind)
    # The two models must compute the same function.
    probe = torch.tensor([train[0]])
    with torch.no_grad():
        gap = float((model(input_ids=probe).logits - twin(input_ids=probe).logits).abs().max())
    assert gap < (1e-10 if dtype == torch.float64 else 1e-4), f"{kind}: kronfluence twin differs by {gap}"
    layers = io.find_mlp_layers(model)
    names = [l.name for l in layers]
    ranks = tuple(args.ranks)
    prep = io.QueryPrep(precision="float32", lowrank="randomized") if args.query_prep == "fast" else None
    bases = tuple(args.bases)

    train_rows = [(s, s) for s in train]
    query_rows = [(p + c, [IGNORE] * len(p) + c) for p, c in queries]
    ours_times, kf_times = [], []
    for _ in range(args.repeats):  # alternate the two libraries; report median wall times
        ours, t = run_ours(model, train, queries, args.batch_size, ranks, prep, args.fit_seqs, bases)
        ours_times.append(t)
        print(f"{kind} ours: {json.dumps({k: round(v, 2) for k, v in t.items()})}", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            kf, t = run_kronfluence(copy.deepcopy(twin), names, train_rows, query_rows, args.batch_size, workdir,
                                    ranks, dtype, args.fit_seqs)
        kf_times.append(t)
        print(f"{kind} kronfluence: {json.dumps({k: round(v, 2) for k, v in t.items()})}", flush=True)
    median = (lambda ts: {k: float(np.median([t[k] for t in ts])) for k in ts[0]})
    t_ours, t_kf = median(ours_times), median(kf_times)
    by_basis = {}
    for basis in bases:
        by_rank = {}
        for rank in ranks:
            rows = compare(ours[rank, basis], kf[rank])
            key, mine = f"scores_s_r{rank}", f"scores_s_r{rank}_{basis}"
            by_rank[rank] = {
                "per_query": rows, "min_spearman": min(r["spearman"] for r in rows),
                "min_pearson": min(r["pearson"] for r in rows), "max_rel_diff": max(r["max_rel_diff"] for r in rows),
                "ours_scores_s": t_ours[mine], "ours_prep_s": t_ours[f"prep_s_r{rank}_{basis}"],
                "kronfluence_scores_s": t_kf[key],
                # score pairs (query x training sequence) per second, query preparation included
                "ours_pairs_per_s": len(queries) * len(train) / t_ours[mine],
                "kronfluence_pairs_per_s": len(queries) * len(train) / t_kf[key],
                "speedup": t_kf[key] / t_ours[mine],
                # per repeat (the runs alternate, so each ratio compares neighbours in time)
                "speedups_all": [k[key] / o[mine] for o, k in zip(ours_times, kf_times)],
                "eigen_layers": t_ours[f"eigen_layers_r{rank}_{basis}"],
                # against the first basis (the same queries scored another way: rounding only)
                "max_rel_diff_vs_first_basis": float(np.abs(ours[rank, basis] - ours[rank, bases[0]]).max()
                                                     / np.abs(ours[rank, bases[0]]).max()),
            }
        by_basis[basis] = by_rank
    by_rank = by_basis[bases[0]]
    first = by_rank[ranks[0]]
    return {
        "model": kind, "tracked_layers": names, "pretrain_final_nll": final_nll,
        "train_sequences": len(train), "queries": len(queries),
        "train_tokens": sum(len(s) for s in train),
        "ours_time": t_ours, "kronfluence_time": t_kf, "ours_times_all": ours_times, "kronfluence_times_all": kf_times,
        "per_query": first["per_query"], "min_spearman": first["min_spearman"], "min_pearson": first["min_pearson"],
        "max_rel_diff": first["max_rel_diff"], "by_rank": by_rank, "by_basis": by_basis,
    }


def markdown(results: list[dict]) -> str:
    lines = ["| model | rank | query | Spearman | Pearson | max rel diff | sign agree |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for rank, r_res in res["by_rank"].items():
            for r in r_res["per_query"]:
                lines.append(f"| {res['model']} | {rank or 'dense'} | {r['query']} | {r['spearman']:.6f} | "
                             f"{r['pearson']:.6f} | {r['max_rel_diff']:.2e} | {r['sign_agreement']:.3f} |")
    lines += ["", "| model | rank | basis (eigen layers) | train seqs x queries | ours factors (s) | ours scores (s) (of which query prep) | "
              "kronfluence factors (s) | kronfluence scores (s) | speedup (scores) | min Spearman | max rel diff |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for basis, by_rank in res["by_basis"].items():
            for rank, r in by_rank.items():
                lines.append(
                    f"| {res['model']} | {rank or 'dense'} | {basis} ({r['eigen_layers']:.0f}) | "
                    f"{res['train_sequences']} x {res['queries']} | "
                    f"{res['ours_time']['factors_s']:.2f} | {r['ours_scores_s']:.2f} ({r['ours_prep_s']:.2f}) | "
                    f"{res['kronfluence_time']['factors_s']:.2f} | {r['kronfluence_scores_s']:.2f} | "
                    f"{r['speedup']:.2f}x | {r['min_spearman']:.6f} | {r['max_rel_diff']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--train-seqs", type=int, default=128)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=12)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-seqs", type=int, default=512)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each library; wall times are medians")
    parser.add_argument("--width", type=int, default=64, help="GPT-2 n_embd (768 = GPT-2-small; MLP 4 x width)")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 blocks (2 tracked MLP layers each)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[0], help="query ranks to score, 0 = dense")
    parser.add_argument("--fit-seqs", type=int, default=None,
                        help="fit the factors on the first N training sequences only (both libraries); default all")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--query-prep", default="float64", choices=["float64", "fast"],
                        help="our query preparation: float64 + exact SVD, or QueryPrep(float32, randomized)")
    parser.add_argument("--bases", nargs="+", default=["weight"], choices=[b.value for b in io.Basis],
                        help="our query bases to time (precondition_queries(basis=...)); auto is told the "
                             "training set's size")
    parser.add_argument("--out", default="bench_output/kronfluence_agreement.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its GradScaler notice

    import kronfluence.analyzer  # noqa: F401  (import cost kept out of the timings)

    results = [run_model(kind, args) for kind in args.models]
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import kronfluence
    meta = {"torch": torch.__version__, "kronfluence": kronfluence.__version__, "influence_ops": io.__version__,
            "machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads, "args": vars(args)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
