"""The CA data directory: where a deployment keeps its tenants' CAs, keys, policies and registry.

Layout (default ``./certmq-data``, or ``$CERTMQ_DATA``)::

    certmq.toml                 optional; ``registry_url = "postgresql://..."`` moves the registry
    registry.db                 the SQLite registry (WAL) when no registry_url is configured
    tenants/<name>/
        tenant.toml             algorithm, key locations (``key_uri`` / ``root_key_uri`` for HSM keys)
        policy.toml | .json     the tenant policy (:mod:`.policy`), exactly as the operator wrote it
        root.pem, issuing.pem   the CA certificates; chain.pem = issuing then root
        root.key.pem            encrypted PKCS#8 (file keys only; never plaintext on disk)
        issuing.key.pem         encrypted PKCS#8 (file keys only)

A tenant directory appears whole or not at all: it is built beside its final place and
renamed into it, and the tenant's policy is recorded (audited) in the registry. HSM keys
live on the token (``key_uri = "pkcs11:..."``); the root key sits on the same token under
the issuing key's label plus ``-root``.

This module knows files, keys and the registry interface; it knows nothing of MQTT, the
service core or the CLI's argument parsing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from protocol.errors import CertmqError

from .authority import create_tenant_ca
from .policy import PolicyError, TenantPolicy, load_tenant_policy
from .signers import KeyAlgorithm, SignerError, generate_private_key, open_signer, save_encrypted_key
from .signing import TenantAuthority

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATADIR",
    "AuthorityMaterial",
    "DataDirError",
    "TenantInfo",
    "authority_from_material",
    "authority_material",
    "init_tenant",
    "list_tenants",
    "load_authorities",
    "load_policy_file",
    "open_datadir_registry",
    "registry_url",
    "resolve_datadir",
    "set_policy",
    "tenant_dir",
]

#: Environment variable naming the data directory.
DATA_ENV = "CERTMQ_DATA"
#: Data directory used when neither an argument nor ``$CERTMQ_DATA`` names one.
DEFAULT_DATADIR = Path("certmq-data")

_HSM_ALGORITHMS = (KeyAlgorithm.P256, KeyAlgorithm.P384)


class DataDirError(CertmqError):
    """The data directory or a tenant in it is missing, malformed or cannot be changed as asked."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TenantInfo:
    """What a tenant directory holds, for people: names, fingerprints, where things are."""

    name: str
    directory: Path
    algorithm: str
    key_location: str
    root_fingerprint: str
    issuing_subject: str
    issuing_not_after: dt.datetime
    chain_path: Path


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuthorityMaterial:
    """A tenant's CA as picklable values: what a worker process needs to rebuild its issuer.

    Exactly one of ``key_pem`` (the encrypted PKCS#8 PEM, opened with ``passphrase``) and
    ``key_uri`` (a ``pkcs11:`` URI, opened in the worker with ``passphrase`` as the PIN).
    """

    name: str
    policy: Mapping[str, Any]
    root_pem: bytes
    issuing_pem: bytes
    passphrase: bytes
    key_pem: bytes | None = None
    key_uri: str | None = None

    def __post_init__(self) -> None:
        if (self.key_pem is None) == (self.key_uri is None):
            raise ValueError("AuthorityMaterial carries exactly one of key_pem and key_uri")

    def __repr__(self) -> str:  # never print the passphrase
        where = self.key_uri or "encrypted PEM"
        return f"AuthorityMaterial(name={self.name!r}, key={where})"


def resolve_datadir(path: str | Path | None = None) -> Path:
    """``path``, else ``$CERTMQ_DATA``, else ``./certmq-data``."""
    if path:
        return Path(path)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_DATADIR


def tenant_dir(datadir: Path, name: str) -> Path:
    """The directory of tenant ``name`` (it need not exist)."""
    return Path(datadir) / "tenants" / name


