"""Status-list snapshot sizes against the entropy bound, with compress/decompress times.

Run: ``.venv/bin/python bench/statuslist_sizes.py [--n 10000000] [--seed 1]``.
Exits non-zero if a snapshot is larger than 1.1 x the entropy bound ``n * H(p) / 8``
or does not round-trip. :func:`snapshot_sizes` is meant to be imported by other benches.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from protocol.statuslist import compress, decompress, entropy_bound_bytes

__all__ = ["DEFAULT_PS", "MAX_RATIO", "main", "random_bits", "snapshot_sizes"]

DEFAULT_PS = (0.001, 0.01, 0.1)
MAX_RATIO = 1.1


def random_bits(n: int, p: float, seed: int) -> bytes:
    """``n`` independent bits, each set with probability ``p`` (layout of :mod:`protocol.statuslist`).

    Draws the geometric gaps between set bits rather than ``n`` coin flips: the same
    distribution, and fast for 10M bits.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"density must be in (0, 1), got {p}")
    rng = random.Random(seed)
    log_q = math.log1p(-p)
    pieces: list[str] = []
    pos = -1
    while True:
        gap = int(math.log(1.0 - rng.random()) / log_q)  # 1 - random() is in (0, 1]
        pos += gap + 1
        if pos >= n:
            break
        pieces.append("0" * gap + "1")
    s = "".join(pieces)
    s += "0" * (n - len(s))
    nbytes = (n + 7) // 8
    return (int(s, 2) << (8 * nbytes - n)).to_bytes(nbytes, "big") if n else b""


def snapshot_sizes(n: int, ps: Sequence[float], seed: int) -> list[dict[str, Any]]:
    """Compress a random ``n``-bit list per density in ``ps``; one dict of measurements each.

    Keys: ``p``, ``n``, ``set_bits``, ``raw_bytes``, ``compressed_bytes``, ``entropy_bytes``,
    ``ratio`` (compressed / entropy bound), ``header`` (mode and Rice parameter),
    ``compress_s``, ``decompress_s``, ``round_trip`` (bool).
    """
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(ps):
        bits = random_bits(n, p, seed + i)
        t0 = time.perf_counter()
        data = compress(bits, n)
        t1 = time.perf_counter()
        back = decompress(data, n)
        t2 = time.perf_counter()
        bound = entropy_bound_bytes(n, p)
        mode, k = data[0] >> 6, data[0] & 0x3F
        rows.append(
            {
                "p": p,
                "n": n,
                "set_bits": int.from_bytes(bits, "big").bit_count(),
                "raw_bytes": len(bits),
                "compressed_bytes": len(data),
                "entropy_bytes": bound,
                "ratio": len(data) / bound if bound else math.inf,
                "header": f"{('empty', 'raw', 'rice1', 'rice0')[mode]} k={k}",
                "compress_s": t1 - t0,
                "decompress_s": t2 - t1,
                "round_trip": back == bits,
            }
        )
    return rows


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'p':>7} {'set bits':>10} {'raw B':>10} {'snapshot B':>11} {'entropy B':>11} {'ratio':>6} {'coding':>12} {'compress':>9} {'decomp':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['p']:>7.2%} {r['set_bits']:>10,} {r['raw_bytes']:>10,} {r['compressed_bytes']:>11,} "
            f"{r['entropy_bytes']:>11,.0f} {r['ratio']:>6.3f} {r['header']:>12} "
            f"{r['compress_s']:>8.2f}s {r['decompress_s']:>7.2f}s"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; return 1 if a ratio exceeds :data:`MAX_RATIO` or a round trip fails."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=10_000_000, help="bits per list (default 10,000,000)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = ap.parse_args(argv)
    rows = snapshot_sizes(args.n, DEFAULT_PS, args.seed)
    print(f"status-list snapshots, n = {args.n:,} random independent bits, seed {args.seed}")
    print(_table(rows))
    bad = [r for r in rows if r["ratio"] > MAX_RATIO or not r["round_trip"]]
    for r in bad:
        why = "round trip failed" if not r["round_trip"] else f"ratio {r['ratio']:.3f} > {MAX_RATIO}"
        print(f"FAIL p={r['p']:.2%}: {why}", file=sys.stderr)
    if not bad:
        print(f"all ratios <= {MAX_RATIO}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
