"""The metering ledger and pricing, on SQLite and (when EXAONE_TEST_PG_URL is set) PostgreSQL."""
from __future__ import annotations

import datetime as dt
import hashlib
import threading
from decimal import Decimal

import pytest

pytest.importorskip("sqlalchemy")
from sqlalchemy import text  # noqa: E402

from exaone.server.ledger import Ledger, UnknownKey, UsageRecord  # noqa: E402
from exaone.server.pricing import DEFAULT_PRICE, Price, Pricing  # noqa: E402
from ledger_db import BACKENDS, fresh_url  # noqa: E402

UTC = dt.timezone.utc
# Prices whose per-token costs have no exact binary float: sums through floats would drift.
ODD = Pricing({"exaone-4.0-32b": Price(prompt=Decimal("0.6"), cached=Decimal("0.033333"), completion=Decimal("1.1"))},
              default=Price(prompt=Decimal("0.1"), cached=Decimal("0.07"), completion=Decimal("0.3")))


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    return fresh_url(request.param, tmp_path)


@pytest.fixture
def ledger(url):
    with Ledger(url) as ledger:
        yield ledger


# ---- keys --------------------------------------------------------------------------------
def test_create_list_revoke_authenticate(ledger):
    alice, secret = ledger.create_key("alice", rpm_limit=10, tpm_limit=1000, budget_usd="2.5")
    bob, bob_secret = ledger.create_key("bob")
    assert secret.startswith("sk-exa-") and len(secret) == len("sk-exa-") + 32
    assert secret != bob_secret and secret.startswith(alice.prefix)
    assert (alice.name, alice.rpm_limit, alice.tpm_limit, alice.budget_usd) == ("alice", 10, 1000, Decimal("2.5"))
    assert alice.created_at.tzinfo is not None and not alice.revoked

    assert [k.name for k in ledger.list_keys()] == ["alice", "bob"]
    assert ledger.authenticate(secret) == alice
    assert ledger.authenticate(bob_secret).id == bob.id

    revoked = ledger.revoke_key(alice.prefix)  # by the prefix `keys list` shows
    assert revoked.id == alice.id and revoked.revoked
    assert ledger.authenticate(secret) is None
    assert ledger.authenticate(bob_secret) is not None
    again = ledger.revoke_key(str(alice.id))  # by id; revoking twice keeps the first time
    assert again.revoked_at == revoked.revoked_at
    assert [k.revoked for k in ledger.list_keys()] == [True, False]
    assert [k.name for k in ledger.list_keys(include_revoked=False)] == ["bob"]


def test_wrong_and_malformed_secrets_fail(ledger):
    _, secret = ledger.create_key("alice")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in (flipped, secret + "x", secret[:-1], "sk-exa-", "", None, secret.upper(), "Bearer " + secret):
        assert ledger.authenticate(bad) is None, bad


def test_only_the_hash_is_stored(ledger):
    key, secret = ledger.create_key("alice")
    with ledger.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM api_keys"))]
    assert len(rows) == 1
    assert rows[0]["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(v) for v in rows[0].values())
    assert not any(secret[len(key.prefix):] in str(v) for v in rows[0].values())  # not even the random tail


def test_update_limits(ledger):
    key, secret = ledger.create_key("alice", rpm_limit=10)
    updated = ledger.update_key(key.prefix, tpm_limit=5000, budget_usd="12.34")
    assert (updated.rpm_limit, updated.tpm_limit, updated.budget_usd) == (10, 5000, Decimal("12.34"))
    cleared = ledger.update_key(key.id, rpm_limit=None, budget_usd=None)
    assert (cleared.rpm_limit, cleared.tpm_limit, cleared.budget_usd) == (None, 5000, None)
    assert ledger.authenticate(secret) == cleared
    for bad in ({"rpm_limit": 0}, {"budget_usd": "-1"}, {"budget_usd": "0.0000001"}):
        with pytest.raises(ValueError):
            ledger.update_key(key.id, **bad)
    with pytest.raises(TypeError):
        ledger.update_key(key.id, name="mallory")


def test_unknown_keys(ledger):
    ledger.create_key("alice")
    with pytest.raises(UnknownKey):
        ledger.revoke_key("99")
    with pytest.raises(UnknownKey):
        ledger.revoke_key("sk-exa-nothere")
    with pytest.raises(ValueError):
        ledger.create_key("  ")
    with pytest.raises(ValueError):
        ledger.create_key("x", rpm_limit=0)
    with pytest.raises(ValueError):
        ledger.create_key("x" * 201)  # longer than the column, which PostgreSQL would enforce


# ---- usage -------------------------------------------------------------------------------
def test_record_writes_one_row_with_exact_cost(ledger):
    key, _ = ledger.create_key("alice")
    row = ledger.record(UsageRecord(key.id, "exaone-4.0-1.2b", "req-1", prompt_tokens=1000, cached_tokens=100,
                                    completion_tokens=200, reasoning_tokens=50, status="cancelled"))
    # 900 prompt x 0.20 + 100 cached x 0.05 + 200 completion (reasoning included) x 0.80, per million
    assert row.cost_usd == Decimal("0.000345")
    assert (row.price_prompt_per_m, row.price_cached_per_m, row.price_completion_per_m) == \
        (DEFAULT_PRICE.prompt, DEFAULT_PRICE.cached, DEFAULT_PRICE.completion)
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens, row.reasoning_tokens, row.status) == \
        (1000, 100, 200, 50, "cancelled")
    assert row.started_at.tzinfo is not None and row.finished_at >= row.started_at
    [stored] = ledger.usage()
    assert stored == row.as_dict()
    assert ledger.spent(key.id) == Decimal("0.000345")
    assert ledger.spent(key.id + 1) == 0


