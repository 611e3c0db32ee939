"""The sections of the job file (``[model]``, ``[data]``, ``[factors]``, ``[scoring]``, ``[index]``,
``[resources]``): one frozen dataclass each, every value checked when it is built."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from influence_ops import DEFAULT_DRAWS, DEFAULT_FISHER, Fisher, LowRankMethod, Normalize, Precision, Strategy, Track
from influence_ops.index_projection import ProjectionKind
from influence_ops.fisher import effective_passes

from .checks import check_int, check_number, check_str, enum_value, fail
from .corpus_paths import corpus_is_folder

REFIT = ("on_growth", "on_corpus_change", "on_settings_change")


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"


class ScoringMode(str, enum.Enum):
    """How the sequences to score exactly are found: all of them, or candidates from the index or TF-IDF."""

    SCAN = "scan"
    INDEX = "index"
    TFIDF = "tfidf"


class IndexDType(str, enum.Enum):
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    INT8 = "int8"  # per-row scale: entry x scale, |entry| <= 127

    @property
    def itemsize(self) -> int:
        """Bytes a stored number takes."""
        return {"float32": 4, "int8": 1}.get(self.value, 2)


class IndexSearch(str, enum.Enum):
    """How queries search the index: every part scored on actors, or the whole index in memory with FAISS."""

    SCAN = "scan"
    FAISS = "faiss"


class Pool(str, enum.Enum):
    """What runs a stage's units: an actor pool (fresh processes per stage), Ray tasks on reused worker
    processes (``runtime/task_pool.py``), or ``auto``: tasks on a one-node Ray without GPUs, else actors."""

    AUTO = "auto"
    ACTORS = "actors"
    TASKS = "tasks"


class TooLong(str, enum.Enum):
    """What a shard sequence longer than the model's context becomes."""

    ERROR = "error"
    TRUNCATE = "truncate"
    CHUNK = "chunk"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    factory: str | None = None
    tokenizer: str | None = None
    layer_pattern: str | None = None
    track: Track = Track.MLP
    dtype: DType = DType.FLOAT32
    max_length: int | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.factory is None):
            fail("model.path / model.factory", (self.path, self.factory), "give exactly one of them")
        check_str("model.path", self.path)
        check_str("model.tokenizer", self.tokenizer)
        check_str("model.layer_pattern", self.layer_pattern)
        object.__setattr__(self, "track", enum_value("model.track", Track, self.track))
        if self.layer_pattern is not None and self.track != Track.MLP:
            fail("model.track", self.track.value, "give model.layer_pattern or model.track, not both")
        if self.factory is not None:
            check_str("model.factory", self.factory)
            module, _, attr = self.factory.partition(":")
            if not module or not attr:
                fail("model.factory", self.factory, "must look like 'package.module:function'")
        object.__setattr__(self, "dtype", enum_value("model.dtype", DType, self.dtype))
        if self.max_length is not None:
            check_int("model.max_length", self.max_length, 2)
        if not isinstance(self.trust_remote_code, bool):
            fail("model.trust_remote_code", self.trust_remote_code, "must be true or false")

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.path


@dataclass(frozen=True)
class DataConfig:
    corpus: str
    queries: str
    output: str
    raw: str | None = None
    text_column: str = "text"
    id_column: str = "id"
    too_long: TooLong = TooLong.ERROR
    row_group_rows: int = 1024

    def __post_init__(self) -> None:
        for key in ("corpus", "queries", "output"):
            check_str(f"data.{key}", getattr(self, key), required=True)
        for key in ("raw", "text_column", "id_column"):
            check_str(f"data.{key}", getattr(self, key))
        check_int("data.row_group_rows", self.row_group_rows, 1)
        object.__setattr__(self, "too_long", enum_value("data.too_long", TooLong, self.too_long))
        folder = self.corpus.rstrip("/")
        if corpus_is_folder(self.corpus) and (self.output.rstrip("/") + "/").startswith(folder + "/"):
            fail("data.output", self.output, f"lies inside data.corpus = {self.corpus!r}, whose every Parquet file "
                 "is read as a shard (the run's own tables would be too): put the output elsewhere, or give the "
                 "corpus as a glob of its shards (e.g. 'shards/*.parquet')")


@dataclass(frozen=True)
class FactorConfig:
    sample_sequences: int | None = None
    sample_tokens: int | None = None
    fisher: Fisher = DEFAULT_FISHER  # measured steadiest across seeds at <= 2x the cost of one draw (README "Accuracy")
    fisher_samples: int = DEFAULT_DRAWS[DEFAULT_FISHER][0]  # topm 5: the 4 most probable labels + 1 tail draw
    lambda_samples: int = DEFAULT_DRAWS[DEFAULT_FISHER][1]  # 2: more help less than in stage 1 (README "Accuracy")
    fisher_passes: int | None = None  # stage 1's draws summed into this many backward passes; None: one per draw
    lambda_passes: int | None = None  # the same in stage 3 (cheaper, noisier: README "Accuracy")
    damping: float | None = None
    seed: int = 0
    blocks: int = 1
    unit_sequences: int = 256
    refit: str = "on_growth"
    refit_growth: float = 0.25

    def __post_init__(self) -> None:
        if self.sample_sequences is not None and self.sample_tokens is not None:
            fail("factors.sample_sequences / factors.sample_tokens",
                  (self.sample_sequences, self.sample_tokens), "give at most one of them")
        if self.sample_sequences is not None:
            check_int("factors.sample_sequences", self.sample_sequences, 1)
        if self.sample_tokens is not None:
            check_int("factors.sample_tokens", self.sample_tokens, 1)
        object.__setattr__(self, "fisher", enum_value("factors.fisher", Fisher, self.fisher))
        check_int("factors.fisher_samples", self.fisher_samples, 1)
        check_int("factors.lambda_samples", self.lambda_samples, 1)
        for key, draws in (("fisher_passes", self.fisher_samples), ("lambda_passes", self.lambda_samples)):
            passes = getattr(self, key)
            if passes is not None:
                check_int(f"factors.{key}", passes, 1)
                try:  # the library's rule (gaussian refuses fewer passes than draws)
                    effective_passes(self.fisher, draws, passes)
                except ValueError as e:
                    fail(f"factors.{key}", passes, str(e))
        if self.damping is not None:
            check_number("factors.damping", self.damping, 0.0)
        check_int("factors.seed", self.seed, 0)
        check_int("factors.blocks", self.blocks, 1)
        check_int("factors.unit_sequences", self.unit_sequences, 1)
        if self.refit not in REFIT:
            fail("factors.refit", self.refit, f"must be one of {list(REFIT)}")
        check_number("factors.refit_growth", self.refit_growth, 0.0)


