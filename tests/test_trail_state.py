"""Issue 14.1: the certificate table cannot be edited behind the audit trail's back.

An attacker here has write access to the database and nothing else (no PIN, no
HSM). Each test edits the database the way the outside review did, then asks
the three things that must not believe the edit: ``audit verify``, CRL signing
(and the checkpoint after it), and the OCSP responder.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import USER_PIN, Cli, issue_tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hsm_ca.audit import FIELDS, chain_value
from hsm_ca.authority import Authority
from hsm_ca.config import load_config
from hsm_ca.ocsp import OcspResponder


def _db(cli: Cli) -> sqlite3.Connection:
    return sqlite3.connect(cli.home / "ca.db", isolation_level=None)


def _append_forged(cli: Cli, **fields: Any) -> None:
    """Append a correctly chained record and move the head: all a database writer can do."""
    with _db(cli) as db:
        last = db.execute("SELECT seq, chain FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        record: dict[str, Any] = {k: None for k in FIELDS}
        record.update(seq=last[0] + 1, time="2026-01-01T00:00:00.000000Z", os_user="mallory",
                      outcome="issued", action="issue")
        record.update(fields)
        record["chain"] = chain_value(last[1], record)
        db.execute(f"INSERT INTO audit({', '.join(FIELDS)}, chain) VALUES "
                   f"({', '.join('?' * (len(FIELDS) + 1))})", [record[k] for k in (*FIELDS, "chain")])
        db.execute("UPDATE meta SET value=? WHERE key='audit_head'",
                   (json.dumps({"seq": record["seq"], "chain": record["chain"]}),))


def _unrevoke(cli: Cli, serial: str) -> None:
    with _db(cli) as db:
        db.execute("UPDATE certificates SET status='valid', revoked_at=NULL, "
                   "revocation_reason=NULL, invalidity_date=NULL WHERE serial=?", (serial,))


def _cert(cli: Cli, serial: str) -> x509.Certificate:
    with _db(cli) as db:
        pem = db.execute("SELECT pem FROM certificates WHERE serial=?", (serial,)).fetchone()[0]
    return x509.load_pem_x509_certificate(pem.encode())


def _issuer(cli: Cli) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cli.ok("ca", "export", "issuing").out.encode())


@pytest.fixture
def responder(soft_pki: Cli) -> Iterator[OcspResponder]:
    auth = Authority(load_config(soft_pki.home), pin=lambda: USER_PIN)
    yield OcspResponder(auth, cache_seconds=300)
    auth.close()


def _ocsp(r: OcspResponder, cert: x509.Certificate, issuer: x509.Certificate) -> Any:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    return ocsp.load_der_ocsp_response(r.respond(req.public_bytes(serialization.Encoding.DER)).der)


def _crl_count(cli: Cli) -> int:
    with _db(cli) as db:
        return int(db.execute("SELECT count(*) FROM crls").fetchone()[0])


def _last_record(cli: Cli) -> dict[str, Any]:
    return json.loads(cli.ok("--json", "audit", "list").out)[-1]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ un-revoking
@pytest.mark.parametrize("when", ["after-crl", "before-crl"])
def test_an_unrevoked_row_is_refused_by_verify_crl_and_ocsp(
        soft_pki: Cli, tmp_path: Path, when: str) -> None:
    """The review's first repro. "after-crl": the revocation is older than the last CRL, so
    the CRL's proof starts from that CRL's digest; "before-crl": it is in the walked tail."""
    cli = soft_pki
    trust = tmp_path / "audit.pem"
    cli.ok("audit", "cert", "-o", str(trust))
    serial, other = issue_tls(cli, tmp_path, 2)
    cli.ok("revoke", serial, "--reason", "keyCompromise")
    if when == "after-crl":
        cli.ok("crl", "issuing")
    assert cli("audit", "verify", "--trust", str(trust)).code == 0
    _unrevoke(cli, serial)

    r = cli("audit", "verify", "--trust", str(trust))
    assert r.code == 1 and serial in r.err and "recorded revoked" in r.err, r.err
    crls = _crl_count(cli)
    r = cli("crl", "issuing")
    assert r.code == 1 and r.err.startswith("Error:") and "edited" in r.err, r.err
    assert _crl_count(cli) == crls  # nothing signed, nothing stored
    last = _last_record(cli)
    assert (last["action"], last["outcome"]) == ("crl", "refused"), last

    auth = Authority(load_config(cli.home), pin=lambda: USER_PIN)
    try:
        responder = OcspResponder(auth, cache_seconds=300)
        resp = _ocsp(responder, _cert(cli, serial), _issuer(cli))
        assert resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL  # never "good"
    finally:
        auth.close()


def test_ocsp_started_before_the_edit_answers_internal_error_not_good(
        soft_pki: Cli, tmp_path: Path, responder: OcspResponder) -> None:
    """A running responder follows the trail, not the row: the edit after its start is seen
    at the next request (its cached "revoked" answer is not what protects here: the cache is
    bypassed with a nonce)."""
    cli = soft_pki
    serial, good = issue_tls(cli, tmp_path, 2)
    issuer = _issuer(cli)
    assert _ocsp(responder, _cert(cli, good), issuer).certificate_status == ocsp.OCSPCertStatus.GOOD
    cli.ok("revoke", serial, "--reason", "superseded")
    resp = _ocsp(responder, _cert(cli, serial), issuer)
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    _unrevoke(cli, serial)
    req = ocsp.OCSPRequestBuilder().add_certificate(_cert(cli, serial), issuer, hashes.SHA256()) \
        .add_extension(x509.OCSPNonce(b"fresh-1234"), critical=False).build()
    der = responder.respond(req.public_bytes(serialization.Encoding.DER)).der
    assert ocsp.load_der_ocsp_response(der).response_status == \
        ocsp.OCSPResponseStatus.INTERNAL_ERROR
    # the untouched certificate is still answered
    assert _ocsp(responder, _cert(cli, good), issuer).certificate_status == ocsp.OCSPCertStatus.GOOD


@pytest.mark.parametrize("column,value", [
    ("revocation_reason", "superseded"),          # keyCompromise downgraded
    ("revoked_at", "2020-01-01T00:00:00Z"),       # backdated
    ("invalidity_date", "2020-01-01T00:00:00Z"),  # added
    ("ca", "root"),                               # moved to another CA
])
def test_an_edited_revocation_is_refused(soft_pki: Cli, tmp_path: Path, column: str,
                                         value: str) -> None:
    cli = soft_pki
    serial = issue_tls(cli, tmp_path, 1)[0]
    cli.ok("revoke", serial, "--reason", "keyCompromise")
    cli.ok("crl", "issuing")
    with _db(cli) as db:
        db.execute(f"UPDATE certificates SET {column}=? WHERE serial=?", (value, serial))
    r = cli("audit", "verify")
    assert r.code == 1 and serial in r.err, r.err
    r = cli("crl", "issuing")
    assert r.code == 1 and "edited" in r.err, r.err


def test_a_deleted_revoked_row_is_refused_by_the_crl(soft_pki: Cli, tmp_path: Path) -> None:
    cli = soft_pki
    serial = issue_tls(cli, tmp_path, 1)[0]
    cli.ok("revoke", serial)
    cli.ok("crl", "issuing")
    with _db(cli) as db:
        db.execute("DELETE FROM certificates WHERE serial=?", (serial,))
    r = cli("crl", "issuing")
    assert r.code == 1 and "edited" in r.err, r.err


def test_a_forged_revocation_row_is_refused_too(soft_pki: Cli, tmp_path: Path) -> None:
    """The other direction: a row marked revoked with no revocation in the trail. Signing it
    into a CRL would make the CA vouch for something it never did."""
    cli = soft_pki
    serial = issue_tls(cli, tmp_path, 1)[0]
    with _db(cli) as db:
        db.execute("UPDATE certificates SET status='revoked', revoked_at='2026-01-01T00:00:00Z', "
                   "revocation_reason='keyCompromise' WHERE serial=?", (serial,))
    assert cli("audit", "verify").code == 1
    r = cli("crl", "issuing")
    assert r.code == 1 and "edited" in r.err, r.err


def test_crls_keep_working_from_digest_to_digest(soft_pki: Cli, tmp_path: Path) -> None:
    """Guard: the proof a CRL starts from the previous CRL's digest; a chain of genuine CRLs
    and revocations, on both sides of each CRL, keeps verifying and lists everything."""
    cli = soft_pki
    serials = issue_tls(cli, tmp_path, 4)
    revoked = []
    for serial in serials[:3]:
        cli.ok("revoke", serial)
        revoked.append(serial)
        crl = x509.load_pem_x509_crl(cli.ok("crl", "issuing").out.encode())
        assert {format(e.serial_number, "x") for e in crl} == set(revoked)
        cli.ok("crl", "issuing", "--delta")
    records = json.loads(cli.ok("--json", "audit", "list").out)
    intents = [r for r in records if r["action"] == "crl" and r["outcome"] == "intent"]
    assert all("revoked=" in r["detail"] for r in intents)
    assert intents[-1]["detail"].split("revoked=")[1].startswith("3:")
    assert cli("audit", "verify").code == 0


def test_a_forged_crl_digest_after_the_last_checkpoint_is_not_a_base(
        soft_pki: Cli, tmp_path: Path) -> None:
    """A database writer can append chained records; a CRL intent record with a digest of
    the edited rows counts only once a checkpoint signs it, so it cannot launder the edit."""
    import hashlib

    cli = soft_pki
    serial, kept = issue_tls(cli, tmp_path, 2)
    cli.ok("revoke", serial)
    cli.ok("revoke", kept)
    cli.ok("crl", "issuing")
    _unrevoke(cli, serial)
    with _db(cli) as db:
        rows = db.execute("SELECT serial, revoked_at, revocation_reason, invalidity_date FROM "
                          "certificates WHERE ca='issuing' AND status='revoked' ORDER BY serial"
                          ).fetchall()
    text = "\n".join(f"{s} {t} {r} {i or '-'}" for s, t, r, i in rows)
    forged = f"revoked={len(rows)}:{hashlib.sha256(text.encode()).hexdigest()}"
    _append_forged(cli, action="crl", outcome="intent", ca="issuing",
                   detail=f"full CRL number 1; {forged}")
    r = cli("crl", "issuing")
    assert r.code == 1 and "edited" in r.err, r.err


# ------------------------------------------------------------- forged issuance
def _self_signed(serial: int) -> x509.Certificate:
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))


def _insert_forgery(cli: Cli, issuer_name: x509.Name | None = None) -> str:
    import datetime as dt
    import hashlib

    cert = _self_signed(0xDEADBEEFDEADBEEF)
    if issuer_name is not None:  # same issuer name as the real CA, signed by another key
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "forged.example.com")]))
            .issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(0xDEADBEEFDEADBEEF).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    sha = hashlib.sha256(der).hexdigest()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    serial = "deadbeefdeadbeef"
    with _db(cli) as db:
        db.execute("INSERT INTO certificates(serial, ca, profile, subject, sans, key_type, "
                   "not_before, not_after, sha256, pem, created, status) VALUES "
                   "(?, 'issuing', 'tls-server', 'CN=forged', '[]', 'ec-p256', '', '', ?, ?, '', "
                   "'valid')", (serial, sha, pem))
    _append_forged(cli, ca="issuing", serial=serial, object_sha256=sha, profile="tls-server")
    return serial


def test_a_forged_certificate_row_with_a_forged_issued_record(
        soft_pki: Cli, tmp_path: Path) -> None:
    """The review's second repro: a row the CA never signed, a matching chained 'issued'
    record and head. verify fails, no checkpoint signs it (not even a CRL's), OCSP refuses."""
    cli = soft_pki
    issue_tls(cli, tmp_path, 1)
    cli.ok("crl", "issuing")  # a checkpoint before the forgery
    issuer = _issuer(cli)
    serial = _insert_forgery(cli, issuer.subject)
    r = cli("audit", "verify")
    assert r.code == 1 and serial in r.err and "never signed" in r.err, r.err

    before = [x for x in json.loads(cli.ok("--json", "audit", "list").out)
              if x["action"] == "checkpoint"]
    r = cli("audit", "checkpoint")
    assert r.code == 1 and serial in r.err, r.err
    r = cli("crl", "issuing")  # the CRL itself is right; the checkpoint after it is refused
    assert r.code == 1 and serial in r.err, r.err
    records = json.loads(cli.ok("--json", "audit", "list").out)
    assert [x for x in records if x["action"] == "checkpoint"] == before
    assert any(x["action"] == "state-check" and x["outcome"] == "refused" for x in records)

    auth = Authority(load_config(cli.home), pin=lambda: USER_PIN)
    try:
        req = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            *_ids(issuer), int(serial, 16), hashes.SHA1()).build()
        der = OcspResponder(auth, cache_seconds=300).respond(
            req.public_bytes(serialization.Encoding.DER)).der
        assert ocsp.load_der_ocsp_response(der).response_status == \
            ocsp.OCSPResponseStatus.INTERNAL_ERROR
    finally:
        auth.close()


