"""The metering ledger: API keys (stored hashed) and one usage row per request, in SQL.

SQLite file by default (`exaone.db` in the working directory, or `$EXAONE_DB_URL`), PostgreSQL
by URL (`postgresql+psycopg://user:pass@host/db`). Every request's usage is written in one
transaction, idempotent on its `request_id`. Money is exact: `Decimal` in Python, NUMERIC in
PostgreSQL, an integer count of 1e-12 USD in SQLite (whose NUMERIC would round through floats;
64-bit integers then cap one SQL sum at about $9.2 million, and SQLite reports an overflow rather
than round: past that, use PostgreSQL).

What crosses the API are frozen dataclasses (`ApiKey`, `UsageRecord`, `UsageRow`), never ORM
objects, so results can be handed between threads. This module never sees HTTP or tensors.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, Iterable

from sqlalchemy import (BigInteger, DateTime, ForeignKey, Index, Integer, Numeric, String, TypeDecorator,
                        create_engine, event, func, insert, inspect, select, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from exaone.server.pricing import COST_SCALE, PRICE_SCALE, Pricing, to_decimal

SECRET_PREFIX = "sk-exa-"
SECRET_RANDOM_CHARS = 32     # token_urlsafe(24) -> 32 chars, 192 random bits
SHOWN_PREFIX_CHARS = len(SECRET_PREFIX) + 6  # what `exaone keys list` shows of a secret
SQLITE_BUSY_TIMEOUT_MS = 30_000
STATUSES = ("ok", "cancelled", "error")
GROUPS = ("key", "model", "day")
DEFAULT_DB_URL = "sqlite:///exaone.db"
MAX_NAME = 200  # key names, model names, request ids (VARCHAR length)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def hash_secret(secret: str) -> str:
    # A plain SHA-256 is the right hash here, unlike for passwords: secrets are 192 random bits,
    # so there is nothing to brute-force, and a fast hash keeps per-request auth cheap.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ---- column types ------------------------------------------------------------------------
class Fixed(TypeDecorator):
    """An exact decimal with `scale` places: NUMERIC where the database has a real one, an
    INTEGER count of 10**-scale units in SQLite, so SUM() there stays exact too."""
    impl = Numeric
    cache_ok = True

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(38, self.scale, asdecimal=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        d = Decimal(value)
        if d != d.quantize(Decimal(1).scaleb(-self.scale)):
            raise ValueError(f"{d} has more than {self.scale} decimal places")
        return int(d.scaleb(self.scale)) if dialect.name == "sqlite" else d

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-self.scale)
        return Decimal(value)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes in and out, whatever the database keeps."""
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        return _as_utc(value)


# ---- tables ------------------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class ApiKeyTable(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME))
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_usd: Mapped[Decimal | None] = mapped_column(Fixed(PRICE_SCALE), nullable=True)
    # Running total of this key's usage costs, kept in the transaction that writes each usage row,
    # so the budget check per request is one row read rather than a sum over all of its usage.
    spent_usd: Mapped[Decimal] = mapped_column(Fixed(COST_SCALE), default=Decimal(0))


class UsageTable(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(MAX_NAME))
    request_id: Mapped[str] = mapped_column(String(MAX_NAME), unique=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    # The prices in force when the request ran, so a later price change never rewrites history.
    price_prompt_per_m: Mapped[Decimal] = mapped_column(Fixed(PRICE_SCALE))
    price_cached_per_m: Mapped[Decimal] = mapped_column(Fixed(PRICE_SCALE))
    price_completion_per_m: Mapped[Decimal] = mapped_column(Fixed(PRICE_SCALE))
    cost_usd: Mapped[Decimal] = mapped_column(Fixed(COST_SCALE))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_usage_key_started", "key_id", "started_at"),
                      Index("ix_usage_started", "started_at"))


