"""Dense query preparation: self-influence by rotating the stored P back (before) vs from M (after).

One GPT-2-small c_fc layer (d_out 3072, d_in' 769), 8 dense queries, random orthogonal eigenbases:
    PYTHONPATH=. .venv/bin/python benchmarks/dense_self_influence.py
"""
import time, torch
from influence_ops.query_prep import dense_self_influence
torch.set_num_threads(2); torch.manual_seed(0)
Q, d_out, d_in = 8, 3072, 769
q_s = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))[0]
q_a = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))[0]
denom = torch.rand(d_out, d_in, dtype=torch.float64) + 0.1
M = torch.randn(Q, d_out, d_in)
P = q_s.float() @ M @ q_a.float().T  # (Q, d_out, d_in') float32: the stored dense query
t0 = time.perf_counter(); Pd = P.double(); R = q_s.T @ Pd @ q_a; old = (R ** 2 * denom).sum((-2, -1)); t1 = time.perf_counter()
new = dense_self_influence(M, denom); t2 = time.perf_counter()
t3 = time.perf_counter(); back = q_s.float() @ M @ q_a.float().T; t4 = time.perf_counter()
print(f"Q={Q} layer {d_out}x{d_in}: self-influence old (rotate P back, float64) {t1-t0:.2f} s, new (from M) {t2-t1:.3f} s; "
      f"rotate back float32 (kept) {t4-t3:.2f} s; max rel diff {float(((old-new).abs()/old.abs()).max()):.1e}")
