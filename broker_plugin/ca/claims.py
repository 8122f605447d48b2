"""Bootstrap (claim) credential policies: which device ids a claim certificate may provision.

A factory or installer holds a *claim* certificate (kind ``bootstrap``, CN = claim id). With it a
device connects once, publishes on ``prov/{device_id}/req`` and receives its operational
certificate. The :class:`ClaimPolicy` registered for the claim id decides which device ids it may
claim, how many times, and until when; the use count lives in the registry and is spent in the
same transaction that commits the certificate.

Patterns are shell-style globs matched case-sensitively with :func:`fnmatch.fnmatchcase`
(``*`` any run of characters, ``?`` one character, ``[seq]`` / ``[!seq]`` a set). Globs were
chosen over regular expressions because an operator writes them from a device-id scheme
(``sensor-eu-*``) and they cannot be catastrophically slow.

This module knows nothing of MQTT, storage or signing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.errors import LocalProtocolError
from protocol.topics import validate_identifier

from .policy import PolicyError, format_validation_error

__all__ = ["MAX_PATTERN_LENGTH", "ClaimPolicy", "load_claim_policy"]

#: Longest glob accepted (a device id is at most 64 bytes; room for sets).
MAX_PATTERN_LENGTH = 256


def _identifier(value: str, what: str) -> str:
    try:
        return validate_identifier(value, what=what)
    except LocalProtocolError as exc:
        raise ValueError(str(exc)) from None


class ClaimPolicy(BaseModel):
    """What one claim credential may do. Exactly one of ``device_ids`` and ``pattern`` is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_ids: list[str] | None = Field(default=None, description="the device ids this claim may provision")
    pattern: str | None = Field(
        default=None, description="shell-style glob (fnmatch, case-sensitive) the claimed device id must match"
    )
    max_uses: int = Field(ge=1, le=10_000_000, description="how many devices this claim may provision in all")
    not_after: dt.datetime = Field(description="the claim is refused after this moment (aware datetime)")
    region: str | None = Field(
        default=None, description="region for claimed devices that name none (else the tenant's default)"
    )

    @field_validator("device_ids")
    @classmethod
    def _ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one device id (or use pattern)")
        for item in value:
            _identifier(item, "device id")
        if len(set(value)) != len(value):
            raise ValueError("lists a device id twice")
        return value

    @field_validator("pattern")
    @classmethod
    def _glob(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must not be empty")
        if len(value) > MAX_PATTERN_LENGTH:
            raise ValueError(f"must be at most {MAX_PATTERN_LENGTH} characters")
        if "/" in value or any(ord(c) < 0x20 for c in value):
            raise ValueError("a device id never contains '/' or control characters: the pattern could not match")
        return value

    @field_validator("not_after")
    @classmethod
    def _aware(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("must be an aware datetime (with a UTC offset)")
        return value.astimezone(dt.UTC)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "region")

    @model_validator(mode="after")
    def _one_selector(self) -> ClaimPolicy:
        if (self.device_ids is None) == (self.pattern is None):
            raise ValueError("give exactly one of device_ids and pattern")
        return self

    def allows(self, device_id: str) -> bool:
        """True when ``device_id`` is one this claim may provision (ignores uses and expiry)."""
        if self.device_ids is not None:
            return device_id in self.device_ids
        assert self.pattern is not None
        return fnmatchcase(device_id, self.pattern)

    def expired(self, now: dt.datetime) -> bool:
        """True once ``now`` is past :attr:`not_after`."""
        return now > self.not_after


def load_claim_policy(source: ClaimPolicy | Mapping[str, Any]) -> ClaimPolicy:
    """A :class:`ClaimPolicy` from a mapping (TOML/JSON-shaped) or an instance.

    Raises :class:`~.policy.PolicyError` listing every bad field as ``field: message``.
    """
    if isinstance(source, ClaimPolicy):
        return source
    if not isinstance(source, Mapping):
        raise PolicyError(f"claim policy must be a table/object, not {type(source).__name__}")
    try:
        return ClaimPolicy.model_validate(dict(source))
    except ValidationError as exc:
        raise PolicyError(f"invalid claim policy:\n{format_validation_error(exc)}") from None
