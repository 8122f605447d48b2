"""protocol.renewal: spread of renewals over a fleet, placement rule, suggested windows, backoff."""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import random
import statistics
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol.renewal as renewal
from protocol.renewal import (
    DEFAULT_POLICY,
    RenewalPolicy,
    RenewalWindow,
    device_fraction,
    next_attempt,
    renewal_time,
    renewal_window,
    should_renew,
    time_until_renewal,
)

UTC = timezone.utc
ISSUED = datetime(2024, 1, 15, 9, 30, tzinfo=UTC)
TWO_YEARS = timedelta(days=730)
DAY = timedelta(days=1)


def serial_ids(n: int) -> list[str]:
    return [f"device-{i:06d}" for i in range(n)]


def uuid_ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def daily_counts(moments: Iterable[datetime], window: RenewalWindow) -> Counter[int]:
    """Renewals per day, day 0 being the day that starts at window.start."""
    return Counter((m - window.start) // DAY for m in moments)


def peak_to_mean(counts: Counter[int], window: RenewalWindow) -> float:
    mean = sum(counts.values()) / (window.duration / DAY)
    return max(counts.values()) / mean


# --- the fleet-wide spread (the issue's acceptance test) ---------------------------------


@pytest.mark.parametrize("ids", [serial_ids(100_000), uuid_ids(100_000, seed=7)], ids=["serial", "uuid4"])
def test_same_day_fleet_spreads_flat_over_the_window(ids: list[str]) -> None:
    not_after = ISSUED + TWO_YEARS
    window = renewal_window(not_before=ISSUED, not_after=not_after)
    moments = [renewal_time(d, not_before=ISSUED, not_after=not_after) for d in ids]
    counts = daily_counts(moments, window)
    assert min(counts) >= 0 and max(counts) < math.ceil(window.duration / DAY)
    assert peak_to_mean(counts, window) <= 1.3
    # No hole either: every whole day of the window gets a fair share.
    full_days = int(window.duration // DAY)
    mean = len(ids) / (window.duration / DAY)
    assert min(counts[d] for d in range(full_days)) >= 0.7 * mean


def test_peak_to_mean_detects_a_spike() -> None:
    # The yardstick itself can fail: the article's fixed-schedule fleet renews on one day.
    window = renewal_window(not_before=ISSUED, not_after=ISSUED + TWO_YEARS)
    counts = daily_counts([window.start] * 1000 + [window.start + k * DAY for k in range(100)], window)
    assert peak_to_mean(counts, window) > 1.3


def test_article_numbers_50k_sensors_on_two_year_certificates() -> None:
    # Window = the whole lifetime, as in the article's steady state: ~68 operations a day.
    whole = RenewalPolicy(start=0.0, end=1.0)
    not_after = ISSUED + TWO_YEARS
    window = renewal_window(not_before=ISSUED, not_after=not_after, policy=whole)
    assert window == RenewalWindow(start=ISSUED, end=not_after)
    moments = [renewal_time(d, not_before=ISSUED, not_after=not_after, policy=whole) for d in serial_ids(50_000)]
    counts = daily_counts(moments, window)
    assert set(counts) <= set(range(730))
    mean = 50_000 / 730
    assert 68 <= mean < 69
    daily = [counts[d] for d in range(730)]
    assert abs(statistics.median(daily) - mean) <= 0.1 * mean
    # Poisson(68.5) per day: a 5-sigma band holds for every one of the 730 days.
    assert max(daily) <= mean + 5 * math.sqrt(mean)
    assert min(daily) >= mean - 5 * math.sqrt(mean)


# --- the placement rule -------------------------------------------------------------------


def test_placement_follows_the_documented_rule() -> None:
    not_after = ISSUED + TWO_YEARS
    window = renewal_window(not_before=ISSUED, not_after=not_after)
    for device_id in ["device-12345", "ünïcödé-センサー", "x"]:
        h = int.from_bytes(hashlib.sha256(device_id.encode("utf-8")).digest()[:8], "big")
        span_us = (window.end - window.start) // timedelta(microseconds=1)
        expected = window.start + timedelta(microseconds=(h * span_us) >> 64)
        assert renewal_time(device_id, not_before=ISSUED, not_after=not_after) == expected
        assert device_fraction(device_id) == (h >> 11) / 2**53


def test_default_window_is_75_to_90_percent_of_the_lifetime() -> None:
    window = renewal_window(not_before=ISSUED, not_after=ISSUED + timedelta(days=1000))
    assert window.start == ISSUED + timedelta(days=750)
    assert window.end == ISSUED + timedelta(days=900)
    assert DEFAULT_POLICY == RenewalPolicy(start=0.75, end=0.90)


def test_same_id_same_moment_and_different_ids_differ() -> None:
    kw = {"not_before": ISSUED, "not_after": ISSUED + TWO_YEARS}
    assert renewal_time("device-1", **kw) == renewal_time("device-1", **kw)
    assert len({renewal_time(d, **kw) for d in serial_ids(1000)}) == 1000


def test_device_fraction_is_uniform_and_in_range() -> None:
    fractions = [device_fraction(d) for d in serial_ids(20_000)]
    assert all(0.0 <= f < 1.0 for f in fractions)
    assert abs(statistics.fmean(fractions) - 0.5) < 0.01
    deciles = Counter(int(f * 10) for f in fractions)
    assert all(abs(deciles[k] - 2000) < 200 for k in range(10))


@given(
    device_id=st.text(min_size=1, max_size=40).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    shift=st.timedeltas(min_value=timedelta(days=-3000), max_value=timedelta(days=3000)),
)
def test_moment_moves_with_the_issue_date(device_id: str, shift: timedelta) -> None:
    base = renewal_time(device_id, not_before=ISSUED, not_after=ISSUED + TWO_YEARS)
    moved = renewal_time(device_id, not_before=ISSUED + shift, not_after=ISSUED + TWO_YEARS + shift)
    assert moved - base == shift


def test_result_is_utc_even_for_other_zones() -> None:
    cet = timezone(timedelta(hours=1))
    local = renewal_time("d", not_before=ISSUED.astimezone(cet), not_after=(ISSUED + TWO_YEARS).astimezone(cet))
    assert local.tzinfo is UTC
    assert local == renewal_time("d", not_before=ISSUED, not_after=ISSUED + TWO_YEARS)


# --- properties over lifetimes, policies and suggested windows ----------------------------

ids_st = st.text(min_size=1, max_size=30).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
lifetimes = st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=365 * 50))
fractions_st = st.tuples(
    st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=1.0)
).filter(lambda p: p[0] + 1e-6 < p[1])


