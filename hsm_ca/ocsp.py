"""The OCSP responder (RFC 6960, RFC 5019 profile).

Answers come from the database, never from a CRL, and only where the database
agrees with the audit trail: each process proves a CA's revoked rows against
the trail once (hsm_ca.trailstate) and then follows the trail record by record,
so a revoked certificate whose row was edited back to valid is answered
``internalError``, never good, and a row the CA's key never signed is never
vouched for. Requests without a nonce get a pre-signed response from a cache
(RFC 5019 style), so the HSM signs at most once per certificate per cache
interval and CertID hash (SHA-1, SHA-256, SHA-384, SHA-512: an answer names the
CertID it was asked with, so each is its own cache entry); a revocation
recorded in the trail empties the cache at the next request, in this process
or any other. Requests with a nonce are signed fresh
so the nonce can be echoed. Every signature is one audit record.

A fresh signature costs an HSM operation and a durable audit row, so a client
must not be able to ask for them without bound. With ``ocsp_nonces = "ignore"``
nonces are not echoed at all (RFC 5019 section 4 allows it) and every answer
comes from the cache. With ``"honor"`` (the default) each client address (IPv6
by /56) has a token bucket, ``ocsp_nonce_rate`` per second up to
``ocsp_nonce_burst``, and all clients share one more,
``ocsp_nonce_global_rate`` up to ``ocsp_nonce_global_burst``, so the database
grows at a bounded rate however many addresses ask. Any signature the cache
will not share takes a token from both: a nonce, a serial this CA never issued
(whose answer is never cached), or a fill of a cache that is full. Over the
limit a nonce request gets the cached answer without the nonce, which RFC
6960/8954 clients accept as a valid response (openssl warns "no nonce in
response" and verifies it; browsers send no nonce at all), whereas ``tryLater``
makes them fail or soft-fail; only what has no shared answer gets ``tryLater``.
Answers from the cache, and filling it for an issued certificate (at most one
signature per certificate and CertID hash per cache interval), are never
limited. The buckets live in this process's memory: they bound signatures per
``serve`` process, not per home.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict
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

_log = logging.getLogger("hsm_ca.ocsp")

if TYPE_CHECKING:
    from hsm_ca.authority import Authority, CaRecord

MAX_NONCE = 128
MAX_REQUEST = 16 * 1024
MAX_CACHED = 100_000  # cached answers (issued certificates asked for within one cache interval)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


_CacheKey = tuple[str, str, bytes, bytes, int]


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
    """Token buckets for fresh OCSP signatures: one per client address, and one for all.

    Each client (an IPv4 address, an IPv6 /56) gets ``rate`` tokens per second
    up to ``burst``; with ``global_burst`` set, every token also comes out of one
    shared bucket (``global_rate`` per second up to ``global_burst``), so the
    signatures, and the audit rows they write, grow at a bounded rate however
    many addresses ask. A request needs a token from both; a refused request
    spends neither.

    Memory is bounded by ``max_clients`` buckets, kept in least-recently-used
    order. Dropping a bucket must never give its client tokens back, or a flood
    of new addresses would refill a victim (clearing them all did exactly that).
    So every client without a bucket is treated as being in one shared *absent*
    state: a lower bound on what any such client would hold had its bucket been
    kept. A never-seen client holds a full bucket, so the bound starts full; an
    evicted bucket lowers it to at most its own level, and both refill at the
    same rate, so the bound stays below every evicted client's real level, and
    a new bucket starts from it. The least-recently-used bucket is the one
    evicted (even a refused request touches its bucket), so a client that keeps
    asking loses its bucket only after ``max_clients`` other addresses asked since
    its last request, and even then stays limited through the bound; in the
    common case the evicted bucket has refilled and the bound is unchanged. Only
    a flood of more than ``max_clients`` addresses within one refill period
    lowers it, and then new clients start with fewer tokens, which is the limit
    doing its work (they still get the cached answer without a nonce).
    """

    def __init__(self, rate: float, burst: int, *, global_rate: float = 0.0,
                 global_burst: int | None = None, max_clients: int = 65_536,
                 clock: Any = time.monotonic) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.rate = rate
        self.burst = burst
        self.global_rate = global_rate
        self.global_burst = global_burst
        self.max_clients = max_clients
        self.clock = clock
        now = clock()
        # key -> (tokens, at), least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._absent = (float(burst), now)  # the bound for every client without a bucket
        self._global = (float(global_burst or 0), now)

    @staticmethod
    def key(client: str) -> str:
        """The unit rationed: an IPv4 address, or an IPv6 /56.

        One IPv6 host usually holds a whole /64, and one subscriber a /56 (RIPE-690's
        recommendation for end sites; many ISPs delegate exactly that), so counting
        /64s would give one subscriber 256 rations. A /48 would lump together the
        customers of an ISP that hands out /56s; the global bucket bounds what a
        holder of a /48 can do.
        """
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 56), strict=False))
        return str(address)

    @staticmethod
    def _level(bucket: tuple[float, float], now: float, rate: float, burst: float) -> float:
        tokens, at = bucket
        return min(float(burst), tokens + max(0.0, now - at) * rate)

    def take(self, client: str) -> bool:
        """Spend one token of ``client``'s bucket (and of the global one); False if either is empty."""
        now = self.clock()
        key = self.key(client)
        bucket = self._buckets.get(key)
        tokens = self._level(bucket or self._absent, now, self.rate, self.burst)
        shared = (self._level(self._global, now, self.global_rate, self.global_burst)
                  if self.global_burst is not None else float("inf"))
        granted = tokens >= 1 and shared >= 1
        if bucket is not None or granted:
            if bucket is None:
                while len(self._buckets) >= self.max_clients:
                    self._evict(now)
            # a refused client without a bucket needs none: the absent bound already holds it
            self._buckets[key] = (tokens - 1 if granted else tokens, now)
            self._buckets.move_to_end(key)
        if self.global_burst is not None:
            self._global = (shared - 1 if granted else shared, now)
        return granted

    def _evict(self, now: float) -> None:
        _key, bucket = self._buckets.popitem(last=False)  # the least recently used
        self._absent = (min(self._level(bucket, now, self.rate, self.burst),
                            self._level(self._absent, now, self.rate, self.burst)), now)


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
        max_cached: int = MAX_CACHED,
    ) -> None:
        config = authority.config
        self.authority = authority
        self.cache_seconds = config.ocsp_cache_seconds if cache_seconds is None else cache_seconds
        self.nonces = config.ocsp_nonces if nonces is None else nonces
        self.limiter = limiter or TokenBuckets(
            config.ocsp_nonce_rate, config.ocsp_nonce_burst,
            global_rate=config.ocsp_nonce_global_rate,
            global_burst=config.ocsp_nonce_global_burst)
        self.limited = 0  # requests answered without a fresh signature because of the limit
        self.validity = validity
        self._ids: dict[tuple[str, bytes, bytes], str] = {}
        self._ca_count: Any = None
        self._signers: dict[str, _Signer] = {}
        # the whole CertID (CA, hash algorithm, issuer name hash, issuer key hash, serial)
        # -> (expires, answer), for issued certificates only, in expiry order (but for
        # answers kept shorter because their signer expires sooner). An answer
        # names the CertID it was asked with, so one asked by SHA-384 is no answer to a
        # SHA-1 request (openssl: "No Status found"; a soft-failing client then accepts).
        self._cache: OrderedDict[_CacheKey, tuple[float, OcspAnswer]] = OrderedDict()
        self.max_cached = max_cached
        self._revoked_counts: dict[str, int] = {}
        self._next_sweep = 0.0
        # serial -> SHA-256 of a certificate whose signature verified with its CA's key
        # (bounded; a hit costs nothing, a miss one signature verification)
        self._verified: OrderedDict[str, str] = OrderedDict()
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
        # the CA's certificate is a database row: its key must be the HSM's (else Tampered),
        # so answers never name a CA certificate someone swapped in
        authority.issuer_checker()(ca_name)
        responder_cert = None
        if row is not None:
            cert = x509.load_pem_x509_certificate(row["pem"].encode())
            status = authority.certificate_status(ca_name, row["serial"])
            if cert.not_valid_after_utc > now and status == "valid" \
                    and self._genuine(ca, cert, row["serial"]):
                responder_cert = cert
        if responder_cert is not None:
            handle = authority.engine().get_key(row["key_label"])  # type: ignore[index]
            if _spki(handle.public_key()) != _spki(responder_cert.public_key()):
                from hsm_ca.errors import Tampered

                raise Tampered(f"the OCSP responder certificate of CA {ca_name!r} does not "
                               "carry its HSM key: the database was edited")
            signer = _Signer(ca, as_private_key(handle), signature_hash_for(handle.key_type),
                             responder_cert, handle.label, row["serial"])  # type: ignore[index]
        else:
            handle = CertificateAuthority(authority, ca).key_handle()
            signer = _Signer(ca, as_private_key(handle), signature_hash_for(ca.key_type), None,
                             handle.label, row["serial"] if row is not None else None)
        self._signers[ca_name] = signer
        return signer

    def _genuine(self, ca: CaRecord, row: Any, serial: str) -> bool:
        """Whether the row's certificate was signed by the CA's key (a forged row is not).

        ``row`` is a certificates row (with ``pem`` and ``sha256``) or a parsed
        certificate. The CA's certificate is proven to carry its HSM key when
        the signer is made, so only the HSM can have made a signature that
        verifies here.
        """
        from hsm_ca.trailstate import check_certificate
        from hsm_ca.x509util import pem_sha256

        if isinstance(row, x509.Certificate):
            cert, sha = row, hashlib.sha256(row.public_bytes(serialization.Encoding.DER)).hexdigest()
        else:
            sha = row["sha256"]
            if self._verified.get(serial) == sha:
                return True
            if not row["pem"] or pem_sha256(row["pem"]) != sha:
                return False
            cert = x509.load_pem_x509_certificate(row["pem"].encode())
        if cert.serial_number != int(serial, 16) or check_certificate(cert, ca.certificate):
            return False
        self._verified[serial] = sha
        self._verified.move_to_end(serial)
        while len(self._verified) > self.max_cached:
            self._verified.popitem(last=False)
        return True

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

    def _cached(self, key: _CacheKey, now_mono: float) -> OcspAnswer | None:
        hit = self._cache.get(key)
        return hit[1] if hit is not None and hit[0] > now_mono else None

    def _has_room(self, key: _CacheKey, now_mono: float) -> bool:
        """Whether an answer for ``key`` can be cached now (expired answers are dropped first)."""
        while self._cache:
            oldest = next(iter(self._cache))
            if self._cache[oldest][0] > now_mono:
                break
            del self._cache[oldest]
        if key not in self._cache and len(self._cache) >= self.max_cached \
                and now_mono >= self._next_sweep:
            # answers kept shorter (their signer expires sooner) sit behind longer ones, so
            # expired ones can hide past the front: sweep them all, at most once a second
            # (a sweep walks the whole cache; a full cache of live answers is not swept
            # on every request)
            self._next_sweep = now_mono + 1.0
            for dead in [k for k, (expires, _) in self._cache.items() if expires <= now_mono]:
                del self._cache[dead]
        return key in self._cache or len(self._cache) < self.max_cached

    def _answer(self, req: ocsp.OCSPRequest, ca_name: str, nonce: bytes | None,
                client: str | None = None) -> OcspAnswer:
        """The answer; a signature that the cache will not share is rationed.

        Unlimited are only the answers the cache absorbs: a cache hit, and the one
        signature per issued certificate per cache interval that fills it. A nonce,
        a serial this CA never issued (its answer is not cached, so such serials can
        neither push issued certificates' answers out nor be asked for without
        bound), and a fill that finds the cache full of unexpired answers (the cache
        is never cleared to make room: clearing it let anyone who fills it have
        every certificate signed afresh) each take one token. Over the limit, a
        nonce request gets the shared answer without its nonce when there is one,
        and anything else ``tryLater``; either way it is counted once.
        """
        store = self.authority.store
        # the CA's revocations as the audit trail says (proven against the rows once per
        # process, then advanced record by record): an edited row cannot make a revoked
        # certificate good, here or in the cache
        view = self.authority.revocation_view(ca_name)
        count = len(view.revoked)
        if self._revoked_counts.setdefault(ca_name, count) != count:
            self._cache.clear()  # something was revoked: cached answers and signers may be stale
            self._signers.clear()
            self._revoked_counts[ca_name] = count
        key = (ca_name, req.hash_algorithm.name, req.issuer_name_hash, req.issuer_key_hash,
               req.serial_number)
        now_mono = time.monotonic()
        if nonce is None and self.cache_seconds and (hit := self._cached(key, now_mono)):
            return hit
        serial = format_serial(req.serial_number)
        status_row = store.certificate_row(ca_name, serial)
        shareable = status_row is not None and bool(self.cache_seconds)
        cacheable = shareable and self._has_room(key, now_mono)
        if (nonce is not None or not cacheable) and not self._may_sign(client):
            self.limited += 1
            if nonce is None or not cacheable:
                return OcspAnswer(TRY_LATER, status="tryLater")
            nonce = None  # over the limit: the shared answer, without the nonce
            if hit := self._cached(key, now_mono):
                return hit
        now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
        signer = self._signer(ca_name)
        if signer.ca.certificate.not_valid_after_utc <= now:
            # an expired CA vouches for nothing (it signs no CRL either); answering would
            # cost a signature and an audit row per request, with nothing to cache
            return OcspAnswer(UNAUTHORIZED, status="unauthorized")
        # Nothing is vouched for past the signing certificate's expiry or the CA's (as a
        # CRL's nextUpdate is capped), nor served from the cache after it: a client
        # rejects an answer whose signer has expired, and a soft-failing one accepts.
        ends = [signer.ca.certificate.not_valid_after_utc]
        if signer.responder_cert is not None:
            ends.append(signer.responder_cert.not_valid_after_utc)
        next_update = max(now, min(now + self.validity, *ends))
        keep = min(float(self.cache_seconds), (min(ends) - now).total_seconds())
        revocation_time = None
        reason = None
        rev = view.revoked.get(serial)
        problem = None
        if status_row is None:
            cert_status, label = ocsp.OCSPCertStatus.UNKNOWN, "unknown"
            if rev is not None:
                problem = "is recorded revoked but has no row"
        elif rev is not None:
            cert_status, label = ocsp.OCSPCertStatus.REVOKED, "revoked"
            if status_row["status"] != "revoked" or not rev.agrees(
                    status_row["revoked_at"], status_row["revocation_reason"],
                    status_row["invalidity_date"]):
                problem = f"is recorded revoked, but its row says {status_row['status']}"
            else:  # the row agrees with the trail: its time is the trail's (to the second)
                revocation_time = _dt.datetime.fromisoformat(status_row["revoked_at"])
                reason = reason_flag(rev.reason) if rev.reason != "unspecified" else None
        elif status_row["status"] != "valid":
            problem = f"is {status_row['status']} in its row, but no revocation is recorded"
        elif not self._genuine(signer.ca, status_row, serial):
            problem = "has a row whose certificate its CA's key never signed"
        else:
            cert_status, label = ocsp.OCSPCertStatus.GOOD, "good"
        if problem is not None:
            # nothing is signed for a row that disagrees with the trail: not good, and not
            # revoked either on the strength of an edited row
            _log.warning("OCSP: certificate %s of CA %s %s: the database was edited; "
                         "answering internalError", serial, ca_name, problem)
            return OcspAnswer(INTERNAL_ERROR, status="internalError")
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
        if nonce is None and shareable and keep > 0 and self._has_room(key, now_mono):
            self._cache.pop(key, None)  # re-inserted at the end: the order stays expiry order
            self._cache[key] = (now_mono + keep, answer)
        return answer


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _public_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, what issuerKeyHash is computed over."""
    from asn1crypto import x509 as asn1_x509

    spki = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return bytes(spki["tbs_certificate"]["subject_public_key_info"]["public_key"].contents[1:])
