"""docs/wire-format.md is normative: its hex examples are the test vectors.

Each vector in the document must be exactly ``encode(message)`` of the message
tests/protocol/vectors.py builds, must decode back to it, and must validate
against the CDDL written in the same document.
"""

from __future__ import annotations

import re

import cbor2
import pycddl
import pytest

from protocol import codec
from protocol import messages as m
from protocol.errors import DecodeError
from vectors import DOC, VECTOR_BLOCK, vectors

DOC_TEXT = DOC.read_text()
DOC_VECTORS = {
    match["name"]: bytes.fromhex(match["hex"].replace("\n", " ")) for match in VECTOR_BLOCK.finditer(DOC_TEXT)
}
CDDL = "\n".join(re.findall(r"```cddl\n(.*?)```", DOC_TEXT, re.S))
SCHEMA = pycddl.Schema(CDDL)
EXPECTED = vectors()


def test_document_shows_every_vector_once() -> None:
    names = [match["name"] for match in VECTOR_BLOCK.finditer(DOC_TEXT)]
    assert sorted(names) == sorted(EXPECTED)
    assert len(names) == len(set(names))


def test_every_message_type_has_a_vector() -> None:
    assert {type(msg) for msg in EXPECTED.values()} == set(m.MESSAGE_CLASSES.values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_encode_gives_exactly_the_documented_bytes(name: str) -> None:
    assert codec.encode(EXPECTED[name]) == DOC_VECTORS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documented_bytes_decode_to_the_message(name: str) -> None:
    assert codec.decode(DOC_VECTORS[name]) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_validates_against_the_cddl(name: str) -> None:
    SCHEMA.validate_cbor(DOC_VECTORS[name])


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda w: w.pop(2), id="missing-required-key"),
        pytest.param(lambda w: w.__setitem__(1, 99), id="unknown-type"),
        pytest.param(lambda w: w.__setitem__(2, b"short"), id="request-id-size"),
        pytest.param(lambda w: w.__setitem__(3, "text"), id="wrong-value-type"),
    ],
)
def test_cddl_rejects_what_the_codec_rejects(mutation) -> None:  # type: ignore[no-untyped-def]
    # The CDDL is not decoration: it refuses the same broken messages the codec does.
    wire = cbor2.loads(DOC_VECTORS["certificate-request"])
    mutation(wire)
    data = cbor2.dumps(wire, canonical=True)
    with pytest.raises(pycddl.ValidationError):
        SCHEMA.validate_cbor(data)
    with pytest.raises(DecodeError):
        codec.decode(data)
