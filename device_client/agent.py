"""The renewal agent: a long-running loop that keeps every profile's certificate fresh.

Per profile its own schedule: the renewal moment from :mod:`protocol.renewal`
(the profile's policy window, or the server's suggested window from the last
CertificateIssued), then retries with exponential backoff and full jitter
(:func:`protocol.renewal.next_attempt`), never earlier than an Error's
``retry_after``. Every retry re-sends the *same* request id -- it is recorded
in the certificate store before the first send, so a restart of the process
resends it too and the CA never issues twice.

The connection is kept up by a reconnect loop with its own backoff; a broker
restart or a long offline period only delays renewals. An expired certificate
is renewed with ``reuse_key`` while inside the client's recovery window;
past it the profile stops with a ``reprovision_needed`` event.

The decisions (:meth:`RenewalAgent.due`, :meth:`RenewalAgent.record_failure`)
are plain methods over ``now``; :meth:`RenewalAgent.run` drives them with the
client's injectable clock and sleep, so tests run months in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from protocol.codes import ErrorCode, Profile
from protocol.errors import RequestRejected
from protocol.renewal import next_attempt

from .certstore import RotationRejected
from .client import DeviceClient, NotEnrolled, ProfileStatus, RecoveryWindowPassed
from .enroll import InvalidCertificate
from .transport import TransportError

__all__ = ["DEFAULT_MAX_SLEEP", "RenewalAgent", "RetryState"]

#: Longest single sleep: the agent re-reads the store and clock at least this often.
DEFAULT_MAX_SLEEP = timedelta(hours=6)


@dataclass(frozen=True, kw_only=True)
class RetryState:
    """One profile's failure streak: how many attempts failed and when to try next."""

    failures: int
    next_attempt: datetime
    last_error: str


