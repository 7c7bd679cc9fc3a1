"""Adapters that let cryptography's builders sign with an engine-held key.

cryptography's X.509, CRL, OCSP and PKCS#7 builders accept any subclass of its
private-key ABCs and call ``sign()`` with the whole to-be-signed bytes. These
classes forward that call to the engine and refuse every way of reading the
private key, so no builder, logger or pickler can leak it.
"""

from __future__ import annotations

from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from hsm_ca.engine.base import KeyHandle
from hsm_ca.errors import EngineError


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise EngineError("private key material never leaves the HSM engine")


class _HandleMixin:
    _handle: KeyHandle

    def __init__(self, handle: KeyHandle) -> None:
        self._handle = handle

    @property
    def handle(self) -> KeyHandle:
        return self._handle

    def public_key(self) -> Any:
        return self._handle.public_key()

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

    def __repr__(self) -> str:
        return f"<HSM key {self._handle.label!r} ({self._handle.key_type})>"

    def __reduce__(self) -> NoReturn:
        _refuse()

    private_bytes = _refuse
    private_numbers = _refuse


class HsmEllipticCurveKey(_HandleMixin, ec.EllipticCurvePrivateKey):
    """An EC key handle shaped like cryptography's EC private key."""

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._handle.public_key().curve  # type: ignore[union-attr]

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise EngineError("only ECDSA signatures are supported with EC keys")
        return self._handle.sign(data, signature_algorithm.algorithm)

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise EngineError("ECDH is not offered by hsm-ca keys; they are signing keys")


class HsmRsaKey(_HandleMixin, rsa.RSAPrivateKey):
    """An RSA key handle shaped like cryptography's RSA private key."""

    @property
    def key_size(self) -> int:
        return self._handle.public_key().key_size  # type: ignore[union-attr]

    def sign(self, data: bytes, padding: Any, algorithm: Any) -> bytes:
        return self._handle.sign(data, algorithm, padding)

    def decrypt(self, ciphertext: bytes, padding: Any) -> bytes:
        raise EngineError("decryption is not offered by hsm-ca keys; they are signing keys")


class HsmEd25519Key(_HandleMixin, ed25519.Ed25519PrivateKey):
    """An Ed25519 key handle shaped like cryptography's Ed25519 private key."""

    def sign(self, data: bytes) -> bytes:
        return self._handle.sign(data, None)

    private_bytes_raw = _refuse


def as_private_key(handle: KeyHandle) -> CertificateIssuerPrivateKeyTypes:
    """Wrap a handle so cryptography's builders can sign with it."""
    if handle.key_type.startswith("ec-"):
        return HsmEllipticCurveKey(handle)
    if handle.key_type.startswith("rsa-"):
        return HsmRsaKey(handle)
    if handle.key_type == "ed25519":
        return HsmEd25519Key(handle)
    raise EngineError(f"no signing adapter for key type {handle.key_type!r}")


def new_software_key(key_type: str) -> Any:
    """A fresh in-memory private key of one of the CLI's key types.

    Used inside the built-in engine, for subscriber keys bootstrap makes on
    request, and for the throwaway keys of pre-issuance linting.
    """
    if key_type.startswith("ec-"):
        curves = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1(), "ec-p521": ec.SECP521R1()}
        return ec.generate_private_key(curves[key_type])
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    return ed25519.Ed25519PrivateKey.generate()


def key_type_of(public_key: Any) -> str:
    """Name a public key in the CLI's key-type vocabulary (``rsa-<bits>`` for any RSA size)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {
            "secp256r1": "ec-p256",
            "secp384r1": "ec-p384",
            "secp521r1": "ec-p521",
        }.get(public_key.curve.name, f"ec-{public_key.curve.name}")
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(public_key).__name__


class SignatureRequest:
    """What a builder asked a capturing key to sign, kept to be signed elsewhere."""

    __slots__ = ("algorithm", "data", "padding")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.algorithm: Any = None
        self.padding: Any = None


def _placeholder(handle: KeyHandle) -> bytes:
    if handle.key_type.startswith("rsa-"):
        return bytes(handle.public_key().key_size // 8)  # type: ignore[union-attr]
    if handle.key_type.startswith("ec-"):
        return bytes.fromhex("3006020101020101")  # ECDSA-Sig-Value r = s = 1
    return bytes(64)


def capturing_key(handle: KeyHandle) -> tuple[CertificateIssuerPrivateKeyTypes, SignatureRequest]:
    """A key that records the to-be-signed bytes and returns a placeholder signature.

    It lets cryptography's builders produce the exact TBS bytes without a round trip
    to the HSM, so the signing can happen in another process (the PKCS#11 signing
    helper) while this one builds the next certificate. The placeholder certificate
    is never stored: the real signature is spliced in and checked first.
    """
    request = SignatureRequest()
    placeholder = _placeholder(handle)

    def record(data: bytes, algorithm: Any, padding: Any = None) -> bytes:
        request.data, request.algorithm, request.padding = data, algorithm, padding
        return placeholder

    class _Recorder:
        label = handle.label
        key_type = handle.key_type
        extractable = False
        public_key = staticmethod(handle.public_key)
        sign = staticmethod(record)

    return as_private_key(_Recorder()), request  # type: ignore[arg-type]
