"""Code signing and the time-stamping authority through the CLI and the library.

Signatures are taken apart here with asn1crypto and checked with cryptography,
independently of hsm_ca's own verifier, which is exercised separately
(openssl's verdicts are in tests/interop/test_codesign_interop.py).

asn1crypto is slow on a whole SignedData that nests a time-stamp token
(``.native`` or ``dump(force=True)`` take seconds), so these helpers only
ever read the fields they need.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, core, parser, tsp
from conftest import USER_PIN, Cli, make_csr, make_key
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

import hsm_ca.codesign
from hsm_ca.authority import Authority
from hsm_ca.config import load_config
from hsm_ca.tsa import TimeStampAuthority, make_request

SIGNER_KEY_TYPES = ["ec-p256", "ec-p384", "rsa-2048", "ed25519"]
STRONG_DIGESTS = {"sha256", "sha384", "sha512"}
REQUIRED_SIGNED_ATTRS = {"content_type", "message_digest", "signing_time", "signing_certificate_v2"}
OID_SIGNATURE_TIME_STAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"


# ------------------------------------------------------------------ helpers
def _json(cli: Cli, *args: str) -> Any:
    return json.loads(cli.ok("--json", *args).out)


def _export(cli: Cli, tmp_path: Path, name: str = "root") -> Path:
    path = tmp_path / f"{name}.pem"
    cli.ok("ca", "export", name, "-o", str(path))
    return path


def _cert(cli: Cli, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cli.ok("ca", "export", name).out.encode())


def _new_signer(cli: Cli, label: str, key_type: str = "ec-p256", *extra: str) -> dict[str, Any]:
    info = _json(
        cli,
        "codesign",
        "new-signer",
        label,
        "--ca",
        "issuing",
        "--subject",
        f"CN={label} Release Signing,O=Test",
        "--key-type",
        key_type,
        *extra,
    )
    assert isinstance(info, dict), info
    return info


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _audit(cli: Cli) -> list[dict[str, Any]]:
    rows = _json(cli, "audit", "list")
    assert isinstance(rows, list)
    return rows


def _signing_records(cli: Cli, since: int = 0) -> list[tuple[str, str]]:
    """(action, outcome) of code-signing and time-stamp records after the first ``since``."""
    return [
        (a["action"], a["outcome"])
        for a in _audit(cli)[since:]
        if a["action"] in ("codesign", "timestamp")
    ]


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, f"expected one 'Error:' line on stderr, got:\n{err}"
    return lines[0]


class Signature:
    """A detached CMS signature file, read lazily (never ``.native`` on the whole)."""

    def __init__(self, path: Path) -> None:
        self.der = path.read_bytes()
        self.info = cms.ContentInfo.load(self.der)
        assert self.info["content_type"].native == "signed_data"
        self.signed = self.info["content"]
        infos = self.signed["signer_infos"]
        assert len(infos) == 1, "expected exactly one SignerInfo"
        self.si = infos[0]

    @property
    def detached(self) -> bool:
        eci = self.signed["encap_content_info"]
        return eci["content_type"].native == "data" and isinstance(eci["content"], core.Void)

    @property
    def digest_name(self) -> str:
        return str(self.si["digest_algorithm"]["algorithm"].native)

    @property
    def signature_value(self) -> bytes:
        return bytes(self.si["signature"].native)

    def signed_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for attr in self.si["signed_attrs"]:
            name = attr["type"].native
            assert name not in out, f"signed attribute {name} appears twice"
            assert len(attr["values"]) == 1, f"{name} must have exactly one value"
            out[name] = attr["values"][0]
        return out

    def unsigned_attrs(self) -> dict[str, Any]:
        attrs = self.si["unsigned_attrs"]
        if isinstance(attrs, core.Void):
            return {}
        out: dict[str, Any] = {}
        for attr in attrs:
            out[attr["type"].dotted] = attr["values"][0]
        return out

    def certificates(self) -> list[x509.Certificate]:
        certs = []
        for choice in self.signed["certificates"]:
            assert choice.name == "certificate"
            certs.append(x509.load_der_x509_certificate(choice.chosen.dump()))
        return certs

    def signer_cert(self) -> x509.Certificate:
        sid = self.si["sid"]
        assert sid.name == "issuer_and_serial_number"
        serial = sid.chosen["serial_number"].native
        issuer = sid.chosen["issuer"].dump()
        found = [
            c
            for c in self.certificates()
            if c.serial_number == serial and c.issuer.public_bytes() == issuer
        ]
        assert len(found) == 1, "the SignerIdentifier names no embedded certificate"
        return found[0]

    def signed_attrs_der(self) -> bytes:
        # RFC 5652 5.4: the signature covers the attributes with an explicit SET OF tag
        return b"\x31" + self.si["signed_attrs"].dump()[1:]

    def token(self) -> cms.ContentInfo:
        attrs = self.unsigned_attrs()
        assert OID_SIGNATURE_TIME_STAMP_TOKEN in attrs, "no id-aa-signatureTimeStampToken"
        return cms.ContentInfo.load(attrs[OID_SIGNATURE_TIME_STAMP_TOKEN].dump())


def verify_raw(key: Any, signature: bytes, data: bytes, digest_name: str) -> None:
    """Raise unless ``signature`` by ``key`` over ``data`` verifies (hash ``digest_name``)."""
    h = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[
        digest_name
    ]
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(h))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), h)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, data)
    else:
        raise AssertionError(f"unexpected key {key!r}")


def der_elements(data: bytes) -> list[bytes]:
    """The DER encodings of the elements of a SEQUENCE (strict: no trailing bytes)."""
    _cls, _method, tag, _header, contents, _trailer = parser.parse(data, strict=True)
    assert tag == 16, "not a SEQUENCE"
    out = []
    while contents:
        n = parser.peek(contents)
        out.append(contents[:n])
        contents = contents[n:]
    return out


def parse_tsa_response(data: bytes) -> tuple[tsp.PKIStatusInfo, cms.ContentInfo | None]:
    """(status, token) of a TimeStampResp (asn1crypto insists on a token, so split by hand)."""
    elements = der_elements(data)
    assert 1 <= len(elements) <= 2, f"TimeStampResp with {len(elements)} elements"
    status = tsp.PKIStatusInfo.load(elements[0])
    status.native  # noqa: B018 - full parse: a malformed status fails here
    token = cms.ContentInfo.load(elements[1]) if len(elements) == 2 else None
    return status, token


def tst_info(token: cms.ContentInfo) -> tsp.TSTInfo:
    signed = token["content"]
    eci = signed["encap_content_info"]
    assert eci["content_type"].native == "tst_info"
    return tsp.TSTInfo.load(eci["content"].parsed.dump())


def check_token_signature(token: cms.ContentInfo, tsa_cert: x509.Certificate) -> None:
    """The token's SignerInfo is by ``tsa_cert`` and covers the TSTInfo (RFC 3161 / RFC 5652)."""
    signed = token["content"]
    si = signed["signer_infos"][0]
    sid = si["sid"].chosen
    assert sid["serial_number"].native == tsa_cert.serial_number
    attrs = {a["type"].native: a["values"][0] for a in si["signed_attrs"]}
    digest_name = si["digest_algorithm"]["algorithm"].native
    tst_der = signed["encap_content_info"]["content"].parsed.dump()
    assert attrs["message_digest"].native == hashlib.new(digest_name, tst_der).digest()
    assert attrs["content_type"].native == "tst_info"
    ess = attrs["signing_certificate_v2"]["certs"][0]
    assert (
        ess["cert_hash"].native
        == hashlib.new(
            ess["hash_algorithm"]["algorithm"].native,
            tsa_cert.public_bytes(serialization.Encoding.DER),
        ).digest()
    )
    verify_raw(
        tsa_cert.public_key(),
        si["signature"].native,
        b"\x31" + si["signed_attrs"].dump()[1:],
        digest_name,
    )


