"""DeviceClient over MemoryTransport with a real CA: enrollment, renewal, retries, rollback."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from device_fakes import FakeCA, VirtualClock, make_client, write_bootstrap

from device_client.certstore import RotationRejected
from device_client.client import NoReply, RecoveryWindowPassed
from device_client.enroll import BootstrapExpiring, verify_chain
from device_client.transport import MemoryBroker
from protocol.codes import ErrorCode, Profile
from protocol.errors import RequestRejected
from protocol.messages import CertificateRequest, RenewalRequest
from protocol.renewal import RenewalWindow, renewal_time


async def test_enroll_provisions_reconnects_and_destroys_bootstrap(fake_ca: FakeCA, broker: MemoryBroker,
                                                                   clock: VirtualClock, bootstrapped: Path) -> None:
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        slot = await dc.enroll()
        assert dc.connected_as == "identity"
    # the request went to the provisioning topic, claiming this device id
    req = fake_ca.requests[0]
    assert isinstance(req, CertificateRequest) and req.provisioning is not None
    assert req.provisioning.device_id == "sensor-0042"
    assert broker.published[0][1] == "certmq/v1/acme/prov/sensor-0042/req"
    # first connection with the bootstrap certificate, the second with the new one
    assert broker.connections[0].leaf().issuer == fake_ca.bootstrap_ca.issuing.subject  # type: ignore[union-attr]
    assert broker.connections[1].leaf() == slot.certificate
    assert slot.certificate == fake_ca.issued[0]
    verify_chain(slot.certificate, intermediates=slot.chain, trust=fake_ca.trust, now=clock.now())
    assert not (bootstrapped / "bootstrap.key").exists() and not (bootstrapped / "bootstrap.crt").exists()
    key_file = bootstrapped / "keys" / f"{slot.key_label}.key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_enroll_keeps_bootstrap_when_configured(fake_ca: FakeCA, broker: MemoryBroker,
                                                      clock: VirtualClock, bootstrapped: Path) -> None:
    async with make_client(fake_ca, broker, clock, bootstrapped, destroy_bootstrap=False) as dc:
        await dc.enroll()
    assert (bootstrapped / "bootstrap.key").exists()


async def test_bootstrap_expiring_within_margin_is_refused_before_anything(fake_ca: FakeCA, broker: MemoryBroker,
                                                                           clock: VirtualClock, device_dir: Path) -> None:
    # bootstrap lifetime is 365 days; issued 364.5 days ago -> expires in 12 h, margin 1 day
    write_bootstrap(fake_ca, device_dir, not_before=clock.now() - timedelta(days=364, hours=12))
    async with make_client(fake_ca, broker, clock, device_dir) as dc:
        with pytest.raises(BootstrapExpiring):
            await dc.enroll()
    assert broker.published == [] and broker.connections == []
    assert list((device_dir / "keys").iterdir()) == []
    # with a smaller margin it goes through
    async with make_client(fake_ca, broker, clock, device_dir, bootstrap_margin=timedelta(hours=6)) as dc:
        await dc.enroll()


async def test_retry_after_busy_reuses_the_request_id(fake_ca: FakeCA, broker: MemoryBroker,
                                                      clock: VirtualClock, bootstrapped: Path) -> None:
    fake_ca.busy = 2
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        await dc.enroll()
    ids = {r.request_id for r in fake_ca.requests}  # type: ignore[attr-defined]
    assert len(fake_ca.requests) == 3 and len(ids) == 1
    assert len(fake_ca.issued) == 1
    # each wait honours retry_after (40 s) plus jitter no larger than max(ceiling, retry_after)
    assert len(clock.sleeps) == 2
    # retry_after (40 s) plus full jitter under max(backoff ceiling 30 s * 2**(n-1), retry_after)
    assert 40 <= clock.sleeps[0] <= 80 and 40 <= clock.sleeps[1] <= 100


async def test_lost_reply_is_retried_with_same_id_and_ca_answers_from_memory(fake_ca: FakeCA, broker: MemoryBroker,
                                                                             clock: VirtualClock, bootstrapped: Path) -> None:
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        await dc.enroll()
        original = broker.handler

        dropped = []

        def lose_first_reply(b: MemoryBroker, creds, topic, payload):  # type: ignore[no-untyped-def]
            if not dropped:
                dropped.append(1)
                fake_ca.handle(MemoryBroker(), creds, topic, payload)  # CA issues, reply lost
                return None
            return original(b, creds, topic, payload)  # type: ignore[misc]

        broker.handler = lose_first_reply
        await dc.renew()
    renewals = [r for r in fake_ca.requests if isinstance(r, RenewalRequest)]
    assert len(renewals) == 2 and renewals[0].request_id == renewals[1].request_id
    assert len(fake_ca.issued) == 2  # one enrollment, one renewal: never two for the same id


async def test_permanent_error_is_raised_without_retry(fake_ca: FakeCA, broker: MemoryBroker, clock: VirtualClock,
                                                       bootstrapped: Path) -> None:
    from protocol import codec, topics
    from protocol.messages import Error

    def refuse(b: MemoryBroker, creds, topic, payload):  # type: ignore[no-untyped-def]
        msg = codec.decode(payload)
        b.deliver(topics.response_topic_for(topics.parse_topic(topic)),
                  codec.encode(Error(code=ErrorCode.CLAIM_REFUSED, text="claimed already", request_id=msg.request_id)))

    broker.handler = refuse
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        with pytest.raises(RequestRejected) as info:
            await dc.enroll()
        assert info.value.code == ErrorCode.CLAIM_REFUSED
        assert dc.store.current(Profile.IDENTITY) is None
    assert len(broker.published) == 1
    assert (bootstrapped / "bootstrap.key").exists()  # nothing destroyed on failure


async def test_no_reply_gives_up_after_max_attempts_keeping_the_pending_id(fake_ca: FakeCA, broker: MemoryBroker,
                                                                           clock: VirtualClock, bootstrapped: Path) -> None:
    fake_ca.silent = 10
    async with make_client(fake_ca, broker, clock, bootstrapped, max_attempts=3) as dc:
        with pytest.raises(NoReply):
            await dc.enroll()
        pending = dc.store.pending(Profile.IDENTITY)
        assert pending is not None
    fake_ca.silent = 0
    # a new process (new client, same directory) re-sends the very same request id
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc2:
        await dc2.enroll()
    ids = [r.request_id for r in fake_ca.requests]  # type: ignore[attr-defined]
    assert len(ids) == 4 and set(ids) == {pending.request_id}


async def test_renewal_rotates_key_and_keeps_previous(fake_ca: FakeCA, broker: MemoryBroker, clock: VirtualClock,
                                                      bootstrapped: Path) -> None:
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        first = await dc.enroll()
        clock.advance(timedelta(days=70))
        second = await dc.renew()
        assert second.key_label != first.key_label and second.serial != first.serial
        assert dc.store.previous(Profile.IDENTITY) == first
        assert broker.connections[-1].leaf() == second.certificate
        assert dc.store.pending(Profile.IDENTITY) is None


async def test_rejected_new_certificate_rolls_back(fake_ca: FakeCA, broker: MemoryBroker, clock: VirtualClock,
                                                   bootstrapped: Path) -> None:
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        first = await dc.enroll()
        original = fake_ca.issue

        def issue_and_refuse(*a, **kw):  # type: ignore[no-untyped-def]
            cert = original(*a, **kw)
            fake_ca.refuse_serials.add(cert.serial_number)
            return cert

        fake_ca.issue = issue_and_refuse  # type: ignore[method-assign]
        with pytest.raises(RotationRejected):
            await dc.renew()
        assert dc.store.current(Profile.IDENTITY) == first
        assert dc.store.next(Profile.IDENTITY) is None
        assert dc.connected_as == "identity" and broker.connections[-1].leaf() == first.certificate
        # the rejected key is gone from the key store
        assert dc.keystore.labels() == [first.key_label]


async def test_expired_certificate_recovery_reuses_key(clock: VirtualClock, device_dir: Path) -> None:
    from device_fakes import make_ca

    fake = make_ca(clock, recovery=timedelta(days=30))
    broker = fake.broker()
    write_bootstrap(fake, device_dir, not_before=clock.now() - timedelta(days=1))
    async with make_client(fake, broker, clock, device_dir, recovery_window=timedelta(days=30)) as dc:
        first = await dc.enroll()
        clock.advance(timedelta(days=95))  # expired 5 days ago
        await dc.close()
        second = await dc.renew()
        req = fake.requests[-1]
        assert isinstance(req, RenewalRequest) and req.reuse_key and req.csr is None
        assert second.key_label == first.key_label and second.not_after > clock.now()
        clock.advance(timedelta(days=200))
        with pytest.raises(RecoveryWindowPassed):
            await dc.renew()


async def test_server_suggested_window_overrides_policy(fake_ca: FakeCA, broker: MemoryBroker, clock: VirtualClock,
                                                        bootstrapped: Path) -> None:
    window = RenewalWindow(start=clock.now() + timedelta(days=10), end=clock.now() + timedelta(days=20))
    fake_ca.suggest = window
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        slot = await dc.enroll()
        status = dc.status()[Profile.IDENTITY]
    assert status.renew_at == renewal_time("sensor-0042", not_before=slot.not_before, not_after=slot.not_after,
                                           suggested=window)
    assert status.renew_at in window
    assert 89 < status.days_to_expiry < 91  # type: ignore[operator]


async def test_second_profile_is_requested_on_the_device_topic(fake_ca: FakeCA, broker: MemoryBroker,
                                                               clock: VirtualClock, bootstrapped: Path) -> None:
    async with make_client(fake_ca, broker, clock, bootstrapped) as dc:
        ident = await dc.enroll()
        ota = await dc.enroll(Profile.OTA_SIGNING)
        assert dc.store.current(Profile.IDENTITY) == ident
        assert dc.store.current(Profile.OTA_SIGNING) == ota and ota.key_label != ident.key_label
    assert broker.published[-1][1] == "certmq/v1/acme/dev/sensor-0042/req"
    req = fake_ca.requests[-1]
    assert isinstance(req, CertificateRequest) and req.profile is Profile.OTA_SIGNING and req.provisioning is None
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography import x509
    assert ExtendedKeyUsageOID.CODE_SIGNING in ota.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
