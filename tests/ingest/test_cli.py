"""``eventcast outbox init|backlog`` against the real PostgreSQL."""

from __future__ import annotations

import json

import psycopg
import pytest

from eventcast.cli import main
from eventcast.ingest.helpers import outbox_publish
from tests.cli.clitools import assert_one_error_line

from .conftest import unique

pytestmark = pytest.mark.postgres


def test_init_then_backlog_per_partition(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    table = unique("cli_outbox")
    try:
        assert main(["outbox", "init", "--dsn", pg_dsn, "--table", table]) == 0
        assert main(["outbox", "init", "--dsn", pg_dsn, "--table", table]) == 0  # idempotent
        assert f"outbox table {table} is ready" in capsys.readouterr().out
        with psycopg.connect(pg_dsn) as conn, conn.transaction():
            for partition in (0, 0, 2):
                outbox_publish(conn, "orders:1", {"n": 1}, partition=partition, table=table)
        assert main(["outbox", "backlog", "--dsn", pg_dsn, "--table", table, "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(x["partition"], x["rows"]) for x in lines] == [(0, 2), (2, 1)]
        assert all(x["oldest_age"] >= 0 for x in lines)
        assert main(["outbox", "backlog", "--dsn", pg_dsn, "--table", table]) == 0
        assert "3 row(s) waiting" in capsys.readouterr().out
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            conn.execute(f'DROP FUNCTION IF EXISTS "{table}_notify"()')


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--table", "bad name"], 2),
        (["--table", "a.b.c"], 2),
    ],
)
def test_bad_table_names_are_usage_errors(
    pg_dsn: str, capsys: pytest.CaptureFixture[str], args: list[str], code: int
) -> None:
    assert main(["outbox", "init", "--dsn", pg_dsn, *args]) == code
    assert "invalid outbox table name" in assert_one_error_line(capsys.readouterr().err)


def test_unreachable_database_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = "postgresql://app:s3cret@127.0.0.1:1/shop"
    assert main(["outbox", "backlog", "--dsn", dsn]) == 1
    line = assert_one_error_line(capsys.readouterr().err)
    assert "could not connect" in line
    assert "s3cret" not in line


def test_missing_table_is_one_error_line(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outbox", "backlog", "--dsn", pg_dsn, "--table", unique("missing")]) == 1
    assert "does not exist" in assert_one_error_line(capsys.readouterr().err)
