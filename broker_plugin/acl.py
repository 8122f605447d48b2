"""The broker's access rules for certmq: who may publish, subscribe to and receive which topic.

:func:`allowed` is a pure function of ``(identity, action, topic)``; the plugin installs it as the
hardened broker's ``acl_hook``. :class:`SessionIdentity` is what the plugin's identity hook makes of
a client certificate (the CA service's :class:`~broker_plugin.ca.identity.Identity` plus what the
ACL needs: capabilities, region, the claim scope of a bootstrap certificate, and whether the
session is a recovery of an expired certificate). This module knows topics; nothing of amqtt,
sockets, the registry or the clock.

The table (``{t}`` = the identity's tenant, ``P`` = ``certmq/v1/{t}``; default deny; never another
tenant's topics; actions ``pub`` = publish, ``sub`` = subscribe + receive):

==================  ===============================================================================
identity            grants
==================  ===============================================================================
device              pub ``P/dev/{id}/req``; sub ``P/dev/{id}/res``; sub ``P/rev/#`` (feeds);
                    for each capability segment ``c`` of its certificate: pub + sub
                    ``P/dev/{id}/app/{c}`` and everything below it
device, expired     (admitted only inside its profile's ``expired_recovery`` window) pub
(recovery)          ``P/dev/{id}/req``, sub ``P/dev/{id}/res``: renewal only, nothing else
bootstrap (claim)   pub ``P/prov/{d}/req``, sub ``P/prov/{d}/res`` for each device id ``d`` its claim
                    policy allows; no wildcard filters
operator            pub ``P/ops/{id}/req``; sub ``P/ops/{id}/res``, ``P/ops/findings``, ``P/rev/#``;
                    pub + sub the devices' app topics ``P/dev/+/app/#`` (telemetry and commands)
==================  ===============================================================================

No client may publish on a reply (``.../res``), feed (``rev/...``) or findings topic: no grant
above contains one, so only the in-process CA (``deliver_to`` / broadcast) writes there. A
subscription filter is allowed only when every topic it can match is receivable (``#`` alone, or
``P/dev/+/res``, is refused whole).
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

from protocol.errors import TopicError
from protocol.topics import PREFIX, TopicKind, parse_topic

from .ca.identity import Identity, IdentityKind

__all__ = ["ClaimScope", "SessionIdentity", "allowed", "filter_within", "grants"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClaimScope:
    """Which device ids a claim (bootstrap) credential may provision: a list or a glob pattern."""

    device_ids: frozenset[str] | None = None
    pattern: str | None = None

    def allows(self, device_id: str) -> bool:
        """True when ``device_id`` is in the list or matches the pattern (case-sensitive fnmatch)."""
        if self.device_ids is not None:
            return device_id in self.device_ids
        return self.pattern is not None and fnmatchcase(device_id, self.pattern)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionIdentity:
    """An authenticated MQTT session: the CA's identity plus what the ACL needs.

    ``recovery_only``: the certificate has expired and was admitted for a renewal inside its
    profile's recovery window. ``claim``: a bootstrap certificate's claim scope at connect time
    (``None``: no usable claim policy, so no provisioning topic is reachable).
    """

    tenant: str
    kind: IdentityKind
    name: str
    serial: int
    capabilities: tuple[str, ...] = ()
    region: str | None = None
    recovery_only: bool = False
    claim: ClaimScope | None = None
    ca_identity: Identity | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def principal(self) -> str:
        """Who owns an MQTT session: ``tenant/kind/name`` (a renewed certificate resumes it)."""
        return f"{self.tenant}/{self.kind}/{self.name}"

    @cached_property
    def _levels(self) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
        # grants() split into levels once per session: a revocation delta's fan-out asks the ACL
        # once per subscriber, and rebuilding the patterns each time was a third of its cost.
        publish, receive = grants(self)
        return tuple(tuple(p.split("/")) for p in publish), tuple(tuple(p.split("/")) for p in receive)

    @cached_property
    def _received(self) -> dict[str, bool]:
        # receive answers by topic name: a session receives a handful of distinct topics (its
        # replies, its region's feed, its app topics), each delta of a region on the same one
        return {}


_RECEIVED_KEPT = 64  # receive answers remembered per session (an app topic tree can be large)


def grants(identity: SessionIdentity) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(publish patterns, receive patterns)`` of ``identity`` as MQTT filters (bootstrap: none,
    its topics depend on the claim scope and are checked by :func:`allowed` directly)."""
    base = f"{PREFIX}/{identity.tenant}"
    if identity.kind is IdentityKind.DEVICE:
        own = f"{base}/dev/{identity.name}"
        if identity.recovery_only:
            return (f"{own}/req",), (f"{own}/res",)
        apps = tuple(f"{own}/app/{c}/#" for c in identity.capabilities)
        return (f"{own}/req", *apps), (f"{own}/res", f"{base}/rev/#", *apps)
    if identity.kind is IdentityKind.OPERATOR:
        own = f"{base}/ops/{identity.name}"
        fleet_apps = f"{base}/dev/+/app/#"
        return (f"{own}/req", fleet_apps), (f"{own}/res", f"{base}/ops/findings", f"{base}/rev/#", fleet_apps)
    return (), ()


