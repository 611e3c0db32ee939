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
    fisher_samples = 3                  # label draws (or probes) per position in stage 1 (one forward, k backward)
    lambda_samples = 3                  # the same in stage 3 (Lambda, the noisier estimate); see README "Accuracy"
    damping = 0.001                     # absolute; omit for 0.1 x mean(Lambda) per layer
    seed = 0
    blocks = 1
    unit_sequences = 256                # sequences per unit of work (label draws are seeded per sequence)
    refit = "on_growth"                 # on_growth: keep the factors while the corpus only grows (every
                                        # fitted shard unchanged) by at most refit_growth of its bytes |
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

Every value is checked when the config is built; errors name the key and the value.
``influence validate job.toml`` checks the rest before anything runs (``pipelines/validate/``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_ops import Fisher, LowRankMethod, Normalize, Precision, Strategy, Track
from influence_ops.index_projection import ProjectionKind

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


VERBOSE_ENV = "INFLUENCE_VERBOSE"  # "1" (set by `influence --verbose`): Ray's and transformers' messages shown
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # "org/model"


class ConfigError(ValueError):
    """A bad job file: the message names the key and the value."""


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


class IndexSearch(str, enum.Enum):
    """How queries search the index: every part scored on actors, or the whole index in memory with FAISS."""

    SCAN = "scan"
    FAISS = "faiss"


class TooLong(str, enum.Enum):
    """What a shard sequence longer than the model's context becomes."""

    ERROR = "error"
    TRUNCATE = "truncate"
    CHUNK = "chunk"


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key} = {value!r}: {why}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"must be an integer >= {minimum}")


