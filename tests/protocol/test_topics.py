"""protocol.topics: the topic table, builders <-> parse_topic, identifier rules on both sides."""

from __future__ import annotations

import ast
import re
import inspect
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol.topics as topics
from protocol.codes import ErrorCode
from protocol.errors import InvalidIdentifier, LocalProtocolError, TopicError
from protocol.topics import (
    MAX_IDENTIFIER_BYTES,
    PREFIX,
    ParsedTopic,
    TopicKind,
    delta_topic,
    device_request_topic,
    device_response_topic,
    findings_topic,
    operator_filter,
    operator_request_topic,
    operator_response_topic,
    parse_topic,
    provisioning_filter,
    provisioning_request_topic,
    provisioning_response_topic,
    request_filter,
    response_topic_for,
    shared,
    snapshot_topic,
    validate_identifier,
)

# builder, kind, name of the identifier field it fills (None for findings)
BUILDERS: list[tuple[Callable[..., str], TopicKind, str | None]] = [
    (device_request_topic, TopicKind.DEVICE_REQUEST, "device_id"),
    (device_response_topic, TopicKind.DEVICE_RESPONSE, "device_id"),
    (provisioning_request_topic, TopicKind.PROVISIONING_REQUEST, "device_id"),
    (provisioning_response_topic, TopicKind.PROVISIONING_RESPONSE, "device_id"),
    (snapshot_topic, TopicKind.REVOCATION_SNAPSHOT, "region"),
    (delta_topic, TopicKind.REVOCATION_DELTA, "region"),
    (operator_request_topic, TopicKind.OPERATOR_REQUEST, "operator_id"),
    (operator_response_topic, TopicKind.OPERATOR_RESPONSE, "operator_id"),
    (findings_topic, TopicKind.OPERATOR_FINDINGS, None),
]


def build(builder: Callable[..., str], field: str | None, tenant: str, ident: str) -> str:
    return builder(tenant) if field is None else builder(tenant, ident)


def test_topic_table() -> None:
    # The spelled-out table of the module docstring, one row each.
    assert PREFIX == "certmq/v1"
    assert device_request_topic("acme", "d1") == "certmq/v1/acme/dev/d1/req"
    assert device_response_topic("acme", "d1") == "certmq/v1/acme/dev/d1/res"
    assert provisioning_request_topic("acme", "d1") == "certmq/v1/acme/prov/d1/req"
    assert provisioning_response_topic("acme", "d1") == "certmq/v1/acme/prov/d1/res"
    assert snapshot_topic("acme", "eu-west") == "certmq/v1/acme/rev/eu-west/snapshot"
    assert delta_topic("acme", "eu-west") == "certmq/v1/acme/rev/eu-west/delta"
    assert operator_request_topic("acme", "alice") == "certmq/v1/acme/ops/alice/req"
    assert operator_response_topic("acme", "alice") == "certmq/v1/acme/ops/alice/res"
    assert findings_topic("acme") == "certmq/v1/acme/ops/findings"
    assert {kind for _, kind, _ in BUILDERS} == set(TopicKind)
    for row in [r for r in (topics.__doc__ or "").splitlines() if "``certmq/v1/" in r]:
        assert row.split("``")[1].startswith(PREFIX + "/{tenant}/")


# --- identifiers: valid ones (incl. non-ASCII) round-trip through every builder ------------

identifiers = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="+#/"),
        min_size=1,
        max_size=MAX_IDENTIFIER_BYTES,
    )
    .filter(lambda s: not s[0].isspace() and not s[-1].isspace() and not s.startswith("$"))
    .filter(lambda s: len(s.encode("utf-8")) <= MAX_IDENTIFIER_BYTES)
    .filter(lambda s: not any(0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE for c in s))
)


@pytest.mark.parametrize(("builder", "kind", "field"), BUILDERS, ids=[k.value for _, k, _ in BUILDERS])
@given(tenant=identifiers, ident=identifiers.filter(lambda s: s != "findings"))
def test_every_builder_round_trips(
    builder: Callable[..., str], kind: TopicKind, field: str | None, tenant: str, ident: str
) -> None:
    topic = build(builder, field, tenant, ident)
    parsed = parse_topic(topic)
    assert parsed.kind is kind
    assert parsed.tenant == tenant
    fields = {"device_id": parsed.device_id, "region": parsed.region, "operator_id": parsed.operator_id}
    assert {k: v for k, v in fields.items() if v is not None} == ({} if field is None else {field: ident})
    assert parsed.topic == topic
    assert validate_identifier(ident) == ident