def _config(datadir: Path) -> dict[str, Any]:
    path = Path(datadir) / "certmq.toml"
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataDirError(f"{path}: cannot read: {exc}") from None
    unknown = set(data) - {"registry_url"}
    if unknown:
        raise DataDirError(f"{path}: unknown setting(s) {sorted(unknown)} (known: registry_url)")
    return data


def registry_url(datadir: Path) -> str:
    """The registry URL of ``datadir``: ``certmq.toml``'s ``registry_url``, else its ``registry.db``."""
    url = _config(datadir).get("registry_url")
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://", "sqlite://")):
            raise DataDirError(f"{datadir}/certmq.toml: registry_url must be a postgresql:// or sqlite:// URL")
        return url
    return f"sqlite:///{Path(datadir).resolve() / 'registry.db'}"


def _require_datadir(datadir: Path) -> Path:
    datadir = Path(datadir)
    if not datadir.is_dir():
        raise DataDirError(
            f"data directory {datadir} does not exist: run `certmq ca init --tenant NAME --data {datadir}` first"
        )
    return datadir


async def open_datadir_registry(datadir: Path, *, create: bool = False) -> Any:
    """Open the registry of ``datadir`` (a :class:`~broker_plugin.store.base.Registry`).

    Without ``create`` a missing data directory is a :class:`DataDirError`.
    """
    from broker_plugin.store.base import open_registry

    if not create:
        _require_datadir(datadir)
    return await open_registry(registry_url(Path(datadir)))


