"""Prometheus metrics of the certmq broker, and the HTTP exporter that serves them.

:class:`BrokerMetrics` owns one ``prometheus_client`` :class:`~prometheus_client.CollectorRegistry`
(never the process-global one, so several brokers in one process do not collide). The plugin
feeds it: every answered request (:meth:`BrokerMetrics.observe_reply`, from the request and reply
bytes), every admission refusal, every revocation, and each periodic health assessment
(:meth:`BrokerMetrics.set_health`: certificates by expiry bucket and findings, refreshed with the
assessment, never computed per scrape). Live values that cost nothing to read -- admission queue
depth, connected clients, feed sequence numbers -- are read at scrape time through callbacks.

The exporter (:meth:`BrokerMetrics.serve`) is a minimal HTTP/1.x server on the broker's own event
loop (``GET /metrics``), so those callbacks read the plugin's state on the loop that owns it: no
thread, no locks. Bind it to 127.0.0.1 unless something in front of it authenticates scrapers.

Metric names (``docs/operator-guide.md`` explains each): ``certmq_issuance_total``,
``certmq_renewal_total``, ``certmq_revocation_total``, ``certmq_requests_total``,
``certmq_signing_latency_seconds``, ``certmq_admission_queue_depth``,
``certmq_admission_queue_capacity``, ``certmq_connected_clients``, ``certmq_certificates``,
``certmq_certificates_by_expiry``, ``certmq_health_findings``, ``certmq_health_last_run_timestamp_seconds``,
``certmq_feed_sequence``, ``certmq_kicked_sessions_total``.

This module knows prometheus_client, the protocol's messages and the health report; nothing of
amqtt or the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from protocol.codec import decode
from protocol.codes import ErrorCode, MessageType, Profile
from protocol.errors import CertmqError
from protocol.messages import CertificateIssued, Error, RevocationResult

from .health import Check, FleetHealth, Severity

__all__ = ["LATENCY_BUCKETS", "BrokerMetrics", "result_label"]

log = logging.getLogger(__name__)

#: Seconds; from admission to reply (a storm's queueing shows in the upper buckets).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ANY = "any"  # profile label of a revocation that named none
_MAX_REQUEST_LINE = 8192


def result_label(code: ErrorCode | int) -> str:
    """The ``result`` label of a refusal: the error code's name in lower case (``busy``, ``claim_refused``)."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"error_{int(code)}"


def _type_label(kind: MessageType | None) -> str:
    return "unknown" if kind is None else kind.name.lower()