def test_non_ascii_example_and_exact_length_limit() -> None:
    device = "센서-" + "é" * 29  # 3*2 + 1 + 29*2 = 65 bytes: one too many
    with pytest.raises(InvalidIdentifier, match="65 UTF-8 bytes"):
        validate_identifier(device)
    device = device[:-1]  # 63 bytes
    assert parse_topic(device_request_topic("ŧenant", device)).device_id == device
    assert validate_identifier("x" * MAX_IDENTIFIER_BYTES) == "x" * MAX_IDENTIFIER_BYTES


# --- identifiers: each forbidden case, refused by builders AND by the parser --------------

BAD_IDENTIFIERS: list[tuple[str, str]] = [
    ("", "empty"),
    ("a+b", "wildcard '+'"),
    ("+", "wildcard '+'"),
    ("a#", "wildcard '#'"),
    ("a/b", "separator '/'"),
    ("a\x00b", "U+0000"),
    ("a\x1fb", "U+001F"),
    ("a\tb", "U+0009"),
    ("a\nb", "U+000A"),
    ("a\x7fb", "U+007F"),
    ("a\x85b", "U+0085"),
    ("a\x9fb", "U+009F"),
    ("a\ud800b", "surrogate"),
    ("a\ufffeb", "non-character"),
    ("a\ufdd0b", "non-character"),
    ("$SYS", "start with '$'"),
    ("$", "start with '$'"),
    (" lead", "whitespace"),
    ("trail ", "whitespace"),
    ("\u3000ideographic", "whitespace"),
    ("trail\u00a0", "whitespace"),
    ("x" * (MAX_IDENTIFIER_BYTES + 1), "longer than 64"),
    ("é" * 33, "66 UTF-8 bytes"),
]


@pytest.mark.parametrize(("value", "rule"), BAD_IDENTIFIERS, ids=[r for _, r in BAD_IDENTIFIERS])
def test_bad_identifier_is_refused_by_validator_with_a_clear_message(value: str, rule: str) -> None:
    with pytest.raises(InvalidIdentifier, match=re.escape(rule)) as info:
        validate_identifier(value, what="region")
    message = str(info.value)
    assert message.startswith("invalid region ")
    assert repr(value)[:20] in message or len(repr(value)) > 50
    assert len(message) < 200


@pytest.mark.parametrize(("value", "rule"), BAD_IDENTIFIERS, ids=[r for _, r in BAD_IDENTIFIERS])
@pytest.mark.parametrize(("builder", "kind", "field"), BUILDERS, ids=[k.value for _, k, _ in BUILDERS])
def test_bad_identifier_is_refused_by_builders_and_parser(
    builder: Callable[..., str], kind: TopicKind, field: str | None, value: str, rule: str
) -> None:
    # In the tenant position and in the identifier position.
    positions = [("tenant", value, "ok-id")] + ([] if field is None else [(field, "ok-tenant", value)])
    for position, tenant, ident in positions:
        with pytest.raises(InvalidIdentifier, match=re.escape(rule)):
            build(builder, field, tenant, ident)
        good = build(builder, field, "ok-tenant", "ok-id")
        bad_topic = good.replace("ok-tenant" if position == "tenant" else "ok-id", value, 1)
        with pytest.raises(TopicError):
            parse_topic(bad_topic)


def test_non_str_identifiers_are_refused() -> None:
    for value in [None, 5, b"dev", ["a"]]:
        with pytest.raises(InvalidIdentifier, match="must be a str"):
            validate_identifier(value)
        with pytest.raises(InvalidIdentifier, match="tenant must be a str"):
            device_request_topic(value, "d")  # type: ignore[arg-type]


def test_long_values_are_truncated_in_messages() -> None:
    with pytest.raises(InvalidIdentifier) as info:
        validate_identifier("z" * 100_000)
    assert len(str(info.value)) < 200
    with pytest.raises(TopicError) as info2:
        parse_topic(PREFIX + "/" + "z" * 100_000)
    assert len(str(info2.value)) < 200