def load_policy_file(path: Path, tenant: str) -> tuple[TenantPolicy, dict[str, Any]]:
    """Read a policy file (``.toml`` / ``.json``) for ``tenant``; ``name`` may be omitted.

    Returns the validated policy and the raw mapping (with ``name``) as stored in the registry.
    Raises :class:`PolicyError` naming the file and each bad field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(raw.decode("utf-8"))
        elif suffix == ".json":
            data = json.loads(raw)
        else:
            raise PolicyError(f"{path}: unknown format {suffix or '(none)'}: use .toml or .json")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: the top level must be a table/object, not {type(data).__name__}")
    data.setdefault("name", tenant)
    if data["name"] != tenant:
        raise PolicyError(f"{path}: name = {data['name']!r} but the tenant is {tenant!r}")
    try:
        policy = load_tenant_policy(data)
    except PolicyError as exc:
        raise PolicyError(str(exc).replace("policy:", f"{path}:", 1)) from None
    return policy, data


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _hsm_parts(uri: str) -> tuple[str, str, str | None, str | None]:
    """(token label, object label, module path, pin-source) of a ``pkcs11:`` URI."""
    from .signers import _parse_pkcs11_uri

    path_attrs, query = _parse_pkcs11_uri(uri)
    token, obj = path_attrs.get("token"), path_attrs.get("object")
    if not token or not obj:
        raise SignerError(f"PKCS#11 URI {uri!r} must name both token=<label> and object=<label>")
    return token, obj, query.get("module-path"), query.get("pin-source")


def _hsm_keys(uri: str, algorithm: KeyAlgorithm, passphrase: bytes | None) -> tuple[object, object, str]:
    """Open (or generate) the issuing key named by ``uri`` and its ``-root`` sibling on the token."""
    from . import pkcs11 as hsm
    from .signers import resolve_passphrase

    if algorithm not in _HSM_ALGORITHMS:
        raise SignerError(f"an HSM CA key must be p256 or p384, not {algorithm.value}")
    token, obj, module, pin_source = _hsm_parts(uri)
    if pin_source is not None:
        if pin_source.startswith("file:"):
            pin = resolve_passphrase(file=pin_source[len("file:"):])
        elif pin_source.startswith("env:"):
            pin = resolve_passphrase(env=pin_source[len("env:"):])
        else:
            raise SignerError(f"unsupported pin-source {pin_source!r} (use file:/path or env:NAME)")
    elif passphrase:
        pin = passphrase
    else:
        raise SignerError(f"no user PIN for PKCS#11 token {token!r}: give --passphrase-env/--passphrase-file")
    path_part, sep, query_part = uri.partition("?")
    root_path = ";".join(
        f"object={quote(obj + '-root', safe='')}" if item.lower().startswith("object=") else item
        for item in path_part.split(";")
    )
    root_uri = root_path + sep + query_part
    session = hsm.HsmSession.open(module=module, token_label=token, pin=pin)
    try:
        keys = []
        for label in (obj, obj + "-root"):
            try:
                key = hsm.find_key(session, label)
            except hsm.HsmError:
                key = hsm.generate_ec_key(session, label, algorithm.value)
            if not isinstance(key.curve, type(generate_private_key(algorithm).curve)):  # type: ignore[union-attr]
                raise SignerError(f"HSM key {label!r} is {key.curve.name}, not {algorithm.value}")
            keys.append(key)
    except BaseException:
        session.close()
        raise
    return keys[0], keys[1], root_uri


async def init_tenant(
    datadir: Path,
    name: str,
    *,
    algorithm: KeyAlgorithm | str,
    passphrase: bytes | None,
    key_uri: str | None = None,
    policy: Path | None = None,
    now: dt.datetime,
    actor: str = "certmq ca init",
) -> TenantInfo:
    """Create tenant ``name`` in ``datadir`` (created if missing): root + issuing CA, keys, policy.

    File keys are encrypted with ``passphrase``; with ``key_uri`` (``pkcs11:...``) the keys are
    found or generated on the token and ``passphrase`` is the user PIN. The tenant's policy is
    recorded in the registry with a ``policy`` audit entry. Refuses an existing tenant, a bad
    policy file or a bad passphrase before writing anything.
    """
    datadir = Path(datadir)
    try:
        alg = KeyAlgorithm(algorithm)
    except ValueError:
        known = ", ".join(a.value for a in KeyAlgorithm)
        raise DataDirError(f"unknown CA key algorithm {algorithm!r} (known: {known})") from None
    try:
        TenantPolicy(name=name)  # validates the tenant id with the policy's own rules
    except Exception as exc:  # pydantic ValidationError
        from pydantic import ValidationError

        from .policy import format_validation_error

        if isinstance(exc, ValidationError):
            raise DataDirError(f"bad tenant name {name!r}: {format_validation_error(exc)}") from None
        raise
    target = tenant_dir(datadir, name)
    if target.exists():
        raise DataDirError(f"tenant {name!r} already exists in {target}; nothing changed")
    if policy is not None:
        tenant_policy, raw_policy = load_policy_file(Path(policy), name)
        policy_name = "policy" + Path(policy).suffix.lower()
        policy_bytes = Path(policy).read_bytes()
    else:
        tenant_policy = TenantPolicy(name=name)
        raw_policy = {"name": name}
        policy_name = "policy.toml"
        policy_bytes = f'# certmq tenant policy: defaults for every field (see docs/operating-the-ca.md)\nname = "{name}"\n'.encode()
    if key_uri is None:
        if not passphrase:
            raise DataDirError("a passphrase is needed to encrypt the CA keys (--passphrase-env or --passphrase-file)")
    elif not key_uri.startswith("pkcs11:"):
        raise DataDirError(f"--pkcs11-uri must be a pkcs11: URI, got {key_uri!r}")

    (datadir / "tenants").mkdir(parents=True, exist_ok=True)
    registry = await open_datadir_registry(datadir, create=True)
    try:
        if await registry.get_tenant(name) is not None:
            raise DataDirError(f"tenant {name!r} is already recorded in the registry {registry_url(datadir)}; nothing changed")
        if key_uri is None:
            root_key: object = generate_private_key(alg)
            issuing_key: object = generate_private_key(alg)
            tenant_meta = f'algorithm = "{alg.value}"\nkeys = "file"\n'
            key_location = f"{target / 'issuing.key.pem'} (encrypted PKCS#8)"
        else:
            issuing_key, root_key, root_uri = _hsm_keys(key_uri, alg, passphrase)
            tenant_meta = (f'algorithm = "{alg.value}"\nkeys = "pkcs11"\n'
                           f"key_uri = {json.dumps(key_uri)}\nroot_key_uri = {json.dumps(root_uri)}\n")
            key_location = key_uri
        try:
            ca = create_tenant_ca(tenant=name, root_key=root_key, issuing_key=issuing_key, now=now)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=datadir / "tenants"))
            try:
                os.chmod(staging, 0o700)
                if key_uri is None:
                    assert passphrase
                    save_encrypted_key(staging / "root.key.pem", root_key, passphrase)  # type: ignore[arg-type]
                    save_encrypted_key(staging / "issuing.key.pem", issuing_key, passphrase)  # type: ignore[arg-type]
                (staging / "root.pem").write_bytes(_pem(ca.root))
                (staging / "issuing.pem").write_bytes(_pem(ca.issuing))
                (staging / "chain.pem").write_bytes(ca.chain_pem())
                (staging / policy_name).write_bytes(policy_bytes)
                (staging / "tenant.toml").write_text(
                    tenant_meta + f"created = {now.astimezone(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
                )
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            for key in (root_key, issuing_key):
                close = getattr(key, "close", None)
                if callable(close):
                    close()
        try:
            await registry.put_tenant(name, raw_policy, audit=_policy_event(name, raw_policy, now, actor, "init", {
                "algorithm": alg.value, "root_sha256": _fingerprint(ca.root),
            }))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    finally:
        await registry.close()
    del tenant_policy
    return _info(datadir, name)


def _policy_event(name: str, raw: Mapping[str, Any], now: dt.datetime, actor: str, action: str,
                  extra: Mapping[str, Any] | None = None) -> Any:
    from broker_plugin.store.audit import AuditEvent, AuditKind, canonical_json

    digest = hashlib.sha256(canonical_json(raw).encode()).hexdigest()
    return AuditEvent(kind=AuditKind.POLICY, actor=actor, subject=name, time=now, tenant=name,
                      details={"action": action, "policy_sha256": digest, **(extra or {})})


async def set_policy(datadir: Path, name: str, policy: Path, *, now: dt.datetime,
                     actor: str = "certmq ca policy set") -> TenantPolicy:
    """Replace tenant ``name``'s policy with the file ``policy`` (validated first; audited)."""
    datadir = _require_datadir(Path(datadir))
    target = tenant_dir(datadir, name)
    if not (target / "tenant.toml").is_file():
        raise DataDirError(f"no tenant {name!r} in {datadir}")
    tenant_policy, raw = load_policy_file(Path(policy), name)
    new_name = "policy" + Path(policy).suffix.lower()
    data = Path(policy).read_bytes()
    registry = await open_datadir_registry(datadir)
    try:
        tmp = target / f".{new_name}.tmp"
        tmp.write_bytes(data)
        try:
            await registry.put_tenant(name, raw, audit=_policy_event(name, raw, now, actor, "set"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target / new_name)
        for old in ("policy.toml", "policy.json"):
            if old != new_name:
                (target / old).unlink(missing_ok=True)
    finally:
        await registry.close()
    return tenant_policy


def _tenant_meta(target: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((target / "tenant.toml").read_text("utf-8"))
    except FileNotFoundError:
        raise DataDirError(f"{target} is not a tenant directory (no tenant.toml)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataDirError(f"{target / 'tenant.toml'}: cannot read: {exc}") from None


def _policy_path(target: Path) -> Path:
    for name in ("policy.toml", "policy.json"):
        if (target / name).is_file():
            return target / name
    raise DataDirError(f"tenant directory {target} has no policy.toml")


def _cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise DataDirError(f"{path} is missing") from None
    except ValueError as exc:
        raise DataDirError(f"{path} is not a PEM certificate: {exc}") from None


def _info(datadir: Path, name: str) -> TenantInfo:
    target = tenant_dir(datadir, name)
    meta = _tenant_meta(target)
    root = _cert(target / "root.pem")
    issuing = _cert(target / "issuing.pem")
    where = meta.get("key_uri") or f"{target / 'issuing.key.pem'} (encrypted PKCS#8)"
    return TenantInfo(
        name=name, directory=target, algorithm=str(meta.get("algorithm", "?")), key_location=where,
        root_fingerprint=_fingerprint(root), issuing_subject=issuing.subject.rfc4514_string(),
        issuing_not_after=issuing.not_valid_after_utc, chain_path=target / "chain.pem",
    )


def _tenant_names(datadir: Path) -> list[str]:
    root = _require_datadir(Path(datadir)) / "tenants"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_tenants(datadir: Path) -> list[TenantInfo]:
    """Every tenant of ``datadir``, by name."""
    return [_info(Path(datadir), n) for n in _tenant_names(datadir)]


def authority_material(datadir: Path, *, passphrase: bytes | None, only: str | None = None) -> list[AuthorityMaterial]:
    """Picklable CA material of every tenant (or just ``only``): for worker processes."""
    datadir = Path(datadir)
    names = _tenant_names(datadir)
    if only is not None:
        if only not in names:
            raise DataDirError(f"no tenant {only!r} in {datadir} (tenants: {', '.join(names) or 'none'})")
        names = [only]
    out = []
    for name in names:
        target = tenant_dir(datadir, name)
        meta = _tenant_meta(target)
        policy, raw = load_policy_file(_policy_path(target), name)
        del policy
        common = dict(name=name, policy=raw, root_pem=(target / "root.pem").read_bytes(),
                      issuing_pem=(target / "issuing.pem").read_bytes(), passphrase=passphrase or b"")
        if meta.get("key_uri"):
            out.append(AuthorityMaterial(**common, key_uri=str(meta["key_uri"])))  # type: ignore[arg-type]
        else:
            try:
                key_pem = (target / "issuing.key.pem").read_bytes()
            except FileNotFoundError:
                raise DataDirError(f"{target / 'issuing.key.pem'} is missing") from None
            out.append(AuthorityMaterial(**common, key_pem=key_pem))  # type: ignore[arg-type]
    return out


def authority_from_material(material: AuthorityMaterial) -> TenantAuthority:
    """Open the key and build the :class:`TenantAuthority` that ``material`` describes."""
    policy = load_tenant_policy(material.policy)
    root = x509.load_pem_x509_certificate(material.root_pem)
    issuing = x509.load_pem_x509_certificate(material.issuing_pem)
    if material.key_uri is not None:
        key = open_signer(material.key_uri, passphrase=material.passphrase or None)
    else:
        assert material.key_pem is not None
        if not material.passphrase:
            raise SignerError(f"no passphrase given for tenant {material.name!r}'s CA key")
        try:
            key = serialization.load_pem_private_key(material.key_pem, password=material.passphrase)
        except ValueError:
            raise SignerError(f"cannot decrypt tenant {material.name!r}'s CA key: wrong passphrase (or corrupt file)") from None
        except TypeError:
            raise SignerError(f"tenant {material.name!r}'s CA key is not encrypted; refusing it") from None
    return TenantAuthority(name=material.name, policy=policy, root=root, issuing=issuing, key=key)


def load_authorities(datadir: Path, *, passphrase: bytes | None, only: str | None = None) -> dict[str, TenantAuthority]:
    """Every tenant's :class:`TenantAuthority` (keys opened), by name; or just tenant ``only``."""
    return {m.name: authority_from_material(m) for m in authority_material(datadir, passphrase=passphrase, only=only)}