# ---- what crosses the API ----------------------------------------------------------------
@dataclass(frozen=True)
class ApiKey:
    """A key as the server and CLI see it: never the secret, never its hash."""
    id: int
    name: str
    prefix: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    rpm_limit: int | None
    tpm_limit: int | None
    budget_usd: Decimal | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class UsageRecord:
    """One request's usage, as the server reports it. Cached tokens are part of prompt tokens,
    reasoning tokens part of completion tokens."""
    key_id: int | None
    model: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    status: str = "ok"
    started_at: dt.datetime | None = None   # None: now
    finished_at: dt.datetime | None = None  # None: now

    def __post_init__(self):
        for f in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            n = getattr(self, f)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{f}: expected an int >= 0, got {n!r}")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(f"cached_tokens ({self.cached_tokens}) > prompt_tokens ({self.prompt_tokens})")
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError(f"reasoning_tokens ({self.reasoning_tokens}) > completion_tokens "
                             f"({self.completion_tokens})")
        if self.status not in STATUSES:
            raise ValueError(f"status: one of {STATUSES}, got {self.status!r}")
        for f in ("model", "request_id"):
            if not getattr(self, f) or len(getattr(self, f)) > MAX_NAME:
                raise ValueError(f"{f}: 1 to {MAX_NAME} characters, got {getattr(self, f)!r:.60}")


@dataclass(frozen=True)
class UsageRow:
    """One stored usage row, with its exact cost and the prices it was billed at."""
    id: int
    key_id: int | None
    model: str
    request_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    price_prompt_per_m: Decimal
    price_cached_per_m: Decimal
    price_completion_per_m: Decimal
    cost_usd: Decimal
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class UnknownKey(ValueError):
    pass


class LedgerUnavailable(ConnectionError):
    """The database cannot be reached or opened."""


def _key(row: ApiKeyTable) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at,
                  revoked_at=row.revoked_at, rpm_limit=row.rpm_limit, tpm_limit=row.tpm_limit,
                  budget_usd=row.budget_usd)


def _usage(row: UsageTable) -> UsageRow:
    return UsageRow(**{f.name: getattr(row, f.name) for f in fields(UsageRow)})


def _as_utc(t: dt.date | dt.datetime | str | None) -> dt.datetime | None:
    """A date (or "YYYY-MM-DD") means its midnight UTC; a naive datetime is UTC."""
    if isinstance(t, str):
        t = dt.datetime.fromisoformat(t)
    if t is None:
        return None
    if not isinstance(t, dt.datetime):
        return dt.datetime(t.year, t.month, t.day, tzinfo=dt.timezone.utc)
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _limits(**limits) -> dict[str, Any]:
    """Validated limit columns: rpm/tpm ints >= 1, budget a decimal >= 0; None means no limit."""
    unknown = set(limits) - {"rpm_limit", "tpm_limit", "budget_usd"}
    if unknown:
        raise TypeError(f"unknown limits {sorted(unknown)}")
    out = {}
    for what, n in limits.items():
        if what == "budget_usd":
            d = None if n is None else to_decimal(n, "budget_usd")
            if d is not None and d != d.quantize(Decimal(1).scaleb(-PRICE_SCALE)):
                raise ValueError(f"budget_usd: at most {PRICE_SCALE} decimal places, got {d}")
            out[what] = d
        elif n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{what}: expected an int >= 1 or None, got {n!r}")
        else:
            out[what] = n
    return out