def test_findings_is_a_reserved_operator_id_only() -> None:
    for builder in (operator_request_topic, operator_response_topic):
        with pytest.raises(InvalidIdentifier, match="reserved"):
            builder("acme", "findings")
    with pytest.raises(TopicError, match="reserved"):
        parse_topic("certmq/v1/acme/ops/findings/req")
    # As a device id or region it is just a name.
    assert parse_topic(device_request_topic("acme", "findings")).device_id == "findings"
    assert parse_topic(snapshot_topic("acme", "findings")).region == "findings"
    assert parse_topic(findings_topic("findings")).tenant == "findings"
    assert validate_identifier("findings") == "findings"


# --- topics that are not ours -------------------------------------------------------------

NOT_OURS = [
    "",
    "certmq",
    "certmq/v1",
    "certmq/v1/",
    "certmq/v2/acme/dev/d/req",
    "CERTMQ/v1/acme/dev/d/req",
    "/certmq/v1/acme/dev/d/req",
    "certmq/v1/acme/dev/d/req/",
    "certmq/v1/acme/dev/d/req/extra",
    "certmq/v1/acme/dev/d",
    "certmq/v1/acme/dev//req",
    "certmq/v1//dev/d/req",
    "certmq/v1/acme/dev/d/snapshot",
    "certmq/v1/acme/rev/eu/req",
    "certmq/v1/acme/ops/findings/extra",
    "certmq/v1/acme/ops",
    "certmq/v1/acme/prov/d/delta",
    "certmq/v1/acme/device/d/req",
    "certmq/v1/+/dev/+/req",
    "certmq/v1/acme/dev/#",
    "$share/certmq/certmq/v1/acme/dev/d/req",
    "$SYS/broker/uptime",
    "other/v1/acme/dev/d/req",
]


@pytest.mark.parametrize("topic", NOT_OURS)
def test_foreign_topics_raise_topic_error(topic: str) -> None:
    with pytest.raises(TopicError, match="topic"):
        parse_topic(topic)


def test_non_str_topic_raises_topic_error() -> None:
    for value in [None, b"certmq/v1/acme/dev/d/req", 7]:
        with pytest.raises(TopicError, match="must be a str"):
            parse_topic(value)  # type: ignore[arg-type]


def test_topic_error_is_a_remote_error_with_a_wire_code() -> None:
    with pytest.raises(TopicError) as info:
        parse_topic("certmq/v1/acme/dev/a+b/req")
    assert not isinstance(info.value, LocalProtocolError)
    assert info.value.code is ErrorCode.MALFORMED


