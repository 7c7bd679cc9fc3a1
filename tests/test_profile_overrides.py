"""Finding 17: a home override may not quietly widen a shipped profile, and every
issuance record names the SHA-256 of the profile file it used.

The check sits where powers are granted (issuing a certificate, creating a CA,
responder or signer), never where a profile is merely read: CRLs, plans and
listings go on whatever an override says (issue 13 review, Medium 5).

Judged through the real CLI: exit codes, stderr, the certificate issued (or not),
and the audit trail.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import USER_PIN, Cli, make_csr, run_process
from cryptography import x509

from hsm_ca.profiles import (
    _SCHEMA,
    FIELD_EFFECTS,
    SHIPPED_PROFILES,
    WIDENINGS,
    parse_profile,
    shipped_profiles_dir,
    widenings,
)

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
    # the kinds the first change missed (issue 13 review, Medium 5)
    "eku-not-critical": ("timestamping", {"eku_critical = true": "eku_critical = false"},
                         ["eku_critical"]),
    "policy-added": ("tls-server", {'policies = ["2.23.140.1.2.1"]':
                                    'policies = ["2.23.140.1.2.1", "2.23.140.1.2.2"]'},
                     ["policies"]),
    "key-type-added": ("tls-server", {'key_types = ["ec-p256", "ec-p384",':
                                      'key_types = ["ed25519", "ec-p256", "ec-p384",'},
                       ["key_types"]),
    "san-kind-added": ("tls-server", {'san_kinds = ["dns", "ip"]':
                                      'san_kinds = ["dns", "ip", "email"]'}, ["san_kinds"]),
    "san-not-required": ("tls-server", {"san_required = true": "san_required = false"},
                         ["san_required"]),
    "more-sans": ("tls-server", {"max_sans = 100": "max_sans = 1000"}, ["max_sans"]),
    "subject-attribute-added": ("tls-server", {"subject_attributes = []":
                                               'subject_attributes = ["O"]'},
                                ["subject_attributes"]),
    "any-subject-attribute": ("tls-server", {"subject_attributes = []": ""},
                              ["subject_attributes"]),
    "cn-kept-unchecked": ("tls-server", {"subject_attributes = []": 'subject_attributes = ["CN"]',
                                         "cn_in_san = true": "cn_in_san = false"},
                          ["subject_attributes", "cn_in_san"]),
    "uri-scheme-added": ("tls-client", {'uri_schemes = ["https", "spiffe", "urn"]':
                                        'uri_schemes = ["https", "spiffe", "urn", "ldap"]'},
                         ["uri_schemes"]),
    "mixed-script": ("tls-client", {"allow_mixed_script = false": "allow_mixed_script = true"},
                     ["allow_mixed_script"]),
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
    suggested = r.err.split("widens = [", 1)[1].split("]", 1)[0]
    assert sorted(json.loads(f"[{suggested}]")) == sorted(aspects), r.err  # exactly these
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


def _warnings(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("Warning:")]


def test_a_declared_widening_warns_once_per_issuing_command(soft_pki: Cli, csr: Path) -> None:
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 800",
                                       "cabf_server_auth = true": "cabf_server_auth = false"},
              head='widens = ["max_days", "cabf_server_auth"]\n')
    for i in range(2):  # every command says it again
        out = csr.parent / f"wide{i}.pem"
        r = soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server",
                        "--days", "800", "-o", str(out))
        warnings = _warnings(r.err)
        assert len(warnings) == 1 and "tls-server" in warnings[0], r.err
        assert "max_days: 397 -> 800" in warnings[0] and "cabf_server_auth" in warnings[0]
        cert = x509.load_pem_x509_certificate(out.read_bytes())
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 799
    # a batch of three is one command: one warning, three certificates
    batch = [csr.parent / f"b{i}.csr" for i in range(3)]
    for b in batch:
        b.write_bytes(make_csr(dns=[f"{b.stem}.example.com"]))
    r = soft_pki.ok("sign", *map(str, batch), "--ca", "issuing", "--profile", "tls-server",
                    "--out-dir", str(csr.parent / "out"))
    assert len(_warnings(r.err)) == 1, r.err
    assert sorted(p.name for p in (csr.parent / "out").iterdir()) == ["b0.pem", "b1.pem", "b2.pem"]


def test_a_declared_widening_warns_once_across_forked_signing_helpers(
    soft_pki: Cli, tmp_path: Path
) -> None:
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 800"},
              head='widens = ["max_days"]\n')
    files = []
    for i in range(4):
        f = tmp_path / f"j{i}.csr"
        f.write_bytes(make_csr(dns=[f"j{i}.example.com"]))
        files.append(str(f))
    # a real process: forked helpers write to the real stderr, not pytest's capture
    r = run_process(soft_pki.home, "sign", *files, "--ca", "issuing", "--profile", "tls-server",
                    "--out-dir", str(tmp_path / "out"), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert len(_warnings(r.stderr)) == 1, r.stderr
    assert len(list((tmp_path / "out").glob("*.pem"))) == 4


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


# ----------------------------------------------- every widening kind, field by field
_LEAF = """
[certificate]
key_usage = ["digital_signature"]
extended_key_usage = ["serverAuth"]
eku_critical = true
default_days = 90
max_days = 397
cabf_server_auth = true
policies = ["2.23.140.1.2.1"]
ocsp_no_check = false
lint = true

