"""Each hole of stock amqtt 0.12.1, reproduced, and the same scenario on the hardened broker.

Tests named ``test_stock_hole_*`` assert the BAD behaviour of the unmodified
amqtt broker: they document the hole, and fail the day upstream fixes it (then
the hardening may be dropped). ``test_hardened_*`` run the same scenario on
:class:`broker_plugin.broker.HardenedBroker`. All connections are real TLS,
with certificates from the test tenant CA.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker_plugin.broker import HardenedBroker, PeerIdentity, default_identity
from mqttraw import RawClient, connect, port_of

NOT_AUTHORIZED = 5


async def _no_cert_connect(port: int, context: ssl.SSLContext) -> tuple[RawClient | None, int | None]:
    """Connect and CONNECT; (None, None) when the TLS handshake itself fails."""
    try:
        return await connect(port, context, "dev1")
    except (ssl.SSLError, ConnectionError):
        return None, None


# -- 1. a client without a certificate -----------------------------------------------------------


async def test_stock_hole_client_without_certificate_is_served(stock: Any, pki: Any) -> None:
    """STOCK HOLE: CERT_OPTIONAL, so a certificate-less client gets a session (CONNACK accepted)."""
    client, rc = await _no_cert_connect(port_of(stock), pki.client_context(None))
    assert rc == 0
    assert client is not None
    await client.disconnect()


async def test_hardened_client_without_certificate_cannot_complete_handshake(hardened: HardenedBroker, pki: Any) -> None:
    client, rc = await _no_cert_connect(port_of(hardened), pki.client_context(None))
    assert rc is None  # TLS 1.3: the server's alert arrives on the client's first read
    assert hardened.connections() == []
    assert "dev1" not in hardened.sessions


async def test_hardened_certificate_from_another_ca_is_rejected(hardened: HardenedBroker, pki: Any) -> None:
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    foreign = pki.issuing_cert  # same subject, wrong key: the signature cannot verify
    cert, key, _ = pki.issue("dev1", issuer_key=foreign_key, issuer=foreign)
    context = ssl.create_default_context(cafile=str(pki.root / "chain.pem"))
    context.load_cert_chain(str(cert), str(key))
    _client, rc = await _no_cert_connect(port_of(hardened), context)
    assert rc is None
    assert hardened.connections() == []


# -- 2. persistent-session resume by a different certificate or none -----------------------------


async def _leave_persistent_session(port: int, pki: Any) -> None:
    victim, rc = await connect(port, pki.client_context("dev1"), "dev1", clean=False)
    assert rc == 0
    assert await victim.subscribe("dev1/inbox", qos=1) == 1
    await victim.disconnect()
    await asyncio.sleep(0.1)


async def test_stock_hole_session_resumed_without_certificate(stock: Any, pki: Any) -> None:
    """STOCK HOLE (upstream #389): a client with no certificate resumes dev1's persistent session,
    receives dev1's messages, and the session still carries dev1's TLS object."""
    port = port_of(stock)
    await _leave_persistent_session(port, pki)
    attacker, rc = await connect(port, pki.client_context(None), "dev1", clean=False)
    assert rc == 0
    session = stock.sessions["dev1"][0]
    peer = x509.load_der_x509_certificate(session.ssl_object.getpeercert(binary_form=True))
    assert default_identity(peer).name == "dev1"  # stale: this connection has no certificate
    sender, _ = await connect(port, pki.client_context("dev2"), "dev2")
    await sender.publish("dev1/inbox", b"for dev1 only", qos=1)
    got = await attacker.messages(1.0)
    assert [m.payload for m in got] == [b"for dev1 only"]
    await sender.disconnect()
    await attacker.disconnect()


async def test_hardened_other_identity_cannot_resume_session(make_hardened: Any, pki: Any) -> None:
    # Even with a client-id hook that lets anyone use any id, a session belongs to its identity.
    broker = await make_hardened(client_id_hook=lambda identity, client_id: True)
    port = port_of(broker)
    await _leave_persistent_session(port, pki)
    attacker, rc = await connect(port, pki.client_context("mallory"), "dev1", clean=False)
    assert rc == NOT_AUTHORIZED
    assert await attacker.is_closed(1.0)
    client, rc = await _no_cert_connect(port, pki.client_context(None))
    assert rc is None
    assert broker.identity_of("dev1").name == "dev1"


async def test_hardened_resume_takes_identity_from_this_connection(hardened: HardenedBroker, pki: Any) -> None:
    port = port_of(hardened)
    await _leave_persistent_session(port, pki)
    renewed, serial = pki.client_context_with_serial("dev1")  # same device, new certificate
    client, rc = await connect(port, renewed, "dev1", clean=False)
    assert rc == 0
    session = hardened.sessions["dev1"][0]
    peer = x509.load_der_x509_certificate(session.ssl_object.getpeercert(binary_form=True))
    assert peer.serial_number == serial
    assert hardened.identity_of("dev1").serial == serial
    sender, _ = await connect(port, pki.client_context("dev2"), "dev2")
    await sender.publish("dev1/inbox", b"hello", qos=1)
    assert [m.payload for m in await client.messages(1.0)] == [b"hello"]  # the subscription survived
    await sender.disconnect()
    await client.disconnect()


# -- client id bound to the certificate identity -------------------------------------------------


async def test_stock_hole_client_id_not_bound_to_certificate(stock: Any, pki: Any) -> None:
    """STOCK HOLE: a certificate for dev1 may connect as client id dev2."""
    client, rc = await connect(port_of(stock), pki.client_context("dev1"), "dev2")
    assert rc == 0
    await client.disconnect()


async def test_hardened_client_id_must_match_certificate(hardened: HardenedBroker, pki: Any) -> None:
    client, rc = await connect(port_of(hardened), pki.client_context("dev1"), "dev2")
    assert rc == NOT_AUTHORIZED
    assert await client.is_closed(1.0)
    assert hardened.connections() == []
    client, rc = await connect(port_of(hardened), pki.client_context("dev1"), "dev1")
    assert rc == 0
    assert [c.client_id for c in hardened.connections()] == ["dev1"]
    await client.disconnect()


async def test_hardened_client_id_hook_decides(make_hardened: Any, pki: Any) -> None:
    broker = await make_hardened(client_id_hook=lambda ident, cid: cid.startswith(ident.name + ":"))
    client, rc = await connect(port_of(broker), pki.client_context("dev1"), "dev1:sensor")
    assert rc == 0
    await client.disconnect()
    client, rc = await connect(port_of(broker), pki.client_context("dev1"), "dev1")
    assert rc == NOT_AUTHORIZED


async def test_hardened_identity_hook_refusal_and_failure(make_hardened: Any, pki: Any) -> None:
    def hook(cert: x509.Certificate) -> PeerIdentity | None:
        identity = default_identity(cert)
        if identity is not None and identity.name == "boom":
            raise RuntimeError("hook bug")
        return None if identity is None or identity.name == "revoked" else identity

    broker = await make_hardened(identity_hook=hook)
    for name in ("revoked", "boom"):
        _client, rc = await connect(port_of(broker), pki.client_context(name), name)
        assert rc == NOT_AUTHORIZED
    client, rc = await connect(port_of(broker), pki.client_context("fine"), "fine")
    assert rc == 0
    await client.disconnect()


# -- 3. retained messages and the ACL ------------------------------------------------------------

DENY_SECRET = {"stockacl.DenySecretReceive": {}}


def _deny_secret(identity: Any, action: str, topic: str) -> bool:
    return not (action == "receive" and topic.startswith("secret/"))


async def _retained_scenario(port: int, pki: Any) -> tuple[list[str], list[str], list[str]]:
    """Retained and live messages on secret/... with a reader subscribed to '#'.

    Returns the topics received (on subscribe by the reader; on connect by a
    newcomer that subscribed to nothing; on the reader's persistent resume).
    """
    publisher, _ = await connect(port, pki.client_context("pub"), "pub")
    await publisher.publish("secret/plans", b"retained", retain=True)
    await publisher.publish("public/news", b"retained", retain=True)
    await asyncio.sleep(0.2)
    reader, _ = await connect(port, pki.client_context("reader"), "reader", clean=False)
    assert await reader.subscribe("#", qos=1) == 1
    await publisher.publish("secret/live", b"live")
    on_subscribe = sorted(m.topic for m in await reader.messages(0.7))
    newcomer, rc = await connect(port, pki.client_context("newcomer"), "newcomer")
    assert rc == 0
    on_connect = sorted(m.topic for m in await newcomer.messages(0.7))
    await newcomer.disconnect()
    await reader.disconnect()
    await asyncio.sleep(0.1)
    reader, rc = await connect(port, pki.client_context("reader"), "reader", clean=False)
    assert rc == 0
    on_resume = sorted(m.topic for m in await reader.messages(0.7) if m.retain)
    await reader.disconnect()
    await publisher.disconnect()
    return on_subscribe, on_connect, on_resume


async def test_stock_hole_retained_messages_skip_the_acl(make_stock: Any, pki: Any) -> None:
    """STOCK HOLE: the ACL stops the live secret/ message but not the retained one on subscribe;
    and on connect a client gets the retained messages of every filter anyone subscribed to, unchecked."""
    broker = await make_stock(DENY_SECRET)
    on_subscribe, on_connect, _on_resume = await _retained_scenario(port_of(broker), pki)
    assert "secret/live" not in on_subscribe  # the live path is filtered...
    assert "secret/plans" in on_subscribe  # ...the retained one is not
    assert "secret/plans" in on_connect  # the newcomer never subscribed to anything
    # (the reader's resume is not asserted: stock drops "anonymous" sessions within ~1 s)


async def test_hardened_retained_messages_pass_the_acl(make_hardened: Any, pki: Any) -> None:
    broker = await make_hardened(acl_hook=_deny_secret)
    on_subscribe, on_connect, on_resume = await _retained_scenario(port_of(broker), pki)
    assert on_subscribe == ["public/news"]
    assert on_connect == []
    assert on_resume == ["public/news"]


async def test_hardened_acl_on_publish_and_subscribe(make_hardened: Any, pki: Any) -> None:
    seen: list[tuple[str, str, str]] = []

    async def acl(identity: PeerIdentity, action: str, topic: str) -> bool:
        seen.append((identity.name, action, topic))
        return topic.startswith(f"{identity.name}/") or (action == "subscribe" and topic == "all/#")

    broker = await make_hardened(acl_hook=acl)
    port = port_of(broker)
    dev1, _ = await connect(port, pki.client_context("dev1"), "dev1")
    dev2, _ = await connect(port, pki.client_context("dev2"), "dev2")
    assert await dev1.subscribe("dev2/#") == 0x80
    assert await dev1.subscribe("dev1/#") == 0
    assert await dev2.subscribe("dev2/x") == 0
    await dev2.publish("dev1/x", b"not allowed")
    await dev2.publish("dev2/x", b"own topic")
    assert [m.payload for m in await dev2.messages(0.5)] == [b"own topic"]
    assert await dev1.messages(0.3) == []
    assert ("dev2", "publish", "dev1/x") in seen
    assert ("dev1", "subscribe", "dev2/#") in seen
    for client in (dev1, dev2):
        await client.disconnect()


# -- 4. keep-alive -------------------------------------------------------------------------------


async def _silent_client(port: int, pki: Any) -> tuple[RawClient, RawClient]:
    watcher, _ = await connect(port, pki.client_context("watcher"), "watcher")
    assert await watcher.subscribe("wills/#") == 0
    silent, rc = await connect(port, pki.client_context("silent"), "silent", keepalive=1, will=("wills/silent", b"gone"))
    assert rc == 0
    return watcher, silent


async def test_stock_hole_keepalive_not_enforced(stock: Any, pki: Any) -> None:
    """STOCK HOLE: a client silent for 3 x its 1 s keep-alive is never dropped, its will never sent."""
    watcher, silent = await _silent_client(port_of(stock), pki)
    assert not await silent.is_closed(3.0)
    assert await watcher.messages(0.1) == []
    await silent.disconnect()
    await watcher.disconnect()


async def test_hardened_silent_client_dropped_after_one_and_a_half_keepalive(hardened: HardenedBroker, pki: Any) -> None:
    watcher, silent = await _silent_client(port_of(hardened), pki)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await silent.is_closed(3.0)
    elapsed = loop.time() - start
    assert 1.2 <= elapsed <= 2.5, elapsed
    wills = await watcher.messages(1.0)
    assert [(m.topic, m.payload) for m in wills] == [("wills/silent", b"gone")]
    await watcher.disconnect()


async def test_hardened_pinging_client_stays(hardened: HardenedBroker, pki: Any) -> None:
    client, _ = await connect(port_of(hardened), pki.client_context("alive"), "alive", keepalive=1)
    for _ in range(4):
        await asyncio.sleep(0.8)
        assert await client.ping()
    await client.disconnect()


# -- 5. duplicate client id ----------------------------------------------------------------------


async def test_stock_hole_duplicate_client_id_keeps_old_connection(stock: Any, pki: Any) -> None:
    """STOCK HOLE: with clean sessions, a second connection as dev1 leaves the first one open."""
    port = port_of(stock)
    first, _ = await connect(port, pki.client_context("dev1"), "dev1")
    second, rc = await connect(port, pki.client_context("dev1"), "dev1")
    assert rc == 0
    assert not await first.is_closed(1.0)
    assert await first.ping()
    await first.disconnect()
    await second.disconnect()


@pytest.mark.parametrize("clean", [True, False])
async def test_hardened_duplicate_client_id_takes_over(hardened: HardenedBroker, pki: Any, clean: bool) -> None:
    port = port_of(hardened)
    first, _ = await connect(port, pki.client_context("dev1"), "dev1", clean=clean)
    second, rc = await connect(port, pki.client_context("dev1"), "dev1", clean=clean)
    assert rc == 0
    assert await first.is_closed(1.0)
    assert await second.ping()
    assert len(hardened.connections()) == 1
    await second.disconnect()


# -- 6. '$' topics -------------------------------------------------------------------------------


async def test_stock_dollar_publish_disconnects_client(stock: Any, pki: Any) -> None:
    """STOCK HOLE: after a PUBLISH to a '$' topic the broker stops serving the client's requests
    but leaves the connection open (its protocol handler still answers PINGREQ): a zombie."""
    client, _ = await connect(port_of(stock), pki.client_context("dev1"), "dev1")
    await client.publish("$certmq/x", b"x")
    assert await client.ping()
    with pytest.raises(asyncio.TimeoutError):
        await client.subscribe("dev1/x")  # no SUBACK ever
    await client.close()


async def test_hardened_dollar_publish_dropped_client_kept(hardened: HardenedBroker, pki: Any) -> None:
    port = port_of(hardened)
    listener, _ = await connect(port, pki.client_context("listener"), "listener")
    assert await listener.subscribe("$certmq/#") == 0
    client, _ = await connect(port, pki.client_context("dev1"), "dev1")
    await client.publish("$certmq/x", b"x", qos=1)
    puback = await client.read_packet()
    assert puback is not None and puback.kind == 4  # acknowledged like an ACL denial, then dropped
    assert await client.ping()
    assert await client.subscribe("dev1/x") == 0
    assert await listener.messages(0.5) == []
    await client.disconnect()
    await listener.disconnect()