def _ids(issuer: x509.Certificate) -> tuple[bytes, bytes]:
    import hashlib

    from hsm_ca.ocsp import _public_key_bits

    return (hashlib.sha1(issuer.subject.public_bytes()).digest(),
            hashlib.sha1(_public_key_bits(issuer)).digest())


def test_a_swapped_ca_certificate_does_not_make_forgeries_verify(
        soft_pki: Cli, tmp_path: Path) -> None:
    """Replace the issuing CA's stored certificate with one for the attacker's key: leaves the
    attacker signs then verify against the stored CA, but not against the HSM's key."""
    import datetime as dt
    import hashlib

    cli = soft_pki
    issue_tls(cli, tmp_path, 1)
    issuer = _issuer(cli)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    fake_ca = (x509.CertificateBuilder().subject_name(issuer.subject).issuer_name(issuer.issuer)
               .public_key(key.public_key()).serial_number(issuer.serial_number)
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=300))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "forged.example.com")]))
        .issuer_name(issuer.subject).public_key(key.public_key())
        .serial_number(0xDEADBEEFDEADBEEF).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    pem = fake_ca.public_bytes(serialization.Encoding.PEM).decode()
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
    leaf_sha = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    with _db(cli) as db:
        db.execute("UPDATE cas SET pem=? WHERE name='issuing'", (pem,))
        db.execute("INSERT INTO certificates(serial, ca, profile, subject, sans, key_type, "
                   "not_before, not_after, sha256, pem, created, status) VALUES "
                   "('deadbeefdeadbeef', 'issuing', 'tls-server', 'CN=forged', '[]', 'ec-p256', "
                   "'', '', ?, ?, '', 'valid')", (leaf_sha, leaf_pem))
    _append_forged(cli, ca="issuing", serial="deadbeefdeadbeef", object_sha256=leaf_sha)
    r = cli("audit", "checkpoint")
    assert r.code == 1 and "HSM key" in r.err, r.err
    r = cli("audit", "verify")  # the CA's certificate row no longer matches the stored CA
    assert r.code == 1, r.out


