"""certmq device library: keys, CSRs, provisioning, certificate store, renewal agent."""

from __future__ import annotations

from .agent import RenewalAgent
from .blocking import BlockingDeviceClient
from .certstore import CertStore, CertStoreError, PendingRequest, RotationRejected, Slot
from .client import BootstrapCredentials, DeviceClient, Event, NoReply, NotEnrolled, ProfileStatus, RecoveryWindowPassed
from .enroll import BootstrapExpiring, InvalidCertificate, build_csr, check_bootstrap, validate_certificate, verify_chain
from .feed import FeedFollower, follow_feed
from .keystore import FileKeyStore, KeyStore, KeyStoreError, Pkcs11KeyStore
from .revcache import FeedRejected, RevocationCache, RevocationStatus, StatusUnknown, trust_broker_acl
from .transport import (
    ClientCredentials,
    ConnectionRefused,
    IncomingMessage,
    MemoryBroker,
    MemoryTransport,
    NotConnected,
    Transport,
    TransportError,
)

__all__ = [
    "BlockingDeviceClient",
    "BootstrapCredentials",
    "BootstrapExpiring",
    "CertStore",
    "CertStoreError",
    "ClientCredentials",
    "ConnectionRefused",
    "DeviceClient",
    "Event",
    "FeedFollower",
    "FeedRejected",
    "FileKeyStore",
    "IncomingMessage",
    "InvalidCertificate",
    "KeyStore",
    "KeyStoreError",
    "MemoryBroker",
    "MemoryTransport",
    "NoReply",
    "NotConnected",
    "NotEnrolled",
    "PendingRequest",
    "Pkcs11KeyStore",
    "ProfileStatus",
    "RecoveryWindowPassed",
    "RenewalAgent",
    "RevocationCache",
    "RevocationStatus",
    "RotationRejected",
    "Slot",
    "StatusUnknown",
    "Transport",
    "TransportError",
    "build_csr",
    "check_bootstrap",
    "follow_feed",
    "trust_broker_acl",
    "validate_certificate",
    "verify_chain",
]
