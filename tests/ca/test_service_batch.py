"""CAService batching: ``handle_many`` reserves a batch's status slots and commits its certificates with
one registry call each, with the same outcomes as one request at a time; concurrent ``handle()``
calls are coalesced into batches; ``issue_direct`` refusals are audited (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from typing import Any

import pytest

from broker_plugin.ca.policy import PolicyRefusal
from broker_plugin.ca.service import CAService
from broker_plugin.store.base import CertificateKind, CertificateRecord, RegistryError
from protocol.codec import decode, encode
from protocol.codes import ErrorCode, Profile
from protocol.messages import CertificateIssued, CertificateRequest, Error, ProvisioningParameters
from protocol.topics import provisioning_request_topic
from service_kit import Kit, make_csr, only_reply, rid


@pytest.fixture
def kit(registry) -> Kit:  # type: ignore[no-untyped-def]
    return Kit(registry)


def _request(claim: Any, device: str, *, request_id: bytes | None = None, csr: bytes | None = None) -> tuple:
    message = CertificateRequest(
        request_id=request_id or rid(), profile=Profile.IDENTITY, csr=csr if csr is not None else make_csr(device)[1],
        provisioning=ProvisioningParameters(device_id=device),
    )
    return claim, provisioning_request_topic(claim.tenant, device), encode(message)


def _mixed(claim: Any) -> list[tuple]:
    """Fresh claims, a repeated request, a reused request id, a claim past its uses, garbage, a CSR for
    another device."""
    repeat = _request(claim, "sensor-1")
    reused_id = rid()
    # (Refusals a request meets before its claim runs out, so one-at-a-time meets them too.)
    return [
        repeat,
        _request(claim, "sensor-2", request_id=reused_id),
        repeat,
        _request(claim, "sensor-6", csr=make_csr("sensor-7")[1]),
        (claim, provisioning_request_topic(claim.tenant, "sensor-5"), b"\xa1\x00"),
        _request(claim, "sensor-9", request_id=reused_id),  # same id, other request
        _request(claim, "sensor-3"),
        _request(claim, "sensor-4"),                        # the claim has 3 uses: refused
    ]


def _summary(outcome: Any) -> tuple:
    _, reply = only_reply(outcome)
    if isinstance(reply, CertificateIssued):
        return ("issued", reply.x509.subject.rfc4514_string().split(",")[0])
    assert isinstance(reply, Error)
    return ("error", ErrorCode(reply.code))


async def test_batch_has_the_outcomes_of_one_request_at_a_time(kit: Kit) -> None:
    batched_claim = await kit.claim_credential("acme", "claim-1", max_uses=3)
    single_claim = await kit.claim_credential("globex", "claim-1", max_uses=3)
    batched = await kit.service.handle_many(_mixed(batched_claim))
    singles = [await kit.service.handle(*item) for item in _mixed(single_claim)]
    got = [_summary(o) for o in batched]
    assert got == [_summary(o) for o in singles]
    assert got[0] == got[2] == ("issued", "CN=sensor-1")
    assert [g[1] for g in got[3:6]] == [ErrorCode.IDENTITY_MISMATCH, ErrorCode.MALFORMED, ErrorCode.REQUEST_ID_REUSED]
    assert got[6] == ("issued", "CN=sensor-3") and got[7] == ("error", ErrorCode.CLAIM_REFUSED)
    # The repeated request got the SAME certificate; three uses spent, three device certificates.
    assert only_reply(batched[0])[1].certificate == only_reply(batched[2])[1].certificate  # type: ignore[union-attr]
    for tenant in ("acme", "globex"):
        uses = await kit.registry.claim_uses(tenant, "claim-1")
        assert sorted(u.device_id for u in uses) == ["sensor-1", "sensor-2", "sensor-3"]
        devices = [r for d in ("sensor-1", "sensor-2", "sensor-3", "sensor-4", "sensor-6", "sensor-9")
                   for r in await kit.registry.certificates_for_device(tenant, d)]
        assert len(devices) == 3
        slots = {(r.region, r.status_list_id, r.status_index) for r in devices}
        assert len(slots) == 3
    refusals = await kit.refusals()
    for tenant in ("acme", "globex"):
        assert sorted(r["code"] for r in refusals if r["tenant"] == tenant) == sorted(
            int(g[1]) for g in got if g[0] == "error")
    await kit.audit_ok()


class _Counting:
    """Counts the registry calls the service makes (wrapping the real registry's methods)."""

    def __init__(self, registry: Any, names: tuple[str, ...]) -> None:
        self.calls: dict[str, list[int]] = {n: [] for n in names}
        for name in names:
            real = getattr(registry, name)

            async def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                size = args[3] if _name == "allocate_status_indices" else len(args[0]) if args and isinstance(
                    args[0], list) else 1
                self.calls[_name].append(size)
                return await _real(*args, **kw)

            setattr(registry, name, counted)


async def test_a_batch_costs_one_reservation_and_one_commit(kit: Kit) -> None:
    # Without spare slots (status_block=0) every batch reserves its own: one call for all of them.
    # (With them, most batches reserve nothing: tests/ca/test_status_blocks.py.)
    kit.service = CAService(registry=kit.registry, authorities=kit.authorities, signer=kit.signer,
                            clock=kit.clock, status_block=0)
    claim = await kit.claim_credential("acme", "claim-1", max_uses=20)
    counts = _Counting(kit.registry, ("allocate_status_indices", "allocate_status_index", "commit_issuances",
                                      "commit_issuance"))
    outcomes = await kit.service.handle_many([_request(claim, f"sensor-{i}") for i in range(12)])
    assert all(_summary(o)[0] == "issued" for o in outcomes)
    assert counts.calls == {"allocate_status_indices": [12], "allocate_status_index": [], "commit_issuances": [12],
                            "commit_issuance": []}
    serials = [only_reply(o)[1].x509.serial_number for o in outcomes]  # type: ignore[union-attr]
    records = [await kit.registry.get_certificate("acme", s) for s in serials]
    indices = sorted(r.status_index for r in records)  # type: ignore[union-attr]
    assert indices == list(range(indices[0], indices[0] + 12))  # one reservation: consecutive slots


async def test_a_failed_batch_commit_answers_every_request_and_issues_nothing(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1", max_uses=20)

    async def broken(items: Any) -> Any:
        raise RegistryError("disk on fire")

    kit.registry.commit_issuances = broken  # type: ignore[method-assign]
    outcomes = await kit.service.handle_many([_request(claim, f"sensor-{i}") for i in range(3)])
    assert [_summary(o) for o in outcomes] == [("error", ErrorCode.INTERNAL)] * 3
    assert await kit.registry.claim_uses("acme", "claim-1") == []
    assert len([r for r in await kit.refusals() if r["code"] == ErrorCode.INTERNAL]) == 3
    await kit.audit_ok()


async def test_concurrent_handle_calls_are_coalesced(kit: Kit) -> None:
    claim = await kit.claim_credential("acme", "claim-1", max_uses=40)
    service = CAService(registry=kit.registry, authorities=kit.authorities, signer=kit.signer, clock=kit.clock,
                        coalesce=8)
    sizes: list[int] = []
    real = service.handle_many

    async def counting(items: Any) -> Any:
        sizes.append(len(items))
        return await real(items)

    service.handle_many = counting  # type: ignore[method-assign]
    items = [_request(claim, f"sensor-{i}") for i in range(20)]
    outcomes = await asyncio.gather(*(service.handle(*item) for item in items))
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20
    for item, outcome in zip(items, outcomes):  # every caller got ITS reply
        topic, reply = only_reply(outcome)
        assert isinstance(reply, CertificateIssued) and topic.startswith(item[1].rsplit("/", 1)[0])
        assert reply.request_id == decode(item[2]).request_id  # type: ignore[attr-defined]
    assert len({only_reply(o)[1].certificate for o in outcomes}) == 20  # type: ignore[union-attr]
    # A lone call still works (no batch in flight: it leaves at once).
    lone = await service.handle(*_request(claim, "sensor-99"))
    assert _summary(lone) == ("issued", "CN=sensor-99")
    await kit.audit_ok()


def test_coalescing_arguments_are_checked(kit: Kit) -> None:
    for bad in ({"coalesce": -1}, {"coalesce": True}, {"coalesce_linger": 5.0}, {"coalesce_in_flight": 0}):
        with pytest.raises(ValueError):
            CAService(registry=kit.registry, authorities=kit.authorities, signer=kit.signer, clock=kit.clock,
                      **bad)


async def test_issue_direct_refusals_are_audited(kit: Kit) -> None:
    with pytest.raises(PolicyRefusal) as caught:
        await kit.service.issue_direct(tenant="acme", device_id="dev-1", profile=Profile.IDENTITY,
                                       csr_der=make_csr("dev-2")[1], kind=CertificateKind.FACTORY, actor="line-3")
    assert caught.value.code == ErrorCode.IDENTITY_MISMATCH
    last = (await kit.refusals())[-1]
    assert last["code"] == ErrorCode.IDENTITY_MISMATCH and last["actor"] == "line-3"
    assert last["tenant"] == "acme" and last["stage"] == "issue_direct" and "dev-2" in last["reason"]
    assert await kit.registry.certificates_for_device("acme", "dev-1") == []
    await kit.audit_ok()


async def test_a_backend_without_validity_in_its_results_stores_the_same_records(kit: Kit) -> None:
    import dataclasses

    class Bare:
        """A signing backend whose results do not carry the validity (it is read off the certificate)."""

        async def sign(self, jobs: Any) -> Any:
            return [dataclasses.replace(r, not_before=None, not_after=None) for r in await kit.signer.sign(jobs)]

        async def close(self) -> None:
            pass

    claim = await kit.claim_credential("acme", "claim-1", max_uses=20)
    bare = CAService(registry=kit.registry, authorities=kit.authorities, signer=Bare(), clock=kit.clock)
    for n, service in enumerate((kit.service, bare)):
        [outcome] = await service.handle_many([_request(claim, f"sensor-{n}")])
        cert = only_reply(outcome)[1].x509  # type: ignore[union-attr]
        record = await kit.registry.get_certificate("acme", cert.serial_number)
        assert record is not None
        assert (record.not_before, record.not_after) == (cert.not_valid_before_utc, cert.not_valid_after_utc)


async def test_records_built_without_checks_equal_the_checked_ones(kit: Kit) -> None:
    # The service builds the records and audit events of what it just signed without their
    # constructors' checks: what it commits, returns and what the registry reads back must be
    # exactly what the checked constructors make of the same values.
    claim = await kit.claim_credential("acme", "claim-1", max_uses=5)
    committed: list[Any] = []
    real = kit.registry.commit_issuances

    async def spy(items: Any) -> Any:
        committed.extend(items)
        return await real(items)

    kit.registry.commit_issuances = spy  # type: ignore[method-assign]
    outcomes = await kit.service.handle_many([_request(claim, f"sensor-{i}") for i in range(3)])
    assert all(_summary(o)[0] == "issued" for o in outcomes) and len(committed) == 3
    for item in committed:
        record = item.record
        checked = CertificateRecord(**{f.name: getattr(record, f.name) for f in dataclasses.fields(record)})
        assert record == checked
        assert type(record.kind) is CertificateKind and record.not_before.tzinfo is dt.UTC
        assert await kit.registry.get_certificate("acme", record.serial) == record
        assert dataclasses.replace(item.audit) == item.audit  # replace() runs the checks
        assert dataclasses.replace(item) == item
    await kit.audit_ok()


async def test_a_bad_signer_result_is_still_checked(kit: Kit) -> None:
    # What comes back from the signing backend (another process) is not trusted: a malformed
    # result is refused (INTERNAL) and nothing is committed.
    claim = await kit.claim_credential("acme", "claim-1", max_uses=5)
    real_sign = kit.signer.sign

    async def broken(jobs: Any) -> Any:
        return [dataclasses.replace(r, spki_sha256=b"short") for r in await real_sign(jobs)]

    kit.service._signer = type("Broken", (), {"sign": staticmethod(broken)})()  # type: ignore[attr-defined]
    [outcome] = await kit.service.handle_many([_request(claim, "sensor-1")])
    assert _summary(outcome) == ("error", ErrorCode.INTERNAL)
    assert await kit.registry.certificates_for_device("acme", "sensor-1") == []
    await kit.audit_ok()
