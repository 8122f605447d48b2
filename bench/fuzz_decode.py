"""Fuzz ``protocol.codec.decode``: it must return a message or raise DecodeError, never hang.

Run: ``./dev bench fuzz_decode [--inputs 100000] [--seed N]``.

Inputs, in equal parts: random bytes; mutated test vectors (byte flips, bit flips,
truncation, insertion, splices of two vectors); random well-formed CBOR built
from the allowed subset and a few forbidden items, with message-like maps.
Every input that decodes must re-encode to a message that decodes equal to it.
Prints inputs/s, the slowest single decode, and counts by outcome; exits non-zero
on any other exception or a decode slower than ``--max-ms``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "protocol"))

import cbor2  # noqa: E402

from protocol import codec  # noqa: E402
from protocol.errors import DecodeError  # noqa: E402
from vectors import vectors  # noqa: E402

SEEDS = [codec.encode(msg) for msg in vectors().values()]


def mutate(rng: random.Random) -> bytes:
    buf = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 2 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif op == 3:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 12))
        elif op == 4:
            other = rng.choice(SEEDS)
            cut = rng.randrange(len(other))
            buf = buf[: rng.randrange(len(buf) + 1)] + bytearray(other[cut:])
        elif buf:  # make a length head huge
            pos = rng.randrange(len(buf))
            buf[pos : pos + 1] = bytes([rng.choice([0x5B, 0x7B, 0x9B, 0xBB])]) + rng.randbytes(8)
    return bytes(buf)


def value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, 1, 23, 24, 255, 256, 2**32, 2**63, 2**64 - 1, rng.randrange(2**20)])
    if kind == 1:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 40]))
    if kind == 2:
        return rng.choice(["", "sensor-1", "a/b", "+", "\x00", "é" * 40])
    if kind == 3:
        return rng.choice([True, False, None, 1.5])
    if kind == 4:
        return -rng.randrange(1, 2**20)
    if kind == 5:
        return cbor2.CBORTag(rng.randrange(2), rng.randrange(10))
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.randrange(30): value(rng, depth + 1) for _ in range(rng.randrange(8))}


def structured(rng: random.Random) -> bytes:
    msg = {0: rng.choice([1, 1, 1, 2]), 1: rng.randrange(1, 12)}
    for key in range(2, 9):
        if rng.random() < 0.7:
            msg[key] = value(rng, 1)
    return cbor2.dumps(msg, canonical=rng.random() < 0.9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--max-ms", type=float, default=250.0, help="slowest acceptable single decode")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    start = time.perf_counter()
    for i in range(args.inputs):
        source = i % 3
        data = rng.randbytes(rng.randrange(64)) if source == 0 else mutate(rng) if source == 1 else structured(rng)
        t0 = time.perf_counter()
        try:
            message = codec.decode(data)
        except DecodeError as exc:
            outcomes[f"DecodeError {exc.code.name}"] += 1
        except Exception as exc:  # noqa: BLE001 - this is the bug we hunt
            print(f"FAIL: {type(exc).__name__}: {exc}\n  input: {data.hex()}", file=sys.stderr)
            return 1
        else:
            if codec.decode(codec.encode(message)) != message:
                print(f"FAIL: round trip differs for {data.hex()}", file=sys.stderr)
                return 1
            outcomes[f"decoded {type(message).__name__}"] += 1
        slowest = max(slowest, time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    print(f"fuzz_decode: {args.inputs:,} inputs (seed {args.seed}) in {elapsed:.1f} s, "
          f"{args.inputs / elapsed:,.0f}/s, slowest decode {slowest * 1000:.2f} ms")
    for outcome, count in outcomes.most_common():
        print(f"  {count:>8,}  {outcome}")
    if slowest * 1000 > args.max_ms:
        print(f"FAIL: a decode took {slowest * 1000:.1f} ms (> {args.max_ms} ms)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