def _check_signature_file(
    sig_path: Path, data: bytes, signer_pem: str, issuing: x509.Certificate
) -> Signature:
    """Everything the issue asks of a signature file, checked without hsm_ca's verifier."""
    raw = sig_path.read_bytes()
    assert raw[0] == 0x30 and raw[1] != 0x80, "not DER (indefinite length or not a SEQUENCE)"
    sig = Signature(sig_path)
    assert sig.detached, "the signature must be detached (no eContent)"
    assert sig.digest_name in STRONG_DIGESTS, f"weak digest {sig.digest_name}"
    digest_algs = {a["algorithm"].native for a in sig.signed["digest_algorithms"]}
    assert sig.digest_name in digest_algs
    signer = x509.load_pem_x509_certificate(signer_pem.encode())
    assert sig.signer_cert() == signer
    embedded = sig.certificates()
    assert signer in embedded and issuing in embedded, "signer and intermediate must be embedded"
    attrs = sig.signed_attrs()
    missing = REQUIRED_SIGNED_ATTRS - set(attrs)
    assert not missing, f"signed attributes lack {sorted(missing)}: {sorted(attrs)}"
    assert attrs["content_type"].native == "data"
    assert attrs["message_digest"].native == hashlib.new(sig.digest_name, data).digest()
    signing_time = attrs["signing_time"].native
    assert abs(signing_time - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=10)
    ess = attrs["signing_certificate_v2"]["certs"][0]
    ess_alg = ess["hash_algorithm"]["algorithm"].native
    assert ess_alg in STRONG_DIGESTS
    assert (
        ess["cert_hash"].native
        == hashlib.new(ess_alg, signer.public_bytes(serialization.Encoding.DER)).digest()
    )
    issuer_serial = ess["issuer_serial"]
    if not isinstance(issuer_serial, core.Void):
        assert issuer_serial["serial_number"].native == signer.serial_number
    verify_raw(signer.public_key(), sig.signature_value, sig.signed_attrs_der(), sig.digest_name)
    signer.verify_directly_issued_by(issuing)
    return sig


