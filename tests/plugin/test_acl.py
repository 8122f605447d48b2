"""The certmq ACL as a table: (identity, action, topic) -> allowed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugin.acl import ClaimScope, SessionIdentity, allowed, filter_within, grants
from broker_plugin.ca.identity import IdentityKind

DEV = SessionIdentity(tenant="acme", kind=IdentityKind.DEVICE, name="d1", serial=1, capabilities=("telemetry",))
RECOVERY = SessionIdentity(tenant="acme", kind=IdentityKind.DEVICE, name="d1", serial=1,
                           capabilities=("telemetry",), recovery_only=True)
CLAIM = SessionIdentity(tenant="acme", kind=IdentityKind.BOOTSTRAP, name="line", serial=2,
                        claim=ClaimScope(pattern="sensor-*"))
NO_POLICY = SessionIdentity(tenant="acme", kind=IdentityKind.BOOTSTRAP, name="gone", serial=3)
OP = SessionIdentity(tenant="acme", kind=IdentityKind.OPERATOR, name="op1", serial=4)
P = "certmq/v1/acme"

TABLE = [
    # device: own req/res, feeds, capability app topics
    (DEV, "publish", f"{P}/dev/d1/req", True),
    (DEV, "subscribe", f"{P}/dev/d1/res", True),
    (DEV, "receive", f"{P}/dev/d1/res", True),
    (DEV, "publish", f"{P}/dev/d1/res", False),
    (DEV, "subscribe", f"{P}/dev/d1/req", False),
    (DEV, "receive", f"{P}/dev/d1/req", False),
    (DEV, "publish", f"{P}/dev/d2/req", False),
    (DEV, "subscribe", f"{P}/dev/d2/res", False),
    (DEV, "subscribe", f"{P}/dev/+/res", False),
    (DEV, "subscribe", "#", False),
    (DEV, "subscribe", f"{P}/#", False),
    (DEV, "subscribe", f"{P}/rev/#", True),
    (DEV, "subscribe", f"{P}/rev/eu/delta", True),
    (DEV, "receive", f"{P}/rev/eu/snapshot", True),
    (DEV, "publish", f"{P}/rev/eu/delta", False),
    (DEV, "subscribe", "certmq/v1/globex/rev/#", False),
    (DEV, "receive", "certmq/v1/globex/rev/eu/delta", False),
    (DEV, "publish", "certmq/v1/globex/dev/d1/req", False),
    (DEV, "publish", f"{P}/dev/d1/app/telemetry", True),
    (DEV, "publish", f"{P}/dev/d1/app/telemetry/temp/1", True),
    (DEV, "subscribe", f"{P}/dev/d1/app/telemetry/#", True),
    (DEV, "subscribe", f"{P}/dev/d1/app/+", False),
    (DEV, "publish", f"{P}/dev/d1/app/cmd", False),
    (DEV, "publish", f"{P}/dev/d2/app/telemetry", False),
    (DEV, "subscribe", f"{P}/ops/findings", False),
    (DEV, "publish", f"{P}/dev/d1/+", False),
    (DEV, "publish", "$SYS/x", False),
    (DEV, "delete", f"{P}/dev/d1/req", False),
    # expired certificate in its recovery window: renewal only
    (RECOVERY, "publish", f"{P}/dev/d1/req", True),
    (RECOVERY, "subscribe", f"{P}/dev/d1/res", True),
    (RECOVERY, "subscribe", f"{P}/rev/#", False),
    (RECOVERY, "publish", f"{P}/dev/d1/app/telemetry", False),
    # claim credential: provisioning topics of the device ids its policy allows
    (CLAIM, "publish", f"{P}/prov/sensor-1/req", True),
    (CLAIM, "subscribe", f"{P}/prov/sensor-1/res", True),
    (CLAIM, "receive", f"{P}/prov/sensor-1/res", True),
    (CLAIM, "publish", f"{P}/prov/sensor-1/res", False),
    (CLAIM, "subscribe", f"{P}/prov/sensor-1/req", False),
    (CLAIM, "publish", f"{P}/prov/camera-1/req", False),
    (CLAIM, "subscribe", f"{P}/prov/+/res", False),
    (CLAIM, "subscribe", f"{P}/prov/sensor-1/#", False),
    (CLAIM, "publish", f"{P}/dev/sensor-1/req", False),
    (CLAIM, "subscribe", f"{P}/rev/#", False),
    (CLAIM, "publish", "certmq/v1/globex/prov/sensor-1/req", False),
    (NO_POLICY, "publish", f"{P}/prov/sensor-1/req", False),
    # operator: own ops topics, findings, feeds, the devices' app topics
    (OP, "publish", f"{P}/ops/op1/req", True),
    (OP, "subscribe", f"{P}/ops/op1/res", True),
    (OP, "subscribe", f"{P}/ops/findings", True),
    (OP, "publish", f"{P}/ops/findings", False),
    (OP, "publish", f"{P}/ops/op2/req", False),
    (OP, "subscribe", f"{P}/ops/op2/res", False),
    (OP, "subscribe", f"{P}/rev/#", True),
    (OP, "subscribe", f"{P}/dev/+/app/#", True),
    (OP, "publish", f"{P}/dev/d1/app/cmd", True),
    (OP, "subscribe", f"{P}/dev/+/res", False),
    (OP, "publish", f"{P}/dev/d1/req", False),
    (OP, "subscribe", "certmq/v1/globex/dev/+/app/#", False),
    # anything that is not a session identity
    (object(), "publish", f"{P}/dev/d1/req", False),
    (None, "receive", f"{P}/rev/eu/delta", False),
]


@pytest.mark.parametrize(("identity", "action", "topic", "expected"), TABLE)
def test_acl_table(identity: object, action: str, topic: str, expected: bool) -> None:
    assert allowed(identity, action, topic) is expected


@pytest.mark.parametrize(("flt", "pattern", "expected"), [
    ("a/b", "a/b", True), ("a/b", "a/+", True), ("a/+", "a/b", False), ("a/#", "a/+", False),
    ("a", "a/#", True), ("a/b/c", "a/#", True), ("a/#", "a/#", True), ("#", "a/#", False),
    ("a/+/c", "a/+/#", True), ("a/b", "a/b/c", False), ("a/b/c", "a/b", False),
])
def test_filter_within(flt: str, pattern: str, expected: bool) -> None:
    assert filter_within(flt, pattern) is expected


def test_session_owner_is_tenant_kind_and_name() -> None:
    renewed = SessionIdentity(tenant="acme", kind=IdentityKind.DEVICE, name="d1", serial=99)
    assert renewed.principal == DEV.principal
    assert OP.principal != SessionIdentity(tenant="globex", kind=IdentityKind.OPERATOR, name="op1", serial=4).principal


# The ACL caches each identity's grants split into levels (acl.SessionIdentity._levels). This is
# the rule it must keep giving: grants() patterns matched level by level against the topic, built
# afresh for every question.
def _reference(identity: SessionIdentity, action: str, topic: str) -> bool:
    publish, receive = grants(identity)

    def matches(pattern: str) -> bool:
        p, t = pattern.split("/"), topic.split("/")
        for i, level in enumerate(p):
            if level == "#":
                return len(t) >= i
            if i >= len(t) or (level != "+" and level != t[i]):
                return False
        return len(t) == len(p)

    return any(matches(p) for p in (publish if action == "publish" else receive))


_LEVEL = st.sampled_from(["certmq", "v1", "acme", "globex", "dev", "ops", "rev", "prov", "d1", "d2", "op1",
                          "app", "telemetry", "cmd", "req", "res", "findings", "eu", "delta", "", "x"])


@given(identity=st.sampled_from([DEV, RECOVERY, OP]), action=st.sampled_from(["publish", "receive"]),
       prefix=st.sampled_from(["", "certmq/v1/acme/", "certmq/v1/globex/", "certmq/v1/acme/dev/d1/"]),
       levels=st.lists(_LEVEL, min_size=1, max_size=7))
@settings(max_examples=3000, deadline=None)
def test_cached_grants_decide_like_fresh_ones(identity: SessionIdentity, action: str, prefix: str, levels: list[str]) -> None:
    topic = prefix + "/".join(levels)
    if not topic or topic.startswith("$") or (action == "publish" and ("+" in topic or "#" in topic)):
        return
    assert allowed(identity, action, topic) is _reference(identity, action, topic), (identity, action, topic)
