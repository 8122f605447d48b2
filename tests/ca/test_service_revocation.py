"""CAService revocation, status-list snapshots and CRLs -- checked with the real openssl CLI --
and openssl's verdict on certificates issued through the service (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from broker_plugin.ca.policy import PolicyRefusal
from broker_plugin.ca.service import UnknownStatusList
from broker_plugin.store.base import CertificateKind, CertificateStatus
from protocol import statuslist
from protocol.codes import ErrorCode, Profile, RevocationReason
from protocol.messages import (
    CertificateIssued,
    CertificateRequest,
    RenewalRequest,
    RevocationRequest,
    RevocationResult,
    RevocationSnapshot,
    SnapshotRequest,
)
from service_kit import Kit, make_csr, only_reply, openssl, pem, rid, write_all, write_chain


@pytest.fixture
def kit(registry) -> Kit:  # type: ignore[no-untyped-def]
    return Kit(registry)


def _bit(snapshot: RevocationSnapshot, index: int) -> bool:
    bits = statuslist.decompress(snapshot.bits, snapshot.size)
    return bool(bits[index // 8] & (0x80 >> (index % 8)))


async def test_operator_revokes_by_serial(kit: Kit) -> None:
    operator, _, _ = await kit.mint("acme", "alice", CertificateKind.OPERATOR)
    device, _, cert = await kit.mint("acme", "sensor-1")
    record = await kit.registry.get_certificate("acme", cert.serial_number)
    assert record is not None and record.status_index is not None and record.status_list_id is not None
    _, before = only_reply(await kit.dev(device, SnapshotRequest(request_id=rid())))
    assert isinstance(before, RevocationSnapshot) and not _bit(before, record.status_index)

    request_id = rid()
    message = RevocationRequest(request_id=request_id, reason=RevocationReason.KEY_COMPROMISE,
                                serial=cert.serial_number)
    outcome = await kit.ops(operator, message)
    topic, reply = only_reply(outcome)
    assert topic == "certmq/v1/acme/ops/alice/res"
    assert isinstance(reply, RevocationResult) and reply.request_id == request_id
    assert reply.serials == (cert.serial_number,)
    assert [r.serial for r in outcome.revoked] == [cert.serial_number]
    assert [(d.region, d.list_id, d.indices) for d in outcome.deltas] == [
        (record.region, record.status_list_id, (record.status_index,))
    ]
    stored = await kit.registry.get_certificate("acme", cert.serial_number)
    assert stored is not None and stored.status is CertificateStatus.REVOKED
    assert stored.revocation_reason == RevocationReason.KEY_COMPROMISE
    snap = await kit.service.snapshot(tenant="acme", region=record.region, list_id=record.status_list_id)
    assert _bit(snap, record.status_index) and snap.sequence == outcome.deltas[0].to_seq
    # Again: nothing newly revoked, nothing to feed.
    again = await kit.ops(operator, RevocationRequest(request_id=rid(), reason=RevocationReason.KEY_COMPROMISE,
                                                      serial=cert.serial_number))
    _, reply = only_reply(again)
    assert isinstance(reply, RevocationResult) and reply.serials == () and again.deltas == ()
    entries = [e async for e in kit.registry.audit_entries() if e.kind == "revoke"]
    assert entries[0].actor == "operator:alice" and entries[0].details["request_id"] == request_id.hex()
    await kit.audit_ok()


async def test_revoke_by_device_and_by_device_profile(kit: Kit) -> None:
    operator, _, _ = await kit.mint("acme", "alice", CertificateKind.OPERATOR)
    device, _, cert = await kit.mint("acme", "sensor-1")
    _, enc = only_reply(await kit.dev(device, CertificateRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, csr=make_csr("sensor-1")[1])))
    _, other = only_reply(await kit.dev((await kit.mint("acme", "sensor-2"))[0], CertificateRequest(
        request_id=rid(), profile=Profile.ENCRYPTION, csr=make_csr("sensor-2")[1])))
    assert isinstance(enc, CertificateIssued) and isinstance(other, CertificateIssued)
    _, reply = only_reply(await kit.ops(operator, RevocationRequest(
        request_id=rid(), reason=RevocationReason.SUPERSEDED, device_id="sensor-1", profile=Profile.ENCRYPTION)))
    assert isinstance(reply, RevocationResult) and reply.serials == (enc.serial,)
    assert (await kit.service.identify(cert)).name == "sensor-1"  # the identity certificate still works
    outcome = await kit.ops(operator, RevocationRequest(
        request_id=rid(), reason=RevocationReason.CESSATION_OF_OPERATION, device_id="sensor-1"))
    _, reply = only_reply(outcome)
    assert isinstance(reply, RevocationResult) and reply.serials == (cert.serial_number,)
    assert (await kit.registry.get_certificate("acme", other.serial)).status is CertificateStatus.ACTIVE  # type: ignore[union-attr]
    # Through the API: every certificate of a profile in the tenant.
    done = await kit.service.revoke(tenant="acme", reason=RevocationReason.SUPERSEDED, actor="op",
                                    profile=Profile.ENCRYPTION)
    assert [r.serial for r in done.revoked] == [other.serial] and done.replies == ()
    with pytest.raises(PolicyRefusal) as caught:
        await kit.service.revoke(tenant="acme", reason=RevocationReason.SUPERSEDED, actor="op", serial=12345)
    assert caught.value.code == ErrorCode.UNKNOWN_CERTIFICATE


async def test_snapshot_of_a_missing_list(kit: Kit) -> None:
    device, _, _ = await kit.mint("acme", "sensor-1")
    with pytest.raises(UnknownStatusList):
        await kit.service.snapshot(tenant="acme", region="eu", list_id=99)
    _, reply = only_reply(await kit.dev(device, SnapshotRequest(request_id=rid(), list_id=99)))
    assert reply.code == ErrorCode.UNKNOWN_CERTIFICATE  # type: ignore[union-attr]


def _verify(directory: Path, cert: x509.Certificate, *crls: x509.CertificateRevocationList, deltas: bool = False,
            purpose: str | None = None):  # type: ignore[no-untyped-def]
    cert_path = write_all(directory, f"{cert.serial_number:x}.pem", [cert])
    args: list[str | Path] = ["verify", "-x509_strict"]
    if purpose:
        args += ["-purpose", purpose]
    for n, crl in enumerate(crls):
        args += ["-CRLfile", write_all(directory, f"crl-{n}-{cert.serial_number:x}.pem", [crl])]
    if crls:
        args.append("-crl_check")
    if deltas:
        args.append("-use_deltas")
    return openssl(*args, "-CAfile", directory / "root.pem", "-untrusted", directory / "issuing.pem", cert_path)


def _revoked(result) -> bool:  # type: ignore[no-untyped-def]
    return result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr


async def test_full_crl_verified_and_used_by_openssl(kit: Kit, tmp_path: Path) -> None:
    write_chain(tmp_path, kit.authorities["acme"])
    _, _, bad = await kit.mint("acme", "sensor-1")
    _, _, good = await kit.mint("acme", "sensor-2")
    await kit.service.revoke(tenant="acme", serial=bad.serial_number, reason=RevocationReason.KEY_COMPROMISE,
                             actor="op")
    first = await kit.service.crl(tenant="acme")
    second = await kit.service.crl(tenant="acme")
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for c in (first, second)]
    assert numbers[0] < numbers[1]
    crl_path = write_all(tmp_path, "acme.crl.pem", [second])
    checked = openssl("crl", "-in", crl_path, "-CAfile", tmp_path / "chain.pem", "-noout")
    assert "verify OK" in checked.stdout + checked.stderr, checked.stderr
    assert _revoked(_verify(tmp_path, bad, second))
    accepted = _verify(tmp_path, good, second)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # globex's CRL does not verify under acme's chain, and says nothing about acme's certificates.
    foreign = write_all(tmp_path, "globex.crl.pem", [await kit.service.crl(tenant="globex")])
    checked = openssl("crl", "-in", foreign, "-CAfile", tmp_path / "chain.pem", "-noout")
    assert "verify OK" not in checked.stdout + checked.stderr


async def test_region_shards_and_delta_crls(kit: Kit, tmp_path: Path) -> None:
    write_chain(tmp_path, kit.authorities["acme"])
    _, _, eu_bad = await kit.mint("acme", "sensor-1", region="eu")
    _, _, eu_late = await kit.mint("acme", "sensor-2", region="eu")
    _, _, eu_good = await kit.mint("acme", "sensor-3", region="eu")
    _, _, west_bad = await kit.mint("acme", "sensor-4", region="west")
    with pytest.raises(ValueError, match="delta CRL needs a base"):
        await kit.service.crl(tenant="acme", region="eu", delta=True)
    for cert in (eu_bad, west_bad):
        await kit.service.revoke(tenant="acme", serial=cert.serial_number, reason=RevocationReason.KEY_COMPROMISE,
                                 actor="op")
    kit.clock.advance(dt.timedelta(seconds=10))
    base = await kit.service.crl(tenant="acme", region="eu")
    assert {r.serial_number for r in base} == {eu_bad.serial_number}
    idp = base.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert [n.value for n in idp.full_name or []] == ["http://crl.example/certmq/acme/eu.crl"]
    assert _revoked(_verify(tmp_path, eu_bad, base))
    assert _verify(tmp_path, eu_late, base).returncode == 0
    west = await kit.service.crl(tenant="acme", region="west")
    assert {r.serial_number for r in west} == {west_bad.serial_number}
    assert _revoked(_verify(tmp_path, west_bad, west))

    kit.clock.advance(dt.timedelta(seconds=30))
    await kit.service.revoke(tenant="acme", serial=eu_late.serial_number, reason=RevocationReason.SUPERSEDED,
                             actor="op")
    delta = await kit.service.crl(tenant="acme", region="eu", delta=True)
    base_number = base.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical and indicator.value.crl_number == base_number
    assert delta.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > base_number
    assert {r.serial_number for r in delta} == {eu_late.serial_number}
    checked = openssl("crl", "-in", write_all(tmp_path, "delta.pem", [delta]), "-CAfile", tmp_path / "chain.pem",
                      "-noout")
    assert "verify OK" in checked.stdout + checked.stderr
    assert _revoked(_verify(tmp_path, eu_late, base, delta, deltas=True))
    plain = _verify(tmp_path, eu_late, base)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # the base alone predates it: the delta rejected it
    assert _verify(tmp_path, eu_good, base, delta, deltas=True).returncode == 0


async def test_certificates_from_every_service_path_pass_openssl_strict(kit: Kit, tmp_path: Path) -> None:
    write_chain(tmp_path, kit.authorities["acme"])
    claim = await kit.claim_credential("acme", "claim-1")
    _, provisioned = only_reply(await kit.provision(claim, "sensor-1"))
    assert isinstance(provisioned, CertificateIssued)
    device = await kit.service.identify(provisioned.x509)
    _, renewed = only_reply(await kit.dev(device, RenewalRequest(
        request_id=rid(), profile=Profile.IDENTITY, current_serial=provisioned.serial, csr=make_csr("sensor-1")[1])))
    assert isinstance(renewed, CertificateIssued)
    await kit.mint("acme", "alice", CertificateKind.OPERATOR)
    operator = x509.load_der_x509_certificate(
        (await kit.registry.certificates_for_device("acme", "alice"))[0].der)
    for cert in (provisioned.x509, renewed.x509, operator):
        result = _verify(tmp_path, cert, purpose="sslclient")
        assert result.returncode == 0, result.stdout + result.stderr
    # The chain sent in the reply is exactly the tenant's issuing + root.
    assert [pem(x509.load_der_x509_certificate(d)) for d in provisioned.chain] == [
        pem(kit.authorities["acme"].issuing), pem(kit.authorities["acme"].root)]
