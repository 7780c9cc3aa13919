"""Rate limits and budgets, on a fake clock (no sleeping)."""
from __future__ import annotations

import threading
from decimal import Decimal

import pytest

pytest.importorskip("sqlalchemy")
from exaone.server.ledger import ApiKey, Ledger, UsageRecord  # noqa: E402
from exaone.server.limits import BudgetExceeded, Limiter, RateLimited, RequestTooLarge  # noqa: E402


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeLedger:
    def __init__(self):
        self.spent_usd: dict[int, Decimal] = {}

    def spent(self, key_id: int) -> Decimal:
        return self.spent_usd.get(key_id, Decimal(0))


def key(id=1, rpm=None, tpm=None, budget=None) -> ApiKey:
    return ApiKey(id=id, name=f"k{id}", prefix=f"sk-exa-{id:06d}", created_at=None, revoked_at=None,
                  rpm_limit=rpm, tpm_limit=tpm, budget_usd=None if budget is None else Decimal(budget))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limiter(clock):
    return Limiter(FakeLedger(), clock=clock)


def test_requests_per_minute_slide(limiter, clock):
    k = key(rpm=3)
    t0 = clock.t
    for dt_ in (0, 10, 20):
        clock.t = t0 + dt_
        limiter.check(k, 0)
    clock.t = t0 + 30
    with pytest.raises(RateLimited) as e:
        limiter.check(k, 0)
    assert e.value.retry_after == pytest.approx(30.0)  # the request at t0 leaves at t0 + 60
    assert "3 requests per minute" in str(e.value)
    clock.t = t0 + 59.9
    with pytest.raises(RateLimited) as e:
        limiter.check(k, 0)
    assert e.value.retry_after == pytest.approx(0.1)
    clock.t = t0 + 60  # the window has slid past the first request
    limiter.check(k, 0)
    with pytest.raises(RateLimited) as e:
        limiter.check(k, 0)
    assert e.value.retry_after == pytest.approx(10.0)  # next to leave: the one at t0 + 10
    assert limiter.usage(k.id) == (3, 0)


def test_refused_requests_do_not_count(limiter, clock):
    k = key(rpm=1)
    limiter.check(k, 0)
    for _ in range(5):
        clock.t += 1
        with pytest.raises(RateLimited):
            limiter.check(k, 0)
    clock.t += 55  # 60 s after the only admitted request
    limiter.check(k, 0)


def test_tokens_per_minute_with_reservations_and_actuals(limiter, clock):
    k = key(tpm=1000)
    t0 = clock.t
    limiter.check(k, 600)  # reserves 600
    clock.t = t0 + 10
    with pytest.raises(RateLimited) as e:
        limiter.check(k, 500)  # 600 + 500 > 1000
    assert e.value.retry_after == pytest.approx(50.0)  # the reservation leaves at t0 + 60
    assert "1000 tokens per minute" in e.value.message
    limiter.add_tokens(k.id, 300)  # the request finished with 300 real tokens at t0 + 10
    assert limiter.usage(k.id) == (1, 300)
    limiter.check(k, 500)  # 300 + 500 <= 1000
    clock.t = t0 + 20
    with pytest.raises(RateLimited) as e:
        limiter.check(k, 400)  # 300 + 500 + 400 = 1200: 200 must leave; the oldest, 300 at t0 + 10
    assert e.value.retry_after == pytest.approx(50.0)
    limiter.add_tokens(k.id, 0)  # the second request failed before using anything
    clock.t = t0 + 70  # the 300 tokens counted at t0 + 10 have left too
    assert limiter.usage(k.id) == (0, 0)
    limiter.check(k, 1000)


def test_request_larger_than_the_limit(limiter):
    with pytest.raises(RequestTooLarge) as e:
        limiter.check(key(tpm=100), 101)
    assert isinstance(e.value, RateLimited) and e.value.retry_after > 0
    assert "more than the key's limit" in e.value.message
    limiter.check(key(tpm=100), 100)


def test_both_limits_report_the_longer_wait(limiter, clock):
    k = key(rpm=2, tpm=100)
    t0 = clock.t
    limiter.check(k, 10)
    clock.t = t0 + 20
    limiter.check(k, 80)
    clock.t = t0 + 30
    with pytest.raises(RateLimited) as e:
        limiter.check(k, 50)  # rpm frees at t0 + 60, tokens need the 80 at t0 + 20 gone: t0 + 80
    assert e.value.retry_after == pytest.approx(50.0)
    assert "requests per minute" in e.value.message and "tokens per minute" in e.value.message


def test_keys_are_independent_and_unlimited_keys_pass(limiter):
    a, b = key(1, rpm=1), key(2, rpm=1)
    limiter.check(a, 0)
    limiter.check(b, 0)
    with pytest.raises(RateLimited):
        limiter.check(a, 0)
    free = key(3)
    for _ in range(1000):
        limiter.check(free, 10**9)


def test_budget(clock):
    ledger = FakeLedger()
    limiter = Limiter(ledger, clock=clock)
    k = key(budget="1.50")
    ledger.spent_usd[k.id] = Decimal("1.49")
    limiter.check(k, 10)
    ledger.spent_usd[k.id] = Decimal("1.50")
    with pytest.raises(BudgetExceeded) as e:
        limiter.check(k, 10)
    assert "$1.5 budget" in e.value.message and not isinstance(e.value, RateLimited)


def test_budget_reads_the_real_ledger(tmp_path, clock):
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        k, _ = ledger.create_key("alice", budget_usd="0.000001")
        limiter = Limiter(ledger, clock=clock)
        limiter.check(k, 1)
        ledger.record(UsageRecord(k.id, "m", "r1", prompt_tokens=5, completion_tokens=0))  # $0.000001
        with pytest.raises(BudgetExceeded):
            limiter.check(k, 1)


def test_thread_safe_admission(clock):
    limiter = Limiter(FakeLedger(), clock=clock)
    k = key(rpm=500, tpm=50_000)
    admitted, refused = [], []
    lock = threading.Lock()

    def work():
        for _ in range(100):
            try:
                limiter.check(k, 10)
                ok = True
            except RateLimited:
                ok = False
            with lock:
                (admitted if ok else refused).append(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 500 and len(refused) == 300
    assert limiter.usage(k.id) == (500, 5000)