def _matches_levels(p_levels: tuple[str, ...] | list[str], t_levels: list[str]) -> bool:
    for index, level in enumerate(p_levels):
        if level == "#":
            return len(t_levels) >= index  # '#' also matches its parent level
        if index >= len(t_levels) or (level != "+" and level != t_levels[index]):
            return False
    return len(t_levels) == len(p_levels)


def filter_within(topic_filter: str, pattern: str) -> bool:
    """True when every topic ``topic_filter`` can match is also matched by ``pattern``."""
    f_levels, p_levels = topic_filter.split("/"), pattern.split("/")
    for index, p in enumerate(p_levels):
        if p == "#":
            return len(f_levels) >= index
        if index >= len(f_levels):
            return False
        f = f_levels[index]
        if f == "#" or (p != "+" and f != p):
            return False  # f == '+' under a literal p falls here too
    return len(f_levels) == len(p_levels)


def _wildcard(text: str) -> bool:
    return "+" in text or "#" in text


def _bootstrap(identity: SessionIdentity, action: str, topic: str) -> bool:
    if identity.claim is None or _wildcard(topic):
        return False
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return False
    if parsed.tenant != identity.tenant or parsed.device_id is None or not identity.claim.allows(parsed.device_id):
        return False
    if action == "publish":
        return parsed.kind is TopicKind.PROVISIONING_REQUEST
    return parsed.kind is TopicKind.PROVISIONING_RESPONSE


def allowed(identity: Any, action: str, topic: str) -> bool:
    """The certmq ACL: may ``identity`` do ``action`` (publish / subscribe / receive) on ``topic``?

    ``topic`` is a topic name for publish and receive, a filter for subscribe. Anything that is not
    a :class:`SessionIdentity`, an unknown action or a ``$`` topic is denied.
    """
    if not isinstance(identity, SessionIdentity) or not isinstance(topic, str) or not topic or topic.startswith("$"):
        return False
    if action not in ("publish", "subscribe", "receive"):
        return False
    if action == "publish" and _wildcard(topic):
        return False
    if identity.kind is IdentityKind.BOOTSTRAP:
        return _bootstrap(identity, action, topic)
    if action == "subscribe":
        return any(filter_within(topic, p) for p in grants(identity)[1])
    if action == "receive":
        known = identity._received  # noqa: SLF001
        answer = known.get(topic)
        if answer is None:
            answer = any(_matches_levels(p, topic.split("/")) for p in identity._levels[1])  # noqa: SLF001
            if len(known) < _RECEIVED_KEPT:
                known[topic] = answer
        return answer
    levels = topic.split("/")
    return any(_matches_levels(p, levels) for p in identity._levels[0])  # noqa: SLF001
