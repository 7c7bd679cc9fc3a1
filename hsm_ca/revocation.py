"""Revocation and CRLs.

CRL numbers are reserved (and committed) before the HSM signs, exactly like
serials, so a crash can leave a gap but never a repeat. Entries are read in the
same transaction as the number and the *revocation epoch* they correspond to,
which tells a later request whether the stored CRL is still current.

A delta CRL carries the same entries as a full CRL signed at its time, not only
the changes since its base: clients that read a delta as a complete CRL (OpenSSL
3.0 without ``-extended_crl`` picks the newest CRL in scope, delta or not) must
still see a certificate revoked before the base. A delta thus saves no bytes;
what it adds is freshness for clients that follow freshestCRL.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsm_ca.engine.keys import as_private_key
from hsm_ca.errors import NotFound, PolicyViolation, Tampered, UsageError
from hsm_ca.serials import format_serial, parse_serial
from hsm_ca.trailstate import digest_text, revocation_detail, verified_revocations
from hsm_ca.x509util import rfc3339, signature_hash_for

if TYPE_CHECKING:
    from hsm_ca.authority import Authority, CaRecord

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}


def reason_flag(name: str | None) -> x509.ReasonFlags:
    return REASONS.get(name or "unspecified", x509.ReasonFlags.unspecified)


@functools.lru_cache(maxsize=65536)
def _parse_time(text: str) -> _dt.datetime:
    """Our own RFC 3339 strings; revocations made in one second share one parse."""
    return _dt.datetime.fromisoformat(text)


@dataclass(frozen=True)
class RevocationResult:
    serial: str
    ca: str
    reason: str
    revoked_at: str
    invalidity_date: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "ca": self.ca,
            "reason": self.reason,
            "revoked_at": self.revoked_at,
            "invalidity_date": self.invalidity_date,
        }


@dataclass(frozen=True)
class CrlResult:
    ca: str
    number: int
    delta_base: int | None
    entries: int
    crl: x509.CertificateRevocationList
    der_bytes: bytes = b""

    def der(self) -> bytes:
        return self.der_bytes or self.crl.public_bytes(serialization.Encoding.DER)

    def pem(self) -> bytes:
        from hsm_ca.x509util import pem_from_der

        return pem_from_der(self.der(), "X509 CRL").encode()

    def as_dict(self) -> dict[str, Any]:
        return {
            "ca": self.ca,
            "number": self.number,
            "delta_base": self.delta_base,
            "entries": self.entries,
            "this_update": rfc3339(self.crl.last_update_utc),
            "next_update": rfc3339(self.crl.next_update_utc) if self.crl.next_update_utc else None,
        }


def revoke(
    authority: Authority,
    serial_text: str,
    reason: str = "unspecified",
    invalidity_date: _dt.datetime | None = None,
) -> RevocationResult:
    """Revoke an issued certificate; unknown or already revoked serials are refused."""
    store, audit, actor = authority.store, authority.audit, authority.actor()
    try:
        if reason not in REASONS:
            raise UsageError(f"unknown revocation reason {reason!r}; use one of {', '.join(REASONS)}")
        serial = format_serial(parse_serial(serial_text))
    except UsageError as e:
        audit.append(actor, "revoke", "refused", detail=str(e))
        raise
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    if invalidity_date is not None:
        if invalidity_date.tzinfo is None:
            invalidity_date = invalidity_date.replace(tzinfo=_dt.UTC)
        if invalidity_date > now:
            audit.append(actor, "revoke", "refused", serial=serial,
                         detail="invalidity date is in the future")
            raise UsageError("--invalidity-date must not be in the future")
    with store.transaction():
        row = store.get_certificate(serial)
        problem: Exception | None = None
        if row is None:
            problem = NotFound(f"no certificate with serial {serial}")
        elif row["status"] == "revoked":
            problem = PolicyViolation(
                f"certificate {serial} is already revoked ({row['revocation_reason']}, "
                f"{row['revoked_at']})"
            )
        elif row["ca"] and store.get_ca(row["ca"]) is not None and \
                store.get_ca(row["ca"])["serial"] == serial:
            problem = PolicyViolation(
                f"certificate {serial} is the self-signed root of CA {row['ca']!r}; "
                "a root cannot revoke itself — distrust it instead"
            )
        if problem is not None:
            audit.append(actor, "revoke", "refused", serial=serial,
                         ca=row["ca"] if row else None, detail=str(problem))
    if problem is not None:
        raise problem
    with store.transaction():
        row = store.get_certificate(serial)
        if row is None or row["status"] == "revoked":  # lost a race with another process
            raise PolicyViolation(f"certificate {serial} is already revoked")
        inv = rfc3339(invalidity_date) if invalidity_date else None
        store.revoke(serial, rfc3339(now), reason, inv)
        # the record carries every field of the row's revocation: the row is checked against it
        audit.append(actor, "revoke", "revoked", ca=row["ca"], serial=serial,
                     subject=row["subject"], profile=row["profile"],
                     detail=revocation_detail(reason, rfc3339(now), inv))
    return RevocationResult(serial, row["ca"], reason, rfc3339(now), inv)


def crl_urls(authority: Authority, ca_name: str) -> tuple[str, str] | None:
    base = authority.config.base_url
    if not base:
        return None
    return f"{base}/crl/{ca_name}.crl", f"{base}/crl/{ca_name}-delta.crl"


def sign_crl(authority: Authority, ca_name: str, *, delta: bool = False) -> CrlResult:
    """Sign a fresh full (or delta) CRL through the engine and record it."""
    from hsm_ca.authority import CertificateAuthority

    store, audit, actor = authority.store, authority.audit, authority.actor()
    ca: CaRecord = authority.get_ca(ca_name)
    handle = CertificateAuthority(authority, ca).key_handle()  # log in before burning a number
    audit_key = authority.audit_public_key()
    profile = authority.profiles.get("root-ca" if ca.parent is None else "intermediate-ca")
    if ca.not_after <= _dt.datetime.now(_dt.UTC):
        problem = f"CA {ca_name!r} has expired; it cannot sign CRLs"
        audit.append(actor, "crl", "refused", ca=ca_name, key_label=ca.key_label, detail=problem)
        raise PolicyViolation(problem)
    with store.transaction():
        # the time is taken once the write lock is held, so a higher CRL number never
        # carries an earlier thisUpdate, nor lists a revocation dated after it
        exact = _dt.datetime.now(_dt.UTC)  # also what the CRL number is derived from
        now = exact.replace(microsecond=0)
        next_update = min(now + _dt.timedelta(days=profile.crl_next_update_days), ca.not_after)
        base_row = store.latest_crl(ca_name) if delta else None
        if delta and base_row is None:
            raise PolicyViolation(
                f"CA {ca_name!r} has no full CRL yet to base a delta CRL on; run 'hsm-ca crl {ca_name}'"
            )
        number = store.next_crl_number(ca_name, exact)  # above any signed before a restore
        epoch = store.revocation_epoch()
        # A delta lists every revocation, its base's too (RFC 5280 section 5.2.4 lets a
        # delta repeat entries of its base): OpenSSL without -extended_crl takes the
        # newest CRL in scope as complete, even a delta, and one listing only the
        # changes since its base let a certificate revoked before the base verify OK.
        # The rows are proven to be what the audit trail says before anything is signed
        # (an edited row must not drop out of the CRL); their digest goes into the
        # intent record, where the next CRL's proof starts.
        try:
            view = verified_revocations(store, ca_name, audit_key)
        except Tampered as e:
            problem = str(e)
            view = None
        if view is not None:
            rows = view.rows
            audit.append(actor, "crl", "intent", ca=ca_name, key_label=ca.key_label,
                         detail=f"{'delta' if delta else 'full'} CRL number {number}; "
                                + digest_text(view.count, view.digest))
    if view is None:
        audit.append(actor, "crl", "refused", ca=ca_name, key_label=ca.key_label,
                     detail=f"the CRL was not signed: {problem}")
        raise Tampered(problem)
    # Entries are built in one tight loop (a million of them is the case to be fast for);
    # extension objects are shared between entries, and "unspecified" is omitted (RFC 5280).
    reason_exts: dict[str | None, list[x509.Extension[x509.ExtensionType]]] = {
        name: [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(flag))]
        for name, flag in REASONS.items() if name != "unspecified"
    }
    no_ext: list[x509.Extension[x509.ExtensionType]] = []
    entry = x509.RevokedCertificateBuilder
    revoked = []
    append = revoked.append
    for serial, revoked_at, reason, invalidity in rows:
        exts = reason_exts.get(reason, no_ext)
        if invalidity:
            value = x509.InvalidityDate(_parse_time(invalidity).replace(tzinfo=None))
            exts = [*exts, x509.Extension(value.oid, False, value)]
        append(entry(int(serial, 16), _parse_time(revoked_at), exts).build())
    extensions: list[x509.Extension[x509.ExtensionType]] = []

    def ext(value: x509.ExtensionType, critical: bool = False) -> None:
        extensions.append(x509.Extension(value.oid, critical, value))

    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        ext(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
    except x509.ExtensionNotFound:
        ext(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()))  # type: ignore[arg-type]
    ext(x509.CRLNumber(number))
    # A root's own certificate has no CRL distribution point, so an issuing distribution
    # point would put it out of its CRL's scope (openssl -crl_check_all: "different CRL
    # scope"); roots publish CRLs without IDP and without delta pointers.
    urls = crl_urls(authority, ca_name) if ca.parent is not None else None
    if urls:
        ext(x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(urls[0])], relative_name=None,
            only_contains_user_certs=False, only_contains_ca_certs=False,
            only_some_reasons=None, indirect_crl=False, only_contains_attribute_certs=False,
        ), critical=True)
    if delta:
        assert base_row is not None
        ext(x509.DeltaCRLIndicator(int(base_row["number"])), critical=True)
    elif urls:
        ext(x509.FreshestCRL([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(urls[1])], relative_name=None,
            reasons=None, crl_issuer=None)]))
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca.subject, last_update=now, next_update=next_update,
        extensions=extensions, revoked_certificates=revoked,
    )
    linted = None
    if profile.lint:  # lint the exact TBS, signed with a throwaway key, before the CA key signs
        from hsm_ca.linting import lint_crl, throwaway_key

        pre = builder.sign(throwaway_key(ca.key_type), signature_hash_for(ca.key_type))
        findings = lint_crl(pre.public_bytes(serialization.Encoding.DER))
        if findings:
            audit.append(actor, "crl", "refused", ca=ca_name, key_label=ca.key_label,
                         detail=f"CRL number {number}: pre-issuance lint failed: {', '.join(findings)}")
            raise PolicyViolation(f"pre-issuance lint of CRL {number} failed: {', '.join(findings)}")
        linted = pre.tbs_certlist_bytes
    crl = builder.sign(as_private_key(handle), signature_hash_for(ca.key_type))  # type: ignore[arg-type]
    if linted is not None and crl.tbs_certlist_bytes != linted:
        from hsm_ca.errors import EngineError

        audit.append(actor, "crl", "failed", ca=ca_name, key_label=ca.key_label,
                     detail=f"CRL number {number}: the signed CRL differs from the linted one")
        raise EngineError("the signed CRL differs from the one that was linted")
    # (each of these re-encodes the whole CRL: about 0.8 s at a million entries)
    der = crl.public_bytes(serialization.Encoding.DER)
    check = not getattr(authority.engine(), "signatures_trusted", False)
    if check and not crl.is_signature_valid(ca.certificate.public_key()):  # type: ignore[arg-type]
        from hsm_ca.errors import EngineError

        audit.append(actor, "crl", "failed", ca=ca_name, key_label=ca.key_label,
                     detail=f"CRL number {number}: invalid signature from the engine")
        raise EngineError("the HSM engine produced an invalid CRL signature")
    sha = hashlib.sha256(der).hexdigest()
    with store.transaction():
        store.insert_crl({
            "ca": ca_name, "number": number,
            "base_number": int(base_row["number"]) if base_row else None,
            "this_update": rfc3339(now), "next_update": rfc3339(next_update),
            "entries": len(revoked), "epoch": epoch, "sha256": sha, "der": der,
            "created": rfc3339(now),
        })
        audit.append(actor, "crl", "issued", ca=ca_name, key_label=ca.key_label,
                     object_sha256=sha,
                     detail=f"{'delta' if delta else 'full'} CRL number {number}, "
                            f"{len(revoked)} entries")
    authority.maybe_checkpoint(force=f"{'delta ' if delta else ''}CRL {number} of {ca_name}")
    return CrlResult(ca_name, number, int(base_row["number"]) if base_row else None,
                     len(revoked), crl, der)


def current_crl(authority: Authority, ca_name: str, *, delta: bool = False) -> bytes:
    """The CRL to publish: the latest stored one while it is fresh, else a newly signed one.

    "Fresh" means less than half of its validity has elapsed, so relying parties
    never fetch a CRL that is about to expire.
    """
    authority.get_ca(ca_name)
    row = authority.store.latest_crl(ca_name, delta=delta)
    now = _dt.datetime.now(_dt.UTC)
    if row is not None:
        this_update = _parse_time(row["this_update"])
        next_update = _parse_time(row["next_update"])
        newer_revocations = authority.store.revocation_epoch() != row["epoch"]
        if not newer_revocations and now < this_update + (next_update - this_update) / 2:
            return bytes(row["der"])
    if delta and authority.store.latest_crl(ca_name) is None:
        sign_crl(authority, ca_name)
    return sign_crl(authority, ca_name, delta=delta).der()
