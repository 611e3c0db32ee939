"""The job file: one TOML document describing a whole influence job.

Sections (every key optional unless marked required)::

    run_id = "my-run"                  # default: derived from the config hash
    on_error = "fail"                  # a bad shard / unit of work: "fail" stops the run with one line
                                       # naming the file; "skip" leaves it out, writes it with its reason
                                       # to <output>/errors/<run_id>.parquet, counts it in the run record
                                       # and goes on (tokenize, fit-factors and score follow it)
    [model]
    path = "s3://bucket/models/tiny"    # Hugging Face folder (local or object storage), or a Hub name
                                        # ("org/model") already in the local Hugging Face cache
    factory = "pkg.module:make_model"   # or a plain torch model (exactly one of path/factory)
    tokenizer = "..."                   # default: the model path
    layer_pattern = "..."               # regex over module names; default: per architecture and track
    track = "mlp"                       # mlp | mlp+attention (known architectures; not with layer_pattern)
    dtype = "float32"                   # float32 | float64 | bfloat16
    max_length = 128                    # chunk length for `tokenize` (default: model context)
    trust_remote_code = false
    [data]
    raw = "raw/*.jsonl"                 # raw text for `tokenize` (JSONL or Parquet)
    text_column = "text"
    id_column = "id"
    corpus = "s3://bucket/shards/"      # required: prefix or glob of Parquet shards
    queries = "queries.jsonl"           # required: JSONL or Parquet queries
    output = "s3://bucket/out"          # required: output prefix
    too_long = "error"                  # a shard sequence longer than the model's context:
                                        # error (stop, naming file and row) | truncate (keep its
                                        # first tokens) | chunk (cut into pieces of the context,
                                        # doc_id "<doc_id>#<piece>"); applied wherever shards are read
    row_group_rows = 1024               # rows per Parquet row group of the shards `tokenize` writes
                                        # (the score stage's units are ranges of row groups)
    [factors]
    sample_sequences = 1000             # or sample_tokens (not both); default: the whole corpus
    fisher = "topm"                     # topm | gaussian | sampled | empirical | expected (tiny models only: T x V passes)
    fisher_samples = 5                  # label draws (or probes) per position in stage 1 (one forward, k backward)
    lambda_samples = 2                  # the same in stage 3 (Lambda, the noisier estimate); see README "Accuracy"
    fisher_passes = 3                   # backward passes the stage-1 draws are summed into; omit for one per draw
    lambda_passes = 1                   # the same in stage 3 (fewer: cheaper, noisier; README "Accuracy")
    damping = 0.001                     # absolute; omit for 0.1 x mean(Lambda) per layer
    seed = 0
    blocks = 1
    unit_sequences = 256                # sequences per unit of work (label draws are seeded per sequence)
    refit = "on_growth"                 # on_growth: keep the factors while the corpus only grows (every
                                        # fitted shard unchanged) by at most refit_growth of its sequences |
                                        # on_corpus_change: refit whenever a shard is added, replaced or removed |
                                        # on_settings_change: never refit for the corpus, only for [factors] keys
    refit_growth = 0.25                 # on_growth: refit once the corpus is 25% larger than when fitted
    [scoring]
    top_k = 10
    rank = 32                           # 0 = dense queries (leaving the key out means 32)
    per_token = true                    # token_scores/ for the merged top-k rows
    strategy = "auto"                   # auto | materialize | per_token
    sort_window = 512                   # rows sorted by length together (limits padding)
    normalize = "none"                  # none | cosine | train_norm (influence_ops.normalize)
    self_influence = false              # self_influence/ table (always written with cosine)
    query_precision = "float32"         # float32 | float64: precision of query preparation
    query_lowrank = "randomized"        # randomized | exact: SVD of the rank-r queries (in the eigenbasis)
    query_batches_per_unit = 4          # query batches (resources.batch_size each) per actor unit of build-queries
    unit_rows = 0                       # rows per score unit (whole row groups; 0 = auto: whole shards up
                                        # to 4096 rows, else about 4 units per actor over the corpus)
    mode = "scan"                       # scan (score every sequence) | index (influence index, then exact
                                        # re-scoring of candidates) | tfidf (TF-IDF candidates, re-scored)
    candidates = 100                    # index / tfidf: candidates per query and side, re-scored exactly
    tfidf_candidates = 0                # index: also re-score TF-IDF's best this many per query (0 = none)
    [index]                             # the influence index (scoring.mode = "index"; `influence index`)
    projection = "eigen"                # eigen (top eigenvectors of the fitted S and A) | random (seeded Gaussian)
                                        # | weighted (Gaussian x (S + d I)^1/2) | whitened (x (S + d I)^-1/2)
    k_out = 16                          # projected output width per layer
    k_in = 16                           # projected input width per layer (bytes per sequence: layers x k_out x k_in
                                        # x 2 for float16 / bfloat16, x 4 for float32)
    dtype = "float16"                   # float16 | bfloat16 | float32: storage of the compressed gradients
    seed = 0                            # seed of the random, weighted and whitened projections
    search = "scan"                     # scan (every part scored on actors) | faiss (the whole index in memory on
                                        # the driver, FAISS IndexFlatIP; the same candidates; needs faiss-cpu)
    [resources]
    ray_address = ""                    # empty: start a local Ray sized for this machine
    actors = 1
    gpus_per_actor = "auto"             # "auto" (1 when the cluster has GPUs) or a number
    cpus_per_actor = 1.0
    threads_per_actor = 0               # torch threads per actor, 0 = torch's default
    batch_size = 8                      # sequences per forward/backward
    object_store_mb = 0                 # local Ray only; 0 = min(1 GiB, 20% of RAM)
    actor_restarts = -1                 # restarts of an actor whose node died (-1 = no limit)
    task_retries = -1                   # retries of a unit whose actor died, -1 = until it is back (not errors it raised)
    pool = "auto"                       # "actors", "tasks" (reused processes), "auto": tasks on one node without GPUs

Every value is checked when the config is built; errors name the key and the value.
``influence validate job.toml`` checks the rest before anything runs (``pipelines/validate/``).
"""

from __future__ import annotations

from .checks import ConfigError
from .job import HUB_NAME, ON_ERROR, SECTIONS, TOP_LEVEL, JobConfig, config_from_dict, load_config
from .sections import (REFIT, DataConfig, DType, FactorConfig, IndexConfig, IndexDType, IndexSearch, ModelConfig,
                       Pool, ResourceConfig, ScoringConfig, ScoringMode, TooLong)

VERBOSE_ENV = "INFLUENCE_VERBOSE"  # "1" (set by `influence --verbose`): Ray's and transformers' messages shown

__all__ = ["ConfigError", "DType", "DataConfig", "FactorConfig", "HUB_NAME", "IndexConfig", "IndexDType", "IndexSearch",
           "JobConfig", "ModelConfig", "ON_ERROR", "Pool", "REFIT", "ResourceConfig", "SECTIONS", "ScoringConfig",
           "ScoringMode", "TOP_LEVEL", "TooLong", "VERBOSE_ENV", "config_from_dict", "load_config"]