def test_audit_verify_checks_every_certificate_signature(soft_pki: Cli, tmp_path: Path) -> None:
    """Guard: a genuine home verifies, and the note says how many rows were proven."""
    cli = soft_pki
    issue_tls(cli, tmp_path, 3)
    r = cli.ok("audit", "verify")
    # 2 CA certificates and 3 leaves
    assert "5 certificate(s) match the trail's records" in r.out, r.out


# ------------------------------------------- guards the mutants script found unprotected
def test_an_edited_revocation_since_the_last_crl_is_refused(soft_pki: Cli, tmp_path: Path) -> None:
    """The revocation is in the walked tail (after the last CRL's digest), not in the digest."""
    cli = soft_pki
    first, second = issue_tls(cli, tmp_path, 2)
    cli.ok("revoke", first)
    cli.ok("crl", "issuing")
    cli.ok("revoke", second, "--reason", "keyCompromise")
    with _db(cli) as db:
        db.execute("UPDATE certificates SET revocation_reason='superseded' WHERE serial=?",
                   (second,))
    crls = _crl_count(cli)
    r = cli("crl", "issuing")
    assert r.code == 1 and second in r.err and "edited" in r.err, r.err
    assert _crl_count(cli) == crls  # refused before signing, not only at the checkpoint after


