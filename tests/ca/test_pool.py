"""ProcessPoolSigner: same outcomes as InlineSigner, real batching, crash recovery, clean close."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from broker_plugin.ca.datadir import authority_material, init_tenant, load_authorities
from broker_plugin.ca.pool import ProcessPoolSigner, SigningPoolError, WorkerCrashed, material_for
from broker_plugin.ca.signing import InlineSigner, SignJob
from fixtures_hsm import SoftHsmToken
from protocol.codes import ErrorCode, Profile

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
PASS = b"pool-test-passphrase"


def _csr(device: str, key: object | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, algorithm)  # type: ignore[arg-type]
        .public_bytes(serialization.Encoding.DER)
    )


def _job(device: str, serial: int, *, csr: bytes | None = None, tenant: str = "acme",
         profile: Profile = Profile.IDENTITY) -> SignJob:
    return SignJob(tenant=tenant, device_id=device, profile=profile, serial=(1 << 158) | serial,
                   not_before=NOW, csr_der=csr if csr is not None else _csr(device))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def datadir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pool") / "data"
    policy = d.parent / "acme.toml"
    policy.write_text('[key_policy]\nallowed = ["p256", "p384"]\n')
    asyncio.run(init_tenant(d, "acme", algorithm="p256", passphrase=PASS, policy=policy, now=NOW))
    return d


@pytest.fixture
async def pool(datadir: Path):
    p = ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=2, max_batch=16)
    yield p
    await p.close()


def _mixed_jobs() -> list[SignJob]:
    return [
        _job("dev-ok-1", 1),
        _job("dev-bad-der", 2, csr=b"\x30\x03not a csr"),
        _job("dev-mine", 3, csr=_csr("someone-else")),
        _job("dev-ed", 4, csr=_csr("dev-ed", ed25519.Ed25519PrivateKey.generate())),
        _job("dev-other-tenant", 5, tenant="nobody"),
        _job("dev-ok-2", 6, profile=Profile.OTA_SIGNING),
    ]


def _meaning(der: bytes) -> tuple[object, ...]:
    cert = x509.load_der_x509_certificate(der)
    return (cert.subject, cert.issuer, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc,
            tuple(cert.extensions), cert.public_key().public_bytes(serialization.Encoding.DER,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))


async def test_pool_results_mean_what_inline_results_mean(pool: ProcessPoolSigner, datadir: Path) -> None:
    jobs = _mixed_jobs() * 3  # 18 jobs >= max_batch: the chunked path
    inline = await InlineSigner(load_authorities(datadir, passphrase=PASS)).sign(jobs)
    pooled = await pool.sign(jobs)
    small = [(await pool.sign([j]))[0] for j in jobs[:6]]  # the coalescing path
    issuing = load_authorities(datadir, passphrase=PASS)["acme"].issuing
    for a, b, c in zip(inline, pooled, small * 3):
        assert (a.ok, a.refusal_code) == (b.ok, b.refusal_code) == (c.ok, c.refusal_code)
        if a.ok:
            assert _meaning(a.der) == _meaning(b.der) == _meaning(c.der)  # type: ignore[arg-type]
            assert a.spki_sha256 == b.spki_sha256
            x509.load_der_x509_certificate(b.der).verify_directly_issued_by(issuing)  # type: ignore[arg-type]
    codes = [r.refusal_code for r in pooled[:6]]
    assert codes == [None, ErrorCode.BAD_CSR, ErrorCode.IDENTITY_MISMATCH, ErrorCode.KEY_REJECTED,
                     ErrorCode.NOT_AUTHORIZED, None]


async def test_one_large_call_is_one_round_trip_per_worker(pool: ProcessPoolSigner) -> None:
    jobs = [_job(f"dev-{i}", i + 1) for i in range(40)]
    before = pool.round_trips
    results = await pool.sign(jobs)
    assert pool.round_trips - before == 2
    assert [x509.load_der_x509_certificate(r.der).serial_number for r in results] == [j.serial for j in jobs]  # type: ignore[arg-type]


async def test_concurrent_small_calls_are_coalesced_in_order(pool: ProcessPoolSigner) -> None:
    jobs = [_job(f"dev-{i}", i + 1) for i in range(160)]
    before = pool.round_trips
    results = await asyncio.gather(*(pool.sign([j]) for j in jobs))
    trips = pool.round_trips - before
    assert trips <= 160 // 16 + 2, f"{trips} round trips for 160 single-job calls: no batching"
    for job, (result,) in zip(jobs, results):
        cert = x509.load_der_x509_certificate(result.der)  # type: ignore[arg-type]
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == job.device_id
        assert cert.serial_number == job.serial


async def test_a_worker_dead_while_idle_is_replaced_quietly(pool: ProcessPoolSigner) -> None:
    victim = pool.worker_pids[0]
    os.kill(victim, 9)
    while _alive(victim) and pool._workers[0].process.poll() is None:  # noqa: SLF001 - wait for death
        time.sleep(0.01)
    results = await pool.sign([_job(f"dev-{i}", i + 1) for i in range(40)])
    assert all(r.ok for r in results)
    assert victim not in pool.worker_pids and len(pool.worker_pids) == 2


async def test_a_worker_dying_mid_batch_raises_and_the_pool_recovers(datadir: Path) -> None:
    async with ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=1, max_batch=8) as pool:
        jobs = [_job(f"dev-{i}", i + 1) for i in range(3000)]
        victim = pool.worker_pids[0]
        task = asyncio.create_task(pool.sign(jobs))
        await asyncio.sleep(0.3)  # the worker is busy with the 3000 jobs
        assert not task.done()
        os.kill(victim, 9)
        with pytest.raises(WorkerCrashed, match=r"died .* not signed and may be retried"):
            await task
        assert not _alive(victim) or victim not in pool.worker_pids
        results = await pool.sign([_job("after-crash", 9)])
        assert results[0].ok and pool.worker_pids[0] != victim


async def test_close_stops_every_worker_and_refuses_more_work(datadir: Path) -> None:
    pool = ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=2)
    pids = pool.worker_pids
    assert all(_alive(p) for p in pids)
    await pool.sign([_job("x", 1)])
    await pool.close()
    await pool.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(SigningPoolError, match="closed"):
        await pool.sign([_job("y", 2)])


def test_wrong_passphrase_fails_at_start_with_the_reason_and_leaves_no_process(datadir: Path) -> None:
    material = authority_material(datadir, passphrase=b"wrong")
    with pytest.raises(SigningPoolError, match="wrong passphrase"):
        ProcessPoolSigner(material, workers=2)


async def test_material_for_a_live_authority(datadir: Path) -> None:
    authority = load_authorities(datadir, passphrase=PASS)["acme"]
    async with ProcessPoolSigner([material_for(authority, passphrase=b"other")], workers=1) as pool:
        (result,) = await pool.sign([_job("dev-m", 7)])
    assert result.ok


@pytest.mark.softhsm
async def test_hsm_tenant_signs_in_workers(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    data = tmp_path / "data"
    uri = softhsm_token.uri("pool-issuing")
    pin = softhsm_token.user_pin.encode()
    await init_tenant(data, "hsm", algorithm="p256", passphrase=pin, key_uri=uri, now=NOW)
    material = authority_material(data, passphrase=pin)
    assert material[0].key_uri == uri and material[0].key_pem is None
    async with ProcessPoolSigner(material, workers=2) as pool:
        results = await pool.sign([_job(f"hsm-{i}", i + 1, tenant="hsm") for i in range(10)])
    issuing = load_authorities(data, passphrase=pin)["hsm"].issuing
    for r in results:
        x509.load_der_x509_certificate(r.der).verify_directly_issued_by(issuing)  # type: ignore[arg-type]


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("depth", [1, 2])
async def test_a_busy_worker_gets_its_next_chunk_queued_up_to_depth(datadir: Path, depth: int) -> None:
    big = [_job(f"big-{i}", i + 1) for i in range(1500)]
    small = [_job(f"small-{i}", 5000 + i) for i in range(8)]
    async with ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=1, max_batch=8,
                                 depth=depth) as pool:
        first = asyncio.create_task(pool.sign(big))
        await _until(lambda: pool.round_trips == 1)
        second = asyncio.create_task(pool.sign(small))
        await asyncio.sleep(0.05)
        assert not first.done()  # the worker is still on the big chunk...
        # ...and the small one is already in its socket (depth 2) or waits for it (depth 1).
        assert pool.round_trips == (2 if depth == 2 else 1)
        big_results, small_results = await asyncio.gather(first, second)
        assert pool.round_trips == 2
    # Answers went back to the chunk that asked, in order.
    for jobs, results in ((big, big_results), (small, small_results)):
        assert [x509.load_der_x509_certificate(r.der).serial_number for r in results] == [j.serial for j in jobs]  # type: ignore[arg-type]


async def test_a_worker_dying_with_two_chunks_queued_fails_both_and_is_replaced_once(datadir: Path) -> None:
    async with ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=1, max_batch=8,
                                 depth=2) as pool:
        victim = pool.worker_pids[0]
        first = asyncio.create_task(pool.sign([_job(f"big-{i}", i + 1) for i in range(1500)]))
        await _until(lambda: pool.round_trips == 1)
        second = asyncio.create_task(pool.sign([_job(f"small-{i}", 5000 + i) for i in range(8)]))
        await _until(lambda: pool.round_trips == 2)
        os.kill(victim, 9)
        for task in (first, second):
            with pytest.raises(WorkerCrashed, match="not signed and may be retried"):
                await task
        assert len(pool.worker_pids) == 1 and pool.worker_pids[0] != victim
        [after] = await pool.sign([_job("after-crash", 9)])
        assert after.ok


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_depth_must_be_a_positive_int(datadir: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="depth"):
        ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=1, depth=bad)  # type: ignore[arg-type]


async def test_results_carry_the_validity_they_were_signed_with(pool: ProcessPoolSigner, datadir: Path) -> None:
    jobs = [_job(f"dev-{i}", i + 1, profile=profile) for i, profile in enumerate([Profile.IDENTITY, Profile.OTA_SIGNING])]
    inline = InlineSigner(load_authorities(datadir, passphrase=PASS))
    for results in (await pool.sign(jobs), await inline.sign(jobs)):
        for result in results:
            cert = x509.load_der_x509_certificate(result.der)  # type: ignore[arg-type]
            assert (result.not_before, result.not_after) == (
                int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp()))
        assert results[0].not_after != results[1].not_after  # per profile: not a constant


async def test_an_unreadable_answer_counts_as_a_crash_and_the_worker_is_replaced(datadir: Path) -> None:
    import pickle

    async with ProcessPoolSigner(authority_material(datadir, passphrase=PASS), workers=1, max_batch=8) as pool:
        victim = pool.worker_pids[0]
        conn = pool._workers[0].conn  # noqa: SLF001 - a stream out of step cannot be made from outside

        def garbled() -> object:
            conn.recv_bytes()  # the real answer is consumed, so nothing is left to read
            raise pickle.UnpicklingError("garbled")

        conn.recv = garbled  # type: ignore[method-assign]
        with pytest.raises(WorkerCrashed, match="unreadable answer"):
            await pool.sign([_job(f"dev-{i}", i + 1) for i in range(8)])
        assert pool.worker_pids[0] != victim
        [after] = await pool.sign([_job("after", 99)])
        assert after.ok
