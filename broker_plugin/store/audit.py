"""The audit trail's values and its hash chain: building entries, verifying a chain, exporting it.

Each entry's hash is SHA-256 over ``prev_hash || canonical JSON`` of the entry's other fields
(``seq``, ``time`` as epoch seconds, ``tenant``, ``kind``, ``actor``, ``subject``, ``details``),
canonical meaning sorted keys and no whitespace. The first entry's ``prev_hash`` is 32 zero bytes.
Anyone holding an export can re-check it with :func:`verify_chain` and nothing else.

This module knows no database: the registries store and serialise the chain (one writer at a time),
this module only says what an entry is and whether a sequence of entries is intact.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEvent",
    "AuditKind",
    "VerifyResult",
    "canonical_json",
    "seal_with_text",
    "entry_hash",
    "export_jsonl",
    "seal",
    "verify_chain",
]

#: ``prev_hash`` of the first entry of a chain.
GENESIS_HASH = bytes(32)


class AuditKind(enum.StrEnum):
    """Kinds of audited events the CA records; any other non-empty string is stored as given."""

    ISSUE = "issue"
    RENEW = "renew"
    REVOKE = "revoke"
    POLICY = "policy"
    CLAIM = "claim"
    REFUSE = "refuse"


def _utc(value: dt.datetime, name: str) -> dt.datetime:
    if not isinstance(value, dt.datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {value!r}")
    return value.astimezone(dt.UTC)


def _json_default(value: Any) -> Any:
    # Details come from the CA core; make the common non-JSON values storable in one agreed way.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dt.datetime):
        return int(_utc(value, "a datetime in details").timestamp())
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"audit details value of type {type(value).__name__} is not JSON-serialisable")


# json.dumps with keyword arguments builds a new encoder on every call; this one is built once
# (same settings, same output: json.dumps(v, **kw) is JSONEncoder(**kw).encode(v)).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
)
# How that encoder writes a str (ensure_ascii=False): for the hashed body built around the details.
_json_string: Any = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; bytes become hex, datetimes epoch seconds."""
    return _CANONICAL.encode(value)


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """What a caller asks the registry to append: the registry adds ``seq`` and the hashes.

    ``details`` must be JSON-serialisable (bytes are stored as hex, datetimes as epoch seconds).
    """

    kind: str
    actor: str
    subject: str
    time: dt.datetime
    tenant: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError("audit kind must be a non-empty string")
        if not isinstance(self.actor, str) or not isinstance(self.subject, str):
            raise ValueError("audit actor and subject must be strings")
        object.__setattr__(self, "time", _utc(self.time, "audit time"))
        if not isinstance(self.details, Mapping):
            raise ValueError("audit details must be a mapping")


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One stored link of the chain. ``time`` is an aware UTC datetime at whole seconds."""

    seq: int
    time: dt.datetime
    tenant: str | None
    kind: str
    actor: str
    subject: str
    details: Mapping[str, Any]
    prev_hash: bytes
    hash: bytes

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object: time as epoch seconds, hashes as hex."""
        return {
            "seq": self.seq,
            "time": int(self.time.timestamp()),
            "tenant": self.tenant,
            "kind": self.kind,
            "actor": self.actor,
            "subject": self.subject,
            "details": dict(self.details),
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AuditEntry:
        """Inverse of :meth:`to_json` (for re-verifying an export)."""
        return cls(
            seq=int(obj["seq"]),
            time=dt.datetime.fromtimestamp(int(obj["time"]), dt.UTC),
            tenant=obj["tenant"],
            kind=obj["kind"],
            actor=obj["actor"],
            subject=obj["subject"],
            details=obj["details"],
            prev_hash=bytes.fromhex(obj["prev_hash"]),
            hash=bytes.fromhex(obj["hash"]),
        )


def _hashed_fields(
    *, seq: int, epoch: int, tenant: str | None, kind: str, actor: str, subject: str, details: Any
) -> str:
    return canonical_json(
        {
            "seq": seq,
            "time": epoch,
            "tenant": tenant,
            "kind": kind,
            "actor": actor,
            "subject": subject,
            "details": details,
        }
    )


def entry_hash(entry: AuditEntry) -> bytes:
    """Recompute an entry's hash from its fields and its ``prev_hash``."""
    body = _hashed_fields(
        seq=entry.seq,
        epoch=int(entry.time.timestamp()),
        tenant=entry.tenant,
        kind=entry.kind,
        actor=entry.actor,
        subject=entry.subject,
        details=entry.details,
    )
    return hashlib.sha256(entry.prev_hash + body.encode()).digest()


def seal(event: AuditEvent, *, seq: int, prev_hash: bytes) -> AuditEntry:
    """Turn an event into the chain entry that follows ``prev_hash`` at position ``seq``.

    Details are normalised through canonical JSON first, so what is stored is exactly what was hashed.
    """
    return seal_with_text(event, seq=seq, prev_hash=prev_hash)[0]


def _str_keys_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(type(k) is str and _str_keys_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_str_keys_only(v) for v in value)
    return True


def _flat_details(raw: Mapping[Any, Any]) -> tuple[dict[str, Any], str] | None:
    """``(json.loads(text), text)`` with ``text = canonical_json(raw)``, written here without the
    encoder when ``raw`` is that simple -- str keys; str, int, bool and None values, bytes (hex)
    and datetimes (epoch seconds) -- as the CA core's details are; else None.

    Canonical JSON of such a mapping is its sorted items, each key and str value as the encoder
    writes a str, ints as ``int.__repr__`` (what the encoder uses), so the text is the same."""
    out: dict[str, Any] = {}
    parts: list[str] = []
    try:
        keys = sorted(raw)
    except TypeError:  # keys of mixed types: not simple
        return None
    for key in keys:
        if type(key) is not str:
            return None
        value = raw[key]
        kind = type(value)
        if kind is str:
            piece = _json_string(value)
        elif kind is int:
            piece = int.__repr__(value)
        elif kind is bytes:
            value = value.hex()
            piece = '"' + value + '"'  # hex digits need no escaping
        elif value is None:
            piece = "null"
        elif kind is bool:
            piece = "true" if value else "false"
        elif kind is dt.datetime:
            value = _json_default(value)
            piece = int.__repr__(value)
        else:
            return None
        out[key] = value
        parts.append(_json_string(key) + ":" + piece)
    return out, "{" + ",".join(parts) + "}"


def seal_with_text(event: AuditEvent, *, seq: int, prev_hash: bytes) -> tuple[AuditEntry, str]:
    """:func:`seal`, also returning ``canonical_json(entry.details)``: the text a registry stores."""
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    raw = dict(event.details)
    time = event.time
    epoch = int(time.timestamp())
    kind = str(event.kind)
    flat = _flat_details(raw)
    details: Any
    if flat is not None:
        details, text = flat
    else:
        text = canonical_json(raw)
        details = json.loads(text)
    if (flat is not None or _str_keys_only(raw)) and type(seq) is int:
        # With string keys only, canonical JSON is a fixed point (re-encoding the parsed text gives
        # the text back), so the hashed body can be put together around it instead of encoding the
        # details twice more. Non-string keys (JSON turns 10 and 2 into "10" < "2") take the long way.
        tenant = event.tenant
        body = (f'{{"actor":{_json_string(event.actor)},"details":{text},"kind":{_json_string(kind)},"seq":{seq},'
                f'"subject":{_json_string(event.subject)},'
                f'"tenant":{"null" if tenant is None else _json_string(tenant)},"time":{epoch}}}')
    else:
        text = canonical_json(details)
        body = _hashed_fields(seq=seq, epoch=epoch, tenant=event.tenant, kind=kind, actor=event.actor,
                              subject=event.subject, details=details)
    entry = AuditEntry(
        seq=seq,
        # An event's time is aware UTC (AuditEvent makes it so); at whole seconds it is already
        # what is stored.
        time=(time if type(time) is dt.datetime and time.tzinfo is dt.UTC and not time.microsecond and not time.fold
              else dt.datetime.fromtimestamp(epoch, dt.UTC)),
        tenant=event.tenant,
        kind=kind,
        actor=event.actor,
        subject=event.subject,
        details=details,
        prev_hash=prev_hash,
        hash=hashlib.sha256(prev_hash + body.encode()).digest(),
    )
    return entry, text


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    """Outcome of :func:`verify_chain`.

    ``problem`` is one of ``edited``, ``deleted``, ``reordered``, ``inserted``, ``truncated``;
    ``bad_seq`` is the first sequence number at which the chain stops being trustworthy.
    """

    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


def verify_chain(
    entries: Iterable[AuditEntry],
    *,
    anchor: tuple[int, bytes] = (0, GENESIS_HASH),
    expected_head: tuple[int, bytes] | None = None,
) -> VerifyResult:
    """Check that ``entries`` (in the order given, normally ascending ``seq``) form an intact chain.

    ``anchor`` is ``(seq, hash)`` of the entry just before the first one (the genesis by default),
    so a suffix of the trail can be checked. ``expected_head`` — ``(seq, hash)`` of the last entry
    as recorded elsewhere — also catches entries cut off the end.
    """
    items = list(entries)
    by_hash = {e.hash: i for i, e in enumerate(items)}
    prev_seq, prev_hash = anchor

    def bad(seq: int, problem: str, detail: str, checked: int) -> VerifyResult:
        return VerifyResult(ok=False, checked=checked, bad_seq=seq, problem=problem, detail=detail)

    for i, e in enumerate(items):
        expected_seq = prev_seq + 1
        if e.prev_hash != prev_hash:
            j = by_hash.get(e.prev_hash)
            if j is not None and j > i:
                return bad(expected_seq, "reordered", f"entry at seq {e.seq} follows an entry stored later (seq {items[j].seq})", i)
            if j is not None and j < i - 1:
                first = items[j + 1].seq
                return bad(first, "inserted", f"entry at seq {e.seq} links to seq {items[j].seq}: seq {first}..{items[i - 1].seq} was inserted", i)
            if e.seq > expected_seq:
                return bad(expected_seq, "deleted", f"seq {expected_seq}..{e.seq - 1} missing", i)
            return bad(e.seq, "edited", f"entry at seq {e.seq} does not link to the entry before it", i)
        if e.seq != expected_seq:
            # Linked correctly yet numbered differently: its seq was rewritten.
            return bad(expected_seq, "edited", f"entry linked after seq {prev_seq} carries seq {e.seq}", i)
        if entry_hash(e) != e.hash:
            nxt = items[i + 1] if i + 1 < len(items) else None
            if nxt is not None and nxt.prev_hash == prev_hash:
                return bad(e.seq, "inserted", f"entry at seq {e.seq} is not part of the chain", i)
            return bad(e.seq, "edited", f"entry at seq {e.seq} does not match its hash", i)
        prev_seq, prev_hash = e.seq, e.hash
    if expected_head is not None and (prev_seq, prev_hash) != tuple(expected_head):
        head_seq = expected_head[0]
        if head_seq > prev_seq:
            return bad(prev_seq + 1, "truncated", f"chain ends at seq {prev_seq}, head says {head_seq}", len(items))
        return bad(head_seq, "edited", f"head (seq {head_seq}) does not match the chain's last entry", len(items))
    return VerifyResult(ok=True, checked=len(items))


def export_jsonl(entries: Iterable[AuditEntry], file: TextIO) -> int:
    """Write one JSON object per entry and line (bytes as hex); return the number written."""
    n = 0
    for e in entries:
        file.write(canonical_json(e.to_json()) + "\n")
        n += 1
    return n