[request]
key_types = ["ec-p256", "ec-p384"]
san_kinds = ["dns", "uri"]
san_required = true
max_sans = 10
subject_attributes = ["O"]
cn_in_san = true
uri_schemes = ["https"]
allow_mixed_script = false
"""
_CA = """
[certificate]
ca = true
path_length = 1
key_usage = ["key_cert_sign", "crl_sign"]
default_days = 365
max_days = 3650

[crl]
next_update_days = 7
"""

# kind -> (base text, {old: new}, the kinds widenings() must find, exactly)
KINDS: dict[str, tuple[str, dict[str, str], set[str]]] = {
    "ca": (_LEAF, {'key_usage = ["digital_signature"]':
                   'ca = true\nkey_usage = ["digital_signature", "key_cert_sign"]'},
           {"ca", "key_usage"}),
    "key_usage": (_LEAF, {'["digital_signature"]': '["digital_signature", "key_agreement"]'},
                  {"key_usage"}),
    "extended_key_usage": (_LEAF, {'["serverAuth"]': '["serverAuth", "clientAuth"]'},
                           {"extended_key_usage"}),
    "eku_critical": (_LEAF, {"eku_critical = true": "eku_critical = false"}, {"eku_critical"}),
    "max_days": (_LEAF, {"max_days = 397": "max_days = 398"}, {"max_days"}),
    "path_length": (_CA, {"path_length = 1": "path_length = 2"}, {"path_length"}),
    "cabf_server_auth": (_LEAF, {"cabf_server_auth = true": "cabf_server_auth = false"},
                         {"cabf_server_auth"}),
    "ocsp_no_check": (_LEAF, {"ocsp_no_check = false": "ocsp_no_check = true"},
                      {"ocsp_no_check"}),
    "policies": (_LEAF, {'["2.23.140.1.2.1"]': '["2.23.140.1.2.1", "1.2.3.4"]'}, {"policies"}),
    "lint": (_LEAF, {"lint = true": "lint = false"}, {"lint"}),
    "key_types": (_LEAF, {'["ec-p256", "ec-p384"]': '["ec-p256", "ec-p384", "rsa-2048"]'},
                  {"key_types"}),
    "san_kinds": (_LEAF, {'["dns", "uri"]': '["dns", "uri", "email"]'}, {"san_kinds"}),
    "san_required": (_LEAF, {"san_required = true": "san_required = false"}, {"san_required"}),
    "max_sans": (_LEAF, {"max_sans = 10": "max_sans = 11"}, {"max_sans"}),
    "subject_attributes": (_LEAF, {'["O"]': '["O", "OU"]'}, {"subject_attributes"}),
    "cn_in_san": (_LEAF, {'subject_attributes = ["O"]': 'subject_attributes = ["O", "CN"]',
                          "cn_in_san = true": "cn_in_san = false"},
                  {"subject_attributes", "cn_in_san"}),
    "uri_schemes": (_LEAF, {'uri_schemes = ["https"]': 'uri_schemes = ["https", "urn"]'},
                    {"uri_schemes"}),
    "allow_mixed_script": (_LEAF, {"allow_mixed_script = false": "allow_mixed_script = true"},
                           {"allow_mixed_script"}),
}

# edits that only narrow (or change nothing a certificate may do): never a widening
NARROWINGS: dict[str, tuple[str, dict[str, str]]] = {
    "fewer-days": (_LEAF, {"max_days = 397": "max_days = 90"}),
    "default-days": (_LEAF, {"default_days = 90": "default_days = 30"}),
    "eku-critical-on": (_LEAF.replace("eku_critical = true", "eku_critical = false"),
                        {"eku_critical = false": "eku_critical = true"}),
    "lint-on": (_LEAF.replace("lint = true", "lint = false"), {"lint = false": "lint = true"}),
    "policy-removed": (_LEAF, {'policies = ["2.23.140.1.2.1"]': "policies = []"}),
    "fewer-key-types": (_LEAF, {'["ec-p256", "ec-p384"]': '["ec-p384"]'}),
    "fewer-san-kinds": (_LEAF, {'san_kinds = ["dns", "uri"]': 'san_kinds = ["dns"]',
                                'uri_schemes = ["https"]': 'uri_schemes = ["https", "urn"]'}),
    "fewer-sans": (_LEAF, {"max_sans = 10": "max_sans = 1"}),
    "fewer-attributes": (_LEAF, {'["O"]': "[]"}),
    "cn-dropped-not-copied": (_LEAF, {"cn_in_san = true": "cn_in_san = false"}),
    "fewer-schemes": (_LEAF.replace('["https"]', '["https", "urn"]'),
                      {'["https", "urn"]': '["https"]'}),
    "no-ski": (_LEAF, {"lint = true": "lint = true\nsubject_key_identifier = false"}),
    "description": (_LEAF, {"[certificate]": 'description = "ours"\n[certificate]'}),
    "shallower-path": (_CA, {"path_length = 1": "path_length = 0"}),
    "crl-cadence": (_CA, {"next_update_days = 7": "next_update_days = 30"}),
}


def _pair(base: str, edit: dict[str, str]) -> tuple[object, object]:
    over = base
    for old, new in edit.items():
        assert old in over, old
        over = over.replace(old, new)
    return parse_profile("p", base, "shipped.toml"), parse_profile("p", over, "home.toml")


@pytest.mark.parametrize("kind", list(KINDS))
def test_widenings_finds_each_kind(kind: str) -> None:
    base, edit, expected = KINDS[kind]
    shipped, override = _pair(base, edit)
    found = widenings(shipped, override)  # type: ignore[arg-type]
    assert set(found) == expected, found
    assert all(found.values()), found


@pytest.mark.parametrize("case", list(NARROWINGS))
def test_narrowing_or_neutral_edits_are_no_widening(case: str) -> None:
    shipped, override = _pair(*NARROWINGS[case])
    assert widenings(shipped, override) == {}  # type: ignore[arg-type]


def test_every_schema_field_is_classified_and_every_widening_tested() -> None:
    fields = {f"{sec}.{key}" if sec else key for sec, keys in _SCHEMA.items() for key in keys}
    assert fields == set(FIELD_EFFECTS), fields ^ set(FIELD_EFFECTS)
    assert {v for v in FIELD_EFFECTS.values() if v} == set(WIDENINGS)
    assert set(KINDS) == set(WIDENINGS)


@pytest.mark.parametrize("name", SHIPPED_PROFILES)
def test_a_shipped_profile_does_not_widen_itself(name: str) -> None:
    text = (SHIPPED / f"{name}.toml").read_text()
    p = parse_profile(name, text, "x")
    assert widenings(p, p) == {}


def test_a_long_list_of_added_policies_is_shown_in_at_most_64_characters(
    soft_pki: Cli, csr: Path
) -> None:
    oids = ", ".join(f'"1.2.3.{i}"' for i in range(500))
    _override(soft_pki, "tls-server", {'policies = ["2.23.140.1.2.1"]': f"policies = [{oids}]"})
    r = soft_pki("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    assert r.code == 1 and "policies: adds 1.2.3.0" in r.err, r.err
    assert "1.2.3.499" not in r.err and len(r.err) < 600, r.err


# ------------------------------------- CRLs go on, whatever a CA profile override says
def _ca_overrides(cli: Cli, head: str) -> None:
    _override(cli, "root-ca", {"max_days = 9125": "max_days = 10000",
                               "next_update_days = 7": "next_update_days = 3"}, head)
    _override(cli, "intermediate-ca", {"max_days = 3650": "max_days = 5000",
                                       "next_update_days = 7": "next_update_days = 2"}, head)


@pytest.mark.parametrize("declared", [False, True], ids=["undeclared", "declared"])
def test_crls_are_signed_under_a_widening_ca_profile_override(
    soft_pki: Cli, csr: Path, tmp_path: Path, declared: bool
) -> None:
    issued = tmp_path / "leaf.pem"
    soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server", "-o", str(issued))
    serial = x509.load_pem_x509_certificate(issued.read_bytes()).serial_number
    _ca_overrides(soft_pki, 'widens = ["max_days"]\n' if declared else "")
    soft_pki.ok("revoke", format(serial, "x"), "--reason", "keyCompromise")
    for ca, days in (("root", 3), ("issuing", 2), ("issuing", 2)):  # twice: a new number
        out = tmp_path / f"{ca}.crl"
        r = soft_pki.ok("crl", ca, "-o", str(out))
        assert "Warning" not in r.err and "Error" not in r.err, r.err
        crl = x509.load_pem_x509_crl(out.read_bytes())
        # the override is what the CRL follows: its own cadence
        assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=days)
        if ca == "issuing":
            assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    crls = [r["outcome"] for r in json.loads(soft_pki.ok("--json", "audit", "list").out)
            if r["action"] == "crl"]
    assert crls[-6:] == ["intent", "issued"] * 3, crls



def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_serve_signs_crls_under_an_undeclared_widening_and_says_nothing(
    soft_pki: Cli, csr: Path, tmp_path: Path
) -> None:
    issued = tmp_path / "leaf.pem"
    soft_pki.ok("sign", str(csr), "--ca", "issuing", "--profile", "tls-server", "-o", str(issued))
    serial = x509.load_pem_x509_certificate(issued.read_bytes()).serial_number
    _ca_overrides(soft_pki, "")
    sys.path.insert(0, str(Path(__file__).parent / "interop"))
    from revocation_support import free_port

    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
    env["HSM_CA_PIN"] = USER_PIN
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hsm_ca", "--home", str(soft_pki.home), "serve",
             "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for ca, days in (("root", 3), ("issuing", 2)):  # none stored yet: serve signs them
            status, body = _get(port, f"/crl/{ca}.crl")
            assert status == 200, (status, body[:200], log.read_text())
            crl = x509.load_der_x509_crl(body)
            assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=days)
        soft_pki.ok("revoke", format(serial, "x"))
        status, body = _get(port, "/crl/issuing.crl")  # a newer revocation: signed afresh
        assert status == 200, (status, log.read_text())
        assert x509.load_der_x509_crl(body).get_revoked_certificate_by_serial_number(serial)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    text = log.read_text()
    assert "Warning" not in text and "Error" not in text and "widens" not in text, text


@pytest.mark.parametrize("declared", [False, True], ids=["undeclared", "declared"])
def test_creating_a_ca_is_judged_under_a_widening_override(
    soft_pki: Cli, declared: bool
) -> None:
    _ca_overrides(soft_pki, 'widens = ["max_days"]\n' if declared else "")
    calls = [("ca", "create-root", "root2", "--subject", "CN=Root 2", "--days", "9500"),
             ("ca", "create-intermediate", "sub2", "--parent", "root", "--subject", "CN=Sub 2")]
    for args in calls:
        r = soft_pki(*args)
        if declared:
            assert r.code == 0, r.err
            assert len(_warnings(r.err)) == 1 and "max_days" in r.err, r.err
            continue
        assert r.code == 1, r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and "widens" in r.err, r.err
        last = _issue_records(soft_pki)[-1]
        assert last["outcome"] == "refused" and "widens" in last["detail"], last
    names = {c["name"] for c in json.loads(soft_pki.ok("--json", "ca", "list").out)}
    assert names & {"root2", "sub2"} == ({"root2", "sub2"} if declared else set()), names


ENGINE_KEY = {
    "ocsp-responder": ("ocsp-signing", {"max_days = 365": "max_days = 1000"},
                       ("ca", "ocsp-responder", "issuing")),
    "tsa": ("timestamping", {"eku_critical = true": "eku_critical = false"},
            ("tsa", "create", "--ca", "issuing")),
    "code-signer": ("code-signing", {'san_kinds = ["email", "uri"]':
                                     'san_kinds = ["email", "uri", "dns"]'},
                    ("codesign", "new-signer", "rel", "--ca", "issuing", "--subject", "CN=Rel")),
}


@pytest.mark.parametrize("case", list(ENGINE_KEY))
def test_responders_and_signers_are_not_made_under_an_undeclared_widening(
    soft_pki: Cli, case: str
) -> None:
    profile, edit, args = ENGINE_KEY[case]
    _override(soft_pki, profile, edit)
    before = {k["label"] for k in json.loads(soft_pki.ok("--json", "keys", "list").out)}
    r = soft_pki(*args)
    assert r.code == 1, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "widens" in r.err, r.err
    last = _issue_records(soft_pki)[-1]
    assert last["outcome"] == "refused" and last["profile"] == profile, last
    assert {k["label"] for k in json.loads(soft_pki.ok("--json", "keys", "list").out)} == before


# --------------------------------------------------------------------- bootstrap
def _bootstrap_file(tmp_path: Path) -> Path:
    for name in ("a", "b"):
        (tmp_path / f"{name}.csr").write_bytes(make_csr(dns=[f"{name}.example.com"]))
    path = tmp_path / "pki.toml"
    path.write_text("""
