"""`exaone keys` and `exaone usage` through the real entry point, on SQLite and PostgreSQL."""
from __future__ import annotations

import csv
import hashlib
import io
from decimal import Decimal

import pytest

pytest.importorskip("sqlalchemy")
from exaone.cli import main  # noqa: E402
from exaone.server.ledger import Ledger, UsageRecord  # noqa: E402
from ledger_db import BACKENDS, fresh_url  # noqa: E402


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    return fresh_url(request.param, tmp_path)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_create_prints_the_secret_last_and_it_authenticates(capsys, db):
    rc, out, _ = run(capsys, "keys", "create", "alice", "--rpm", "60", "--tpm", "10000", "--budget", "2.5",
                     "--db", db)
    assert rc == 0
    lines = out.rstrip("\n").split("\n")
    secret = lines[-1]
    assert secret.startswith("sk-exa-") and secret.strip() == secret and len(lines) >= 2
    assert secret not in "\n".join(lines[:-1])  # shown once
    with Ledger(db) as ledger:
        key = ledger.authenticate(secret)
    assert key is not None and key.name == "alice"
    assert (key.rpm_limit, key.tpm_limit, key.budget_usd) == (60, 10000, Decimal("2.5"))


def test_list_never_shows_secrets_and_revoke_works(capsys, db):
    secrets_ = [run(capsys, "keys", "create", name, "--db", db)[1].rstrip("\n").split("\n")[-1]
                for name in ("alice", "bob")]
    with Ledger(db) as ledger:
        ledger.record(UsageRecord(1, "m", "r1", prompt_tokens=1_000_000, completion_tokens=0))
    rc, out, _ = run(capsys, "keys", "list", "--db", db)
    assert rc == 0
    assert "alice" in out and "bob" in out and "$0.2" in out
    for s in secrets_:
        assert s not in out and s[:13] in out  # the prefix, never the secret or its hash
        assert hashlib.sha256(s.encode()).hexdigest() not in out

    rc, out, _ = run(capsys, "keys", "revoke", secrets_[0][:13], "--db", db)
    assert rc == 0 and "revoked key 1 'alice'" in out
    with Ledger(db) as ledger:
        assert ledger.authenticate(secrets_[0]) is None
        assert ledger.authenticate(secrets_[1]) is not None
    rc, _, err = run(capsys, "keys", "revoke", "42", "--db", db)
    assert rc == 2 and "no API key" in err


def test_set_changes_limits(capsys, db):
    run(capsys, "keys", "create", "alice", "--rpm", "5", "--db", db)
    rc, out, _ = run(capsys, "keys", "set", "1", "--tpm", "900", "--budget", "3", "--db", db)
    assert rc == 0 and "rpm 5, tpm 900, budget $3" in out
    rc, out, _ = run(capsys, "keys", "set", "1", "--rpm", "none", "--budget", "NONE", "--db", db)
    assert rc == 0 and out.rstrip().endswith("tpm 900")
    rc, _, err = run(capsys, "keys", "set", "1", "--db", db)
    assert rc == 2 and "nothing to change" in err
    with pytest.raises(SystemExit):
        main(["keys", "set", "1", "--rpm", "0", "--db", db])


def test_db_from_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EXAONE_DB_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert run(capsys, "keys", "create", "carol")[0] == 0
    assert (tmp_path / "env.db").exists()
    assert "carol" in run(capsys, "keys", "list")[1]


def test_usage_csv_parses(capsys, db):
    with Ledger(db) as ledger:
        a, _ = ledger.create_key("alice")
        b, _ = ledger.create_key("bob")
        for i, (k, model) in enumerate([(a, "m1"), (a, "m1"), (a, "m2"), (b, "m1")]):
            ledger.record(UsageRecord(k.id, model, f"r{i}", prompt_tokens=1000 * (i + 1), cached_tokens=100,
                                      completion_tokens=7, reasoning_tokens=3))
        expected = {(r["key_name"], r["model"]): r for r in ledger.summary(group_by=("key", "model"))}
    rc, out, _ = run(capsys, "usage", "--db", db, "--format", "csv", "--by", "key,model")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["key_name"] for r in rows] == ["alice", "alice", "bob"]
    assert list(rows[0]) == ["key_id", "key_name", "model", "requests", "prompt_tokens", "cached_tokens",
                             "completion_tokens", "reasoning_tokens", "cost_usd"]
    for r in rows:
        e = expected[(r["key_name"], r["model"])]
        assert int(r["requests"]) == e["requests"] and int(r["prompt_tokens"]) == e["prompt_tokens"]
        assert Decimal(r["cost_usd"]) == e["cost_usd"]  # exact, not rounded for display

    rc, out, _ = run(capsys, "usage", "--db", db, "--format", "csv", "--by", "day", "--since", "2000-01-01")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert int(row["requests"]) == 4 and int(row["reasoning_tokens"]) == 12 and len(row["day"]) == 10
    rc, out, _ = run(capsys, "usage", "--db", db, "--format", "csv", "--since", "2999-01-01")
    assert rc == 0 and out.strip().count("\n") == 0  # header only


def test_usage_table(capsys, db):
    with Ledger(db) as ledger:
        k, _ = ledger.create_key("alice")
        ledger.record(UsageRecord(k.id, "exaone-4.0-1.2b", "r1", prompt_tokens=1234, completion_tokens=56))
        ledger.record(UsageRecord(k.id, "nano", "r2", prompt_tokens=1, completion_tokens=1))
    rc, out, _ = run(capsys, "usage", "--db", db)
    assert rc == 0 and "alice" in out and "exaone-4.0-1.2b" in out and "1,234" in out
    assert "total" in out and "1,235" in out  # a footer row with the sums
    rc, out, _ = run(capsys, "usage", "--db", db, "--since", "2999-01-01")
    assert rc == 0 and "no usage" in out


def test_usage_rejects_bad_arguments(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    for bad in (["--by", "week"], ["--since", "yesterday"], ["--format", "xml"]):
        with pytest.raises(SystemExit) as e:
            main(["usage", "--db", db, *bad])
        assert e.value.code == 2


def test_unreachable_ledgers_fail_in_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "keys", "list", "--db", f"sqlite:///{tmp_path / 'no' / 'such.db'}")
    assert rc == 2 and "no directory" in err and "Traceback" not in err
    pytest.importorskip("psycopg")
    rc, _, err = run(capsys, "usage", "--db", "postgresql://nobody:secret@127.0.0.1:1/nothing")
    assert rc == 1 and err.count("\n") == 1 and "secret" not in err  # the password stays hidden
