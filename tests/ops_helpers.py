"""Shared helpers for the influence_ops tests: tiny models, token data, assertions.

Every model is built from a config with random weights (no downloads), in eval
mode, float64 unless asked otherwise. Sizes: hidden 16, 2 blocks, vocab 48.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from influence_ops import TokenBatch, collate, query_batch

VOCAB = 48
HIDDEN = 16
INTERMEDIATE = 24
LAYERS = 2
HEADS = 2
MAX_POSITIONS = 32

# Tolerances. Float64 where the math is exact (same numbers, different order of sums).
F64_RTOL = 1e-10
F64_ATOL = 1e-12


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype).eval()


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """GPT-2 (MLP layers are HF ``Conv1D``: c_fc, c_proj)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     n_inner=INTERMEDIATE, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return _finish(GPT2LMHeadModel(cfg), dtype)


def tiny_gpt_neox(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """GPT-NeoX / Pythia (dense_h_to_4h, dense_4h_to_h)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _seeded(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS,
                        hidden_dropout=0.0, attention_dropout=0.0)
    return _finish(GPTNeoXForCausalLM(cfg), dtype)


def _gated(config_cls, model_cls, seed: int, dtype: torch.dtype, **extra) -> nn.Module:
    _seeded(seed)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE,
                     max_position_embeddings=MAX_POSITIONS, **extra)
    return _finish(model_cls(cfg), dtype)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Llama (gated MLP without bias: gate_proj, up_proj, down_proj)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _gated(LlamaConfig, LlamaForCausalLM, seed, dtype)


def tiny_qwen2(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Qwen2 (gated MLP like Llama; attention projections have biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _gated(Qwen2Config, Qwen2ForCausalLM, seed, dtype)


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Qwen3 (gated MLP like Llama; RMS norms on the queries and keys)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _gated(Qwen3Config, Qwen3ForCausalLM, seed, dtype, head_dim=HIDDEN // HEADS)


def tiny_mistral(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Mistral (gated MLP like Llama; sliding-window attention, wider than these sequences)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _gated(MistralConfig, MistralForCausalLM, seed, dtype, bos_token_id=1, eos_token_id=2)


def tiny_gemma(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Gemma (gated MLP like Llama with a GELU gate; tied, scaled embeddings)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return _gated(GemmaConfig, GemmaForCausalLM, seed, dtype, head_dim=HIDDEN // HEADS, bos_token_id=1,
                  eos_token_id=2)


def tiny_phi3(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Phi-3 (fused gate_up_proj [2 x intermediate, hidden], down_proj; fused qkv_proj)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return _gated(Phi3Config, Phi3ForCausalLM, seed, dtype, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_opt(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """OPT (fc1, fc2 directly in each decoder layer, with bias)."""
    from transformers import OPTConfig, OPTForCausalLM

    _seeded(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    ffn_dim=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=HIDDEN,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return _finish(OPTForCausalLM(cfg), dtype)


MLP_PATTERN = r"^(1|3)$"


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Plain ``nn.Sequential(Embedding, Linear, ReLU, Linear)``: input_ids [B, T] -> logits [B, T, VOCAB].

    Not a Hugging Face model: track it with ``find_mlp_layers(model, MLP_PATTERN)``
    (modules "1" and "3").
    """
    _seeded(seed)
    model = nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, INTERMEDIATE), nn.ReLU(),
                          nn.Linear(INTERMEDIATE, VOCAB))
    return _finish(model, dtype)


# name -> (builder, pattern for find_mlp_layers: None = the architecture's own).
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], str | None]] = {
    "gpt2": (tiny_gpt2, None),
    "gpt_neox": (tiny_gpt_neox, None),
    "llama": (tiny_llama, None),
    "qwen2": (tiny_qwen2, None),
    "qwen3": (tiny_qwen3, None),
    "mistral": (tiny_mistral, None),
    "gemma": (tiny_gemma, None),
    "phi3": (tiny_phi3, None),
    "opt": (tiny_opt, None),
    "mlp": (tiny_mlp, MLP_PATTERN),
}


def peaked_tiny_lm(vocab: int = 8):
    """(model, layers, batch, eigen): a float64 GPT-2 over ``vocab`` tokens whose softmax is peaked, as a trained
    LM's (the top labels hold most of the mass), one padded batch of 5 label positions, and the eigenbasis of its
    empirical covariances. For the label-draw tests (topm, summed passes)."""
    import influence_ops as ops
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=12,
                                       bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    layers = ops.find_mlp_layers(model)
    batch = collate([[3, 6, 4, 1, 5], [7, 2, 0]])  # 5 label positions with padding
    eigen = ops.eigendecompose(ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.EMPIRICAL))
    return model, layers, batch, eigen


def random_sequences(n: int, vocab: int = VOCAB, min_len: int = 3, max_len: int = 10,
                     seed: int = 0) -> list[list[int]]:
    """``n`` token-id lists with lengths uniform in [min_len, max_len], ids in [1, vocab).

    Id 0 is left out so that it can serve as the padding id.
    """
    if min_len < 2:
        raise ValueError(f"min_len must be >= 2 (one token has nothing to predict), got {min_len}")
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def batches_of(sequences: Sequence[Sequence[int]], batch_size: int) -> list[TokenBatch]:
    """Consecutive chunks of ``batch_size`` sequences, each collated (right-padded with 0)."""
    return [collate(sequences[i:i + batch_size]) for i in range(0, len(sequences), batch_size)]


def random_queries(n: int, vocab: int = VOCAB, seed: int = 100) -> TokenBatch:
    """A query batch of ``n`` (prompt, completion) pairs: prompts 2-5 tokens, completions 1-4."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    completions = [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    return query_batch(prompts, completions)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = F64_RTOL, atol: float = F64_ATOL,
                 name: str = "tensor", worst: int = 5) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise.

    On failure the message names ``name``, the shapes, the largest absolute and
    relative errors and the ``worst`` entries (index, actual, expected).
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return
    finite_mismatch = torch.isfinite(a) != torch.isfinite(e)
    diff = (a - e).abs()
    excess = diff - (atol + rtol * e.abs())
    excess = torch.where(finite_mismatch, torch.full_like(excess, float("inf")), excess)
    excess = torch.nan_to_num(excess, nan=float("inf"))
    if bool((excess <= 0).all()):
        return
    flat = excess.flatten()
    bad = int((flat > 0).sum())
    order = torch.argsort(flat, descending=True)[:min(worst, bad)]
    rel = diff / e.abs().clamp_min(1e-300)
    lines = [
        f"{name}: {bad} of {a.numel()} entries differ beyond rtol={rtol:g}, atol={atol:g}; "
        f"max abs err {float(diff.nan_to_num(float('inf')).max()):.3e}, "
        f"max rel err {float(rel.nan_to_num(float('inf')).max()):.3e}; worst entries:"
    ]
    for i in order.tolist():
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), a.shape))
        lines.append(f"  {idx}: actual {float(a[idx]):.17g}, expected {float(e[idx]):.17g}, "
                     f"abs err {float(diff[idx]):.3e}")
    raise AssertionError("\n".join(lines))
