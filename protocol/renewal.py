"""Renewal timing: when a device renews, and when it retries after a failure.

Pure arithmetic on aware UTC datetimes. This module never reads the clock or a
random source itself: callers pass ``now`` and an ``rng``. It knows nothing of
MQTT, messages or certificates beyond their validity period.

The idea (from the "staggered renewal windows" practice): a fleet issued on the
same day must not renew on the same day. Every certificate lifetime has a
fleet-wide *renewal window* (by default 75 %..90 % of the lifetime); each device
places itself inside that window at a fixed point derived from SHA-256 of its
device id, so 50,000 devices on a 2-year lifetime become a flat ~68 operations a
day spread over the lifetime instead of one spike. The server may suggest a
different window in each issuance reply (like ACME ARI); the device then places
itself at the same relative point inside the suggested window, which lets the
server level its own load.

Placement rule (normative, so a C implementer reproduces it to the microsecond)::

    h      = first 8 bytes of SHA-256(UTF-8(device_id)), as a big-endian uint64
    span   = window.end - window.start, in whole microseconds (an integer)
    moment = window.start + floor(h * span / 2**64) microseconds

``floor(h * span / 2**64)`` is a 64x64->128-bit multiply and a right shift by 64;
it is always ``< span``, so the moment lies in ``[start, end)``.

Retries use exponential backoff with full jitter (see :func:`next_attempt`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_POLICY",
    "RandomSource",
    "RenewalPolicy",
    "RenewalWindow",
    "device_fraction",
    "next_attempt",
    "renewal_time",
    "renewal_window",
    "should_renew",
    "time_until_renewal",
]

_US = timedelta(microseconds=1)
_ZERO = timedelta(0)

DEFAULT_BACKOFF_BASE = timedelta(seconds=30)
"""First retry ceiling: the first failed attempt is retried within 30 s."""

DEFAULT_BACKOFF_CAP = timedelta(hours=6)
"""Largest jitter ceiling: however many failures, the backoff part never exceeds 6 h."""


def _utc(value: object, name: str) -> datetime:
    """Return ``value`` as an aware UTC datetime, or raise a clear error."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(timezone.utc)


def _duration(value: object, name: str) -> timedelta:
    if not isinstance(value, timedelta):
        raise TypeError(f"{name} must be a timedelta, not {type(value).__name__}")
    if value < _ZERO:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


@dataclass(frozen=True, kw_only=True)
class RenewalWindow:
    """A span of time ``[start, end]`` in which renewal should happen.

    Both ends are aware datetimes (normalised to UTC on construction) and
    ``start < end``. Used for the fleet-wide policy window and for the window a
    server suggests on the wire (where the codec carries it as epoch seconds).
    """

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        start = _utc(self.start, "RenewalWindow.start")
        end = _utc(self.end, "RenewalWindow.end")
        if not start < end:
            raise ValueError(
                f"RenewalWindow.start must be before end, got start={start.isoformat()} end={end.isoformat()}"
            )
        # Frozen: normalising the zone is the only change, done once at construction.
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def duration(self) -> timedelta:
        """``end - start``."""
        return self.end - self.start

    def __contains__(self, moment: object) -> bool:
        return isinstance(moment, datetime) and self.start <= _utc(moment, "moment") <= self.end


def _fraction_field(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class RenewalPolicy:
    """The fleet-wide renewal window as fractions of a certificate's lifetime.

    ``start=0.75, end=0.90`` (the default) means: renewal happens between 75 %
    and 90 % of the way from ``not_before`` to ``not_after``, leaving the last
    10 % of the lifetime for retries. Requires ``0 <= start < end <= 1``.
    """

    start: float = 0.75
    end: float = 0.90

    def __post_init__(self) -> None:
        start = _fraction_field(self.start, "RenewalPolicy.start")
        end = _fraction_field(self.end, "RenewalPolicy.end")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"RenewalPolicy needs 0 <= start < end <= 1, got start={start!r} end={end!r}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)


DEFAULT_POLICY = RenewalPolicy()
"""75 %..90 % of the lifetime."""


@runtime_checkable
class RandomSource(Protocol):
    """Anything with ``random() -> float`` in ``[0, 1)``; :class:`random.Random` qualifies."""

    def random(self) -> float:
        """A uniformly distributed float in ``[0, 1)``."""
        ...


def _device_hash(device_id: str) -> int:
    if not isinstance(device_id, str):
        raise TypeError(f"device_id must be a str, not {type(device_id).__name__}")
    if not device_id:
        raise ValueError("device_id must not be empty")
    try:
        raw = device_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"device_id {device_id[:40]!r} is not encodable as UTF-8: {exc.reason}") from None
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def device_fraction(device_id: str) -> float:
    """The device's fixed relative position in any renewal window, in ``[0, 1)``.

    Rule: ``h`` = the first 8 bytes of SHA-256 of the UTF-8 encoded device id,
    read as a big-endian unsigned 64-bit integer; the fraction is ``h / 2**64``.
    The returned float keeps the top 53 bits (``(h >> 11) / 2**53``) so it is
    exact and never rounds up to 1.0. Timing itself uses the full 64-bit ``h``
    in integer arithmetic (see the module docstring), not this float.

    Deterministic across processes, platforms and languages, and uniform over
    ids because SHA-256 is.
    """
    return (_device_hash(device_id) >> 11) / float(1 << 53)


