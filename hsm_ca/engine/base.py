"""The engine interface: what the CA may ask of an HSM, and nothing more.

The CA never sees private key material; it holds handles. Keeping this
interface narrow is what lets the built-in engine and a PKCS#11 token be
swapped without the layers above noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

KEY_TYPES: tuple[str, ...] = (
    "ec-p256",
    "ec-p384",
    "ec-p521",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
    "ed25519",
)

MAX_FAILED_LOGINS = 5


class Role(StrEnum):
    """HSM roles, after AWS CloudHSM's crypto officer / crypto user / auditor."""

    OFFICER = "crypto-officer"
    USER = "crypto-user"
    AUDITOR = "auditor"


@dataclass(frozen=True)
class KeySpec:
    """What to generate: the engine decides how, the caller only names it."""

    key_type: str
    label: str
    extractable: bool = False


@dataclass(frozen=True)
class UserInfo:
    """Public facts about an engine user (never the PIN or wrapped secrets)."""

    name: str
    role: Role
    failed_logins: int
    locked: bool


@runtime_checkable
class KeyHandle(Protocol):
    """A reference to a private key that stays inside the engine."""

    label: str
    key_type: str
    extractable: bool

    def public_key(self) -> PublicKeyTypes: ...

    def sign(self, data: bytes, algorithm: Any, padding: Any = None) -> bytes:
        """Sign ``data`` (the whole message, not a digest); DER for ECDSA.

        ``algorithm`` is a hash (or ``Prehashed``) or None for Ed25519;
        ``padding`` is the RSA padding object, None for EC and Ed25519.
        """
        ...


class HsmEngine(Protocol):
    """The narrow engine interface every backend implements."""

    name: str

    def login(self, user: str, pin: str) -> None: ...

    def logout(self) -> None: ...

    def generate_key(self, spec: KeySpec) -> KeyHandle: ...

    def get_key(self, label: str) -> KeyHandle: ...

    def list_keys(self) -> list[KeyHandle]: ...

    def destroy_key(self, label: str) -> None: ...

    def close(self) -> None: ...


def validate_key_type(key_type: str) -> str:
    """Return ``key_type`` if it is one the engines support, else refuse by name."""
    from hsm_ca.errors import UsageError

    if key_type not in KEY_TYPES:
        raise UsageError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    return key_type


def validate_label(label: str) -> str:
    """Labels become file keys and PKCS#11 CKA_LABELs: the ASCII name rule (hsm_ca.names).

    Longer than a name (MAX_KEY_LABEL), because derived labels put a prefix such
    as ``codesign-`` before a name of up to 64 characters.
    """
    from hsm_ca.names import MAX_KEY_LABEL, check_name

    return check_name(label, "key label", max_len=MAX_KEY_LABEL)
