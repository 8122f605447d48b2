"""``validate_identifier``'s ASCII fast path gives exactly the slow path's answers: a differential
test against the character-by-character rules (exhaustive for short strings, hypothesis beyond)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import InvalidIdentifier
from protocol.topics import (
    MAX_IDENTIFIER_BYTES,
    RESERVED_OPERATOR_IDS,
    _PLAIN_IDENTIFIER,
    _validate_identifier_slowly,
    validate_identifier,
)

# Characters at the edges of every rule: ASCII controls, the wildcards and separator, '$', space,
# C1 controls, NBSP and other Unicode spaces, a surrogate, non-characters, multi-byte letters.
_EDGES = "\x00\x09\x1f\x7f\x80\x85\x9f\xa0\xe9\u2028\u3000\ud800\ufdd0\ufffe\uffff\U0001f600\U0010ffff"
_ALPHABET = [chr(c) for c in range(0x80)] + list(_EDGES)


def _outcome(check: Any, value: object, **kw: Any) -> tuple[Any, ...]:
    try:
        return ("ok", check(value, **kw))
    except InvalidIdentifier as exc:
        return ("refused", str(exc))


def _slow(value: object, *, what: str = "device id", reserved: frozenset[str] = frozenset()) -> str:
    return _validate_identifier_slowly(value, what=what, reserved=reserved)


def _accepted_slowly(value: str) -> bool:
    return _outcome(_slow, value)[0] == "ok"


def test_short_strings_exhaustively() -> None:
    # Every string of 1 or 2 characters from the alphabet: the regex accepts exactly the ASCII
    # strings the rules accept, and never a string they refuse.
    for length in (1, 2):
        for chars in itertools.product(_ALPHABET, repeat=length):
            value = "".join(chars)
            fast = _PLAIN_IDENTIFIER.fullmatch(value) is not None
            slow = _accepted_slowly(value)
            if value.isascii():
                assert fast == slow, value
            else:
                assert not fast, value
            assert _outcome(validate_identifier, value) == _outcome(_slow, value), value


def test_length_limit_on_both_paths() -> None:
    for value in ("a" * MAX_IDENTIFIER_BYTES, "a" * (MAX_IDENTIFIER_BYTES + 1), "a" * 63 + " ", " " + "a" * 63,
                  "$" + "a" * 63, "a" * 63 + "$", "é" * 32, "é" * 33):
        assert _outcome(validate_identifier, value) == _outcome(_slow, value), value
    assert validate_identifier("a" * MAX_IDENTIFIER_BYTES) == "a" * MAX_IDENTIFIER_BYTES
    with pytest.raises(InvalidIdentifier, match="longer than 64"):
        validate_identifier("a" * (MAX_IDENTIFIER_BYTES + 1))


def test_reserved_words_and_non_strings_still_refused() -> None:
    with pytest.raises(InvalidIdentifier, match="reserved word"):
        validate_identifier("findings", what="operator id", reserved=RESERVED_OPERATOR_IDS)
    assert validate_identifier("findings") == "findings"  # reserved only where the caller says so

    class Text(str):
        pass

    # A str subclass takes the slow path: the same answer as before the fast path existed.
    assert _outcome(validate_identifier, Text("dev-1")) == _outcome(_slow, Text("dev-1")) == ("ok", "dev-1")
    for bad in (b"dev-1", None, 7, ["dev-1"]):
        assert _outcome(validate_identifier, bad) == _outcome(_slow, bad)
        assert _outcome(validate_identifier, bad)[0] == "refused"


_mostly_ascii = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=0x20, max_codepoint=0x7E), st.sampled_from(_ALPHABET),
                       st.characters()),
    max_size=MAX_IDENTIFIER_BYTES + 6,
)


@settings(max_examples=3000, deadline=None)
@given(value=_mostly_ascii, reserved=st.sets(st.sampled_from(["findings", "a", "dev-1", " x"]), max_size=2),
       what=st.sampled_from(["device id", "tenant", "region"]))
def test_fast_path_gives_the_slow_answer(value: str, reserved: set[str], what: str) -> None:
    frozen = frozenset(reserved)
    assert _outcome(validate_identifier, value, what=what, reserved=frozen) == _outcome(
        _slow, value, what=what, reserved=frozen)
    if value.isascii():
        assert (_PLAIN_IDENTIFIER.fullmatch(value) is not None) == _accepted_slowly(value)