def _lifetime(not_before: object, not_after: object) -> tuple[datetime, datetime]:
    nb = _utc(not_before, "not_before")
    na = _utc(not_after, "not_after")
    if not nb < na:
        raise ValueError(f"not_before must be before not_after, got {nb.isoformat()} .. {na.isoformat()}")
    return nb, na


def _policy_window(nb: datetime, na: datetime, policy: RenewalPolicy) -> RenewalWindow:
    if not isinstance(policy, RenewalPolicy):
        raise TypeError(f"policy must be a RenewalPolicy, not {type(policy).__name__}")
    lifetime_us = (na - nb) // _US
    # Exact rational arithmetic, rounded half-to-even to whole microseconds, so
    # 0.9 of two years is exactly that and not one microsecond more.
    start_us = round(lifetime_us * Fraction(policy.start))
    end_us = round(lifetime_us * Fraction(policy.end))
    if start_us >= end_us:
        raise ValueError(
            f"certificate lifetime {na - nb} is too short for a renewal window of "
            f"{policy.start!r}..{policy.end!r} of it (the window would be empty)"
        )
    return RenewalWindow(start=nb + start_us * _US, end=nb + end_us * _US)


def renewal_window(
    *, not_before: datetime, not_after: datetime, policy: RenewalPolicy = DEFAULT_POLICY
) -> RenewalWindow:
    """The fleet-wide renewal window for a certificate valid ``[not_before, not_after]``.

    ``start = not_before + round(lifetime * policy.start)`` and
    ``end = not_before + round(lifetime * policy.end)``, in whole microseconds
    (exact arithmetic on the float fractions, ties to even). Raises
    :class:`ValueError` when the lifetime is so short (microseconds) that the
    window would be empty.
    """
    nb, na = _lifetime(not_before, not_after)
    return _policy_window(nb, na, policy)


def _place(device_id: str, window: RenewalWindow) -> datetime:
    span_us = window.duration // _US
    return window.start + ((_device_hash(device_id) * span_us) >> 64) * _US


def renewal_time(
    device_id: str,
    *,
    not_before: datetime,
    not_after: datetime,
    policy: RenewalPolicy = DEFAULT_POLICY,
    suggested: RenewalWindow | None = None,
) -> datetime:
    """The moment this device should renew the certificate valid ``[not_before, not_after]``.

    Without ``suggested``: the device's hash placement (module docstring) inside
    the policy window, i.e. ``start + device_fraction * (end - start)``.

    With a server-``suggested`` window, it replaces the policy window, clamped to
    the certificate lifetime first:

    * overlapping the lifetime: the same hash placement inside
      ``[max(start, not_before), min(end, not_after)]``;
    * ending at or before ``not_before`` (entirely in this certificate's past):
      returns the clamped start, ``not_before`` - i.e. "renew now": the caller
      compares with ``now`` and finds it due;
    * starting at or after ``not_after`` (the certificate would be dead before
      it opens): unusable, the policy window applies.

    A suggested window that lies in the past relative to the caller's ``now``
    yields a moment in the past, so :func:`should_renew` is true at once; the
    retry jitter of :func:`next_attempt` is what spreads such a fleet.

    The result is always within ``[not_before, not_after)`` and is a UTC datetime.
    """
    nb, na = _lifetime(not_before, not_after)
    if suggested is None:
        return _place(device_id, _policy_window(nb, na, policy))
    if not isinstance(suggested, RenewalWindow):
        raise TypeError(f"suggested must be a RenewalWindow or None, not {type(suggested).__name__}")
    if suggested.end <= nb:
        _device_hash(device_id)  # same argument checking on every path
        return nb
    if suggested.start >= na:
        return _place(device_id, _policy_window(nb, na, policy))
    clamped = RenewalWindow(start=max(suggested.start, nb), end=min(suggested.end, na))
    return _place(device_id, clamped)


