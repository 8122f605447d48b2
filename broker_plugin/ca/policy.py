"""A tenant's issuance policy: which keys, which profiles, how long, which extensions.

Loaded from TOML or JSON (or a dict) into frozen pydantic models; every
mistake in a configuration file comes back as ``field.path: message`` lines
(:func:`format_validation_error`). At issuance the models answer questions
(is this key allowed? which key usages does this profile give this key?) and
refuse with :class:`PolicyRefusal`, which carries the wire :class:`ErrorCode`
the service replies with.

This module knows nothing of MQTT, storage or signing.

Defaults, and why:

* keys: P-256, P-384, Ed25519, ML-DSA-44, ML-DSA-65 and RSA of at least 2048
  bits with exponent 65537. secp256k1, P-192, P-521, Ed448, ML-DSA-87, DSA and
  anything else are refused: every allowed type is one a constrained device
  library can verify and the CA can sign for. RSA below 2048 bits cannot be
  configured at all.
* profiles (all three offered; a configuration that lists ``profiles`` offers
  exactly the ones it lists):

  ===============  ========  ==========================================  ===================
  profile          lifetime  keyUsage (critical)                         extendedKeyUsage
  ===============  ========  ==========================================  ===================
  identity         90 days   digitalSignature                            clientAuth
  encryption       365 days  keyEncipherment (RSA), keyAgreement (EC)    none
  ota-signing      365 days  digitalSignature                            codeSigning
  ===============  ========  ==========================================  ===================

  The encryption profile has no EKU: it is for data encryption between
  certmq parties, not S/MIME or TLS, and an absent EKU does not restrict key
  use (RFC 5280 4.2.1.12). Ed25519 and ML-DSA keys cannot encrypt or agree keys,
  so the encryption profile refuses them (``KEY_REJECTED``).
* renewal window: 60 % to 80 % of the lifetime; key reuse on renewal refused;
  no recovery of expired certificates.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protocol.codes import ErrorCode, Profile
from protocol.errors import CertmqError, LocalProtocolError
from protocol.extensions import MAX_CAPABILITIES, check_topic_segment
from protocol.topics import validate_identifier

__all__ = [
    "KEY_TYPES",
    "MAX_LIFETIME",
    "KeyPolicy",
    "KeyType",
    "PolicyError",
    "PolicyRefusal",
    "ProfilePolicy",
    "TenantPolicy",
    "format_validation_error",
    "key_type_of",
    "load_tenant_policy",
    "parse_duration",
]

KeyType = Literal["p256", "p384", "ed25519", "rsa", "ml-dsa-44", "ml-dsa-65"]
#: Every key type a policy can name, in a stable order.
KEY_TYPES: tuple[KeyType, ...] = ("p256", "p384", "ed25519", "rsa", "ml-dsa-44", "ml-dsa-65")
#: Longest end-entity lifetime a profile may configure.
MAX_LIFETIME = timedelta(days=3 * 366)

_SIGN_ONLY: frozenset[str] = frozenset({"ed25519", "ml-dsa-44", "ml-dsa-65"})
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EKU_NAMES = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
}
_DEFAULT_EKU: dict[Profile, tuple[str, ...]] = {
    Profile.IDENTITY: ("clientAuth",),
    Profile.ENCRYPTION: (),
    Profile.OTA_SIGNING: ("codeSigning",),
}


class PolicyRefusal(CertmqError):
    """A request the tenant's policy refuses; ``code`` is the wire code to reply with."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(f"{code.name}: {text}")
        self.code = code
        self.text = text


class PolicyError(CertmqError, ValueError):
    """A policy configuration that cannot be loaded; the message lists every problem."""


# -- durations --------------------------------------------------------------------------