class _Live(Collector):
    """Gauges read at scrape time from the plugin's state (on the event loop)."""

    def __init__(self, owner: BrokerMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[GaugeMetricFamily]:
        o = self._owner
        depth = GaugeMetricFamily("certmq_admission_queue_depth", "requests waiting in the admission queue")
        depth.add_metric([], float(o.queue_depth()))
        yield depth
        capacity = GaugeMetricFamily("certmq_admission_queue_capacity", "admission queue size; beyond it BUSY")
        capacity.add_metric([], float(o.queue_capacity()))
        yield capacity
        connected = GaugeMetricFamily("certmq_connected_clients",
                                      "live MQTT connections by tenant and identity kind (device, bootstrap, operator)",
                                      labels=["tenant", "kind"])
        counts: dict[tuple[str, str], int] = {}
        for key in o.connections():
            counts[key] = counts.get(key, 0) + 1
        for (tenant, kind), n in sorted(counts.items()):
            connected.add_metric([tenant, kind], float(n))
        yield connected
        feeds = GaugeMetricFamily("certmq_feed_sequence", "last revocation feed sequence number per tenant and region",
                                  labels=["tenant", "region"])
        for (tenant, region), seq in sorted(o.feed_sequences().items()):
            feeds.add_metric([tenant, region], float(seq))
        yield feeds


class BrokerMetrics:
    """The broker's metrics (module docstring). Callbacks are read at scrape time, on the event loop."""

    def __init__(
        self,
        *,
        queue_depth: Callable[[], int] = lambda: 0,
        queue_capacity: Callable[[], int] = lambda: 0,
        connections: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
        feed_sequences: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_depth = queue_depth
        self.queue_capacity = queue_capacity
        self.connections = connections
        self.feed_sequences = feed_sequences
        labels = ["tenant", "profile", "result"]
        r = self.registry
        self.issuance = Counter("certmq_issuance", "certificate requests (provisioning) answered, by result",
                                labels, registry=r)
        self.renewal = Counter("certmq_renewal", "renewal requests answered, by result", labels, registry=r)
        self.revocation = Counter("certmq_revocation",
                                  "certificates revoked through this broker (result=revoked) and refused "
                                  "revocation requests (result=error code)", labels, registry=r)
        self.requests = Counter("certmq_requests", "every answered request by message type and result",
                                ["tenant", "type", "result"], registry=r)
        self.latency = Histogram("certmq_signing_latency_seconds",
                                 "time from admission to reply, by request type", ["type"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.kicked = Counter("certmq_kicked_sessions", "sessions closed because their certificate was revoked",
                              registry=r)
        self.certificates = Gauge("certmq_certificates", "certificates by state (refreshed with the health check)",
                                  ["tenant", "state"], registry=r)
        self.by_expiry = Gauge("certmq_certificates_by_expiry",
                               "valid (unrevoked) certificates by time left: disjoint buckets expired, 7d, 30d, "
                               "90d, later (refreshed with the health check)", ["tenant", "bucket"], registry=r)
        self.findings = Gauge("certmq_health_findings", "audit findings of the last health check",
                              ["tenant", "check", "severity"], registry=r)
        self.last_health = Gauge("certmq_health_last_run_timestamp_seconds",
                                 "when the last health check of the tenant ran (epoch seconds)", ["tenant"],
                                 registry=r)
        r.register(_Live(self))
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    # -- observations ------------------------------------------------------------------

    def observe_reply(self, *, tenant: str, request: bytes, reply: bytes | None, latency: float | None) -> None:
        """One answered request: counters by tenant, profile and result; latency by type."""
        message: Any = None
        with contextlib.suppress(CertmqError, ValueError):
            message = decode(request)
        kind = getattr(message, "TYPE", None)
        answer: Any = None
        if reply is not None:
            with contextlib.suppress(CertmqError, ValueError):
                answer = decode(reply)
        if isinstance(answer, Error):
            result = result_label(answer.code)
        elif isinstance(answer, CertificateIssued):
            result = "issued"
        elif isinstance(answer, RevocationResult):
            result = "ok"
        else:
            result = "ok" if answer is not None else "no_reply"
        self.requests.labels(tenant, _type_label(kind), result).inc()
        if latency is not None:
            self.latency.labels(_type_label(kind)).observe(max(0.0, latency))
        profile = getattr(message, "profile", None)
        label = Profile(profile).label if isinstance(profile, Profile) else _ANY
        if kind is MessageType.CERTIFICATE_REQUEST:
            self.issuance.labels(tenant, label, result).inc()
        elif kind is MessageType.RENEWAL_REQUEST:
            self.renewal.labels(tenant, label, result).inc()
        elif kind is MessageType.REVOCATION_REQUEST and isinstance(answer, Error):
            self.revocation.labels(tenant, label, result).inc()

    def observe_revoked(self, tenant: str, profiles: Iterable[str]) -> None:
        """Certificates this broker revoked (by message or API), one per profile label given."""
        for profile in profiles:
            self.revocation.labels(tenant, profile, "revoked").inc()

    def observe_kicked(self, n: int) -> None:
        """Sessions closed because of a revocation."""
        if n:
            self.kicked.inc(n)

    def set_health(self, report: FleetHealth) -> None:
        """Refresh the registry-derived gauges from one health assessment."""
        tenant = report.tenant
        for state, n in report.counts.items():
            self.certificates.labels(tenant, state).set(n)
        for bucket, n in report.buckets.items():
            self.by_expiry.labels(tenant, bucket).set(n)
        counts: dict[tuple[str, str], int] = {(str(c), str(s)): 0 for c in Check for s in Severity}
        for finding in report.findings:
            counts[(str(finding.check), str(finding.severity))] += 1
        for (check, severity), n in counts.items():
            self.findings.labels(tenant, check, severity).set(n)
        self.last_health.labels(tenant).set(report.generated_at.timestamp())

    def render(self) -> bytes:
        """The exposition text of every metric (what a scrape returns)."""
        return generate_latest(self.registry)

    # -- the exporter ------------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving ``GET /metrics`` on ``host:port`` (0: a free port); returns the port."""
        if self._server is not None:
            raise RuntimeError("the metrics exporter is already running")
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("certmq metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    async def close(self) -> None:
        """Stop the exporter (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while True:  # headers: read and ignore up to the blank line
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(line) > _MAX_REQUEST_LINE or len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
            elif parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif parts[1].split("?")[0] not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", self.render(), CONTENT_TYPE_LATEST
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            writer.write(head + (b"" if parts[:1] == ["HEAD"] else body))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