def test_record_is_idempotent_on_request_id(ledger):
    key, _ = ledger.create_key("alice")
    first = ledger.record(UsageRecord(key.id, "m", "req-1", prompt_tokens=10, completion_tokens=5))
    again = ledger.record(UsageRecord(key.id, "m", "req-1", prompt_tokens=99999, completion_tokens=99999))
    assert again == first
    assert len(ledger.usage()) == 1
    assert ledger.spent(key.id) == first.cost_usd


def test_prices_per_model_are_snapshotted(url):
    with Ledger(url, pricing=ODD) as ledger:
        key, _ = ledger.create_key("alice")
        big = ledger.record(UsageRecord(key.id, "exaone-4.0-32b", "a", prompt_tokens=7, cached_tokens=3,
                                        completion_tokens=11))
        other = ledger.record(UsageRecord(key.id, "other", "b", prompt_tokens=7, cached_tokens=3, completion_tokens=11))
    assert big.cost_usd == (4 * Decimal("0.6") + 3 * Decimal("0.033333") + 11 * Decimal("1.1")) / 10**6
    assert other.cost_usd == (4 * Decimal("0.1") + 3 * Decimal("0.07") + 11 * Decimal("0.3")) / 10**6
    with Ledger(url) as ledger:  # new prices later do not rewrite old rows
        assert [r["cost_usd"] for r in ledger.usage()] == [big.cost_usd, other.cost_usd]
        assert ledger.usage()[0]["price_cached_per_m"] == Decimal("0.033333")


def test_concurrent_records_sum_exactly(url):
    threads, per_thread = 8, 50
    with Ledger(url, pricing=ODD) as ledger:
        keys = [ledger.create_key(f"k{i}")[0] for i in range(2)]
        expected = Decimal(0)
        records = []
        for t in range(threads):
            batch = []
            for i in range(per_thread):
                r = UsageRecord(keys[t % 2].id, ["exaone-4.0-32b", "nano"][i % 2], f"t{t}-{i}",
                                prompt_tokens=100 + i, cached_tokens=i % 7, completion_tokens=3 * i + t,
                                reasoning_tokens=i)
                expected += ODD.cost(r.model, r.prompt_tokens, r.cached_tokens, r.completion_tokens)
                batch.append(r)
            # Every thread also races to record the same shared requests: each must bill once.
            batch += [UsageRecord(keys[0].id, "nano", f"shared-{j}", prompt_tokens=1000, completion_tokens=1)
                      for j in range(5)]
            records.append(batch)
        expected += 5 * ODD.cost("nano", 1000, 0, 1)
        errors = []

        def work(batch):
            try:
                for r in batch:
                    ledger.record(r)
            except Exception as e:  # surfaced below; a thread's exception would otherwise vanish
                errors.append(e)

        workers = [threading.Thread(target=work, args=(b,)) for b in records]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, errors
        [total] = ledger.summary(group_by=())
        assert total["requests"] == threads * per_thread + 5
        assert total["cost_usd"] == expected
        assert total["prompt_tokens"] == sum(100 + i for i in range(per_thread)) * threads + 5000
        assert ledger.spent(keys[0].id) + ledger.spent(keys[1].id) == expected
        assert sum(ledger.spent_by_key().values()) == expected
        assert ledger.audit_spent() == {}  # running totals == sums of usage rows
        assert sum(r["cost_usd"] for r in ledger.usage()) == expected


