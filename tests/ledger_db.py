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