def parse_duration(value: object) -> timedelta:
    """``90``, ``"90s"``, ``"30d"``, ``"12h"``, ``"2w"`` or a timedelta -> timedelta.

    A bare integer is seconds. Raises ``ValueError`` with a readable message otherwise.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration must be seconds or a string like '30d', not a boolean")
    if isinstance(value, int):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
        raise ValueError(f"{value!r} is not a duration: write seconds or e.g. '90s', '15m', '12h', '30d', '2w'")
    raise ValueError(f"a duration must be seconds or a string like '30d', not {type(value).__name__}")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


# -- keys -------------------------------------------------------------------------------


def key_type_of(public_key: object) -> str:
    """Name a public key as the policy does (``"p256"``, ``"rsa"``...), or describe what it is.

    Unknown keys and curves come back as a description such as
    ``"ec:secp256k1"`` that no policy can allow.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "p256", "secp384r1": "p384"}.get(public_key.curve.name, f"ec:{public_key.curve.name}")
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, mldsa.MLDSA44PublicKey):
        return "ml-dsa-44"
    if isinstance(public_key, mldsa.MLDSA65PublicKey):
        return "ml-dsa-65"
    if isinstance(public_key, mldsa.MLDSA87PublicKey):
        return "ml-dsa-87"
    return type(public_key).__name__


