"""Independent tools judge hsm-ca's revocation: CRLs, delta CRLs and OCSP from a real server.

One home is built with real ``python -m hsm_ca`` processes and ``--base-url``
pointing at a loopback port picked first, so certificates' CRL distribution
points and AIA OCSP URLs lead to the ``hsm-ca serve`` process these tests start
on that port. The verdicts come from ``openssl verify``/``openssl ocsp``,
pkilint, pyhanko-certvalidator (which fetches CRLs and OCSP itself) and plain
HTTP clients; nothing here asks hsm-ca whether hsm-ca is right.

The PKI: root (ec-p384) -> issuing (ec-p256) -> leaves ``good``, ``revoked``
(keyCompromise) and ``flip`` (revoked during a test, while the server runs);
root -> ``issuing2`` (revoked by the root, cACompromise) -> ``leaf2``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from interop_support import Pki, build_pki, hsm, openssl_csr, requires_openssl
from revocation_support import (
    CaServer,
    check_ocsp_signature,
    free_port,
    load_cert,
    nonce_of,
    ocsp_get_path,
    ocsp_line,
    ocsp_request,
    pkilint,
    pyhanko_validate,
    run_openssl,
    write_first_cert,
)

pytestmark = [pytest.mark.interop, requires_openssl]

UNKNOWN_SERIAL = 0x1234567890ABCDEF1234  # not a serial this PKI issued
ISSUING2_SUBJECT = "CN=Interop Revoked Issuing CA,O=Interop,C=NL"
SUCCESSFUL = ocsp.OCSPResponseStatus.SUCCESSFUL


# ------------------------------------------------------------------ the PKI
@dataclass
class Env:
    pki: Pki
    dir: Path
    port: int
    good: Path
    good_serial: str
    revoked: Path
    revoked_serial: str
    flip: Path
    flip_serial: str
    issuing2: Path
    issuing2_serial: str
    issuing2_crl: Path
    leaf2: Path

    def cert(self, path: Path) -> x509.Certificate:
        return load_cert(path)

    @property
    def root_cert(self) -> x509.Certificate:
        return load_cert(self.pki.root)

    @property
    def issuing_cert(self) -> x509.Certificate:
        return load_cert(self.pki.issuing)


def issue_leaf(pki: Pki, name: str, ca: str = "issuing") -> tuple[str, Path]:
    """An openssl-made CSR signed as tls-server; returns (serial, leaf-only PEM file)."""
    _, csr = openssl_csr(
        pki.dir, name, subject=f"/CN={name}.example.com", san=f"DNS:{name}.example.com"
    )
    info, out = pki.sign(csr, "tls-server", ca=ca)
    return info["serial"], write_first_cert(out, pki.dir / f"{name}.pem")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    directory = tmp_path_factory.mktemp("revocation")
    port = free_port()  # first the port, then the home whose URLs point at it
    pki = build_pki(directory, base_url=f"http://127.0.0.1:{port}")
    # This suite sends nonces at full speed from one address (echo, throughput); the
    # per-client and global nonce rations would answer most of them from the cache
    # without the nonce.
    # The ration itself is judged in tests/test_server_hardening.py.
    config = pki.home / "hsm-ca.toml"
    config.write_text("ocsp_nonce_burst = 1000000\nocsp_nonce_global_burst = 1000000\n"
                      + config.read_text())
    good_serial, good = issue_leaf(pki, "good")
    revoked_serial, revoked = issue_leaf(pki, "revoked")
    flip_serial, flip = issue_leaf(pki, "flip")
    info = json.loads(
        hsm(
            pki.home,
            "--json",
            "ca",
            "create-intermediate",
            "issuing2",
            "--parent",
            "root",
            "--subject",
            ISSUING2_SUBJECT,
            "--key-type",
            "ec-p256",
            "--path-length",
            "0",
        )
    )
    issuing2 = directory / "issuing2.pem"
    hsm(pki.home, "ca", "export", "issuing2", "-o", str(issuing2))
    _, leaf2 = issue_leaf(pki, "leaf2", ca="issuing2")
    issuing2_crl = directory / "issuing2.crl"
    hsm(pki.home, "crl", "issuing2", "-o", str(issuing2_crl))
    hsm(pki.home, "revoke", info["serial"], "--reason", "cACompromise")
    hsm(pki.home, "revoke", revoked_serial, "--reason", "keyCompromise")
    return Env(
        pki,
        directory,
        port,
        good,
        good_serial,
        revoked,
        revoked_serial,
        flip,
        flip_serial,
        issuing2,
        info["serial"],
        issuing2_crl,
        leaf2,
    )


@pytest.fixture(scope="module")
def server(env: Env) -> Any:
    srv = CaServer(env.pki.home, env.port, env.dir / "serve.log")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop_gracefully()  # exit 0 within 15 s of SIGTERM, or the module errors


# ------------------------------------------------------------- openssl ocsp
@dataclass
class OcspRun:
    returncode: int
    output: str
    der: bytes

    @property
    def response(self) -> ocsp.OCSPResponse:
        assert self.der, f"openssl ocsp wrote no response:\n{self.output}"
        return ocsp.load_der_ocsp_response(self.der)


_runs = iter(range(1_000_000))


def openssl_ocsp(
    env: Env, server: CaServer, *args: str | Path, ca: str = "issuing", issuer: Path | None = None
) -> OcspRun:
    """``openssl ocsp -issuer I ARGS -url SERVER/ocsp/CA -CAfile root.pem -respout F``."""
    respout = env.dir / f"ocsp-{next(_runs)}.der"
    r = run_openssl(
        "ocsp",
        "-issuer",
        issuer or env.pki.issuing,
        *args,
        "-url",
        f"{server.url}/ocsp/{ca}",
        "-CAfile",
        env.pki.root,
        "-timeout",
        "10",
        "-respout",
        respout,
    )
    der = respout.read_bytes() if respout.exists() else b""
    return OcspRun(r.returncode, r.stdout + r.stderr, der)


def assert_verified(run: OcspRun, *, nonce: bool = True) -> None:
    assert run.returncode == 0, f"openssl ocsp exited {run.returncode}:\n{run.output}"
    assert "Response verify OK" in run.output, run.output
    assert "Verify Failure" not in run.output and "Verify error" not in run.output, run.output
    if nonce:
        assert "no nonce in response" not in run.output, run.output


def assert_revoked(run: OcspRun, name: str, reason: str) -> None:
    assert ocsp_line(run.output, name) == "revoked", run.output
    assert f"Reason: {reason}" in run.output, run.output


def queries(env: Env, server: CaServer, *extra: str) -> dict[str, OcspRun]:
    return {
        "good": openssl_ocsp(env, server, "-cert", env.good, *extra),
        "revoked": openssl_ocsp(env, server, "-cert", env.revoked, *extra),
        "unknown": openssl_ocsp(env, server, "-serial", hex(UNKNOWN_SERIAL), *extra),
    }


@pytest.fixture(scope="module")
def ca_signed(env: Env, server: CaServer) -> dict[str, OcspRun]:
    """openssl ocsp (with its default nonce) before any delegated responder exists."""
    return queries(env, server, "-resp_text")


@dataclass
class Delegated:
    responder: x509.Certificate
    live: OcspRun  # asked right after ``ca ocsp-responder``, the server still running
    runs: dict[str, OcspRun]  # asked after a restart of the server


@pytest.fixture(scope="module")
def delegated(env: Env, server: CaServer, ca_signed: dict[str, OcspRun]) -> Delegated:
    responder_pem = env.dir / "responder.pem"
    hsm(env.pki.home, "ca", "ocsp-responder", "issuing", "-o", str(responder_pem))
    live = openssl_ocsp(env, server, "-cert", env.good, "-resp_text")
    # The tests of the delegated responses' form should not hinge on the running
    # server noticing the new responder (test_running_server_switches_to_... judges that).
    server.restart()
    runs = queries(env, server, "-resp_text")
    runs["good-no-nonce"] = openssl_ocsp(env, server, "-cert", env.good, "-no_nonce")
    return Delegated(load_cert(responder_pem), live, runs)


@pytest.fixture(scope="module")
def root_ocsp(env: Env, server: CaServer) -> dict[str, OcspRun]:
    """The root's responder asked about the revoked intermediate."""
    return {
        "issuing2": openssl_ocsp(
            env, server, "-cert", env.issuing2, "-resp_text", ca="root", issuer=env.pki.root
        )
    }


