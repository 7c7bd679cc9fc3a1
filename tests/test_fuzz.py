"""Property-based fuzzing of every parser that takes outside input.

The property is always the same: whatever the input, only hsm-ca's own typed
errors (``HsmCaError`` subclasses) come out, and what is accepted is usable.

* profile TOML (``parse_profile``): shipped profiles with random key/value
  edits, byte-level mutations, arbitrary text; a profile that is accepted must
  then issue a certificate or refuse the request cleanly;
* bootstrap files (``load_spec``): the shipped example with structural and
  byte-level mutations, next to a CSR file that may be missing, garbage, a
  directory or a real request;
* CSRs (``load_csr`` + ``check_request``): valid requests with byte mutations,
  and with mutations of the signed part *re-signed* by the requester's key, so
  the policy code behind the signature check is reached; what passes must issue;
* OCSP (``OcspResponder.respond``): valid requests (known, revoked and unknown
  serials, each hash algorithm, nonces of any length) mutated at random must
  always get a parseable OCSPResponse.

Each test runs a few hundred examples by default (a few seconds); for a long
run set ``HSM_CA_FUZZ_EXAMPLES``, e.g. ``HSM_CA_FUZZ_EXAMPLES=20000 pytest
tests/test_fuzz.py``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import itertools
import math
import os
import re
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import SO_PIN, TEST_SCRYPT_N, USER_PIN, make_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hsm_ca
from hsm_ca.authority import Authority, IssuedCertificate, Refusal
from hsm_ca.bootstrap import PkiSpec, load_spec
from hsm_ca.engine.base import KEY_TYPES
from hsm_ca.errors import EngineError, HsmCaError
from hsm_ca.ocsp import OcspResponder
from hsm_ca.policy import CheckedRequest, check_request, load_csr, parse_dn
from hsm_ca.profiles import (
    _SCHEMA,
    EXTENDED_KEY_USAGES,
    KEY_USAGES,
    SAN_KINDS,
    SUBJECT_ATTRIBUTES,
    WIDENINGS,
    Profile,
    ProfileStore,
    parse_profile,
    shipped_profiles_dir,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("HSM_CA_FUZZ_EXAMPLES") or 0)


def fuzz(default: int) -> Any:
    """Settings for one fuzz test: ``default`` examples unless HSM_CA_FUZZ_EXAMPLES says more."""
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


def only_typed_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; an HsmCaError is an answer (returned), anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except HsmCaError as e:
        return e


# ------------------------------------------------------------- byte mutations


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, max_edits: int = 4) -> bytes:
    """``data`` with a few random edits: flips, overwrites, inserts, deletes, cuts, copies."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append", "copy"])
        )
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and buf:
            buf[pos] = draw(
                st.sampled_from(
                    [
                        0x00,
                        0x01,
                        0x7F,
                        0x80,
                        0x81,
                        0x82,
                        0xFF,
                        0x30,
                        0x02,
                        0x04,
                        0x05,
                        0x06,
                        0x0C,
                        0x13,
                        0xA0,
                        0xA3,
                    ]
                )
            )
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[pos:]
        elif op == "append":
            buf += draw(st.binary(min_size=1, max_size=16))
        elif op == "copy" and buf:
            end = min(len(buf), pos + draw(st.integers(1, 32)))
            at = draw(st.integers(0, len(buf)))
            buf[at:at] = buf[pos:end]
    return bytes(buf)


# ====================================================================== profiles

SHIPPED_TEXT = {
    p.stem: p.read_text(encoding="utf-8") for p in sorted(shipped_profiles_dir().glob("*.toml"))
}


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    """Bare where TOML allows it (as people write files), quoted otherwise."""
    return (
        k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else _toml_string(k)
    )


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, _dt.datetime | _dt.date | _dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dump_toml(data: dict[str, Any]) -> str:
    """Top-level scalars, then one ``[table]`` per dict (deeper dicts inline)."""
    lines = [
        f"{_toml_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)
    ]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.datetimes(),
    st.dates(),
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
INTS = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            7,
            365,
            366,
            367,
            398,
            825,
            999,
            1000,
            1001,
            3650,
            36_500,
            3_000_000,
            2**31,
            2**63 - 1,
            -(2**63),
        ]
    ),
    st.integers(-10, 1100),
)
WORDS = st.sampled_from(
    [
        *KEY_USAGES,
        *EXTENDED_KEY_USAGES,
        *SAN_KINDS,
        *SUBJECT_ATTRIBUTES,
        *KEY_TYPES,
        "",
        " dns",
        "DNS",
        "rsa-1024",
        "serverauth",
        "cn",
    ]
)
OIDS = st.one_of(
    st.sampled_from(
        [
            "2.23.140.1.2.1",
            "1.3.6.1.4.1.99999.1",
            "2.999",
            "1.2",
            "3.1",
            "1.40",
            "0.39",
            "1",
            "1.",
            ".1",
            "1..2",
            "01.2",
            "1.2.\u0663",
            "1.\u00b2",
            "1.2." + "9" * 40,
        ]
    ),
    st.lists(st.integers(0, 2**70).map(str), min_size=1, max_size=5).map(".".join),
)
FIELD_VALUE = st.one_of(
    INTS,
    st.booleans(),
    st.lists(WORDS, max_size=6),
    st.lists(OIDS, min_size=1, max_size=3),
    ANY_VALUE,
)
SECTIONS = ["", "certificate", "request", "crl", "extra"]


