"""Status slots reserved in blocks: most batches cost no reservation of their own, and still no two
certificates share a status position -- across batches, lists, restarts and two services on one
database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography import x509

from broker_plugin.ca.service import CAService
from broker_plugin.store.base import Registry, RegistryError, open_registry
from protocol import extensions, statuslist
from protocol.codec import encode
from protocol.codes import ErrorCode, Profile, RevocationReason
from protocol.messages import CertificateIssued, CertificateRequest, Error, ProvisioningParameters
from protocol.topics import provisioning_request_topic
from service_kit import Kit, make_authority, make_csr, only_reply, rid

CAPACITY = 2048  # a block may hold up to CAPACITY // 64 = 32 spare slots


def _kit(registry: Registry, *, capacity: int = CAPACITY, block: int = 32, authorities: Any = None) -> Kit:
    kit = Kit(registry, authorities or {"acme": make_authority("acme", status_list_capacity=capacity)})
    kit.service = _service(kit, registry, block)
    return kit


def _service(kit: Kit, registry: Registry, block: int) -> CAService:
    return CAService(registry=registry, authorities=kit.authorities, signer=kit.signer, clock=kit.clock,
                     status_block=block)


def _requests(claim: Any, first: int, count: int) -> list[tuple[Any, str, bytes]]:
    out = []
    for i in range(first, first + count):
        device = f"sensor-{i}"
        message = CertificateRequest(request_id=rid(), profile=Profile.IDENTITY, csr=make_csr(device)[1],
                                     provisioning=ProvisioningParameters(device_id=device))
        out.append((claim, provisioning_request_topic(claim.tenant, device), encode(message)))
    return out


class _Reservations:
    """Records the (count, spare) of every status-slot reservation the service makes."""

    def __init__(self, registry: Registry) -> None:
        self.calls: list[tuple[int, int]] = []
        real = registry.allocate_status_indices

        async def counted(tenant: str, region: str, capacity: int, count: int, *, spare: int = 0) -> Any:
            self.calls.append((count, spare))
            return await real(tenant, region, capacity, count, spare=spare)

        registry.allocate_status_indices = counted  # type: ignore[method-assign]


async def _positions(kit: Kit, outcomes: list[Any]) -> list[tuple[int, int]]:
    """The status position of each issued certificate, as the certificate carries it -- and the
    registry records the same one."""
    out = []
    for outcome in outcomes:
        _, reply = only_reply(outcome)
        assert isinstance(reply, CertificateIssued), reply
        cert = reply.x509
        oid = x509.ObjectIdentifier(extensions.STATUS_POSITION_OID)
        position = extensions.decode_status_position(cert.extensions.get_extension_for_oid(oid).value.value)
        record = await kit.registry.get_certificate("acme", cert.serial_number)
        assert record is not None and (record.status_list_id, record.status_index) == tuple(position)
        out.append(tuple(position))
    return out


async def test_most_batches_cost_no_reservation(registry: Registry) -> None:
    kit = _kit(registry)
    claim = await kit.claim_credential("acme", "claim-1", max_uses=100)
    reservations = _Reservations(registry)
    outcomes = []
    for first in range(0, 48, 12):
        outcomes += await kit.service.handle_many(_requests(claim, first, 12))
    # The claim credential's issuance left 32 spare slots: batches 1-2 use 24 of them, batch 3
    # takes the last 8 and reserves 4 more (+32 spare), batch 4 reserves nothing.
    assert reservations.calls == [(4, 32)]
    positions = await _positions(kit, outcomes)
    assert len(set(positions)) == 48
    assert all(list_id == 1 and 0 <= index < CAPACITY for list_id, index in positions)
    await kit.audit_ok()


async def test_spare_slots_roll_over_with_the_list_and_revocation_flips_the_right_bit(registry: Registry) -> None:
    kit = _kit(registry, capacity=128, block=32)  # at most 128 // 64 = 2 spare slots
    claim = await kit.claim_credential("acme", "claim-1", max_uses=200)
    outcomes = []
    for first in range(0, 150, 25):
        outcomes += await kit.service.handle_many(_requests(claim, first, 25))
    positions = await _positions(kit, outcomes)
    assert len(set(positions)) == 150
    assert {list_id for list_id, _ in positions} == {1, 2}
    assert all(0 <= index < 128 for _, index in positions)
    # Revoke one certificate from each list: exactly its bit is set in its list, nothing else.
    for victim in (positions[3], positions[-1]):
        serial = only_reply(outcomes[positions.index(victim)])[1].x509.serial_number  # type: ignore[union-attr]
        revoked = await kit.service.revoke(tenant="acme", serial=serial, reason=RevocationReason.KEY_COMPROMISE,
                                           actor="test-operator")
        assert [(d.list_id, d.indices) for d in revoked.deltas] == [(victim[0], (victim[1],))]
    for list_id in (1, 2):
        snap = await kit.service.snapshot(tenant="acme", region="eu", list_id=list_id)
        bits = statuslist.decompress(snap.bits, snap.size)
        set_bits = [i for i in range(snap.size) if bits[i // 8] & (0x80 >> (i % 8))]
        assert set_bits == [index for lst, index in (positions[3], positions[-1]) if lst == list_id]
    await kit.audit_ok()


async def test_a_restarted_service_never_reuses_a_slot(registry_url: str) -> None:
    first = await open_registry(registry_url)
    kit = _kit(first)
    try:
        claim = await kit.claim_credential("acme", "claim-1", max_uses=100)
        before = await _positions(kit, await kit.service.handle_many(_requests(claim, 0, 5)))
    finally:
        await first.close()
    # A new process: the spare slots the old service held in memory are gone, never handed out.
    second = await open_registry(registry_url)
    try:
        kit.registry = second
        kit.service = _service(kit, second, 32)
        after = await _positions(kit, await kit.service.handle_many(_requests(claim, 5, 5)))
        assert not set(before) & set(after)
        assert min(after) > max(before)  # the old block's unused slots are skipped, not refilled
        await kit.audit_ok()
    finally:
        await second.close()


async def test_two_services_on_one_database_never_share_a_slot(registry_url: str) -> None:
    regs = [await open_registry(registry_url) for _ in range(2)]
    try:
        kits = [_kit(regs[0], block=8)]
        kits.append(_kit(regs[1], block=8, authorities=kits[0].authorities))
        claim = await kits[0].claim_credential("acme", "claim-1", max_uses=200)
        # Both services reserve blocks at the same time, each batch bigger than a block.
        runs = [k.service.handle_many(_requests(claim, 100 * n + 10 * b, 10)) for b in range(4)
                for n, k in enumerate(kits)]
        results = await asyncio.gather(*runs)
        positions = [p for k, outs in zip(kits * 4, results) for p in await _positions(k, outs)]
        assert len(positions) == len(set(positions)) == 80
        await kits[0].audit_ok()
    finally:
        for r in regs:
            await r.close()


async def test_a_failed_reservation_answers_every_request_and_keeps_the_spare_slots(registry: Registry) -> None:
    kit = _kit(registry)
    claim = await kit.claim_credential("acme", "claim-1", max_uses=100)  # leaves 32 spare slots
    real = registry.allocate_status_indices

    async def broken(*args: Any, **kw: Any) -> Any:
        raise RegistryError("disk on fire")

    registry.allocate_status_indices = broken  # type: ignore[method-assign]
    refused = await kit.service.handle_many(_requests(claim, 0, 40))  # needs more than the 32 spare
    assert all(isinstance(only_reply(o)[1], Error) and only_reply(o)[1].code == ErrorCode.INTERNAL  # type: ignore[union-attr]
               for o in refused)
    assert await registry.claim_uses("acme", "claim-1") == []
    registry.allocate_status_indices = real  # type: ignore[method-assign]
    reservations = _Reservations(registry)
    issued = await _positions(kit, await kit.service.handle_many(_requests(claim, 40, 32)))
    assert reservations.calls == []  # the 32 spare slots were given back, not lost
    assert len(set(issued)) == 32
    await kit.audit_ok()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
async def test_status_block_must_be_a_count(registry: Registry, bad: Any) -> None:
    kit = Kit(registry)
    with pytest.raises(ValueError, match="status_block"):
        CAService(registry=registry, authorities=kit.authorities, signer=kit.signer, clock=kit.clock,
                  status_block=bad)