[[ca]]
name = "team"
parent = "root"
subject = "CN=Team CA"

[[certificate]]
ca = "issuing"
profile = "tls-server"
csr = "a.csr"
out = "out/a.pem"

[[certificate]]
ca = "issuing"
profile = "tls-server"
csr = "b.csr"
out = "out/b.pem"
""")
    return path


def test_bootstrap_plans_but_applies_nothing_under_an_undeclared_widening(
    soft_pki: Cli, tmp_path: Path
) -> None:
    path = _bootstrap_file(tmp_path)
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 800"})
    r = soft_pki("bootstrap", str(path), "--plan")
    assert r.code == 0 and "create" in r.out and "Warning" not in r.err, (r.out, r.err)
    r = soft_pki("bootstrap", str(path))
    assert r.code == 1, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "max_days" in r.err, r.err
    # judged before anything was made: no CA, no certificate, one refused record
    assert "team" not in {c["name"] for c in json.loads(soft_pki.ok("--json", "ca", "list").out)}
    assert not (tmp_path / "out").exists()
    last = _issue_records(soft_pki)[-1]
    assert last["outcome"] == "refused" and last["profile"] == "tls-server", last


def test_bootstrap_warns_once_for_a_declared_widening(soft_pki: Cli, tmp_path: Path) -> None:
    path = _bootstrap_file(tmp_path)
    _override(soft_pki, "tls-server", {"max_days = 397": "max_days = 800"},
              head='widens = ["max_days"]\n')
    r = soft_pki.ok("bootstrap", str(path))
    assert len(_warnings(r.err)) == 1, r.err
    assert (tmp_path / "out" / "a.pem").exists() and (tmp_path / "out" / "b.pem").exists()
