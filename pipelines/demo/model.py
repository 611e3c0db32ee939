"""A tiny GPT-2 and a word-level tokenizer built locally (no downloads), for the demo and tests.

The tokenizer is a ``tokenizers`` WordLevel model (whitespace and punctuation
split, lower-cased) wrapped in transformers' ``PreTrainedTokenizerFast`` and
saved into the model's folder, so ``AutoTokenizer.from_pretrained`` loads it
exactly like a downloaded one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..runtime.threads import torch_threads

SPECIAL = ["<pad>", "<unk>", "<eos>"]


def build_tokenizer(texts: Iterable[str], directory: str | Path):
    """Fit a word-level tokenizer on ``texts`` and save it (HF format) into ``directory``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(list(texts), WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(directory))
    return fast


def tiny_gpt2(vocab_size: int, context: int = 64, width: int = 64, layers: int = 2, heads: int = 2, seed: int = 0):
    """A small randomly initialised GPT-2 (eval mode, dropout 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    model.loss_type = "ForCausalLM"  # the class name maps to no loss: transformers would warn, then use this one
    return model


def train(model, sequences: Sequence[Sequence[int]], epochs: int, max_seconds: float = float("inf"),
          batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Train with AdamW on next-token loss for ``epochs`` (fewer if ``max_seconds`` runs out first).

    Returns steps, epochs done, last loss and seconds. With the whole budget of
    epochs the result is the same on every run of the same torch build.
    """
    from influence_ops import collate

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, steps, loss, done = time.perf_counter(), 0, math.nan, 0
    with torch_threads(1):  # a model this small trains fastest on one thread, and shares the CPU well
        for _ in range(epochs):
            order = torch.randperm(len(sequences), generator=gen).tolist()
            for lo in range(0, len(order), batch_size):
                batch = collate([sequences[i] for i in order[lo:lo + batch_size]])
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                steps, loss = steps + 1, float(out.loss.detach())
            done += 1
            if time.perf_counter() - start > max_seconds:
                break
    model.eval()
    return {"steps": steps, "epochs": done, "loss": loss, "seconds": time.perf_counter() - start}


def save_model(model, directory: str | Path) -> Path:
    """save_pretrained with safetensors."""
    from ..io.model_loading import quiet_transformers

    Path(directory).mkdir(parents=True, exist_ok=True)
    with quiet_transformers():  # no "Writing model shards" bar
        model.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
