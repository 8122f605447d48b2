"""CA signing keys: generate them, keep them encrypted on disk, open them by URI.

Everything here hands out plain :mod:`cryptography` private-key objects, which the
issuer passes to ``x509.CertificateBuilder().sign(key, signature_hash(key))`` and
``CertificateRevocationListBuilder().sign(...)``. Keys may live in:

- a **file**: an encrypted PKCS#8 PEM, decrypted in memory with a passphrase that
  comes from an environment variable or a ``0600`` file (:func:`resolve_passphrase`);
  a plaintext key file is refused, and a key is never written unencrypted;
- a **PKCS#11 token** (an HSM, SoftHSM2 in tests): see :mod:`broker_plugin.ca.pkcs11`,
  whose key object signs on the token and never leaves it.

:func:`open_signer` takes one URI for either, so the configuration is one string::

    file:/etc/certmq/ca-key.pem                 (also file:///etc/certmq/ca-key.pem)
    pkcs11:token=certmq-ca;object=issuing-2026
    pkcs11:token=certmq-ca;object=issuing-2026;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/secrets/hsm-pin

The ``pkcs11:`` form follows RFC 7512: path attributes ``token`` and ``object`` (labels,
percent-encoded), optional ``type=private``; query attributes ``module-path`` (default:
:func:`broker_plugin.ca.pkcs11.find_module`) and ``pin-source`` (``file:/path``, or the
certmq extension ``env:NAME``; without it the ``passphrase`` argument is the user PIN).
``pin-value`` is refused on purpose: a PIN in a URI ends up in configuration files and logs.

This module knows nothing of certificates, policy, the registry or MQTT; it must not
import python-pkcs11 at module level (it is an optional dependency).
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
import tempfile
from pathlib import Path
from typing import TypeAlias, Union
from urllib.parse import unquote

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa
from cryptography.exceptions import UnsupportedAlgorithm

from protocol.errors import CertmqError

__all__ = [
    "CaPrivateKey",
    "KeyAlgorithm",
    "SignatureHash",
    "SignerError",
    "generate_private_key",
    "key_algorithm",
    "load_encrypted_key",
    "open_signer",
    "resolve_passphrase",
    "save_encrypted_key",
    "signature_hash",
]

CaPrivateKey: TypeAlias = Union[
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    mldsa.MLDSA44PrivateKey,
    mldsa.MLDSA65PrivateKey,
    mldsa.MLDSA87PrivateKey,
    rsa.RSAPrivateKey,
]
"""The private-key types a CA key may have (RSA and ML-DSA-87 only when loaded, never generated)."""

SignatureHash: TypeAlias = Union[hashes.SHA256, hashes.SHA384, hashes.SHA512, None]
"""What :func:`signature_hash` returns: exactly the types ``CertificateBuilder.sign`` is typed to take."""

_MLDSA_TYPES = (mldsa.MLDSA44PrivateKey, mldsa.MLDSA65PrivateKey, mldsa.MLDSA87PrivateKey)
_CA_KEY_TYPES = (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey, *_MLDSA_TYPES)


class SignerError(CertmqError):
    """A CA key could not be generated, stored, found, unlocked or used. The message says why."""


class KeyAlgorithm(str, enum.Enum):
    """Algorithms a certmq CA key may use (the value is the configuration spelling)."""

    P256 = "p256"
    P384 = "p384"
    ED25519 = "ed25519"
    ML_DSA_44 = "ml-dsa-44"
    ML_DSA_65 = "ml-dsa-65"

    def __str__(self) -> str:
        return self.value


def generate_private_key(alg: KeyAlgorithm | str) -> CaPrivateKey:
    """Generate a new software CA key of algorithm ``alg``."""
    try:
        alg = KeyAlgorithm(alg)
    except ValueError:
        known = ", ".join(a.value for a in KeyAlgorithm)
        raise SignerError(f"unknown CA key algorithm {alg!r} (known: {known})") from None
    try:
        if alg is KeyAlgorithm.P256:
            return ec.generate_private_key(ec.SECP256R1())
        if alg is KeyAlgorithm.P384:
            return ec.generate_private_key(ec.SECP384R1())
        if alg is KeyAlgorithm.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        if alg is KeyAlgorithm.ML_DSA_44:
            return mldsa.MLDSA44PrivateKey.generate()
        return mldsa.MLDSA65PrivateKey.generate()
    except UnsupportedAlgorithm as exc:
        raise SignerError(f"{alg.value} keys are not supported by this cryptography/OpenSSL build: {exc}") from exc


def key_algorithm(key: object) -> KeyAlgorithm:
    """The :class:`KeyAlgorithm` of ``key``; :class:`SignerError` for a key a CA may not use."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyAlgorithm.P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyAlgorithm.P384
        raise SignerError(f"EC curve {key.curve.name} is not allowed for a CA key (use P-256 or P-384)")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyAlgorithm.ED25519
    if isinstance(key, mldsa.MLDSA44PrivateKey):
        return KeyAlgorithm.ML_DSA_44
    if isinstance(key, mldsa.MLDSA65PrivateKey):
        return KeyAlgorithm.ML_DSA_65
    raise SignerError(f"{type(key).__name__} is not a CA key algorithm certmq generates")


