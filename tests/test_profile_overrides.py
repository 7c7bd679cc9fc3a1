"""Finding 17: a home override may not quietly widen a shipped profile, and every
issuance record names the SHA-256 of the profile file it used.

Judged through the real CLI: exit codes, stderr, the certificate issued (or not),
and the audit trail.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import Cli, make_csr
from cryptography import x509

from hsm_ca.profiles import shipped_profiles_dir

SHIPPED = shipped_profiles_dir()


def _override(cli: Cli, name: str, edit: dict[str, str], head: str = "") -> Path:
    """HOME/profiles/NAME.toml: the shipped file with whole lines replaced (old -> new)."""
    text = (SHIPPED / f"{name}.toml").read_text()
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new)
    path = cli.home / "profiles" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(head + text)
    return path


def _issue_records(cli: Cli) -> list[dict[str, str]]:
    return [r for r in json.loads(cli.ok("--json", "audit", "list").out) if r["action"] == "issue"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def csr(tmp_path: Path) -> Path:
    p = tmp_path / "web.csr"
    p.write_bytes(make_csr(dns=["www.example.com"]))
    return p


WIDENING = {
    "leaf-to-ca": ("tls-server", {'key_usage = ["digital_signature"]':
                                  'ca = true\nkey_usage = ["digital_signature", "key_cert_sign"]'},
                   ["ca", "key_usage"]),
    "max-days": ("tls-server", {"max_days = 397": "max_days = 36500"}, ["max_days"]),
    "eku-added": ("tls-server", {'extended_key_usage = ["serverAuth"]':
                                 'extended_key_usage = ["serverAuth", "codeSigning"]'},
                  ["extended_key_usage"]),
    "eku-removed": ("tls-server", {'extended_key_usage = ["serverAuth"]':
                                   "extended_key_usage = []"}, ["extended_key_usage"]),
    "cabf-off": ("tls-server", {"cabf_server_auth = true": "cabf_server_auth = false"},
                 ["cabf_server_auth"]),
    "key-encipherment": ("tls-server", {'key_usage = ["digital_signature"]':
                                        'key_usage = ["digital_signature", "key_encipherment"]'},
                         ["key_usage"]),
}


@pytest.mark.parametrize("case", list(WIDENING))
def test_an_undeclared_widening_override_is_refused(soft_pki: Cli, csr: Path, case: str) -> None:
    profile, edit, aspects = WIDENING[case]
    path = _override(soft_pki, profile, edit)
    out = csr.with_suffix(".pem")
    r = soft_pki("sign", str(csr), "--ca", "issuing", "--profile", profile, "-o", str(out))
    assert r.code == 1, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.err
    assert str(path) in r.err and "widens" in r.err, r.err
    for aspect in aspects:
        assert aspect in r.err, (aspect, r.err)
    assert not out.exists()
    last = _issue_records(soft_pki)[-1]
    assert last["outcome"] == "refused" and "widens" in last["detail"], last


def test_the_reviewers_ca_override_with_a_century_is_refused(soft_pki: Cli, csr: Path) -> None:
    _override(soft_pki, "tls-server", {
        'key_usage = ["digital_signature"]':
            'ca = true\nkey_usage = ["digital_signature", "key_cert_sign"]',
        "max_days = 397": "max_days = 36500",
    })
    r = soft_pki("sign", str(csr), "--ca", "issuing", "--profile", "tls-server", "--days", "36500")
    assert r.code == 1 and "leaf -> CA" in r.err and "397 -> 36500" in r.err, r.err


def test_a_partly_declared_widening_is_still_refused(soft_pki: Cli, csr: Path) -> None:
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 800",
                                       "cabf_server_auth = true": "cabf_server_auth = false"},
              head='widens = ["max_days"]\n')
    r = soft_pki("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    assert r.code == 1 and "cabf_server_auth" in r.err, r.err


def test_a_declared_widening_warns_every_time_it_is_used(soft_pki: Cli, csr: Path) -> None:
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 800",
                                       "cabf_server_auth = true": "cabf_server_auth = false"},
              head='widens = ["max_days", "cabf_server_auth"]\n')
    for i in range(2):
        out = csr.parent / f"wide{i}.pem"
        r = soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server",
                        "--days", "800", "-o", str(out))
        warnings = [x for x in r.err.splitlines() if x.startswith("Warning:")]
        assert len(warnings) == 1 and "tls-server" in warnings[0], r.err
        assert "max_days: 397 -> 800" in warnings[0] and "cabf_server_auth" in warnings[0]
        cert = x509.load_pem_x509_certificate(out.read_bytes())
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 799


def test_a_narrowing_override_needs_no_declaration_and_is_quiet(soft_pki: Cli, csr: Path) -> None:
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 30",
                                       "default_days = 90": "default_days = 30"})
    r = soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    assert "Warning" not in r.err, r.err


def test_unknown_widens_values_are_refused_when_the_profile_loads(soft_pki: Cli, csr: Path) -> None:
    _override(soft_pki, "tls-server", {}, head='widens = ["everything"]\n')
    r = soft_pki("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    assert r.code == 1 and "'widens' has unknown value 'everything'" in r.err, r.err


def test_issuance_records_carry_the_profile_files_sha256(soft_pki: Cli, csr: Path) -> None:
    # the shipped profile first: its file's hash
    soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    shipped_sha = _sha(SHIPPED / "tls-server.toml")
    records = _issue_records(soft_pki)
    intent, issued = records[-2], records[-1]
    assert (intent["outcome"], issued["outcome"]) == ("intent", "issued")
    assert intent["serial"] == issued["serial"]
    for rec in (intent, issued):
        assert f"profile_sha256={shipped_sha}" in rec["detail"], rec
    # the CAs' own certificates name theirs too
    ca_sha = _sha(SHIPPED / "intermediate-ca.toml")
    assert any(f"profile_sha256={ca_sha}" in r["detail"] and r["outcome"] == "issued"
               for r in records)

    # an override: its hash, and a change to it shows as a new hash
    path = _override(soft_pki, "tls-server", {"default_days = 90": "default_days = 60"})
    soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    first = _sha(path)
    assert first != shipped_sha
    assert all(f"profile_sha256={first}" in r["detail"] for r in _issue_records(soft_pki)[-2:])
    path.write_text(path.read_text().replace("default_days = 60", "default_days = 45"))
    soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    second = _sha(path)
    assert second != first
    assert all(f"profile_sha256={second}" in r["detail"] for r in _issue_records(soft_pki)[-2:])
    soft_pki.ok("audit", "verify")