# -------------------------------------------------------------------- CRLs
CRL_SOURCES = ["cli-pem", "cli-der", "server"]


def fetch(server: CaServer, path: str, target: Path) -> Path:
    r = server.get(path)
    assert r.status == 200, f"GET {path}: {r.status} {r.body[:200]!r}"
    assert r.header("content-type") == "application/pkix-crl", r.headers
    x509.load_der_x509_crl(r.body)
    target.write_bytes(r.body)
    return target


@pytest.fixture(scope="module")
def crls(env: Env, server: CaServer) -> dict[str, tuple[Path, Path]]:
    """(root CRL, issuing CRL) from ``hsm-ca crl`` (PEM, --der) and from the server."""
    d, home = env.dir, env.pki.home
    hsm(home, "crl", "root", "-o", str(d / "root.crl"))
    hsm(home, "crl", "issuing", "-o", str(d / "issuing.crl"))
    hsm(home, "crl", "root", "--der", "-o", str(d / "root.der.crl"))
    hsm(home, "crl", "issuing", "--der", "-o", str(d / "issuing.der.crl"))
    assert (d / "root.crl").read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    x509.load_der_x509_crl((d / "issuing.der.crl").read_bytes())
    return {
        "cli-pem": (d / "root.crl", d / "issuing.crl"),
        "cli-der": (d / "root.der.crl", d / "issuing.der.crl"),
        "server": (
            fetch(server, "/crl/root.crl", d / "root.srv.crl"),
            fetch(server, "/crl/issuing.crl", d / "issuing.srv.crl"),
        ),
    }


@dataclass
class Deltas:
    base: Path  # full CRL signed before the revocation
    cli: Path  # hsm-ca crl issuing --delta, after it
    server: Path  # GET /crl/issuing-delta.crl, after it
    leaf: Path
    serial: str


