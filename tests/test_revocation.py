"""Revocation and CRLs through the CLI and the library."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from conftest import Cli, make_csr
from cryptography import x509

from hsm_ca.revocation import REASONS


def _leaf(cli: Cli, tmp_path: Path, name: str) -> str:
    p = tmp_path / f"{name}.csr"
    p.write_bytes(make_csr(cn=None, dns=[f"{name}.example.com"]))
    return json.loads(cli.ok("--json", "sign", str(p), "--ca", "issuing",
                             "--profile", "tls-server").out)["serial"]


def _crl(cli: Cli, *args: str) -> x509.CertificateRevocationList:
    out = cli.ok("crl", *args).out
    return x509.load_pem_x509_crl(out.encode())


def test_revoke_then_crl_lists_it_with_reason_and_invalidity(pki: Cli, tmp_path: Path) -> None:
    a, b, c = (_leaf(pki, tmp_path, n) for n in ("a", "b", "c"))
    pki.ok("revoke", a.upper(), "--reason", "keyCompromise", "--invalidity-date", "2026-01-02")
    pki.ok("revoke", "00" + b)
    crl = _crl(pki, "issuing")
    issuing = x509.load_pem_x509_certificate(pki.ok("ca", "export", "issuing").out.encode())
    assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert crl.issuer.public_bytes() == issuing.subject.public_bytes()
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    entries = {format(r.serial_number, "x"): r for r in crl}
    assert set(entries) == {a, b}
    ra = entries[a]
    assert ra.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    assert ra.extensions.get_extension_for_class(x509.InvalidityDate).value.invalidity_date_utc \
        == dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    with pytest.raises(x509.ExtensionNotFound):  # unspecified is omitted (RFC 5280 5.3.1)
        entries[b].extensions.get_extension_for_class(x509.CRLReason)
    assert c not in entries
    shown = json.loads(pki.ok("--json", "show", a).out)
    assert shown["status"] == "revoked" and shown["revocation_reason"] == "keyCompromise"
    assert sorted(r["serial"] for r in json.loads(pki.ok("--json", "list", "--revoked").out)) == sorted([a, b])
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)


def _micros(at: dt.datetime) -> int:
    return (at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def test_crl_numbers_strictly_increase_and_never_repeat(pki: Cli) -> None:
    """CRL numbers are derived from time (microseconds since 1970, or the last plus one),
    so they also stay above the numbers signed before a restore of an older backup."""
    numbers = []
    start = _micros(dt.datetime.now(dt.UTC))
    for args in (("issuing",), ("issuing",), ("root",), ("issuing", "--delta"), ("issuing",)):
        crl = _crl(pki, *args)
        numbers.append((args[0], crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number))
    end = _micros(dt.datetime.now(dt.UTC))
    issuing = [n for ca, n in numbers if ca == "issuing"]
    assert len(issuing) == 4 and issuing == sorted(set(issuing)), issuing
    assert len([n for ca, n in numbers if ca == "root"]) == 1
    assert all(start <= n <= end for _, n in numbers), (start, numbers, end)
    crls = json.loads(pki.ok("--json", "audit", "list").out)
    assert sum(1 for r in crls if r["action"] == "crl" and r["outcome"] == "issued") == 5


def test_refusals(pki: Cli, tmp_path: Path) -> None:
    s = _leaf(pki, tmp_path, "x")
    pki.ok("revoke", s)
    r = pki("revoke", s)
    assert r.code == 1 and "already revoked" in r.err
    r = pki("revoke", "abcdef0123")
    assert r.code == 1 and "no certificate" in r.err
    r = pki("revoke", s, "--reason", "bogus")
    assert r.code == 2 and r.err.startswith("Error:")
    root_serial = next(c["serial"] for c in json.loads(pki.ok("--json", "ca", "list").out)
                       if c["name"] == "root")
    r = pki("revoke", root_serial)
    assert r.code == 1 and "root" in r.err
    r = pki("crl", "nope")
    assert r.code == 1 and "nope" in r.err
    records = json.loads(pki.ok("--json", "audit", "list").out)
    assert [x["outcome"] for x in records if x["action"] == "revoke"] == \
        ["revoked", "refused", "refused", "refused"]
    pki.ok("audit", "verify")


def test_root_crl_carries_revoked_intermediate(pki: Cli) -> None:
    inter = next(c["serial"] for c in json.loads(pki.ok("--json", "ca", "list").out)
                 if c["name"] == "issuing")
    pki.ok("revoke", inter, "--reason", "cACompromise")
    crl = _crl(pki, "root")
    assert [format(r.serial_number, "x") for r in crl] == [inter]
    assert list(_crl(pki, "issuing")) == []


def test_delta_crl_also_lists_its_bases_entries(pki: Cli, tmp_path: Path) -> None:
    """Issue 14 finding 4: a client that takes the delta for a complete CRL (OpenSSL without
    -extended_crl) must still see ``a``, revoked before the base (RFC 5280 section 5.2.4
    allows a delta to repeat its base's entries)."""
    r = pki("crl", "issuing", "--delta")
    assert r.code == 1 and "no full CRL" in r.err
    a, b = _leaf(pki, tmp_path, "a"), _leaf(pki, tmp_path, "b")
    pki.ok("revoke", a)
    base = _crl(pki, "issuing")
    pki.ok("revoke", b, "--reason", "superseded")
    delta = _crl(pki, "issuing", "--delta")
    ind = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert ind.critical
    assert ind.value.crl_number == base.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert sorted(format(e.serial_number, "x") for e in delta) == sorted([a, b])
    assert {format(e.serial_number, "x"): e.extensions.get_extension_for_class(
        x509.CRLReason).value.reason for e in delta if format(e.serial_number, "x") == b} == {
        b: x509.ReasonFlags.superseded}
    with pytest.raises(x509.ExtensionNotFound):  # no base URL: no pointers
        base.extensions.get_extension_for_class(x509.FreshestCRL)


def test_distribution_points_with_base_url(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init", "--scrypt-n", "1024", "--base-url", "http://pki.example.com/")
    cli.ok("ca", "create-root", "root", "--subject", "CN=R,C=NL")
    cli.ok("ca", "create-intermediate", "issuing", "--parent", "root", "--subject", "CN=I,C=NL")
    full = _crl(cli, "issuing")
    idp = full.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert [u.value for u in idp.value.full_name] == ["http://pki.example.com/crl/issuing.crl"]
    fresh = full.extensions.get_extension_for_class(x509.FreshestCRL).value
    assert [u.value for u in fresh[0].full_name] == ["http://pki.example.com/crl/issuing-delta.crl"]
    delta = _crl(cli, "issuing", "--delta")
    assert delta.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value == idp.value
    serial = _leaf(cli, tmp_path, "w")
    cert = x509.load_pem_x509_certificate(json.loads(cli.ok("--json", "show", serial).out)["pem"].encode())
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [u.value for u in dp[0].full_name] == [u.value for u in idp.value.full_name]


def test_crl_output_forms(pki: Cli, tmp_path: Path) -> None:
    out = tmp_path / "c.crl"
    pki.ok("crl", "issuing", "--der", "-o", str(out))
    first = x509.load_der_x509_crl(out.read_bytes())
    info = json.loads(pki.ok("--json", "crl", "issuing").out)
    assert info["number"] > first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert info["entries"] == 0
    x509.load_pem_x509_crl(info["pem"].encode())


def test_every_reason_name_round_trips(pki: Cli, tmp_path: Path) -> None:
    serials = {}
    for reason in REASONS:
        s = _leaf(pki, tmp_path, reason.lower())
        pki.ok("revoke", s, "--reason", reason)
        serials[s] = reason
    crl = _crl(pki, "issuing")
    for entry in crl:
        reason = serials[format(entry.serial_number, "x")]
        try:
            got = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            got = x509.ReasonFlags.unspecified
        assert got == REASONS[reason]


def test_crl_next_update_is_capped_at_the_cas_expiry(pki: Cli) -> None:
    """Issue 14, "tests that let such bugs through": no test failed with the cap removed.
    A CA valid for two more days must not publish a CRL claiming seven days of validity
    (RFC 5280 section 5.1.2.5: no CRL says anything past its issuer's certificate)."""
    pki.ok("ca", "create-intermediate", "short", "--parent", "root",
           "--subject", "CN=Short-lived CA,O=Test", "--days", "2")
    ca = x509.load_pem_x509_certificate(pki.ok("ca", "export", "short").out.encode())
    for args in (("short",), ("short", "--delta")):
        crl = _crl(pki, *args)
        assert crl.next_update_utc is not None
        assert crl.next_update_utc == ca.not_valid_after_utc.replace(microsecond=0), args
    longer = _crl(pki, "issuing")  # one CRL: two calls could straddle a second boundary
    assert longer.next_update_utc - longer.last_update_utc == \
        dt.timedelta(days=7)  # the cap binds only a CA that expires sooner


def test_published_crl_is_re_signed_after_a_revocation(pki: Cli, tmp_path: Path) -> None:
    """The stored CRL the server publishes is kept while fresh only if nothing was revoked
    since it was signed: the revocation epoch is part of what the cached answer depends on."""
    from conftest import USER_PIN

    from hsm_ca.authority import Authority
    from hsm_ca.config import load_config
    from hsm_ca.revocation import current_crl

    serial = _leaf(pki, tmp_path, "late")
    auth = Authority(load_config(pki.home), pin=lambda: USER_PIN)
    try:
        for delta in (False, True):
            current_crl(auth, "issuing", delta=delta)
        first = current_crl(auth, "issuing")
        assert current_crl(auth, "issuing") == first  # fresh and unchanged: the stored one
        pki.ok("revoke", serial, "--reason", "keyCompromise")  # another connection
        for delta in (False, True):
            crl = x509.load_der_x509_crl(current_crl(auth, "issuing", delta=delta))
            assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    finally:
        auth.close()


class _ThreeDaysLater(dt.datetime):
    """``datetime`` whose now() is three days ahead (patched into hsm_ca.revocation only)."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
        return dt.datetime.now(tz) + dt.timedelta(days=3)


def test_an_expired_ca_signs_no_crl(pki: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expiry guard had no test. Past its CA's expiry no CRL is signed, no CRL number
    is used up, and the refusal is an audit record."""
    import types

    from conftest import USER_PIN

    import hsm_ca.revocation
    from hsm_ca.authority import Authority
    from hsm_ca.config import load_config
    from hsm_ca.errors import PolicyViolation

    pki.ok("ca", "create-intermediate", "brief", "--parent", "root",
           "--subject", "CN=Brief CA,O=Test", "--days", "2")
    first = _crl(pki, "brief").extensions.get_extension_for_class(x509.CRLNumber).value
    auth = Authority(load_config(pki.home), pin=lambda: USER_PIN)
    try:
        with monkeypatch.context() as later:
            later.setattr(hsm_ca.revocation, "_dt", types.SimpleNamespace(
                datetime=_ThreeDaysLater, UTC=dt.UTC, timedelta=dt.timedelta))
            for delta in (False, True):
                with pytest.raises(PolicyViolation, match="has expired"):
                    hsm_ca.revocation.sign_crl(auth, "brief", delta=delta)
    finally:
        auth.close()
    refused = [r for r in json.loads(pki.ok("--json", "audit", "list").out)
               if r["action"] == "crl" and r["outcome"] == "refused"]
    assert len(refused) == 2 and all("has expired" in r["detail"] for r in refused)
    after = _crl(pki, "brief").extensions.get_extension_for_class(x509.CRLNumber).value
    assert after.crl_number > first.crl_number
    issued = [r for r in json.loads(pki.ok("--json", "audit", "list").out)
              if r["action"] == "crl" and r["outcome"] == "issued" and r["ca"] == "brief"]
    assert len(issued) == 2  # the two CRLs signed while the CA was valid, nothing between
