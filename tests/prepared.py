"""Factors and preconditioned queries of a corpus, made in the test process without Ray.

``fit_ekfac`` on every row of the corpus (empirical Fisher), saved as the
``fit-factors`` stage would with a completion marker, then the ``build-queries``
stage itself (it runs on the driver). Tests that exercise ``score`` and later
stages start from here instead of running ``fit-factors`` through Ray.
"""

from __future__ import annotations

from pathlib import Path


def prepare_output(cfg) -> None:
    """``<output>/factors`` and ``<output>/queries`` for the job ``cfg`` (its corpus, model and queries)."""
    from influence_ops import Fisher, collate, fit_ekfac, save_factors
    from pipelines.io import completion
    from pipelines.io.model_loading import load_model
    from pipelines.io.shards import list_shards, read_rows
    from pipelines.stages.build_queries import build_queries

    m = load_model(cfg.model)
    seqs = [x for shard in list_shards(cfg.data.corpus) for x in read_rows(shard, None, m.vocab_size).input_ids]
    factors = fit_ekfac(m.model, m.layers, [collate(seqs[i:i + 4]) for i in range(0, len(seqs), 4)],
                        fisher=Fisher.EMPIRICAL)
    save_factors(factors, Path(cfg.data.output) / "factors")
    completion.mark_complete(str(Path(cfg.data.output) / "factors"), "in-process", {"digest": "in-process"})
    build_queries(cfg, "in-process")
