"""Signing in worker processes, in batches: the :class:`~.signing.SigningBackend` the broker uses.

A process pool called once per request is slower than one process: the pickling and the
round trip cost more than an ECDSA signature. So :class:`ProcessPoolSigner`

* starts ``workers`` fresh interpreter processes (no inherited threads, locks or HSM sessions),
  each of which rebuilds its tenants' issuers ONCE from picklable
  :class:`~.datadir.AuthorityMaterial` (policy dict, CA PEMs, and the encrypted key PEM plus
  passphrase, or a ``pkcs11:`` URI plus PIN: a live HSM session cannot cross a process);
* splits each large ``sign(jobs)`` call into at most ``workers`` chunks, one IPC round trip
  per chunk, each to the worker with the least work queued;
* keeps up to ``depth`` chunks queued at each worker (2 by default): the next chunk is already
  in the worker's socket when it finishes one, so it never waits for the event loop to notice
  the result and hand it more work (with one chunk at a time, a busy event loop left the
  workers idle between chunks);
* coalesces small concurrent ``sign()`` calls (the broker signs per request) through a queue
  and a collector task that waits up to ``linger`` (2 ms) or until ``max_batch`` jobs are
  waiting, then sends them to an idle worker as one chunk.

Workers only run :func:`~.signing.run_job` (pure: no registry, no clock, no files), so a
batch lost to a crashed worker has no side effects and may be retried; the dead worker is
replaced. This module knows nothing of the registry, MQTT or the service's decisions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import collections
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization

from protocol.codes import ErrorCode, Profile
from protocol.errors import CertmqError

from .datadir import AuthorityMaterial, authority_from_material
from .policy import TenantPolicy, load_tenant_policy
from .signing import SignJob, SignResult, TenantAuthority, run_job

__all__ = ["ProcessPoolSigner", "SigningPoolError", "WorkerCrashed", "material_for"]

_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 5.0
# A chunk bigger than this is written from a thread: the worker may be busy with the chunk
# before it, so a write that fills the socket buffer would block the event loop until then.
_THREAD_SEND_BYTES = 64 * 1024


class SigningPoolError(CertmqError):
    """The signing pool cannot sign: it is closed, or a worker could not start."""


class WorkerCrashed(SigningPoolError):
    """A worker process died while it held a batch; that batch was not signed (safe to retry)."""


def material_for(authority: TenantAuthority, *, passphrase: bytes) -> AuthorityMaterial:
    """Picklable material for a software-key ``authority`` (its key re-encrypted with ``passphrase``).

    HSM-backed tenants cannot be described this way: build their material with a ``key_uri``.
    """
    key: Any = authority.key
    try:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(passphrase))
    except (TypeError, ValueError) as exc:
        raise SigningPoolError(f"tenant {authority.name!r}: key cannot be exported ({exc}); give its pkcs11: URI") from None
    pem_cert = serialization.Encoding.PEM
    return AuthorityMaterial(
        name=authority.name, policy=_policy_dict(authority.policy), passphrase=passphrase, key_pem=pem,
        root_pem=authority.root.public_bytes(pem_cert), issuing_pem=authority.issuing.public_bytes(pem_cert),
    )


def _plain(value: Any) -> Any:
    # The inverse of the policy loader's parsing: durations as seconds, profiles by label.
    if isinstance(value, dt.timedelta):
        return int(value.total_seconds())
    if isinstance(value, dict):
        return {(k.label if isinstance(k, Profile) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _policy_dict(policy: TenantPolicy) -> dict[str, Any]:
    """``policy`` as a mapping :func:`~.policy.load_tenant_policy` reads back to an equal policy."""
    data = _plain(policy.model_dump())
    assert load_tenant_policy(data) == policy, "tenant policy does not survive its own round trip"
    return data  # type: ignore[no-any-return]


# -- the worker process -------------------------------------------------------------------


def _worker_entry(fd: int) -> None:
    """Worker process entry point: ``fd`` is its end of the socket pair to the pool."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        materials = conn.recv()
    except (EOFError, OSError):
        return
    _worker_main(conn, materials)