@dataclass(frozen=True)
class ScoringConfig:
    top_k: int = 10
    rank: int | None = 32
    per_token: bool = True
    strategy: Strategy = Strategy.AUTO
    sort_window: int = 512
    normalize: Normalize = Normalize.NONE
    self_influence: bool = False
    query_precision: Precision = Precision.FLOAT32
    query_lowrank: LowRankMethod = LowRankMethod.RANDOMIZED
    query_batches_per_unit: int = 4
    unit_rows: int = 0
    mode: ScoringMode = ScoringMode.SCAN
    candidates: int = 100
    tfidf_candidates: int = 0

    def __post_init__(self) -> None:
        check_int("scoring.top_k", self.top_k, 1)
        if self.rank == 0:
            object.__setattr__(self, "rank", None)
        if self.rank is not None:
            check_int("scoring.rank", self.rank, 1)
        if not isinstance(self.per_token, bool):
            fail("scoring.per_token", self.per_token, "must be true or false")
        object.__setattr__(self, "strategy", enum_value("scoring.strategy", Strategy, self.strategy))
        check_int("scoring.sort_window", self.sort_window, 1)
        object.__setattr__(self, "normalize", enum_value("scoring.normalize", Normalize, self.normalize))
        if not isinstance(self.self_influence, bool):
            fail("scoring.self_influence", self.self_influence, "must be true or false")
        object.__setattr__(self, "query_precision", enum_value("scoring.query_precision", Precision, self.query_precision))
        object.__setattr__(self, "query_lowrank", enum_value("scoring.query_lowrank", LowRankMethod, self.query_lowrank))
        check_int("scoring.query_batches_per_unit", self.query_batches_per_unit, 1)
        check_int("scoring.unit_rows", self.unit_rows, 0)
        object.__setattr__(self, "mode", enum_value("scoring.mode", ScoringMode, self.mode))
        check_int("scoring.candidates", self.candidates, 1)
        check_int("scoring.tfidf_candidates", self.tfidf_candidates, 0)
        if self.tfidf_candidates and self.mode != ScoringMode.INDEX:
            also = (" (its candidates all come from TF-IDF: set scoring.candidates)"
                    if self.mode == ScoringMode.TFIDF else "")
            fail("scoring.tfidf_candidates", self.tfidf_candidates,
                 f'applies to scoring.mode = "index" only (TF-IDF\'s best added to the index\'s candidates); '
                 f'this job has scoring.mode = "{self.mode.value}"{also}')

    @property
    def writes_self_influence(self) -> bool:
        """Whether the score stage computes every sequence's self-influence (and writes self_influence/)."""
        return self.self_influence or self.normalize == Normalize.COSINE


@dataclass(frozen=True)
class IndexConfig:
    """The influence index: compressed gradients G~ = R_out G R_in^T of every sequence (stages/index_build.py)."""

    projection: ProjectionKind = ProjectionKind.EIGEN
    k_out: int = 16
    k_in: int = 16
    dtype: IndexDType = IndexDType.FLOAT16
    seed: int = 0
    search: IndexSearch = IndexSearch.SCAN
    faiss_memory_gb: float = 16.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", enum_value("index.projection", ProjectionKind, self.projection))
        check_int("index.k_out", self.k_out, 1)
        check_int("index.k_in", self.k_in, 1)
        object.__setattr__(self, "dtype", enum_value("index.dtype", IndexDType, self.dtype))
        check_int("index.seed", self.seed, 0)
        object.__setattr__(self, "search", enum_value("index.search", IndexSearch, self.search))
        check_number("index.faiss_memory_gb", self.faiss_memory_gb, 0.0)


@dataclass(frozen=True)
class ResourceConfig:
    ray_address: str = ""
    actors: int = 1
    gpus_per_actor: float | str = "auto"
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0
    batch_size: int = 8
    object_store_mb: int = 0
    actor_restarts: int = -1
    task_retries: int = -1
    pool: Pool | str = Pool.AUTO

    def __post_init__(self) -> None:
        if not isinstance(self.ray_address, str):
            fail("resources.ray_address", self.ray_address, "must be a string ('' = local Ray)")
        check_int("resources.actors", self.actors, 1)
        if self.gpus_per_actor != "auto":
            check_number("resources.gpus_per_actor", self.gpus_per_actor, 0.0)
        check_number("resources.cpus_per_actor", self.cpus_per_actor, 0.0)
        check_int("resources.threads_per_actor", self.threads_per_actor, 0)
        check_int("resources.batch_size", self.batch_size, 1)
        check_int("resources.object_store_mb", self.object_store_mb, 0)
        check_int("resources.actor_restarts", self.actor_restarts, -1)
        check_int("resources.task_retries", self.task_retries, -1)
        object.__setattr__(self, "pool", enum_value("resources.pool", Pool, self.pool))