@st.composite
def edited_profile(draw: st.DrawFn) -> str:
    """A shipped profile with 1-4 random key/value edits, as TOML text."""
    data = tomllib.loads(SHIPPED_TEXT[draw(st.sampled_from(sorted(SHIPPED_TEXT)))])
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(SECTIONS))
        table = data if section == "" else data.get(section)
        op = draw(st.sampled_from(["set", "set", "set", "delete", "replace-section"]))
        if op == "replace-section" and section:
            if draw(st.booleans()):
                data.pop(section, None)
            else:
                data[section] = draw(ANY_VALUE)
            continue
        if not isinstance(table, dict):
            table = data[section] = {}
        keys = [k for k in _SCHEMA.get(section, {}) if k] + ["bogus", "", "Key_Usage"]
        key = draw(st.sampled_from(keys))
        if op == "delete":
            table.pop(key, None)
        else:
            table[key] = draw(FIELD_VALUE)
    return dump_toml(data)


def _subset(values: Any) -> Any:
    return st.lists(st.sampled_from(list(values)), unique=True, max_size=len(values))


DAYS = st.integers(1, 4000) | st.sampled_from([36_500, 1_000_000, 2_932_896, 3_000_000, 2**40])
PLAUSIBLE: dict[str, Any] = {
    "description": st.text(max_size=30),
    "ca": st.booleans(),
    "path_length": st.integers(0, 3),
    "key_usage": _subset(KEY_USAGES),
    "extended_key_usage": _subset(EXTENDED_KEY_USAGES),
    "eku_critical": st.booleans(),
    "default_days": DAYS,
    "max_days": DAYS,
    "cabf_server_auth": st.booleans(),
    "policies": st.lists(OIDS, max_size=3),
    "subject_key_identifier": st.booleans(),
    "ocsp_no_check": st.booleans(),
    "lint": st.booleans(),
    "key_types": _subset(KEY_TYPES).filter(bool),
    "san_kinds": _subset(SAN_KINDS),
    "san_required": st.booleans(),
    "max_sans": st.integers(0, 1000),
    "subject_attributes": _subset(SUBJECT_ATTRIBUTES),
    "cn_in_san": st.booleans(),
    "next_update_days": st.integers(1, 366),
    "uri_schemes": _subset(("https", "spiffe", "urn", "http", "ldap")),
    "allow_mixed_script": st.booleans(),
    "widens": _subset(WIDENINGS),
}


@st.composite
def plausible_profile(draw: st.DrawFn) -> str:
    """A shipped non-CA profile with 1-4 fields set to values of the right type and range,
    so that most of them validate and go on to issue."""
    name = draw(st.sampled_from(sorted(set(SHIPPED_TEXT) - {"root-ca", "intermediate-ca"})))
    data = tomllib.loads(SHIPPED_TEXT[name])
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["certificate", "certificate", "request", "crl", ""]))
        table = data if section == "" else data.setdefault(section, {})
        if section == "certificate" and draw(st.integers(0, 3)) == 0:  # a validity pair
            table["max_days"] = draw(DAYS)
            table["default_days"] = draw(st.integers(1, table["max_days"]))
            continue
        key = draw(st.sampled_from([k for k in _SCHEMA[section] if k not in ("ca", "path_length")]))
        table[key] = draw(PLAUSIBLE[key])
    return dump_toml(data)


@st.composite
def mutated_profile_text(draw: st.DrawFn) -> str:
    raw = SHIPPED_TEXT[draw(st.sampled_from(sorted(SHIPPED_TEXT)))].encode()
    return draw(mutated_bytes(raw, 6)).decode("utf-8", "replace")


def assert_profile_invariants(p: Profile) -> None:
    """What parse_profile promises about anything it accepts."""
    assert 1 <= p.default_days <= p.max_days
    assert p.key_types and set(p.key_types) <= set(KEY_TYPES)
    assert p.key_usage <= set(KEY_USAGES)
    assert set(p.extended_key_usage) <= set(EXTENDED_KEY_USAGES)
    assert p.san_kinds <= set(SAN_KINDS)
    assert 0 <= p.max_sans <= 1000
    assert 1 <= p.crl_next_update_days <= 366
    assert not p.san_required or p.san_kinds
    if p.is_ca:
        assert "key_cert_sign" in p.key_usage
    else:
        assert not p.key_usage & {"key_cert_sign", "crl_sign"} and p.path_length is None
    assert p.path_length is None or p.path_length >= 0
    assert p.subject_attributes is None or set(p.subject_attributes) <= set(SUBJECT_ATTRIBUTES)
    assert len(p.eku_oids()) == len(p.extended_key_usage)
    assert isinstance(p.description, str)