def test_processes_share_a_sqlite_ledger(tmp_path):
    """The server and `exaone keys`/`usage` run as separate processes on one SQLite file."""
    import multiprocessing
    from ledger_db import record_many
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with Ledger(url) as ledger:
        key, _ = ledger.create_key("alice")
    # fork: a fresh interpreter per child costs seconds; the children touch only SQLite.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=record_many, args=(url, key.id, f"p{j}", 30)) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    pricing = Pricing()
    expected = 2 * sum(pricing.cost("m", 100 + i, 0, i) for i in range(30)) + 10 * pricing.cost("m", 1, 0, 1)
    with Ledger(url) as ledger:
        assert len(ledger.usage()) == 2 * 30 + 10
        assert ledger.spent(key.id) == expected and ledger.audit_spent() == {}


def test_old_ledger_gains_running_totals(url):
    with Ledger(url) as ledger:
        key, _ = ledger.create_key("alice")
        row = ledger.record(UsageRecord(key.id, "m", "r1", prompt_tokens=10, completion_tokens=10))
        with ledger.engine.begin() as conn:  # back to the first schema, without api_keys.spent_usd
            conn.exec_driver_sql("ALTER TABLE api_keys DROP COLUMN spent_usd")
    with Ledger(url) as ledger:
        assert ledger.spent(key.id) == row.cost_usd and ledger.audit_spent() == {}
        with ledger.engine.begin() as conn:  # a usage row edited behind the ledger's back
            conn.exec_driver_sql("DELETE FROM usage")
        assert ledger.audit_spent() == {key.id: (row.cost_usd, 0)}


def test_summary_groups_and_filters(ledger):
    a, _ = ledger.create_key("alice")
    b, _ = ledger.create_key("bob")
    day1 = dt.datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    day2 = dt.datetime(2026, 3, 2, 0, 1, tzinfo=UTC)
    seoul = dt.timezone(dt.timedelta(hours=9))
    rows = [  # key, model, started, prompt, cached, completion, reasoning
        (a, "m1", day1, 100, 10, 20, 5),
        (a, "m1", day1, 200, 0, 30, 0),
        (a, "m2", day2, 300, 0, 40, 10),
        (b, "m1", day2.astimezone(seoul), 400, 100, 50, 0),  # stored and grouped as UTC
    ]
    for i, (k, m, t, p, c, o, r) in enumerate(rows):
        ledger.record(UsageRecord(k.id, m, f"r{i}", prompt_tokens=p, cached_tokens=c, completion_tokens=o,
                                  reasoning_tokens=r, started_at=t, finished_at=t + dt.timedelta(seconds=2)))

    full = ledger.summary()
    assert [(r["key_name"], r["model"], r["day"], r["requests"]) for r in full] == [
        ("alice", "m1", "2026-03-01", 2), ("alice", "m2", "2026-03-02", 1), ("bob", "m1", "2026-03-02", 1)]
    by_key = {r["key_id"]: r for r in ledger.summary(group_by=("key",))}
    assert by_key[a.id]["prompt_tokens"] == 600 and by_key[a.id]["reasoning_tokens"] == 15
    assert by_key[b.id]["cached_tokens"] == 100
    assert by_key[a.id]["cost_usd"] == ledger.spent(a.id)
    assert set(by_key[a.id]) == {"key_id", "key_name", "requests", "prompt_tokens", "cached_tokens",
                                 "completion_tokens", "reasoning_tokens", "cost_usd"}
    by_model = {r["model"]: r["requests"] for r in ledger.summary(group_by=["model"])}
    assert by_model == {"m1": 3, "m2": 1}
    by_day = {r["day"]: r["completion_tokens"] for r in ledger.summary(group_by=("day",))}
    assert by_day == {"2026-03-01": 50, "2026-03-02": 90}
    assert [r["requests"] for r in ledger.summary(group_by=("day",), since=dt.date(2026, 3, 2))] == [1 + 1]
    [total] = ledger.summary(group_by=())
    assert total["requests"] == 4 and total["cost_usd"] == sum(r["cost_usd"] for r in ledger.usage())
    with pytest.raises(ValueError):
        ledger.summary(group_by=("week",))

    assert [r["request_id"] for r in ledger.usage(key_id=a.id)] == ["r0", "r1", "r2"]
    assert [r["request_id"] for r in ledger.usage(since="2026-03-02")] == ["r2", "r3"]
    assert [r["request_id"] for r in ledger.usage(until=dt.date(2026, 3, 2))] == ["r0", "r1"]


def test_empty_ledger_summaries(ledger):
    assert ledger.summary() == []
    assert ledger.usage() == []
    [total] = ledger.summary(group_by=())
    assert total["requests"] == 0 and total["cost_usd"] == 0


