"""The commented job file ``influence init`` writes: every key of ``pipelines/config``, with its default.

Keys without a default value are commented out (``# key = ...``); the four
paths every job needs hold placeholders. ``load_config`` accepts the file as
written (tests/test_cli_errors.py checks that every config key is in it).
"""

TEMPLATE = """\
# An influence job (EK-FAC influence functions over a corpus). Relative local paths are
# relative to this file's folder; s3:// and gs:// URLs work wherever a path does.
# Run it with `influence run job.toml`; each stage can also run alone (influence --help).

# run_id = "my-run"               # default: the UTC time and a hash of this config
on_error = "fail"                 # a bad shard or unit of work: "fail" stops the run with one line;
                                  # "skip" records it in <output>/errors/ and goes on

[model]
path = "model"                    # a Hugging Face model folder (config.json + model.safetensors or
                                  # pytorch_model.bin), local or s3://, or a Hub name ("org/model")
                                  # already in the local Hugging Face cache (nothing is downloaded)
# factory = "pkg.module:make"     # instead of path: a function returning a torch.nn.Module
# tokenizer = "tokenizer"         # folder of the tokenizer; default: model.path
# layer_pattern = "mlp"           # regex over module names; default: the layers `track` names
track = "mlp"                     # mlp | mlp+attention (the attention projections too; known architectures)
dtype = "float32"                 # float32 | float64 | bfloat16
# max_length = 128                # chunk length of `tokenize`; default: the model's context
trust_remote_code = false         # true runs Python code shipped with the model: only for models you trust

[data]
# raw = "raw"                     # raw text for `tokenize`: JSONL or Parquet files (a folder or a glob)
text_column = "text"              # column of the raw text
id_column = "id"                  # column of the document ids
corpus = "shards"                 # required: folder (prefix) or glob of the tokenized Parquet shards
queries = "queries.jsonl"         # required: JSONL or Parquet, one query a row: query_id, prompt, completion
                                  # (give the completion its leading space, e.g. " Paris") or
                                  # prompt_ids + completion_ids
output = "output"                 # required: folder of every result (factors, queries, scores, tables)
too_long = "error"                # a shard sequence longer than the model's context: error | truncate | chunk
row_group_rows = 1024             # rows per Parquet row group of the shards `tokenize` writes

[factors]
# sample_sequences = 1000         # sequences the factors are fitted on; default: the whole corpus
# sample_tokens = 100000          # or a token budget (not both)
fisher = "topm"                   # topm | gaussian | sampled | empirical | expected (tiny models only)
fisher_samples = 5                # label draws per position for the covariances (stage 1; topm: 4 top labels + 1 tail)
lambda_samples = 2                # label draws per position for the eigenvalue correction (stage 3)
# fisher_passes = 3               # backward passes the stage-1 draws are summed into; default: one per draw
# lambda_passes = 1               # the same in stage 3 (fewer: cheaper and noisier; README "Accuracy")
# damping = 0.001                 # absolute damping; default: 0.1 x mean eigenvalue, per layer
seed = 0                          # seed of the sample and of the sampled labels
blocks = 1                        # block-diagonal blocks per factor (more: less memory, coarser)
unit_sequences = 256              # sequences per unit of work
refit = "on_growth"               # keep the factors while the corpus only grows, by at most refit_growth;
                                  # or "on_corpus_change" (refit on any shard change) | "on_settings_change"
refit_growth = 0.25               # on_growth: refit once the corpus has grown by 25% (sequences) since the fit

[scoring]
top_k = 10                        # sequences kept per query and side (top and bottom)
rank = 32                         # rank of the preconditioned queries; 0 = dense
per_token = true                  # per-token scores of the top-k rows (token_scores/)
strategy = "auto"                 # auto | materialize | per_token
sort_window = 512                 # rows sorted by length together (less padding)
normalize = "none"                # none | cosine | train_norm (none: the paper's raw influence)
self_influence = false            # write self_influence/ (every scored sequence; always with cosine)
query_precision = "float32"       # float32 | float64: precision of query preparation
query_lowrank = "randomized"      # randomized | exact: the rank-r SVD of the queries
query_batches_per_unit = 4        # build-queries: query batches (batch_size each) per actor unit
unit_rows = 0                     # rows per score unit (whole row groups); 0 = auto
mode = "scan"                     # scan: score every sequence | index: the influence index finds candidates,
                                  # re-scored exactly | tfidf: TF-IDF finds them (README "Choosing a scoring mode")
candidates = 100                  # index / tfidf: candidates per query and side re-scored exactly
tfidf_candidates = 0              # index: also re-score TF-IDF's best this many per query (0 = none)

[index]                           # the influence index (scoring.mode = "index", or `influence index job.toml`)
projection = "eigen"              # eigen: top eigenvectors of the fitted factors | random: seeded Gaussian |
                                  # weighted / whitened: Gaussian x (S + d I)^(+-1/2) (README "Choosing a scoring mode")
k_out = 16                        # projected output width per layer
k_in = 16                         # projected input width per layer
dtype = "float16"                 # float16 | bfloat16 | float32 | int8 (bytes per sequence: layers x k_out x k_in x
                                  # 2, 4 or 1; int8: integers x a per-row scale, same recall measured)
seed = 0                          # seed of the random, weighted and whitened projections
search = "scan"                   # scan: every part scored on actors | faiss: the whole index in memory on the
                                  # driver (FAISS, exact: the same candidates; pip install faiss-cpu)
faiss_memory_gb = 16              # faiss: the most memory it may hold (at most half the available); else the scan

[resources]
ray_address = ""                  # "" = a local Ray sized for this machine; or "ray://host:10001", "auto"
actors = 1                        # actors that hold the model
gpus_per_actor = "auto"           # "auto" (1 when the cluster has GPUs) or a number
cpus_per_actor = 1.0
threads_per_actor = 0             # torch threads per actor; 0 = torch's default
batch_size = 8                    # sequences per forward/backward pass
object_store_mb = 0               # local Ray only; 0 = min(1 GiB, 20% of RAM)
actor_restarts = -1               # restarts of an actor whose node died (-1 = no limit)
task_retries = -1                 # retries of a unit whose actor died (-1 = until it is back)
pool = "auto"                     # actors | tasks (Ray's reused processes) | auto: tasks on one node without GPUs
"""