@pytest.fixture
def root_pem(pki: Cli, tmp_path: Path) -> Path:
    return _export(pki, tmp_path)


# ------------------------------------------------------------------ signers
def test_new_signer_key_in_hsm_and_code_signing_certificate(pki: Cli) -> None:
    info = _new_signer(pki, "release", "ec-p256", "--days", "30")
    assert info["status"] == "valid" and info["ca"] == "issuing"
    row = {r["label"]: r for r in _json(pki, "codesign", "list")}["release"]
    cert_info = _json(pki, "show", info["serial"])
    cert = x509.load_pem_x509_certificate(cert_info["pem"].encode())
    assert format(cert.serial_number, "x") == info["serial"] == row["serial"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (
        ku.value.key_cert_sign
        or ku.value.crl_sign
        or ku.value.key_encipherment
        or ku.value.content_commitment
        or ku.value.key_agreement
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject.rfc4514_string() == "CN=release Release Signing,O=Test"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, seconds=2)
    cert.verify_directly_issued_by(_cert(pki, "issuing"))
    # the private key was generated in the HSM: non-extractable, attributed to the signer
    keys = {k["label"]: k for k in _json(pki, "keys", "list")}
    key = keys[info["key_label"]]
    assert key["key_type"] == "ec-p256" and key["extractable"] is False
    assert key["used_by"] and "release" in key["used_by"], (
        f"keys list does not say what uses the signer key: {key}"
    )
    # a second signer of the same label is refused
    r = pki("codesign", "new-signer", "release", "--ca", "issuing", "--subject", "CN=x")
    assert r.code == 1
    _error_line(r.err)


@pytest.mark.parametrize("key_type", SIGNER_KEY_TYPES)
def test_sign_and_verify(pki: Cli, root_pem: Path, tmp_path: Path, key_type: str) -> None:
    info = _new_signer(pki, f"s-{key_type}", key_type)
    data = os.urandom(4096) + b"release artifact\n"
    artifact = _write(tmp_path / "app-1.0.tar.gz", data)
    out = _json(pki, "codesign", "sign", str(artifact), "--signer", f"s-{key_type}")
    sig_path = Path(f"{artifact}.p7s")
    assert out["signature_file"] == str(sig_path) and sig_path.exists()
    assert out["size"] == len(data) and out["sha256"] == hashlib.sha256(data).hexdigest()
    assert out["serial"] == info["serial"] and out["timestamped"] is False
    signer_pem = _json(pki, "show", info["serial"])["pem"]
    sig = _check_signature_file(sig_path, data, signer_pem, _cert(pki, "issuing"))
    assert sig.unsigned_attrs() == {}
    if key_type == "ec-p384":
        assert sig.digest_name in {"sha384", "sha512"}
    # hsm_ca's verifier: valid, then invalid with a reason after one byte changes
    verdict = _json(
        pki, "codesign", "verify", str(artifact), str(sig_path), "--trust", str(root_pem)
    )
    assert (
        verdict["ok"] is True
        and verdict["signer"] == "CN=s-" + key_type + " Release Signing,O=Test"
    )
    tampered = bytearray(data)
    tampered[100] ^= 0x01
    artifact.write_bytes(bytes(tampered))
    r = pki("codesign", "verify", str(artifact), str(sig_path), "--trust", str(root_pem))
    assert r.code == 1
    assert "does not match" in _error_line(r.err)
    # the signature is audited: file name, size, SHA-256, signer label, signer serial
    records = [a for a in _audit(pki) if a["action"] == "codesign" and a["outcome"] == "signed"]
    assert len(records) == 1
    rec = records[0]
    assert rec["serial"] == info["serial"] and rec["key_label"] == info["key_label"]
    for needle in (
        "app-1.0.tar.gz",
        str(len(data)),
        hashlib.sha256(data).hexdigest(),
        f"s-{key_type}",
    ):
        assert needle in rec["detail"], (needle, rec)
    assert rec["object_sha256"] == hashlib.sha256(sig.der).hexdigest()
    pki.ok("audit", "verify")


def test_verifier_reasons(soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = soft_pki
    root_pem = _export(cli, tmp_path)
    _new_signer(cli, "rel")
    artifact = _write(tmp_path / "tool.bin", b"\x7fELF" + os.urandom(2000))
    cli.ok("codesign", "sign", str(artifact), "--signer", "rel", "-o", str(tmp_path / "tool.sig"))
    sig_path = tmp_path / "tool.sig"
    assert not Path(f"{artifact}.p7s").exists()

    def verdict(sig: Path, trust: Path = root_pem, *extra: str) -> tuple[int, str]:
        r = cli("codesign", "verify", str(artifact), str(sig), "--trust", str(trust), *extra)
        _no_traceback(r.err)
        if r.code == 0:
            return 0, r.out
        line = _error_line(r.err)
        prefix = "Error: invalid signature: "
        assert line.startswith(prefix), line
        return r.code, line[len(prefix) :]

    assert verdict(sig_path)[0] == 0
    # another root: the chain does not lead to the trust anchor
    other = tmp_path / "other-home"
    other_cli = Cli(other, cli.capsys, monkeypatch)
    other_cli.ok("init", "--scrypt-n", "1024")
    other_cli.ok("ca", "create-root", "root", "--subject", "CN=Test Root CA,O=Test,C=NL")
    other_root = tmp_path / "other.pem"
    other_cli.ok("ca", "export", "root", "-o", str(other_root))
    code, reason = verdict(sig_path, other_root)
    assert code == 1 and "chain" in reason
    # the signature value altered
    raw = bytearray(sig_path.read_bytes())
    sig_value = Signature(sig_path).signature_value
    at = bytes(raw).rindex(sig_value)
    raw[at + len(sig_value) // 2] ^= 0x01
    bad = _write(tmp_path / "bad-signature.sig", bytes(raw))
    code, reason = verdict(bad)
    assert code == 1 and "does not verify" in reason
    # not a signature at all
    code, reason = verdict(_write(tmp_path / "junk.sig", b"\x30\x03\x02\x01\x01"))
    assert code == 1
    code, reason = verdict(_write(tmp_path / "empty.sig", b""))
    assert code == 1
    # a signature over other content
    other_file = _write(tmp_path / "other.bin", b"something else")
    cli.ok("codesign", "sign", str(other_file), "--signer", "rel")
    code, reason = verdict(Path(f"{other_file}.p7s"))
    assert code == 1 and "does not match" in reason


def test_verifier_needs_code_signing_eku_and_accepts_foreign_cms(
    soft_pki: Cli, tmp_path: Path
) -> None:
    """A CMS made by another producer (cryptography) verifies; a TLS client cert is refused."""
    cli = soft_pki
    root_pem = _export(cli, tmp_path)
    issuing = _cert(cli, "issuing")
    artifact = _write(tmp_path / "pkg.whl", os.urandom(3000))
    results = {}
    for profile in ("code-signing", "tls-client"):
        key = make_key("ec-p256")
        csr = _write(tmp_path / f"{profile}.csr", make_csr(cn=f"{profile} signer", key=key))
        issued = _json(cli, "sign", str(csr), "--ca", "issuing", "--profile", profile)
        cert = x509.load_pem_x509_certificate(issued["pem"].encode())
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(artifact.read_bytes())
            .add_signer(cert, key, hashes.SHA256())  # type: ignore[arg-type]
            .add_certificate(issuing)
            .sign(
                serialization.Encoding.DER,
                [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
            )
        )
        sig = _write(tmp_path / f"{profile}.p7s", der)
        r = cli("codesign", "verify", str(artifact), str(sig), "--trust", str(root_pem))
        _no_traceback(r.err)
        results[profile] = r
    assert results["code-signing"].code == 0, results["code-signing"].err
    assert results["tls-client"].code == 1
    assert "codesigning" in _error_line(results["tls-client"].err).lower()


def test_several_files_in_one_call(soft_pki: Cli, tmp_path: Path) -> None:
    cli = soft_pki
    root_pem = _export(cli, tmp_path)
    info = _new_signer(cli, "multi")
    files = [_write(tmp_path / f"part-{i}.bin", os.urandom(1000 + i)) for i in range(3)]
    out = _json(cli, "codesign", "sign", *map(str, files), "--signer", "multi")
    assert isinstance(out, list) and [o["file"] for o in out] == [str(f) for f in files]
    for f, o in zip(files, out, strict=True):
        assert o["signature_file"] == f"{f}.p7s"
        cli.ok("codesign", "verify", str(f), o["signature_file"], "--trust", str(root_pem))
    # a signature of one file does not verify another
    r = cli("codesign", "verify", str(files[0]), f"{files[1]}.p7s", "--trust", str(root_pem))
    assert r.code == 1
    # human output (progress bar on stderr), still one signature per file
    for f in files:
        Path(f"{f}.p7s").unlink()
    r = cli.ok("codesign", "sign", *map(str, files), "--signer", "multi")
    for f in files:
        assert f"{f}.p7s" in r.out and Path(f"{f}.p7s").exists()
    signed = [a for a in _audit(cli) if a["action"] == "codesign" and a["outcome"] == "signed"]
    assert len(signed) == 6 and {a["serial"] for a in signed} == {info["serial"]}
    for f in files:
        size, sha = f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()
        mine = [a for a in signed if f"{f.name}" in a["detail"]]
        assert len(mine) == 2 and all(str(size) in a["detail"] and sha in a["detail"] for a in mine)
    # -o with several files is a usage error and writes nothing
    for f in files:
        Path(f"{f}.p7s").unlink()
    r = cli(
        "codesign", "sign", *map(str, files), "--signer", "multi", "-o", str(tmp_path / "x.p7s")
    )
    assert r.code == 2
    _error_line(r.err)
    assert not (tmp_path / "x.p7s").exists()
    assert not any(Path(f"{f}.p7s").exists() for f in files)


def test_revoked_signer_is_refused_and_recorded(pki: Cli, tmp_path: Path) -> None:
    info = _new_signer(pki, "gone")
    artifact = _write(tmp_path / "late.bin", b"late release")
    early = _write(tmp_path / "early.bin", b"early release")
    pki.ok("codesign", "sign", str(early), "--signer", "gone")
    pki.ok("revoke", info["serial"], "--reason", "keyCompromise")
    listed = {r["label"]: r for r in _json(pki, "codesign", "list")}
    assert listed["gone"]["status"] == "revoked"
    human = pki.ok("codesign", "list").out
    assert "gone" in human and "revoked" in human
    before = len(_audit(pki))
    for extra in ((), ("-o", str(tmp_path / "late.sig"))):
        r = pki("codesign", "sign", str(artifact), "--signer", "gone", *extra)
        assert r.code == 1
        _no_traceback(r.err)
        assert "revoked" in _error_line(r.err)
    assert not Path(f"{artifact}.p7s").exists() and not (tmp_path / "late.sig").exists()
    new = _audit(pki)[before:]
    refused = [a for a in new if a["action"] == "codesign" and a["outcome"] == "refused"]
    assert len(refused) == 2, new
    assert all("late.bin" in a["detail"] and a["key_label"] == info["key_label"] for a in refused)
    assert not [
        a for a in new if a["action"] in ("codesign", "timestamp") and a["outcome"] != "refused"
    ]
    # the signature made before revocation: valid without revocation data, invalid with the CRL
    root_pem = _export(pki, tmp_path)
    crls = []
    for ca in ("issuing", "root"):
        crls += ["--crl", str(tmp_path / f"{ca}.crl")]
        pki.ok("crl", ca, "-o", str(tmp_path / f"{ca}.crl"))
    sig = f"{early}.p7s"
    pki.ok("codesign", "verify", str(early), sig, "--trust", str(root_pem))
    r = pki("codesign", "verify", str(early), sig, "--trust", str(root_pem), *crls)
    assert r.code == 1 and "revoked" in _error_line(r.err)
    pki.ok("audit", "verify")


def test_unknown_signer_refused_and_recorded(soft_pki: Cli, tmp_path: Path) -> None:
    artifact = _write(tmp_path / "a.bin", b"a")
    r = soft_pki("codesign", "sign", str(artifact), "--signer", "nobody")
    assert r.code == 1 and "nobody" in _error_line(r.err)
    assert not Path(f"{artifact}.p7s").exists()
    last = _audit(soft_pki)[-1]
    assert (
        last["action"] == "codesign" and last["outcome"] == "refused" and "a.bin" in last["detail"]
    )


class _Later(dt.datetime):
    """``datetime`` whose now() is 30 days ahead (patched into hsm_ca.codesign only)."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
        return dt.datetime.now(tz) + dt.timedelta(days=30)


def test_expired_signer_listed_and_refused(
    soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = soft_pki
    _new_signer(cli, "short", "ec-p256", "--days", "1")
    _new_signer(cli, "long")
    artifact = _write(tmp_path / "later.bin", b"x")
    monkeypatch.setattr(
        hsm_ca.codesign,
        "_dt",
        types.SimpleNamespace(datetime=_Later, UTC=dt.UTC, timedelta=dt.timedelta),
    )
    listed = {r["label"]: r["status"] for r in _json(cli, "codesign", "list")}
    assert listed == {"short": "expired", "long": "valid"}
    before = len(_audit(cli))
    r = cli("codesign", "sign", str(artifact), "--signer", "short")
    assert r.code == 1 and "expired" in _error_line(r.err)
    assert not Path(f"{artifact}.p7s").exists()
    assert _signing_records(cli, before) == [("codesign", "refused")]


def test_large_file_is_streamed(soft_pki: Cli, tmp_path: Path) -> None:
    """A 50 MB sparse file signs and verifies; the process's peak memory barely moves."""
    cli = soft_pki
    root_pem = _export(cli, tmp_path)
    _new_signer(cli, "big")
    small = _write(tmp_path / "small.bin", b"small")
    big = tmp_path / "big.iso"
    with big.open("wb") as fh:
        fh.truncate(50 * 1024 * 1024)
        fh.seek(25 * 1024 * 1024)
        fh.write(b"middle")
    probe = (
        "import resource, sys\n"
        "from hsm_ca.cli import cli\n"
        "rc = cli.run(sys.argv[1:])\n"
        "sys.stdout.flush()\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
    env["HSM_CA_PIN"] = USER_PIN

    def peak_kib(*args: str) -> tuple[int, str]:
        r = subprocess.run(
            [sys.executable, "-c", probe, "--home", str(cli.home), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr
        return int(r.stderr.rsplit("MAXRSS", 1)[1].split()[0]), r.stdout

    base_sign, _ = peak_kib("codesign", "sign", str(small), "--signer", "big")
    big_sign, out = peak_kib("--json", "codesign", "sign", str(big), "--signer", "big")
    doc = json.loads(out)
    h = hashlib.sha256()
    with big.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    assert doc["size"] == 50 * 1024 * 1024 and doc["sha256"] == h.hexdigest()
    base_verify, _ = peak_kib(
        "codesign", "verify", str(small), f"{small}.p7s", "--trust", str(root_pem)
    )
    big_verify, _ = peak_kib("codesign", "verify", str(big), f"{big}.p7s", "--trust", str(root_pem))
    limit = 16 * 1024  # KiB; reading the file whole would add 50 MiB
    assert big_sign - base_sign < limit, (
        f"signing 50 MiB raised peak RSS by {big_sign - base_sign} KiB"
    )
    assert big_verify - base_verify < limit, (
        f"verifying 50 MiB raised peak RSS by {big_verify - base_verify} KiB"
    )


# ---------------------------------------------------------------- time stamps
@pytest.fixture
def tsa_pki(soft_pki: Cli) -> Iterator[tuple[Cli, dict[str, Any], x509.Certificate]]:
    info = _json(soft_pki, "tsa", "create", "--ca", "issuing")
    tsa_cert = x509.load_pem_x509_certificate(soft_pki.ok("tsa", "export").out.encode())
    yield soft_pki, info, tsa_cert


def test_tsa_certificate(tsa_pki: tuple[Cli, dict[str, Any], x509.Certificate]) -> None:
    cli, info, cert = tsa_pki
    assert format(cert.serial_number, "x") == info["serial"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    cert.verify_directly_issued_by(_cert(cli, "issuing"))
    keys = {k["label"]: k for k in _json(cli, "keys", "list")}
    assert keys[info["key_label"]]["extractable"] is False
    assert info["policy"].startswith(("1.", "2.")) and len(info["policy"].split(".")) > 2
    r = cli("tsa", "create", "--ca", "issuing")
    assert r.code == 1
    _error_line(r.err)


def test_sign_with_timestamp(
    tsa_pki: tuple[Cli, dict[str, Any], x509.Certificate], tmp_path: Path
) -> None:
    cli, tsa_info, tsa_cert = tsa_pki
    root_pem = _export(cli, tmp_path)
    info = _new_signer(cli, "stamped")
    data = os.urandom(5000)
    artifact = _write(tmp_path / "stamped.bin", data)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)
    t0 = time.monotonic()
    out = _json(cli, "codesign", "sign", str(artifact), "--signer", "stamped", "--timestamp")
    elapsed = time.monotonic() - t0
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    assert out["timestamped"] is True
    signer_pem = _json(cli, "show", info["serial"])["pem"]
    sig = _check_signature_file(
        Path(out["signature_file"]), data, signer_pem, _cert(cli, "issuing")
    )
    assert list(sig.unsigned_attrs()) == [OID_SIGNATURE_TIME_STAMP_TOKEN]
    token = sig.token()
    tst = tst_info(token)
    imprint = tst["message_imprint"]
    alg = imprint["hash_algorithm"]["algorithm"].native
    assert alg in STRONG_DIGESTS
    assert imprint["hashed_message"].native == hashlib.new(alg, sig.signature_value).digest(), (
        "the time stamp is not over the signature value"
    )
    assert tst["policy"].native == tsa_info["policy"]
    assert before <= tst["gen_time"].native <= after
    check_token_signature(token, tsa_cert)
    # audit: the time stamp (its own serial) and the signature that carries it
    records = _audit(cli)
    stamps = [a for a in records if a["action"] == "timestamp" and a["outcome"] == "issued"]
    assert len(stamps) == 1
    assert stamps[0]["serial"] == format(tst["serial_number"].native, "x")
    assert "stamped.bin" in stamps[0]["detail"]
    signed = [a for a in records if a["action"] == "codesign" and a["outcome"] == "signed"]
    assert len(signed) == 1 and signed[0]["serial"] == info["serial"]
    for needle in ("stamped.bin", str(len(data)), hashlib.sha256(data).hexdigest(), "stamped"):
        assert needle in signed[0]["detail"]
    cli.ok("audit", "verify")
    verdict = _json(
        cli, "codesign", "verify", str(artifact), out["signature_file"], "--trust", str(root_pem)
    )
    assert verdict["ok"] is True and verdict["timestamp"]
    # the CLI answers promptly (a one-token signature is milliseconds of crypto)
    assert elapsed < 5, f"codesign sign --timestamp took {elapsed:.1f} s"


def test_timestamp_without_tsa_is_refused_and_recorded(soft_pki: Cli, tmp_path: Path) -> None:
    _new_signer(soft_pki, "nostamp")
    artifact = _write(tmp_path / "n.bin", b"n")
    before = len(_audit(soft_pki))
    r = soft_pki("codesign", "sign", str(artifact), "--signer", "nostamp", "--timestamp")
    assert r.code == 1
    assert "tsa create" in _error_line(r.err)
    assert not Path(f"{artifact}.p7s").exists()
    assert _signing_records(soft_pki, before) == [("codesign", "refused")], (
        "a refused code-signing request must be recorded (CLI.md: every refused request)"
    )


@pytest.fixture
def tsa(
    tsa_pki: tuple[Cli, dict[str, Any], x509.Certificate],
) -> Iterator[tuple[TimeStampAuthority, Cli, dict[str, Any], x509.Certificate]]:
    cli, info, cert = tsa_pki
    auth = Authority(load_config(cli.home), pin=lambda: USER_PIN)
    yield TimeStampAuthority(auth), cli, info, cert
    auth.close()


def _req(digest: bytes | None = None, hash_name: str = "sha256", **fields: Any) -> bytes:
    req: dict[str, Any] = {
        "version": "v1",
        "message_imprint": {
            "hash_algorithm": {"algorithm": hash_name},
            "hashed_message": digest
            if digest is not None
            else hashlib.new(hash_name, b"data").digest(),
        },
    }
    req.update(fields)
    return tsp.TimeStampReq(req).dump()


def test_tsa_grants_with_nonce_policy_and_certificate(
    tsa: tuple[TimeStampAuthority, Cli, dict[str, Any], x509.Certificate],
) -> None:
    responder, cli, info, tsa_cert = tsa
    digest = hashlib.sha384(b"payload").digest()
    for cert_req in (True, False):
        resp = responder.respond(
            _req(digest, "sha384", nonce=2**70 + 5, cert_req=cert_req, req_policy=info["policy"])
        )
        status, token = parse_tsa_response(resp)
        assert status["status"].native == "granted" and token is not None
        tst = tst_info(token)
        assert tst["nonce"].native == 2**70 + 5
        assert tst["policy"].native == info["policy"]
        assert tst["message_imprint"]["hashed_message"].native == digest
        assert tst["message_imprint"]["hash_algorithm"]["algorithm"].native == "sha384"
        certs = token["content"]["certificates"]
        embedded = (
            []
            if isinstance(certs, core.Void)
            else [x509.load_der_x509_certificate(c.chosen.dump()) for c in certs]
        )
        if cert_req:
            assert tsa_cert in embedded
        else:
            assert embedded == [], "certReq false: the TSA certificate must not be included"
        check_token_signature(token, tsa_cert)
    # no nonce asked, none given
    status, token = parse_tsa_response(responder.respond(make_request(digest[:32])))
    assert token is not None and isinstance(tst_info(token)["nonce"], core.Void)


def test_tsa_serials_unique_and_audited(
    tsa: tuple[TimeStampAuthority, Cli, dict[str, Any], x509.Certificate],
) -> None:
    responder, cli, _info, _cert = tsa
    serials = []
    for i in range(8):  # the HTTP suite issues 50
        _status, token = parse_tsa_response(
            responder.respond(make_request(hashlib.sha256(b"%d" % i).digest(), nonce=i + 1))
        )
        assert token is not None
        tst = tst_info(token)
        assert tst["nonce"].native == i + 1
        serials.append(tst["serial_number"].native)
    assert len(set(serials)) == 8
    assert all(0 < s < 2**160 for s in serials), "serials are positive and at most 20 octets"
    issued = {
        a["serial"] for a in _audit(cli) if a["action"] == "timestamp" and a["outcome"] == "issued"
    }
    assert {format(s, "x") for s in serials} <= issued
    # serials are reserved with certificate serials: a stamp never reuses a certificate's
    cert_serials = {c["serial"] for c in _json(cli, "list")}
    assert not cert_serials & {format(s, "x") for s in serials}
    cli.ok("audit", "verify")


def _garbage() -> list[tuple[str, bytes, set[str] | None]]:
    valid = make_request(hashlib.sha256(b"x").digest(), nonce=7)
    cases: list[tuple[str, bytes, set[str] | None]] = [
        ("empty", b"", None),
        ("text", b"hello, time-stamping authority", None),
        ("random", os.urandom(300), None),
        ("oversized", b"\x30\x82\x50\x00" + b"\x00" * 0x5000, None),
        ("trailing", valid + b"\x00", None),
        ("huge length", b"\x30\x84\xff\xff\xff\xff" + valid[2:], None),
        ("sha1", _req(hash_name="sha1"), {"bad_alg"}),
        ("md5", _req(hash_name="md5"), {"bad_alg"}),
        ("short imprint", _req(b"\x01" * 31), {"bad_data_format"}),
        ("long imprint", _req(b"\x01" * 33), {"bad_data_format"}),
        ("other policy", _req(req_policy="1.2.3.4.5"), {"unaccepted_policy"}),
        ("version 2", _req(version=2), None),
        (
            "critical extension",
            _req(extensions=[{"extn_id": "1.2.3.4", "critical": True, "extn_value": b"\x05\x00"}]),
            {"unaccepted_extensions"},
        ),  # failInfo bit 16 (RFC 3161 2.4.2)
    ]
    cases += [(f"truncated {n}", valid[:n], None) for n in range(0, len(valid) - 1, 3)]
    return cases


def test_tsa_rejects_garbage_with_a_timestamp_response(
    tsa: tuple[TimeStampAuthority, Cli, dict[str, Any], x509.Certificate],
) -> None:
    responder, cli, _info, _cert = tsa
    before = len(_audit(cli))
    problems = []
    for name, body, fail in _garbage():
        status, token = parse_tsa_response(responder.respond(body))
        got = (status["status"].native, status["fail_info"].native, token is None)
        if (
            got[0] != "rejection"
            or not got[2]
            or not got[1]
            or (fail is not None and got[1] != fail)
        ):
            problems.append(
                f"{name}: status {got[0]}, failInfo {got[1]}, token {not got[2]}"
                + (f" (expected failInfo {fail})" if fail else "")
            )
    assert not problems, "\n".join(problems)
    new = _audit(cli)[before:]
    assert not [a for a in new if a["action"] == "timestamp" and a["outcome"] == "issued"]


def test_revoked_tsa_stops_stamping(
    tsa: tuple[TimeStampAuthority, Cli, dict[str, Any], x509.Certificate], tmp_path: Path
) -> None:
    responder, cli, info, _cert = tsa
    cli.ok("revoke", info["serial"], "--reason", "keyCompromise")
    status, token = parse_tsa_response(responder.respond(make_request(b"\x00" * 32)))
    assert status["status"].native == "rejection" and token is None
    _new_signer(cli, "after")
    artifact = _write(tmp_path / "after.bin", b"after")
    r = cli("codesign", "sign", str(artifact), "--signer", "after", "--timestamp")
    assert r.code == 1 and "revoked" in _error_line(r.err)
    assert not Path(f"{artifact}.p7s").exists()
