"""Signed revocation feed sizes: snapshots of 10M certificates against the entropy bound and an
X.509 CRL of the same revoked set; bytes per revoked certificate in signed deltas.

Run: ``.venv/bin/python bench/feeds_sizes.py [--n 10000000] [--crl-sample 100000] [--seed 1]``.

* Snapshot: random revocations at 0.1 %, 1 %, 10 % of ``n``; the signed snapshot (COSE_Sign1,
  P-256, as published) against ``n * H(p) / 8``. Exits non-zero above 1.1 x.
* CRL: ``cryptography``'s CertificateRevocationListBuilder with one entry per revoked serial
  (random 159-bit serials, a revocation date, a keyCompromise reason: what ``broker_plugin.ca.crl``
  writes), signed with P-256. Building 1M entries in Python is slow, so a CRL of
  ``--crl-sample`` entries is built and measured and the size is extrapolated linearly per entry
  (the output says which rows are extrapolated).
* Deltas: signed deltas of 1, 10, 100, 1,000 and 10,000 random indices of a 10M list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from broker_plugin.feeds_publisher import FeedSigner  # noqa: E402
from protocol import codec  # noqa: E402
from protocol.codes import RevocationReason  # noqa: E402
from protocol.messages import RevocationDelta, RevocationSnapshot  # noqa: E402
from protocol.statuslist import compress, entropy_bound_bytes  # noqa: E402
from statuslist_sizes import random_bits  # noqa: E402

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def crl_bytes(entries: int, key: ec.EllipticCurvePrivateKey, rng: random.Random) -> int:
    """DER size of a signed CRL with ``entries`` revoked serials."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme issuing CA")])
    b = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(NOW)
         .next_update(NOW + dt.timedelta(days=1))
         .add_extension(x509.CRLNumber(1), critical=False))
    reason = x509.CRLReason(x509.ReasonFlags.key_compromise)
    for _ in range(entries):
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(rng.getrandbits(159) | (1 << 158))
            .revocation_date(NOW).add_extension(reason, critical=False).build())
    return len(b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--crl-sample", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    key = ec.generate_private_key(ec.SECP256R1())
    signer = FeedSigner(key=key)
    rng = random.Random(args.seed)
    print(f"# feeds_sizes n={args.n:,} seed={args.seed} {dt.datetime.now(dt.UTC):%Y-%m-%d} "
          f"python {sys.version.split()[0]} cpus={os.cpu_count()}")
    started = time.perf_counter()
    sample = crl_bytes(args.crl_sample, key, rng)
    empty = crl_bytes(0, key, rng)
    per_entry = (sample - empty) / args.crl_sample
    print(f"CRL: {args.crl_sample:,} entries = {sample:,} B ({per_entry:.1f} B/entry, empty {empty} B) "
          f"built in {time.perf_counter() - started:.1f} s")
    ok = True
    print("| revoked | count | signed snapshot | entropy bound | ratio | X.509 CRL | CRL / snapshot |")
    print("|---|---|---|---|---|---|---|")
    for p in (0.001, 0.01, 0.1):
        bits = random_bits(args.n, p, args.seed)
        count = int.from_bytes(bits, "big").bit_count()
        t0 = time.perf_counter()
        data = compress(bits, args.n)
        snap = RevocationSnapshot(list_id=1, sequence=count, size=args.n, bits=data, time=NOW)
        signed = signer.sign(codec.encode(snap))
        took = time.perf_counter() - t0
        bound = entropy_bound_bytes(args.n, count / args.n)
        ratio = len(signed) / bound
        ok &= ratio <= 1.1
        if count <= args.crl_sample:
            crl, how = crl_bytes(count, key, rng), "measured"
        else:
            crl, how = round(empty + per_entry * count), "extrapolated"
        print(f"| {p:.1%} | {count:,} | {len(signed):,} B ({took:.2f} s) | {bound:,.0f} B | {ratio:.3f} | "
              f"{crl:,} B ({how}) | {crl / len(signed):.1f} x |")
    print()
    print("| indices in one signed delta | bytes | bytes per revoked certificate |")
    print("|---|---|---|")
    for k in (1, 10, 100, 1000, 10_000):
        idx = tuple(sorted(rng.sample(range(args.n), k)))
        delta = RevocationDelta(list_id=1, from_sequence=41, to_sequence=42, indices=idx,
                                reason=RevocationReason.KEY_COMPROMISE, time=NOW)
        signed = signer.sign(codec.encode(delta))
        print(f"| {k:,} | {len(signed):,} | {len(signed) / k:.1f} |")
    print("\nPASS" if ok else "\nFAIL: a snapshot is above 1.1 x the entropy bound")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