# --- filters and shared subscriptions -----------------------------------------------------


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (spec 4.7), to check the filters against real topics."""
    f, t = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def test_filters_match_exactly_their_request_topics() -> None:
    assert request_filter() == "certmq/v1/+/dev/+/req"
    assert provisioning_filter() == "certmq/v1/+/prov/+/req"
    assert operator_filter() == "certmq/v1/+/ops/+/req"
    assert request_filter("acme") == "certmq/v1/acme/dev/+/req"
    all_topics = [build(b, f, t, i) for b, _, f in BUILDERS for t in ("acme", "other") for i in ("d1", "eu")]
    for filt, kind in [
        (request_filter(), TopicKind.DEVICE_REQUEST),
        (provisioning_filter(), TopicKind.PROVISIONING_REQUEST),
        (operator_filter(), TopicKind.OPERATOR_REQUEST),
    ]:
        matched = {t for t in all_topics if topic_matches(filt, t)}
        assert matched == {t for t in all_topics if parse_topic(t).kind is kind}
    assert {t for t in all_topics if topic_matches(operator_filter("acme"), t)} == {
        operator_request_topic("acme", "d1"),
        operator_request_topic("acme", "eu"),
    }
    with pytest.raises(InvalidIdentifier, match="tenant"):
        request_filter("a+")


def test_shared_subscriptions() -> None:
    assert shared(request_filter()) == "$share/certmq/certmq/v1/+/dev/+/req"
    assert shared("certmq/v1/#", "ca-workers") == "$share/ca-workers/certmq/v1/#"
    for bad_filter in ["", "$share/g/x", "a/b#", "a/+b/c", "a/#/b", "a\x00b"]:
        with pytest.raises(LocalProtocolError, match="filter"):
            shared(bad_filter)
    for bad_group in ["", "a/b", "a+", "$g"]:
        with pytest.raises(InvalidIdentifier, match="share group"):
            shared(request_filter(), bad_group)


# --- ParsedTopic and response_topic_for ---------------------------------------------------


def test_response_topic_for_requests() -> None:
    pairs = [
        (device_request_topic("acme", "d1"), device_response_topic("acme", "d1")),
        (provisioning_request_topic("acme", "d1"), provisioning_response_topic("acme", "d1")),
        (operator_request_topic("acme", "bob"), operator_response_topic("acme", "bob")),
    ]
    for req, res in pairs:
        assert parse_topic(req).kind.is_request
        assert response_topic_for(parse_topic(req)) == res
    for non_request in [device_response_topic("a", "d"), snapshot_topic("a", "r"), delta_topic("a", "r"),
                        operator_response_topic("a", "o"), findings_topic("a")]:
        parsed = parse_topic(non_request)
        assert not parsed.kind.is_request
        with pytest.raises(LocalProtocolError, match="not a request"):
            response_topic_for(parsed)
    with pytest.raises(LocalProtocolError, match="ParsedTopic"):
        response_topic_for(device_request_topic("a", "d"))  # type: ignore[arg-type]


def test_parsed_topic_checks_its_fields() -> None:
    with pytest.raises(LocalProtocolError, match="needs device_id"):
        ParsedTopic(kind=TopicKind.DEVICE_REQUEST, tenant="acme")
    with pytest.raises(LocalProtocolError, match="has no region"):
        ParsedTopic(kind=TopicKind.DEVICE_REQUEST, tenant="acme", device_id="d", region="eu")
    with pytest.raises(LocalProtocolError, match="has no operator_id"):
        ParsedTopic(kind=TopicKind.OPERATOR_FINDINGS, tenant="acme", operator_id="bob")
    with pytest.raises(InvalidIdentifier, match="device id"):
        ParsedTopic(kind=TopicKind.DEVICE_REQUEST, tenant="acme", device_id="a/b")
    with pytest.raises(InvalidIdentifier, match="reserved"):
        ParsedTopic(kind=TopicKind.OPERATOR_REQUEST, tenant="acme", operator_id="findings")
    with pytest.raises(LocalProtocolError, match="TopicKind"):
        ParsedTopic(kind="device-request", tenant="acme", device_id="d")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ParsedTopic(TopicKind.DEVICE_REQUEST, "acme", "d")  # type: ignore[misc]


# --- module hygiene -----------------------------------------------------------------------


def test_all_is_complete() -> None:
    public = {
        n for n, v in vars(topics).items()
        if not n.startswith("_") and n != "annotations" and not inspect.ismodule(v)
        and getattr(v, "__module__", topics.__name__) == topics.__name__
    }
    public |= {n for n, v in vars(topics).items() if n.isupper() and not n.startswith("_")}
    public -= {"Final"}
    assert set(topics.__all__) == public


def test_module_stays_sans_io() -> None:
    tree = ast.parse(inspect.getsource(topics))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "time", "random", "secrets", "os", "amqtt", "aiomqtt", "paho"}


# --- per-list snapshot topics (one retained snapshot per status list) -------------------


def test_list_snapshot_topic_round_trips() -> None:
    from protocol.topics import list_snapshot_topic

    topic = list_snapshot_topic("acme", "eu-west", 7)
    assert topic == "certmq/v1/acme/rev/eu-west/snapshot/7"
    parsed = parse_topic(topic)
    assert parsed.kind is TopicKind.REVOCATION_SNAPSHOT and parsed.region == "eu-west" and parsed.list_id == 7
    assert parsed.topic == topic
    assert parse_topic("certmq/v1/acme/rev/eu-west/snapshot").list_id is None


@pytest.mark.parametrize("bad", ["07", "-1", "x", "", "4294967296", "1.0", "٣"])
def test_list_snapshot_topic_refuses_non_canonical_list_ids(bad: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(f"certmq/v1/acme/rev/eu/snapshot/{bad}")


@pytest.mark.parametrize("bad", [-1, 2**32, "3", True])
def test_list_snapshot_topic_builder_refuses_bad_list_ids(bad: object) -> None:
    from protocol.topics import list_snapshot_topic

    with pytest.raises(LocalProtocolError):
        list_snapshot_topic("acme", "eu", bad)  # type: ignore[arg-type]