def signature_hash(key: object) -> SignatureHash:
    """The hash to pass to ``CertificateBuilder.sign`` with ``key``.

    SHA-256 for P-256 and RSA, SHA-384 for P-384 (and SHA-512 for P-521, matching strength),
    ``None`` for Ed25519, Ed448 and ML-DSA, which hash internally.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size <= 256:
            return hashes.SHA256()
        if key.curve.key_size <= 384:
            return hashes.SHA384()
        return hashes.SHA512()
    if isinstance(key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey, *_MLDSA_TYPES)):
        return None
    raise SignerError(f"cannot sign certificates with a {type(key).__name__}")


# --- file backend ----------------------------------------------------------------------


def save_encrypted_key(path: Path | str, key: CaPrivateKey, passphrase: bytes, *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path`` as an encrypted PKCS#8 PEM, mode 0600, atomically.

    The PEM is encrypted in memory before any byte reaches the disk; it goes to a temporary
    file in the same directory (created 0600), is fsynced, then renamed into place and the
    directory fsynced, so a crash leaves either the old file or the new one, never a torn key.
    An existing file is refused unless ``overwrite`` (losing a CA key is not undoable).
    """
    path = Path(path)
    if not isinstance(passphrase, bytes):
        raise SignerError("the key passphrase must be bytes")
    if not passphrase:
        raise SignerError(f"refusing to write CA key {path}: the passphrase is empty")
    if not isinstance(key, _CA_KEY_TYPES):
        raise SignerError(f"cannot store a {type(key).__name__} as a CA key")
    directory = path.parent
    if not directory.is_dir():
        raise SignerError(f"cannot write CA key {path}: directory {directory} does not exist")
    if path.exists() and not overwrite:
        raise SignerError(f"refusing to overwrite existing CA key file {path}")
    try:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # e.g. an HSM key, whose private half cannot leave the token
        raise SignerError(f"cannot serialize this key for {path}: {exc}") from exc
    if b"ENCRYPTED PRIVATE KEY" not in pem:  # belt and braces: never plaintext on disk
        raise SignerError("internal error: serialized key is not encrypted; nothing written")

    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # mkstemp already does; umask-proof anyway
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: an atomic no-clobber rename.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SignerError(f"refusing to overwrite existing CA key file {path}") from None
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_encrypted_key(path: Path | str, passphrase: bytes) -> CaPrivateKey:
    """Load an encrypted PEM private key written by :func:`save_encrypted_key`.

    Refuses a missing file, a plaintext key (a CA key must never sit unencrypted on disk),
    a wrong passphrase and a key type a CA may not use, each with its own message.
    """
    path = Path(path)
    if not isinstance(passphrase, bytes) or not passphrase:
        raise SignerError(f"cannot open CA key {path}: the passphrase is empty")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SignerError(f"CA key file {path} does not exist") from None
    except IsADirectoryError:
        raise SignerError(f"CA key path {path} is a directory, not a key file") from None
    except PermissionError:
        raise SignerError(f"CA key file {path} is not readable by this user") from None
    if b"-----BEGIN" not in data:
        raise SignerError(f"CA key file {path} is not a PEM file")
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        pass  # encrypted, as it must be
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignerError(f"CA key file {path} is not a readable private key: {exc}") from exc
    else:
        raise SignerError(
            f"CA key file {path} holds an UNENCRYPTED private key; refusing it. "
            "Re-encrypt it (e.g. `openssl pkcs8 -topk8 -v2 aes-256-cbc`) and protect the passphrase."
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except ValueError as exc:
        raise SignerError(f"cannot decrypt CA key file {path}: wrong passphrase (or corrupt file)") from exc
    except UnsupportedAlgorithm as exc:
        raise SignerError(f"CA key file {path} uses an unsupported algorithm or cipher: {exc}") from exc
    if not isinstance(key, _CA_KEY_TYPES):
        raise SignerError(f"CA key file {path} holds a {type(key).__name__}, which a CA may not use")
    return key


# --- passphrase / PIN sources -----------------------------------------------------------


def resolve_passphrase(*, env: str | None = None, file: Path | str | None = None) -> bytes:
    """Read a passphrase (or PIN) from the environment variable ``env`` or from ``file``.

    Exactly one source. A file must not be accessible to group or others (like ssh keys) and
    loses one trailing newline (``\\n`` or ``\\r\\n``), so ``echo secret > f`` works. An empty
    value, an unset variable or an unreadable file is a :class:`SignerError` naming the source.
    """
    if (env is None) == (file is None):
        raise SignerError("give exactly one passphrase source: an environment variable or a file")
    if env is not None:
        if not env:
            raise SignerError("passphrase environment variable name is empty")
        value = os.environb.get(os.fsencode(env))
        if value is None:
            raise SignerError(f"passphrase environment variable {env} is not set")
        if not value:
            raise SignerError(f"passphrase environment variable {env} is empty")
        return value

    path = Path(file)  # type: ignore[arg-type]
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SignerError(f"passphrase file {path} does not exist") from None
    except PermissionError:
        raise SignerError(f"passphrase file {path} is not accessible by this user") from None
    if not stat.S_ISREG(st.st_mode):
        raise SignerError(f"passphrase file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SignerError(
            f"passphrase file {path} is accessible by group or others (mode {mode:04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        value = path.read_bytes()
    except PermissionError:
        raise SignerError(f"passphrase file {path} is not readable by this user") from None
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    if not value:
        raise SignerError(f"passphrase file {path} is empty")
    return value


# --- one URI for both backends ---------------------------------------------------------


def _parse_pkcs11_uri(uri: str) -> tuple[dict[str, str], dict[str, str]]:
    body = uri[len("pkcs11:") :]
    path_part, _, query_part = body.partition("?")
    path_attrs: dict[str, str] = {}
    query_attrs: dict[str, str] = {}
    for part, target, sep in ((path_part, path_attrs, ";"), (query_part, query_attrs, "&")):
        for item in part.split(sep):
            if not item:
                continue
            name, eq, value = item.partition("=")
            if not eq:
                raise SignerError(f"malformed PKCS#11 URI attribute {item!r} in {uri!r}")
            name = name.lower()
            if name in target:
                raise SignerError(f"PKCS#11 URI attribute {name!r} given twice in {uri!r}")
            target[name] = unquote(value)
    return path_attrs, query_attrs


def _open_pkcs11(uri: str, passphrase: bytes | None) -> CaPrivateKey:
    path_attrs, query = _parse_pkcs11_uri(uri)
    unknown = set(path_attrs) - {"token", "object", "type"}
    if unknown:
        raise SignerError(f"unsupported PKCS#11 URI path attribute(s) {sorted(unknown)} (supported: token, object, type)")
    if "pin-value" in query:
        raise SignerError("pin-value in a PKCS#11 URI is refused: use pin-source=file:/path or pin-source=env:NAME")
    unknown = set(query) - {"module-path", "pin-source"}
    if unknown:
        raise SignerError(f"unsupported PKCS#11 URI query attribute(s) {sorted(unknown)} (supported: module-path, pin-source)")
    token_label = path_attrs.get("token")
    object_label = path_attrs.get("object")
    if not token_label or not object_label:
        raise SignerError(f"PKCS#11 URI {uri!r} must name both token=<label> and object=<label>")
    if path_attrs.get("type", "private") != "private":
        raise SignerError(f"PKCS#11 URI type={path_attrs['type']!r}: a signer needs type=private")

    source = query.get("pin-source")
    if source is not None:
        if source.startswith("file:"):
            pin = resolve_passphrase(file=_file_uri_path(source))
        elif source.startswith("env:"):
            pin = resolve_passphrase(env=source[len("env:") :])
        else:
            raise SignerError(f"unsupported pin-source {source!r} (use file:/path or env:NAME)")
    elif passphrase:
        pin = passphrase
    else:
        raise SignerError(f"no user PIN for PKCS#11 token {token_label!r}: give pin-source in the URI or a passphrase")

    from . import pkcs11 as hsm  # python-pkcs11 is optional: import only when asked for

    session = hsm.HsmSession.open(module=query.get("module-path"), token_label=token_label, pin=pin)
    try:
        key = hsm.find_key(session, object_label)
    except BaseException:
        session.close()
        raise
    key.owns_session = True  # closing the key releases the session it opened
    return key


def _file_uri_path(uri: str) -> Path:
    rest = uri[len("file:") :]
    if rest.startswith("//"):
        host, slash, tail = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise SignerError(f"file URI {uri!r} names a remote host; only local files are supported")
        rest = slash + tail
    if not rest:
        raise SignerError(f"file URI {uri!r} has no path")
    return Path(unquote(rest))


def open_signer(uri: str, *, passphrase: bytes | None) -> CaPrivateKey:
    """Open the CA signing key named by ``uri`` (``file:...`` or ``pkcs11:...``, see the module doc).

    For ``file:`` the ``passphrase`` decrypts the key; for ``pkcs11:`` it is the user PIN
    unless the URI has a ``pin-source``. The returned object is a cryptography private key;
    a PKCS#11 key keeps a token session open until its ``close()`` is called.
    """
    if not isinstance(uri, str) or not uri:
        raise SignerError("empty signer URI")
    scheme = uri.partition(":")[0].lower()
    if scheme == "file":
        if not passphrase:
            raise SignerError(f"no passphrase given for encrypted CA key {uri}")
        return load_encrypted_key(_file_uri_path(uri), passphrase)
    if scheme == "pkcs11":
        return _open_pkcs11(uri, passphrase)
    raise SignerError(f"unsupported signer URI {uri!r}: use file:/path/key.pem or pkcs11:token=...;object=...")