@fuzz(400)
@given(text=st.one_of(edited_profile(), mutated_profile_text(), st.text(max_size=300)))
def test_profile_parsing_only_raises_typed_errors(text: str) -> None:
    result = only_typed_errors(parse_profile, "fuzz", text, "fuzz.toml")
    event(f"outcome: {type(result).__name__}")
    if isinstance(result, Profile):
        assert_profile_invariants(result)
    else:
        assert re.match(r"fuzz\.toml(:\d+)?: ", str(result))  # errors name the file (and line)


@fuzz(300)
@given(raw=st.binary(max_size=400))
def test_profile_parsing_random_bytes(raw: bytes) -> None:
    for text in (raw.decode("utf-8", "replace"), raw.decode("latin-1")):
        result = only_typed_errors(parse_profile, "fuzz", text, "fuzz.toml")
        if isinstance(result, Profile):
            assert_profile_invariants(result)


# --- a profile that validates must be usable: it issues, or refuses the request cleanly

_TLS_CLIENT = SHIPPED_TEXT["tls-client"]
HUGE_VALIDITY = _TLS_CLIENT.replace(
    "default_days = 365\nmax_days = 825", "default_days = 3000000\nmax_days = 3000000"
)
BAD_POLICY_OID = _TLS_CLIENT.replace("max_days = 825", 'max_days = 825\npolicies = ["3.1"]')
BAD_POLICY_DIGITS = _TLS_CLIENT.replace(
    "max_days = 825", 'max_days = 825\npolicies = ["1.2.\u0663"]'
)


@dataclass
class Pki:
    authority: Authority
    root: x509.Certificate
    issuing: x509.Certificate
    leaves: list[x509.Certificate]  # one good, one revoked


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    """A home with root and issuing CAs, two certificates (one revoked) and a CRL."""
    home = tmp_path_factory.mktemp("fuzz") / "home"
    a = hsm_ca.init_home(home, user_pin=USER_PIN, officer_pin=SO_PIN, scrypt_n=TEST_SCRYPT_N)
    a.create_root("root", parse_dn("CN=Fuzz Root,O=Test"))
    a.create_intermediate("issuing", "root", parse_dn("CN=Fuzz Issuing,O=Test"), path_length=0)
    leaves = [
        a.ca("issuing").issue(make_csr(cn=f"{name}.example.com"), "tls-client").certificate
        for name in ("good", "revoked")
    ]
    a.revoke(format(leaves[1].serial_number, "x"), "keyCompromise")
    a.crl("issuing")
    a.config.profiles_path.mkdir(exist_ok=True)
    yield Pki(a, a.get_ca("root").certificate, a.get_ca("issuing").certificate, leaves)
    a.close()


_profile_names = itertools.count()
PROFILE_CSRS = [
    make_csr(cn="client.example.com", dns=["client.example.com"]),
    make_csr(cn="client.example.com"),
]


@fuzz(200)
@given(
    text=st.one_of(plausible_profile(), plausible_profile(), edited_profile()),
    csr=st.sampled_from(PROFILE_CSRS),
)
def test_an_accepted_profile_issues_or_refuses_cleanly(pki: Pki, text: str, csr: bytes) -> None:
    issue_with_profile(pki, text, csr)


@pytest.mark.parametrize(
    "text",
    [HUGE_VALIDITY, BAD_POLICY_OID, BAD_POLICY_DIGITS],
    ids=["validity-beyond-year-9999", "policy-oid-3.1", "policy-oid-arabic-indic-digit"],
)
def test_profile_validation_refuses_what_cannot_be_issued(pki: Pki, text: str) -> None:
    """Cases the fuzzing found: accepted by parse_profile, then issuance breaks."""
    issue_with_profile(pki, text, PROFILE_CSRS[0])


