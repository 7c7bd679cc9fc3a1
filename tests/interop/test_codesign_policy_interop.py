"""``hsm-ca codesign verify`` against ``openssl cms -verify -crl_check_all``, case by case.

A small PKI is made here with cryptography (throwaway keys, never written
outside the test's temporary directory): a root, intermediates with and
without EKU restrictions, signers that are fine and signers that must not
sign code (a CA, one without digitalSignature), CRLs that must not count
(a delta alone, one past nextUpdate, ones whose issuing distribution point
excludes the certificate), and two time-stamping authorities of which only one
is pinned. Each case runs both verifiers (openssl with ``-extended_crl`` too,
the full RFC 5280 CRL processing: without it OpenSSL 3.0 takes a delta CRL
alone for a complete one) and asserts the same verdict; cases
with a time stamp give openssl ``-attime`` of the stamp when hsm-ca should use
it, and no ``-attime`` (now) when it must not.

OpenSSL before 3.4 has no ``-purpose codesign``: there the EKU cases (an
intermediate's EKU) are checked against the table's expected verdict, which is
the codesign rule (an intermediate with an EKU extension must include
codeSigning or anyExtendedKeyUsage).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms as acms
from asn1crypto import tsp
from conftest import run_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from interop_support import requires_openssl
from revocation_support import run_openssl

from hsm_ca.cms import build_signed_data, stream_digest, time_stamp_attribute

pytestmark = [pytest.mark.interop, requires_openssl]

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
CRLDP = "http://crl.test.invalid/issuing.crl"
STAMP_TIME = NOW - 45 * DAY  # while the short-lived signer was valid
UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.99999.42")


class _Handle:
    """A KeyHandle over an in-memory test key (the engine's interface, for build_signed_data)."""

    key_type = "ec-p256"
    extractable = False

    def __init__(self, key: ec.EllipticCurvePrivateKey, label: str) -> None:
        self.key, self.label = key, label

    def public_key(self) -> Any:
        return self.key.public_key()

    def sign(self, data: bytes, algorithm: Any, padding: Any = None) -> bytes:
        return self.key.sign(data, ec.ECDSA(algorithm))


@dataclass
class Party:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: Path

    @property
    def handle(self) -> _Handle:
        return _Handle(self.key, self.pem.stem)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Policy Interop")])


def _make(directory: Path, cn: str, issuer: Party | None, *, ca: bool,
          eku: list[x509.ObjectIdentifier] | None = None, eku_critical: bool = False,
          ku: dict[str, bool] | None = None, crldp: bool = False, crldp_rdn: str | None = None,
          crldp_issuer: x509.Name | None = None,
          not_before: dt.datetime = NOW - 400 * DAY,
          not_after: dt.datetime = NOW + 3650 * DAY) -> Party:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(cn)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer.cert.subject if issuer else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             (issuer.key if issuer else key).public_key()), critical=False))
    usage = {k: False for k in ("digital_signature", "content_commitment", "key_encipherment",
                                "data_encipherment", "key_agreement", "key_cert_sign",
                                "crl_sign", "encipher_only", "decipher_only")}
    usage.update(ku or ({"key_cert_sign": True, "crl_sign": True} if ca
                        else {"digital_signature": True}))
    b = b.add_extension(x509.KeyUsage(**usage), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=eku_critical)
    if crldp:
        b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(CRLDP)], None, None, None)]), critical=False)
    if crldp_issuer is not None:  # the CRL at CRLDP comes from another issuer (indirect)
        b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(CRLDP)], None, None,
            [x509.DirectoryName(crldp_issuer)])]), critical=False)
    if crldp_rdn:  # a name relative to the CRL issuer's (RFC 5280 4.2.1.13)
        b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            None, _rdn(crldp_rdn), None, None)]), critical=False)
    cert = b.sign(issuer.key if issuer else key, hashes.SHA256())
    pem = directory / f"{cn.replace(' ', '-')}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Party(cert, key, pem)


