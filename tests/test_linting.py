"""Pre-issuance linting: pkilint judges the exact TBS before the HSM signs it."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Cli, make_csr

from hsm_ca.profiles import shipped_profiles_dir


def _override(cli: Cli, name: str, text: str) -> None:
    (cli.home / "profiles").mkdir(exist_ok=True)
    (cli.home / "profiles" / f"{name}.toml").write_text(text)


def test_linted_profiles_issue_clean_certificates_and_crls(tmp_path: Path, cli: Cli) -> None:
    cli.ok("init", "--scrypt-n", "1024", "--base-url", "http://pki.example.com")
    for name in ("tls-server", "tls-client", "intermediate-ca", "root-ca"):
        text = (shipped_profiles_dir() / f"{name}.toml").read_text()
        _override(cli, name, text.replace("[certificate]", "[certificate]\nlint = true", 1))
    cli.ok("ca", "create-root", "root", "--subject", "CN=Lint Root,O=Example,C=NL")
    cli.ok("ca", "create-intermediate", "issuing", "--parent", "root",
           "--subject", "CN=Lint Issuing,O=Example,C=NL")
    csr = tmp_path / "w.csr"
    csr.write_bytes(make_csr(cn=None, dns=["www.example.com"]))
    info = json.loads(cli.ok("--json", "sign", str(csr), "--ca", "issuing", "--profile", "tls-server").out)
    assert info["profile"] == "tls-server"
    cli.ok("revoke", info["serial"], "--reason", "keyCompromise")
    cli.ok("crl", "issuing")
    cli.ok("crl", "root")
    cli.ok("audit", "verify")


def test_a_failed_lint_refuses_and_says_why(tmp_path: Path, pki: Cli) -> None:
    # a broken custom profile: CA/B rules claimed, but no DV policy and an SKI
    text = (shipped_profiles_dir() / "tls-server.toml").read_text()
    text = text.replace('policies = ["2.23.140.1.2.1"]', "policies = []")
    text = text.replace("subject_key_identifier = false", "subject_key_identifier = true")
    _override(pki, "bad-tls", text.replace("[certificate]", "[certificate]\nlint = true", 1))
    before = len(json.loads(pki.ok("--json", "list").out))
    csr = tmp_path / "w.csr"
    csr.write_bytes(make_csr(cn=None, dns=["www.example.com"]))
    r = pki("sign", str(csr), "--ca", "issuing", "--profile", "bad-tls", "-o", str(tmp_path / "o.pem"))
    assert r.code == 1 and "pre-issuance lint failed" in r.err
    assert "certificate_policies" in r.err or "subject_key_identifier" in r.err
    assert not (tmp_path / "o.pem").exists()
    assert len(json.loads(pki.ok("--json", "list").out)) == before
    refused = [x for x in json.loads(pki.ok("--json", "audit", "list").out) if x["outcome"] == "refused"]
    assert refused and "pre-issuance lint failed" in refused[-1]["detail"]
    assert refused[-1]["serial"]  # the serial drawn for it is burnt, never reused
    pki.ok("audit", "verify")
