"""CMS SignedData (RFC 5652) built with asn1crypto and signed through an engine handle.

cryptography's PKCS7SignatureBuilder cannot add the ESS signingCertificateV2
attribute (RFC 5035) or unsigned attributes such as a signature time-stamp
token, so CMS structures are assembled here with asn1crypto; the signature
itself still goes through the engine.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable
from typing import Any

from asn1crypto import algos, cms, core, tsp
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from hsm_ca.engine.base import KeyHandle
from hsm_ca.engine.keys import as_private_key
from hsm_ca.errors import EngineError

HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def digest_name_for(key_type: str) -> str:
    """The digest paired with a key: P-384 with SHA-384, P-521 and Ed25519 (RFC 8419) with SHA-512."""
    return {"ec-p384": "sha384", "ec-p521": "sha512", "ed25519": "sha512"}.get(key_type, "sha256")


def to_asn1(cert: x509.Certificate) -> ax509.Certificate:
    return ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def ess_signing_certificate_v2(cert: x509.Certificate) -> tsp.SigningCertificateV2:
    """ESS signingCertificateV2 naming ``cert`` by its SHA-256 and issuer/serial (RFC 5035)."""
    acert = to_asn1(cert)
    return tsp.SigningCertificateV2({
        "certs": [tsp.ESSCertIDv2({
            # hashAlgorithm omitted: its DEFAULT is SHA-256, and DER leaves defaults out
            "cert_hash": hashlib.sha256(acert.dump()).digest(),
            "issuer_serial": {
                "issuer": [ax509.GeneralName({"directory_name": acert.issuer})],
                "serial_number": acert.serial_number,
            },
        })]
    })


def _der_set(attrs: list[cms.CMSAttribute]) -> cms.CMSAttributes:
    # DER: the elements of a SET OF are sorted by their encodings (OpenSSL re-encodes to verify)
    return cms.CMSAttributes(sorted(attrs, key=lambda a: a.dump()))


def signed_attributes(
    content_type: str, digest: bytes, signer: x509.Certificate, when: _dt.datetime
) -> cms.CMSAttributes:
    return _der_set([
        cms.CMSAttribute({"type": "content_type", "values": [content_type]}),
        cms.CMSAttribute({"type": "signing_time", "values": [cms.Time({"utc_time": when})]}),
        cms.CMSAttribute({"type": "message_digest", "values": [digest]}),
        cms.CMSAttribute({"type": "signing_certificate_v2",
                          "values": [ess_signing_certificate_v2(signer)]}),
    ])


def _signature_algorithm(key_type: str, digest_name: str) -> dict[str, Any]:
    if key_type.startswith("ec-"):
        return {"algorithm": f"{digest_name}_ecdsa"}
    if key_type.startswith("rsa-"):
        return {"algorithm": "rsassa_pkcs1v15"}
    return {"algorithm": "ed25519"}


def engine_sign(handle: KeyHandle, data: bytes, digest_name: str) -> bytes:
    key = as_private_key(handle)
    h = HASHES[digest_name]()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(h))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), h)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise EngineError(f"cannot sign CMS with key type {handle.key_type}")


def build_signed_data(
    *,
    handle: KeyHandle,
    signer: x509.Certificate,
    chain: list[x509.Certificate],
    content_type: str,
    digest: bytes,
    digest_name: str,
    when: _dt.datetime,
    content: bytes | None = None,
    include_certificates: bool = True,
    unsigned: Callable[[bytes], list[cms.CMSAttribute]] | None = None,
) -> tuple[cms.ContentInfo, bytes]:
    """A SignedData over a precomputed content digest; returns it and the signature value.

    ``unsigned`` receives the signature value and returns unsigned attributes
    (a signature time stamp), so the structure is built once: asn1crypto is
    very slow to re-encode a SignedData that nests another one.
    """
    attrs = signed_attributes(content_type, digest, signer, when)
    signature = engine_sign(handle, attrs.dump(), digest_name)
    acert = to_asn1(signer)
    info: dict[str, Any] = {
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": acert.issuer, "serial_number": acert.serial_number})}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest_name}),
        "signed_attrs": attrs,
        "signature_algorithm": algos.SignedDigestAlgorithm(
            _signature_algorithm(handle.key_type, digest_name)),
        "signature": signature,
    }
    if unsigned is not None:
        extra = unsigned(signature)
        if extra:
            info["unsigned_attrs"] = _der_set(extra)
    signer_info = cms.SignerInfo(info)
    encap: dict[str, Any] = {"content_type": content_type}
    if content is not None:
        encap["content"] = core.ParsableOctetString(content)
    signed: dict[str, Any] = {
        "version": "v1" if content_type == "data" else "v3",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest_name})],
        "encap_content_info": encap,
        "signer_infos": [signer_info],
    }
    if include_certificates:
        signed["certificates"] = [to_asn1(c) for c in [signer, *chain]]
    return cms.ContentInfo({"content_type": "signed_data",
                            "content": cms.SignedData(signed)}), signature


def time_stamp_attribute(token_der: bytes) -> cms.CMSAttribute:
    """id-aa-signatureTimeStampToken carrying a DER TimeStampToken."""
    return cms.CMSAttribute({"type": "signature_time_stamp_token",
                             "values": [cms.ContentInfo.load(token_der)]})


def signed_attrs_bytes(signer_info: cms.SignerInfo) -> bytes:
    """The DER the signature covers: the signed attributes with a SET OF tag (RFC 5652 5.4)."""
    raw = signer_info["signed_attrs"].dump()
    return b"\x31" + raw[1:]


def stream_digest(path: str, digest_name: str, chunk: int = 1 << 20,
                  progress: Any = None) -> tuple[bytes, int, str]:
    """Digest a file in chunks (never read whole); also its size and SHA-256 for the audit.

    Only a regular file (fileio.open_regular): any size, but never a FIFO or a device.
    """
    from hsm_ca.fileio import open_regular

    h = hashlib.new(digest_name)
    sha = hashlib.sha256()
    size = 0
    with open_regular(path) as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
            if digest_name != "sha256":
                sha.update(block)
            size += len(block)
            if progress is not None:
                progress(len(block))
    return h.digest(), size, (h.hexdigest() if digest_name == "sha256" else sha.hexdigest())