def _rdn(cn: str) -> x509.RelativeDistinguishedName:
    return x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _crl(directory: Path, name: str, issuer: Party, revoked: list[x509.Certificate], *,
         last: dt.datetime = NOW - 90 * DAY, nxt: dt.datetime = NOW + 30 * DAY,
         delta: bool = False, idp: x509.IssuingDistributionPoint | None = None,
         unknown_critical: bool = False, entry_unknown_critical: bool = False) -> Path:
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
         .last_update(last).next_update(nxt)
         .add_extension(x509.CRLNumber(2 if delta else 1), critical=False))
    if delta:
        b = b.add_extension(x509.DeltaCRLIndicator(1), critical=True)
    if idp is not None:
        b = b.add_extension(idp, critical=True)
    if unknown_critical:
        b = b.add_extension(x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00"), critical=True)
    for cert in revoked:
        entry = (x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                 .revocation_date(last + DAY)
                 .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False))
        if entry_unknown_critical:
            entry = entry.add_extension(x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00"),
                                        critical=True)
        b = b.add_revoked_certificate(entry.build())
    path = directory / f"{name}.crl"
    path.write_bytes(b.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def _idp(**kw: Any) -> x509.IssuingDistributionPoint:
    args = {"full_name": None, "relative_name": None, "only_contains_user_certs": False,
            "only_contains_ca_certs": False, "only_some_reasons": None, "indirect_crl": False,
            "only_contains_attribute_certs": False}
    args.update(kw)
    return x509.IssuingDistributionPoint(**args)


@dataclass
class World:
    dir: Path
    parties: dict[str, Party] = field(default_factory=dict)
    crls: dict[str, Path] = field(default_factory=dict)
    data: Path | None = None
    sigs: dict[str, Path] = field(default_factory=dict)


CS = ExtendedKeyUsageOID.CODE_SIGNING
TS = ExtendedKeyUsageOID.TIME_STAMPING
TLS = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    d = tmp_path_factory.mktemp("codesign-policy")
    w = World(d)
    p = w.parties
    p["root"] = _make(d, "Policy Root", None, ca=True)
    p["int"] = _make(d, "Policy Issuing", p["root"], ca=True)
    p["int-cs"] = _make(d, "Policy CodeSigning CA", p["root"], ca=True, eku=[CS])
    p["int-tls"] = _make(d, "Policy TLS CA", p["root"], ca=True, eku=TLS)
    p["int-any"] = _make(d, "Policy AnyEKU CA", p["root"], ca=True,
                         eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    p["good"] = _make(d, "Good Signer", p["int"], ca=False, eku=[CS], crldp=True)
    p["revoked"] = _make(d, "Revoked Signer", p["int"], ca=False, eku=[CS], crldp=True)
    p["relative"] = _make(d, "Relative DP Signer", p["int"], ca=False, eku=[CS],
                          crldp_rdn="Partition 1")
    p["indirect"] = _make(d, "Indirect DP Signer", p["int"], ca=False, eku=[CS],
                          crldp_issuer=_name("Some Other CRL Issuer"))
    p["under-cs"] = _make(d, "Signer under CS CA", p["int-cs"], ca=False, eku=[CS])
    p["under-tls"] = _make(d, "Signer under TLS CA", p["int-tls"], ca=False, eku=[CS])
    p["under-any"] = _make(d, "Signer under Any CA", p["int-any"], ca=False, eku=[CS])
    p["ca-leaf"] = _make(d, "CA Signer", p["int"], ca=True, eku=[CS],
                         ku={"digital_signature": True, "key_cert_sign": True})
    p["no-ds"] = _make(d, "NoDS Signer", p["int"], ca=False, eku=[CS],
                       ku={"key_encipherment": True})
    p["expired"] = _make(d, "Expired Signer", p["int"], ca=False, eku=[CS],
                         not_before=NOW - 60 * DAY, not_after=NOW - 30 * DAY)
    p["int-nocrlsign"] = _make(d, "Policy No cRLSign CA", p["root"], ca=True,
                               ku={"key_cert_sign": True})
    p["under-nocrlsign"] = _make(d, "Signer under No cRLSign CA", p["int-nocrlsign"],
                                 ca=False, eku=[CS])
    p["certsign-leaf"] = _make(d, "CertSign Signer", p["int"], ca=False, eku=[CS],
                               ku={"digital_signature": True, "key_cert_sign": True})
    p["tsa"] = _make(d, "Pinned TSA", p["int"], ca=False, eku=[TS], eku_critical=True)
    p["tsa-noncritical"] = _make(d, "NonCritical TSA", p["int"], ca=False, eku=[TS])
    p["tsa-multi"] = _make(d, "Multi TSA", p["int"], ca=False, eku=[TS, CS], eku_critical=True)
    p["rogue-tsa"] = _make(d, "Rogue TSA", p["int"], ca=False, eku=[TS], eku_critical=True)
    root, inter = p["root"], p["int"]
    c = w.crls
    c["root"] = _crl(d, "root", root, [])
    c["int"] = _crl(d, "int", inter, [p["revoked"].cert])
    c["int-delta"] = _crl(d, "int-delta", inter, [p["revoked"].cert], delta=True)
    c["int-expired"] = _crl(d, "int-expired", inter, [], last=NOW - 40 * DAY,
                            nxt=NOW - 10 * DAY)
    c["int-ca-only"] = _crl(d, "int-ca-only", inter, [], idp=_idp(only_contains_ca_certs=True))
    c["root-user-only"] = _crl(d, "root-user-only", root, [],
                               idp=_idp(only_contains_user_certs=True))
    c["int-other-dp"] = _crl(d, "int-other-dp", inter, [], idp=_idp(
        full_name=[x509.UniformResourceIdentifier("http://crl.test.invalid/other.crl")]))
    c["int-this-dp"] = _crl(d, "int-this-dp", inter, [p["revoked"].cert], idp=_idp(
        full_name=[x509.UniformResourceIdentifier(CRLDP)]))
    c["int-rdn-1"] = _crl(d, "int-rdn-1", inter, [], idp=_idp(relative_name=_rdn("Partition 1")))
    c["int-rdn-2"] = _crl(d, "int-rdn-2", inter, [], idp=_idp(relative_name=_rdn("Partition 2")))
    c["int-user-only"] = _crl(d, "int-user-only", inter, [p["revoked"].cert],
                              idp=_idp(only_contains_user_certs=True))
    c["int-future"] = _crl(d, "int-future", inter, [], last=NOW + DAY)
    c["int-unknown-critical"] = _crl(d, "int-unknown-critical", inter, [],
                                     unknown_critical=True)
    c["int-entry-critical"] = _crl(d, "int-entry-critical", inter, [p["revoked"].cert],
                                   entry_unknown_critical=True)
    c["int-some-reasons"] = _crl(d, "int-some-reasons", inter, [], idp=_idp(
        only_some_reasons=frozenset({x509.ReasonFlags.key_compromise})))
    c["int-empty"] = _crl(d, "int-empty", inter, [])
    for name in ("int-cs", "int-tls", "int-any", "int-nocrlsign"):
        c[name] = _crl(d, name, p[name], [])
    w.data = d / "release.bin"
    w.data.write_bytes(b"release artifact\n" * 500)
    return w


def _sign(w: World, signer: str, issuer: str = "int", *, stamp: str | None = None,
          imprint_alg: str = "sha256", stamp_time: dt.datetime = STAMP_TIME) -> Path:
    """A detached CMS signature by ``signer``, optionally time-stamped by TSA ``stamp``."""
    key = (signer, issuer, stamp, imprint_alg)
    name = "-".join(k for k in key if k)
    if name in w.sigs:
        return w.sigs[name]
    p = w.parties
    assert w.data is not None
    digest, _size, _sha = stream_digest(str(w.data), "sha256")
    unsigned: Callable[[bytes], list[acms.CMSAttribute]] | None = None
    if stamp is not None:
        tsa = p[stamp]

        def unsigned(signature: bytes) -> list[acms.CMSAttribute]:
            tst = tsp.TSTInfo({
                "version": "v1", "policy": "1.3.6.1.4.1.99999.7",
                "message_imprint": {"hash_algorithm": {"algorithm": imprint_alg},
                                    "hashed_message": hashlib.new(imprint_alg, signature).digest()},
                "serial_number": x509.random_serial_number(), "gen_time": stamp_time,
            }).dump()
            token, _ = build_signed_data(
                handle=tsa.handle, signer=tsa.cert, chain=[p["int"].cert],  # type: ignore[arg-type]
                content_type="tst_info", digest=hashlib.sha256(tst).digest(),
                digest_name="sha256", when=stamp_time, content=tst)
            return [time_stamp_attribute(token.dump())]

    info, _ = build_signed_data(
        handle=p[signer].handle, signer=p[signer].cert, chain=[p[issuer].cert],  # type: ignore[arg-type]
        content_type="data", digest=digest, digest_name="sha256",
        when=(stamp_time if stamp else NOW), unsigned=unsigned)
    path = w.dir / f"{name}.p7s"
    path.write_bytes(info.dump())
    w.sigs[name] = path
    return path


@cache
def openssl_has_codesign_purpose() -> bool:
    r = run_openssl("verify", "-help")
    return "codesign" in (r.stdout + r.stderr)


def openssl_verdict(w: World, sig: Path, crls: list[str], attime: dt.datetime | None,
                    purpose: str | None = None, extra: tuple[str, ...] = ()) -> bool:
    cafile = w.dir / f"ca-{'-'.join(crls) or 'none'}.pem"
    cafile.write_text(w.parties["root"].pem.read_text()
                      + "".join(w.crls[c].read_text() for c in crls))
    purpose = purpose or ("codesign" if openssl_has_codesign_purpose() else "any")
    args: list[str | Path] = ["cms", "-verify", "-binary", "-inform", "DER", "-content",
                              str(w.data), "-in", sig, "-CAfile", cafile, "-purpose", purpose,
                              "-out", "/dev/null"]
    if crls:
        # -extended_crl: without it OpenSSL 3.0 takes a delta CRL alone for a complete one
        args += ["-crl_check_all", "-extended_crl"]
    if attime is not None:
        args += ["-attime", str(int(attime.timestamp()))]
    args += extra
    r = run_openssl(*args)
    ok = r.returncode == 0
    assert ok == ("Verification successful" in r.stdout + r.stderr), r.stdout + r.stderr
    return ok


def ours(w: World, sig: Path, crls: list[str], *extra: str) -> tuple[bool, str]:
    r = run_process(w.dir / "no-home", "codesign", "verify", str(w.data), str(sig),
                    "--trust", str(w.parties["root"].pem),
                    *[a for c in crls for a in ("--crl", str(w.crls[c]))], *extra)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 1), r.stderr
    if r.returncode:
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.returncode == 0, r.stdout + r.stderr


@dataclass(frozen=True)
class Case:
    signer: str
    crls: tuple[str, ...]
    valid: bool
    why: str = ""  # a word of our reason when invalid
    issuer: str = "int"
    stamp: str | None = None
    imprint: str = "sha256"
    pin: bool = False  # --tsa-trust the pinned TSA
    stamp_used: bool = False  # openssl is asked at the stamp's time
    eku: bool = False  # the verdict rests on the codesign purpose
    openssl: tuple[str, ...] = ()  # more openssl flags
    stricter: bool = False  # hsm-ca refuses what this openssl accepts (said where used)


FULL = ("root", "int")
CASES = {
    # (a) revocation data
    "good, full CRLs": Case("good", FULL, True),
    "revoked, full CRLs": Case("revoked", FULL, False, "revoked"),
    "revoked, delta CRL only": Case("revoked", ("root", "int-delta"), False, "delta"),
    "good, delta CRL only": Case("good", ("root", "int-delta"), False, "delta"),
    "good, CRL past nextUpdate": Case("good", ("root", "int-expired"), False, "nextUpdate"),
    "good, CRL only for CA certs": Case("good", ("root", "int-ca-only"), False, "only CA"),
    "good, root CRL only for end entities": Case("good", ("root-user-only", "int"), False,
                                                 "only end-entity"),
    "good, CRL of another distribution point": Case("good", ("root", "int-other-dp"), False,
                                                    "distribution point"),
    "good, CRL of its distribution point": Case("good", ("root", "int-this-dp"), True),
    "revoked, CRL of its distribution point": Case("revoked", ("root", "int-this-dp"), False,
                                                   "revoked"),
    "relative DP, CRL of that partition": Case("relative", ("root", "int-rdn-1"), True),
    "relative DP, CRL of another partition": Case("relative", ("root", "int-rdn-2"), False,
                                                  "distribution point"),
    "relative DP, full CRL without IDP": Case("relative", FULL, True),
    "DP with another cRLIssuer, CRL of that name": Case("indirect", ("root", "int-this-dp"),
                                                        False, "distribution point"),
    "full-name DP, CRL of a partition": Case("good", ("root", "int-rdn-1"), False,
                                             "distribution point"),
    "revoked, CRL only for end entities": Case("revoked", ("root", "int-user-only"), False,
                                               "revoked"),
    "good, no CRL for the issuing CA": Case("good", ("root",), False, "no valid CRL"),
    "good, CRL not yet valid": Case("good", ("root", "int-future"), False, "not valid until"),
    "good, CRL with an unknown critical extension": Case(
        "good", ("root", "int-unknown-critical"), False, "unhandled critical extension"),
    "revoked, CRL entry with an unknown critical extension": Case(
        "revoked", ("root", "int-entry-critical"), False, "unhandled critical extension"),
    "good, CRL for some reasons only": Case("good", ("root", "int-some-reasons"), False,
                                            "some reasons"),
    "good, CRL issuer without cRLSign": Case("under-nocrlsign", ("root", "int-nocrlsign"),
                                             False, "cRLSign", issuer="int-nocrlsign"),
    # stricter than OpenSSL 3.0, which applies no delta here even with -use_deltas (finding 4)
    "revoked in the delta, base and delta": Case(
        "revoked", ("root", "int-empty", "int-delta"), False, "revoked", stricter=True),
    "good, base and delta": Case("good", ("root", "int-empty", "int-delta"), True,
                                 openssl=("-use_deltas",)),
    # (c) EKU on intermediates
    "under codeSigning-only CA": Case("under-cs", ("root", "int-cs"), True, issuer="int-cs",
                                      eku=True),
    "under TLS-only CA": Case("under-tls", ("root", "int-tls"), False, "extended key usage",
                              issuer="int-tls", eku=True),
    "under anyEKU CA": Case("under-any", ("root", "int-any"), True, issuer="int-any", eku=True),
    # (d) end entities that must not sign code
    "CA:TRUE signer": Case("ca-leaf", FULL, False, "chain", eku=True),
    "signer without digitalSignature": Case("no-ds", FULL, False, "digitalSignature", eku=True),
    "signer with keyCertSign": Case("certsign-leaf", FULL, False, "keyCertSign", eku=True),
    # (b) time stamps
    "expired, no stamp": Case("expired", FULL, False, "not valid at validation time"),
    "expired, pinned TSA stamp": Case("expired", FULL, True, stamp="tsa", pin=True,
                                      stamp_used=True),
    "expired, pinned TSA stamp, no CRLs": Case("expired", (), True, stamp="tsa", pin=True,
                                               stamp_used=True),
    "expired, rogue TSA stamp": Case("expired", FULL, False, "not the pinned", stamp="rogue-tsa",
                                     pin=True),
    "expired, stamp but no TSA pinned": Case("expired", FULL, False, "no time-stamping",
                                             stamp="tsa"),
    "expired, pinned TSA, MD5 imprint": Case("expired", FULL, False, "md5", stamp="tsa",
                                             imprint="md5", pin=True),
    "good, rogue TSA stamp": Case("good", FULL, True, stamp="rogue-tsa", pin=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_verdict_matches_openssl(world: World, name: str) -> None:
    case = CASES[name]
    sig = _sign(world, case.signer, case.issuer, stamp=case.stamp, imprint_alg=case.imprint)
    extra = ["--tsa-trust", str(world.parties["tsa"].pem)] if case.pin else []
    ok, output = ours(world, sig, list(case.crls), *extra)
    assert ok == case.valid, output
    if not case.valid:
        assert case.why in output, output
    if case.stamp and not case.stamp_used:
        assert "the time stamp was not used" in output, output
    if case.stricter or (case.eku and not openssl_has_codesign_purpose()):
        return  # this openssl cannot judge the case; the table's verdict stands
    theirs = openssl_verdict(world, sig, list(case.crls), STAMP_TIME if case.stamp_used else None,
                             extra=case.openssl)
    assert ok == theirs, f"hsm-ca says {ok}, openssl says {theirs}: {output}"


def test_rogue_stamp_would_revive_the_signer(world: World) -> None:
    """Why pinning matters: at the forged stamp's time openssl accepts the expired signer."""
    sig = _sign(world, "expired", stamp="rogue-tsa")
    assert openssl_verdict(world, sig, list(FULL), STAMP_TIME)
    assert not ours(world, sig, list(FULL), "--tsa-trust", str(world.parties["tsa"].pem))[0]


@pytest.mark.parametrize(("ca_eku", "leaf_ku"), [
    ("none", "digitalSignature"), ("purpose only", "digitalSignature"),
    ("TLS only", "digitalSignature"), ("none", "keyEncipherment"),
])
def test_intermediate_eku_rule_is_openssls(world: World, ca_eku: str, leaf_ku: str) -> None:
    """The CA EKU and signer keyUsage rules are openssl's own, seen through a purpose it has.

    ``-purpose smimesign`` refuses an intermediate whose EKU extension lacks
    emailProtection, as hsm-ca refuses one lacking codeSigning, and a signer
    whose keyUsage cannot sign: the same chain built for each purpose gets the
    same verdict from both verifiers.
    """
    p, d = world.parties, world.dir
    verdicts = {}
    for purpose, eku in (("codesign", CS), ("smimesign", ExtendedKeyUsageOID.EMAIL_PROTECTION)):
        ekus = {"none": None, "purpose only": [eku], "TLS only": TLS}[ca_eku]
        ca_name = f"mirror-ca-{purpose}-{ca_eku}-{leaf_ku}"
        leaf_name = f"mirror-{purpose}-{ca_eku}-{leaf_ku}"
        p[ca_name] = _make(d, ca_name, p["root"], ca=True, eku=ekus)
        ku = {"digital_signature": True} if leaf_ku == "digitalSignature" \
            else {"key_encipherment": True}
        p[leaf_name] = _make(d, leaf_name, p[ca_name], ca=False, eku=[eku], ku=ku)
        sig = _sign(world, leaf_name, ca_name)
        if purpose == "codesign":
            verdicts[purpose] = ours(world, sig, [])[0]
        else:
            verdicts[purpose] = openssl_verdict(world, sig, [], None, purpose="smimesign")
    assert verdicts["codesign"] == verdicts["smimesign"], verdicts
    assert verdicts["codesign"] == (ca_eku != "TLS only" and leaf_ku == "digitalSignature")


@pytest.mark.parametrize("tsa", ["tsa", "tsa-noncritical", "tsa-multi"])
def test_tsa_certificate_rule_is_openssls(world: World, tsa: str) -> None:
    """A pinned TSA still needs timeStamping as its only, critical EKU: ``openssl ts -verify``
    judges the stamp itself, hsm-ca's verdict on the expired signer follows it."""
    sig = _sign(world, "expired", stamp=tsa)
    info = acms.ContentInfo.load(sig.read_bytes())
    si = info["content"]["signer_infos"][0]
    token = world.dir / f"{tsa}.token.der"
    token.write_bytes(si["unsigned_attrs"][0]["values"][0].dump())
    untrusted = world.dir / f"{tsa}.untrusted.pem"
    untrusted.write_text(world.parties[tsa].pem.read_text() + world.parties["int"].pem.read_text())
    r = run_openssl("ts", "-verify", "-digest", hashlib.sha256(si["signature"].native).hexdigest(),
                    "-token_in", "-in", token, "-CAfile", world.parties["root"].pem,
                    "-untrusted", untrusted, "-attime", str(int(STAMP_TIME.timestamp())))
    theirs = r.returncode == 0 and "Verification: OK" in r.stdout
    ok, output = ours(world, sig, [], "--tsa-trust", str(world.parties[tsa].pem))
    assert ok == theirs == (tsa == "tsa"), (output, r.stdout + r.stderr)
