"""The OCSP responder (RFC 6960, RFC 5019 profile).

Answers come from the database, never from a CRL. Requests without a nonce
get a pre-signed response from a cache (RFC 5019 style), so the HSM signs at
most once per certificate per cache interval; a revocation bumps the store's
revocation epoch, which empties the cache at the next request, in this process
or any other. Requests with a nonce are signed fresh so the nonce can be
echoed. Every signature is one audit record.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hsm_ca.engine.keys import as_private_key
from hsm_ca.errors import HsmCaError
from hsm_ca.revocation import reason_flag
from hsm_ca.serials import format_serial
from hsm_ca.x509util import signature_hash_for

if TYPE_CHECKING:
    from hsm_ca.authority import Authority, CaRecord

MAX_NONCE = 128
MAX_REQUEST = 16 * 1024
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


MALFORMED = _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
INTERNAL_ERROR = _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER = _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)


@dataclass
class OcspAnswer:
    """A DER OCSPResponse plus what HTTP caching headers need."""

    der: bytes
    cacheable: bool = False
    this_update: _dt.datetime | None = None
    next_update: _dt.datetime | None = None
    status: str = "malformed"


@dataclass
class _Signer:
    ca: CaRecord
    key: Any
    hash_alg: hashes.HashAlgorithm | None
    responder_cert: x509.Certificate | None
    label: str
    row_serial: str | None = None  # the responder row this choice was made from


class OcspResponder:
    """Answers OCSP requests for every CA of a home."""

    def __init__(
        self,
        authority: Authority,
        *,
        cache_seconds: int | None = None,
        validity: _dt.timedelta = _dt.timedelta(hours=24),
    ) -> None:
        self.authority = authority
        self.cache_seconds = (
            authority.config.ocsp_cache_seconds if cache_seconds is None else cache_seconds
        )
        self.validity = validity
        self._ids: dict[tuple[str, bytes, bytes], str] = {}
        self._ca_count: Any = None
        self._signers: dict[str, _Signer] = {}
        self._cache: dict[tuple[str, int], tuple[float, OcspAnswer]] = {}
        self._epoch = -1
        self.signatures = 0

    # -------------------------------------------------------------- lookup
    def _refresh_ids(self) -> None:
        # one cheap query per request; the CAs are re-read only when their set changed
        marker = self.authority.store.conn.execute(
            "SELECT count(*), max(created) || max(name) FROM cas").fetchone()
        if marker == self._ca_count:
            return
        cas = self.authority.list_cas()
        ids: dict[tuple[str, bytes, bytes], str] = {}
        for ca in cas:
            name_der = ca.certificate.subject.public_bytes()
            key_bits = _public_key_bits(ca.certificate)
            for alg in _HASHES:
                ids[(alg, hashlib.new(alg, name_der).digest(), hashlib.new(alg, key_bits).digest())] = ca.name
        self._ids = ids
        self._ca_count = marker

    def _find_ca(self, req: ocsp.OCSPRequest) -> str | None:
        key = (req.hash_algorithm.name, req.issuer_name_hash, req.issuer_key_hash)
        self._refresh_ids()
        return self._ids.get(key)

    def _signer(self, ca_name: str) -> _Signer:
        """The CA key, or its delegated responder while that certificate is good.

        The responder row is read on every signature (one indexed SELECT), so a
        responder issued, renewed or revoked by another process takes effect at
        once in a running server.
        """
        authority = self.authority
        row = authority.store.get_responder(ca_name)
        signer = self._signers.get(ca_name)
        now = _dt.datetime.now(_dt.UTC)
        if signer is not None:
            wanted = row["serial"] if row is not None else None
            if signer.row_serial == wanted and (
                signer.responder_cert is None or signer.responder_cert.not_valid_after_utc > now
            ):
                return signer
        from hsm_ca.authority import CertificateAuthority

        ca = authority.get_ca(ca_name)
        responder_cert = None
        if row is not None:
            cert = x509.load_pem_x509_certificate(row["pem"].encode())
            status = authority.store.status_of(ca_name, row["serial"])
            if cert.not_valid_after_utc > now and status is not None and status[0] == "valid":
                responder_cert = cert
        if responder_cert is not None:
            handle = authority.engine().get_key(row["key_label"])  # type: ignore[index]
            signer = _Signer(ca, as_private_key(handle), signature_hash_for(handle.key_type),
                             responder_cert, handle.label, row["serial"])  # type: ignore[index]
        else:
            handle = CertificateAuthority(authority, ca).key_handle()
            signer = _Signer(ca, as_private_key(handle), signature_hash_for(ca.key_type), None,
                             handle.label, row["serial"] if row is not None else None)
        self._signers[ca_name] = signer
        return signer

    # ------------------------------------------------------------- respond
    def respond(self, data: bytes, ca_hint: str | None = None) -> OcspAnswer:
        """Always a DER OCSPResponse: malformed input gets malformedRequest, never an exception."""
        if not data or len(data) > MAX_REQUEST:
            return OcspAnswer(MALFORMED)
        try:
            req = ocsp.load_der_ocsp_request(data)
            serial = req.serial_number
            alg = req.hash_algorithm.name
            nonce = None
            for ext in req.extensions:
                if isinstance(ext.value, x509.OCSPNonce):
                    nonce = ext.value.nonce
        except Exception:  # cryptography raises ValueError and friends for any bad DER
            return OcspAnswer(MALFORMED)
        if alg not in _HASHES or serial <= 0:
            return OcspAnswer(MALFORMED)
        if nonce is not None and not 1 <= len(nonce) <= MAX_NONCE:
            return OcspAnswer(MALFORMED)
        ca_name = self._find_ca(req)
        if ca_name is None or (ca_hint is not None and ca_hint != ca_name):
            return OcspAnswer(UNAUTHORIZED, status="unauthorized")
        try:
            return self._answer(req, ca_name, nonce)
        except HsmCaError:
            return OcspAnswer(TRY_LATER, status="tryLater")

    def _answer(self, req: ocsp.OCSPRequest, ca_name: str, nonce: bytes | None) -> OcspAnswer:
        store = self.authority.store
        epoch = store.revocation_epoch()
        if epoch != self._epoch:  # something was revoked: cached answers and signers may be stale
            self._cache.clear()
            self._signers.clear()
            self._epoch = epoch
        key = (ca_name, req.serial_number)
        now_mono = time.monotonic()
        if nonce is None and self.cache_seconds:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now_mono:
                return hit[1]
        serial = format_serial(req.serial_number)
        status_row = store.status_of(ca_name, serial)
        now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
        next_update = now + self.validity
        revocation_time = None
        reason = None
        if status_row is None:
            cert_status, label = ocsp.OCSPCertStatus.UNKNOWN, "unknown"
        elif status_row[0] == "revoked":
            cert_status, label = ocsp.OCSPCertStatus.REVOKED, "revoked"
            revocation_time = _dt.datetime.fromisoformat(status_row[1])  # type: ignore[arg-type]
            reason = reason_flag(status_row[2]) if status_row[2] != "unspecified" else None
        else:
            cert_status, label = ocsp.OCSPCertStatus.GOOD, "good"
        signer = self._signer(ca_name)
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=req.issuer_name_hash, issuer_key_hash=req.issuer_key_hash,
            serial_number=req.serial_number, algorithm=req.hash_algorithm,
            cert_status=cert_status, this_update=now, next_update=next_update,
            revocation_time=revocation_time, revocation_reason=reason,
        )
        if signer.responder_cert is not None:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.responder_cert)
            builder = builder.certificates([signer.responder_cert])
        else:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.ca.certificate)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        response = builder.sign(signer.key, signer.hash_alg)
        der = response.public_bytes(serialization.Encoding.DER)
        self.signatures += 1
        self.authority.audit.append(
            self.authority.actor(), "ocsp", "signed", ca=ca_name, key_label=signer.label,
            serial=serial, object_sha256=hashlib.sha256(der).hexdigest(),
            detail=f"status={label}" + (" nonce" if nonce is not None else ""),
        )
        self.authority.maybe_checkpoint()
        answer = OcspAnswer(der, nonce is None, now, next_update, label)
        if nonce is None and self.cache_seconds:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = (now_mono + self.cache_seconds, answer)
        return answer


def _public_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, what issuerKeyHash is computed over."""
    from asn1crypto import x509 as asn1_x509

    spki = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return bytes(spki["tbs_certificate"]["subject_public_key_info"]["public_key"].contents[1:])
