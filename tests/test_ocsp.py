"""The OCSP responder's decisions, at the library level (HTTP is in tests/interop)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import USER_PIN, Cli, make_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsm_ca.authority import Authority
from hsm_ca.config import load_config
from hsm_ca.ocsp import OcspResponder


@pytest.fixture
def responder(pki: Cli) -> Iterator[tuple[OcspResponder, Cli]]:
    auth = Authority(load_config(pki.home), pin=lambda: USER_PIN)
    yield OcspResponder(auth, cache_seconds=300), pki
    auth.close()


def _issue(cli: Cli, name: str) -> x509.Certificate:
    p = cli.home.parent / f"{name}.csr"
    p.write_bytes(make_csr(cn=None, dns=[f"{name}.example.com"]))
    info = json.loads(cli.ok("--json", "sign", str(p), "--ca", "issuing", "--profile", "tls-server").out)
    return x509.load_pem_x509_certificate(info["pem"].encode())


def _issuer(cli: Cli, name: str = "issuing") -> x509.Certificate:
    return x509.load_pem_x509_certificate(cli.ok("ca", "export", name).out.encode())


def _request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None,
             alg: hashes.HashAlgorithm | None = None) -> bytes:
    b = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, alg or hashes.SHA1())
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _by_serial(serial: int, issuer: x509.Certificate) -> bytes:
    import hashlib

    from hsm_ca.ocsp import _public_key_bits

    name_hash = hashlib.sha1(issuer.subject.public_bytes()).digest()
    key_hash = hashlib.sha1(_public_key_bits(issuer)).digest()
    req = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, hashes.SHA1()).build()
    return req.public_bytes(serialization.Encoding.DER)


def test_good_revoked_unknown_and_signature(responder: tuple[OcspResponder, Cli]) -> None:
    r, cli = responder
    issuer = _issuer(cli)
    good, bad = _issue(cli, "good"), _issue(cli, "bad")
    cli.ok("revoke", format(bad.serial_number, "x"), "--reason", "keyCompromise")
    for cert, status in ((good, ocsp.OCSPCertStatus.GOOD), (bad, ocsp.OCSPCertStatus.REVOKED)):
        resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer, alg=hashes.SHA256())).der)
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.certificate_status == status and resp.serial_number == cert.serial_number
        issuer.public_key().verify(  # type: ignore[call-arg]
            resp.signature, resp.tbs_response_bytes,
            __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(
                resp.signature_hash_algorithm),
        )
        assert resp.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(
            issuer.public_key()).digest  # type: ignore[arg-type]
        assert resp.next_update_utc is not None and resp.next_update_utc > resp.this_update_utc
    resp = ocsp.load_der_ocsp_response(r.respond(_request(bad, issuer)).der)
    assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    resp = ocsp.load_der_ocsp_response(r.respond(_by_serial(0x1234567890ABCDEF, issuer)).der)
    assert resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    # the root's CRL scope: the intermediate is good for the root, unknown for the issuing CA
    root = _issuer(cli, "root")
    resp = ocsp.load_der_ocsp_response(r.respond(_request(issuer, root)).der)
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    resp = ocsp.load_der_ocsp_response(r.respond(_by_serial(issuer.serial_number, issuer)).der)
    assert resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


def test_nonce_echoed_and_limits(responder: tuple[OcspResponder, Cli]) -> None:
    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "n")
    for size in (1, 16, 32, 128):
        nonce = os.urandom(size)
        resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer, nonce)).der)
        assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer, os.urandom(129))).der)
    assert resp.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_cache_spares_the_hsm_and_revocation_invalidates_it(
    responder: tuple[OcspResponder, Cli],
) -> None:
    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "c")
    req = _request(cert, issuer)
    first = r.respond(req)
    assert r.respond(req).der == first.der and r.signatures == 1
    r.respond(_request(cert, issuer, b"nonce-123"))  # a nonce always means a fresh signature
    assert r.signatures == 2
    # revoke through the CLI: another connection, as another process would
    cli.ok("revoke", format(cert.serial_number, "x"))
    resp = ocsp.load_der_ocsp_response(r.respond(req).der)
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED and r.signatures == 3
    signed = [x for x in json.loads(cli.ok("--json", "audit", "list").out) if x["action"] == "ocsp"]
    assert len(signed) == 3 and all(x["outcome"] == "signed" for x in signed)


def test_delegated_responder_signs_and_is_included(responder: tuple[OcspResponder, Cli]) -> None:
    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "d")
    info = json.loads(cli.ok("--json", "ca", "ocsp-responder", "issuing").out)
    r2 = OcspResponder(r.authority, cache_seconds=0)
    resp = ocsp.load_der_ocsp_response(r2.respond(_request(cert, issuer)).der)
    assert len(resp.certificates) == 1
    delegated = resp.certificates[0]
    assert format(delegated.serial_number, "x") == info["serial"]
    assert delegated.extensions.get_extension_for_class(x509.OCSPNoCheck)
    eku = delegated.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
    delegated.verify_directly_issued_by(issuer)
    assert resp.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(
        delegated.public_key()).digest  # type: ignore[arg-type]
    keys = {k["label"]: k["used_by"] for k in json.loads(cli.ok("--json", "keys", "list").out)}
    assert keys["ocsp-issuing"] == "ocsp:issuing"


def test_unauthorized_and_malformed(responder: tuple[OcspResponder, Cli], tmp_path: Path) -> None:
    r, cli = responder
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    import datetime as dt

    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "stranger")])
    now = dt.datetime.now(dt.UTC)
    stranger = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(99).not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    resp = ocsp.load_der_ocsp_response(r.respond(_request(stranger, stranger)).der)
    assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    cert = _issue(cli, "m")
    good = _request(cert, _issuer(cli))
    resp = ocsp.load_der_ocsp_response(r.respond(good, "root").der)  # wrong CA in the URL
    assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    for garbage in (b"", b"\x30", good[:-3], good + b"\x00", os.urandom(200), b"\x30\x03\x02\x01\x00"):
        resp = ocsp.load_der_ocsp_response(r.respond(garbage).der)
        assert resp.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), flips=st.lists(st.integers(0, 10_000), max_size=4))
def test_fuzzed_requests_always_get_an_ocsp_response(
    responder: tuple[OcspResponder, Cli], data: bytes, flips: list[int]
) -> None:
    r, cli = responder
    # the fixture lives across examples, so the valid request is made once and kept on it
    template = getattr(r, "_fuzz_template", None)
    if template is None:
        template = _request(_issue(cli, "fz"), _issuer(cli))
        r._fuzz_template = template  # type: ignore[attr-defined]
    mutated = bytearray(template)
    for f in flips:
        mutated[f % len(mutated)] ^= 0xFF
    for candidate in (data, bytes(mutated)):
        answer = r.respond(candidate)
        ocsp.load_der_ocsp_response(answer.der)  # always a parseable OCSP response


def test_a_never_issued_serial_is_never_cached(responder: tuple[OcspResponder, Cli]) -> None:
    """Its answer costs a rationed signature each time; caching it let anyone fill the cache."""
    r, cli = responder
    req = _by_serial(int.from_bytes(os.urandom(12)) | 1, _issuer(cli))
    for _ in range(3):
        resp = ocsp.load_der_ocsp_response(r.respond(req).der)
        assert resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    assert r.signatures == 3 and not r._cache


def test_never_issued_serials_cannot_push_issued_answers_out(pki: Cli) -> None:
    """The cache was cleared at 100,000 entries: fill it with never-issued serials (one token
    each, from many addresses) and every issued certificate was signed afresh, unrationed."""
    from hsm_ca.ocsp import TokenBuckets

    auth = Authority(load_config(pki.home), pin=lambda: USER_PIN)
    try:
        issuer = _issuer(pki)
        certs = [_issue(pki, f"kept{i}") for i in range(4)]
        r = OcspResponder(auth, cache_seconds=300, max_cached=3,
                          limiter=TokenBuckets(0.0, 1))  # one signature per address, ever
        first = r.respond(_request(certs[0], issuer), client="192.0.2.1")
        for i in range(10):  # ten addresses, one never-issued serial each: more than the cache
            answer = r.respond(_by_serial(int.from_bytes(os.urandom(12)) | 1, issuer),
                               client=f"198.51.100.{i}")
            assert ocsp.load_der_ocsp_response(answer.der).certificate_status == \
                ocsp.OCSPCertStatus.UNKNOWN
        signed = r.signatures
        assert r.respond(_request(certs[0], issuer), client="192.0.2.1").der == first.der
        assert r.signatures == signed  # still the cached answer

        # a cache full of issued answers is not cleared for room: a fill beyond it is rationed
        r = OcspResponder(auth, cache_seconds=300, max_cached=3, limiter=TokenBuckets(0.0, 0))
        answers = [r.respond(_request(c, issuer), client="192.0.2.9") for c in certs[:3]]
        assert r.signatures == 3  # filling the cache needs no token
        over = ocsp.load_der_ocsp_response(r.respond(_request(certs[3], issuer),
                                                     client="192.0.2.9").der)
        assert over.response_status == ocsp.OCSPResponseStatus.TRY_LATER and r.signatures == 3
        for cert, answer in zip(certs[:3], answers, strict=True):
            assert r.respond(_request(cert, issuer), client="192.0.2.9").der == answer.der
        assert r.signatures == 3 and r.limited == 1
    finally:
        auth.close()


def test_expired_answers_behind_live_ones_do_not_keep_the_cache_full(pki: Cli) -> None:
    """An answer kept shorter (its signer expires sooner) sits behind longer-lived ones, and
    only the front was dropped when it expired: dead answers could fill the cache and make
    every fill beyond it rationed. A full cache now sweeps its dead answers (once a second)."""
    import time

    from hsm_ca.ocsp import TokenBuckets

    auth = Authority(load_config(pki.home), pin=lambda: USER_PIN)
    try:
        issuer = _issuer(pki)
        certs = [_issue(pki, f"swept{i}") for i in range(4)]
        r = OcspResponder(auth, cache_seconds=300, max_cached=3, limiter=TokenBuckets(0.0, 0))
        for c in certs[:3]:
            r.respond(_request(c, issuer), client="192.0.2.9")
        keys = list(r._cache)
        for k in keys[1:]:  # the two behind the front expired (as if their signer had)
            r._cache[k] = (time.monotonic() - 1, r._cache[k][1])
        answer = ocsp.load_der_ocsp_response(
            r.respond(_request(certs[3], issuer), client="192.0.2.9").der)
        assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD and len(r._cache) == 2
    finally:
        auth.close()


def test_cached_answer_matches_the_requests_certid_exactly(
    responder: tuple[OcspResponder, Cli],
) -> None:
    """Issue 14 finding 3: the cache was keyed by (CA, serial). A SHA-384 request for a
    revoked certificate primed it, and SHA-1/SHA-256 requests then got that answer, whose
    CertID is not theirs: openssl says "No Status found" and a soft-failing client accepts
    the revoked certificate. Every answer must name the CertID it was asked with."""
    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "certid")
    cli.ok("revoke", format(cert.serial_number, "x"), "--reason", "keyCompromise")
    algorithms = (hashes.SHA384(), hashes.SHA1(), hashes.SHA256(), hashes.SHA512())
    for _round in range(2):  # the second round is answered from the cache
        for alg in algorithms:
            req = ocsp.load_der_ocsp_request(_request(cert, issuer, alg=alg))
            resp = ocsp.load_der_ocsp_response(r.respond(req.public_bytes(
                serialization.Encoding.DER)).der)
            assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            assert (resp.hash_algorithm.name, resp.issuer_name_hash, resp.issuer_key_hash,
                    resp.serial_number) == (req.hash_algorithm.name, req.issuer_name_hash,
                                            req.issuer_key_hash, req.serial_number)
            assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert r.signatures == len(algorithms)  # one per CertID; the cache still spares the HSM


def test_a_revoked_delegated_responder_stops_signing(responder: tuple[OcspResponder, Cli]) -> None:
    """Issue 14, "tests that let such bugs through": with the responder's status check
    removed, a revoked delegated responder kept signing and the whole suite passed. Once
    revoked, the CA key answers: in the running responder (whose signer and answers were
    cached) and in a new one."""
    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "rr")
    info = json.loads(cli.ok("--json", "ca", "ocsp-responder", "issuing").out)
    resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer)).der)
    assert [format(c.serial_number, "x") for c in resp.certificates] == [info["serial"]]
    cli.ok("revoke", info["serial"], "--reason", "keyCompromise")  # another connection
    ca_key_hash = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest  # type: ignore[arg-type]
    for fresh in (r, OcspResponder(r.authority, cache_seconds=300)):
        for nonce in (None, b"nonce-after-revocation"):
            resp = ocsp.load_der_ocsp_response(fresh.respond(_request(cert, issuer, nonce)).der)
            assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            assert resp.certificates == [] and resp.responder_key_hash == ca_key_hash
            assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD


def test_next_update_and_the_cache_end_with_the_signers_certificate(pki: Cli) -> None:
    """An answer must not vouch past its signer's expiry (as a CRL's nextUpdate is capped at
    the CA's): not past a delegated responder's certificate, nor past the CA's; and it is
    not served from the cache after that either (clients reject an expired signer)."""
    import datetime as dt
    import time

    auth = Authority(load_config(pki.home), pin=lambda: USER_PIN)
    try:
        r = OcspResponder(auth, cache_seconds=10 * 86400, validity=dt.timedelta(days=3))
        issuer, cert = _issuer(pki), _issue(pki, "short-signer")
        info = json.loads(pki.ok("--json", "ca", "ocsp-responder", "issuing", "--days", "1").out)
        resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer)).der)
        responder_cert = resp.certificates[0]
        assert format(responder_cert.serial_number, "x") == info["serial"]
        assert resp.next_update_utc == responder_cert.not_valid_after_utc
        left = (responder_cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
        (expires, _answer), = r._cache.values()
        assert expires - time.monotonic() <= left + 1  # not the ten days asked for

        pki.ok("ca", "create-intermediate", "short", "--parent", "root",
               "--subject", "CN=Short-lived CA,O=Test", "--days", "2")
        short = _issuer(pki, "short")
        resp = ocsp.load_der_ocsp_response(r.respond(_by_serial(0xABCDEF0123, short)).der)
        assert resp.certificates == [] and resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
        assert resp.next_update_utc == short.not_valid_after_utc
    finally:
        auth.close()


def test_an_empty_nonce_is_malformed(responder: tuple[OcspResponder, Cli]) -> None:
    """RFC 8954: a nonce is 1 to 32 octets (128 accepted here); an empty one is malformed, not
    an answer signed afresh to echo nothing (the lower bound had no test)."""
    r, cli = responder
    resp = ocsp.load_der_ocsp_response(r.respond(_request(_issue(cli, "e"), _issuer(cli), b"")).der)
    assert resp.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST and r.signatures == 0


def _clock_ahead(monkeypatch: pytest.MonkeyPatch, days: int) -> None:
    """Move hsm_ca.ocsp's clock (only its) ``days`` ahead."""
    import datetime as dt
    import types

    import hsm_ca.ocsp

    class Ahead(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return dt.datetime.now(tz) + dt.timedelta(days=days)

    monkeypatch.setattr(hsm_ca.ocsp, "_dt", types.SimpleNamespace(
        datetime=Ahead, UTC=dt.UTC, timedelta=dt.timedelta))


def test_an_expired_delegated_responder_stops_signing(
    responder: tuple[OcspResponder, Cli], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the responder's certificate has expired the CA key answers, in a responder that
    had cached the delegated signer and in a new one (neither expiry check had a test)."""


    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "ex")
    cli.ok("ca", "ocsp-responder", "issuing", "--days", "1")
    resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer, b"n1")).der)
    assert len(resp.certificates) == 1  # the delegated responder signs, and is cached
    _clock_ahead(monkeypatch, 2)
    ca_key_hash = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest  # type: ignore[arg-type]
    for fresh in (r, OcspResponder(r.authority, cache_seconds=300)):
        resp = ocsp.load_der_ocsp_response(fresh.respond(_request(cert, issuer, b"n2")).der)
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.certificates == [] and resp.responder_key_hash == ca_key_hash


def test_an_expired_ca_answers_unauthorized_without_signing(
    responder: tuple[OcspResponder, Cli], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the CA's notAfter nothing is signed: no answer to cache, so each request would
    otherwise cost an HSM signature and an audit row, unrationed."""


    r, cli = responder
    issuer, cert = _issuer(cli), _issue(cli, "old")
    _clock_ahead(monkeypatch, 40000)
    before = r.signatures
    for nonce in (None, None, None, b"n1"):
        resp = ocsp.load_der_ocsp_response(r.respond(_request(cert, issuer, nonce)).der)
        assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert r.signatures == before
