"""Ledger databases for the metering tests: SQLite always, PostgreSQL when EXAONE_TEST_PG_URL is
set (`.ci/postgres.sh` starts one and prints the URL). Each test gets empty tables: the
PostgreSQL tests DROP the ledger tables of that database, so point it at a throwaway one."""
from __future__ import annotations

import os

import pytest

PG_URL = os.environ.get("EXAONE_TEST_PG_URL")
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="PostgreSQL variant: set EXAONE_TEST_PG_URL (e.g. from `.ci/postgres.sh`)")),
]


def fresh_url(backend: str, tmp_path) -> str:
    """A URL whose ledger tables are empty. PostgreSQL tests share one database, so its tables are
    dropped and re-created: run them serially."""
    pytest.importorskip("sqlalchemy")
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    from exaone.server.ledger import Base, make_engine, normalize_url
    engine = make_engine(normalize_url(PG_URL))
    try:
        Base.metadata.drop_all(engine)
    finally:
        engine.dispose()
    return PG_URL


def record_many(url: str, key_id: int, prefix: str, n: int) -> None:
    """Child-process body for the multi-process test (module level, so it pickles for `spawn`)."""
    from exaone.server.ledger import Ledger, UsageRecord
    with Ledger(url) as ledger:
        for i in range(n):
            ledger.record(UsageRecord(key_id, "m", f"{prefix}-{i}", prompt_tokens=100 + i, completion_tokens=i))
            ledger.record(UsageRecord(key_id, "m", f"shared-{i % 10}", prompt_tokens=1, completion_tokens=1))