def test_usage_record_validation():
    with pytest.raises(ValueError, match="cached_tokens"):
        UsageRecord(1, "m", "r", prompt_tokens=5, cached_tokens=6, completion_tokens=0)
    with pytest.raises(ValueError, match="reasoning_tokens"):
        UsageRecord(1, "m", "r", prompt_tokens=5, completion_tokens=1, reasoning_tokens=2)
    with pytest.raises(ValueError, match="status"):
        UsageRecord(1, "m", "r", prompt_tokens=5, completion_tokens=1, status="timeout")
    with pytest.raises(ValueError):
        UsageRecord(1, "m", "r", prompt_tokens=-1, completion_tokens=1)
    with pytest.raises(ValueError):
        UsageRecord(1, "m", "", prompt_tokens=1, completion_tokens=1)
    with pytest.raises(ValueError):
        UsageRecord(1, "m" * 201, "r", prompt_tokens=1, completion_tokens=1)


# ---- SQLite specifics --------------------------------------------------------------------
def test_default_url_is_exaone_db_in_cwd_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("EXAONE_DB_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    with Ledger() as ledger:
        ledger.create_key("alice")
        with ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    assert (tmp_path / "exaone.db").exists()
    monkeypatch.setenv("EXAONE_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    with Ledger() as ledger:
        assert ledger.list_keys() == []
    assert (tmp_path / "other.db").exists()


def test_sqlite_keeps_money_as_exact_integers(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'x.db'}", pricing=ODD) as ledger:
        key, _ = ledger.create_key("alice", budget_usd=Decimal("0.1"))
        ledger.record(UsageRecord(key.id, "nano", "r", prompt_tokens=3, cached_tokens=1, completion_tokens=1))
        with ledger.engine.connect() as conn:
            cost, ctype = conn.exec_driver_sql("SELECT cost_usd, typeof(cost_usd) FROM usage").one()
            budget = conn.exec_driver_sql("SELECT budget_usd FROM api_keys").scalar()
    # (2 x 0.1 + 1 x 0.07 + 1 x 0.3) USD per million = 0.00000057 USD = 570,000 units of 1e-12 USD
    assert ctype == "integer" and cost == 570_000
    assert budget == 100_000  # 1e-6 USD units


def test_postgres_url_forms_pick_psycopg():
    from exaone.server.ledger import normalize_url
    assert normalize_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


# ---- pricing -----------------------------------------------------------------------------
def test_pricing_cost_and_default():
    p = Pricing()
    assert p.price("anything") == DEFAULT_PRICE
    assert p.cost("m", 1_000_000, 0, 0) == Decimal("0.20")
    assert p.cost("m", 1_000_000, 1_000_000, 1_000_000) == Decimal("0.85")
    assert p.cost("m", 1, 0, 0) == Decimal("0.0000002")
    assert p.cost("m", 0, 0, 0) == 0
    with pytest.raises(ValueError):
        p.cost("m", 1, 2, 0)
    with pytest.raises(ValueError):
        Price(prompt="0.0000001", cached="0", completion="0")  # finer than the ledger keeps
    with pytest.raises(ValueError):
        Price(prompt="-1", cached="0", completion="0")


def test_pricing_from_json_and_toml(tmp_path):
    (tmp_path / "p.json").write_text('{"default": {"prompt": 0.1, "cached": 0.025, "completion": 0.4},'
                                     ' "models": {"big": {"prompt": 1.2, "completion": 4.8}}}')
    (tmp_path / "p.toml").write_text('[default]\nprompt = 0.1\ncached = 0.025\ncompletion = 0.4\n'
                                     '[models.big]\nprompt = 1.2\ncompletion = 4.8\n')
    for name in ("p.json", "p.toml"):
        p = Pricing.from_file(tmp_path / name)
        assert p.default == Price(Decimal("0.1"), Decimal("0.025"), Decimal("0.4"))
        assert p.price("big") == Price(Decimal("1.2"), Decimal("1.2"), Decimal("4.8"))  # cached defaults to prompt
        assert p.cost("big", 10, 0, 10) == Decimal("0.00006")
        assert Pricing.from_dict(p.to_dict()).models == p.models
    (tmp_path / "bad.json").write_text('{"default": {"prompt": 1}}')
    with pytest.raises(ValueError, match="completion"):
        Pricing.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError):
        Pricing.from_file(tmp_path / "p.yaml")
    with pytest.raises(FileNotFoundError):
        Pricing.from_file(tmp_path / "missing.json")