def test_a_swapped_ca_certificate_alone_fails_verify(soft_pki: Cli, tmp_path: Path) -> None:
    """A CA with no leaves yet: only the comparison of the stored CA certificate with its
    recorded certificate row notices that it was replaced."""
    import datetime as dt

    cli = soft_pki
    issuer = _issuer(cli)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    fake = (x509.CertificateBuilder().subject_name(issuer.subject).issuer_name(issuer.issuer)
            .public_key(key.public_key()).serial_number(issuer.serial_number)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=300))
            .sign(key, hashes.SHA256()))
    with _db(cli) as db:
        db.execute("UPDATE cas SET pem=? WHERE name='issuing'",
                   (fake.public_bytes(serialization.Encoding.PEM).decode(),))
    r = cli("audit", "verify")
    assert r.code == 1 and "swapped" in r.err, r.err


def test_a_row_holding_another_genuine_certificate_is_not_checkpointed(
        soft_pki: Cli, tmp_path: Path) -> None:
    """Both certificates are genuine (their signatures verify), but row B now holds A's:
    only the comparison with B's issued record notices."""
    cli = soft_pki
    cli.ok("audit", "checkpoint")
    a, b = issue_tls(cli, tmp_path, 2)
    with _db(cli) as db:
        pem, sha = db.execute("SELECT pem, sha256 FROM certificates WHERE serial=?", (a,)).fetchone()
        db.execute("UPDATE certificates SET pem=?, sha256=? WHERE serial=?", (pem, sha, b))
    r = cli("audit", "checkpoint")
    assert r.code == 1 and b in r.err and "issued" in r.err, r.err
    assert cli("audit", "verify").code == 1


