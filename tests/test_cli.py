"""The command-line contract of ../shared/CLI.md, exercised as a user would."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from conftest import SO_PIN, TEST_SCRYPT_N, USER_PIN, Cli, make_csr, make_key, run_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _cert_count(cli: Cli) -> int:
    with sqlite3.connect(cli.home / "ca.db") as db:
        return db.execute("SELECT count(*) FROM certificates").fetchone()[0]


def test_init_creates_private_home_and_refuses_to_run_twice(cli: Cli) -> None:
    cli.ok("init", "--scrypt-n", str(TEST_SCRYPT_N))
    assert stat.S_IMODE(os.stat(cli.home).st_mode) == 0o700
    for f in (cli.home / "hsm").iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    before = {p: p.read_bytes() for p in cli.home.rglob("*") if p.is_file()}
    r = cli("init", "--scrypt-n", str(TEST_SCRYPT_N))
    assert r.code == 1 and r.err.startswith("Error:") and "already exists" in r.err
    after = {p: p.read_bytes() for p in cli.home.rglob("*") if p.is_file()}
    assert before == after


def test_no_pin_and_no_tty_is_a_clear_error(tmp_path: Path) -> None:
    r = run_process(tmp_path / "h", "init", env={"HSM_CA_PIN": "", "HSM_CA_SO_PIN": ""})
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error:") and "PIN" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "h").exists()


def test_pin_is_never_accepted_on_argv(initialised: Cli) -> None:
    r = initialised("--pin", USER_PIN, "ca", "list")
    assert r.code == 2 and r.err.startswith("Error:")


def test_pin_file_works(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("file-pin-1\n")
    so = tmp_path / "so"
    so.write_text("file-so-pin-1\n")
    home = tmp_path / "h"
    env = {"HSM_CA_PIN": "", "HSM_CA_SO_PIN": ""}
    r = run_process(home, "init", "--scrypt-n", "1024", "--pin-file", str(pin),
                    "--so-pin-file", str(so), env=env)
    assert r.returncode == 0, r.stderr
    r = run_process(home, "ca", "create-root", "r", "--subject", "CN=R", "--pin-file", str(pin), env=env)
    assert r.returncode == 0, r.stderr
    r = run_process(home, "--pin-file", str(so), "ca", "create-root", "r2", "--subject", "CN=R2", env=env)
    assert r.returncode == 1 and "wrong PIN" in r.stderr


def test_create_ca_list_and_export_chain(pki: Cli, tmp_path: Path) -> None:
    cas = json.loads(pki.ok("--json", "ca", "list").out)
    assert {c["name"]: c["parent"] for c in cas} == {"root": None, "issuing": "root"}
    root = next(c for c in cas if c["name"] == "root")
    assert root["subject"] == "CN=Test Root CA,O=Test,C=NL" and root["key_type"] == "ec-p384"
    out = tmp_path / "chain.pem"
    pki.ok("ca", "export", "issuing", "--chain", "-o", str(out))
    chain = x509.load_pem_x509_certificates(out.read_bytes())
    assert [c.subject.rfc4514_string() for c in chain] == [
        "CN=Test Issuing CA,O=Test", "CN=Test Root CA,O=Test,C=NL",
    ]
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(chain[1])
    single = x509.load_pem_x509_certificates(pki.ok("ca", "export", "root").out.encode())
    assert single == [chain[1]]
    bc = chain[0].extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = chain[0].extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    aki = chain[0].extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = chain[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # a path length 0 CA cannot certify another CA
    r = pki("ca", "create-intermediate", "sub", "--parent", "issuing", "--subject", "CN=Sub")
    assert r.code == 1 and "path length" in r.err
    assert pki("ca", "create-root", "root", "--subject", "CN=Again").code == 1


def test_sign_json_output_and_certificate(pki: Cli, csr_file: Path) -> None:
    r = pki.ok("--json", "sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server")
    info = json.loads(r.out)
    assert set(info) >= {"serial", "subject", "issuer", "not_before", "not_after", "profile", "ca"}
    assert info["profile"] == "tls-server" and info["ca"] == "issuing"
    assert info["serial"] == format(int(info["serial"], 16), "x")
    assert int(info["serial"], 16) >= 1 << 63
    cert = x509.load_pem_x509_certificate(info["pem"].encode())
    assert format(cert.serial_number, "x") == info["serial"]
    nb = dt.datetime.strptime(info["not_before"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert cert.not_valid_before_utc == nb
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc + dt.timedelta(seconds=1)).days
    assert days == 90
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.com", "example.com"]
    pol = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert [p.policy_identifier.dotted_string for p in pol] == ["2.23.140.1.2.1"]


def test_tls_server_validity_is_clamped_to_the_baseline_maximum(pki: Cli, csr_file: Path) -> None:
    info = json.loads(pki.ok("--json", "sign", str(csr_file), "--ca", "issuing",
                             "--profile", "tls-server", "--days", "1000").out)
    cert = x509.load_pem_x509_certificate(info["pem"].encode())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc + dt.timedelta(seconds=1)).days
    from hsm_ca.authority import cabf_max_days

    assert days == cabf_max_days(cert.not_valid_before_utc) <= 200


def test_cabf_schedule() -> None:
    from hsm_ca.authority import cabf_max_days

    assert cabf_max_days(dt.datetime(2026, 3, 14, tzinfo=dt.UTC)) == 398
    assert cabf_max_days(dt.datetime(2026, 3, 15, tzinfo=dt.UTC)) == 200
    assert cabf_max_days(dt.datetime(2027, 3, 15, tzinfo=dt.UTC)) == 100
    assert cabf_max_days(dt.datetime(2029, 3, 15, tzinfo=dt.UTC)) == 47


def test_validity_never_exceeds_the_issuer(initialised: Cli, tmp_path: Path) -> None:
    initialised.ok("ca", "create-root", "short", "--subject", "CN=Short Root", "--days", "30")
    p = tmp_path / "c.csr"
    p.write_bytes(make_csr(cn="client", dns=None))
    info = json.loads(initialised.ok("--json", "sign", str(p), "--ca", "short",
                                     "--profile", "tls-client", "--days", "365").out)
    root = json.loads(initialised.ok("--json", "ca", "list").out)[0]
    assert info["not_after"] <= root["not_after"]


def test_sign_der_csr_with_chain_to_file(pki: Cli, tmp_path: Path) -> None:
    p = tmp_path / "d.csr"
    p.write_bytes(make_csr(dns=["d.example.com"], pem=False))
    out = tmp_path / "d.pem"
    r = pki.ok("sign", str(p), "--ca", "issuing", "--profile", "tls-server", "--chain", "-o", str(out))
    certs = x509.load_pem_x509_certificates(out.read_bytes())
    assert len(certs) == 2  # leaf + issuing, root excluded
    assert certs[1].subject.rfc4514_string() == "CN=Test Issuing CA,O=Test"
    assert format(certs[0].serial_number, "x") in r.out


def test_sign_pem_to_stdout_and_serial_to_stderr(pki: Cli, csr_file: Path) -> None:
    r = pki.ok("sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server")
    cert = x509.load_pem_x509_certificate(r.out.encode())
    assert format(cert.serial_number, "x") in r.err


def test_show_accepts_any_serial_spelling_and_list_filters(pki: Cli, csr_file: Path) -> None:
    serial = json.loads(pki.ok("--json", "sign", str(csr_file), "--ca", "issuing",
                               "--profile", "tls-server").out)["serial"]
    spellings = [serial, serial.upper(), "00" + serial,
                 ":".join(serial.zfill(len(serial) + len(serial) % 2)[i:i + 2]
                          for i in range(0, len(serial) + len(serial) % 2, 2))]
    for s in spellings:
        info = json.loads(pki.ok("--json", "show", s).out)
        assert info["serial"] == serial and info["sans"] == ["DNS:www.example.com", "DNS:example.com"]
    only = json.loads(pki.ok("--json", "list", "--ca", "issuing").out)
    assert [c["serial"] for c in only] == [serial]
    assert len(json.loads(pki.ok("--json", "list").out)) == 3
    assert json.loads(pki.ok("--json", "list", "--revoked").out) == []


def test_batch_sign_with_one_refused(pki: Cli, tmp_path: Path) -> None:
    files = []
    for i in range(5):
        p = tmp_path / f"host{i}.csr"
        p.write_bytes(make_csr(cn=None, dns=[f"host{i}.example.com"]))
        files.append(str(p))
    bad = tmp_path / "bad.csr"
    bad.write_bytes(b"not a csr")
    files.insert(2, str(bad))
    out = tmp_path / "out"
    r = pki("--json", "sign", *files, "--ca", "issuing", "--profile", "tls-server",
            "--out-dir", str(out))
    assert r.code == 1
    report = json.loads(r.out)
    assert len(report) == 6 and sum(1 for x in report if x.get("refused")) == 1
    for i in range(5):
        cert = x509.load_pem_x509_certificate((out / f"host{i}.pem").read_bytes())
        assert cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [f"host{i}.example.com"]
    assert not (out / "bad.pem").exists()
    assert pki("sign", *files[:2], "--ca", "issuing", "--profile", "tls-server").code == 2


def test_keys_list(pki: Cli) -> None:
    keys = json.loads(pki.ok("--json", "keys", "list").out)
    assert {k["label"]: k["used_by"] for k in keys} == {"ca-root": "ca:root", "ca-issuing": "ca:issuing"}
    assert all(k["extractable"] is False for k in keys)
    assert {k["key_type"] for k in keys} == {"ec-p384", "ec-p256"}


@pytest.mark.parametrize("key_type", ["rsa-2048", "ed25519", "ec-p521"])
def test_ca_key_types(initialised: Cli, tmp_path: Path, key_type: str) -> None:
    initialised.ok("ca", "create-root", "r", "--subject", "CN=R", "--key-type", key_type)
    p = tmp_path / "c.csr"
    p.write_bytes(make_csr(cn="client"))
    info = json.loads(initialised.ok("--json", "sign", str(p), "--ca", "r", "--profile", "tls-client").out)
    root = x509.load_pem_x509_certificate(initialised.ok("ca", "export", "r").out.encode())
    x509.load_pem_x509_certificate(info["pem"].encode()).verify_directly_issued_by(root)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    is_named_type = {  # the key the root was made with is the one asked for
        "rsa-2048": lambda k: isinstance(k, rsa.RSAPublicKey) and k.key_size == 2048,
        "ed25519": lambda k: isinstance(k, ed25519.Ed25519PublicKey),
        "ec-p521": lambda k: isinstance(k, ec.EllipticCurvePublicKey) and isinstance(k.curve, ec.SECP521R1),
    }[key_type]
    assert is_named_type(root.public_key()), root.public_key()
    cas = json.loads(initialised.ok("--json", "ca", "list").out)
    assert [c["key_type"] for c in cas if c["name"] == "r"] == [key_type]


def test_other_profiles(pki: Cli, tmp_path: Path) -> None:
    p = tmp_path / "c.csr"
    p.write_bytes(make_csr(cn="Release Signing", key=make_key("rsa-2048")))
    for profile, eku in (("code-signing", ExtendedKeyUsageOID.CODE_SIGNING),
                         ("ocsp-signing", ExtendedKeyUsageOID.OCSP_SIGNING),
                         ("timestamping", ExtendedKeyUsageOID.TIME_STAMPING),
                         ("tls-client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        info = json.loads(pki.ok("--json", "sign", str(p), "--ca", "issuing", "--profile", profile).out)
        cert = x509.load_pem_x509_certificate(info["pem"].encode())
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert list(ext.value) == [eku]
        assert ext.critical == (profile == "timestamping")
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Release Signing"
    r = pki("sign", str(p), "--ca", "issuing", "--profile", "root-ca")
    assert r.code == 1 and "root-ca" in r.err


def test_home_profile_overrides_shipped(pki: Cli, tmp_path: Path) -> None:
    (pki.home / "profiles").mkdir()
    shipped = (Path(__file__).parent.parent / "profiles" / "tls-client.toml").read_text()
    (pki.home / "profiles" / "tls-client.toml").write_text(
        shipped.replace("default_days = 365", "default_days = 10"))
    p = tmp_path / "c.csr"
    p.write_bytes(make_csr(cn="client"))
    cert = x509.load_pem_x509_certificate(
        pki.ok("sign", str(p), "--ca", "issuing", "--profile", "tls-client").out.encode())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 9
    (pki.home / "profiles" / "tls-client.toml").write_text(shipped + "\nbogus = 1\n")
    r = pki("sign", str(p), "--ca", "issuing", "--profile", "tls-client")
    assert r.code == 1 and "tls-client.toml" in r.err and "bogus" in r.err


# ------------------------------------------------------------ bad input
def _bad_csrs(tmp_path: Path) -> dict[str, bytes]:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.example.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1000)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    good = bytearray(make_csr(dns=["x.example.com"], pem=False))
    good[-5] ^= 0xFF  # inside the signature value
    return {
        "garbage": b"\x00\x01garbage\xff" * 10,
        "empty": b"",
        "certificate": cert.public_bytes(serialization.Encoding.PEM),
        "broken-signature": bytes(good),
        "ca-true": make_csr(dns=["x.example.com"], extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True)]),
        "nul-san": make_csr(cn=None, dns=["evil.example.com\x00.good.com"]),
        "space-san": make_csr(cn=None, dns=["evil example.com"]),
        "comma-san": make_csr(cn=None, dns=["a.example.com,b.example.com"]),
        "bad-wildcard": make_csr(cn=None, dns=["a.*.example.com"]),
        "3000-sans": make_csr(cn=None, dns=[f"h{i}.example.com" for i in range(3000)]),
    }


def test_bad_input_is_refused_cleanly_and_nothing_is_stored(pki: Cli, tmp_path: Path) -> None:
    before = _cert_count(pki)
    for name, data in _bad_csrs(tmp_path).items():
        p = tmp_path / f"{name}.csr"
        p.write_bytes(data)
        out = tmp_path / f"{name}.pem"
        r = pki("sign", str(p), "--ca", "issuing", "--profile", "tls-server", "-o", str(out))
        assert r.code in (1, 2), name
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), (name, r.err)
        assert "Traceback" not in r.err and not out.exists(), name
    assert _cert_count(pki) == before
    records = json.loads(pki.ok("--json", "audit", "list").out)
    assert sum(1 for r in records if r["outcome"] == "refused") == len(_bad_csrs(tmp_path))
    pki.ok("audit", "verify")


def test_unknown_names_are_clear_errors(pki: Cli, csr_file: Path) -> None:
    cases = [
        (("sign", str(csr_file), "--ca", "nope", "--profile", "tls-server"), "nope"),
        (("sign", str(csr_file), "--ca", "issuing", "--profile", "nope"), "nope"),
        (("show", "abcdef"), "abcdef"),
        (("show", "xyz"), "xyz"),
        (("ca", "export", "nope"), "nope"),
        (("list", "--ca", "nope"), "nope"),
        (("sign", "/nonexistent.csr", "--ca", "issuing", "--profile", "tls-server"), "nonexistent"),
        (("ca", "create-root", "x", "--subject", "NOT A DN"), "NOT A DN"),
        (("ca", "create-root", "bad name", "--subject", "CN=x"), "bad name"),
    ]
    for args, needle in cases:
        r = pki(*args)
        assert r.code in (1, 2), args
        assert r.err.startswith("Error:") and needle in r.err, (args, r.err)


def test_wrong_pin_in_a_real_process(pki: Cli, csr_file: Path) -> None:
    r = run_process(pki.home, "sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server",
                    env={"HSM_CA_PIN": "wrong-pin"})
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error:") and "wrong PIN" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert USER_PIN not in r.stderr and "wrong-pin" not in r.stderr


def test_lockout_across_processes(soft_pki: Cli, csr_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_CA_PIN", "wrong-pin")
    for _ in range(5):
        assert soft_pki("sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server").code == 1
    r = run_process(soft_pki.home, "sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server")
    assert r.returncode == 1 and "locked" in r.stderr
    records = json.loads(soft_pki.ok("--json", "audit", "list").out)
    assert [r["outcome"] for r in records if r["action"] == "login"][-6:] == \
        ["failed"] * 4 + ["locked", "locked"]


def test_tampered_partition_refuses(soft_pki: Cli, csr_file: Path) -> None:
    ks = soft_pki.home / "hsm" / "keystore"
    data = bytearray(ks.read_bytes())
    data[len(data) // 2] ^= 0x04
    ks.write_bytes(bytes(data))
    r = soft_pki("sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server")
    assert r.code == 1 and "tamper" in r.err


def test_debug_shows_traceback_only_when_asked(pki: Cli) -> None:
    r = run_process(pki.home, "show", "abcdef")
    assert "Traceback" not in r.stderr and r.returncode == 1
    r = run_process(pki.home, "--debug", "show", "abcdef")
    assert "Traceback" in r.stderr


def test_broken_config_file(pki: Cli) -> None:
    (pki.home / "hsm-ca.toml").write_text("engine = [unclosed\n")
    r = pki("ca", "list")
    assert r.code == 1 and "hsm-ca.toml" in r.err
    (pki.home / "hsm-ca.toml").write_text('engine = "quantum"\n')
    r = pki("ca", "list")
    assert r.code == 1 and "engine" in r.err


def test_not_a_home(cli: Cli) -> None:
    r = cli("ca", "list")
    assert r.code == 1 and "hsm-ca init" in r.err


def test_so_pin_is_not_the_user_pin(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_CA_SO_PIN", USER_PIN)
    r = cli("init", "--scrypt-n", "1024")
    assert r.code == 2 and not cli.home.exists()
    monkeypatch.setenv("HSM_CA_SO_PIN", SO_PIN)


def test_no_file_in_the_home_holds_a_private_key(soft_pki: Cli, csr_file: Path) -> None:
    import base64

    from hsm_ca.engine.soft import SoftEngine

    soft_pki.ok("sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server")
    engine = SoftEngine(soft_pki.home / "hsm")
    engine.login("crypto-user", USER_PIN)
    needles = []
    for label in ("ca-root", "ca-issuing"):
        key = engine._private_key(label)
        scalar = key.private_numbers().private_value
        needles.append(scalar.to_bytes((scalar.bit_length() + 7) // 8, "big"))
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        needles += [der, base64.b64encode(der), base64.b64encode(der)[:40]]
    files = [p for p in soft_pki.home.rglob("*") if p.is_file()]
    assert any(p.name == "ca.db" for p in files)
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, p
        assert b"PRIVATE KEY" not in data, p


def test_a_deleted_keystore_is_reported_as_tampering(soft_pki: Cli, csr_file: Path) -> None:
    (soft_pki.home / "hsm" / "keystore").unlink()
    r = soft_pki("sign", str(csr_file), "--ca", "issuing", "--profile", "tls-server")
    assert r.code == 1 and "tamper" in r.err


def test_batch_sign_in_several_processes(pki: Cli, tmp_path: Path) -> None:
    files = []
    for i in range(24):
        p = tmp_path / f"job{i}.csr"
        p.write_bytes(make_csr(cn=None, dns=[f"job{i}.example.com"]) if i != 17 else b"junk")
        files.append(str(p))
    out = tmp_path / "out"
    r = pki("--json", "sign", *files, "--ca", "issuing", "--profile", "tls-server",
            "--out-dir", str(out), "--jobs", "3")
    assert r.code == 1  # one refused, the others issued
    report = json.loads(r.out)
    assert len(report) == 24 and [x["source"] for x in report if x.get("refused")] == [files[17]]
    serials = [x["serial"] for x in report if not x.get("refused")]
    assert len(set(serials)) == 23
    for i in range(24):
        assert (out / f"job{i}.pem").exists() == (i != 17)
    listed = {c["serial"] for c in json.loads(pki.ok("--json", "list", "--ca", "issuing").out)}
    assert set(serials) <= listed
    pki.ok("audit", "verify")


def _csr_files(tmp_path: Path, n: int) -> list[str]:
    files = []
    for i in range(n):
        p = tmp_path / "csrs" / f"f{i:03d}.csr"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(make_csr(cn=f"f{i}.example.com"))
        files.append(str(p))
    return files


def test_jobs_on_the_built_in_engine_fork_and_share_one_login(
    soft_pki: Cli, tmp_path: Path,
) -> None:
    """A real process: the child made by Authority.fork() issues its half with the
    parent's session (one login audited, not two) and its own database connection."""
    files = _csr_files(tmp_path, 40)
    before = json.loads(soft_pki.ok("--json", "audit", "list").out)
    out = tmp_path / "out"
    r = run_process(soft_pki.home, "--json", "sign", *files, "--ca", "issuing",
                    "--profile", "tls-client", "--out-dir", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert sorted(x["source"] for x in report) == files
    assert len({x["serial"] for x in report}) == 40
    assert sorted(p.name for p in out.iterdir()) == [f"f{i:03d}.pem" for i in range(40)]
    records = json.loads(soft_pki.ok("--json", "audit", "list").out)[len(before):]
    logins = [x for x in records if x["action"] == "login"]
    assert len(logins) == 1, logins
    issued = [x for x in records if x["action"] == "issue" and x["outcome"] == "issued"]
    assert len(issued) == 40
    soft_pki.ok("audit", "verify")


def test_a_failed_write_in_a_forked_child_names_its_serial(soft_pki: Cli, tmp_path: Path) -> None:
    """A certificate the child issued but could not write is reported with its serial (issue 13
    finding 10) and the rest of the batch is still written; exit 1, no traceback."""
    files = _csr_files(tmp_path, 20)
    out = tmp_path / "out"
    (out / "f015.pem").mkdir(parents=True)  # in the child's half: its write fails
    r = run_process(soft_pki.home, "sign", *files, "--ca", "issuing", "--profile",
                    "tls-client", "--out-dir", str(out), "--jobs", "2")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("Not written")]
    assert len(failed) == 1 and "f015.pem" in failed[0] and "hsm-ca show " in failed[0], r.stderr
    assert sum(1 for p in out.iterdir() if p.is_file()) == 19
    soft_pki.ok("show", failed[0].rsplit("hsm-ca show ", 1)[1].split("'")[0])
    soft_pki.ok("audit", "verify")  # what the child issued is recorded; nothing is half-done


def test_authority_fork_is_for_the_built_in_engine_outside_transactions(
    soft_pki: Cli,
) -> None:
    import hsm_ca
    from hsm_ca.errors import EngineError

    with hsm_ca.open_home(soft_pki.home, pin=USER_PIN) as authority:
        with authority.store.transaction(), pytest.raises(EngineError, match="transaction"):
            authority.fork()
        pid = authority.fork()
        if pid == 0:  # the child: a fresh connection that works; never back into pytest
            code = 3
            try:
                if authority.store.conn.execute("SELECT count(*) FROM cas").fetchone()[0]:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert authority.list_cas()  # the parent's new connection works too