def _check_number(key: str, value: Any, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        _fail(key, value, f"must be a number >= {minimum}")


def _check_str(key: str, value: Any, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        _fail(key, value, "must be a non-empty string")


def _enum(key: str, cls: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        _fail(key, value, f"must be one of {[m.value for m in cls]}")


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
            _fail("model.path / model.factory", (self.path, self.factory), "give exactly one of them")
        _check_str("model.path", self.path)
        _check_str("model.tokenizer", self.tokenizer)
        _check_str("model.layer_pattern", self.layer_pattern)
        object.__setattr__(self, "track", _enum("model.track", Track, self.track))
        if self.layer_pattern is not None and self.track != Track.MLP:
            _fail("model.track", self.track.value, "give model.layer_pattern or model.track, not both")
        if self.factory is not None:
            _check_str("model.factory", self.factory)
            module, _, attr = self.factory.partition(":")
            if not module or not attr:
                _fail("model.factory", self.factory, "must look like 'package.module:function'")
        object.__setattr__(self, "dtype", _enum("model.dtype", DType, self.dtype))
        if self.max_length is not None:
            _check_int("model.max_length", self.max_length, 2)
        if not isinstance(self.trust_remote_code, bool):
            _fail("model.trust_remote_code", self.trust_remote_code, "must be true or false")

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
            _check_str(f"data.{key}", getattr(self, key), required=True)
        for key in ("raw", "text_column", "id_column"):
            _check_str(f"data.{key}", getattr(self, key))
        _check_int("data.row_group_rows", self.row_group_rows, 1)
        object.__setattr__(self, "too_long", _enum("data.too_long", TooLong, self.too_long))


@dataclass(frozen=True)
class FactorConfig:
    sample_sequences: int | None = None
    sample_tokens: int | None = None
    fisher: Fisher = Fisher.TOPM  # measured steadiest across seeds at <= 2x the cost of one draw (README "Accuracy")
    fisher_samples: int = 3  # topm: the 2 most probable labels enumerated + 1 tail draw
    lambda_samples: int = 3
    damping: float | None = None
    seed: int = 0
    blocks: int = 1
    unit_sequences: int = 256
    refit: str = "on_growth"
    refit_growth: float = 0.25

    def __post_init__(self) -> None:
        if self.sample_sequences is not None and self.sample_tokens is not None:
            _fail("factors.sample_sequences / factors.sample_tokens",
                  (self.sample_sequences, self.sample_tokens), "give at most one of them")
        if self.sample_sequences is not None:
            _check_int("factors.sample_sequences", self.sample_sequences, 1)
        if self.sample_tokens is not None:
            _check_int("factors.sample_tokens", self.sample_tokens, 1)
        object.__setattr__(self, "fisher", _enum("factors.fisher", Fisher, self.fisher))
        _check_int("factors.fisher_samples", self.fisher_samples, 1)
        _check_int("factors.lambda_samples", self.lambda_samples, 1)
        if self.damping is not None:
            _check_number("factors.damping", self.damping, 0.0)
        _check_int("factors.seed", self.seed, 0)
        _check_int("factors.blocks", self.blocks, 1)
        _check_int("factors.unit_sequences", self.unit_sequences, 1)
        if self.refit not in REFIT:
            _fail("factors.refit", self.refit, f"must be one of {list(REFIT)}")
        _check_number("factors.refit_growth", self.refit_growth, 0.0)


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

    def __post_init__(self) -> None:
        _check_int("scoring.top_k", self.top_k, 1)
        if self.rank == 0:
            object.__setattr__(self, "rank", None)
        if self.rank is not None:
            _check_int("scoring.rank", self.rank, 1)
        if not isinstance(self.per_token, bool):
            _fail("scoring.per_token", self.per_token, "must be true or false")
        object.__setattr__(self, "strategy", _enum("scoring.strategy", Strategy, self.strategy))
        _check_int("scoring.sort_window", self.sort_window, 1)
        object.__setattr__(self, "normalize", _enum("scoring.normalize", Normalize, self.normalize))
        if not isinstance(self.self_influence, bool):
            _fail("scoring.self_influence", self.self_influence, "must be true or false")
        object.__setattr__(self, "query_precision", _enum("scoring.query_precision", Precision, self.query_precision))
        object.__setattr__(self, "query_lowrank", _enum("scoring.query_lowrank", LowRankMethod, self.query_lowrank))
        _check_int("scoring.query_batches_per_unit", self.query_batches_per_unit, 1)
        _check_int("scoring.unit_rows", self.unit_rows, 0)
        object.__setattr__(self, "mode", _enum("scoring.mode", ScoringMode, self.mode))
        _check_int("scoring.candidates", self.candidates, 1)

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", _enum("index.projection", ProjectionKind, self.projection))
        _check_int("index.k_out", self.k_out, 1)
        _check_int("index.k_in", self.k_in, 1)
        object.__setattr__(self, "dtype", _enum("index.dtype", IndexDType, self.dtype))
        _check_int("index.seed", self.seed, 0)
        object.__setattr__(self, "search", _enum("index.search", IndexSearch, self.search))


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

    def __post_init__(self) -> None:
        if not isinstance(self.ray_address, str):
            _fail("resources.ray_address", self.ray_address, "must be a string ('' = local Ray)")
        _check_int("resources.actors", self.actors, 1)
        if self.gpus_per_actor != "auto":
            _check_number("resources.gpus_per_actor", self.gpus_per_actor, 0.0)
        _check_number("resources.cpus_per_actor", self.cpus_per_actor, 0.0)
        _check_int("resources.threads_per_actor", self.threads_per_actor, 0)
        _check_int("resources.batch_size", self.batch_size, 1)
        _check_int("resources.object_store_mb", self.object_store_mb, 0)
        _check_int("resources.actor_restarts", self.actor_restarts, -1)
        _check_int("resources.task_retries", self.task_retries, -1)


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig
    data: DataConfig
    factors: FactorConfig = field(default_factory=FactorConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    run_id: str | None = None
    on_error: str = "fail"

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            _fail("on_error", self.on_error, f"must be one of {list(ON_ERROR)}")
        if self.run_id is not None:
            _check_str("run_id", self.run_id)
            if not all(c.isalnum() or c in "-_." for c in self.run_id):
                _fail("run_id", self.run_id, "may hold only letters, digits, '-', '_' and '.'")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values)."""
        def plain(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


ON_ERROR = ("fail", "skip")
REFIT = ("on_growth", "on_corpus_change", "on_settings_change")
TOP_LEVEL = ("run_id", "on_error")
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "factors": FactorConfig,
             "scoring": ScoringConfig, "index": IndexConfig, "resources": ResourceConfig}


def _section(name: str, raw: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        _fail(name, raw, "must be a table ([" + name + "])")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        _fail(f"{name}.{unknown[0]}", raw[unknown[0]], f"unknown key; known keys: {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in raw]
    if missing:
        raise ConfigError(f"{name}.{missing[0]} is missing: [{name}] needs {', '.join(required)}")
    return cls(**raw)


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> JobConfig:
    """Build and validate a JobConfig; relative local paths are resolved against ``base_dir``."""
    unknown = sorted(set(raw) - set(_SECTIONS) - set(TOP_LEVEL))
    if unknown:
        _fail(unknown[0], raw[unknown[0]], f"unknown key; known: {sorted(_SECTIONS) + list(TOP_LEVEL)}")
    for required in ("model", "data"):
        if required not in raw:
            raise ConfigError(f"[{required}] section is missing")
    parts = {name: _section(name, raw[name]) for name in _SECTIONS if name in raw}
    if base_dir is not None:
        parts["data"] = dataclasses.replace(parts["data"], **{
            k: _resolve(getattr(parts["data"], k), base_dir) for k in ("corpus", "queries", "output", "raw")})
        parts["model"] = dataclasses.replace(parts["model"], path=_resolve_model(parts["model"].path, base_dir),
                                             tokenizer=_resolve_model(parts["model"].tokenizer, base_dir))
    return JobConfig(**{k: raw[k] for k in TOP_LEVEL if k in raw}, **parts)


def _resolve(url: str | None, base_dir: Path) -> str | None:
    if url is None or "://" in url or Path(url).is_absolute():
        return url
    return str((base_dir / url).resolve())


def _resolve_model(url: str | None, base_dir: Path) -> str | None:
    """Like ``_resolve``, but ``org/model`` with no such folder next to the job file stays a Hub name."""
    resolved = _resolve(url, base_dir)
    if url is not None and resolved != url and not Path(resolved).exists() and HUB_NAME.match(url):
        return url
    return resolved


def load_config(path: str | Path) -> JobConfig:
    """Read a TOML job file (relative paths are relative to the file's folder)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from err
    return config_from_dict(raw, base_dir=p.resolve().parent)