# ---- engine ------------------------------------------------------------------------------
def normalize_url(url: str | None) -> str:
    url = url or os.environ.get("EXAONE_DB_URL") or DEFAULT_DB_URL
    # Plain postgres URLs would pick psycopg2; psycopg (3) is the driver we depend on.
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        # check_same_thread=False: the pool hands connections to whichever thread asks; each
        # connection is used by one thread at a time. The busy timeout makes writers queue.
        memory = u.database in (None, "", ":memory:")
        # An in-memory database lives in one connection: share it (tests and demos only).
        engine = create_engine(u, connect_args={"check_same_thread": False,
                                                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                               **({"poolclass": StaticPool} if memory else {}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    if u.get_backend_name() == "postgresql":
        # UTC sessions, so date() of a timestamp is the UTC day on every server.
        return create_engine(u, pool_pre_ping=True, connect_args={"options": "-c timezone=UTC"})
    return create_engine(u, pool_pre_ping=True)


# ---- the ledger --------------------------------------------------------------------------
class Ledger:
    """Keys and usage over one SQLAlchemy engine. Safe to share between threads."""

    def __init__(self, url: str | None = None, pricing: Pricing | None = None):
        self.url = normalize_url(url)
        self.pricing = pricing or Pricing()
        u = make_url(self.url)
        if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
            folder = os.path.dirname(os.path.abspath(u.database))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"ledger {self.display_url}: no directory {folder}")
        self.engine = make_engine(self.url)
        try:
            Base.metadata.create_all(self.engine)
            self._add_spent_column()
        except OperationalError as e:  # server down, bad password, unwritable file: one line, not a trace
            self.engine.dispose()
            raise LedgerUnavailable(f"ledger {self.display_url}: {str(e.orig).strip().splitlines()[0]}") from e

    def _add_spent_column(self) -> None:
        """Ledgers made before api_keys.spent_usd existed: add it, filled from their usage rows."""
        if "spent_usd" in {c["name"] for c in inspect(self.engine).get_columns("api_keys")}:
            return
        col = ApiKeyTable.__table__.c.spent_usd
        ddl = col.type.dialect_impl(self.engine.dialect).compile(dialect=self.engine.dialect)
        total = (select(func.coalesce(func.sum(UsageTable.cost_usd), 0))
                 .where(UsageTable.key_id == ApiKeyTable.id).scalar_subquery())
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE api_keys ADD COLUMN spent_usd {ddl} NOT NULL DEFAULT 0")
            conn.execute(update(ApiKeyTable).values(spent_usd=total))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Ledger({self.display_url!r})"

    # ---- keys ----------------------------------------------------------------------------
    def create_key(self, name: str, rpm_limit: int | None = None, tpm_limit: int | None = None,
                   budget_usd: Decimal | str | int | None = None) -> tuple[ApiKey, str]:
        """A new key and its secret. The secret is returned once and stored only as a hash."""
        if not name or not name.strip() or len(name.strip()) > MAX_NAME:
            raise ValueError(f"key name: 1 to {MAX_NAME} characters, got {len(name or '')}")
        limits = _limits(rpm_limit=rpm_limit, tpm_limit=tpm_limit, budget_usd=budget_usd)
        secret = SECRET_PREFIX + secrets.token_urlsafe(SECRET_RANDOM_CHARS * 3 // 4)
        with self.engine.begin() as conn:
            key_id = conn.execute(insert(ApiKeyTable).values(
                name=name.strip(), prefix=secret[:SHOWN_PREFIX_CHARS], key_hash=hash_secret(secret),
                created_at=utcnow(), **limits,
            )).inserted_primary_key[0]
            row = conn.execute(select(ApiKeyTable).where(ApiKeyTable.id == key_id)).one()
        return _key(row), secret

    def list_keys(self, include_revoked: bool = True) -> list[ApiKey]:
        q = select(ApiKeyTable).order_by(ApiKeyTable.id)
        if not include_revoked:
            q = q.where(ApiKeyTable.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key(r) for r in conn.execute(q)]

    def get_key(self, id_or_prefix: int | str) -> ApiKey:
        """By id (an int or a string of digits) or by the prefix that `list_keys` shows."""
        if isinstance(id_or_prefix, int) or str(id_or_prefix).isdigit():
            q = select(ApiKeyTable).where(ApiKeyTable.id == int(id_or_prefix))
        else:
            q = select(ApiKeyTable).where(ApiKeyTable.prefix == str(id_or_prefix))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        if not rows:
            raise UnknownKey(f"no API key with id or prefix {id_or_prefix!r}")
        if len(rows) > 1:
            raise UnknownKey(f"prefix {id_or_prefix!r} matches keys {[r.id for r in rows]}: use the id")
        return _key(rows[0])

    def revoke_key(self, id_or_prefix: int | str) -> ApiKey:
        """Revoke a key; revoking a revoked key keeps its first revocation time."""
        key = self.get_key(id_or_prefix)
        with self.engine.begin() as conn:
            conn.execute(update(ApiKeyTable).where(ApiKeyTable.id == key.id, ApiKeyTable.revoked_at.is_(None))
                         .values(revoked_at=utcnow()))
            return _key(conn.execute(select(ApiKeyTable).where(ApiKeyTable.id == key.id)).one())

    def update_key(self, id_or_prefix: int | str, **limits) -> ApiKey:
        """Change any of rpm_limit, tpm_limit, budget_usd (None removes that limit)."""
        values = _limits(**limits)
        key = self.get_key(id_or_prefix)
        if values:
            with self.engine.begin() as conn:
                conn.execute(update(ApiKeyTable).where(ApiKeyTable.id == key.id).values(**values))
        return self.get_key(key.id)

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The live key this secret belongs to, or None (unknown, malformed or revoked)."""
        if not secret or not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
            return None
        digest = hash_secret(secret)
        with self.engine.connect() as conn:
            row = conn.execute(select(ApiKeyTable).where(ApiKeyTable.key_hash == digest)).one_or_none()
        # The lookup is by hash, so its timing reveals nothing about the secret; the constant-time
        # compare keeps it that way if the lookup ever changes (say, by prefix).
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        return _key(row)

    # ---- usage ---------------------------------------------------------------------------
    def record(self, rec: UsageRecord) -> UsageRow:
        """Write one request's usage with its prices and exact cost, in one transaction.
        Idempotent: a record whose request_id is already stored returns the stored row and
        bills nothing more."""
        price = self.pricing.price(rec.model)
        now = utcnow()
        values = dict(
            key_id=rec.key_id, model=rec.model, request_id=rec.request_id,
            prompt_tokens=rec.prompt_tokens, cached_tokens=rec.cached_tokens,
            completion_tokens=rec.completion_tokens, reasoning_tokens=rec.reasoning_tokens,
            price_prompt_per_m=price.prompt, price_cached_per_m=price.cached,
            price_completion_per_m=price.completion,
            cost_usd=self.pricing.cost(rec.model, rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens),
            status=rec.status, started_at=rec.started_at or rec.finished_at or now,
            finished_at=rec.finished_at or now,
        )
        by_id = select(UsageTable).where(UsageTable.request_id == rec.request_id)
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as upsert
            else:
                from sqlalchemy.dialects.postgresql import insert as upsert
            stmt = upsert(UsageTable).values(**values).on_conflict_do_nothing(index_elements=["request_id"])
            returning = self.engine.dialect.insert_returning  # SQLite >= 3.35, PostgreSQL
            if returning:
                stmt = stmt.returning(UsageTable.id)
            with self.engine.begin() as conn:  # the insert comes first, so SQLite takes the write lock at once
                result = conn.execute(stmt)
                inserted = result.first() is not None if returning else result.rowcount == 1
                if inserted:  # else already recorded: bill nothing more
                    self._add_spent(conn, rec.key_id, values["cost_usd"])
                return _usage(conn.execute(by_id).one())
        try:  # other databases: let the unique constraint decide
            with self.engine.begin() as conn:
                conn.execute(insert(UsageTable).values(**values))
                self._add_spent(conn, rec.key_id, values["cost_usd"])
                return _usage(conn.execute(by_id).one())
        except IntegrityError:
            with self.engine.connect() as conn:
                return _usage(conn.execute(by_id).one())

    @staticmethod
    def _add_spent(conn, key_id: int | None, cost: Decimal) -> None:
        if key_id is not None and cost:
            conn.execute(update(ApiKeyTable).where(ApiKeyTable.id == key_id)
                         .values(spent_usd=ApiKeyTable.spent_usd + cost))

    def usage(self, key_id: int | None = None, since: dt.date | dt.datetime | str | None = None,
              until: dt.date | dt.datetime | str | None = None) -> list[dict]:
        """Usage rows, oldest first, as dicts; `since` inclusive, `until` exclusive (on started_at)."""
        q = select(UsageTable).order_by(UsageTable.started_at, UsageTable.id)
        if key_id is not None:
            q = q.where(UsageTable.key_id == key_id)
        q = self._window(q, since, until)
        with self.engine.connect() as conn:
            return [_usage(r).as_dict() for r in conn.execute(q)]

    def summary(self, group_by: Iterable[str] = GROUPS, since: dt.date | dt.datetime | str | None = None,
                until: dt.date | dt.datetime | str | None = None) -> list[dict]:
        """Sums per group (any of "key", "model", "day"; none for one grand total): requests,
        prompt/cached/completion/reasoning tokens and cost. Days are UTC days of started_at."""
        group_by = tuple(group_by)
        bad = [g for g in group_by if g not in GROUPS]
        if bad:
            raise ValueError(f"group_by: choose from {GROUPS}, got {bad}")
        U, K = UsageTable, ApiKeyTable
        cols, keys = [], []
        if "key" in group_by:
            cols += [U.key_id.label("key_id"), K.name.label("key_name")]
            keys += [U.key_id, K.name]
        if "model" in group_by:
            cols.append(U.model.label("model"))
            keys.append(U.model)
        if "day" in group_by:
            day = func.date(U.started_at)
            cols.append(day.label("day"))
            keys.append(day)
        sums = [func.count(U.id).label("requests")] + [
            func.coalesce(func.sum(c), 0).label(c.key) for c in
            (U.prompt_tokens, U.cached_tokens, U.completion_tokens, U.reasoning_tokens, U.cost_usd)]
        q = select(*cols, *sums).select_from(U)
        if "key" in group_by:
            q = q.outerjoin(K, K.id == U.key_id)
        q = self._window(q, since, until)
        if keys:
            q = q.group_by(*keys).order_by(*keys)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:
            if "day" in r and r["day"] is not None:
                r["day"] = str(r["day"])  # a date in PostgreSQL, a string in SQLite
            for k in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens"):
                r[k] = int(r[k])
            r["cost_usd"] = Decimal(r["cost_usd"])
        return rows

    def spent(self, key_id: int) -> Decimal:
        """Total cost billed to a key, all time (0 for an unknown key). One row read."""
        with self.engine.connect() as conn:
            v = conn.execute(select(ApiKeyTable.spent_usd).where(ApiKeyTable.id == key_id)).scalar_one_or_none()
        return Decimal(0) if v is None else v

    def spent_by_key(self) -> dict[int, Decimal]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(ApiKeyTable.id, ApiKeyTable.spent_usd)).all())

    def audit_spent(self) -> dict[int, tuple[Decimal, Decimal]]:
        """Keys whose running total disagrees with the sum of their usage rows: {id: (total, sum)}.
        Empty unless rows were changed behind the ledger's back."""
        sums = (select(UsageTable.key_id, func.sum(UsageTable.cost_usd).label("s"))
                .where(UsageTable.key_id.is_not(None)).group_by(UsageTable.key_id).subquery())
        q = (select(ApiKeyTable.id, ApiKeyTable.spent_usd, sums.c.s)
             .outerjoin(sums, sums.c.key_id == ApiKeyTable.id))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return {i: (total, s or Decimal(0)) for i, total, s in rows if total != (s or 0)}

    @staticmethod
    def _window(q, since, until):
        since, until = _as_utc(since), _as_utc(until)
        if since is not None:
            q = q.where(UsageTable.started_at >= since)
        if until is not None:
            q = q.where(UsageTable.started_at < until)
        return q