@given(device_id=ids_st, lifetime=lifetimes, fr=fractions_st)
def test_moment_lies_in_the_policy_window_and_the_lifetime(
    device_id: str, lifetime: timedelta, fr: tuple[float, float]
) -> None:
    policy = RenewalPolicy(start=fr[0], end=fr[1])
    not_after = ISSUED + lifetime
    window = renewal_window(not_before=ISSUED, not_after=not_after, policy=policy)
    moment = renewal_time(device_id, not_before=ISSUED, not_after=not_after, policy=policy)
    assert ISSUED <= window.start <= moment < window.end <= not_after


@given(
    device_id=ids_st,
    lifetime=lifetimes,
    offset=st.timedeltas(min_value=timedelta(days=-4000), max_value=timedelta(days=20000)),
    length=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=4000)),
)
def test_moment_with_any_suggested_window_stays_in_the_lifetime(
    device_id: str, lifetime: timedelta, offset: timedelta, length: timedelta
) -> None:
    not_after = ISSUED + lifetime
    suggested = RenewalWindow(start=ISSUED + offset, end=ISSUED + offset + length)
    moment = renewal_time(device_id, not_before=ISSUED, not_after=not_after, suggested=suggested)
    assert ISSUED <= moment < not_after
    if suggested.start < not_after and suggested.end > ISSUED:
        assert max(suggested.start, ISSUED) <= moment < min(suggested.end, not_after)


