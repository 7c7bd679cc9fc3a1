"""Small X.509 helpers shared by the services (no policy, no state)."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization


def pem_to_der(pem: str) -> bytes:
    """Decode one PEM block without a full X.509 parse (hashing must be cheap)."""
    lines = [ln for ln in pem.strip().splitlines() if ln and not ln.startswith("-----")]
    return base64.b64decode("".join(lines))


def pem_sha256(pem: str) -> str:
    return hashlib.sha256(pem_to_der(pem)).hexdigest()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def rfc3339(when: _dt.datetime) -> str:
    """RFC 3339 UTC with a Z, the format of every time hsm-ca prints."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def signature_hash_for(key_type: str) -> hashes.HashAlgorithm | None:
    """The hash a CA key of this type signs with (None: Ed25519 has its own)."""
    return {
        "ec-p256": hashes.SHA256(),
        "ec-p384": hashes.SHA384(),
        "ec-p521": hashes.SHA512(),
    }.get(key_type, None if key_type == "ed25519" else hashes.SHA256())


def ski_hex(cert: x509.Certificate) -> str | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return None


def pem_from_der(der: bytes, label: str = "CERTIFICATE") -> str:
    """PEM from DER without asking cryptography to serialise the object again."""
    b64 = base64.b64encode(der).decode("ascii")
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def sans_as_strings(cert: x509.Certificate) -> list[str]:
    """SANs as ``kind:value`` strings for tables and JSON."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return general_names_as_strings(san)


def general_names_as_strings(names: Any) -> list[str]:
    out = []
    for name in names:
        kind = {
            x509.DNSName: "DNS",
            x509.IPAddress: "IP",
            x509.RFC822Name: "email",
            x509.UniformResourceIdentifier: "URI",
        }.get(type(name), type(name).__name__)
        out.append(f"{kind}:{name.value}")
    return out


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv_end(der: bytes, offset: int) -> tuple[int, int]:
    """(start of contents, end) of the DER element at ``offset``."""
    first = der[offset + 1]
    if first < 0x80:
        start = offset + 2
        return start, start + first
    count = first & 0x7F
    start = offset + 2 + count
    return start, start + int.from_bytes(der[offset + 2:start], "big")


def splice_signature(signed_der: bytes, tbs: bytes, signature: bytes) -> bytes:
    """Replace the signature of a signed X.509 structure (certificate, CRL) with ``signature``.

    ``signed_der`` is SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING }; it was
    built with a placeholder signature so the TBS could be signed elsewhere. The
    TBS must be exactly the bytes that were signed.
    """
    body, end = _tlv_end(signed_der, 0)
    if end != len(signed_der) or signed_der[body:body + len(tbs)] != tbs:
        raise ValueError("the signed structure does not hold the expected TBS")
    alg_end = _tlv_end(signed_der, body + len(tbs))[1]
    algid = signed_der[body + len(tbs):alg_end]
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    inner = len(tbs) + len(algid) + len(bits)
    return b"\x30" + _der_length(inner) + tbs + algid + bits
