"""The readers on one small run: enriched tables, `influence sql` (views, guard, README examples, interactive),
`show`, `report` and `ddl`, on local files and on an s3:// copy (moto)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from results_fixtures import HOSTILE

README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def ok(*args: str, input: str | None = None) -> str:
    result = cli(*args, input=input)
    assert result.exit_code == 0, result.output
    return result.output


def table(out: Path, name: str) -> list[dict]:
    return pads.dataset(str(out / name), partitioning="hive").to_table().to_pylist()


def all_scores(cfg) -> dict[str, dict[str, float]]:
    """Every sequence scored in this process: {query_id: {doc_id: raw score}}."""
    from influence_ops import collate, load_queries, score_batch
    from pipelines.io import storage
    from pipelines.io.model_loading import load_model
    from pipelines.io.shards import list_shards, read_rows

    m = load_model(cfg.model)
    queries = load_queries(storage.local_copy(storage.join(cfg.data.output, "queries")))
    out: dict[str, dict[str, float]] = {q: {} for q in queries.query_ids}
    for shard in list_shards(cfg.data.corpus):
        seqs = read_rows(shard, None, None)
        for doc, ids in zip(seqs.doc_ids, seqs.input_ids):
            s = score_batch(m.model, queries, collate([ids])).scores[:, 0]
            for q, qid in enumerate(queries.query_ids):
                out[qid][doc] = float(s[q])
    return out


def test_self_influence_table_is_every_sequence_against_the_engine(results_run):
    from influence_ops import collate, load_factors, load_queries, score_batch
    from pipelines.io import storage
    from pipelines.io.model_loading import load_model
    from pipelines.io.shards import list_shards, read_rows

    cfg, _, root = results_run
    m = load_model(cfg.model)
    out = cfg.data.output
    queries = load_queries(storage.local_copy(storage.join(out, "queries")))
    factors = load_factors(storage.local_copy(storage.join(out, "factors")), m.layers)
    rows = {r["doc_id"]: r for r in table(root / "out", "self_influence")}
    seen = 0
    for shard in list_shards(cfg.data.corpus):
        seqs = read_rows(shard, None, None)
        for doc, ids in zip(seqs.doc_ids, seqs.input_ids):
            want = float(score_batch(m.model, queries, collate([ids]), factors=factors).self_influence[0])
            assert rows[doc]["self_influence"] == pytest.approx(want, rel=1e-4)
            assert rows[doc]["tokens"] == len(ids) and rows[doc]["shard"] == shard
            seen += 1
    assert seen == len(rows) == 32 and all(r["self_influence"] > 0 for r in rows.values())


def test_tables_carry_text_tokens_layers_and_the_distribution(results_run):
    cfg, record, root = results_run
    out = Path(cfg.data.output)
    shards = {r["doc_id"]: r for r in pads.dataset(str(root / "shards")).to_table().to_pylist()}
    topk = table(out, "topk")
    assert {r["doc_id"] for r in topk} >= {f"{k}:0" for k in HOSTILE}  # 32 docs, top 20 + bottom 20: every doc is shown
    for r in topk:
        assert r["text"] == shards[r["doc_id"]]["text"] and r["tokens"] == len(shards[r["doc_id"]]["input_ids"])
    layers = table(out, "layer_scores")
    sums: dict[tuple[str, str], float] = {}
    for r in layers:
        sums[(r["query_id"], r["doc_id"])] = sums.get((r["query_id"], r["doc_id"]), 0.0) + r["score"]
        assert r["layer"].startswith("transformer.h.") and r["score_normalized"] * record["stages"][
            "build-queries"]["factor_tokens"] == pytest.approx(r["score"], rel=1e-12)
    assert {r["layer_index"] for r in layers} == {0, 1, 2, 3}
    for r in topk:
        assert sums[(r["query_id"], r["doc_id"])] == pytest.approx(r["score"], rel=1e-4, abs=1e-6)
    tokens = table(out, "token_scores")
    by_doc: dict[tuple[str, str], list] = {}
    for r in sorted(tokens, key=lambda r: r["token_index"]):
        by_doc.setdefault((r["query_id"], r["doc_id"]), []).append(r)
    for (qid, doc), rows in by_doc.items():  # a whitespace tokenizer: the token strings rebuild the text
        assert "".join(r["token"] for r in rows) == shards[doc]["text"]
        assert [r["token_id"] for r in rows] == list(shards[doc]["input_ids"])
    merge = record["stages"]["merge"]["details"]
    assert merge["max_relative_layer_sum_error"] < 1e-4 and merge["max_relative_sum_error"] < 1e-3

    # the histograms count every sequence, and their sums equal every score computed in this process
    dist = pads.dataset(str(out / "distribution")).to_table().to_pylist()
    for qid, scores in all_scores(cfg).items():
        rows = [r for r in dist if r["query_id"] == qid]
        assert sum(r["sequences"] for r in rows) == len(scores) == 32
        for sign, sel in (("positive", [s for s in scores.values() if s > 0]),
                          ("negative", [s for s in scores.values() if s < 0])):
            mine = [r for r in rows if r["sign"] == sign]
            assert sum(r["sequences"] for r in mine) == len(sel)
            assert sum(r["score_sum"] for r in mine) == pytest.approx(sum(sel), rel=1e-4)
            ft = record["stages"]["build-queries"]["factor_tokens"]
            for s in sel:  # each score falls in a bin of its sign whose bounds hold |s| / factor tokens
                assert any(r["bin_lower"] * (1 - 1e-6) <= abs(s) / ft <= r["bin_upper"] * (1 + 1e-6) for r in mine)


def readme_sql() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_sql_examples_run(results_run):
    cfg, _, _ = results_run
    blocks = readme_sql()
    assert len(blocks) >= 5
    outputs = []
    for sql in blocks:
        text = ok("sql", "--format", "jsonl", "--", cfg.data.output, sql)
        outputs.append([json.loads(line) for line in text.splitlines() if line.strip()])
    proponents, shared, concentration, by_layer, tokens, outliers = outputs[:6]
    assert len(proponents) == 9 and {r["query_id"] for r in proponents} == {"q-cat", "q-fish", "q-dog"}
    assert all(r["text"] for r in proponents)
    assert shared and all(r["queries"] >= 2 for r in shared)
    # 32 sequences: the top 1% is the top 1; its share checked against every score computed here
    scores = all_scores(cfg)
    for r in concentration:
        s = scores[r["query_id"]]
        want = max(max(s.values()), 0) / sum(v for v in s.values() if v > 0)
        assert r["sequences"] == 32 and r["top_1pct"] == 1 and r["exact"] is True
        assert r["share"] == pytest.approx(want, abs=1e-4)
    assert [r["layer"] for r in by_layer] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                                              "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert len(tokens) == 5 and all(isinstance(r["token"], str) for r in tokens)
    values = [r["self_influence"] for r in outliers]
    assert len(outliers) == 10 and values == sorted(values, reverse=True) and all(r["text"] for r in outliers)


@pytest.mark.parametrize("statement, word", [
    ("COPY (SELECT * FROM topk) TO '/tmp/stolen.csv'", "COPY"),
    ("ATTACH '/tmp/other.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("CREATE TABLE t AS SELECT * FROM topk", "CREATE"),
    ("INSERT INTO topk VALUES (1)", "INSERT"),
    ("SET enable_external_access = true", "SET"),
    ("SELECT 1; DROP VIEW topk", "2 statements"),
    ("SELECT 1; SELECT 2", "2 statements"),
])
def test_sql_refuses_anything_but_a_read(results_run, statement, word):
    cfg, _, _ = results_run
    result = cli("sql", cfg.data.output, statement)
    assert result.exit_code != 0 and word in result.output, result.output
    assert "read-only" in result.output or "one read-only SELECT" in result.output
    assert not Path("/tmp/stolen.csv").exists()


def test_sql_reads_only_the_run(results_run):
    cfg, _, _ = results_run
    result = cli("sql", cfg.data.output, "SELECT * FROM read_csv('/etc/passwd')")
    assert result.exit_code != 0 and "Permission Error" in result.output


def test_sql_table_output_and_views(results_run):
    cfg, _, _ = results_run
    text = ok("sql", cfg.data.output, "SELECT query_id, count(*) AS n FROM topk GROUP BY 1 ORDER BY 1")
    assert text.splitlines()[0].split() == ["query_id", "n"]
    assert "q-cat" in text and "(3 rows)" in text
    for view in ("topk", "scores", "token_scores", "layer_scores", "queries", "distribution", "self_influence",
                 "documents"):
        assert "(1 row)" in ok("sql", cfg.data.output, f"SELECT count(*) FROM {view}")
    docs = ok("sql", cfg.data.output, "SELECT text FROM documents WHERE doc_id = 'evil-script:0'", "--format", "csv")
    assert HOSTILE["evil-script"] in docs


def test_sql_interactive(results_run):
    cfg, _, _ = results_run
    session = ("SELECT count(*) AS n\nFROM topk;\n.tables\nCOPY topk TO 'x.csv';\n"
               "SELECT count(DISTINCT query_id) AS q FROM queries;\n.quit\n")
    result = cli("sql", cfg.data.output, input=session)
    assert result.exit_code == 0, result.output
    assert "views distribution, documents, layer_scores, queries, scores, self_influence, token_scores, topk" in result.output
    assert re.search(r"\n\s*120\n\(1 row\)", result.output)  # 3 queries x (20 top + 20 bottom)
    assert "topk: query_id VARCHAR, doc_id VARCHAR" in result.output
    assert "refused: a COPY statement" in result.output
    assert re.search(r"\n\s*3\n\(1 row\)", result.output)


def test_sql_error_names_the_views_or_the_columns(results_run):
    """A mistyped view lists the views (not DuckDB's guess among its system tables); a mistyped column keeps
    DuckDB's candidate columns; the echoed SQL is left out: one line each."""
    cfg, _, _ = results_run
    result = cli("sql", cfg.data.output, "SELECT * FROM topkk")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: query failed: Catalog Error: Table with name topkk does not exist!; the views: distribution, "
        "documents, layer_scores, queries, scores, self_influence, token_scores, topk"]
    result = cli("sql", cfg.data.output, "SELECT scor FROM topk")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Candidate bindings: " in lines[0] and '"score"' in lines[0]