class RenewalAgent:
    """Keeps ``profiles`` renewed through ``client`` (see module doc)."""

    def __init__(
        self,
        *,
        client: DeviceClient,
        profiles: Sequence[Profile] = (Profile.IDENTITY,),
        reconnect_base: timedelta = timedelta(seconds=5),
        reconnect_cap: timedelta = timedelta(minutes=15),
        max_sleep: timedelta = DEFAULT_MAX_SLEEP,
    ) -> None:
        if not profiles:
            raise ValueError("the agent needs at least one profile to look after")
        self.client = client
        self.profiles = tuple(dict.fromkeys(profiles))
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.max_sleep = max_sleep
        self.retries: dict[Profile, RetryState] = {}
        self.stopped: dict[Profile, str] = {}  #: profiles given up on, with the reason
        self.reconnect_failures = 0
        self.renewals = 0

    # -- decisions -------------------------------------------------------------------

    def due(self, profile: Profile, now: datetime) -> datetime | None:
        """When ``profile`` should next be attempted (``None``: nothing to do, e.g. not enrolled)."""
        if profile in self.stopped:
            return None
        if self.client.store.next(profile) is not None or self.client.store.pending(profile) is not None:
            # a staged certificate or an unanswered request: finish it (after any backoff)
            retry = self.retries.get(profile)
            return now if retry is None else retry.next_attempt
        retry = self.retries.get(profile)
        if retry is not None:
            return retry.next_attempt
        return self.client.renew_at(profile)

    def record_failure(self, profile: Profile, error: BaseException, now: datetime) -> RetryState:
        """Count a failed attempt and schedule the next (honouring ``retry_after``)."""
        previous = self.retries.get(profile)
        failures = 1 if previous is None else previous.failures + 1
        retry_after = getattr(error, "retry_after", None)
        when = next_attempt(now=now, failures=failures, rng=self.client.rng,
                            retry_after=None if retry_after is None else timedelta(seconds=retry_after))
        state = RetryState(failures=failures, next_attempt=when, last_error=f"{type(error).__name__}: {error}")
        self.retries[profile] = state
        self.client.failures[profile] = failures
        self.client.last_errors[profile] = state.last_error
        self.client.next_attempts[profile] = when
        return state

    def status(self) -> dict[Profile, ProfileStatus]:
        """The client's per-profile status, with the agent's next attempt filled in."""
        now = self.client.clock()
        result = self.client.status()
        for profile in self.profiles:
            if profile in result:
                due = self.due(profile, now)
                old = result[profile]
                result[profile] = ProfileStatus(**{**old.__dict__, "next_attempt": due,
                                                   "last_error": self.stopped.get(profile, old.last_error)})
        return result

    # -- actions ---------------------------------------------------------------------

    async def attempt(self, profile: Profile) -> bool:
        """One renewal attempt for ``profile``; returns whether a certificate was promoted."""
        now = self.client.clock()
        try:
            await self.client.renew_once(profile)
        except RecoveryWindowPassed as exc:
            self.stopped[profile] = str(exc)
            self.client.emit("reprovision_needed", profile, str(exc))
            return False
        except NotEnrolled as exc:
            self.stopped[profile] = str(exc)
            return False
        except RequestRejected as exc:
            if exc.code == ErrorCode.RECOVERY_WINDOW_PASSED:
                self.stopped[profile] = str(exc)
                self.client.emit("reprovision_needed", profile, str(exc))
                return False
            if isinstance(exc.code, ErrorCode) and not exc.code.transient:
                # refused by policy: the same request would be refused again; start afresh later
                with contextlib.suppress(Exception):
                    self.client.store.clear_pending(profile)
            state = self.record_failure(profile, exc, now)
            self.client.emit("retry", profile, f"{exc}; next attempt {state.next_attempt.isoformat()}")
            return False
        except (TransportError, RotationRejected, InvalidCertificate) as exc:
            state = self.record_failure(profile, exc, now)
            self.client.emit("retry", profile, f"{exc}; next attempt {state.next_attempt.isoformat()}")
            return False
        self.retries.pop(profile, None)
        self.client.failures.pop(profile, None)
        self.client.last_errors.pop(profile, None)
        self.renewals += 1
        return True

    async def connect(self, stop: asyncio.Event) -> bool:
        """Reconnect with backoff until connected or ``stop`` is set; returns whether connected."""
        while not stop.is_set():
            try:
                await self.client.ensure_connected()
            except NotEnrolled:
                raise
            except (TransportError, RotationRejected) as exc:
                self.reconnect_failures += 1
                now = self.client.clock()
                when = next_attempt(now=now, failures=self.reconnect_failures, rng=self.client.rng,
                                    base=self.reconnect_base, cap=self.reconnect_cap)
                self.client.emit("reconnect_failed", None, f"{exc}; next try {when.isoformat()}")
                await self.client.sleep((when - now).total_seconds())
                continue
            if self.reconnect_failures:
                self.client.emit("reconnected", None, f"after {self.reconnect_failures} failed tries")
            self.reconnect_failures = 0
            return True
        return False

    async def run_once(self, stop: asyncio.Event | None = None) -> datetime | None:
        """Connect, attempt every due profile, and return when the next one is due."""
        stop = stop or asyncio.Event()
        if not await self.connect(stop):
            return None
        now = self.client.clock()
        for profile in self.profiles:
            when = self.due(profile, now)
            if when is not None and when <= now:
                await self.attempt(profile)
        now = self.client.clock()
        times = [t for t in (self.due(p, now) for p in self.profiles) if t is not None]
        for profile in self.profiles:
            t = self.due(profile, now)
            if t is not None:
                self.client.next_attempts[profile] = t
        return min(times) if times else None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or every profile has stopped)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            wake = await self.run_once(stop)
            if stop.is_set():
                break
            if wake is None and all(p in self.stopped for p in self.profiles):
                self.client.emit("agent_stopped", None, "; ".join(self.stopped.values()))
                return
            now = self.client.clock()
            delay = self.max_sleep if wake is None else min(max(wake - now, timedelta(0)), self.max_sleep)
            await self.client.sleep(delay.total_seconds())