# --- suggested windows --------------------------------------------------------------------

NOT_AFTER = ISSUED + TWO_YEARS


def test_suggested_window_overrides_the_policy() -> None:
    suggested = RenewalWindow(start=ISSUED + timedelta(days=100), end=ISSUED + timedelta(days=130))
    policy_window = renewal_window(not_before=ISSUED, not_after=NOT_AFTER)
    moments = [renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER, suggested=suggested) for d in serial_ids(3000)]
    assert all(suggested.start <= m < suggested.end for m in moments)
    assert not any(m in policy_window for m in moments)
    # Same relative place as in the policy window: the server levels load without reshuffling.
    d = "device-000042"
    in_suggested = renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER, suggested=suggested)
    in_policy = renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER)
    rel_s = (in_suggested - suggested.start) / suggested.duration
    rel_p = (in_policy - policy_window.start) / policy_window.duration
    assert abs(rel_s - rel_p) < 1e-6
    assert peak_to_mean(daily_counts(moments, suggested), suggested) <= 1.3


def test_suggested_window_is_clamped_to_the_lifetime() -> None:
    overhanging = RenewalWindow(start=NOT_AFTER - timedelta(days=10), end=NOT_AFTER + timedelta(days=300))
    early = RenewalWindow(start=ISSUED - timedelta(days=300), end=ISSUED + timedelta(days=10))
    for d in serial_ids(500):
        late_m = renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER, suggested=overhanging)
        assert overhanging.start <= late_m < NOT_AFTER
        early_m = renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER, suggested=early)
        assert ISSUED <= early_m < early.end


def test_suggested_window_in_the_past_means_now() -> None:
    past = RenewalWindow(start=ISSUED - timedelta(days=20), end=ISSUED - timedelta(days=10))
    moment = renewal_time("d", not_before=ISSUED, not_after=NOT_AFTER, suggested=past)
    assert moment == ISSUED
    now = ISSUED + timedelta(days=1)
    assert should_renew("d", now=now, not_before=ISSUED, not_after=NOT_AFTER, suggested=past)
    assert time_until_renewal("d", now=now, not_before=ISSUED, not_after=NOT_AFTER, suggested=past) == timedelta(0)


def test_suggested_window_after_expiry_is_ignored() -> None:
    beyond = RenewalWindow(start=NOT_AFTER, end=NOT_AFTER + timedelta(days=30))
    for d in serial_ids(50):
        assert renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER, suggested=beyond) == renewal_time(
            d, not_before=ISSUED, not_after=NOT_AFTER
        )


# --- should_renew / time_until_renewal ----------------------------------------------------


def test_due_exactly_from_the_moment_on() -> None:
    d = "sensor-7"
    moment = renewal_time(d, not_before=ISSUED, not_after=NOT_AFTER)
    kw = {"not_before": ISSUED, "not_after": NOT_AFTER}
    before = moment - timedelta(microseconds=1)
    assert not should_renew(d, now=before, **kw)
    assert time_until_renewal(d, now=before, **kw) == timedelta(microseconds=1)
    assert time_until_renewal(d, now=ISSUED, **kw) == moment - ISSUED
    assert should_renew(d, now=moment, **kw)
    assert time_until_renewal(d, now=moment, **kw) == timedelta(0)
    # After expiry it stays due: the server's recovery window decides, not the timer.
    assert should_renew(d, now=NOT_AFTER + DAY, **kw)
    assert time_until_renewal(d, now=NOT_AFTER + DAY, **kw) == timedelta(0)


# --- bad arguments ------------------------------------------------------------------------

