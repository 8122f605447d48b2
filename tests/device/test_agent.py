"""RenewalAgent in virtual time: schedules per profile, backoff, retry-after, broker restarts, restarts mid-request."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from device_fakes import FakeCA, VirtualClock, make_ca, make_client, write_bootstrap

from device_client.agent import RenewalAgent
from device_client.client import Event
from protocol.codes import Profile
from protocol.messages import RenewalRequest
from protocol.renewal import RenewalPolicy, next_attempt, renewal_time


async def _run_until(agent: RenewalAgent, clock: VirtualClock, until, limit: int = 500) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    for _ in range(limit):
        wake = await agent.run_once(stop)
        if until():
            return
        if wake is None:
            break
        await clock.sleep(max((wake - clock.now()).total_seconds(), 0))
    raise AssertionError("condition not reached")


async def test_each_profile_renews_on_its_own_schedule(fake_ca: FakeCA, clock: VirtualClock, bootstrapped: Path) -> None:
    broker = fake_ca.broker()
    events: list[Event] = []
    policies = {Profile.IDENTITY: RenewalPolicy(start=0.5, end=0.6), Profile.OTA_SIGNING: RenewalPolicy(start=0.8, end=0.9)}
    async with make_client(fake_ca, broker, clock, bootstrapped, policies=policies, on_event=events.append) as dc:
        ident = await dc.enroll()
        ota = await dc.enroll(Profile.OTA_SIGNING)
        agent = RenewalAgent(client=dc, profiles=[Profile.IDENTITY, Profile.OTA_SIGNING])
        expect_ident = renewal_time("sensor-0042", not_before=ident.not_before, not_after=ident.not_after, policy=policies[Profile.IDENTITY])
        expect_ota = renewal_time("sensor-0042", not_before=ota.not_before, not_after=ota.not_after, policy=policies[Profile.OTA_SIGNING])
        assert agent.status()[Profile.IDENTITY].next_attempt == expect_ident
        await _run_until(agent, clock, lambda: agent.renewals == 1)
        # the identity renewal happened at its moment, and the OTA one is still ahead
        assert expect_ident <= clock.now() < expect_ident + timedelta(seconds=1)
        assert dc.store.current(Profile.OTA_SIGNING) == ota
        await _run_until(agent, clock, lambda: agent.renewals == 2)
        assert expect_ota <= clock.now() < expect_ota + timedelta(seconds=1)
        assert dc.store.current(Profile.OTA_SIGNING) != ota
    assert [e.kind for e in events].count("promoted") == 4


async def test_busy_backoff_honours_retry_after_and_keeps_the_request_id(fake_ca: FakeCA, clock: VirtualClock,
                                                                        bootstrapped: Path) -> None:
    broker = fake_ca.broker()
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        first = await dc.enroll()
        agent = RenewalAgent(client=dc)
        fake_ca.busy, fake_ca.busy_retry_after = 3, 3600
        due = dc.renew_at(Profile.IDENTITY)
        assert due is not None
        await _run_until(agent, clock, lambda: dc.store.current(Profile.IDENTITY) != first)
    renewals = [r for r in fake_ca.requests if isinstance(r, RenewalRequest)]
    assert len(renewals) == 4 and len({r.request_id for r in renewals}) == 1
    # three refusals, each honoured for at least an hour
    assert clock.now() - due >= timedelta(hours=3)
    assert len(fake_ca.issued) == 2


async def test_survives_broker_restart_and_outage(fake_ca: FakeCA, clock: VirtualClock, bootstrapped: Path) -> None:
    broker = fake_ca.broker()
    events: list[Event] = []
    async with make_client(fake_ca, broker, clock, bootstrapped, on_event=events.append) as dc:
        first = await dc.enroll()
        agent = RenewalAgent(client=dc)
        due = dc.renew_at(Profile.IDENTITY)
        assert due is not None
        clock.time = due - timedelta(minutes=1)
        broker.restart()
        broker.down = True
        await asyncio.sleep(0)  # the reader notices the drop
        assert dc.connected_as is None
        attempts = {"n": 0}
        real_sleep = clock.sleep

        async def sleep_then_recover(seconds: float) -> None:
            attempts["n"] += 1
            if attempts["n"] == 6:
                broker.down = False
            await real_sleep(seconds)

        dc.sleep = sleep_then_recover  # type: ignore[method-assign]
        await _run_until(agent, clock, lambda: dc.store.current(Profile.IDENTITY) != first)
    kinds = [e.kind for e in events]
    assert kinds.count("reconnect_failed") >= 5 and "reconnected" in kinds
    assert dc.store.current(Profile.IDENTITY).serial != first.serial  # type: ignore[union-attr]


async def test_restart_mid_request_resends_the_same_id(fake_ca: FakeCA, clock: VirtualClock, bootstrapped: Path) -> None:
    broker = fake_ca.broker()
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        first = await dc.enroll()
        fake_ca.silent = 1
        due = dc.renew_at(Profile.IDENTITY)
        assert due is not None
        clock.time = due
        agent = RenewalAgent(client=dc)
        await agent.run_once()
        pending = dc.store.pending(Profile.IDENTITY)
        assert pending is not None and agent.retries[Profile.IDENTITY].failures == 1
    # "process restart": a new client and agent over the same directory
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc2:
        agent2 = RenewalAgent(client=dc2)
        assert agent2.due(Profile.IDENTITY, clock.now()) == clock.now()
        await agent2.run_once()
        assert dc2.store.current(Profile.IDENTITY) != first
    renewals = [r for r in fake_ca.requests if isinstance(r, RenewalRequest)]
    assert [r.request_id for r in renewals] == [pending.request_id] * 2


async def test_expired_within_recovery_renews_with_same_key_past_it_stops(clock: VirtualClock, device_dir: Path) -> None:
    fake = make_ca(clock, recovery=timedelta(days=10))
    broker = fake.broker()
    write_bootstrap(fake, device_dir, not_before=clock.now() - timedelta(days=1))
    events: list[Event] = []
    async with make_client(fake, broker, clock, device_dir, recovery_window=timedelta(days=10), on_event=events.append) as dc:
        first = await dc.enroll()
        clock.time = first.not_after + timedelta(days=3)  # the device was off for months
        agent = RenewalAgent(client=dc)
        await agent.run_once()
        second = dc.store.current(Profile.IDENTITY)
        assert second is not None and second.key_label == first.key_label and second.not_after > clock.now()
        clock.time = second.not_after + timedelta(days=11)
        await agent.run()  # returns: nothing left to look after
    assert agent.stopped and "reprovision_needed" in [e.kind for e in events]
    assert agent.status()[Profile.IDENTITY].last_error is not None


def test_backoff_rule_is_protocol_next_attempt() -> None:
    # the agent's schedule after failures is exactly protocol.renewal.next_attempt with the client's rng
    import random

    from device_fakes import T0

    class Stub:
        rng = random.Random(7)
        failures: dict = {}  # type: ignore[type-arg]
        last_errors: dict = {}  # type: ignore[type-arg]
        next_attempts: dict = {}  # type: ignore[type-arg]

    agent = RenewalAgent(client=Stub())  # type: ignore[arg-type]
    err = TimeoutError("x")
    s1 = agent.record_failure(Profile.IDENTITY, err, T0)
    s2 = agent.record_failure(Profile.IDENTITY, err, T0)
    ref = random.Random(7)
    assert s1.next_attempt == next_attempt(now=T0, failures=1, rng=ref)
    assert s2.next_attempt == next_attempt(now=T0, failures=2, rng=ref)
    assert s2.failures == 2