def issue_with_profile(pki: Pki, text: str, csr: bytes) -> None:
    """Validation is the only gate: an accepted profile must not break issuance later
    (an exception other than HsmCaError, or a signing failure after a serial was burnt)."""
    try:
        parse_profile("probe", text, "probe.toml")
    except HsmCaError:
        return
    pki_home = pki.authority
    name = f"fz{next(_profile_names)}"  # a new name each time: profiles are cached by name
    (pki_home.config.profiles_path / f"{name}.toml").write_text(text, encoding="utf-8")
    result = only_typed_errors(pki_home.sign_csrs, "issuing", [("fuzz", csr)], name)
    event(f"outcome: {type(result[0] if isinstance(result, list) else result).__name__}")
    if isinstance(result, HsmCaError):
        assert not isinstance(result, EngineError), result
        return
    [item] = result
    if isinstance(item, Refusal):
        assert not isinstance(item.error, EngineError), (
            f"accepted profile made signing fail after a serial was reserved: {item.error}"
        )
        return
    profile = pki_home.profiles.get(name)
    cert = item.certificate
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days <= profile.max_days
    policies = [
        p.policy_identifier.dotted_string for p in _ext_or_empty(cert, x509.CertificatePolicies)
    ]
    assert policies == list(profile.policies)


def _ext_or_empty(cert: x509.Certificate, cls: type) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return []


# ====================================================================== bootstrap

EXAMPLE = (REPO / "examples" / "pki.toml").read_text(encoding="utf-8")
_CA_KEYS = ["name", "subject", "parent", "key_type", "days", "path_length", "name_constraints"]
_CERT_KEYS = ["ca", "profile", "csr", "out", "days", "subject", "sans", "key_out", "key_type"]
_SIGNER_KEYS = ["label", "ca", "subject", "key_type", "days"]
_OUTPUT_KEYS = ["chains", "crls", "trust_bundle"]
LONG_NAME = "a" * 300

BOOT_STRINGS = st.sampled_from(
    [
        # names, CAs, labels
        "root",
        "issuing",
        "other",
        "",
        " ",
        "../x",
        "a.b",
        ".hidden",
        "x" * 65,
        LONG_NAME,
        "x\x00y",
        # DNs
        "CN=Example",
        "CN=a,O=b,C=NL",
        "CN=a,C=NLD",
        "CN=",
        "CN=a+O=b",
        "CN=#01",
        "CN=a\\",
        "1.2.3=x",
        "99.99=x",
        "CN=a,CN=b",
        "cn=lower,c=nl",
        "CN=a\x07b",
        "CN=" + "y" * 65,
        "DC=example,DC=com",
        # key types and profiles
        *KEY_TYPES,
        "rsa-1024",
        "ec-p999",
        *sorted(SHIPPED_TEXT),
        "root-ca",
        "../tls-server",
        # SANs
        "DNS:backup.example.com",
        "DNS:",
        "DNS:*.example.com",
        "DNS:\u00e9.example.com",
        "IP:192.0.2.1",
        "IP:::1",
        "IP:300.1.1.1",
        "email:a@example.com",
        "email:\u00e9@x",
        "URI:https://example.com/x",
        "URI:",
        "URI:\u00e9",
        "foo",
        ":",
        "dns:UPPER.example.com",
        # paths
        "web.csr",
        "missing.csr",
        "out/web.pem",
        "out/x.pem",
        "/dev/null",
        "/nonexistent/dir/x",
        "p" * 5000,
        "sub/" * 100 + "x",
    ]
)
NC_VALUE = st.dictionaries(
    st.sampled_from(
        [
            "permitted_dns",
            "excluded_dns",
            "permitted_ip",
            "excluded_ip",
            "permitted_email",
            "excluded_email",
            "bogus",
        ]
    ),
    st.lists(
        st.sampled_from(
            [
                "example.com",
                ".example.com",
                "*.x.com",
                "10.0.0.0/8",
                "10.0.0.1/8",
                "::/0",
                "a@b.c",
                "\u00e9.com",
                "",
                "300.0.0.0/8",
            ]
        )
        | st.just(7),
        max_size=3,
    ),
    max_size=3,
)
BOOT_VALUE = st.one_of(
    BOOT_STRINGS,
    BOOT_STRINGS,
    INTS,
    st.booleans(),
    st.lists(BOOT_STRINGS, max_size=4),
    NC_VALUE,
    ANY_VALUE,
)
_TABLE_KEYS = {
    "ca": _CA_KEYS,
    "certificate": _CERT_KEYS,
    "signer": _SIGNER_KEYS,
    "output": _OUTPUT_KEYS,
}


def dump_bootstrap(data: dict[str, Any]) -> str:
    """Arrays of tables as ``[[x]]``, tables as ``[x]``, the rest inline."""
    lines = []
    for k, v in data.items():
        if not isinstance(v, dict) and not (
            isinstance(v, list) and v and all(isinstance(e, dict) for e in v)
        ):
            lines.append(f"{_toml_key(k)} = {toml_value(v)}")
    for k, v in data.items():
        if isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            for entry in v:
                lines.append(f"[[{_toml_key(k)}]]")
                lines += [f"{_toml_key(kk)} = {toml_value(vv)}" for kk, vv in entry.items()]
        elif isinstance(v, dict):
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