@pytest.fixture(scope="module")
def deltas(env: Env, server: CaServer) -> Deltas:
    d, home = env.dir, env.pki.home
    serial, leaf = issue_leaf(env.pki, "deltaleaf")
    hsm(home, "crl", "issuing", "-o", str(d / "base.crl"))
    hsm(home, "revoke", serial, "--reason", "affiliationChanged")
    hsm(home, "crl", "issuing", "--delta", "-o", str(d / "delta.crl"))
    served = fetch(server, "/crl/issuing-delta.crl", d / "delta.srv.crl")
    return Deltas(d / "base.crl", d / "delta.crl", served, leaf, serial)


def load_crl(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    if data.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def openssl_verify(
    env: Env,
    leaf: Path,
    *crl_files: Path,
    untrusted: Path | None = None,
    check: str = "-crl_check_all",
    extra: tuple[str, ...] = (),
) -> tuple[int, str]:
    args: list[str | Path] = [
        "verify",
        "-x509_strict",
        check,
        *extra,
        "-CAfile",
        env.pki.root,
        "-untrusted",
        untrusted or env.pki.issuing,
    ]
    for f in crl_files:
        args += ["-CRLfile", f]
    r = run_openssl(*args, leaf)
    return r.returncode, r.stdout + r.stderr


# ============================================================ 1. openssl verify
@pytest.mark.parametrize("source", CRL_SOURCES)
def test_openssl_crl_check_all_rejects_the_revoked_leaf(
    env: Env, crls: dict[str, tuple[Path, Path]], source: str
) -> None:
    rc, out = openssl_verify(env, env.revoked, *crls[source])
    assert rc != 0, f"openssl accepted the revoked leaf with {source} CRLs:\n{out}"
    assert "error 23 at 0 depth lookup: certificate revoked" in out, out


@pytest.mark.parametrize("source", CRL_SOURCES)
def test_openssl_crl_check_all_accepts_the_good_leaf(
    env: Env, crls: dict[str, tuple[Path, Path]], source: str
) -> None:
    """``-crl_check_all`` checks every certificate of the chain, the root included."""
    rc, out = openssl_verify(env, env.good, *crls[source])
    assert rc == 0 and out.strip() == f"{env.good}: OK", (
        f"openssl rejected the good leaf with {source} CRLs:\n{out}"
    )


def test_openssl_crl_check_all_rejects_a_leaf_under_a_revoked_intermediate(
    env: Env, crls: dict[str, tuple[Path, Path]]
) -> None:
    root_crl, _ = crls["cli-pem"]
    rc, out = openssl_verify(env, env.leaf2, root_crl, env.issuing2_crl, untrusted=env.issuing2)
    assert rc != 0, f"openssl accepted a leaf under a revoked intermediate:\n{out}"
    assert "error 23 at 1 depth lookup: certificate revoked" in out, out


def test_openssl_delta_crl_carries_a_revocation_made_after_the_base(
    env: Env, deltas: Deltas
) -> None:
    base = load_crl(deltas.base)
    for path in (deltas.cli, deltas.server):
        delta = load_crl(path)
        indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        assert indicator.critical
        number = delta.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        base_number = base.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert indicator.value.crl_number <= base_number < number, (path.name, base_number)
        assert delta.get_revoked_certificate_by_serial_number(int(deltas.serial, 16)) is not None

    # the base alone does not know the revocation (leaf-level check only) ...
    rc, out = openssl_verify(env, deltas.leaf, deltas.base, check="-crl_check")
    assert rc == 0, f"the base CRL already lists the leaf revoked after it:\n{out}"
    # ... base plus delta does, whichever way the delta was obtained
    for delta_file in (deltas.cli, deltas.server):
        rc, out = openssl_verify(
            env, deltas.leaf, deltas.base, delta_file, check="-crl_check", extra=("-use_deltas",)
        )
        assert rc != 0 and "error 23 at 0 depth lookup: certificate revoked" in out, (
            f"openssl -use_deltas with {delta_file.name} did not find the revocation:\n{out}"
        )


# how clients set openssl's CRL checks: every chain with full + delta CRLs loaded
DELTA_FLAGS = [
    ("-crl_check",), ("-crl_check_all",), ("-crl_check_all", "-use_deltas"),
    ("-crl_check_all", "-extended_crl"), ("-crl_check_all", "-extended_crl", "-use_deltas"),
    ("-crl_check", "-use_deltas"),
]


@pytest.mark.parametrize("flags", DELTA_FLAGS, ids=" ".join)
@pytest.mark.parametrize("order", ["base-first", "delta-first"])
def test_openssl_with_base_and_delta_finds_a_revocation_made_before_the_base(
    env: Env, crls: dict[str, tuple[Path, Path]], deltas: Deltas,
    flags: tuple[str, ...], order: str,
) -> None:
    """Issue 14 finding 4: without -extended_crl, OpenSSL 3.0 takes the newest CRL in scope
    as the complete one, which is the delta. A delta listing only what changed since its
    base made a certificate revoked *before* the base verify OK. hsm-ca's delta also lists
    the base's entries (RFC 5280 section 5.2.4 allows it), so a client reading it as
    complete still sees every revocation, and a delta-aware one loses nothing."""
    root_crl, _ = crls["cli-pem"]
    for delta in (deltas.cli, deltas.server):
        pair = (deltas.base, delta) if order == "base-first" else (delta, deltas.base)
        files = (root_crl, *pair)
        rc, out = openssl_verify(env, env.revoked, *files, check=flags[0], extra=flags[1:])
        assert rc != 0 and "error 23 at 0 depth lookup: certificate revoked" in out, (
            f"openssl {' '.join(flags)} with {delta.name} accepted a leaf revoked before "
            f"the base:\n{out}")
        rc, out = openssl_verify(env, env.good, *files, check=flags[0], extra=flags[1:])
        assert rc == 0, f"openssl {' '.join(flags)} rejected the good leaf:\n{out}"
        rc, out = openssl_verify(env, deltas.leaf, *files, check=flags[0], extra=flags[1:])
        if "-use_deltas" in flags:  # a client that reads deltas sees the late revocation
            assert rc != 0 and "certificate revoked" in out, (flags, out)
        elif "-extended_crl" in flags:  # which ignores deltas otherwise: the base is all
            assert rc == 0, (flags, out)
        # else openssl takes whichever CRL is newer (the first on a tie): both are complete

# ============================================================== 2. openssl ocsp
def test_openssl_ocsp_with_the_ca_key(env: Env, ca_signed: dict[str, OcspRun]) -> None:
    for run in ca_signed.values():
        assert_verified(run)
    assert ocsp_line(ca_signed["good"].output, str(env.good)) == "good"
    assert_revoked(ca_signed["revoked"], str(env.revoked), "keyCompromise")
    assert ocsp_line(ca_signed["unknown"].output, hex(UNKNOWN_SERIAL)) == "unknown"
    for run in ca_signed.values():
        resp = run.response
        assert resp.certificates == [], "a CA-signed response needs no certificates"
        assert check_ocsp_signature(resp, env.issuing_cert) == env.issuing_cert
        assert nonce_of(resp) is not None
    revoked = ca_signed["revoked"].response
    assert revoked.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert revoked.revocation_reason == x509.ReasonFlags.key_compromise


def test_openssl_ocsp_root_reports_the_revoked_intermediate(
    env: Env, root_ocsp: dict[str, OcspRun]
) -> None:
    run = root_ocsp["issuing2"]
    assert_verified(run)
    assert_revoked(run, str(env.issuing2), "cACompromise")
    assert check_ocsp_signature(run.response, env.root_cert) == env.root_cert


def test_running_server_switches_to_a_new_delegated_responder(
    env: Env, delegated: Delegated
) -> None:
    """Once ``ca ocsp-responder`` has issued the responder, responses are signed by it.

    Asked of the server that was already running (and had signed with the CA key).
    """
    assert_verified(delegated.live)
    resp = delegated.live.response
    assert resp.certificates == [delegated.responder], (
        "the running server still signs with the CA key after 'ca ocsp-responder' "
        f"(responder key hash {resp.responder_key_hash and resp.responder_key_hash.hex()}, "
        f"{len(resp.certificates)} certificates in the response)"
    )


def test_openssl_ocsp_with_a_delegated_responder(env: Env, delegated: Delegated) -> None:
    responder = delegated.responder
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    responder.verify_directly_issued_by(env.issuing_cert)

    runs = delegated.runs
    for name, run in runs.items():
        assert_verified(run, nonce=name != "good-no-nonce")
    assert ocsp_line(runs["good"].output, str(env.good)) == "good"
    assert ocsp_line(runs["good-no-nonce"].output, str(env.good)) == "good"
    assert_revoked(runs["revoked"], str(env.revoked), "keyCompromise")
    assert ocsp_line(runs["unknown"].output, hex(UNKNOWN_SERIAL)) == "unknown"
    # -resp_text prints the responder certificate carried in the response
    assert "Certificate:" in runs["good"].output, runs["good"].output
    assert "OCSP Responder issuing" in runs["good"].output, runs["good"].output
    for run in runs.values():
        resp = run.response
        assert resp.certificates == [responder]
        assert check_ocsp_signature(resp, env.issuing_cert) == responder


def test_no_nonce_response_is_cached_until_a_revocation(env: Env, server: CaServer) -> None:
    first = openssl_ocsp(env, server, "-no_nonce", "-cert", env.flip)
    second = openssl_ocsp(env, server, "-no_nonce", "-cert", env.flip)
    for run in (first, second):
        assert_verified(run, nonce=False)
        assert ocsp_line(run.output, str(env.flip)) == "good"
        assert nonce_of(run.response) is None
    # ECDSA signatures are randomised: equal bytes mean the same, cached, response
    assert first.der == second.der, "a repeated no-nonce query was signed afresh"
    assert first.response.produced_at_utc == second.response.produced_at_utc

    hsm(env.pki.home, "revoke", env.flip_serial, "--reason", "superseded")  # another process
    after = openssl_ocsp(env, server, "-no_nonce", "-cert", env.flip)
    assert_verified(after, nonce=False)
    assert_revoked(after, str(env.flip), "superseded")
    assert after.response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    with_nonce = openssl_ocsp(env, server, "-cert", env.flip)
    assert_verified(with_nonce)
    assert_revoked(with_nonce, str(env.flip), "superseded")

def test_a_cached_answer_is_only_given_for_its_own_certid(env: Env, server: CaServer) -> None:
    """Issue 14 finding 3: a SHA-384 query primed the (CA, serial) cache, and openssl's
    SHA-1 and SHA-256 queries got that answer: "No Status found", which a soft-failing
    client takes as no objection to a revoked certificate."""
    serial, leaf = issue_leaf(env.pki, "certid")
    hsm(env.pki.home, "revoke", serial, "--reason", "keyCompromise")
    for digest in ("-sha384", "-sha1", "-sha256", "-sha512", "-sha1"):
        run = openssl_ocsp(env, server, "-no_nonce", digest, "-cert", leaf)
        assert_verified(run, nonce=False)
        assert "No Status found" not in run.output, (digest, run.output)
        assert_revoked(run, str(leaf), "keyCompromise")
        assert run.response.hash_algorithm.name == digest[1:], digest



# ================================================================ 3. GET form
def _http_date(value: str | None) -> dt.datetime:
    assert value, "missing HTTP date header"
    return email.utils.parsedate_to_datetime(value)


def test_ocsp_get_with_rfc5019_cache_headers(env: Env, server: CaServer) -> None:
    leaf, issuing = env.cert(env.good), env.issuing_cert
    path = ocsp_get_path("issuing", ocsp_request(leaf, issuing))
    r = server.get(path)
    assert r.status == 200, (r.status, r.body[:200])
    assert r.header("content-type") == "application/ocsp-response"
    resp = ocsp.load_der_ocsp_response(r.body)
    assert resp.response_status == SUCCESSFUL
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert resp.serial_number == leaf.serial_number
    check_ocsp_signature(resp, issuing)
    this_update, next_update = resp.this_update_utc, resp.next_update_utc
    assert next_update is not None

    directives = {
        d.strip().split("=")[0]: d.strip() for d in (r.header("cache-control") or "").split(",")
    }
    assert {"max-age", "public", "no-transform", "must-revalidate"} <= set(directives), r.headers
    max_age = int(directives["max-age"].split("=")[1])
    now = dt.datetime.now(dt.UTC)
    assert 0 < max_age <= (next_update - now).total_seconds() + 1, (max_age, next_update)
    assert _http_date(r.header("last-modified")) == this_update
    assert _http_date(r.header("expires")) == next_update
    etag = r.header("etag")
    assert etag and etag.startswith('"') and etag.endswith('"'), r.headers

    again = server.get(path)  # the same request: the cached response, same validator
    assert again.status == 200 and again.body == r.body and again.header("etag") == etag

    post = server.post_ocsp("issuing", ocsp_request(leaf, issuing))
    assert post.body == r.body, "POST and GET of the same no-nonce request disagree"


def test_ocsp_get_accepts_base64_with_slash_and_plus(env: Env, server: CaServer) -> None:
    """RFC 6960 A.1: the base64 may carry '/' and '+', URL-encoded or (leniently) raw."""
    issuing = env.issuing_cert
    rng = random.Random(5019)
    for _ in range(2000):
        serial = rng.getrandbits(64) | 1
        der = ocsp_request(None, issuing, serial=serial)
        raw = ocsp_get_path("issuing", der, quote=False)
        if "/" in raw.split("/", 3)[3] and "+" in raw:
            break
    else:
        pytest.fail("no request whose base64 holds both '/' and '+'")
    for path in (ocsp_get_path("issuing", der), raw):
        r = server.get(path)
        assert r.status == 200, (path, r.status)
        resp = ocsp.load_der_ocsp_response(r.body)
        assert resp.response_status == SUCCESSFUL, (path, resp.response_status)
        assert resp.serial_number == serial
        assert resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


# ================================================================== 4. pkilint
CRL_DOCUMENTS = [
    "root-cli",
    "root-server",
    "issuing-cli-pem",
    "issuing-cli-der",
    "issuing-server",
    "delta-cli",
    "delta-server",
]


def test_pkilint_harness_reports_a_bad_crl(tmp_path: Path) -> None:
    """The lint helper does see findings: a CRL without CRL number or AKI is an ERROR."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    bad = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bad")]))
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "bad.crl"
    path.write_bytes(bad.public_bytes(serialization.Encoding.DER))
    _, findings = pkilint("lint_crl", path, "-t", "CRL", "-p", "PKIX")
    assert {code for _, code, _ in findings} >= {"pkix.crl_number_missing"}, findings


@pytest.mark.parametrize("document", CRL_DOCUMENTS)
def test_pkilint_crl_is_clean(
    crls: dict[str, tuple[Path, Path]], deltas: Deltas, document: str
) -> None:
    path = {
        "root-cli": crls["cli-pem"][0],
        "root-server": crls["server"][0],
        "issuing-cli-pem": crls["cli-pem"][1],
        "issuing-cli-der": crls["cli-der"][1],
        "issuing-server": crls["server"][1],
        "delta-cli": deltas.cli,
        "delta-server": deltas.server,
    }[document]
    crl = load_crl(path)
    assert len(crl) >= 1, f"{document}: expected revoked entries to lint"
    ran, findings = pkilint("lint_crl", path, "-t", "CRL", "-p", "PKIX")
    assert "CrlNumberPresenceValidator" in ran, ran
    assert findings == [], f"pkilint on {document} CRL: {findings}"


OCSP_DOCUMENTS = {
    "ca-signed-good": ("ca_signed", "good"),
    "ca-signed-revoked": ("ca_signed", "revoked"),
    "ca-signed-unknown": ("ca_signed", "unknown"),
    "root-revoked-intermediate": ("root_ocsp", "issuing2"),
    "delegated-good": ("delegated", "good"),
    "delegated-good-no-nonce": ("delegated", "good-no-nonce"),
    "delegated-revoked": ("delegated", "revoked"),
}


@pytest.mark.parametrize("document", list(OCSP_DOCUMENTS))
def test_pkilint_ocsp_response_is_clean(
    request: pytest.FixtureRequest, env: Env, document: str
) -> None:
    fixture, key = OCSP_DOCUMENTS[document]
    value = request.getfixturevalue(fixture)
    run: OcspRun = (value.runs if isinstance(value, Delegated) else value)[key]
    path = env.dir / f"lint-{document}.der"
    path.write_bytes(run.der)
    assert run.response.response_status == SUCCESSFUL
    ran, findings = pkilint("lint_ocsp_response", path)
    assert "OCSPResponseStatusValidator" in ran, ran
    assert findings == [], f"pkilint on the {document} OCSP response: {findings}"


# ============================================================ 5. pyhanko-certvalidator
def _policy(rule_name: str) -> Any:
    policy_decl = pytest.importorskip("pyhanko_certvalidator.policy_decl")
    rule = policy_decl.RevocationCheckingRule[rule_name]
    return policy_decl.CertRevTrustPolicy(policy_decl.RevocationCheckingPolicy(rule, rule))


def _revoked_error() -> type[Exception]:
    errors = pytest.importorskip("pyhanko_certvalidator.errors")
    return errors.RevokedError  # type: ignore[no-any-return]


def test_pyhanko_crls_only(env: Env, server: CaServer, crls: dict[str, tuple[Path, Path]]) -> None:
    """CRLs handed over, no fetching. The full CRLs announce delta CRLs (Freshest CRL),
    so pyhanko insists on them: the deltas come from the server too."""
    revoked_error = _revoked_error()
    data = [p.read_bytes() for p in crls["server"]]
    for name in ("root", "issuing"):
        r = server.get(f"/crl/{name}-delta.crl")
        assert r.status == 200, (name, r.status)
        data.append(r.body)
    root, issuing = env.root_cert, env.issuing_cert
    crl_only = {"crls": data, "allow_fetching": False, "revinfo_policy": _policy("CRL_REQUIRED")}
    pyhanko_validate(env.cert(env.good), [issuing], root, **crl_only)
    with pytest.raises(revoked_error, match="CRL indicates the end-entity certificate was revoked"):
        pyhanko_validate(env.cert(env.revoked), [issuing], root, **crl_only)
    with pytest.raises(revoked_error, match="CRL"):
        pyhanko_validate(
            env.cert(env.revoked),
            [issuing],
            root,
            crls=data,
            allow_fetching=False,
            revocation_mode="hard-fail",
        )


def test_pyhanko_ocsp_only(env: Env, server: CaServer, delegated: Delegated) -> None:
    """OCSP responses fetched here (the leaf's from the delegated responder, the
    intermediate's from the root's CA-signed one), handed over, no fetching."""
    revoked_error = _revoked_error()
    root, issuing = env.root_cert, env.issuing_cert

    def fetched(ca: str, cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
        r = server.post_ocsp(ca, ocsp_request(cert, issuer))
        assert r.status == 200
        return r.body

    issuing_status = fetched("root", issuing, root)
    for leaf_path, revoked in ((env.good, False), (env.revoked, True)):
        leaf = env.cert(leaf_path)
        responses = [fetched("issuing", leaf, issuing), issuing_status]
        assert ocsp.load_der_ocsp_response(responses[0]).certificates == [delegated.responder]
        ocsp_only = {
            "ocsps": responses,
            "allow_fetching": False,
            "revinfo_policy": _policy("OCSP_REQUIRED"),
        }
        if revoked:
            with pytest.raises(revoked_error, match="OCSP response indicates the end-entity"):
                pyhanko_validate(leaf, [issuing], root, **ocsp_only)
        else:
            pyhanko_validate(leaf, [issuing], root, **ocsp_only)


def test_pyhanko_fetches_revocation_status_from_the_server(env: Env, server: CaServer) -> None:
    revoked_error = _revoked_error()
    root, issuing = env.root_cert, env.issuing_cert
    pyhanko_validate(
        env.cert(env.good), [issuing], root, allow_fetching=True, revocation_mode="require"
    )
    with pytest.raises(revoked_error, match="end-entity certificate was revoked"):
        pyhanko_validate(
            env.cert(env.revoked), [issuing], root, allow_fetching=True, revocation_mode="hard-fail"
        )
    with pytest.raises(revoked_error, match="intermediate certificate 1 was revoked"):
        pyhanko_validate(
            env.cert(env.leaf2),
            [env.cert(env.issuing2)],
            root,
            allow_fetching=True,
            revocation_mode="hard-fail",
        )


def test_pyhanko_fetches_crls_from_the_distribution_points(env: Env, server: CaServer) -> None:
    """CRL-only checking with fetching: pyhanko follows the certificates' CRL DPs and, because
    full CRLs announce deltas, finds the delta through the certificate's Freshest CRL.

    TLS server certificates may not carry Freshest CRL (CA/B baseline requirements), and
    pyhanko then refuses CRL-only checking; client certificates carry it, so they are used.
    """
    revoked_error = _revoked_error()
    root, issuing = env.root_cert, env.issuing_cert
    leaves = {}
    for name in ("client-good", "client-revoked"):
        _, csr = openssl_csr(env.pki.dir, name, subject=f"/CN={name}")
        info, out = env.pki.sign(csr, "tls-client")
        leaves[name] = x509.load_pem_x509_certificates(out.read_bytes())[0]
        fresh = leaves[name].extensions.get_extension_for_class(x509.FreshestCRL).value
        assert fresh[0].full_name[0].value.endswith("/crl/issuing-delta.crl")
        if name == "client-revoked":
            hsm(env.pki.home, "revoke", info["serial"], "--reason", "keyCompromise")
    fetching = {"allow_fetching": True, "revinfo_policy": _policy("CRL_REQUIRED")}
    pyhanko_validate(leaves["client-good"], [issuing], root, "client_auth", **fetching)
    with pytest.raises(revoked_error, match="CRL indicates the end-entity certificate was revoked"):
        pyhanko_validate(leaves["client-revoked"], [issuing], root, "client_auth", **fetching)


# =============================================================== 6. robustness
def _conn(server: CaServer, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def test_concurrent_ocsp_posts(env: Env, server: CaServer) -> None:
    """1,000 POSTs from 8 clients, each on its own keep-alive connection; every
    fifth request carries a nonce. All answered 200 with the right, signed status."""
    leaf_good, leaf_revoked, issuing = env.cert(env.good), env.cert(env.revoked), env.issuing_cert
    targets = [
        (leaf_good, ocsp.OCSPCertStatus.GOOD),
        (leaf_revoked, ocsp.OCSPCertStatus.REVOKED),
        (None, ocsp.OCSPCertStatus.UNKNOWN),
    ]
    plain = [ocsp_request(c, issuing, serial=UNKNOWN_SERIAL) for c, _ in targets]
    serials = [leaf_good.serial_number, leaf_revoked.serial_number, UNKNOWN_SERIAL]
    signatures_before = server.health()["ocsp_signatures"]
    per_client, clients = 125, 8

    def client(index: int) -> tuple[int, int, list[str]]:
        errors: list[str] = []
        fresh = answered = 0  # requests that need a fresh signature
        conn = _conn(server)
        try:
            for i in range(per_client):
                t = (index + i) % 3
                nonce = os.urandom(16) if i % 5 == 0 else None
                body = (
                    plain[t]
                    if nonce is None
                    else ocsp_request(targets[t][0], issuing, serial=UNKNOWN_SERIAL, nonce=nonce)
                )
                # a never-issued serial's answer is never cached: signed every time
                fresh += nonce is not None or targets[t][0] is None
                conn.request(
                    "POST", "/ocsp/issuing", body, {"Content-Type": "application/ocsp-request"}
                )
                r = conn.getresponse()
                data = r.read()
                answered += 1
                if r.status != 200:
                    errors.append(f"client {index} request {i}: HTTP {r.status}")
                    continue
                resp = ocsp.load_der_ocsp_response(data)
                if resp.response_status != SUCCESSFUL:
                    errors.append(f"client {index} request {i}: {resp.response_status}")
                    continue
                if resp.serial_number != serials[t] or resp.certificate_status != targets[t][1]:
                    errors.append(
                        f"client {index} request {i}: {resp.certificate_status} "
                        f"for serial {resp.serial_number:x}"
                    )
                if nonce_of(resp) != nonce:
                    errors.append(f"client {index} request {i}: nonce not echoed")
                check_ocsp_signature(resp, issuing)
        except Exception as e:  # a timeout or reset is a finding, not a crash of the test
            errors.append(f"client {index}: {type(e).__name__}: {e}")
        finally:
            conn.close()
        return answered, fresh, errors

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(client, range(clients)))
    elapsed = time.monotonic() - t0
    errors = [e for _, _, errs in results for e in errs]
    assert not errors, f"{len(errors)} bad answers, first: {errors[:5]}"
    assert sum(a for a, _, _ in results) == per_client * clients
    fresh = sum(n for _, n, _ in results)
    signed = server.health()["ocsp_signatures"] - signatures_before
    # RFC 5019 caching: no-nonce answers for issued certificates come from the cache; each
    # nonce, and each never-issued serial, is signed afresh
    assert fresh <= signed <= fresh + len(targets), (signed, fresh)
    assert elapsed < 30, f"1,000 OCSP requests took {elapsed:.1f} s"


def _raw_exchange(server: CaServer, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (or times out): the raw HTTP answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def _ocsp_status(r: Any) -> ocsp.OCSPResponseStatus:
    assert r.status == 200, f"HTTP {r.status}: {r.body[:200]!r}"
    assert r.header("content-type") == "application/ocsp-response", r.headers
    return ocsp.load_der_ocsp_response(r.body).response_status


def test_malformed_requests_get_malformed_or_4xx_and_the_server_survives(
    env: Env, server: CaServer
) -> None:
    leaf, issuing = env.cert(env.good), env.issuing_cert
    good_request = ocsp_request(leaf, issuing)
    rng = random.Random(6960)
    malformed = ocsp.OCSPResponseStatus.MALFORMED_REQUEST

    assert _ocsp_status(server.post_ocsp("issuing", rng.randbytes(1000))) == malformed
    assert _ocsp_status(server.post_ocsp("issuing", b"")) == malformed
    assert _ocsp_status(server.post_ocsp("issuing", good_request[:-3])) == malformed
    assert _ocsp_status(server.post_ocsp("issuing", rng.randbytes(32 * 1024))) == malformed
    long_nonce = ocsp_request(leaf, issuing, nonce=rng.randbytes(200))  # RFC 8954: > 128
    assert _ocsp_status(server.post_ocsp("issuing", long_nonce)) == malformed
    assert _ocsp_status(server.get("/ocsp/issuing/not*base64!")) == malformed
    assert _ocsp_status(server.get("/ocsp/issuing/" + "QUJD" * 10)) == malformed

    huge = rng.randbytes(100 * 1024)  # more than the server's 64 KiB body limit
    answer = _raw_exchange(
        server,
        b"POST /ocsp/issuing HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/ocsp-request\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(huge) + huge,
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]

    wrong_type = server.post_ocsp("issuing", good_request, content_type="text/plain")
    assert wrong_type.status == 415, (wrong_type.status, wrong_type.body)
    no_request = server.get("/ocsp/issuing")
    assert 400 <= no_request.status < 500, no_request.status

    unknown_ca = server.post_ocsp("nosuchca", good_request)
    assert (
        unknown_ca.status == 404 or _ocsp_status(unknown_ca) == ocsp.OCSPResponseStatus.UNAUTHORIZED
    ), (unknown_ca.status, unknown_ca.body)
    other_ca = server.post_ocsp("root", good_request)  # a CA that did not issue the leaf
    assert _ocsp_status(other_ca) == ocsp.OCSPResponseStatus.UNAUTHORIZED

    not_http = _raw_exchange(server, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 64)
    assert not_http == b"" or not_http.startswith(b"HTTP/1.1 400 "), not_http[:200]

    assert server.alive(), server.log_tail()
    r = server.post_ocsp("issuing", ocsp_request(leaf, issuing, algorithm=hashes.SHA256()))
    assert _ocsp_status(r) == SUCCESSFUL
    assert ocsp.load_der_ocsp_response(r.body).certificate_status == ocsp.OCSPCertStatus.GOOD
    server.health()


def test_idle_and_stalled_connections_do_not_block_others(env: Env, server: CaServer) -> None:
    leaf, issuing = env.cert(env.good), env.issuing_cert
    stalled: list[socket.socket] = []
    try:
        for opening in (
            b"",  # connects and sends nothing
            b"POST /ocsp/issuing HTTP/1.1\r\nHost: t\r\n",  # half the headers
            b"POST /ocsp/issuing HTTP/1.1\r\nHost: t\r\nContent-Type: application/ocsp-request"
            b"\r\nContent-Length: 1000\r\n\r\n0\x82",  # headers, then 2 of 1000 body bytes
        ):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            stalled.append(s)
            if opening:
                s.sendall(opening)
        t0 = time.monotonic()
        for _ in range(10):
            nonce = os.urandom(16)
            r = server.post_ocsp("issuing", ocsp_request(leaf, issuing, nonce=nonce), timeout=5)
            assert _ocsp_status(r) == SUCCESSFUL
            resp = ocsp.load_der_ocsp_response(r.body)
            assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD and nonce_of(resp) == nonce
        server.health()
        assert time.monotonic() - t0 < 10
    finally:
        for s in stalled:
            s.close()


def test_sigterm_shuts_down_gracefully_with_a_keep_alive_client(server: CaServer) -> None:
    """SIGTERM with an idle keep-alive client connected: exit status 0 within 15 s."""
    conn = _conn(server)
    try:
        conn.request("GET", "/health")  # HTTP/1.1: the connection stays open afterwards
        assert conn.getresponse().read()
        rc, seconds = server.stop()
    finally:
        conn.close()
    server.start()  # back up before judging, so a failure here does not cascade
    server.health()
    assert seconds < 15
    assert rc == 0, f"hsm-ca serve exited {rc} on SIGTERM:\n{server.log_tail()}"
