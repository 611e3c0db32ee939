"""`index`: one pass over the corpus -> the compressed gradient of every sequence -> index/parts/ (one file per unit).

For every training sequence and tracked layer the index holds G~ = R_out G R_in^T
[k_out, k_in] (``influence_ops.index_projection``), all layers flattened into one
row of D = sum_l k_out k_in numbers. Queries against it are one matrix product
(``index_query.py``); candidates are then re-scored exactly (``rescore.py``).

Folders under ``<output>/index/``:
  - ``projection/``: the fixed projections R_out, R_in per layer (and Lambda~ of the factors they
    were made from), made once per model and ``[index]`` settings; their key does not depend on
    the factors, the corpus or the queries, so refitted factors keep the index (queries take Lambda~
    from the current factors: ``refit_preconditioner``).
  - ``parts/<unit name>.parquet``: one file per unit, the same units (row-group ranges of a shard,
    ``scoring.unit_rows``, named as ``score_plan.py`` names them: ``<shard name>`` or
    ``<shard name>.rg<lo>-<hi - 1>``), actors, resumability and ``on_error`` as ``score``
    (``score_plan.plan_ranges``, ``score.run_tasks``): a unit whose part carries the current key is
    skipped, so a re-run builds nothing and a new shard builds only its units; parts of no current
    unit are removed. Columns:
    doc_id string, shard string, tokens int32, vector fixed_size_list<D> of float16, float32 or int8
    (``index.dtype``), or of int16 holding the bfloat16 bits (the top half of a float32), scale
    float32: the row is vector x scale (float16 rows are stored divided by their largest |entry|,
    so that no entry overflows float16's range of 65504; int8 rows by that over 127, each entry
    rounded to an integer in [-127, 127]; scale is 1 for the other dtypes). int8 halves float16's
    bytes: on the random-weights GPT-2 at k = 192 (benchmarks/RESULTS.md section 7.5) it gave the same
    recall as float16.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from influence_ops import backward_pass, load_factors
from influence_ops.fingerprint import check_same_model
from influence_ops.index_projection import compress, load_projection, make_projection, save_projection
from influence_ops.fisher import Fisher
from influence_ops.objectives import LanguageModelObjective

from ..config import JobConfig, ModelConfig
from ..errors import UserError
from ..io import completion, storage
from ..io.model_loading import load_model, model_identity, pick_device
from ..io.shards import row_counts
from ..runtime.batching import prefetch
from ..runtime.ray_runtime import set_threads
from .score import ShardScorer, planned_summary, run_tasks
from .score_plan import GROUPS, KEY, ROWS, SEQUENCES, SHARD, Ranges, Unit, plan_ranges, stale_files

PARTS = "index/parts"
DTYPE_META = "influence.index_dtype"
INT8_LEVELS = 127  # int8 rows: entries in [-127, 127], scale = largest |entry| / 127
GROUP_BYTES = 32 * 2**20  # rows per row group of a part: this many bytes of them in float32, whatever the dtype


def index_url(cfg: JobConfig, *parts: str) -> str:
    return storage.join(cfg.data.output, "index", *parts)


def projection_key(cfg: JobConfig) -> str:
    """Model and [index] settings only: not the factors, corpus or queries."""
    return completion.inputs_key("index-projection", cfg.model.__dict__, model_identity(cfg.model),
                                 cfg.index.projection.value, cfg.index.k_out, cfg.index.k_in, cfg.index.seed)


def ensure_projection(cfg: JobConfig) -> dict[str, Any]:
    """Make ``index/projection/`` from the fitted factors unless it is complete for this model and settings."""
    folder = index_url(cfg, "projection")
    key = projection_key(cfg)
    done = completion.completed(folder, key)
    if done is not None:
        return {**done, "skipped": True}
    factors = load_factors(storage.local_copy(storage.join(cfg.data.output, "factors")))
    proj = make_projection(factors, cfg.index.projection, cfg.index.k_out, cfg.index.k_in, cfg.index.seed,
                           cfg.factors.damping)
    storage.remove(folder)
    with tempfile.TemporaryDirectory() as tmp:
        save_projection(proj, tmp)
        storage.upload_dir(tmp, folder, last=("projection.json",))
    info = {"width": proj.width, "kind": proj.kind.value, "layers": len(proj.layers)}
    info["digest"] = storage.dir_digest(folder)
    return {**completion.mark_complete(folder, key, info), "skipped": False}


def to_arrow(rows: torch.Tensor, dtype: str) -> pa.Array:
    """[N, D] -> fixed_size_list<D> column in the storage dtype (bfloat16 as the int16 top half of float32)."""
    x = rows.detach().to("cpu", torch.float32)
    if dtype == "bfloat16":
        flat = pa.array(x.to(torch.bfloat16).view(torch.int16).numpy().reshape(-1), pa.int16())
    elif dtype == "int8":  # rows already divided by their scale (encode_rows): round to the nearest level
        flat = pa.array(torch.round(x).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8).numpy().reshape(-1), pa.int8())
    elif dtype == "float16":
        flat = pa.array(x.numpy().astype(np.float16).reshape(-1), pa.float16())
    else:
        flat = pa.array(x.numpy().reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, int(x.shape[1]))


def encode_rows(rows: torch.Tensor, dtype: str) -> tuple[pa.Array, pa.Array]:
    """[N, D] -> (vector column, scale column): float16 rows divided by their largest |entry|, int8 rows by
    that over INT8_LEVELS (each entry then rounds to one of 255 levels; error at most scale / 2)."""
    x = rows.detach().to("cpu", torch.float64)
    largest = x.abs().amax(dim=1).clamp_min(1e-300) if x.numel() else torch.ones(x.shape[0])
    scale = {"float16": largest, "int8": largest / INT8_LEVELS}.get(dtype, torch.ones(x.shape[0], dtype=x.dtype))
    return to_arrow(x / scale[:, None], dtype), pa.array(scale.numpy().astype(np.float32), pa.float32())


def decode_rows(table: pa.Table, dtype: str) -> np.ndarray:
    """The rows of a part as [N, D] float32 (vector x scale)."""
    return from_arrow(table.column("vector"), dtype) * table.column("scale").to_numpy()[:, None]


def from_arrow(column: pa.ChunkedArray | pa.Array, dtype: str) -> np.ndarray:
    """The vector column as [N, D] float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if dtype == "bfloat16":
        flat = (flat.astype(np.int16).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return flat.astype(np.float32, copy=False).reshape(-1, width)


class IndexBuilder(ShardScorer):
    """Ray Data callable (units as ``ShardScorer``): one unit -> its index part file.

    Reuses ``ShardScorer``'s unit loop, failure handling and shard reading; holds the
    model and the projection instead of the queries.
    """

    def __init__(self, model: ModelConfig, projection_url: str, dtype: str, batch_size: int, sort_window: int,
                 threads: int = 0, use_gpu: bool = False, too_long: str = "error") -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        proj = load_projection(storage.local_copy(projection_url))
        try:
            check_same_model(self.m.layers, list(proj.layers), proj.fingerprint, "the index projection", "made for")
        except ValueError as err:
            raise UserError(f"{projection_url}: {err}; remove the index folder to rebuild it") from err
        compute = torch.float64 if next(self.m.model.parameters()).dtype == torch.float64 else torch.float32
        self.proj = proj.to(self.m.device, compute)
        self.dtype, self.batch_size, self.sort_window, self.too_long = dtype, batch_size, sort_window, too_long
        self.objective = LanguageModelObjective()

    def score_unit(self, unit: dict[str, Any]) -> tuple[int, int, int]:
        """Compress every sequence of the unit and write its part; returns (sequences, tokens, rows of the unit).

        The part is written as it is made: row groups of ``GROUP_BYTES`` of float32 vectors go to a local file,
        which is then copied to the output (``storage.write_file``), so memory holds one row group, not the
        unit's N x D rows."""
        groups = None if unit.get("groups") is None else tuple(unit["groups"])
        self.rows_read, tokens = 0, 0
        rows = row_counts([unit["shard"]])[0] if groups is None else int(unit["rows"])
        width = self.proj.width
        per_group = max(1, GROUP_BYTES // max(1, 4 * width))
        with tempfile.TemporaryDirectory(prefix="influence-index-") as tmp:
            local = f"{tmp}/part.parquet"
            part_file = PartWriter(local, unit["shard"], width, self.dtype, per_group)
            for part, batch in prefetch(self.batches(unit["shard"], groups)):
                out = backward_pass(self.m.model, self.m.layers, self.objective, batch, Fisher.EMPIRICAL, None,
                                    self.m.autocast)
                part_file.add([str(d) for d in part.doc_ids], part.lengths.tolist(),
                              compress(self.proj, out.captured.activations, out.captured.output_grads).cpu())
                tokens += int(part.lengths.sum())
            part_file.close({KEY: unit["key"], SHARD: unit["shard"], GROUPS: json.dumps(unit.get("groups")),
                             ROWS: str(rows), SEQUENCES: str(self.rows_read), DTYPE_META: self.dtype})
            storage.write_file(unit["output"], local)
        return self.rows_read, tokens, rows


class PartWriter:
    """An index part written a row group at a time: ``add`` rows as they are compressed, ``close`` with the footer's
    metadata. Rows are encoded per row (``encode_rows``), so encoding in groups gives the same part as encoding
    all rows at once."""

    def __init__(self, path: str, shard: str, width: int, dtype: str, group_rows: int) -> None:
        import pyarrow.parquet as pq

        self.shard, self.dtype, self.group_rows = shard, dtype, group_rows
        vector, scale = encode_rows(torch.zeros(0, width), dtype)
        self.schema = pa.schema([("doc_id", pa.string()), ("shard", pa.string()), ("tokens", pa.int32()),
                                 ("vector", vector.type), ("scale", scale.type)])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.ids: list[str] = []
        self.lengths: list[int] = []
        self.vectors: list[torch.Tensor] = []

    def add(self, ids: list[str], lengths: list[int], vectors: torch.Tensor) -> None:
        self.ids += ids
        self.lengths += lengths
        self.vectors.append(vectors)
        if len(self.ids) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.ids:
            return
        vector, scale = encode_rows(torch.cat(self.vectors), self.dtype)
        self.writer.write_table(pa.table({"doc_id": pa.array(self.ids, pa.string()),
                                          "shard": pa.array([self.shard] * len(self.ids), pa.string()),
                                          "tokens": pa.array(self.lengths, pa.int32()), "vector": vector,
                                          "scale": scale}, schema=self.schema))
        self.ids, self.lengths, self.vectors = [], [], []

    def close(self, metadata: dict[str, str]) -> None:
        self._flush()
        self.writer.add_key_value_metadata(metadata)
        self.writer.close()


def part_key(projection_digest: str, fingerprint: tuple[str, int], groups: tuple[int, int] | None, too_long: str,
             dtype: str) -> str:
    return completion.inputs_key("index-part", projection_digest, fingerprint, groups, too_long, dtype)


def plan_parts(cfg: JobConfig, projection_digest: str) -> Ranges:
    """The units of the corpus, each with its current part (``Unit.files``: none when it must be built)."""
    too_long, dtype = cfg.data.too_long.value, cfg.index.dtype.value
    r = plan_ranges(cfg, index_url(cfg, "parts"),
                    lambda fingerprint, groups: part_key(projection_digest, fingerprint, groups, too_long, dtype))
    for unit in r.units:  # one part per unit, the file named by it (a copy under another name is stale)
        unit.files = [f for f in unit.files if f.rsplit("/", 1)[-1] == f"{unit.name}.parquet"]
        if unit.files:
            footer = r.footers[unit.files[0]]
            unit.done_rows, unit.done_sequences = footer["rows"], footer["sequences"]
    return r


def current_parts(cfg: JobConfig) -> list[str]:
    """The index parts of the corpus's units, each checked to be current for this projection and settings.

    Raises UserError when the projection or a unit's part is missing, or a part is stale (unless
    ``on_error = "skip"`` left out a failed unit's part: then only parts present are returned, and at
    least one must be).
    """
    projection = completion.completed(index_url(cfg, "projection"), projection_key(cfg))
    if projection is None:
        raise UserError(f"{index_url(cfg, 'projection')} is missing or made with other settings: "
                        "run `influence index` first")
    r = plan_parts(cfg, projection["digest"])
    present = [f for u in r.units for f in u.files]
    missing = [part_url(cfg, u) for u in r.units if not u.files]
    stale = stale_files(index_url(cfg, "parts"), r.units)
    if stale or (missing and cfg.on_error != "skip") or not present:
        bad = stale + missing
        raise UserError(f"{len(bad) or len(r.units)} index parts are missing or stale ({len(r.units)} units), e.g. "
                        f"{(bad or missing or [index_url(cfg, 'parts')])[0]}: run `influence index` first")
    return present


def build_index(cfg: JobConfig, show_progress: bool = False) -> dict[str, Any]:
    """The projection (when missing), then every unit whose part is not current; counts, timings and bytes.

    Parts of no current unit (another projection or dtype, a removed shard, older units) are removed first.
    """
    start = time.perf_counter()
    projection = ensure_projection(cfg)
    r = plan_parts(cfg, projection["digest"])
    removed = stale_files(index_url(cfg, "parts"), r.units)
    for url in removed:
        storage.remove(url)
    todo = [u for u in r.units if not u.files]
    summary, rows = planned_summary(r.units, todo, r.unit_rows)
    summary["stale_files_removed"] = len(removed)

    def args_of(use_gpu: bool) -> dict[str, Any]:
        return {"model": cfg.model, "projection_url": index_url(cfg, "projection"), "dtype": cfg.index.dtype.value,
                "batch_size": cfg.resources.batch_size, "sort_window": cfg.scoring.sort_window,
                "threads": cfg.resources.threads_per_actor, "use_gpu": use_gpu, "too_long": cfg.data.too_long.value}

    tasks = [u.range_task(part_url(cfg, u)) for u in todo]
    done = [f for u in r.units for f in u.files]
    summary = run_tasks(cfg, "index", IndexBuilder, args_of, tasks, summary, rows, done, start, show_progress)
    current = {u.rsplit("/", 1)[-1] for u in summary["outputs"]}
    stored = sum(n for name, n in storage.file_sizes(index_url(cfg, "parts")).items() if name in current)
    sequences = summary["rows"]["scored"]
    itemsize = cfg.index.dtype.itemsize
    summary["index"] = {"width": projection["width"], "projection": projection["kind"],
                        "projection_skipped": projection["skipped"], "dtype": cfg.index.dtype.value,
                        "vector_bytes_per_sequence": projection["width"] * itemsize,
                        "stored_bytes": stored,
                        "stored_bytes_per_sequence": round(stored / sequences, 1) if sequences else None}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def part_url(cfg: JobConfig, unit: Unit) -> str:
    """``<output>/index/parts/<unit name>.parquet``."""
    return storage.join(index_url(cfg, "parts"), f"{unit.name}.parquet")