@st.composite
def edited_bootstrap(draw: st.DrawFn) -> bytes:
    data = tomllib.loads(EXAMPLE)
    for _ in range(draw(st.integers(1, 5))):
        table = draw(st.sampled_from(["ca", "certificate", "signer", "output", "top"]))
        op = draw(st.sampled_from(["set", "set", "set", "set", "delete", "dup", "drop", "replace"]))
        if table == "top":
            key = draw(st.sampled_from(["ca", "certificate", "signer", "output", "extra"]))
            if op in ("delete", "drop"):
                data.pop(key, None)
            else:
                data[key] = draw(BOOT_VALUE)
            continue
        current = data.get(table)
        if table == "output":
            entries = [current] if isinstance(current, dict) else []
        else:
            entries = (
                [e for e in current if isinstance(e, dict)] if isinstance(current, list) else []
            )
        if not entries:
            continue
        entry = draw(st.sampled_from(entries))
        if op == "dup" and table != "output":
            data[table].append(dict(entry))
        elif op == "drop" and table != "output":
            data[table].remove(entry)
        elif op == "replace":
            data[table] = draw(BOOT_VALUE)
        else:
            key = draw(st.sampled_from([*_TABLE_KEYS[table], "bogus"]))
            if op == "delete":
                entry.pop(key, None)
            else:
                entry[key] = draw(BOOT_VALUE)
    return dump_bootstrap(data).encode("utf-8")


@functools.cache
def _server_csr() -> bytes:
    return make_csr(cn="www.example.com", dns=["www.example.com", "example.com"])


CSR_FILE = st.sampled_from(
    ["missing", "valid", "client", "garbage", "empty", "directory", "mutated"]
)


@pytest.fixture(scope="module")
def boot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bootstrap")


def _place_csr(where: Path, kind: str, garbage: bytes) -> None:
    target = where / "web.csr"
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    if kind == "valid":
        target.write_bytes(_server_csr())
    elif kind == "client":
        target.write_bytes(make_csr(cn="Client With Spaces"))  # no SAN: tls-server refuses
    elif kind == "garbage":
        target.write_bytes(garbage)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir()
    elif kind == "mutated":
        target.write_bytes(_server_csr()[: max(1, len(garbage))] + garbage)


LONG_PROFILE = EXAMPLE.replace('profile = "tls-server"', f'profile = "{LONG_NAME}"').encode()


@fuzz(300)
@given(
    text=st.one_of(
        edited_bootstrap(),
        edited_bootstrap(),
        mutated_bytes(EXAMPLE.encode(), 6),
        st.binary(max_size=200),
    ),
    csr=CSR_FILE,
    garbage=st.binary(max_size=64),
    existing=st.none()
    | st.sampled_from([{"root": None}, {"issuing": "root", "root": None}, {"loop": "loop"}]),
)
def test_bootstrap_loading_only_raises_typed_errors(
    boot_dir: Path, text: bytes, csr: str, garbage: bytes, existing: dict[str, Any] | None
) -> None:
    _place_csr(boot_dir, csr, garbage)
    path = boot_dir / "pki.toml"
    path.write_bytes(text)
    result = only_typed_errors(load_spec, path, None, existing)
    event(f"outcome: {type(result).__name__}")
    if isinstance(result, HsmCaError):
        message = str(result)
        assert message.startswith(f"{path}:"), message  # errors name the file...
        line = message[len(str(path)) + 1 :].split(":", 1)[0]
        if line.isdigit():  # ...and a line that is in it
            assert 1 <= int(line) <= max(1, len(text.splitlines())), message
        return
    assert isinstance(result, PkiSpec)
    names = [c.name for c in result.cas]
    assert len(names) == len(set(names))
    for c in result.certificates:
        assert c.csr_bytes is not None or c.key_out is not None


def test_bootstrap_with_an_overlong_profile_name_is_a_typed_error(boot_dir: Path) -> None:
    """Found by the fuzzing: a 300-character profile name made the profile lookup raise
    OSError (ENAMETOOLONG) instead of ProfileNotFound, so load_spec leaked it."""
    _place_csr(boot_dir, "valid", b"")
    path = boot_dir / "pki.toml"
    path.write_bytes(LONG_PROFILE)
    with pytest.raises(HsmCaError, match="profile"):
        load_spec(path)
    with pytest.raises(HsmCaError):
        ProfileStore(None).get(LONG_NAME)


def test_bootstrap_example_itself_loads(boot_dir: Path) -> None:
    """The fuzz starting point is valid, so the mutations start from accepted input."""
    _place_csr(boot_dir, "valid", b"")
    path = boot_dir / "pki.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    spec = load_spec(path)
    assert [c.name for c in spec.cas] == ["root", "issuing"]
    # and the TOML writer the mutations go through reproduces it
    assert tomllib.loads(dump_bootstrap(tomllib.loads(EXAMPLE))) == tomllib.loads(EXAMPLE)
    for text in SHIPPED_TEXT.values():
        assert tomllib.loads(dump_toml(tomllib.loads(text))) == tomllib.loads(text)


