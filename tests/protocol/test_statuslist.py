"""protocol.statuslist: compression format, untrusted decoding, StatusList, delta merging."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import protocol.statuslist as sl
from protocol.errors import DecodeError, LocalProtocolError, RemoteProtocolError, SequenceGap
from protocol.statuslist import (
    MAX_LIST_SIZE,
    ListMismatch,
    MergedDelta,
    SnapshotFields,
    StatusList,
    compress,
    decompress,
    entropy_bound_bytes,
    merge_deltas,
)


@dataclass(frozen=True)
class Delta:
    """A stand-in for the wire message: only the attribute names matter."""

    list_id: int
    from_sequence: int
    to_sequence: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Snapshot:
    list_id: int
    sequence: int
    size: int
    bits: bytes


def bits_from_indices(size: int, indices: set[int] | list[int]) -> bytes:
    """Reference implementation of the documented layout: bit i = byte i//8 & (0x80 >> i%8)."""
    out = bytearray((size + 7) // 8)
    for i in indices:
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def bernoulli_bits(n: int, p: float, seed: int) -> bytes:
    rng = random.Random(seed)
    r = rng.random
    return bits_from_indices(n, [i for i in range(n) if r() < p])


def set_positions(bits: bytes, size: int) -> list[int]:
    return [i for i in range(size) if bits[i // 8] & (0x80 >> (i % 8))]


# --------------------------------------------------------------------------- the format


def test_all_names_exported() -> None:
    public = {n for n in vars(sl) if not n.startswith("_") and getattr(vars(sl)[n], "__module__", None) == sl.__name__}
    assert public <= set(sl.__all__)
    assert all(hasattr(sl, n) for n in sl.__all__)


# Vectors built by hand from the module docstring, independent of the encoder's choices.
@pytest.mark.parametrize(
    ("data", "size", "positions"),
    [
        (b"\x00", 13, []),  # EMPTY
        (b"\x00", 0, []),
        (b"\x40\x10\x20", 16, [3, 10]),  # RAW
        (b"\x40\x80", 1, [0]),
        # mode 2, k=1: gap 3 = "1"+"0"+"1", gap 6 = "111"+"0"+"0" -> 10111100
        (b"\x81\x00\x00\x00\x02\xbc", 40, [3, 10]),
        # mode 2, k=1: gap 3 = "101", then five one-bits of padding -> 10111111
        (b"\x81\x00\x00\x00\x01\xbf", 40, [3]),
        # mode 2, k=0: gaps 0, 2 = "0" + "110", padded "1111" -> 01101111; last position 3
        (b"\x80\x00\x00\x00\x02\x6f", 40, [0, 3]),
        # mode 2, c=0 codewords: nothing set
        (b"\x82\x00\x00\x00\x00", 40, []),
        # mode 3, c=0: everything set
        (b"\xc0\x00\x00\x00\x00", 40, list(range(40))),
        # mode 3, k=2: the one clear bit at 9: gap 9 = "11"+"0"+"01", padding "111" -> 11001111
        (b"\xc2\x00\x00\x00\x01\xcf", 40, [i for i in range(40) if i != 9]),
    ],
)
def test_hand_built_vectors_decode(data: bytes, size: int, positions: list[int]) -> None:
    assert decompress(data, size) == bits_from_indices(size, positions)


@pytest.mark.parametrize(
    ("data", "size", "why"),
    [
        (b"", 8, "empty"),
        (b"\x00\x00", 8, "EMPTY with body"),
        (b"\x01", 8, "EMPTY with parameter"),
        (b"\x41\xff", 8, "RAW with parameter"),
        (b"\x40\xff\x00", 8, "RAW too long"),
        (b"\x40", 8, "RAW too short"),
        (b"\x40\x01", 7, "RAW unused bit set"),
        (b"\x40\x00\x00\x00", 9, "longer than 1 + ceil(size/8)"),
        (b"\x87\x00\x00\x00\x00", 64, "k=7 above bit_length(63)=6"),
        (b"\x81\x00", 1, "k=1 for a 1-bit list"),
        (b"\x81\x00", 0, "k=1 for an empty list"),
        (b"\x82\x00\x00", 64, "Rice body shorter than its count"),
        (b"\x80\x00\x00\x00\x41\x00\x00\x00\x00", 64, "65 codewords in a 64-bit list"),
        (b"\x83\x00\x00\x00\x03\x00", 64, "3 codewords of at least 4 bits in 8 bits"),
        (b"\x80\x00\x00\x00\x02\x7f", 40, "k=0: count 2 but one zero in the stream"),
        (b"\x83\x00\x00\x00\x02\x81", 40, "k=3: gap 8, then '0' with only 2 of 3 remainder bits"),
        (b"\x82\x00\x00\x00\x01\xff\xff", 64, "unary part without a terminating zero"),
        (b"\x86\x00\x00\x00\x01\x80", 64, "k=6: q=1 r=0, gap 64 names position 64 of a 64-bit list"),
        (b"\xc6\x00\x00\x00\x01\xc0\x3f", 64, "mode 3, k=6: gap 128 beyond the list"),
        (b"\x81\x00\x00\x00\x01\xbf\xff", 64, "13 bits of padding: a trailing byte"),
        (b"\x81\x00\x00\x00\x01\xbe", 64, "a zero among the padding bits"),
        (b"\x80\x00\x00\x00\x01\x7f\xff", 64, "k=0: a trailing byte"),
    ],
)
def test_invalid_encodings_rejected(data: bytes, size: int, why: str) -> None:
    with pytest.raises(DecodeError):
        decompress(data, size)


@pytest.mark.parametrize("size", [-1, MAX_LIST_SIZE + 1, 2**40])
def test_declared_size_out_of_range_rejected(size: int) -> None:
    with pytest.raises(DecodeError):
        decompress(b"\x00", size)


@pytest.mark.parametrize(("data", "size"), [("00", 8), (b"\x00", "8"), (b"\x00", True), (None, 8)])
def test_wrong_types_are_decode_errors(data: object, size: object) -> None:
    with pytest.raises(DecodeError):
        decompress(data, size)  # type: ignore[arg-type]


def test_max_size_accepted() -> None:
    assert decompress(b"\xc0\x00\x00\x00\x00", MAX_LIST_SIZE) == b"\xff" * (MAX_LIST_SIZE // 8)


def test_compress_rejects_bad_input() -> None:
    with pytest.raises(LocalProtocolError):
        compress(b"\x00\x00", 8)  # wrong length
    with pytest.raises(LocalProtocolError):
        compress(b"\x01", 7)  # unused bit set
    with pytest.raises(LocalProtocolError):
        compress(b"", -1)
    with pytest.raises(LocalProtocolError):
        compress(bytes((MAX_LIST_SIZE + 8) // 8), MAX_LIST_SIZE + 1)


@st.composite
def bitlists(draw: st.DrawFn, max_size: int = 3000) -> tuple[bytes, int]:
    size = draw(st.integers(0, max_size))
    density = draw(st.sampled_from([0.0, 0.0005, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    extra = draw(st.sets(st.integers(0, max(size - 1, 0)), max_size=5)) if size else set()
    idx = {i for i in range(size) if rng.random() < density} | extra
    return bits_from_indices(size, idx), size


@given(bitlists())
@example((b"", 0))
@example((b"\x80", 1))
@example((b"\x00\x01", 16))  # single bit at the end
@example((b"\x00\x00\x20", 19))  # single bit at the end, size not a multiple of 8
@example((b"\xff\xff\xe0", 19))  # all set
@example((b"\xff\xff\xc0", 19))  # all set but the last
@settings(max_examples=300, deadline=None)
def test_round_trip(case: tuple[bytes, int]) -> None:
    bits, size = case
    data = compress(bits, size)
    assert len(data) <= 1 + (size + 7) // 8
    assert decompress(data, size) == bits
    # The header's parameter respects the decoder's bound, so a conforming C decoder accepts it too.
    assert data[0] & 0x3F <= max(size - 1, 0).bit_length()


def test_encoder_picks_compact_modes() -> None:
    n = 4000
    assert compress(bytes(n // 8), n) == b"\x00"
    assert compress(b"\xff" * (n // 8), n) == b"\xc0\x00\x00\x00\x00"
    dense = bytes(b ^ 0xFF for b in bernoulli_bits(n, 0.01, 7))
    assert compress(dense, n)[0] >> 6 == 3  # Rice over the clear bits
    assert len(compress(dense, n)) < n // 8 // 4
    half = bernoulli_bits(n, 0.5, 7)
    assert compress(half, n) == b"\x40" + half  # incompressible: RAW


def test_entropy_bound() -> None:
    assert entropy_bound_bytes(800, 0.5) == pytest.approx(100.0)
    assert entropy_bound_bytes(1000, 0.1) == pytest.approx(entropy_bound_bytes(1000, 0.9))
    assert entropy_bound_bytes(1000, 0.0) == entropy_bound_bytes(1000, 1.0) == 0.0
    assert 0 < entropy_bound_bytes(8000, 0.01) < 1000 * 0.1
    with pytest.raises(ValueError):
        entropy_bound_bytes(10, 1.5)


@pytest.mark.parametrize(("p", "seed"), [(0.001, 11), (0.01, 12), (0.1, 13)])
def test_within_1_1_of_entropy_bound_at_one_million(p: float, seed: int) -> None:
    n = 1_000_000
    bits = bernoulli_bits(n, p, seed)
    data = compress(bits, n)
    assert decompress(data, n) == bits
    assert len(data) <= 1.1 * entropy_bound_bytes(n, p)


# --------------------------------------------------------------------------- untrusted input


def _check_decode_outcome(data: bytes, size: int) -> None:
    try:
        out = decompress(data, size)
    except DecodeError:
        return
    assert len(out) == (size + 7) // 8
    # Anything accepted is a well-formed list: the encoder takes it and it round-trips.
    assert decompress(compress(out, size), size) == out


@given(st.binary(max_size=80), st.integers(0, 700))
@settings(max_examples=1500, deadline=None)
def test_random_bytes_only_decode_error(data: bytes, size: int) -> None:
    _check_decode_outcome(data, size)


@given(st.integers(0, 255), st.binary(max_size=40), st.integers(0, 400))
@settings(max_examples=1000, deadline=None)
def test_random_body_for_every_header(header: int, body: bytes, size: int) -> None:
    _check_decode_outcome(bytes([header]) + body, size)


@given(st.integers(0x80, 0xFF), st.integers(0, 40), st.binary(max_size=40), st.integers(0, 400))
@settings(max_examples=1500, deadline=None)
def test_random_rice_stream_with_plausible_count(header: int, count: int, stream: bytes, size: int) -> None:
    # A random count is almost always rejected up front; a small one reaches the codeword loop.
    _check_decode_outcome(bytes([header]) + count.to_bytes(4, "big") + stream, size)


@given(bitlists(max_size=1500), st.data())
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_encodings_only_decode_error(case: tuple[bytes, int], data: st.DataObject) -> None:
    bits, size = case
    enc = bytearray(compress(bits, size))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "insert", "header", "size"]))
    if kind == "flip":
        i = data.draw(st.integers(0, 8 * len(enc) - 1))
        enc[i // 8] ^= 0x80 >> (i % 8)
    elif kind == "truncate":
        del enc[data.draw(st.integers(0, len(enc) - 1)) :]
    elif kind == "append":
        enc += data.draw(st.binary(min_size=1, max_size=4))
    elif kind == "insert":
        enc.insert(data.draw(st.integers(0, len(enc))), data.draw(st.integers(0, 255)))
    elif kind == "header":
        enc[0] = data.draw(st.integers(0, 255))
    else:
        size = data.draw(st.integers(0, 2000))
    _check_decode_outcome(bytes(enc), size)


def test_trailing_garbage_rejected() -> None:
    size = 5000
    data = compress(bernoulli_bits(size, 0.01, 3), size)
    assert data[0] >> 6 == 2
    for tail in (b"\x00", b"\xff", b"\x80"):
        with pytest.raises(DecodeError):
            decompress(data + tail, size)


@pytest.mark.parametrize("k", [0, 1])
def test_adversarial_max_size_input_is_linear(k: int) -> None:
    # The costliest valid input: a full-length body of zeros decodes a codeword every k+1 bits.
    nbits = 8 * (MAX_LIST_SIZE // 8 - 4)
    data = bytes([0x80 | k]) + (nbits // (k + 1)).to_bytes(4, "big") + bytes(nbits // 8)
    t = time.perf_counter()
    out = decompress(data, MAX_LIST_SIZE)
    assert time.perf_counter() - t < 30
    assert len(out) == MAX_LIST_SIZE // 8
    count = nbits // (k + 1)  # gap-0 codewords: positions 0 .. count-1
    assert count % 8 == 0
    assert out == b"\xff" * (count // 8) + bytes(MAX_LIST_SIZE // 8 - count // 8)


# --------------------------------------------------------------------------- StatusList


def test_status_list_basics() -> None:
    s = StatusList(list_id=7, size=20)
    assert (s.list_id, s.size, s.sequence, s.revoked_count()) == (7, 20, 0, 0)
    assert s.set([3, 19, 3]) == 2
    assert s.set([19]) == 0
    assert [i for i in range(20) if s.is_revoked(i)] == [3, 19]
    assert s.revoked_count() == 2
    assert s.bits == bits_from_indices(20, [3, 19])
    assert s.sequence == 0  # set() is not a revision
    with pytest.raises(IndexError):
        s.is_revoked(20)
    with pytest.raises(IndexError):
        s.is_revoked(-1)


def test_set_validates_everything_first() -> None:
    s = StatusList(list_id=1, size=10)
    with pytest.raises(LocalProtocolError):
        s.set([1, 2, 10])
    with pytest.raises(LocalProtocolError):
        s.set([1, True])
    assert s.revoked_count() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"list_id": -1, "size": 8},
        {"list_id": 1, "size": MAX_LIST_SIZE + 1},
        {"list_id": 1, "size": 8, "sequence": -1},
        {"list_id": 1, "size": 8, "bits": b"\x00\x00"},
        {"list_id": 1, "size": 7, "bits": b"\x01"},
    ],
)
def test_status_list_constructor_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        StatusList(**kwargs)  # type: ignore[arg-type]


def test_snapshot_round_trip() -> None:
    s = StatusList(list_id=3, size=1001, sequence=42)
    s.set([0, 500, 1000])
    fields = s.to_snapshot_fields()
    assert isinstance(fields, tuple) and fields[:3] == (3, 42, 1001)
    assert decompress(fields.bits, 1001) == s.bits
    t = StatusList.from_snapshot(Snapshot(*fields))
    assert (t.list_id, t.size, t.sequence, t.bits, t.revoked_count()) == (3, 1001, 42, s.bits, 3)


def _state(s: StatusList) -> tuple[int, int, int, bytes, int]:
    return (s.list_id, s.size, s.sequence, s.bits, s.revoked_count())


def test_issuer_deltas_drive_a_subscriber() -> None:
    issuer = StatusList(list_id=9, size=300)
    sub = StatusList.from_snapshot(issuer.to_snapshot_fields())
    d1 = issuer.revoke([5, 2, 5])
    assert d1 == MergedDelta(list_id=9, from_sequence=0, to_sequence=1, indices=(2, 5))
    assert issuer.revoke([2]) is None and issuer.sequence == 1  # nothing new, no revision
    d2 = issuer.revoke([2, 299])
    assert d2 is not None and d2.indices == (299,)
    assert sub.apply_delta(d1) and sub.apply_delta(d2)
    assert _state(sub) == _state(issuer)


def test_delta_from_the_future_is_refused_and_changes_nothing() -> None:
    s = StatusList(list_id=1, size=100, sequence=5)
    s.set([1])
    before = _state(s)
    with pytest.raises(SequenceGap) as e:
        s.apply_delta(Delta(1, 6, 7, (2, 3)))
    assert (e.value.held, e.value.got_from) == (5, 6)
    assert _state(s) == before


def test_duplicate_delta_is_ignored() -> None:
    s = StatusList(list_id=1, size=100, sequence=5)
    d = Delta(1, 5, 6, (2, 3))
    assert s.apply_delta(d) is True
    after = _state(s)
    assert s.apply_delta(d) is False
    assert s.apply_delta(Delta(1, 2, 4, (50,))) is False  # older still
    assert _state(s) == after
    assert not s.is_revoked(50)


def test_overlapping_delta_is_a_gap() -> None:
    s = StatusList(list_id=1, size=100, sequence=5)
    with pytest.raises(SequenceGap):
        s.apply_delta(Delta(1, 4, 7, (1,)))
    assert s.sequence == 5 and s.revoked_count() == 0


@pytest.mark.parametrize(
    ("delta", "exc"),
    [
        (Delta(2, 0, 1, (1,)), ListMismatch),
        (Delta(1, 0, 1, (100,)), RemoteProtocolError),  # beyond the list
        (Delta(1, 0, 1, (3, 3)), RemoteProtocolError),
        (Delta(1, 0, 1, (4, 3)), RemoteProtocolError),
        (Delta(1, 0, 1, (-1,)), RemoteProtocolError),
        (Delta(1, 1, 1, (1,)), RemoteProtocolError),
        (Delta(1, -1, 1, (1,)), RemoteProtocolError),
        (Delta(1, 0, 1, ("1",)), RemoteProtocolError),  # type: ignore[arg-type]
    ],
)
def test_bad_delta_changes_nothing(delta: Delta, exc: type[Exception]) -> None:
    s = StatusList(list_id=1, size=100)
    before = _state(s)
    with pytest.raises(exc):
        s.apply_delta(delta)
    assert _state(s) == before


def test_list_mismatch_is_a_remote_protocol_error() -> None:
    s = StatusList(list_id=1, size=10)
    with pytest.raises(ListMismatch) as e:
        s.apply_delta(Delta(2, 0, 1, ()))
    assert isinstance(e.value, RemoteProtocolError)
    assert (e.value.expected, e.value.got) == (1, 2)


def test_empty_delta_advances_sequence() -> None:
    s = StatusList(list_id=1, size=10)
    assert s.apply_delta(Delta(1, 0, 3, ()))
    assert s.sequence == 3 and s.revoked_count() == 0


def test_apply_snapshot() -> None:
    s = StatusList(list_id=1, size=64, sequence=10)
    s.set([1])
    before = _state(s)
    older = Snapshot(1, 9, 64, compress(bits_from_indices(64, [2]), 64))
    assert s.apply_snapshot(older) is False and _state(s) == before
    newer = Snapshot(1, 12, 80, compress(bits_from_indices(80, [1, 70]), 80))
    assert s.apply_snapshot(newer) is True
    assert _state(s) == (1, 80, 12, bits_from_indices(80, [1, 70]), 2)
    same = Snapshot(1, 12, 80, compress(bits_from_indices(80, [1, 70]), 80))
    assert s.apply_snapshot(same) is True and s.sequence == 12
    other = Snapshot(2, 0, 8, b"\x00")  # another list, even at a lower sequence: a new list
    assert s.apply_snapshot(other) is True
    assert _state(s) == (2, 8, 0, b"\x00", 0)


@pytest.mark.parametrize(
    "snap",
    [
        Snapshot(1, 20, 64, b"\x82\xff\xff"),  # bad encoding
        Snapshot(1, 20, MAX_LIST_SIZE + 1, b"\x00"),
        Snapshot(1, -1, 64, b"\x00"),
        Snapshot(-1, 20, 64, b"\x00"),
    ],
)
def test_bad_snapshot_changes_nothing(snap: Snapshot) -> None:
    s = StatusList(list_id=1, size=64, sequence=10)
    s.set([5])
    before = _state(s)
    with pytest.raises(RemoteProtocolError):
        s.apply_snapshot(snap)
    with pytest.raises(RemoteProtocolError):
        StatusList.from_snapshot(snap)
    assert _state(s) == before


# --------------------------------------------------------------------------- merging


def test_merge_union_and_order() -> None:
    m = merge_deltas([Delta(4, 3, 4, (7, 90)), Delta(4, 4, 6, (1, 90)), Delta(4, 6, 7, (50,))])
    assert m == MergedDelta(list_id=4, from_sequence=3, to_sequence=7, indices=(1, 7, 50, 90))


def test_merge_refuses_gaps_and_other_lists() -> None:
    with pytest.raises(SequenceGap) as e:
        merge_deltas([Delta(4, 3, 4, (7,)), Delta(4, 5, 6, (1,))])
    assert (e.value.held, e.value.got_from) == (4, 5)
    with pytest.raises(ListMismatch):
        merge_deltas([Delta(4, 3, 4, (7,)), Delta(5, 4, 5, (1,))])
    with pytest.raises(RemoteProtocolError):
        merge_deltas([Delta(4, 3, 4, (7, 7))])
    with pytest.raises(ValueError):
        merge_deltas([])


def test_merged_delta_validates() -> None:
    with pytest.raises(LocalProtocolError):
        MergedDelta(list_id=1, from_sequence=2, to_sequence=2, indices=())
    with pytest.raises(LocalProtocolError):
        MergedDelta(list_id=1, from_sequence=0, to_sequence=1, indices=(2, 1))


@given(
    st.lists(st.sets(st.integers(0, 199), max_size=10), min_size=1, max_size=8),
    st.integers(0, 10),
)
@settings(max_examples=200, deadline=None)
def test_merged_delta_equals_applying_each(batches: list[set[int]], start: int) -> None:
    deltas = [Delta(1, start + i, start + i + 1, tuple(sorted(b))) for i, b in enumerate(batches)]
    one_by_one = StatusList(list_id=1, size=200, sequence=start)
    for d in deltas:
        assert one_by_one.apply_delta(d)
    merged = StatusList(list_id=1, size=200, sequence=start)
    assert merged.apply_delta(merge_deltas(deltas))
    assert _state(merged) == _state(one_by_one)
    assert merged.revoked_count() == len(set().union(*batches))


def test_snapshot_fields_is_snapshot_like() -> None:
    f = SnapshotFields(list_id=1, sequence=2, size=8, bits=b"\x00")
    assert StatusList.from_snapshot(f).sequence == 2
