"""The tokenizer's unknown token is counted in the corpus and the queries, and a mismatch warns in one line."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq

from pipelines import config_from_dict
from pipelines.io.unknown_tokens import count_unknown, unknown_token_id
from pipelines.stages.build_queries import QueryRows, warn_unknown_queries
from pipelines.stages.tokenize import Tokenizer, warn_unknown


def word_tokenizer(texts: list[str], unk_is_eos: bool = False):
    from tokenizers import Tokenizer as Raw
    from tokenizers import pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Raw(WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<unk>" if unk_is_eos else "<eos>")


def test_unknown_id_is_none_when_it_doubles_as_a_special_token():
    tok = word_tokenizer(["the cat sat"])
    unk = unknown_token_id(tok)
    assert unk == tok.convert_tokens_to_ids("<unk>")
    assert count_unknown(tok("the dog sat")["input_ids"], unk) == 1
    assert unknown_token_id(word_tokenizer(["the cat sat"], unk_is_eos=True)) is None  # GPT-2 style end-of-text
    assert count_unknown([1, 1, 1], None) == 0


def test_tokenize_counts_unknown_tokens_and_warns_above_the_share(tmp_path, caplog):
    raw = tmp_path / "part.jsonl"
    raw.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                           for i, t in enumerate(["the cat sat on the mat", "a zebra ate the quince"])))
    unit = Tokenizer.__new__(Tokenizer)  # the actor without loading a model folder
    unit.tokenizer = word_tokenizer(["the cat sat on the mat"])
    unit.unk, unit.max_length, unit.text_column, unit.id_column = unknown_token_id(unit.tokenizer), 64, "text", "id"
    unit.row_group_rows = None
    sequences, tokens, unknown = unit.tokenize_unit({"input": str(raw), "output": str(tmp_path / "part.parquet"),
                                                     "key": "k"})
    assert (sequences, tokens, unknown) == (2, 11, 4)  # a, zebra, ate, quince
    assert pq.read_table(tmp_path / "part.parquet").num_rows == 2
    cfg = config_from_dict({"model": {"path": str(tmp_path / "model")},
                            "data": {"corpus": str(tmp_path / "c"), "queries": str(tmp_path / "q.jsonl"),
                                     "output": str(tmp_path / "o")}})
    with caplog.at_level(logging.WARNING):
        warn_unknown(unknown, tokens, cfg)
        warn_unknown(5, 100, cfg)  # at the share: quiet
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "4 of 11 corpus tokens (36%)" in line and str(tmp_path / "model") in line and "\n" not in line


def test_queries_with_unknown_tokens_are_named_in_one_line(caplog):
    tok = word_tokenizer(["ola lives in brotem"])
    unk = unknown_token_id(tok)
    ids = [tok(t)["input_ids"] for t in ("ola lives in", "brotem", "kira lives in", "quadun")]
    rows = QueryRows(["q-ola", "q-kira"], ["", ""], ["", ""], [ids[0], ids[2]], [ids[1], ids[3]], [0, 0])
    with caplog.at_level(logging.WARNING):
        warn_unknown_queries(rows, unk, "queries.jsonl")
        warn_unknown_queries(QueryRows(["q-ola"], [""], [""], [ids[0]], [ids[1]], [0]), unk, "queries.jsonl")
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "queries.jsonl: 1 query" in line and "q-kira (2 of 4)" in line and "q-ola" not in line