def should_renew(
    device_id: str,
    *,
    now: datetime,
    not_before: datetime,
    not_after: datetime,
    policy: RenewalPolicy = DEFAULT_POLICY,
    suggested: RenewalWindow | None = None,
) -> bool:
    """True when ``now`` is at or past this device's :func:`renewal_time`.

    Stays true after ``not_after``: whether an expired certificate may still be
    renewed is the server's decision (its recovery window), not the timer's.
    """
    now = _utc(now, "now")
    moment = renewal_time(device_id, not_before=not_before, not_after=not_after, policy=policy, suggested=suggested)
    return now >= moment


def time_until_renewal(
    device_id: str,
    *,
    now: datetime,
    not_before: datetime,
    not_after: datetime,
    policy: RenewalPolicy = DEFAULT_POLICY,
    suggested: RenewalWindow | None = None,
) -> timedelta:
    """How long until :func:`renewal_time`; ``timedelta(0)`` once renewal is due."""
    now = _utc(now, "now")
    moment = renewal_time(device_id, not_before=not_before, not_after=not_after, policy=policy, suggested=suggested)
    return max(moment - now, _ZERO)


def _ceiling_us(failures: int, base_us: int, cap_us: int) -> int:
    """``min(cap, base * 2**(failures-1))`` without ever building a huge integer."""
    if base_us == 0:
        return 0
    shift = failures - 1
    # base >= 1 us, so base * 2**shift > cap as soon as 2**shift > cap.
    if shift >= cap_us.bit_length():
        return cap_us
    return min(cap_us, base_us << shift)


def next_attempt(
    *,
    now: datetime,
    failures: int,
    rng: RandomSource,
    base: timedelta = DEFAULT_BACKOFF_BASE,
    cap: timedelta = DEFAULT_BACKOFF_CAP,
    retry_after: timedelta | None = None,
) -> datetime:
    """When to try again after ``failures`` consecutive failed attempts (``failures >= 1``).

    Rule (full jitter, one ``rng.random()`` draw ``r`` in ``[0, 1)``)::

        ceiling = min(cap, base * 2**(failures - 1))
        without retry_after:  delay = r * ceiling
        with retry_after:     delay = retry_after + r * min(cap, max(ceiling, retry_after))

    So ``0 <= delay <= cap`` without a server hint. With one, the attempt is
    never earlier than ``now + retry_after`` and the jitter on top spreads a
    fleet told "retry in 30 s" over at least the next 30 s (never more than
    ``cap`` beyond the hint) instead of bringing it back in the same second.
    Delays are truncated to whole microseconds.
    """
    now = _utc(now, "now")
    if isinstance(failures, bool) or not isinstance(failures, int):
        raise TypeError(f"failures must be an int, not {type(failures).__name__}")
    if failures < 1:
        raise ValueError(f"failures must be >= 1 (the attempts that failed so far), got {failures}")
    base_us = _duration(base, "base") // _US
    cap_us = _duration(cap, "cap") // _US
    ra_us = None if retry_after is None else _duration(retry_after, "retry_after") // _US
    if not callable(getattr(rng, "random", None)):
        raise TypeError(f"rng must have a random() method, got {type(rng).__name__}")
    draw = rng.random()
    if not (isinstance(draw, float) and 0.0 <= draw < 1.0):
        raise ValueError(f"rng.random() must return a float in [0, 1), got {draw!r}")

    ceiling_us = _ceiling_us(failures, base_us, cap_us)
    if ra_us is not None:
        ceiling_us = min(cap_us, max(ceiling_us, ra_us))
    # min(): float rounding of draw * ceiling must not step past the ceiling.
    delay_us = min(ceiling_us, int(draw * ceiling_us)) + (ra_us or 0)
    try:
        return now + delay_us * _US
    except OverflowError:
        raise ValueError(f"next attempt lies beyond datetime.max (now={now.isoformat()}, delay={delay_us} us)") from None