def test_ocsp_refuses_a_revoked_row_the_trail_does_not_know(
        soft_pki: Cli, tmp_path: Path, responder: OcspResponder) -> None:
    """Signing "revoked" for a row marked so by an edit would be the CA vouching for a
    revocation it never made: internalError instead."""
    cli = soft_pki
    serial, other = issue_tls(cli, tmp_path, 2)
    issuer = _issuer(cli)
    # the responder proves the CA's rows on its first request, before the edit
    assert _ocsp(responder, _cert(cli, other), issuer).certificate_status == \
        ocsp.OCSPCertStatus.GOOD
    with _db(cli) as db:
        db.execute("UPDATE certificates SET status='revoked', revoked_at='2026-01-01T00:00:00Z', "
                   "revocation_reason='keyCompromise' WHERE serial=?", (serial,))
    resp = _ocsp(responder, _cert(cli, serial), issuer)
    assert resp.response_status == ocsp.OCSPResponseStatus.INTERNAL_ERROR
    # a responder started after the edit refuses to prove the CA's rows at all
    auth = Authority(load_config(cli.home), pin=lambda: USER_PIN)
    try:
        resp = _ocsp(OcspResponder(auth, cache_seconds=300), _cert(cli, other), issuer)
        assert resp.response_status == ocsp.OCSPResponseStatus.TRY_LATER
    finally:
        auth.close()
