"""certmq's MQTT topic names: builders, subscription filters and the parser.

The one place that knows how topics are spelled. Builders and :func:`parse_topic`
are a mirrored pair: ``parse_topic(x_topic(...))`` gives back the arguments, and
an identifier one side refuses, the other refuses too. This module knows nothing
of payloads, brokers or ACLs; it only turns names into strings and back.

====================================  =================================================
kind                                  topic
====================================  =================================================
device request                        ``certmq/v1/{tenant}/dev/{device_id}/req``
device response                       ``certmq/v1/{tenant}/dev/{device_id}/res``
provisioning request (bootstrap)      ``certmq/v1/{tenant}/prov/{device_id}/req``
provisioning response                 ``certmq/v1/{tenant}/prov/{device_id}/res``
revocation snapshot (retained)        ``certmq/v1/{tenant}/rev/{region}/snapshot``
  ... of one status list (retained)     ``certmq/v1/{tenant}/rev/{region}/snapshot/{list_id}``
revocation delta stream               ``certmq/v1/{tenant}/rev/{region}/delta``
operator request                      ``certmq/v1/{tenant}/ops/{operator_id}/req``
operator response                     ``certmq/v1/{tenant}/ops/{operator_id}/res``
operator findings (health)            ``certmq/v1/{tenant}/ops/findings``
====================================  =================================================

Identifiers (tenant, device id, region, operator id) are single topic levels:
a non-empty ``str`` of at most :data:`MAX_IDENTIFIER_BYTES` UTF-8 bytes, with no
``+``, ``#``, ``/``, no control character (C0, DEL, C1, which includes NUL), no
Unicode non-character or lone surrogate, no leading ``$`` and no leading or
trailing whitespace. ``findings`` is reserved as an operator id.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from .errors import InvalidIdentifier, LocalProtocolError, TopicError

__all__ = [
    "FINDINGS",
    "MAX_IDENTIFIER_BYTES",
    "PREFIX",
    "RESERVED_OPERATOR_IDS",
    "ParsedTopic",
    "TopicKind",
    "delta_topic",
    "device_request_topic",
    "device_response_topic",
    "findings_topic",
    "operator_filter",
    "operator_request_topic",
    "operator_response_topic",
    "parse_topic",
    "provisioning_filter",
    "provisioning_request_topic",
    "provisioning_response_topic",
    "request_filter",
    "response_topic_for",
    "shared",
    "snapshot_topic",
    "list_snapshot_topic",
    "validate_identifier",
]

PREFIX: Final = "certmq/v1"
"""First two levels of every certmq topic: the protocol name and its major version."""

MAX_IDENTIFIER_BYTES: Final = 64
"""Longest identifier, in UTF-8 bytes (keeps every topic far below MQTT's 65535-byte limit)."""

FINDINGS: Final = "findings"
"""The operator-namespace level that carries health findings."""

RESERVED_OPERATOR_IDS: Final = frozenset({FINDINGS})
"""Operator ids that would read as another topic of the ``ops`` namespace."""

_FORBIDDEN_CHARS: Final = {"+": "the MQTT wildcard '+'", "#": "the MQTT wildcard '#'", "/": "the level separator '/'"}

# A topic longer than this cannot be one of ours: refuse it before splitting.
_MAX_TOPIC_CHARS: Final = len(PREFIX) + 2 * MAX_IDENTIFIER_BYTES + 32

_DEV, _PROV, _REV, _OPS = "dev", "prov", "rev", "ops"
_REQ, _RES, _SNAPSHOT, _DELTA = "req", "res", "snapshot", "delta"
_MAX_LIST_ID: Final = 2**32 - 1


def _show(value: object) -> str:
    """``repr`` of a bad value, cut short so an attacker's megabyte stays out of logs."""
    text = repr(value)
    return text if len(text) <= 50 else text[:47] + "..."


def _is_noncharacter(ch: str) -> bool:
    code = ord(ch)
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


# Printable ASCII without '+', '#', '/'; not starting with '$' or a space, not ending with a
# space; 1 to 64 characters (ASCII: one byte each). Exactly the ASCII strings the rules
# below accept (tests/protocol/test_identifier_fast.py checks that against the slow path), so
# the common identifier needs one regex match instead of a Unicode lookup per character.
_ASCII_FIRST = "\x21\x22\x25-\x2a\x2c-\x2e\x30-\x7e"
_ASCII_MIDDLE = "\x20-\x22\x24-\x2a\x2c-\x2e\x30-\x7e"
_ASCII_LAST = "\x21\x22\x24-\x2a\x2c-\x2e\x30-\x7e"
_PLAIN_IDENTIFIER: Final = re.compile(
    f"[{_ASCII_FIRST}](?:[{_ASCII_MIDDLE}]{{0,{MAX_IDENTIFIER_BYTES - 2}}}[{_ASCII_LAST}])?"
)


def validate_identifier(value: object, *, what: str = "device id", reserved: frozenset[str] = frozenset()) -> str:
    """Return ``value`` unchanged if it can be one level of a certmq topic.

    Raises :class:`~protocol.errors.InvalidIdentifier` naming ``what``, the value
    (truncated ``repr``) and the rule broken otherwise; see the module docstring
    for the rules. ``reserved`` lists words that are not allowed for this kind of
    identifier (for operator ids: :data:`RESERVED_OPERATOR_IDS`).
    """
    if type(value) is str and _PLAIN_IDENTIFIER.fullmatch(value) is not None and value not in reserved:
        return value
    return _validate_identifier_slowly(value, what=what, reserved=reserved)


def _validate_identifier_slowly(value: object, *, what: str, reserved: frozenset[str]) -> str:
    """:func:`validate_identifier` character by character: every rule, with the reason it fails."""
    if not isinstance(value, str):
        raise InvalidIdentifier(f"{what} must be a str, not {type(value).__name__} ({_show(value)})")

    def bad(rule: str) -> InvalidIdentifier:
        return InvalidIdentifier(f"invalid {what} {_show(value)}: {rule}")

    if not value:
        raise bad("must not be empty")
    if len(value) > MAX_IDENTIFIER_BYTES:  # cheap early exit: more characters means more bytes
        raise bad(f"is longer than {MAX_IDENTIFIER_BYTES} UTF-8 bytes")
    for index, ch in enumerate(value):
        if ch in _FORBIDDEN_CHARS:
            raise bad(f"contains {_FORBIDDEN_CHARS[ch]} at index {index}")
        category = unicodedata.category(ch)
        if category == "Cc":
            raise bad(f"contains control character U+{ord(ch):04X} at index {index}")
        if category == "Cs":
            raise bad(f"contains lone surrogate U+{ord(ch):04X} at index {index} (not encodable as UTF-8)")
        if _is_noncharacter(ch):
            raise bad(f"contains Unicode non-character U+{ord(ch):04X} at index {index}")
    if value[0] == "$":
        raise bad("must not start with '$' (reserved for broker topics)")
    if value[0].isspace() or value[-1].isspace():
        raise bad("must not start or end with whitespace")
    size = len(value.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        raise bad(f"is {size} UTF-8 bytes long, the limit is {MAX_IDENTIFIER_BYTES}")
    if value in reserved:
        raise bad(f"{value!r} is a reserved word here")
    return value


def _tenant(tenant: object) -> str:
    return validate_identifier(tenant, what="tenant")


def _device(device_id: object) -> str:
    return validate_identifier(device_id, what="device id")


def _region(region: object) -> str:
    return validate_identifier(region, what="region")


def _operator(operator_id: object) -> str:
    return validate_identifier(operator_id, what="operator id", reserved=RESERVED_OPERATOR_IDS)


def device_request_topic(tenant: str, device_id: str) -> str:
    """``certmq/v1/{tenant}/dev/{device_id}/req``: where a device publishes its requests."""
    return f"{PREFIX}/{_tenant(tenant)}/{_DEV}/{_device(device_id)}/{_REQ}"


def device_response_topic(tenant: str, device_id: str) -> str:
    """``certmq/v1/{tenant}/dev/{device_id}/res``: where only that device gets its replies."""
    return f"{PREFIX}/{_tenant(tenant)}/{_DEV}/{_device(device_id)}/{_RES}"


def provisioning_request_topic(tenant: str, device_id: str) -> str:
    """``certmq/v1/{tenant}/prov/{device_id}/req``: requests made with a bootstrap (claim) certificate."""
    return f"{PREFIX}/{_tenant(tenant)}/{_PROV}/{_device(device_id)}/{_REQ}"


def provisioning_response_topic(tenant: str, device_id: str) -> str:
    """``certmq/v1/{tenant}/prov/{device_id}/res``: replies to provisioning requests."""
    return f"{PREFIX}/{_tenant(tenant)}/{_PROV}/{_device(device_id)}/{_RES}"


def snapshot_topic(tenant: str, region: str) -> str:
    """``certmq/v1/{tenant}/rev/{region}/snapshot``: the retained snapshot of the region's newest list."""
    return f"{PREFIX}/{_tenant(tenant)}/{_REV}/{_region(region)}/{_SNAPSHOT}"


def list_snapshot_topic(tenant: str, region: str, list_id: int) -> str:
    """``certmq/v1/{tenant}/rev/{region}/snapshot/{list_id}``: the retained snapshot of one list.

    MQTT retains one message per topic, so a region with several status lists
    keeps one snapshot per list here. ``list_id`` is written in decimal.
    """
    return f"{snapshot_topic(tenant, region)}/{_list_id(list_id)}"


def _list_id(value: object) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_LIST_ID:
        raise LocalProtocolError(f"list id must be an integer in 0..{_MAX_LIST_ID}, not {_show(value)}")
    return value


def delta_topic(tenant: str, region: str) -> str:
    """``certmq/v1/{tenant}/rev/{region}/delta``: the stream of sequenced revocation deltas."""
    return f"{PREFIX}/{_tenant(tenant)}/{_REV}/{_region(region)}/{_DELTA}"


def operator_request_topic(tenant: str, operator_id: str) -> str:
    """``certmq/v1/{tenant}/ops/{operator_id}/req``: an operator's requests (revoke, inspect)."""
    return f"{PREFIX}/{_tenant(tenant)}/{_OPS}/{_operator(operator_id)}/{_REQ}"


def operator_response_topic(tenant: str, operator_id: str) -> str:
    """``certmq/v1/{tenant}/ops/{operator_id}/res``: replies to that operator."""
    return f"{PREFIX}/{_tenant(tenant)}/{_OPS}/{_operator(operator_id)}/{_RES}"


def findings_topic(tenant: str) -> str:
    """``certmq/v1/{tenant}/ops/findings``: health findings for the tenant's operators."""
    return f"{PREFIX}/{_tenant(tenant)}/{_OPS}/{FINDINGS}"


def _filter_tenant(tenant: str | None) -> str:
    return "+" if tenant is None else _tenant(tenant)


def request_filter(tenant: str | None = None) -> str:
    """Subscription filter for device requests: ``certmq/v1/+/dev/+/req`` (one tenant if given)."""
    return f"{PREFIX}/{_filter_tenant(tenant)}/{_DEV}/+/{_REQ}"


def provisioning_filter(tenant: str | None = None) -> str:
    """Subscription filter for provisioning requests: ``certmq/v1/+/prov/+/req``."""
    return f"{PREFIX}/{_filter_tenant(tenant)}/{_PROV}/+/{_REQ}"


def operator_filter(tenant: str | None = None) -> str:
    """Subscription filter for operator requests: ``certmq/v1/+/ops/+/req``.

    It cannot match the findings topic, which has one level fewer.
    """
    return f"{PREFIX}/{_filter_tenant(tenant)}/{_OPS}/+/{_REQ}"


def shared(topic_filter: str, /, group: str = "certmq") -> str:
    """``$share/{group}/{topic_filter}``: an MQTT 5 shared subscription for scale-out workers.

    ``group`` follows the identifier rules; ``topic_filter`` must be a valid MQTT
    filter (wildcards only as whole levels, ``#`` only last) and not itself shared.
    Raises :class:`~protocol.errors.LocalProtocolError` otherwise.
    """
    validate_identifier(group, what="share group")
    if not isinstance(topic_filter, str) or not topic_filter:
        raise LocalProtocolError(f"topic filter must be a non-empty str, got {_show(topic_filter)}")
    if topic_filter.startswith("$share/"):
        raise LocalProtocolError(f"topic filter {_show(topic_filter)} is already a shared subscription")
    if "\x00" in topic_filter:
        raise LocalProtocolError(f"topic filter {_show(topic_filter)} contains NUL")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) != 1:
            raise LocalProtocolError(
                f"topic filter {_show(topic_filter)}: wildcard inside level {index} ({level!r}); "
                "'+' and '#' must be a whole level"
            )
        if level == "#" and index != len(levels) - 1:
            raise LocalProtocolError(f"topic filter {_show(topic_filter)}: '#' must be the last level")
    return f"$share/{group}/{topic_filter}"


class TopicKind(enum.Enum):
    """Which of certmq's topics a string is."""

    DEVICE_REQUEST = "device-request"
    DEVICE_RESPONSE = "device-response"
    PROVISIONING_REQUEST = "provisioning-request"
    PROVISIONING_RESPONSE = "provisioning-response"
    REVOCATION_SNAPSHOT = "revocation-snapshot"
    REVOCATION_DELTA = "revocation-delta"
    OPERATOR_REQUEST = "operator-request"
    OPERATOR_RESPONSE = "operator-response"
    OPERATOR_FINDINGS = "operator-findings"

    @property
    def is_request(self) -> bool:
        """True for the three kinds a server subscribes to and answers."""
        return self in _RESPONSE_KIND


# kind -> (namespace level, last level); the findings topic has no identifier level.
_LAYOUT: Final[dict[TopicKind, tuple[str, str]]] = {
    TopicKind.DEVICE_REQUEST: (_DEV, _REQ),
    TopicKind.DEVICE_RESPONSE: (_DEV, _RES),
    TopicKind.PROVISIONING_REQUEST: (_PROV, _REQ),
    TopicKind.PROVISIONING_RESPONSE: (_PROV, _RES),
    TopicKind.REVOCATION_SNAPSHOT: (_REV, _SNAPSHOT),
    TopicKind.REVOCATION_DELTA: (_REV, _DELTA),
    TopicKind.OPERATOR_REQUEST: (_OPS, _REQ),
    TopicKind.OPERATOR_RESPONSE: (_OPS, _RES),
}
_BY_LEVELS: Final = {levels: kind for kind, levels in _LAYOUT.items()}

_RESPONSE_KIND: Final = {
    TopicKind.DEVICE_REQUEST: TopicKind.DEVICE_RESPONSE,
    TopicKind.PROVISIONING_REQUEST: TopicKind.PROVISIONING_RESPONSE,
    TopicKind.OPERATOR_REQUEST: TopicKind.OPERATOR_RESPONSE,
}


@dataclass(frozen=True, kw_only=True)
class ParsedTopic:
    """A certmq topic taken apart. Exactly the identifier its kind uses is set.

    Device and provisioning kinds set ``device_id``; revocation kinds set
    ``region``; operator request/response set ``operator_id``; findings sets none.
    Checked on construction (:class:`~protocol.errors.InvalidIdentifier` or
    :class:`~protocol.errors.LocalProtocolError`), so a ``ParsedTopic`` always
    turns back into a valid topic via :attr:`topic`.
    """

    kind: TopicKind
    tenant: str
    device_id: str | None = None
    region: str | None = None
    operator_id: str | None = None
    #: only on a per-list revocation snapshot topic (``.../snapshot/{list_id}``)
    list_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TopicKind):
            raise LocalProtocolError(f"kind must be a TopicKind, not {_show(self.kind)}")
        _tenant(self.tenant)
        namespace = _LAYOUT[self.kind][0] if self.kind in _LAYOUT else None
        expected = {
            "device_id": namespace in (_DEV, _PROV),
            "region": namespace == _REV,
            "operator_id": namespace == _OPS,
        }
        for name, wanted in expected.items():
            value = getattr(self, name)
            if wanted and value is None:
                raise LocalProtocolError(f"a {self.kind.value} topic needs {name}")
            if not wanted and value is not None:
                raise LocalProtocolError(f"a {self.kind.value} topic has no {name}, got {_show(value)}")
        if self.device_id is not None:
            _device(self.device_id)
        if self.region is not None:
            _region(self.region)
        if self.operator_id is not None:
            _operator(self.operator_id)
        if self.list_id is not None:
            if self.kind is not TopicKind.REVOCATION_SNAPSHOT:
                raise LocalProtocolError(f"a {self.kind.value} topic has no list_id")
            _list_id(self.list_id)

    @property
    def topic(self) -> str:
        """The topic string this describes (the inverse of :func:`parse_topic`)."""
        if self.kind is TopicKind.OPERATOR_FINDINGS:
            return findings_topic(self.tenant)
        namespace, last = _LAYOUT[self.kind]
        ident = self.device_id or self.region or self.operator_id
        suffix = "" if self.list_id is None else f"/{self.list_id}"
        return f"{PREFIX}/{self.tenant}/{namespace}/{ident}/{last}{suffix}"


