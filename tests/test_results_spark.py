"""`influence ddl --engine spark` run for real: a local pyspark session (local[1]) creates the tables over the
readers' run and answers a query the same way DuckDB does."""

from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

from pipelines.cli import main


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("no Java runtime: pyspark needs one (Java 17+)")
    pyspark = pytest.importorskip("pyspark.sql")
    warehouse = tmp_path_factory.mktemp("spark")
    os.environ.setdefault("PYSPARK_PYTHON", "python3")
    session = (pyspark.SparkSession.builder.master("local[1]").appName("influence-ddl")
               .config("spark.driver.memory", "512m").config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "1").config("spark.sql.warehouse.dir", str(warehouse))
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_runs_the_ddl_and_a_query(results_run, spark):
    cfg, _, _ = results_run
    result = CliRunner().invoke(main, ["ddl", cfg.data.output, "--engine", "spark"])
    assert result.exit_code == 0, result.output
    statements = [s.strip() for s in result.output.split(";") if s.strip() and not s.strip().startswith("--")]
    for statement in statements:
        spark.sql(statement)
    got = spark.sql("SELECT query_id, doc_id, rank, tokens, text FROM topk WHERE sign = 'top' AND rank <= 3 "
                    "ORDER BY query_id, rank").collect()
    want = CliRunner().invoke(main, ["sql", cfg.data.output, "--format", "csv",
                                     "SELECT query_id, doc_id, rank, tokens, text FROM topk WHERE sign = 'top' "
                                     "AND rank <= 3 ORDER BY query_id, rank"])
    import csv
    import io

    rows = list(csv.reader(io.StringIO(want.output)))[1:]
    assert [[r.query_id, r.doc_id, str(r.rank), str(r.tokens), r.text] for r in got] == rows and len(rows) == 9
    layers = spark.sql("SELECT count(*) AS n, count(DISTINCT layer) AS l FROM layer_scores").collect()[0]
    assert layers.l == 4 and layers.n > 0
    total = spark.sql("SELECT sum(sequences) FROM distribution WHERE query_id = 'q-cat'").collect()[0][0]
    assert total == 32
    assert spark.sql("SELECT count(*) FROM queries").collect()[0][0] == 3
    tokens = spark.sql("SELECT count(*) FROM token_scores t JOIN topk k ON t.query_id = k.query_id "
                       "AND t.doc_id = k.doc_id WHERE k.sign = 'top' AND k.rank = 1").collect()[0][0]
    assert tokens > 0
    joined = spark.sql("SELECT count(*), count(d.doc_id), sum(CASE WHEN d.text = t.text THEN 1 ELSE 0 END) "
                       "FROM topk t LEFT JOIN documents d ON t.doc_id = d.doc_id").collect()[0]
    assert joined[0] == joined[1] == joined[2] > 0  # every result row finds its document, with the same text
