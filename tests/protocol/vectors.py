"""The messages behind the hex test vectors in docs/wire-format.md.

Everything here is deterministic (Ed25519 signatures, fixed keys, times and
ids), so the tests can rebuild each message and require that encoding it gives
exactly the bytes the document shows. Run this file to print the vector
blocks, or to rewrite them in the document after a deliberate format change:

    .venv/bin/python tests/protocol/vectors.py [--update-doc]
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol import codec, extensions, statuslist  # noqa: E402
from protocol import messages as m  # noqa: E402
from protocol.codes import ErrorCode, Profile, RevocationReason  # noqa: E402
from protocol.renewal import RenewalWindow  # noqa: E402

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 15, tzinfo=UTC)


def _key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def request_id(n: int) -> bytes:
    return bytes(range(n, n + 16))


def example_csr() -> bytes:
    """A PKCS#10 request of device ``sensor-0042`` (Ed25519, deterministic)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0042")]))
        .sign(_key("device sensor-0042"), None)
    )
    return csr.public_bytes(serialization.Encoding.DER)


def example_certificate() -> bytes:
    """The certificate a test CA issues to ``sensor-0042`` (Ed25519 CA, deterministic)."""
    ca_key = _key("example issuing CA")
    device_key = _key("device sensor-0042")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0042")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example issuing CA")]))
        .public_key(device_key.public_key())
        .serial_number(0x5E1A1_C0FFEE_0123456789ABCDEF)
        .not_valid_before(T0)
        .not_valid_after(T0 + dt.timedelta(days=730))
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(extensions.STATUS_POSITION_OID),
                extensions.encode_status_position(3, 1042),
            ),
            critical=False,
        )
        .sign(ca_key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def vectors() -> dict[str, m.Message]:
    """Name -> message, in the order the document shows them."""
    snapshot_bits = bytearray(8)  # a 64-entry list with indices 3, 17 and 60 revoked
    for i in (3, 17, 60):
        snapshot_bits[i // 8] |= 0x80 >> (i % 8)
    return {
        "certificate-request": m.CertificateRequest(
            request_id=request_id(0),
            profile=Profile.IDENTITY,
            csr=example_csr(),
            provisioning=m.ProvisioningParameters(device_id="sensor-0042", region="eu-west"),
        ),
        "renewal-request": m.RenewalRequest(
            request_id=request_id(16),
            profile=Profile.IDENTITY,
            current_serial=0x5E1A1_C0FFEE_0123456789ABCDEF,
            reuse_key=True,
        ),
        "certificate-issued": m.CertificateIssued(
            request_id=request_id(0),
            certificate=example_certificate(),
            renewal_window=RenewalWindow(
                start=T0 + dt.timedelta(days=600), end=T0 + dt.timedelta(days=660)
            ),
        ),
        "revocation-request": m.RevocationRequest(
            request_id=request_id(32),
            reason=RevocationReason.KEY_COMPROMISE,
            device_id="sensor-0042",
        ),
        "revocation-result": m.RevocationResult(
            request_id=request_id(32),
            serials=(0x5E1A1_C0FFEE_0123456789ABCDEF,),
        ),
        "revocation-snapshot": m.RevocationSnapshot(
            list_id=3,
            sequence=7,
            size=64,
            bits=statuslist.compress(bytes(snapshot_bits), 64),
            time=T0 + dt.timedelta(days=1),
        ),
        "revocation-delta": m.RevocationDelta(
            list_id=3,
            from_sequence=7,
            to_sequence=8,
            indices=(1042, 70000),
            reason=RevocationReason.KEY_COMPROMISE,
            time=T0 + dt.timedelta(days=1, seconds=5),
        ),
        "snapshot-request": m.SnapshotRequest(request_id=request_id(48), list_id=3),
        "error-busy": m.Error(
            code=ErrorCode.BUSY,
            text="admission queue full",
            request_id=request_id(0),
            retry_after=42,
        ),
        "error-malformed": m.Error(code=ErrorCode.MALFORMED, text="truncated CBOR"),
    }


def hex_block(data: bytes, width: int = 32) -> str:
    """Hex in lines of ``width`` bytes, bytes separated by spaces (how the document shows them)."""
    return "\n".join(
        " ".join(f"{b:02x}" for b in data[i : i + width]) for i in range(0, len(data), width)
    )


VECTOR_BLOCK = re.compile(r"```hex vector=(?P<name>[a-z0-9-]+)\n(?P<hex>[0-9a-f \n]*?)```")
DOC = ROOT / "docs" / "wire-format.md"


def update_doc() -> None:
    """Rewrite the hex of every vector block in docs/wire-format.md from the code."""
    messages = vectors()

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        return f"```hex vector={name}\n{hex_block(codec.encode(messages[name]))}\n```"

    DOC.write_text(VECTOR_BLOCK.sub(fill, DOC.read_text()))


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-doc"]:
        update_doc()
    else:
        for name, message in vectors().items():
            data = codec.encode(message)
            print(f"{name} ({len(data)} bytes):\n\n```hex vector={name}\n{hex_block(data)}\n```\n")
