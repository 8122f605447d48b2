"""Feed signature checking for revocation caches: trust the tenant CA certificate(s), nothing else.

A :class:`SignedFeedVerifier` holds the public keys of one tenant's issuing CA certificate(s)
(several during a CA rotation), indexed by COSE ``kid`` (``protocol.feedsig.key_id``). Given a
feed payload it runs :func:`protocol.feedsig.open_feed`: a payload that is not a COSE_Sign1,
names an unknown key, fails verification or carries anything but a snapshot or delta is refused.
Unsigned feed messages (a bare snapshot or delta) are therefore always refused.

It plugs into :class:`device_client.revcache.RevocationCache` as its ``verifier``: called with
``(topic, payload)`` it returns the verified inner message bytes, or ``False``. This module
knows no MQTT library and reads no files except in :meth:`SignedFeedVerifier.from_pem_file`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from protocol import feedsig
from protocol.errors import CertmqError, DecodeError
from protocol.messages import RevocationDelta, RevocationSnapshot

__all__ = ["SignedFeedVerifier"]

log = logging.getLogger("certmq.revocation")


class SignedFeedVerifier:
    """Accepts feed messages signed by one of ``certificates``' keys (the tenant's issuing CA)."""

    #: A cache using this verifier refuses unsigned data from any path (e.g. snapshot replies).
    requires_signature = True

    def __init__(self, *, certificates: Iterable[x509.Certificate]) -> None:
        keys: dict[bytes, object] = {}
        for cert in certificates:
            public = cert.public_key()
            feedsig.alg_for_key(public)  # a key no feed can be signed with is a configuration error
            keys[feedsig.key_id(public)] = public
        if not keys:
            raise ValueError("a feed verifier needs at least one CA certificate")
        self.keys = keys

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike[str]) -> SignedFeedVerifier:
        """Trust every certificate in a PEM file (e.g. the tenant's ``chain.pem``; the issuing CA signs feeds)."""
        return cls(certificates=x509.load_pem_x509_certificates(Path(path).read_bytes()))

    def open(self, payload: bytes) -> RevocationSnapshot | RevocationDelta:
        """The verified snapshot or delta; ``DecodeError`` / ``FeedSignatureError`` otherwise."""
        return feedsig.open_feed(payload, self.keys)

    def __call__(self, topic: str, payload: bytes) -> bytes | bool:
        """The RevocationCache verifier hook: the verified inner message bytes, or ``False``."""
        try:
            self.open(payload)
            return feedsig.decode_signed(payload).payload
        except (DecodeError, CertmqError) as exc:
            log.warning("feed message on %s refused: %s", topic, exc)
            return False