def test_documents_view_carries_the_shards_metadata_columns(tmp_path):
    """Columns `tokenize` passed through (url, source, ...) are in `documents`, the token lists are not; shards
    with different extra columns are read by name."""
    import duckdb

    from pipelines.results.tables import _documents

    ids = pa.list_(pa.int32())
    pq.write_table(pa.table({"doc_id": ["a:0"], "input_ids": pa.array([[1, 2]], ids), "text": ["x y"],
                             "loss_mask": pa.array([[1, 1]], pa.list_(pa.int8())), "url": ["https://a"]}),
                   tmp_path / "s0.parquet")
    pq.write_table(pa.table({"doc_id": ["b:0"], "input_ids": pa.array([[3, 4]], ids), "text": ["z w"],
                             "url": ["https://b"], "year": [2021]}), tmp_path / "s1.parquet")
    view = _documents([str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")])
    con = duckdb.connect()
    cur = con.execute(f"SELECT * FROM {view} ORDER BY doc_id")
    assert [d[0] for d in cur.description] == ["doc_id", "text", "shard", "url", "year"]
    assert [(r[0], r[1], r[3], r[4]) for r in cur.fetchall()] == [("a:0", "x y", "https://a", None),
                                                                  ("b:0", "z w", "https://b", 2021)]
    pq.write_table(pa.table({"doc_id": ["c"], "input_ids": pa.array([[5, 6]], ids)}), tmp_path / "bare.parquet")
    cur = con.execute(f"SELECT * FROM {_documents([str(tmp_path / 'bare.parquet')])}")
    assert [d[0] for d in cur.description] == ["doc_id", "text", "shard"] and cur.fetchall()[0][1] is None


def test_documents_view_leaves_out_an_unreadable_shard_and_says_so(tmp_path, caplog):
    """A run with on_error = "skip" finishes without a broken shard; reading its results must not fail on it."""
    from pipelines.results.tables import Output, _documents, connect

    shards = tmp_path / "shards"
    shards.mkdir()
    ids = pa.list_(pa.int32())
    pq.write_table(pa.table({"doc_id": ["a", "b"], "input_ids": pa.array([[1, 2], [3, 4]], ids)}), shards / "good.parquet")
    (shards / "broken.parquet").write_bytes((shards / "good.parquet").read_bytes()[:100])
    out = Output(str(tmp_path), str(shards), {"documents": _documents(sorted(str(p) for p in shards.iterdir()))})
    with caplog.at_level("WARNING"):
        con = connect(out)
    assert con.execute("SELECT count(*) FROM documents").fetchone() == (2,)
    assert [r.getMessage() for r in caplog.records] == [
        f"documents: 1 unreadable shard left out (first: {shards / 'broken.parquet'})"]


def test_run_ends_with_the_view(results_run):
    """`influence run` (every stage already complete: all skipped) ends with the first queries and next steps."""
    cfg, _, root = results_run
    text = ok("run", str(root / "job.toml"), "-q")
    assert "merge" in text and "already complete, skipped" in text
    assert "query q-cat" in text and "top 3 proponents" in text and "next steps:" in text
    assert f"influence sql {cfg.data.output}" in text and f"influence report {cfg.data.output}" in text


def test_the_sql_the_next_steps_suggest_runs_and_lists_one_side(results_run):
    """The query printed under "next steps" runs as written and lists proponents only, in rank order."""
    import shlex

    from pipelines.results.show import next_steps

    cfg, _, _ = results_run
    line = next(step for step in next_steps(cfg.data.output) if "SELECT" in step)
    argv = shlex.split(line.split("#")[0])
    assert argv[:3] == ["influence", "sql", cfg.data.output]
    text = ok(*argv[1:])
    assert re.search(r"\(9 rows\)", text)  # 3 queries x ranks 1-3 of the top side
    ranks = [int(row.split()[1]) for row in text.splitlines() if row.startswith("q-")]
    assert ranks == [1, 2, 3] * 3
    scores = [float(row.split()[2]) for row in text.splitlines() if row.startswith("q-")]
    assert all(s > 0 for s in scores), text


def test_show(results_run):
    cfg, _, _ = results_run
    text = ok("show", cfg.data.output, "--k", "2", "--no-color")
    assert "normalized = influence /" in text and "+ = training on the sequence raises" in text
    for q in ("q-cat", "q-fish", "q-dog"):
        assert f"query {q}" in text
    assert "prompt:     'the cat'" in text and "completion: 'sits on the hill'" in text
    assert text.count("#1 ") == 3 and text.count("#2 ") == 3 and "#3 " not in text and "opponents" not in text
    assert "[[" in text  # highlighted tokens
    one = ok("show", cfg.data.output, "--query", "q-fish", "--bottom", "--k", "20", "--no-color")
    assert "query q-cat" not in one and "bottom 20 opponents" in one
    assert HOSTILE["evil-img"].split()[3] in one  # the hostile document is listed, as text
    colour = ok("show", cfg.data.output, "--query", "q-fish", "--k", "1", "--color")
    assert "\x1b[" in colour and "[[" not in colour
    bad = cli("show", cfg.data.output, "--query", "nope")
    assert bad.exit_code != 0 and "no query 'nope'" in bad.output


def ddl_columns(statement: str) -> tuple[str, dict[str, str]]:
    name = re.search(r"CREATE (?:EXTERNAL )?TABLE (?:\w+\.)?(\w+)", statement).group(1)
    body = statement[statement.index("(") + 1: statement.index("\n)")]
    cols = {}
    for line in body.strip().splitlines():
        col, typ = line.strip().rstrip(",").split(" ", 1)
        cols[col.strip("`")] = typ
    part = re.search(r"PARTITIONED BY \(`(\w+)` (\w+)\)", statement)
    if part:
        cols[part.group(1)] = part.group(2)
    return name, cols


TYPES = {"trino": {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "double": "DOUBLE",
                   "list<element: double>": "ARRAY(DOUBLE)", "list<element: int32>": "ARRAY(INTEGER)"},
         "spark": {"string": "STRING", "int32": "INT", "int64": "BIGINT", "double": "DOUBLE",
                   "list<element: double>": "ARRAY<DOUBLE>", "list<element: int32>": "ARRAY<INT>"},
         "athena": {"string": "string", "int32": "int", "int64": "bigint", "double": "double",
                    "list<element: double>": "array<double>", "list<element: int32>": "array<int>"}}


@pytest.mark.parametrize("engine", ["trino", "spark", "athena"])
def test_ddl_columns_and_types_match_the_parquet_schemas(results_run, engine):
    cfg, _, _ = results_run
    out = Path(cfg.data.output)
    text = ok("ddl", cfg.data.output, "--engine", engine)
    statements = [s.strip() for s in text.split(";") if "CREATE" in s]
    seen = set()
    for statement in statements:
        name, cols = ddl_columns(statement)
        seen.add(name)
        folder = Path(cfg.data.corpus) if name == "documents" else out / name  # documents: the corpus shards
        file = out / "queries" / "queries.parquet" if name == "queries" else next(folder.rglob("*.parquet"))
        schema = pq.read_schema(file)
        want = {f.name: TYPES[engine][str(f.type).replace("item", "element")] for f in schema}
        if name in ("topk", "token_scores", "layer_scores"):
            want["query_id"] = TYPES[engine]["string"]  # the hive partition column
            assert "query_id" in statement.split("(", 1)[1].rsplit("PARTITIONED", 1)[-1] or engine != "spark"
        assert cols == want, f"{engine} {name}"
        assert str(folder) in statement
    expected = {"topk", "scores", "token_scores", "layer_scores", "distribution", "self_influence", "documents"} | (
        {"queries"} if engine == "spark" else set())
    assert seen == expected
    if engine == "trino":
        assert "CALL system.sync_partition_metadata('influence', 'topk', 'ADD')" in text
    else:
        assert "MSCK REPAIR TABLE topk" in text


def test_report_local(results_run, tmp_path):
    cfg, _, _ = results_run
    target = tmp_path / "report.html"
    text = ok("report", cfg.data.output, "--out", str(target))
    assert str(target) in text
    html = target.read_text()
    assert "<script" not in html.lower() and "<img" not in html.lower() and not re.search(r"<[^>]*onerror", html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img" in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    for q in ("q-cat", "q-fish", "q-dog"):
        assert f'id="q-{q}"' in html
    assert html.count("<svg") >= 9  # per query: layers, distribution, truncation error
    assert "power law" in html and ("α = " in html or "No power-law fit" in html)
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing to fetch


def test_power_law_fit_recovers_a_known_exponent():
    import random

    from pipelines.results.report.tail_fit import fit_power_law

    rng = random.Random(0)
    alpha = 2.5
    xs = [(1 - rng.random()) ** (-1 / (alpha - 1)) for _ in range(4000)]  # Pareto, x_min = 1
    tail = sorted(xs, reverse=True)[:400]
    fit = fit_power_law(tail)
    assert fit.ok and abs(fit.alpha - alpha) < 3 * fit.stderr and fit.ks < 0.1
    few = fit_power_law([3.0, 2.0, 1.0])
    assert not few.ok and "3 positive scores" in few.reason


def test_readers_on_s3(results_s3, tmp_path):
    url = results_s3
    text = ok("sql", url, "SELECT count(*) AS n FROM topk WHERE query_id = 'q-dog'")
    assert re.search(r"\n\s*40\n", text)
    docs = ok("sql", url, "SELECT count(*) FROM documents")
    assert re.search(r"\n\s*32\n", docs)
    assert "refused" in cli("sql", url, "COPY topk TO 's3://influence-results/x.csv'").output
    assert "query q-cat" in ok("show", url, "--k", "1", "--no-color")
    athena = ok("ddl", url, "--engine", "athena")
    assert "LOCATION 's3://influence-results/out/topk/'" in athena
    assert "CREATE EXTERNAL TABLE documents" in athena and "LOCATION 's3://influence-results/shards/'" in athena
    assert "report: s3://influence-results/out/report.html" in ok("report", url)
    from pipelines.io import storage

    html = storage.read_bytes(f"{url}/report.html").decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "q-fish" in html


def test_layer_bars_name_their_unit_and_keep_tick_labels_short():
    from pipelines.results.report.figures import layer_bars

    small = layer_bars(["a", "b"], [6e-4, 2.1e-3], [-7e-4, -1.3e-3])
    assert "(x 1e-3)" in small and "0.0005" not in small and "0.0010" not in small
    plain = layer_bars(["a", "b"], [0.6, 2.1], [-0.7, -1.3])
    assert "(x 1e" not in plain


def test_rows_say_how_a_candidate_was_found():
    """Index / tfidf mode: a row's found_by shows in `show` and the report; a scanned row (or an older output
    without the column) shows nothing."""
    from pipelines.results.load import ResultRow
    from pipelines.results.report.page import row_card

    def row(found_by):
        return ResultRow("q", "top", 1, "d<1>", 2.0, 1.0, "s3://b/c/part-0.parquet", 5, "text", found_by)

    assert row("tfidf").found_note == ", found by tfidf" and row("index+tfidf").found_note == ", found by index+tfidf"
    assert row("scan").found_note == "" and row(None).found_note == ""
    assert "part-0.parquet · 5 tokens · raw 2 · found by index+tfidf</span>" in row_card(row("index+tfidf"), None,
                                                                                          1.0, 10)
    assert "found by" not in row_card(row("scan"), None, 1.0, 10) and "d&lt;1&gt;" in row_card(row(None), None, 1.0, 10)


def test_tail_leaves_out_scores_that_tie_with_a_shards_last_kept_score():
    """A shard keeps its top k; an unlisted sequence of it may score as much as its k-th. So only scores above
    the largest k-th score of any full shard are known exactly; the listed ones equal to it are counted apart."""
    import duckdb

    from pipelines.results.load import Run

    con = duckdb.connect()
    con.execute("CREATE TABLE scores (query_id VARCHAR, sign VARCHAR, doc_id VARCHAR, shard VARCHAR, "
                "score_normalized DOUBLE)")
    rows = [("a1", "a", 5.0), ("a2", "a", 2.0), ("a3", "a", 2.0), ("b1", "b", 4.0), ("b2", "b", 2.0),
            ("b3", "b", 1.0)]
    con.executemany("INSERT INTO scores VALUES ('q', 'top', ?, ?, ?)", rows)
    run = Run(None, con, config={"scoring": {"top_k": 3}})
    tail = run.tail("q")
    assert tail.threshold == 2.0 and tail.values == [5.0, 4.0] and tail.ties == 3
    run.config = {"scoring": {"top_k": 4}}  # no shard is full: every listed score is known exactly
    assert run.tail("q").values == [5.0, 4.0, 2.0, 2.0, 2.0, 1.0] and run.tail("q").ties == 0


def test_list_of_queries_shows_the_end_of_a_long_prompt():
    from pipelines.results.report.page import TOC_PROMPT, toc_prompt

    assert toc_prompt("Ada moved to") == "Ada moved to" and toc_prompt(None) == ""
    long = "Rome is old. " * 40 + "Ada moved to"
    shown = toc_prompt(long)
    assert len(shown) == TOC_PROMPT and shown.startswith("…") and shown.endswith("Ada moved to")


def test_ddl_documents_leaves_out_unmapped_columns_and_names_a_glob_corpus(tmp_path):
    """The documents table over a corpus folder keeps the columns the engine has a type for and names the rest in
    a comment; a corpus given as a glob (no folder to be a location) gets a comment, not a table."""
    from pipelines.results.ddl import Engine, create_statements

    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"doc_id": ["a:0"], "input_ids": [[1, 2]], "url": ["http://x"],
                             "meta": [{"lang": "en"}]},
                            schema=pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                                              ("url", pa.string()),
                                              ("meta", pa.struct([("lang", pa.string())]))])),
                   tmp_path / "shards" / "a.parquet")
    (tmp_path / "out").mkdir()
    config = {"data": {"corpus": str(tmp_path / "shards")}}
    (tmp_path / "out" / "resolved_config.json").write_text(json.dumps(config))
    statements = create_statements(str(tmp_path / "out"), Engine.ATHENA)
    assert statements[0] == "-- documents: left out, no athena type for: meta (struct<lang: string>)"
    name, cols = ddl_columns(statements[1])
    assert name == "documents" and cols == {"doc_id": "string", "input_ids": "array<int>", "url": "string"}
    assert f"LOCATION 'file://{tmp_path / 'shards'}/'" in statements[1]
    config["data"]["corpus"] = str(tmp_path / "shards" / "*.parquet")
    (tmp_path / "out" / "resolved_config.json").write_text(json.dumps(config))
    (only,) = create_statements(str(tmp_path / "out"), Engine.TRINO)
    assert only.startswith("-- documents: data.corpus = ") and "is a glob or a single file" in only
