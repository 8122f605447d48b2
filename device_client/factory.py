"""Factory provisioning: key and CSR made offline, the certificate imported later.

On the production line: :func:`make_csr` generates the key in the device's
key store and writes ``<profile>.csr.pem`` next to the store, recording the
request as *pending* (kind ``factory``). The CA batch-signs the CSRs.
:func:`import_certificate` then validates the returned certificate exactly
like one received over MQTT (chain to the configured CA, same key, validity,
profile EKU, device id) and stages it in the *next* slot; the first
connection the device makes proves it and makes it current.

This module knows no MQTT.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.codes import Profile

from .certstore import CertStore, CertStoreError, PendingRequest, Slot
from .enroll import build_csr, load_certificates

__all__ = ["import_certificate", "make_csr"]


def make_csr(store: CertStore, *, device_id: str, profile: Profile, now: datetime, key_type: str = "p256",
             out: str | os.PathLike[str] | None = None) -> Path:
    """Generate a key for ``profile`` and write its CSR (PEM); returns the CSR path.

    Calling it again while the CSR is still pending rewrites the same CSR (same key).
    """
    pending = store.pending(profile)
    if pending is None or pending.kind != "factory":
        label, key = store.new_key(profile, key_type)
        pending = PendingRequest(request_id=os.urandom(16), kind="factory", key_label=label,
                                 csr=build_csr(key, device_id=device_id), created=now)
        store.set_pending(profile, pending)
    assert pending.csr is not None
    csr = x509.load_der_x509_csr(pending.csr)
    path = Path(out) if out is not None else store.directory / f"{profile.label}.csr.pem"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def import_certificate(store: CertStore, *, profile: Profile, certificate: bytes, now: datetime,
                       chain: bytes | None = None) -> Slot:
    """Validate and stage the certificate issued for the pending factory CSR of ``profile``.

    ``certificate`` is PEM (the leaf first, optionally followed by the chain) or
    DER; ``chain`` optional extra PEM. Raises ``InvalidCertificate`` or
    ``CertStoreError`` and changes nothing when it does not fit.
    """
    pending = store.pending(profile)
    if pending is None or pending.kind != "factory":
        raise CertStoreError(f"no factory CSR is pending for {profile.label}: run 'certmq device csr' first")
    certs = load_certificates(certificate)
    extra = load_certificates(chain) if chain else []
    return store.stage(profile, certificate=certs[0], chain=[*certs[1:], *extra], key_label=pending.key_label, now=now)