# ========================================================================== CSRs

POLICY_PROFILES = ["tls-server", "tls-client", "code-signing", "ocsp-signing", "timestamping"]


@functools.cache
def shipped_profile(name: str) -> Profile:
    return ProfileStore(None).get(name)


def _sign_info(key: Any, info: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(info, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(info)  # type: ignore[no-any-return]


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


@functools.cache
def base_requests() -> list[tuple[Any, bytes, bytes, bytes]]:
    """(key, csr DER, CertificationRequestInfo DER, signatureAlgorithm DER) for a few CSRs."""
    from asn1crypto import csr as asn1_csr

    def build(
        key: Any, names: list[x509.NameAttribute], sans: list[x509.GeneralName]
    ) -> tuple[Any, bytes, bytes, bytes]:
        b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        der = b.sign(key, alg).public_bytes(serialization.Encoding.DER)
        parsed = asn1_csr.CertificationRequest.load(der)
        return (
            key,
            der,
            parsed["certification_request_info"].dump(),
            parsed["signature_algorithm"].dump(),
        )

    cn = NameOID.COMMON_NAME
    return [
        build(
            ec.generate_private_key(ec.SECP256R1()),
            [x509.NameAttribute(cn, "www.example.com")],
            [x509.DNSName("www.example.com"), x509.DNSName("api.example.com")],
        ),
        build(
            ed25519.Ed25519PrivateKey.generate(),
            [x509.NameAttribute(cn, "Alice"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ex")],
            [
                x509.RFC822Name("alice@example.com"),
                x509.UniformResourceIdentifier("spiffe://example.com/alice"),
            ],
        ),
        build(
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            [x509.NameAttribute(cn, "192.0.2.7"), x509.NameAttribute(NameOID.COUNTRY_NAME, "NL")],
            [x509.IPAddress(__import__("ipaddress").ip_address("192.0.2.7"))],
        ),
        build(ec.generate_private_key(ec.SECP384R1()), [], [x509.DNSName("*.example.net")]),
    ]


def assert_checked_invariants(checked: CheckedRequest, profile: Profile) -> None:
    assert checked.key_type in profile.key_types
    assert len(checked.sans) <= profile.max_sans
    kinds = {
        x509.DNSName: "dns",
        x509.IPAddress: "ip",
        x509.RFC822Name: "email",
        x509.UniformResourceIdentifier: "uri",
    }
    for san in checked.sans:
        assert kinds[type(san)] in profile.san_kinds
        if not isinstance(san, x509.IPAddress):
            assert all(0x20 <= ord(c) < 0x7F for c in san.value), san
    if profile.san_required:
        assert checked.sans
    for attr in checked.subject:
        value = attr.value if isinstance(attr.value, str) else ""
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value), attr
    assert (
        checked.csr_sha256
        == hashlib.sha256(checked.csr.public_bytes(serialization.Encoding.DER)).hexdigest()
    )


def _as_pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + b"\n".join(lines)
        + b"\n-----END CERTIFICATE REQUEST-----\n"
    )


@dataclass
class Der:
    """One DER element: children when constructed (or an OCTET STRING holding DER)."""

    tag: int
    content: bytes = b""
    children: list[Der] | None = None


def der_parse(data: bytes) -> list[Der]:
    """Single-byte tags, definite lengths; raises ValueError on anything else."""
    out, i = [], 0
    while i < len(data):
        tag = data[i]
        if tag & 0x1F == 0x1F or i + 1 >= len(data):
            raise ValueError("unsupported")
        length, i = data[i + 1], i + 2
        if length & 0x80:
            n = length & 0x7F
            if not 1 <= n <= 3:
                raise ValueError("unsupported length")
            length, i = int.from_bytes(data[i : i + n], "big"), i + n
        content = data[i : i + length]
        if len(content) != length:
            raise ValueError("truncated")
        i += length
        if tag & 0x20:
            out.append(Der(tag, children=der_parse(content)))
        elif tag == 0x04 and content[:1] == b"\x30":  # extnValue: DER inside
            try:
                out.append(Der(tag, children=der_parse(content)))
            except ValueError:
                out.append(Der(tag, content))
        else:
            out.append(Der(tag, content))
    return out


def der_dump(nodes: list[Der]) -> bytes:
    return b"".join(
        _tlv(n.tag, der_dump(n.children) if n.children is not None else n.content) for n in nodes
    )


def _all_nodes(nodes: list[Der], parent: list[Der]) -> Iterator[tuple[Der, list[Der]]]:
    for n in nodes:
        yield n, parent
        if n.children is not None:
            yield from _all_nodes(n.children, n.children)


NAMES_TO_TRY = [
    "www.example.com",
    "*.example.com",
    "a.*.example.com",
    "xn--nxasmq6b.example",
    "xn--a.com",
    "EXAMPLE.COM.",
    "a..b",
    "-a.example.com",
    "\u00e9.example.com",
    "a\x00.example.com",
    " a.com",
    "192.0.2.1",
    "::1",
    "1.2.3",
    "0x7f.1",
    "a" * 64,
    "a" * 65,
    "b" * 300,
    "user@example.com",
    "@example.com",
    "a@b@c",
    "https://example.com/x",
    "https:example",
    "spiffe://a/b",
    "javascript:x",
    "\u202egnp.com",
    "\ufeffa.com",
    "",
    " ",
    "CN=x,O=y",
    "a\nb",
    "\x7f",
    "\u0085",
]
CONTENTS = st.one_of(
    st.sampled_from(NAMES_TO_TRY).map(lambda t: t.encode("utf-8")),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.binary(max_size=40),
    st.sampled_from(
        [b"\xc0\x00\x02\x07", b"\x00" * 16, b"\x0a\x00\x00\x01\xff\xff", b"\x00\xe9\x00a", b"\xff"]
    ),
)
TAGS = [
    0x0C,
    0x13,
    0x16,
    0x1E,
    0x14,
    0x1C,
    0x12,
    0x04,
    0x02,
    0x05,
    0x06,
    0x01,
    0x03,
    0x80,
    0x81,
    0x82,
    0x86,
    0x87,
    0x88,
    0xA0,
    0xA3,
    0xA4,
    0x30,
    0x31,
]


STRING_TAGS = {0x0C, 0x13, 0x16, 0x1E, 0x14, 0x81, 0x82, 0x86, 0x87}
_PRINTABLE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")


@st.composite
def typed_content(draw: st.DrawFn, tag: int) -> bytes:
    """New content for a string or name element, usually valid for its type (so it parses)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(CONTENTS)
    text = draw(st.sampled_from(NAMES_TO_TRY) | st.text(max_size=40))
    if tag == 0x13:
        return "".join(c for c in text if c in _PRINTABLE).encode()
    if tag in (0x16, 0x81, 0x82, 0x86, 0x14):
        return "".join(c for c in text if c.isascii()).encode()
    if tag == 0x1E:
        return "".join(c for c in text if ord(c) < 0xD800).encode("utf-16-be")
    if tag == 0x87:
        return draw(
            st.binary(min_size=4, max_size=4)
            | st.binary(min_size=16, max_size=16)
            | st.binary(max_size=33)
        )
    return text.encode("utf-8")


@st.composite
def mutated_tree(draw: st.DrawFn, info: bytes) -> bytes:
    """``info`` with 1-3 structure-aware edits: a value, a tag, a duplicated or lost element."""
    tree = der_parse(info)
    for _ in range(draw(st.integers(1, 3))):
        nodes = list(_all_nodes(tree, tree))
        strings = [(n, p) for n, p in nodes if n.tag in STRING_TAGS and n.children is None]
        if strings and draw(st.integers(0, 9)) < 7:
            node, parent = draw(st.sampled_from(strings))
            op = draw(st.sampled_from(["typed", "typed", "typed", "tag", "dup", "delete"]))
        else:
            node, parent = draw(st.sampled_from(nodes))
            op = draw(st.sampled_from(["content", "tag", "dup", "delete"]))
        if op == "typed":
            node.content = draw(typed_content(node.tag))
        elif op == "content":
            node.children, node.content = None, draw(CONTENTS)
        elif op == "tag":
            node.tag = draw(st.sampled_from(TAGS))
            if not node.tag & 0x20 and node.children is not None and node.tag != 0x04:
                node.content, node.children = der_dump(node.children), None
        elif op == "dup":
            parent.insert(parent.index(node), Der(node.tag, node.content, node.children))
        elif len(parent) > 1 or parent is not tree:
            parent.remove(node)
    return der_dump(tree)


@st.composite
def mutated_csr(draw: st.DrawFn) -> bytes:
    """A valid CSR with its DER or PEM text mutated, or its signed part edited and re-signed.

    Re-signing with the requester's key keeps the signature valid, so the edits
    reach the policy checks behind it (names, SANs, extensions, attributes).
    """
    key, der, info, alg = draw(st.sampled_from(base_requests()))
    how = draw(st.sampled_from(["der", "pem", "resign-bytes", *["resign-tree"] * 5]))
    if how == "der":
        out = draw(mutated_bytes(der))
        return _as_pem(out) if draw(st.booleans()) else out
    if how == "pem":
        return draw(mutated_bytes(_as_pem(der), 3))
    new_info = draw(mutated_bytes(info, 3) if how == "resign-bytes" else mutated_tree(info))
    sig = _sign_info(key, new_info)
    out = _tlv(0x30, new_info + alg + _tlv(0x03, b"\x00" + sig))
    return _as_pem(out) if draw(st.booleans()) else out


def test_der_walker_round_trips_the_base_requests() -> None:
    for _, der, info, _ in base_requests():
        assert der_dump(der_parse(der)) == der
        assert der_dump(der_parse(info)) == info


@fuzz(300)
@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
@given(data=mutated_csr(), profile_name=st.sampled_from(POLICY_PROFILES))
def test_mutated_csrs_meet_only_typed_errors(data: bytes, profile_name: str) -> None:
    profile = shipped_profile(profile_name)
    csr = only_typed_errors(load_csr, data, "fuzz.csr")
    if isinstance(csr, HsmCaError):
        event("refused by load_csr")
        return
    checked = only_typed_errors(check_request, csr, profile)
    event(f"check_request: {type(checked).__name__}")
    if isinstance(checked, CheckedRequest):
        assert_checked_invariants(checked, profile)


@fuzz(200)
@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
@given(data=mutated_csr(), profile_name=st.sampled_from(["tls-server", "tls-client"]))
def test_a_csr_that_passes_policy_issues(pki: Pki, data: bytes, profile_name: str) -> None:
    """End to end through sign_csrs: what the policy accepts, the CA can sign."""
    pki_home = pki.authority
    result = only_typed_errors(pki_home.sign_csrs, "issuing", [("fuzz", data)], profile_name)
    assert not isinstance(result, HsmCaError), result  # per-CSR problems are Refusals
    [item] = result
    event(f"outcome: {type(item).__name__}")
    if isinstance(item, Refusal):
        assert not isinstance(item.error, EngineError), item.error
        return
    assert isinstance(item, IssuedCertificate)
    checked = check_request(load_csr(data), pki_home.profiles.get(profile_name))
    assert item.certificate.subject == checked.subject
    sans = _ext_or_empty(item.certificate, x509.SubjectAlternativeName)
    assert list(sans) == list(checked.sans)


# ========================================================================== OCSP

_ALGS = [hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA224()]


@pytest.fixture(scope="module")
def responder(pki: Pki) -> OcspResponder:
    return OcspResponder(pki.authority, cache_seconds=300)


@st.composite
def ocsp_request(draw: st.DrawFn, pki: Pki) -> tuple[bytes, int | None, bytes | None]:
    """(DER, serial asked about or None, nonce or None): a real request, maybe mutated."""
    cert = draw(st.sampled_from([*pki.leaves, pki.issuing]))
    issuer = pki.root if cert == pki.issuing else pki.issuing
    alg = draw(st.sampled_from(_ALGS))
    builder = ocsp.OCSPRequestBuilder()
    serial = cert.serial_number
    if draw(st.booleans()):  # ask about any serial, known to this CA or not
        template = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, alg).build()
        serial = draw(st.integers(0, 2**200) | st.sampled_from([1, 2**63, 2**159, 2**160]))
        builder = builder.add_certificate_by_hash(
            template.issuer_name_hash, template.issuer_key_hash, serial, alg
        )
    else:
        builder = builder.add_certificate(cert, issuer, alg)
    nonce = draw(st.none() | st.binary(min_size=0, max_size=200))
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=draw(st.booleans()))
    der = builder.build().public_bytes(serialization.Encoding.DER)
    if draw(st.integers(0, 2)) == 0:
        return der, serial, nonce
    return draw(mutated_bytes(der)), None, None


@fuzz(300)
@given(data=st.data(), hint=st.sampled_from([None, None, "issuing", "root", "nope"]))
def test_ocsp_always_answers_with_a_parseable_response(
    responder: OcspResponder, pki: Pki, data: st.DataObject, hint: str | None
) -> None:
    der, serial, nonce = data.draw(
        st.one_of(
            ocsp_request(pki),
            ocsp_request(pki),
            st.binary(max_size=300).map(lambda b: (b, None, None)),
        )
    )
    answer = responder.respond(der, hint)
    assert isinstance(answer.der, bytes)
    resp = ocsp.load_der_ocsp_response(answer.der)
    event(f"status: {answer.status}")
    if serial is None or resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return
    # an unmutated request that was answered: about what was asked, and verifiable
    assert resp.serial_number == serial
    signer = pki.root if resp.responder_key_hash == _key_hash(pki.root) else pki.issuing
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))  # type: ignore[arg-type]
    echoed = [e.value.nonce for e in resp.extensions if isinstance(e.value, x509.OCSPNonce)]
    assert echoed == ([nonce] if nonce is not None else [])
    if serial == pki.leaves[1].serial_number and signer == pki.issuing:
        assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED


def _key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def test_fuzz_settings_follow_the_environment() -> None:
    """HSM_CA_FUZZ_EXAMPLES is what a long run sets; it must reach every test above."""
    s = fuzz(123)
    assert s.max_examples == (EXAMPLES or 123)
    assert s.deadline is None