class KeyPolicy(BaseModel):
    """Which subject keys a tenant accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed: tuple[KeyType, ...] = Field(
        default=("p256", "p384", "ed25519", "rsa", "ml-dsa-44", "ml-dsa-65"),
        description="key types accepted in CSRs",
    )
    rsa_min_bits: int = Field(default=2048, ge=2048, le=16384, description="smallest RSA modulus accepted")

    @field_validator("allowed")
    @classmethod
    def _non_empty_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one key type must be allowed")
        if len(set(value)) != len(value):
            raise ValueError("lists a key type twice")
        return value

    def check(self, public_key: object) -> None:
        """Return if ``public_key`` is acceptable; else raise ``PolicyRefusal(KEY_REJECTED)``."""
        kind = key_type_of(public_key)
        if kind not in KEY_TYPES:
            raise PolicyRefusal(ErrorCode.KEY_REJECTED, f"unsupported key type {kind}")
        if kind not in self.allowed:
            raise PolicyRefusal(
                ErrorCode.KEY_REJECTED,
                f"{kind} keys are not allowed (allowed: {', '.join(self.allowed)})",
            )
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < self.rsa_min_bits:
                raise PolicyRefusal(
                    ErrorCode.KEY_REJECTED,
                    f"RSA key of {public_key.key_size} bits is below the minimum of {self.rsa_min_bits}",
                )
            exponent = public_key.public_numbers().e
            if exponent != 65537:
                raise PolicyRefusal(ErrorCode.KEY_REJECTED, f"RSA public exponent {exponent} is not 65537")


# -- profiles ---------------------------------------------------------------------------


class ProfilePolicy(BaseModel):
    """How one profile's certificates are made and renewed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lifetime: Duration = Field(default=timedelta(days=90), description="validity period")
    renewal_window: tuple[float, float] = Field(
        default=(0.6, 0.8), description="renewal starts/ends at these fractions of the lifetime"
    )
    extended_key_usage: tuple[str, ...] | None = Field(
        default=None,
        description="EKU names (clientAuth, serverAuth, codeSigning, emailProtection, timeStamping) "
        "or dotted OIDs; None = the profile's default, () = no EKU extension",
    )
    capabilities: tuple[str, ...] = Field(default=(), description="topic segments granted by default")
    allow_key_reuse: bool = Field(default=False, description="may a renewal certify the same key again")
    max_key_age: Duration | None = Field(
        default=None, description="with key reuse, a key certified this long ago must be rotated"
    )
    expired_recovery: Duration = Field(
        default=timedelta(0), description="how long after expiry a device may still renew (0 = never)"
    )

    @field_validator("lifetime")
    @classmethod
    def _lifetime_range(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        if value > MAX_LIFETIME:
            raise ValueError(f"must be at most {MAX_LIFETIME.days} days")
        return value

    @field_validator("renewal_window")
    @classmethod
    def _window_order(cls, value: tuple[float, float]) -> tuple[float, float]:
        start, end = value
        if not 0.0 < start < end < 1.0:
            raise ValueError(f"must satisfy 0 < start < end < 1, got start={start}, end={end}")
        return value

    @field_validator("extended_key_usage")
    @classmethod
    def _known_ekus(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for item in value:
            if item not in _EKU_NAMES and not re.fullmatch(r"[0-2](\.\d+)+", item):
                raise ValueError(f"{item!r} is neither a known EKU name ({', '.join(_EKU_NAMES)}) nor a dotted OID")
        if len(set(value)) != len(value):
            raise ValueError("lists an EKU twice")
        return value

    @field_validator("capabilities")
    @classmethod
    def _capabilities_encodable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_CAPABILITIES:
            raise ValueError(f"at most {MAX_CAPABILITIES} capabilities")
        if len(set(value)) != len(value):
            raise ValueError("lists a capability twice")
        for item in value:
            try:
                check_topic_segment(item, "capability")
            except LocalProtocolError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("expired_recovery")
    @classmethod
    def _recovery_not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @model_validator(mode="after")
    def _key_age_needs_reuse(self) -> ProfilePolicy:
        if self.max_key_age is not None:
            if not self.allow_key_reuse:
                raise ValueError("max_key_age only applies when allow_key_reuse is true")
            if self.max_key_age <= timedelta(0):
                raise ValueError("max_key_age must be longer than zero")
        return self

    def key_usage(self, profile: Profile, public_key: object) -> x509.KeyUsage:
        """The (critical) keyUsage for a certificate of ``profile`` over ``public_key``.

        Raises ``PolicyRefusal(KEY_REJECTED)`` when the key cannot do what the
        profile is for (an Ed25519 or ML-DSA key for encryption).
        """
        sign = encipher = agree = False
        if profile is Profile.ENCRYPTION:
            kind = key_type_of(public_key)
            if isinstance(public_key, rsa.RSAPublicKey):
                encipher = True
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                agree = True
            else:
                raise PolicyRefusal(
                    ErrorCode.KEY_REJECTED,
                    f"{kind} keys can only sign; the encryption profile needs an RSA or EC key",
                )
        else:
            sign = True
        return x509.KeyUsage(
            digital_signature=sign,
            content_commitment=False,
            key_encipherment=encipher,
            data_encipherment=False,
            key_agreement=agree,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )

    def extended_key_usages(self, profile: Profile) -> tuple[x509.ObjectIdentifier, ...]:
        """EKU OIDs for ``profile``: the configured ones, or the profile kind's default."""
        names = _DEFAULT_EKU[profile] if self.extended_key_usage is None else self.extended_key_usage
        return tuple(_EKU_NAMES[n] if n in _EKU_NAMES else x509.ObjectIdentifier(n) for n in names)

    def must_rotate(self, *, key_first_certified: datetime, now: datetime) -> bool:
        """True when a renewal must bring a new key (reuse not allowed, or the key is too old)."""
        if not self.allow_key_reuse:
            return True
        return self.max_key_age is not None and now - key_first_certified >= self.max_key_age


def _default_profiles() -> dict[Profile, ProfilePolicy]:
    return {
        Profile.IDENTITY: ProfilePolicy(lifetime=timedelta(days=90)),
        Profile.ENCRYPTION: ProfilePolicy(lifetime=timedelta(days=365)),
        Profile.OTA_SIGNING: ProfilePolicy(lifetime=timedelta(days=365)),
    }


def _profile_key(value: object) -> Profile:
    if isinstance(value, Profile):
        return value
    if isinstance(value, str):
        return Profile.from_label(value)  # ValueError names the known labels
    raise ValueError(f"a profile label must be a string, not {type(value).__name__}")


class TenantPolicy(BaseModel):
    """Everything the CA needs to know about one tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="tenant id, as in topics")
    key_policy: KeyPolicy = Field(default_factory=KeyPolicy)
    profiles: dict[Annotated[Profile, BeforeValidator(_profile_key)], ProfilePolicy] = Field(
        default_factory=_default_profiles, description="profiles offered, by label"
    )
    default_region: str | None = Field(default=None, description="region for devices that name none")
    crl_url: str | None = Field(default=None, description="http(s) base URL under which CRLs are published")
    status_list_capacity: int = Field(
        default=131072, ge=8, le=2**24, description="entries per revocation status list"
    )

    @field_validator("name")
    @classmethod
    def _tenant_id(cls, value: str) -> str:
        return _identifier(value, "tenant")

    @field_validator("default_region")
    @classmethod
    def _region_id(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "region")

    @field_validator("profiles")
    @classmethod
    def _some_profile(cls, value: dict[Profile, ProfilePolicy]) -> dict[Profile, ProfilePolicy]:
        if not value:
            raise ValueError("at least one profile must be offered")
        return value

    @field_validator("crl_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError(f"{value!r} is not an http(s) URL without query or fragment")
        return value.rstrip("/")

    @field_validator("status_list_capacity")
    @classmethod
    def _multiple_of_eight(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8 (whole bytes of the bitstring)")
        return value

    def profile(self, profile: Profile) -> ProfilePolicy:
        """The policy for ``profile``; ``PolicyRefusal(UNKNOWN_PROFILE)`` if not offered."""
        try:
            return self.profiles[profile]
        except KeyError:
            offered = ", ".join(p.label for p in self.profiles)
            raise PolicyRefusal(
                ErrorCode.UNKNOWN_PROFILE, f"profile {Profile(profile).label} is not offered (offered: {offered})"
            ) from None

    def crl_url_for(self, region: str | None) -> str | None:
        """URL of the CRL covering certificates of ``region``: ``{crl_url}/{name}/{region}.crl``.

        Certificates without a region share ``{crl_url}/{name}.crl``. None when
        the tenant publishes no CRLs.
        """
        if self.crl_url is None:
            return None
        if region is None:
            return f"{self.crl_url}/{self.name}.crl"
        return f"{self.crl_url}/{self.name}/{_identifier(region, 'region')}.crl"


def _identifier(value: str, what: str) -> str:
    try:
        validate_identifier(value, what=what)
    except LocalProtocolError as exc:
        raise ValueError(str(exc)) from None
    # Identifiers also end up in certificate names and URLs: keep them printable ASCII.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._~-]*", value):
        raise ValueError(f"{what} {value!r} may use only ASCII letters, digits and . _ ~ - (starting with a letter or digit)")
    return value


# -- loading ----------------------------------------------------------------------------


def format_validation_error(exc: ValidationError) -> str:
    """One ``field.path: message`` line per problem, in the order pydantic found them."""
    lines = []
    for error in exc.errors():
        # pydantic marks a bad dict key with a trailing "[key]": the key itself is the field here.
        path = ".".join(_label(part) for part in error["loc"] if part != "[key]") or "(top level)"
        message = error["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        lines.append(f"{path}: {message}")
    return "\n".join(lines)


def _label(part: object) -> str:
    if isinstance(part, Profile):
        return part.label
    return str(part)


def load_tenant_policy(source: str | Path | Mapping[str, Any]) -> TenantPolicy:
    """Build a :class:`TenantPolicy` from a ``.toml`` / ``.json`` file or an already-parsed mapping.

    Raises :class:`PolicyError` whose message names the file and lists every
    bad field as ``field.path: message``.
    """
    where = "policy"
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"{where}: cannot read: {exc.strerror or exc}") from None
        suffix = path.suffix.lower()
        try:
            if suffix == ".toml":
                data = tomllib.loads(raw.decode("utf-8"))
            elif suffix == ".json":
                data = json.loads(raw)
            else:
                raise PolicyError(f"{where}: unknown format {suffix or '(none)'}: use .toml or .json")
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise PolicyError(f"{where}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: the top level must be a table/object, not {type(data).__name__}")
    try:
        return TenantPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{where}: invalid tenant policy:\n{format_validation_error(exc)}") from None