NAIVE = datetime(2024, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"not_before": NAIVE, "not_after": NAIVE + DAY}, ValueError, "timezone-aware"),
        ({"not_before": ISSUED, "not_after": ISSUED}, ValueError, "before not_after"),
        ({"not_before": ISSUED, "not_after": ISSUED - DAY}, ValueError, "before not_after"),
        ({"not_before": "2024-01-01", "not_after": NOT_AFTER}, TypeError, "datetime"),
        ({"not_before": ISSUED, "not_after": ISSUED + timedelta(microseconds=1)}, ValueError, "too short"),
        ({"not_before": ISSUED, "not_after": NOT_AFTER, "policy": (0.7, 0.9)}, TypeError, "RenewalPolicy"),
        ({"not_before": ISSUED, "not_after": NOT_AFTER, "suggested": (ISSUED, NOT_AFTER)}, TypeError, "RenewalWindow"),
    ],
)
def test_bad_lifetimes_and_policies_raise(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        renewal_time("d", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("device_id", "exc"), [("", ValueError), (b"d", TypeError), (None, TypeError), ("a\udc80", ValueError)])
def test_bad_device_ids_raise(device_id: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="device_id"):
        renewal_time(device_id, not_before=ISSUED, not_after=NOT_AFTER)  # type: ignore[arg-type]
    with pytest.raises(exc, match="device_id"):
        device_fraction(device_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("start", "end", "exc"),
    [(0.9, 0.75, ValueError), (0.5, 0.5, ValueError), (-0.1, 0.5, ValueError), (0.5, 1.01, ValueError),
     (float("nan"), 0.9, ValueError), (0.1, float("inf"), ValueError), (True, 0.9, TypeError), ("0.1", 0.9, TypeError)],
)
def test_bad_policies_raise(start: object, end: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="RenewalPolicy"):
        RenewalPolicy(start=start, end=end)  # type: ignore[arg-type]


def test_renewal_window_validation_and_normalisation() -> None:
    with pytest.raises(ValueError, match="before end"):
        RenewalWindow(start=ISSUED, end=ISSUED)
    with pytest.raises(ValueError, match="timezone-aware"):
        RenewalWindow(start=NAIVE, end=ISSUED)
    with pytest.raises(TypeError, match="datetime"):
        RenewalWindow(start=0, end=ISSUED)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RenewalWindow(ISSUED, NOT_AFTER)  # type: ignore[misc]  # keyword-only
    tokyo = timezone(timedelta(hours=9))
    w = RenewalWindow(start=ISSUED.astimezone(tokyo), end=NOT_AFTER.astimezone(tokyo))
    assert w.start.tzinfo is UTC and w.start == ISSUED and w.duration == TWO_YEARS


# --- backoff ------------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
BASE = timedelta(seconds=30)
CAP = timedelta(hours=6)


class Fixed:
    """A RandomSource that always returns the same draw."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_stays_within_full_jitter_bounds() -> None:
    rng = random.Random(1234)
    for failures in range(1, 30):
        ceiling = min(CAP, BASE * 2 ** (failures - 1))
        delays = [next_attempt(now=NOW, failures=failures, rng=rng) - NOW for _ in range(200)]
        assert all(timedelta(0) <= d <= ceiling for d in delays)
        # Full jitter: the draws cover the range, not just its top.
        assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9


def test_backoff_doubles_until_the_cap() -> None:
    half = Fixed(0.5)
    delays = [next_attempt(now=NOW, failures=f, rng=half) - NOW for f in range(1, 16)]
    assert delays[0] == BASE / 2
    for a, b in zip(delays, delays[1:]):
        assert b == min(2 * a, CAP / 2)
    assert delays[-1] == CAP / 2


def test_backoff_survives_absurd_failure_counts() -> None:
    top = Fixed(math.nextafter(1.0, 0.0))
    for failures in (10**6, 2**10000):
        d = next_attempt(now=NOW, failures=failures, rng=top) - NOW
        assert CAP - timedelta(microseconds=10) <= d <= CAP


def test_retry_after_is_a_floor_with_jitter_on_top() -> None:
    ra = timedelta(seconds=30)
    rng = random.Random(99)
    attempts = [next_attempt(now=NOW, failures=1, rng=rng, retry_after=ra) for _ in range(5000)]
    assert all(NOW + ra <= a <= NOW + ra + CAP for a in attempts)
    # A fleet told "retry in 30 s" spreads over the following 30 s rather than one second.
    per_second = Counter(int((a - NOW).total_seconds()) for a in attempts)
    assert len(per_second) >= 30
    assert max(per_second.values()) <= 2 * 5000 / 30
    assert next_attempt(now=NOW, failures=1, rng=Fixed(0.0), retry_after=ra) == NOW + ra


def test_retry_after_longer_than_cap_is_still_honoured() -> None:
    ra = timedelta(days=2)
    a = next_attempt(now=NOW, failures=3, rng=Fixed(0.999), retry_after=ra)
    assert NOW + ra < a <= NOW + ra + CAP


def test_seeded_random_is_reproducible() -> None:
    a = [next_attempt(now=NOW, failures=f, rng=random.Random(5)) for f in range(1, 10)]
    b = [next_attempt(now=NOW, failures=f, rng=random.Random(5)) for f in range(1, 10)]
    assert a == b


def test_zero_base_means_immediate_retry() -> None:
    assert next_attempt(now=NOW, failures=4, rng=random.Random(0), base=timedelta(0)) == NOW


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"failures": 0}, ValueError, "failures must be >= 1"),
        ({"failures": -3}, ValueError, "failures must be >= 1"),
        ({"failures": 1.5}, TypeError, "failures must be an int"),
        ({"failures": True}, TypeError, "failures must be an int"),
        ({"base": timedelta(seconds=-1)}, ValueError, "base must not be negative"),
        ({"cap": timedelta(seconds=-1)}, ValueError, "cap must not be negative"),
        ({"retry_after": timedelta(seconds=-1)}, ValueError, "retry_after must not be negative"),
        ({"retry_after": 30}, TypeError, "retry_after must be a timedelta"),
        ({"now": NAIVE}, ValueError, "now must be timezone-aware"),
        ({"rng": Fixed(1.0)}, ValueError, r"rng.random\(\) must return"),
        ({"rng": Fixed(float("nan"))}, ValueError, r"rng.random\(\) must return"),
        ({"rng": Fixed(-0.1)}, ValueError, r"rng.random\(\) must return"),
        ({"rng": object()}, TypeError, "rng must have a random"),
        ({"now": datetime.max.replace(tzinfo=UTC), "failures": 5}, ValueError, "beyond datetime.max"),
    ],
)
def test_bad_backoff_arguments_raise(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    args: dict[str, object] = {"now": NOW, "failures": 2, "rng": Fixed(0.5)} | kwargs
    with pytest.raises(exc, match=match):
        next_attempt(**args)  # type: ignore[arg-type]


def test_random_random_is_a_random_source() -> None:
    assert isinstance(random.Random(), renewal.RandomSource)
    assert isinstance(Fixed(0.1), renewal.RandomSource)


# --- module hygiene -----------------------------------------------------------------------


def test_all_is_complete() -> None:
    public = {
        n for n, v in vars(renewal).items()
        if not n.startswith("_") and n != "annotations" and not inspect.ismodule(v)
        and getattr(v, "__module__", renewal.__name__) == renewal.__name__
    }
    public |= {n for n in vars(renewal) if n.startswith("DEFAULT_")}
    assert set(renewal.__all__) == public


def test_module_stays_sans_io() -> None:
    tree = ast.parse(inspect.getsource(renewal))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Attribute):
            assert node.attr not in {"now", "utcnow", "today", "time", "monotonic"}, ast.unparse(node)
    assert not imported & {"asyncio", "socket", "time", "random", "secrets", "os", "threading"}
