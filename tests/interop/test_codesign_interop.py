"""openssl judges hsm-ca's code signatures and RFC 3161 time stamps.

One home is built with real ``python -m hsm_ca`` processes (root ec-p384 ->
issuing ec-p256, a TSA certified by issuing) and ``hsm-ca serve`` answers
``POST /tsa``. The verdicts come from ``openssl cms -verify`` and
``openssl ts -verify``; ``hsm-ca codesign verify`` must agree with them on valid,
tampered, revoked and expired-but-time-stamped signatures.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, core, parser, tsp
from conftest import run_process
from interop_support import Pki, build_pki, hsm, requires_openssl
from revocation_support import CaServer, free_port, run_openssl

pytestmark = [pytest.mark.interop, requires_openssl]

SIGNER_KEY_TYPES = ["ec-p256", "ec-p384", "rsa-2048", "ed25519"]
OID_SIGNATURE_TIME_STAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"
AT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# ------------------------------------------------------------------ the PKI
@dataclass
class Env:
    pki: Pki
    dir: Path
    port: int
    tsa_policy: str
    tsa_pem: Path
    tsa_untrusted: Path  # TSA certificate + issuing CA (for -untrusted)
    root_with_crls: Path | None = None

    @property
    def home(self) -> Path:
        return self.pki.home


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    directory = tmp_path_factory.mktemp("codesign")
    pki = build_pki(directory)
    tsa = json.loads(hsm(pki.home, "--json", "tsa", "create", "--ca", "issuing"))
    tsa_pem = directory / "tsa.pem"
    hsm(pki.home, "tsa", "export", "-o", str(tsa_pem))
    untrusted = directory / "tsa-untrusted.pem"
    untrusted.write_text(tsa_pem.read_text() + pki.issuing.read_text())
    return Env(pki, directory, free_port(), tsa["policy"], tsa_pem, untrusted)


@pytest.fixture(scope="module")
def server(env: Env) -> Any:
    srv = CaServer(env.home, env.port, env.dir / "serve.log")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop_gracefully()


def new_signer(env: Env, label: str, key_type: str = "ec-p256", *extra: str) -> dict[str, Any]:
    out = hsm(
        env.home,
        "--json",
        "codesign",
        "new-signer",
        label,
        "--ca",
        "issuing",
        "--subject",
        f"CN={label},O=Interop",
        "--key-type",
        key_type,
        *extra,
    )
    info = json.loads(out)
    assert isinstance(info, dict)
    return info


def artifact(env: Env, name: str, size: int = 10_000) -> Path:
    path = env.dir / name
    path.write_bytes(os.urandom(size))
    return path


def flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def ours(env: Env, file: Path, sig: Path, *args: str) -> tuple[int, str]:
    """``hsm-ca codesign verify FILE SIG --trust root.pem ARGS``: (exit code, stdout+stderr)."""
    r = run_process(
        env.home, "codesign", "verify", str(file), str(sig), "--trust", str(env.pki.root), *args
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 1), f"exit {r.returncode}: {r.stderr}"
    if r.returncode == 1:
        assert r.stderr.startswith("Error: "), r.stderr
    return r.returncode, r.stdout + r.stderr


def cms_verify(file: Path, sig: Path, cafile: Path, *args: str | Path) -> tuple[int, str]:
    """``openssl cms -verify -binary -inform DER -content FILE -in SIG -CAfile CA -purpose any``."""
    r = run_openssl(
        "cms",
        "-verify",
        "-binary",
        "-inform",
        "DER",
        "-content",
        file,
        "-in",
        sig,
        "-CAfile",
        cafile,
        "-purpose",
        "any",
        "-out",
        os.devnull,
        *args,
    )
    output = r.stdout + r.stderr
    if r.returncode == 0:
        assert "Verification successful" in output, output
    return r.returncode, output


@cache
def openssl_does_ed25519_cms() -> bool:
    """Can this openssl sign and verify a detached Ed25519 CMS itself? (3.0 cannot.)"""
    with tempfile.TemporaryDirectory() as d:
        key, cert, data, sig = (Path(d) / n for n in ("k.pem", "c.pem", "data", "s.p7s"))
        data.write_bytes(b"probe")
        made = run_openssl(
            "req",
            "-x509",
            "-newkey",
            "ed25519",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-subj",
            "/CN=probe",
            "-days",
            "1",
        )
        if made.returncode != 0:
            return False
        signed = run_openssl(
            "cms",
            "-sign",
            "-binary",
            "-md",
            "sha512",
            "-in",
            data,
            "-signer",
            cert,
            "-inkey",
            key,
            "-outform",
            "DER",
            "-out",
            sig,
        )
        return signed.returncode == 0 and cms_verify(data, sig, cert)[0] == 0


# ---------------------------------------------------------- CMS helpers
def signer_info(sig: Path) -> cms.SignerInfo:
    # field by field: asn1crypto takes seconds on .native of a SignedData holding a token
    info = cms.ContentInfo.load(sig.read_bytes())
    return info["content"]["signer_infos"][0]


def embedded_token(sig: Path) -> tuple[bytes, bytes]:
    """(DER of the signatureTimeStampToken, the signature value it should cover)."""
    si = signer_info(sig)
    attrs = si["unsigned_attrs"]
    assert not isinstance(attrs, core.Void), "no unsigned attributes: no time stamp"
    tokens = [
        a["values"][0].dump() for a in attrs if a["type"].dotted == OID_SIGNATURE_TIME_STAMP_TOKEN
    ]
    assert len(tokens) == 1, "expected one id-aa-signatureTimeStampToken"
    return tokens[0], bytes(si["signature"].native)


def tst_of(token_der: bytes) -> tsp.TSTInfo:
    token = cms.ContentInfo.load(token_der)
    eci = token["content"]["encap_content_info"]
    assert eci["content_type"].native == "tst_info"
    return tsp.TSTInfo.load(eci["content"].parsed.dump())


def split_response(data: bytes) -> tuple[tsp.PKIStatusInfo, bytes | None]:
    """(status, token DER) of a TimeStampResp, strictly DER-parsed."""
    _c, _m, tag, _h, contents, _t = parser.parse(data, strict=True)
    assert tag == 16
    parts = []
    while contents:
        n = parser.peek(contents)
        parts.append(contents[:n])
        contents = contents[n:]
    assert len(parts) in (1, 2), parts
    status = tsp.PKIStatusInfo.load(parts[0])
    status.native  # noqa: B018 - full parse
    return status, parts[1] if len(parts) == 2 else None


def post_tsa(server: CaServer, body: bytes) -> tuple[int, str | None, bytes]:
    r = server.request("POST", "/tsa", body, {"Content-Type": "application/timestamp-query"})
    return r.status, r.header("content-type"), r.body


# ------------------------------------------------------- openssl cms -verify
@pytest.mark.parametrize("key_type", SIGNER_KEY_TYPES)
def test_openssl_cms_verifies_signature(env: Env, key_type: str) -> None:
    new_signer(env, f"rel-{key_type}", key_type)
    file = artifact(env, f"app-{key_type}.tar.gz")
    hsm(env.home, "codesign", "sign", str(file), "--signer", f"rel-{key_type}")
    sig = Path(f"{file}.p7s")
    assert ours(env, file, sig)[0] == 0
    printed = run_openssl("cms", "-cmsout", "-print", "-inform", "DER", "-in", sig)
    assert printed.returncode == 0, printed.stderr
    for attr in ("contentType", "messageDigest", "signingTime", "id-smime-aa-signingCertificateV2"):
        assert attr in printed.stdout, f"openssl sees no {attr} signed attribute"
    assert "eContent: <ABSENT>" in printed.stdout, "not a detached signature"
    if key_type == "ed25519" and not openssl_does_ed25519_cms():
        flip_byte(file, 17)
        assert ours(env, file, sig)[0] == 1
        pytest.skip("this openssl cannot sign or verify an Ed25519 CMS itself (OpenSSL < 3.2)")
    code, output = cms_verify(file, sig, env.pki.chain)
    assert code == 0, output
    # the intermediate comes from the signature: the root alone is enough
    code, output = cms_verify(file, sig, env.pki.root)
    assert code == 0, f"the signature does not carry the issuing CA certificate:\n{output}"
    flip_byte(file, 17)
    code, output = cms_verify(file, sig, env.pki.chain)
    assert code != 0 and "Verification successful" not in output
    code, output = ours(env, file, sig)
    assert code == 1 and "does not match" in output


# ---------------------------------------------------------- openssl ts -verify
TS_VARIANTS = {
    "cert": ["-cert"],
    "cert-no-nonce": ["-cert", "-no_nonce"],
    "no-cert": [],
    "policy": ["-cert", "-tspolicy", "POLICY"],
}


@pytest.mark.parametrize("variant", sorted(TS_VARIANTS))
def test_openssl_ts_verifies_server_replies(env: Env, server: CaServer, variant: str) -> None:
    data = artifact(env, f"ts-{variant}.bin", 2000)
    query = env.dir / f"ts-{variant}.tsq"
    flags = [env.tsa_policy if f == "POLICY" else f for f in TS_VARIANTS[variant]]
    r = run_openssl("ts", "-query", "-data", data, "-sha256", *flags, "-out", query)
    assert r.returncode == 0, r.stderr
    status, ctype, body = post_tsa(server, query.read_bytes())
    assert status == 200 and ctype == "application/timestamp-reply", (status, ctype, body[:200])
    reply = env.dir / f"ts-{variant}.tsr"
    reply.write_bytes(body)
    text = run_openssl("ts", "-reply", "-in", reply, "-text")
    assert text.returncode == 0 and "Status: Granted." in text.stdout, text.stdout + text.stderr
    assert f"Policy OID: {env.tsa_policy}" in text.stdout
    for how in (["-data", data], ["-queryfile", query]):
        v = run_openssl(
            "ts",
            "-verify",
            *how,
            "-in",
            reply,
            "-CAfile",
            env.pki.root,
            "-untrusted",
            env.tsa_untrusted,
        )
        assert v.returncode == 0 and "Verification: OK" in v.stdout, (how, v.stdout + v.stderr)
    # the nonce is echoed exactly when one was sent; the certificate only when asked for
    req = tsp.TimeStampReq.load(query.read_bytes())
    resp_status, token = split_response(body)
    assert resp_status["status"].native == "granted" and token is not None
    tst = tst_of(token)
    assert tst["nonce"].native == req["nonce"].native
    assert ("-no_nonce" in flags) == (req["nonce"].native is None)
    certs = cms.ContentInfo.load(token)["content"]["certificates"]
    assert isinstance(certs, core.Void) == ("-cert" not in flags)
    # and a reply is about this data only
    other = artifact(env, f"ts-{variant}-other.bin", 100)
    v = run_openssl(
        "ts",
        "-verify",
        "-data",
        other,
        "-in",
        reply,
        "-CAfile",
        env.pki.root,
        "-untrusted",
        env.tsa_untrusted,
    )
    assert v.returncode != 0 and "Verification: OK" not in v.stdout


def test_fifty_stamps_have_unique_serials(env: Env, server: CaServer) -> None:
    serials, nonces = [], []
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for i in range(50):
            nonce = int.from_bytes(os.urandom(8), "big") | 1
            req = tsp.TimeStampReq(
                {
                    "version": "v1",
                    "message_imprint": {
                        "hash_algorithm": {"algorithm": "sha256"},
                        "hashed_message": hashlib.sha256(b"%d" % i).digest(),
                    },
                    "nonce": nonce,
                    "cert_req": i % 2 == 0,
                }
            ).dump()
            conn.request(
                "POST", "/tsa", body=req, headers={"Content-Type": "application/timestamp-query"}
            )
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, body
            status, token = split_response(body)
            assert status["status"].native == "granted" and token is not None, status.native
            tst = tst_of(token)
            assert tst["nonce"].native == nonce
            assert tst["policy"].native == env.tsa_policy
            serials.append(tst["serial_number"].native)
            nonces.append(nonce)
    finally:
        conn.close()
    assert len(set(serials)) == 50, "time-stamp serial numbers repeat"
    records = json.loads(hsm(env.home, "--json", "audit", "list"))
    issued = {
        r["serial"] for r in records if r["action"] == "timestamp" and r["outcome"] == "issued"
    }
    missing = {format(s, "x") for s in serials} - issued
    assert not missing, f"time stamps without an audit record: {sorted(missing)[:5]}"
    hsm(env.home, "audit", "verify")


def test_garbage_to_tsa_gets_a_rejection(env: Env, server: CaServer) -> None:
    data = artifact(env, "garbage-base.bin", 100)
    good = env.dir / "good.tsq"
    sha1 = env.dir / "sha1.tsq"
    assert (
        run_openssl("ts", "-query", "-data", data, "-sha256", "-cert", "-out", good).returncode == 0
    )
    assert run_openssl("ts", "-query", "-data", data, "-sha1", "-out", sha1).returncode == 0
    query = good.read_bytes()
    bodies = {
        "empty": b"",
        "text": b"please time-stamp this",
        "random": os.urandom(1000),
        "truncated": query[:-5],
        "trailing": query + b"\x00\x00",
        "huge length": b"\x30\x84\x7f\xff\xff\xff" + query[2:],
        "sha1": sha1.read_bytes(),
        "other policy": tsp.TimeStampReq(
            {
                "version": "v1",
                "req_policy": "1.3.6.1.4.1.99999.1",
                "message_imprint": {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "hashed_message": b"\x00" * 32,
                },
            }
        ).dump(),
        "oversized": os.urandom(20_000),
    }
    problems = []
    for name, body in bodies.items():
        status, ctype, reply = post_tsa(server, body)
        if status != 200 or ctype != "application/timestamp-reply":
            problems.append(f"{name}: HTTP {status} {ctype}")
            continue
        path = env.dir / f"garbage-{name.replace(' ', '-')}.tsr"
        path.write_bytes(reply)
        text = run_openssl("ts", "-reply", "-in", path, "-text")
        if text.returncode != 0 or "Status: Rejected." not in text.stdout:
            problems.append(f"{name}: openssl reads {text.stdout + text.stderr!r}")
        resp_status, token = split_response(reply)
        if resp_status["status"].native != "rejection" or token is not None:
            problems.append(f"{name}: status {resp_status.native}")
        if not resp_status["fail_info"].native:
            problems.append(f"{name}: no failInfo")
    assert not problems, "\n".join(problems)
    # bigger than the server takes at all: an HTTP error, never a 5xx or a dead server
    status, _ctype, _body = post_tsa(server, os.urandom(100_000))
    assert status < 500
    assert server.get("/tsa").status == 405
    server.health()
    assert server.alive()


# ----------------------------------------------------- agreement: revocation
def test_revoked_signer_agreement(env: Env) -> None:
    keep, gone = new_signer(env, "keep"), new_signer(env, "gone")
    files = {label: artifact(env, f"rev-{label}.bin") for label in ("keep", "gone")}
    for label, file in files.items():
        hsm(env.home, "codesign", "sign", str(file), "--signer", label)
    hsm(env.home, "revoke", gone["serial"], "--reason", "keyCompromise")
    issuing_crl, root_crl, issuing_der = (
        env.dir / n for n in ("issuing.crl", "root.crl", "issuing.crl.der")
    )
    hsm(env.home, "crl", "issuing", "-o", str(issuing_crl))
    hsm(env.home, "crl", "root", "-o", str(root_crl))
    hsm(env.home, "crl", "issuing", "--der", "-o", str(issuing_der))
    cafile = env.dir / "root-and-crls.pem"
    cafile.write_text(env.pki.root.read_text() + issuing_crl.read_text() + root_crl.read_text())
    for label, file in files.items():
        sig = Path(f"{file}.p7s")
        crl_args = ("--crl", str(issuing_crl), "--crl", str(root_crl))
        for check in ("-crl_check", "-crl_check_all"):
            code, output = cms_verify(file, sig, cafile, check)
            if label == "keep":
                assert code == 0, output
            else:
                assert code != 0 and "revoked" in output, output
        code, output = ours(env, file, sig, *crl_args)
        assert code == (0 if label == "keep" else 1), output
        if label == "gone":
            assert "revoked" in output
            # DER CRL too
            code, output = ours(env, file, sig, "--crl", str(issuing_der), "--crl", str(root_crl))
            assert code == 1 and "revoked" in output
        # without revocation data both accept it (nothing says otherwise)
        assert cms_verify(file, sig, env.pki.root)[0] == 0
        assert ours(env, file, sig)[0] == 0
    # and the revoked signer signs no more
    late = artifact(env, "rev-late.bin", 10)
    r = run_process(env.home, "codesign", "sign", str(late), "--signer", "gone")
    assert r.returncode == 1 and "revoked" in r.stderr and not Path(f"{late}.p7s").exists()
    assert keep["status"] == "valid"


# ------------------------------------------- agreement: expired, time-stamped
def test_expired_but_timestamped(env: Env) -> None:
    info = new_signer(env, "short", "ec-p256", "--days", "1")
    file = artifact(env, "short.bin")
    stamped, plain = env.dir / "short.stamped.p7s", env.dir / "short.plain.p7s"
    hsm(
        env.home,
        "codesign",
        "sign",
        str(file),
        "--signer",
        "short",
        "--timestamp",
        "-o",
        str(stamped),
    )
    hsm(env.home, "codesign", "sign", str(file), "--signer", "short", "-o", str(plain))
    records = json.loads(hsm(env.home, "--json", "audit", "list"))
    signed = [
        r
        for r in records
        if r["action"] == "codesign" and r["outcome"] == "signed" and r["serial"] == info["serial"]
    ]
    assert len(signed) == 2 and all("short.bin" in r["detail"] for r in signed)

    # the embedded token is over the signature value, per openssl ts
    token_der, signature_value = embedded_token(stamped)
    token = env.dir / "short.token.der"
    token.write_bytes(token_der)
    digest = hashlib.sha256(signature_value).hexdigest()
    v = run_openssl(
        "ts",
        "-verify",
        "-digest",
        digest,
        "-token_in",
        "-in",
        token,
        "-CAfile",
        env.pki.root,
        "-untrusted",
        env.tsa_untrusted,
    )
    assert v.returncode == 0 and "Verification: OK" in v.stdout, v.stdout + v.stderr
    v = run_openssl(
        "ts",
        "-verify",
        "-digest",
        hashlib.sha256(b"other").hexdigest(),
        "-token_in",
        "-in",
        token,
        "-CAfile",
        env.pki.root,
        "-untrusted",
        env.tsa_untrusted,
    )
    assert v.returncode != 0
    stamp_records = [
        r
        for r in records
        if r["action"] == "timestamp"
        and r["outcome"] == "issued"
        and r["serial"] == format(tst_of(token_der)["serial_number"].native, "x")
    ]
    assert len(stamp_records) == 1, "the signature's time stamp has no audit record"

    gen_time: dt.datetime = tst_of(token_der)["gen_time"].native
    stamp_second = gen_time.replace(microsecond=0)
    later = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=30)

    # today: both valid, for both tools (ours on the time-stamped one is checked below)
    for sig in (stamped, plain):
        assert cms_verify(file, sig, env.pki.root)[0] == 0
    assert ours(env, file, plain)[0] == 0
    # as of the time stamp: both valid, for both tools
    for sig in (stamped, plain):
        code, output = cms_verify(
            file, sig, env.pki.root, "-attime", str(int(stamp_second.timestamp()))
        )
        assert code == 0, output
    code, output = ours(env, file, plain, "--at", stamp_second.strftime(AT_FORMAT))
    assert code == 0, output
    # 30 days on the signer has expired: openssl (which ignores time stamps) refuses both
    for sig in (stamped, plain):
        code, output = cms_verify(file, sig, env.pki.root, "-attime", str(int(later.timestamp())))
        assert code != 0 and "expired" in output, output
    # ours: the plain one is invalid, the time-stamped one valid (signed while the cert was)
    code, output = ours(env, file, plain, "--at", later.strftime(AT_FORMAT))
    assert code == 1 and ("expired" in output or "chain" in output), output
    r = run_process(
        env.home,
        "--json",
        "codesign",
        "verify",
        str(file),
        str(stamped),
        "--trust",
        str(env.pki.root),
        "--at",
        later.strftime(AT_FORMAT),
    )
    assert r.returncode == 0, r.stderr
    verdict = json.loads(r.stdout)
    assert verdict["ok"] is True and verdict["timestamp"]
    assert abs(
        dt.datetime.fromisoformat(verdict["timestamp"].replace("Z", "+00:00")) - gen_time
    ) < dt.timedelta(seconds=1)


# ------------------------------- issue 14 finding 2: a home's delta CRL, its TSA pinned
def test_delta_crl_alone_is_not_complete(env: Env) -> None:
    """Revoked before the full CRL, so only the full one lists it: the delta alone says nothing."""
    info = new_signer(env, "delta-kc")
    file = artifact(env, "delta-kc.bin")
    hsm(env.home, "codesign", "sign", str(file), "--signer", "delta-kc")
    sig = Path(f"{file}.p7s")
    hsm(env.home, "revoke", info["serial"], "--reason", "keyCompromise")
    full, delta, root_crl = (env.dir / n for n in ("dk-full.crl", "dk-delta.crl", "dk-root.crl"))
    hsm(env.home, "crl", "issuing", "-o", str(full))
    hsm(env.home, "crl", "issuing", "--delta", "-o", str(delta))
    hsm(env.home, "crl", "root", "-o", str(root_crl))
    for crls, word in (([delta], "delta CRL is not a complete CRL"), ([full], "revoked"),
                       ([full, delta], "revoked")):
        args = [a for c in [root_crl, *crls] for a in ("--crl", str(c))]
        code, output = ours(env, file, sig, *args)
        assert code == 1 and word in output, output
        cafile = env.dir / "dk-ca.pem"
        cafile.write_text("".join(p.read_text() for p in [env.pki.root, root_crl, *crls]))
        code, output = cms_verify(file, sig, cafile, "-crl_check_all", "-extended_crl")
        assert code != 0, output


def test_home_tsa_is_the_pinned_one(env: Env, tmp_path: Path) -> None:
    """In the home its TSA is pinned; elsewhere only ``--tsa-trust`` pins one, else unused."""
    new_signer(env, "pin-short", "ec-p256", "--days", "1")
    file = artifact(env, "pin-short.bin")
    sig = env.dir / "pin-short.p7s"
    hsm(env.home, "codesign", "sign", str(file), "--signer", "pin-short", "--timestamp",
        "-o", str(sig))
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).strftime(AT_FORMAT)
    assert ours(env, file, sig, "--at", later)[0] == 0  # in the home: its TSA
    nowhere = tmp_path / "not-a-home"
    base = ["codesign", "verify", str(file), str(sig), "--trust", str(env.pki.root),
            "--at", later]
    r = run_process(nowhere, *base)
    assert r.returncode == 1 and "the time stamp was not used" in r.stderr, r.stderr
    assert "--tsa-trust" in r.stderr and r.stderr.count("\n") == 1
    r = run_process(nowhere, *base, "--tsa-trust", str(env.tsa_pem))
    assert r.returncode == 0 and "time-stamped" in r.stdout, r.stderr
    # pinning another certificate (the issuing CA's) leaves the stamp unused
    r = run_process(nowhere, *base, "--tsa-trust", str(env.pki.issuing))
    assert r.returncode == 1 and "not the pinned" in r.stderr, r.stderr
    # today, unpinned, the signer is still valid and the output says the stamp was not used
    r = run_process(nowhere, *base[:-2])
    assert r.returncode == 0 and "Note: the time stamp was not used" in r.stdout, r.stdout
    r = run_process(nowhere, *base[:-2], "--tsa-trust", str(tmp_path / "missing.pem"))
    assert r.returncode in (1, 2) and r.stderr.startswith("Error: "), r.stderr
