"""Code signing: HSM-held signer keys, detached CMS signatures, RFC 3161 time stamps, verification.

A signature leaves only after its audit record is durable, like a
certificate. Verification is independent of the CA's database: it needs the
file, the signature and a trust root (and CRLs to check revocation), so it
works for anyone who downloads a release.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asn1crypto import cms, tsp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from hsm_ca.cms import (
    HASHES,
    build_signed_data,
    digest_name_for,
    signed_attrs_bytes,
    stream_digest,
    time_stamp_attribute,
)
from hsm_ca.errors import AlreadyExists, HsmCaError, NotFound, PolicyViolation, UsageError
from hsm_ca.names import check_name, show
from hsm_ca.x509util import rfc3339

if TYPE_CHECKING:
    from hsm_ca.authority import Authority


@dataclass(frozen=True)
class SignResult:
    file: str
    signature_file: str
    size: int
    sha256: str
    signer: str
    serial: str
    timestamped: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------ signers
def new_signer(authority: Authority, label: str, ca_name: str, subject: x509.Name, *,
               key_type: str = "ec-p256", days: int | None = None) -> dict[str, Any]:
    check_name(label, "signer label")

    def refuse_taken() -> None:
        taken = authority.store.name_in_use("signers", "label", label)
        if taken is not None:
            raise AlreadyExists(
                f"a code-signing signer labelled {taken!r} already exists"
                + (" (labels are unique regardless of case)" if taken != label else "")
            )

    refuse_taken()
    key_label = f"codesign-{label}"
    rows: list[dict[str, Any]] = []

    def record(issued: Any) -> None:  # committed with the certificate, or not at all
        refuse_taken()  # again under the write lock: a concurrent new-signer may have won
        row = {"label": label, "ca": ca_name, "key_label": key_label, "serial": issued.serial,
               "pem": issued.pem, "created": rfc3339(_dt.datetime.now(_dt.UTC))}
        authority.store.upsert_row("signers", row, "label")
        rows.append(row)

    authority.issue_for_engine_key(ca_name, "code-signing", subject, key_label, key_type,
                                   days=days, on_issued=record)
    return signer_info(authority, rows[0])


def signer_info(authority: Authority, row: dict[str, Any], *,
                verified: bool = False) -> dict[str, Any]:
    """A signer's summary; ``verified`` takes its status from the audit trail (needs the HSM).

    Signing uses the verified status, so a revoked signer whose row was edited
    back to valid raises Tampered instead of signing; a listing shows the row.
    """
    cert = x509.load_pem_x509_certificate(row["pem"].encode())
    if verified:
        status = authority.certificate_status(row["ca"], row["serial"])
    else:
        found = authority.store.status_of(row["ca"], row["serial"])
        status = found[0] if found else None
    now = _dt.datetime.now(_dt.UTC)
    state = "valid"
    if status == "revoked":
        state = "revoked"
    elif now > cert.not_valid_after_utc:
        state = "expired"
    return {"label": row["label"], "ca": row["ca"], "key_label": row["key_label"],
            "serial": row["serial"], "subject": cert.subject.rfc4514_string(),
            "not_after": rfc3339(cert.not_valid_after_utc), "status": state}


def list_signers(authority: Authority) -> list[dict[str, Any]]:
    return [signer_info(authority, r) for r in authority.store.all_rows("signers", "label")]


# ------------------------------------------------------------------ signing
def sign_files(
    authority: Authority,
    files: Sequence[str],
    signer_label: str,
    *,
    timestamp: bool = False,
    output: str | None = None,
    progress: Callable[[int], None] | None = None,
    write: Callable[[str, bytes], None] | None = None,
) -> list[SignResult]:
    """Sign each file (detached CMS, DER), default output FILE.p7s.

    Every destination is checked and every input must be a regular file (a FIFO
    or ``/dev/zero`` would block or stream forever) before the first signature.
    Each signature is written through the destination checked for it (a FIFO
    stays open until then: reopened, its reader would have seen the end).
    """
    from hsm_ca.fileio import OutputFile

    if output is not None and len(files) != 1:
        raise UsageError("-o SIGFILE works with one file; several files get FILE.p7s each")
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(OutputFile(output or f"{f}.p7s", what="signature file"))
                   for f in files]
        pending: dict[str, list[OutputFile]] = {}
        for out in outputs:  # in order: a file named twice has two signatures to write
            pending.setdefault(out.path, []).append(out)

        def write_checked(path: str, data: bytes) -> None:
            pending[path].pop(0).write(data)

        return _sign_checked(authority, files, signer_label, timestamp=timestamp, output=output,
                             progress=progress, write=write or write_checked)


def _sign_checked(
    authority: Authority,
    files: Sequence[str],
    signer_label: str,
    *,
    timestamp: bool,
    output: str | None,
    progress: Callable[[int], None] | None,
    write: Callable[[str, bytes], None],
) -> list[SignResult]:
    from hsm_ca.fileio import InputError, OutputError, open_regular

    store, audit, actor = authority.store, authority.audit, authority.actor()
    row = store.get_row("signers", "label", signer_label)
    try:
        if row is None:
            raise NotFound(f"unknown signer {show(signer_label)}; create one with 'hsm-ca codesign new-signer'")
        info = signer_info(authority, row, verified=True)
        if info["status"] != "valid":
            raise PolicyViolation(f"signer {signer_label!r} is {info['status']}; it cannot sign")
    except HsmCaError as e:
        for f in files:
            audit.append(actor, "codesign", "refused", key_label=f"codesign-{signer_label}",
                         detail=f"{f}: {e}")
        raise
    tsa = None
    try:
        if timestamp:
            from hsm_ca.tsa import TimeStampAuthority

            tsa = TimeStampAuthority(authority)
        cert = x509.load_pem_x509_certificate(row["pem"].encode())
        chain = authority.chain(row["ca"], include_root=False)
        handle = authority.engine().get_key(row["key_label"])
        if handle.public_key() != cert.public_key():
            raise PolicyViolation(f"signer {signer_label!r}'s key does not match its certificate")
    except HsmCaError as e:
        for f in files:
            audit.append(actor, "codesign", "refused", key_label=row["key_label"],
                         serial=row["serial"], detail=f"{f}: {e}")
        raise
    for f in files:  # no file is signed when one of them cannot be
        try:
            open_regular(f, "file to sign").close()
        except InputError as e:
            audit.append(actor, "codesign", "refused", key_label=row["key_label"],
                         serial=row["serial"], detail=str(e))
            raise
    digest_name = digest_name_for(handle.key_type)
    results = []
    for f in files:
        try:
            digest, size, sha256 = stream_digest(f, digest_name, progress=progress)
        except (OSError, InputError) as e:
            reason = str(e) if isinstance(e, InputError) else f"cannot read {f}: {e.strerror}"
            audit.append(actor, "codesign", "refused", key_label=row["key_label"],
                         serial=row["serial"], detail=reason)
            raise HsmCaError(reason) from e
        now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)

        def stamp(signature: bytes, name: str = os.path.basename(f)) -> list[cms.CMSAttribute]:
            assert tsa is not None
            token = tsa.timestamp("sha256", hashlib.sha256(signature).digest(),
                                  detail=f"signature on {name}")
            return [time_stamp_attribute(token)]

        info_ci, _signature = build_signed_data(
            handle=handle, signer=cert, chain=chain, content_type="data", digest=digest,
            digest_name=digest_name, when=now, unsigned=stamp if tsa is not None else None,
        )
        der = info_ci.dump()
        target = output or f"{f}.p7s"
        audit.append(actor, "codesign", "signed", ca=row["ca"], key_label=row["key_label"],
                     serial=row["serial"], subject=cert.subject.rfc4514_string(),
                     object_sha256=hashlib.sha256(der).hexdigest(),
                     detail=(f"file={os.path.basename(f)} size={size} sha256={sha256} "
                             f"signer={signer_label}" + (" timestamped" if tsa else "")))
        try:
            write(target, der)
        except (OSError, OutputError) as e:
            reason = str(e) if isinstance(e, OutputError) else f"cannot write {target}: {e}"
            raise OutputError(f"{reason}; {f} was signed and the signature recorded in the "
                              "audit trail; sign it again for a new one") from None
        results.append(SignResult(f, target, size, sha256, signer_label, row["serial"], tsa is not None))
    authority.maybe_checkpoint()
    return results


# ------------------------------------------------------------- verification
@dataclass
class Verdict:
    ok: bool
    reason: str
    signer: str | None = None
    signing_time: str | None = None
    timestamp: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Invalid(Exception):
    pass


def _load_certs(signed: cms.SignedData) -> list[x509.Certificate]:
    out = []
    for choice in signed["certificates"] or []:
        if choice.name == "certificate":
            out.append(x509.load_der_x509_certificate(choice.chosen.dump()))
    return out


def _find_signer(si: cms.SignerInfo, certs: list[x509.Certificate]) -> x509.Certificate:
    sid = si["sid"]
    for c in certs:
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if c.serial_number == ias["serial_number"].native and \
                    c.issuer.public_bytes() == ias["issuer"].dump():
                return c
        else:
            try:
                ski = c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            except x509.ExtensionNotFound:
                continue
            if ski == sid.chosen.native:
                return c
    raise _Invalid("the signer's certificate is not in the signature")


def _check_signature(si: cms.SignerInfo, cert: x509.Certificate) -> None:
    data = signed_attrs_bytes(si)
    sig = si["signature"].native
    digest_name = si["digest_algorithm"]["algorithm"].native
    if digest_name not in HASHES:
        raise _Invalid(f"digest algorithm {digest_name} is not accepted")
    h = HASHES[digest_name]()
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(h))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), h)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            raise _Invalid("unsupported signer key type")
    except Exception as e:
        if isinstance(e, _Invalid):
            raise
        raise _Invalid("the signature does not verify (signed attributes or key altered)") from e


def _attr(si: cms.SignerInfo, name: str, unsigned: bool = False) -> Any:
    attrs = si["unsigned_attrs" if unsigned else "signed_attrs"]
    if not attrs.native:
        return None
    for a in attrs:
        if a["type"].native == name:
            return a["values"][0]
    return None


def _check_ess(si: cms.SignerInfo, cert: x509.Certificate) -> None:
    ess = _attr(si, "signing_certificate_v2")
    if ess is None:
        return
    der = cert.public_bytes(serialization.Encoding.DER)
    first = ess["certs"][0]
    alg = first["hash_algorithm"]["algorithm"].native
    if hashlib.new(alg, der).digest() != first["cert_hash"].native:
        raise _Invalid("signingCertificateV2 does not match the signer's certificate")


SHA2_IMPRINTS = ("sha256", "sha384", "sha512")
"""Message-imprint algorithms a time stamp may use: MD5 and SHA-1 imprints can be collided."""

_HANDLED_CRL_EXTENSIONS = {
    x509.oid.ExtensionOID.CRL_NUMBER, x509.oid.ExtensionOID.DELTA_CRL_INDICATOR,
    x509.oid.ExtensionOID.ISSUING_DISTRIBUTION_POINT,
    x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}
_HANDLED_ENTRY_EXTENSIONS = {x509.oid.CRLEntryExtensionOID.CRL_REASON,
                             x509.oid.CRLEntryExtensionOID.INVALIDITY_DATE}


def _purpose_policies(eku: x509.ObjectIdentifier, what: str) -> tuple[Any, Any]:
    """(CA, end-entity) extension policies: cryptography's web-PKI defaults, EKU for ``eku``.

    The defaults' EKU rule belongs to the verifier's TLS purpose (the client
    verifier demands clientAuth, even on CAs), so it is replaced: the end
    entity must name ``eku``; a CA with an EKU extension must name it or
    anyExtendedKeyUsage (a TLS-only intermediate cannot vouch for a code
    signer), one without is unrestricted. The end entity must also be able to
    sign: not a CA (the defaults' basicConstraints rule) and, with a keyUsage,
    digitalSignature set. A TSA's timeStamping must be its only EKU, critical
    (RFC 3161 2.3), as ``openssl ts -verify`` requires.
    """
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    name = eku._name

    def ee_eku(_policy: Any, _cert: Any, value: Any) -> None:
        if value is None or eku not in list(value):
            raise ValueError(f"{what} certificate lacks the {name} extended key usage")

    def ca_eku(_policy: Any, _cert: Any, value: Any) -> None:
        if value is not None and eku not in list(value) \
                and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in list(value):
            raise ValueError(f"a CA certificate's extended key usage excludes {name}")

    def ee_key_usage(_policy: Any, _cert: Any, value: Any) -> None:
        if value is None:
            return
        if not value.digital_signature:
            raise ValueError(f"{what} certificate's key usage lacks digitalSignature")
        if value.key_cert_sign:
            raise ValueError(f"{what} certificate's key usage includes keyCertSign")

    def tsa_eku(policy: Any, cert: Any, value: Any) -> None:
        ee_eku(policy, cert, value)
        if list(value) != [eku]:  # RFC 3161 2.3: the only EKU, and critical (below)
            raise ValueError(f"{what} certificate has extended key usages besides {name}")

    ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, ca_eku)
    ee = (ExtensionPolicy.webpki_defaults_ee()
          # a code signer or TSA is named by its subject, not a DNS name: SAN is optional
          .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
          .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, ee_key_usage))
    if eku == ExtendedKeyUsageOID.TIME_STAMPING:
        ee = ee.require_present(x509.ExtendedKeyUsage, Criticality.CRITICAL, tsa_eku)
    else:
        ee = ee.require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, ee_eku)
    return ca, ee


def _validate_chain(cert: x509.Certificate, certs: list[x509.Certificate],
                    roots: list[x509.Certificate], at: _dt.datetime, eku: x509.ObjectIdentifier,
                    what: str) -> list[x509.Certificate]:
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    ca, ee = _purpose_policies(eku, what)
    verifier = (PolicyBuilder().store(Store(roots)).time(at.replace(tzinfo=None))
                .extension_policies(ca_policy=ca, ee_policy=ee).build_client_verifier())
    try:
        verified = verifier.verify(cert, [c for c in certs if c != cert])
    except VerificationError as e:
        raise _Invalid(f"{what} certificate does not chain to the trust root at {rfc3339(at)}: {e}") from e
    return list(verified.chain)


def _ext(obj: Any, cls: type) -> Any:
    try:
        return obj.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _dp_names(names: Any, rdn: Any, issuer: x509.Name) -> set[x509.GeneralName]:
    """A distribution point's names; a relative name is relative to the CRL issuer (RFC 5280)."""
    if names:
        return set(names)
    if rdn:
        return {x509.DirectoryName(x509.Name([*issuer.rdns, rdn]))}
    return set()


def _crl_unusable(crl: x509.CertificateRevocationList, cert: x509.Certificate,
                  issuer: x509.Certificate, now: _dt.datetime) -> str | None:
    """Why ``crl`` cannot say whether ``cert`` is revoked at ``now``, or None if it can.

    A CRL counts only when it is current, handles all of its critical
    extensions, and its issuing distribution point covers this certificate:
    the same rules ``openssl verify -crl_check_all`` applies (RFC 5280 6.3.3).
    """
    if crl.last_update_utc > now:
        return f"a CRL is not valid until {rfc3339(crl.last_update_utc)}"
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        return f"a CRL is past its nextUpdate ({rfc3339(crl.next_update_utc)})"
    for ext in crl.extensions:
        if ext.critical and ext.oid not in _HANDLED_CRL_EXTENSIONS:
            return f"a CRL has an unhandled critical extension {ext.oid.dotted_string}"
    ku = _ext(issuer, x509.KeyUsage)
    if ku is not None and not ku.crl_sign:
        return "the CRL issuer's key usage lacks cRLSign"
    idp = _ext(crl, x509.IssuingDistributionPoint)
    if idp is None:
        return None
    bc = _ext(cert, x509.BasicConstraints)
    is_ca = bc is not None and bc.ca
    if idp.only_contains_attribute_certs or idp.indirect_crl or idp.only_some_reasons:
        return "a CRL covers only attribute certificates, other issuers or some reasons"
    if idp.only_contains_ca_certs and not is_ca:
        return "a CRL covers only CA certificates"
    if idp.only_contains_user_certs and is_ca:
        return "a CRL covers only end-entity certificates"
    wanted = _dp_names(idp.full_name, idp.relative_name, crl.issuer)
    if wanted:
        dps = _ext(cert, x509.CRLDistributionPoints) or []
        have: set[x509.GeneralName] = set()
        for dp in dps:
            if dp.crl_issuer is None:
                have |= _dp_names(dp.full_name, dp.relative_name, crl.issuer)
        if not wanted & have:
            return "a CRL's distribution point is not one the certificate names"
    return None


def _check_crls(chain: list[x509.Certificate], crls: list[x509.CertificateRevocationList],
                what: str, now: _dt.datetime) -> None:
    """Every certificate below the root needs a complete, current CRL in its scope (as
    ``-crl_check_all``); a delta CRL alone never counts, but its entries still revoke."""
    for cert, issuer in zip(chain, chain[1:], strict=False):
        signed = [c for c in crls if c.issuer == issuer.subject
                  and c.is_signature_valid(issuer.public_key())]  # type: ignore[arg-type]
        complete, deltas, why = [], [], []
        for crl in signed:
            problem = _crl_unusable(crl, cert, issuer, now)
            if problem is not None:
                why.append(problem)
            elif _ext(crl, x509.DeltaCRLIndicator) is not None:
                deltas.append(crl)
                why.append("a delta CRL is not a complete CRL")
            else:
                complete.append(crl)
        if not complete:
            because = f" ({'; '.join(sorted(set(why)))})" if why else ""
            raise _Invalid(f"no valid CRL from {issuer.subject.rfc4514_string()} to check the "
                           f"{what} certificate against{because}")
        for crl in complete + deltas:
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is None:
                continue
            for ext in entry.extensions:
                if ext.critical and ext.oid not in _HANDLED_ENTRY_EXTENSIONS:
                    raise _Invalid("a CRL entry has an unhandled critical extension")
            reason = _ext(entry, x509.CRLReason)
            if reason is not None and reason.reason == x509.ReasonFlags.remove_from_crl:
                continue
            raise _Invalid(f"the {what} certificate {format(cert.serial_number, 'x')} is revoked "
                           f"(since {rfc3339(entry.revocation_date_utc)})")


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    der = serialization.Encoding.DER
    return a.public_bytes(der) == b.public_bytes(der)


def _verify_timestamp(token_ci: cms.ContentInfo, signature: bytes,
                      roots: list[x509.Certificate], crls: list[x509.CertificateRevocationList],
                      tsa_trust: list[x509.Certificate], now: _dt.datetime,
                      ) -> tuple[_dt.datetime | None, str | None]:
    """(the stamp's time, None) for a stamp that may extend validity, else (None, why not).

    Only a pinned TSA's stamp counts: any timeStamping certificate under the
    root would otherwise vouch for any time, so a leaked signer key could be
    revived with a forged stamp. A pinned TSA's stamp that does not verify
    makes the signature invalid.
    """
    signed = token_ci["content"]
    if token_ci["content_type"].native != "signed_data" or \
            signed["encap_content_info"]["content_type"].native != "tst_info":
        raise _Invalid("the time-stamp token is not a TSTInfo SignedData")
    tst_der = signed["encap_content_info"]["content"].parsed.dump()
    tst = tsp.TSTInfo.load(tst_der)
    imprint = tst["message_imprint"]
    alg = imprint["hash_algorithm"]["algorithm"].native
    if alg not in SHA2_IMPRINTS:
        return None, (f"the time stamp was not used: its message imprint uses {str(alg)[:32]} "
                      "(only SHA-256, SHA-384 and SHA-512 are accepted)")
    if not tsa_trust:
        return None, ("the time stamp was not used: no time-stamping authority is pinned "
                      "(pass --tsa-trust CERT, or verify in a home that has a TSA)")
    si = signed["signer_infos"][0]
    certs = _load_certs(signed)
    tsa_cert = _find_signer(si, certs)
    if not any(_same_cert(tsa_cert, pin) for pin in tsa_trust):
        return None, (f"the time stamp was not used: it is signed by "
                      f"{show(tsa_cert.subject.rfc4514_string())}, not the pinned "
                      "time-stamping authority")
    if hashlib.new(alg, signature).digest() != imprint["hashed_message"].native:
        raise _Invalid("the time stamp is over a different signature")
    md = _attr(si, "message_digest")
    dalg = si["digest_algorithm"]["algorithm"].native
    if dalg not in HASHES:
        raise _Invalid(f"the time-stamp token's digest algorithm {str(dalg)[:32]} is not accepted")
    if md is None or hashlib.new(dalg, tst_der).digest() != md.native:
        raise _Invalid("the time-stamp token's content digest does not match")
    _check_signature(si, tsa_cert)
    gen_time: _dt.datetime = tst["gen_time"].native
    chain = _validate_chain(tsa_cert, certs, roots, gen_time, ExtendedKeyUsageOID.TIME_STAMPING,
                            "time-stamping authority")
    if crls:
        _check_crls(chain, crls, "time-stamping authority", now)
    return gen_time, None


def verify_file(path: str, sig_path: str, trust: list[x509.Certificate],
                crls: list[x509.CertificateRevocationList] | None = None,
                at: _dt.datetime | None = None,
                tsa_trust: list[x509.Certificate] | None = None) -> Verdict:
    """Check digest, signature, chain to ``trust`` with codeSigning, revocation and time stamp.

    A time stamp moves the signer's validation to its time only when it comes
    from a TSA in ``tsa_trust`` (pinned); otherwise the signature is judged at
    ``at`` (or now) and the verdict's notes say why the stamp was not used.
    CRLs must be current at ``at`` (or now), whatever time the chain is judged at.
    """
    from hsm_ca.fileio import SIGNATURE_BYTES, InputError, read_regular_file

    crls = crls or []
    notes: list[str] = []
    try:
        try:
            sig_der = read_regular_file(sig_path, SIGNATURE_BYTES, "signature file")
        except InputError as e:
            raise _Invalid(str(e)) from None
        try:
            info = cms.ContentInfo.load(sig_der)
            if info["content_type"].native != "signed_data":
                raise _Invalid("not a CMS SignedData")
            signed = info["content"]
        except _Invalid:
            raise
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise _Invalid(f"{sig_path} is not a readable CMS signature") from e
        if len(signed["signer_infos"]) != 1:
            raise _Invalid("expected exactly one signer")
        si = signed["signer_infos"][0]
        certs = _load_certs(signed)
        cert = _find_signer(si, certs)
        ct = _attr(si, "content_type")
        if ct is None or ct.native != "data":
            raise _Invalid("the signed content type is not id-data")
        digest_name = si["digest_algorithm"]["algorithm"].native
        if digest_name not in HASHES:
            raise _Invalid(f"digest algorithm {digest_name} is not accepted")
        try:
            digest, _size, _sha = stream_digest(path, digest_name)
        except InputError as e:
            raise _Invalid(str(e)) from None
        except OSError as e:
            raise _Invalid(f"cannot read {path}: {e.strerror}") from e
        md = _attr(si, "message_digest")
        if md is None or md.native != digest:
            raise _Invalid(f"{path} does not match the signature (message digest differs)")
        _check_signature(si, cert)
        _check_ess(si, cert)
        signing_time = _attr(si, "signing_time")
        verdict = Verdict(True, "valid", signer=cert.subject.rfc4514_string(),
                          signing_time=rfc3339(signing_time.native) if signing_time else None,
                          notes=notes)
        now = at or _dt.datetime.now(_dt.UTC)
        when = now
        token = _attr(si, "signature_time_stamp_token", unsigned=True)
        if token is not None:
            ts_time, unused = _verify_timestamp(token, si["signature"].native, trust, crls,
                                                tsa_trust or [], now)
            if ts_time is None:
                notes.append(str(unused))
            else:
                verdict.timestamp = rfc3339(ts_time)
                if ts_time > now + _dt.timedelta(minutes=5):
                    raise _Invalid("the time stamp is in the future")
                when = ts_time
                notes.append(f"signer certificate validated at the time stamp {rfc3339(ts_time)}")
        chain = _validate_chain(cert, certs, trust, when, ExtendedKeyUsageOID.CODE_SIGNING, "signer")
        if crls:
            _check_crls(chain, crls, "signer", now)
        return verdict
    except _Invalid as e:
        unused = [n for n in notes if n.startswith("the time stamp was not used")]
        return Verdict(False, "; ".join([str(e), *unused]), notes=notes)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        # asn1crypto parses lazily: malformed parts surface wherever they are first touched
        return Verdict(False, f"the signature is malformed ({type(e).__name__})")