def _worker_main(conn: multiprocessing.connection.Connection, materials: list[AuthorityMaterial]) -> None:
    """Build issuers once, then sign chunks until told to stop (``None``) or the pool goes away."""
    try:
        issuers = {m.name: authority_from_material(m).issuer() for m in materials}
    except BaseException as exc:  # report, don't die silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if message is None:
            conn.close()
            return
        results = []
        for job in message:
            issuer = issuers.get(job.tenant)
            if issuer is None:
                results.append(SignResult(refusal_code=ErrorCode.NOT_AUTHORIZED, refusal_text=f"no tenant {job.tenant!r}"))
            else:
                results.append(run_job(issuer, job))
        conn.send(results)


@dataclasses.dataclass(kw_only=True, eq=False)
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    conn: multiprocessing.connection.Connection
    # Callers of the chunks sent and not answered yet, in the order sent (the worker answers in order).
    waiting: collections.deque[asyncio.Future[list[SignResult]]] = dataclasses.field(
        default_factory=collections.deque)
    send_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    reading: bool = False

    @property
    def pid(self) -> int:
        return int(self.process.pid)


# -- the pool -----------------------------------------------------------------------------


class ProcessPoolSigner:
    """A :class:`~.signing.SigningBackend` signing in ``workers`` processes, in batches.

    ``authority_specs`` are :class:`~.datadir.AuthorityMaterial` values (see
    :func:`~.datadir.authority_material` and :func:`material_for`). The constructor starts the
    workers and waits until each has opened its keys; a worker that cannot (wrong passphrase,
    missing HSM key) makes it raise :class:`SigningPoolError` with the worker's reason.
    ``round_trips`` counts chunks sent to workers; ``depth`` is how many chunks may be queued at
    one worker (1: the next is sent only when its answer to the last is in).
    """

    def __init__(
        self,
        authority_specs: Sequence[AuthorityMaterial],
        *,
        workers: int | None = None,
        max_batch: int = 64,
        linger: float = 0.002,
        depth: int = 2,
    ) -> None:
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError("workers must be an int >= 1")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError("max_batch must be an int >= 1")
        if not 0 <= linger <= 1:
            raise ValueError("linger must be between 0 and 1 second")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError("depth must be an int >= 1")
        self._depth = depth
        self._materials = list(authority_specs)
        self._max_batch = max_batch
        self._linger = linger
        self._closed = False
        self.round_trips = 0
        self._workers: list[_Worker] = []
        self._load: list[int] = []  # chunks handed to each worker (by index) and not answered yet
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._respawning: dict[int, asyncio.Task[_Worker]] = {}
        self._started = False
        self._pending: collections.deque[tuple[list[SignJob], asyncio.Future[list[SignResult]]]] = collections.deque()
        self._pending_jobs = 0
        self._wakeup: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._collector: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        try:
            started = [self._start_process(i) for i in range(workers)]
            self._workers = [self._await_ready(i, proc, conn) for i, (proc, conn) in enumerate(started)]
            self._load = [0] * len(self._workers)
        except BaseException:
            for proc, conn in locals().get("started", []):
                self._kill(proc, conn)
            raise

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return len(self._workers)

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the current workers (for monitoring and tests)."""
        return tuple(w.pid for w in self._workers)

    # -- process management

    def _start_process(self, index: int) -> tuple[subprocess.Popen[bytes], multiprocessing.connection.Connection]:
        # A plain interpreter started on this module, not multiprocessing's spawn: spawn re-imports
        # the caller's __main__ (a script without a main guard would start itself again).
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", f"from broker_plugin.ca.pool import _worker_entry; _worker_entry({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        finally:
            theirs.close()
        conn = multiprocessing.connection.Connection(ours.detach())
        try:
            conn.send(self._materials)
        except OSError:
            pass  # the worker died at once: _await_ready reports it
        return proc, conn

    def _await_ready(self, index: int, proc: subprocess.Popen[bytes], conn: multiprocessing.connection.Connection) -> _Worker:
        try:
            if not conn.poll(_READY_TIMEOUT):
                self._kill(proc, conn)
                raise SigningPoolError(f"signing worker {index} did not start within {_READY_TIMEOUT:.0f} s")
            kind, detail = conn.recv()
        except (EOFError, OSError):
            code = self._kill(proc, conn)
            raise SigningPoolError(f"signing worker {index} died while starting (exit code {code})") from None
        if kind != "ready":
            self._kill(proc, conn)
            raise SigningPoolError(f"signing worker {index} could not open the CA keys: {detail}")
        return _Worker(index=index, process=proc, conn=conn)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], conn: multiprocessing.connection.Connection) -> int | None:
        """Close the pipe, kill the process if it still runs, reap it; its exit code."""
        with contextlib.suppress(OSError):
            conn.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_STOP_TIMEOUT)
        return proc.returncode

    async def _respawn(self, worker: _Worker) -> _Worker:
        """Replace ``worker`` (dead, or holding lost chunks) once, however many of its callers ask."""
        current = self._workers[worker.index]
        if current is not worker:
            return current  # already replaced
        task = self._respawning.get(worker.index)
        if task is None:
            task = asyncio.create_task(self._replace(worker))
            self._respawning[worker.index] = task
            task.add_done_callback(lambda _: self._respawning.pop(worker.index, None))
        return await asyncio.shield(task)

    async def _replace(self, worker: _Worker) -> _Worker:
        self._drop(worker, EOFError("the worker is being replaced"))
        self._kill(worker.process, worker.conn)
        loop = asyncio.get_running_loop()
        proc, conn = self._start_process(worker.index)
        fresh = await loop.run_in_executor(None, self._await_ready, worker.index, proc, conn)
        self._workers[worker.index] = fresh
        return fresh

    def _drop(self, worker: _Worker, exc: BaseException) -> None:
        """Stop reading ``worker``'s socket; every chunk still waiting for it gets ``exc``."""
        if worker.reading:
            worker.reading = False
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        while worker.waiting:
            waiter = worker.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def _readable(self, worker: _Worker) -> None:
        # One answer per call (the loop calls again while more is buffered), to its chunk's caller.
        try:
            results = worker.conn.recv()
        except (EOFError, OSError) as exc:  # the worker died; every chunk it held is lost
            self._drop(worker, exc)
            return
        except Exception as exc:  # an unreadable answer: the stream is out of step, so the worker goes
            with contextlib.suppress(OSError):
                worker.process.kill()
            self._drop(worker, EOFError(f"unreadable answer: {type(exc).__name__}: {exc}"))
            return
        if worker.waiting:
            waiter = worker.waiting.popleft()
            if not waiter.done():
                waiter.set_result(results)
        if not worker.waiting:
            worker.reading = False
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())

    # -- one round trip

    async def _round_trip(self, worker: _Worker, jobs: list[SignJob]) -> list[SignResult]:
        loop = asyncio.get_running_loop()
        self.round_trips += 1
        done: asyncio.Future[list[SignResult]] = loop.create_future()
        try:
            data = pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL)
            # Answers come back in the order chunks were sent: the waiting queue must have that
            # order, so sending and queueing happen together, one chunk at a time.
            async with worker.send_lock:
                worker.waiting.append(done)
                if not worker.reading:
                    loop.add_reader(worker.conn.fileno(), self._readable, worker)
                    worker.reading = True
                try:
                    if len(data) > _THREAD_SEND_BYTES:
                        await loop.run_in_executor(None, worker.conn.send_bytes, data)
                    else:
                        worker.conn.send_bytes(data)
                except (EOFError, OSError) as exc:  # a dead worker: whatever it held is lost too
                    self._drop(worker, exc)  # this chunk's future included: awaiting it raises exc
            results = await done
        except (EOFError, OSError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(1)
            code = worker.process.returncode
            raise WorkerCrashed(
                f"signing worker {worker.index} (pid {worker.pid}) died (exit code {code}) holding {len(jobs)} "
                f"job(s); they were not signed and may be retried ({type(exc).__name__}{f': {exc}' if str(exc) else ''})"
            ) from None
        if len(results) != len(jobs):
            raise SigningPoolError(f"signing worker {worker.index} returned {len(results)} results for {len(jobs)} jobs")
        return results

    def _free_index(self) -> int | None:
        """The worker with the fewest chunks queued, if one has room for another."""
        best: int | None = None
        for index, load in enumerate(self._load):
            if load < self._depth and (best is None or load < self._load[best]):
                best = index
        return best

    async def _acquire(self) -> int:
        while (index := self._free_index()) is None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken but leaving: the room goes to the next waiter
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
        self._load[index] += 1
        return index

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _with_worker(self, jobs: list[SignJob]) -> list[SignResult]:
        index = await self._acquire()
        worker = self._workers[index]
        try:
            if worker.process.poll() is not None:  # died while idle: replace it quietly, nothing was lost
                worker = await self._respawn(worker)
            return await self._round_trip(worker, jobs)
        except WorkerCrashed:
            await self._respawn(worker)
            raise
        finally:
            self._load[index] -= 1
            if self._closed:
                self._kill(worker.process, worker.conn)
            else:
                self._wake()

    # -- the public interface

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._wakeup = asyncio.Event()
            self._full = asyncio.Event()
            self._collector = asyncio.create_task(self._collect(), name="certmq-signing-collector")

    async def sign(self, jobs: Sequence[SignJob]) -> list[SignResult]:
        """One result per job, in order. Raises :class:`SigningPoolError` / :class:`WorkerCrashed` only."""
        if self._closed:
            raise SigningPoolError("the signing pool is closed")
        jobs = list(jobs)
        if not jobs:
            return []
        self._ensure_started()
        if len(jobs) >= self._max_batch:
            n = min(len(self._workers), len(jobs))
            size = -(-len(jobs) // n)
            chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
            parts = await asyncio.gather(*(self._with_worker(c) for c in chunks))
            return [r for part in parts for r in part]
        fut: asyncio.Future[list[SignResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, fut))
        self._pending_jobs += len(jobs)
        assert self._wakeup is not None and self._full is not None
        self._wakeup.set()
        if self._pending_jobs >= self._max_batch:
            self._full.set()
        return await fut

    async def _collect(self) -> None:
        assert self._wakeup is not None and self._full is not None
        while True:
            await self._wakeup.wait()
            if self._pending_jobs < self._max_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._linger)
            batch: list[tuple[list[SignJob], asyncio.Future[list[SignResult]]]] = []
            count = 0
            while self._pending and (not batch or count + len(self._pending[0][0]) <= self._max_batch):
                entry = self._pending.popleft()
                batch.append(entry)
                count += len(entry[0])
            self._pending_jobs -= count
            if self._pending_jobs < self._max_batch:
                self._full.clear()
            if not self._pending:
                self._wakeup.clear()
            if batch:
                task = asyncio.create_task(self._run_batch(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                # Let the batch take a worker before collecting the next: with every worker's queue
                # full the pending calls pile up, so the next batch is fuller (that is the point).
                await asyncio.sleep(0)
                while self._free_index() is None and not self._closed:
                    await asyncio.sleep(self._linger / 2)

    async def _run_batch(self, batch: list[tuple[list[SignJob], asyncio.Future[list[SignResult]]]]) -> None:
        jobs = [j for entry, _ in batch for j in entry]
        try:
            results = await self._with_worker(jobs)
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else SigningPoolError("signing cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        at = 0
        for entry, fut in batch:
            if not fut.done():
                fut.set_result(results[at:at + len(entry)])
            at += len(entry)

    async def close(self) -> None:
        """Stop the collector, fail waiting callers, stop the workers (killed if they do not stop). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(SigningPoolError("the signing pool was closed"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._shutdown()

    def _shutdown(self) -> None:
        for w in self._workers:
            self._drop(w, SigningPoolError("the signing pool was closed"))
        for w in self._workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for w in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.process.wait(max(0.0, deadline - time.monotonic()))
            self._kill(w.process, w.conn)

    async def __aenter__(self) -> ProcessPoolSigner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
