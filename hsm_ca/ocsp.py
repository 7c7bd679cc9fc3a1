"""The OCSP responder (RFC 6960, RFC 5019 profile).

Answers come from the database, never from a CRL. Requests without a nonce
get a pre-signed response from a cache (RFC 5019 style), so the HSM signs at
most once per certificate per cache interval; a revocation bumps the store's
revocation epoch, which empties the cache at the next request, in this process
or any other. Requests with a nonce are signed fresh so the nonce can be
echoed. Every signature is one audit record.

A fresh signature costs an HSM operation and a durable audit row, so a client
must not be able to ask for them without bound. With ``ocsp_nonces = "ignore"``
nonces are not echoed at all (RFC 5019 section 4 allows it) and every answer
comes from the cache. With ``"honor"`` (the default) each client address (IPv6
by /64) has a token bucket, ``ocsp_nonce_rate`` per second up to
``ocsp_nonce_burst``: a nonce signature or a signature for a serial this CA
never issued takes a token. Over the limit a nonce request gets the cached
answer without the nonce, which RFC 6960/8954 clients accept as a valid
response (openssl warns "no nonce in response" and verifies it; browsers send
no nonce at all), whereas ``tryLater`` makes them fail or soft-fail; only a
never-issued serial over the limit gets ``tryLater`` (nothing is cached for it,
and nothing is lost by refusing). Answers from the cache, and filling the cache
for an issued certificate (at most one signature per certificate per cache
interval), are never limited. The buckets live in this process's memory: they
bound signatures per ``serve`` process, not per home.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
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


class TokenBuckets:
    """A token bucket per client address: ``rate`` tokens per second, at most ``burst``.

    IPv6 addresses are counted by their /64 (one host usually has a whole /64).
    Memory is bounded: past ``max_clients`` addresses, the buckets that have
    refilled (a client that stopped asking) are dropped, since a new bucket is
    exactly a full one; if all are in use, all are dropped, which can only
    grant more tokens, never fewer, for one refill period.
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 65_536,
                 clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @staticmethod
    def key(client: str) -> str:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def take(self, client: str) -> bool:
        """Spend one token of ``client``'s bucket; False when it is empty."""
        now = self.clock()
        key = self.key(client)
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_clients:
            self._prune(now)
        self._buckets[key] = (tokens - 1, now)
        return True

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_clients:
            self._buckets.clear()


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
        nonces: str | None = None,
        limiter: TokenBuckets | None = None,
    ) -> None:
        config = authority.config
        self.authority = authority
        self.cache_seconds = config.ocsp_cache_seconds if cache_seconds is None else cache_seconds
        self.nonces = config.ocsp_nonces if nonces is None else nonces
        self.limiter = limiter or TokenBuckets(config.ocsp_nonce_rate, config.ocsp_nonce_burst)
        self.limited = 0  # requests answered without a fresh signature because of the limit
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
    def respond(self, data: bytes, ca_hint: str | None = None,
                client: str | None = None) -> OcspAnswer:
        """Always a DER OCSPResponse: malformed input gets malformedRequest, never an exception.

        ``client`` is the network address fresh signatures are rationed by; None
        (an in-process caller, who holds the PIN anyway) is not rationed.
        """
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
        if self.nonces == "ignore":
            nonce = None
        ca_name = self._find_ca(req)
        if ca_name is None or (ca_hint is not None and ca_hint != ca_name):
            return OcspAnswer(UNAUTHORIZED, status="unauthorized")
        try:
            return self._answer(req, ca_name, nonce, client)
        except HsmCaError:
            return OcspAnswer(TRY_LATER, status="tryLater")

    def _may_sign(self, client: str | None) -> bool:
        return client is None or self.limiter.take(client)

    def _answer(self, req: ocsp.OCSPRequest, ca_name: str, nonce: bytes | None,
                client: str | None = None) -> OcspAnswer:
        store = self.authority.store
        epoch = store.revocation_epoch()
        if epoch != self._epoch:  # something was revoked: cached answers and signers may be stale
            self._cache.clear()
            self._signers.clear()
            self._epoch = epoch
        key = (ca_name, req.serial_number)
        now_mono = time.monotonic()
        if nonce is not None and not self._may_sign(client):
            nonce = None  # over the limit: the shared answer, without the nonce
            self.limited += 1
        if nonce is None and self.cache_seconds:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now_mono:
                return hit[1]
        serial = format_serial(req.serial_number)
        status_row = store.status_of(ca_name, serial)
        # filling the cache for an issued certificate is bounded by the certificates;
        # anything else (a never-issued serial, or no cache) is one signature per request
        if nonce is None and (status_row is None or not self.cache_seconds) \
                and not self._may_sign(client):
            self.limited += 1
            return OcspAnswer(TRY_LATER, status="tryLater")
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