def parse_topic(topic: str) -> ParsedTopic:
    """Take one of certmq's topics apart; the inverse of the ``*_topic`` builders.

    Raises :class:`~protocol.errors.TopicError` for anything that is not exactly
    one of the topics in the module table, including one whose identifier levels
    break the identifier rules (the same rules the builders enforce).
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a str, not {type(topic).__name__}")
    if len(topic) > _MAX_TOPIC_CHARS:
        raise TopicError(f"topic of {len(topic)} characters is longer than any certmq topic: {_show(topic)}")
    if not topic.startswith(PREFIX + "/"):
        raise TopicError(f"not a certmq topic (must start with {PREFIX + '/'!r}): {_show(topic)}")
    levels = topic[len(PREFIX) + 1 :].split("/")
    try:
        if len(levels) == 3 and levels[1:] == [_OPS, FINDINGS]:
            return ParsedTopic(kind=TopicKind.OPERATOR_FINDINGS, tenant=levels[0])
        if len(levels) == 5 and levels[1] == _REV and levels[3] == _SNAPSHOT:
            number = levels[4]
            # Canonical decimal only, so every list has exactly one topic.
            if not (number.isascii() and number.isdigit()) or (number != "0" and number.startswith("0")) \
                    or len(number) > 10 or int(number) > _MAX_LIST_ID:
                raise TopicError(f"not a certmq topic (bad list id {number[:12]!r}): {_show(topic)}")
            return ParsedTopic(kind=TopicKind.REVOCATION_SNAPSHOT, tenant=levels[0], region=levels[2],
                               list_id=int(number))
        if len(levels) != 4:
            raise TopicError(f"not a certmq topic (wrong number of levels): {_show(topic)}")
        tenant, namespace, ident, last = levels
        kind = _BY_LEVELS.get((namespace, last))
        if kind is None:
            raise TopicError(f"not a certmq topic (unknown {namespace!r}/.../{last!r} form): {_show(topic)}")
        if namespace in (_DEV, _PROV):
            return ParsedTopic(kind=kind, tenant=tenant, device_id=ident)
        if namespace == _REV:
            return ParsedTopic(kind=kind, tenant=tenant, region=ident)
        return ParsedTopic(kind=kind, tenant=tenant, operator_id=ident)
    except InvalidIdentifier as exc:
        raise TopicError(f"bad identifier in topic {_show(topic)}: {exc}") from None


def response_topic_for(parsed: ParsedTopic) -> str:
    """The topic on which the reply to a request topic goes (``.../req`` -> ``.../res``).

    Raises :class:`~protocol.errors.LocalProtocolError` for a topic that is not a request.
    """
    if not isinstance(parsed, ParsedTopic):
        raise LocalProtocolError(f"expected a ParsedTopic, not {type(parsed).__name__}")
    response_kind = _RESPONSE_KIND.get(parsed.kind)
    if response_kind is None:
        raise LocalProtocolError(f"a {parsed.kind.value} topic is not a request and has no response topic")
    namespace, last = _LAYOUT[response_kind]
    ident = parsed.device_id or parsed.operator_id
    return f"{PREFIX}/{parsed.tenant}/{namespace}/{ident}/{last}"
