"""CSR checking: the only door through which requester-controlled data reaches the CA.

A certificate signing request is untrusted input. This module turns it into a
:class:`CheckedRequest` holding just the parts the CA may use (public key,
filtered subject, normalized subject alternative names), after proving the
requester holds the key and that nothing in the request contradicts the
profile. Everything else the CSR asks for is ignored: the profile, not the CSR,
decides every extension.

Every refusal is a :class:`~hsm_ca.errors.CsrRejected` with one message naming
the offending field and value (repr'd, so control characters show, and
truncated, so a hostile CSR cannot flood a terminal or log). Exceptions from
cryptography's parsers are translated, so callers only ever need to catch
hsm-ca's own errors.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import string
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import idna
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtensionOID, NameOID

from hsm_ca.engine.keys import key_type_of
from hsm_ca.errors import CsrRejected, UsageError
from hsm_ca.profiles import Profile

__all__ = [
    "MAX_CSR_BYTES",
    "CheckedRequest",
    "check_request",
    "csr_sha256",
    "load_csr",
    "normalize_dns_name",
    "parse_dn",
]

MAX_CSR_BYTES = 1024 * 1024
"""A real CSR is a few kilobytes; anything near this is an attack or a wrong file."""

# Everything cryptography's lazy parsers are known to raise on hostile DER.
# Catching these (rather than Exception) keeps genuine programming errors loud.
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    # cryptography warns (UserWarning) about out-of-range attribute lengths;
    # under "-W error" that warning is raised, and it still means "refuse".
    UserWarning,
)

# The profile vocabulary for subject attributes (see Profile.subject_attributes).
SUBJECT_ATTRIBUTE_OIDS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "serialNumber": NameOID.SERIAL_NUMBER,
}

# Names parse_dn understands: the profile vocabulary plus the other RFC 4514
# names cryptography knows, which CA distinguished names sometimes use.
_DN_ATTRIBUTE_OIDS: dict[str, x509.ObjectIdentifier] = {
    **SUBJECT_ATTRIBUTE_OIDS,
    "STREET": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
}
_OID_SHORT_NAMES: dict[x509.ObjectIdentifier, str] = {
    oid: name for name, oid in _DN_ATTRIBUTE_OIDS.items()
}

# RFC 5280 appendix A upper bounds; a longer value makes a certificate that
# strict relying parties and linters reject, so refuse it at the door.
_ATTRIBUTE_MAX_LENGTH: dict[x509.ObjectIdentifier, int] = {
    NameOID.COMMON_NAME: 64,
    NameOID.ORGANIZATION_NAME: 64,
    NameOID.ORGANIZATIONAL_UNIT_NAME: 64,
    NameOID.LOCALITY_NAME: 128,
    NameOID.STATE_OR_PROVINCE_NAME: 128,
    NameOID.EMAIL_ADDRESS: 255,
    NameOID.SERIAL_NUMBER: 64,
    NameOID.STREET_ADDRESS: 128,
    NameOID.DOMAIN_COMPONENT: 63,  # one DNS label
    NameOID.USER_ID: 256,
}
# Any other attribute type (title, givenName, an unknown OID...): X.520 bounds
# most at 64 or 128; nothing legitimate needs more than this.
_ATTRIBUTE_DEFAULT_MAX_LENGTH = 128

# How many attributes a subject (CSR or operator DN) may have, in all and per
# type. Real subjects have a handful; a thousand OUs is an attack on relying
# parties' parsers and on whoever reads the certificate.
_MAX_SUBJECT_ATTRIBUTES = 16
_MAX_PER_TYPE = 4
_MAX_PER_TYPE_OVERRIDE: dict[x509.ObjectIdentifier, int] = {  # CN: checked on its own (one)
    NameOID.COUNTRY_NAME: 1,
    NameOID.SERIAL_NUMBER: 1,
    NameOID.STATE_OR_PROVINCE_NAME: 1,
    NameOID.LOCALITY_NAME: 1,
    NameOID.DOMAIN_COMPONENT: 8,
}

_ALLOWED_HASHES = ("sha256", "sha384", "sha512")
_ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_RSA_MIN_BITS = 2048
_RSA_MAX_BITS = 8192
_RSA_MIN_EXPONENT = 65537

# A CSR may mark these critical because they are the ones it may meaningfully
# ask for; any other critical extension means "do not issue unless you
# understand this", and the CA does not.
_CRITICAL_OK = frozenset(
    {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.BASIC_CONSTRAINTS,
    }
)

_SAN_KIND_OF: dict[type, str] = {
    x509.DNSName: "dns",
    x509.IPAddress: "ip",
    x509.RFC822Name: "email",
    x509.UniformResourceIdentifier: "uri",
}

_LDH_LABEL = re.compile(r"[a-z0-9-]+")
_EMAIL_LOCAL_FORBIDDEN = set(' <>()[],;:"@\\')
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# Schemes whose meaning needs an authority ("//host"); "https:foo" is nonsense.
_URI_NEEDS_HOST = frozenset({"http", "https", "ldap", "ldaps", "ftp", "spiffe", "wss", "ws"})
_URI_MAX_LENGTH = 2048

_PEM_BEGIN = re.compile(rb"-----BEGIN ([^\r\n-]{0,64})-----")
_CSR_PEM_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
_CERT_PEM_LABELS = (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE")

_T = TypeVar("_T")


@dataclass(frozen=True)
class CheckedRequest:
    """What survives checking: the only CSR-derived data issuance may use.

    Issuance code builds certificates from these fields and the profile, never
    from ``csr`` directly, so anything the requester asked for that is not here
    cannot leak into a certificate.
    """

    csr: x509.CertificateSigningRequest
    public_key: PublicKeyTypes
    key_type: str
    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    csr_sha256: str


# --------------------------------------------------------------------------- helpers


def _show(value: object, limit: int = 80) -> str:
    """Quote a hostile value for a message: repr shows controls, the cut bounds its size."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def _read(what: str, getter: Callable[[], _T]) -> _T:
    # cryptography's parse errors on ``what`` become one CsrRejected
    try:
        return getter()
    except _PARSE_ERRORS as e:
        detail = str(e).strip() or type(e).__name__
        raise CsrRejected(f"CSR {what} cannot be parsed: {_show(detail, 200)}") from e


def _is_control(ch: str) -> bool:
    """C0, DEL and C1: never legitimate in a name and able to fool terminals and parsers."""
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # exactly what _is_control accepts
# the ASCII characters normalize_dns_name's per-character checks refuse (NUL, controls,
# whitespace, comma); a name without them skips the slower Unicode checks
_ASCII_SUSPECT = re.compile("[\x00-\x20,\x7f]")


def _has_control(value: str) -> bool:
    return _CONTROL.search(value) is not None


def csr_sha256(data_or_csr: bytes | x509.CertificateSigningRequest) -> str:
    """Fingerprint a request so the audit trail can name exactly what was signed.

    A parsed CSR is hashed over its DER, so the PEM and DER forms of one request
    share one fingerprint; raw bytes are hashed as given.
    """
    if isinstance(data_or_csr, x509.CertificateSigningRequest):
        data = data_or_csr.public_bytes(serialization.Encoding.DER)
    else:
        data = bytes(data_or_csr)
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- loading


def _looks_like_der_private_key(data: bytes) -> bool:
    """Best effort, so a misplaced DER key gets a warning rather than "garbage"."""
    try:
        serialization.load_der_private_key(data, None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        # Encrypted PKCS#8: parsable as a key, but needs a password.
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def load_csr(data: bytes, source: str = "CSR") -> x509.CertificateSigningRequest:
    """Parse an untrusted PEM or DER request, explaining the common wrong inputs.

    Users hand over the wrong file often (a certificate, or worse, the private
    key), so those get their own messages; a private key's content is never
    echoed. ``source`` (usually the file name) starts every message.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CsrRejected(f"{source}: expected bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_CSR_BYTES:
        raise CsrRejected(
            f"{source} is too large ({len(data)} bytes; a CSR is at most {MAX_CSR_BYTES} bytes)"
        )
    if not data.strip():
        raise CsrRejected(f"{source} is empty")
    not_csr = f"{source} is not a PEM or DER PKCS#10 certificate signing request"
    if b"PRIVATE KEY-----" in data:
        raise CsrRejected(
            f"{source} contains a private key, not a certificate signing request; "
            "never give a private key to the CA (consider it exposed if it was copied)"
        )
    labels = _PEM_BEGIN.findall(data)
    if labels:
        return _load_pem_csr(data, labels, source, not_csr)
    try:
        return x509.load_der_x509_csr(data)
    except _PARSE_ERRORS:
        pass
    try:
        x509.load_der_x509_certificate(data)
    except _PARSE_ERRORS:
        pass
    else:
        raise CsrRejected(f"{source} is a certificate, not a certificate signing request")
    if _looks_like_der_private_key(data):
        raise CsrRejected(
            f"{source} is a private key, not a certificate signing request; "
            "never give a private key to the CA (consider it exposed if it was copied)"
        )
    raise CsrRejected(not_csr)


def _load_pem_csr(
    data: bytes, labels: list[bytes], source: str, not_csr: str
) -> x509.CertificateSigningRequest:
    """Exactly one request block: two would leave it ambiguous which one was meant."""
    csr_blocks = [label for label in labels if label in _CSR_PEM_LABELS]
    if len(csr_blocks) > 1:
        raise CsrRejected(
            f"{source} contains {len(csr_blocks)} certificate signing requests; give exactly one"
        )
    if not csr_blocks:
        if any(label in _CERT_PEM_LABELS for label in labels):
            raise CsrRejected(f"{source} is a certificate, not a certificate signing request")
        found = labels[0].decode("ascii", "replace")
        raise CsrRejected(f"{not_csr} (found a PEM {_show(found)} block)")
    label = csr_blocks[0]
    start = data.index(b"-----BEGIN " + label + b"-----")
    end_marker = b"-----END " + label + b"-----"
    end = data.find(end_marker, start)
    if end < 0:
        raise CsrRejected(f"{not_csr} (the PEM block has no END line)")
    block = data[start : end + len(end_marker)]
    if label != b"CERTIFICATE REQUEST":
        # Old Netscape/Microsoft tools write "NEW CERTIFICATE REQUEST"; same content.
        block = block.replace(label, b"CERTIFICATE REQUEST")
    try:
        return x509.load_pem_x509_csr(block)
    except _PARSE_ERRORS as e:
        detail = str(e).strip() or type(e).__name__
        raise CsrRejected(f"{not_csr} (bad PEM content: {_show(detail, 120)})") from e


# --------------------------------------------------------------------------- names


def normalize_dns_name(name: str, *, allow_wildcard: bool = True) -> str:
    """Return the one canonical (lowercase A-label) spelling of a host name, or refuse.

    Two spellings of one name must not pass as two names, and nothing that a
    relying party might parse differently (NULs, spaces, commas, odd wildcards,
    IP-lookalikes) may reach a certificate. The only silent change is case
    folding (and IDNA's UTS #46 mapping, which includes it).
    """
    what = f"DNS name {_show(name)}"
    if not isinstance(name, str):
        raise CsrRejected(f"{what} is not text")
    if not name:
        raise CsrRejected("DNS name is empty")
    if len(name) > 253:
        raise CsrRejected(f"{what} is longer than 253 characters")
    for ch in name if not name.isascii() or _ASCII_SUSPECT.search(name) else ():
        if ch == "\x00":
            raise CsrRejected(f"{what} contains a NUL character")
        if ch == ",":
            raise CsrRejected(f"{what} contains a comma")
        category = unicodedata.category(ch)
        if ch.isspace() or category.startswith("Z"):
            raise CsrRejected(f"{what} contains whitespace")
        if category in ("Cc", "Cf", "Cs", "Co", "Cn"):
            # Cf covers soft hyphens and zero-width characters that IDNA would
            # silently delete, making the name differ from what was shown.
            raise CsrRejected(f"{what} contains an invisible or control character {ch!r}")

    wildcard = name.startswith("*.")
    rest = name[2:] if wildcard else name
    if wildcard and not allow_wildcard:
        raise CsrRejected(f"{what}: a wildcard is not allowed here")
    if "*" in rest:
        raise CsrRejected(
            f"{what}: a wildcard may only be the whole left-most label, as in '*.example.com'"
        )

    if rest.isascii():
        ascii_name = rest.lower()
    else:
        try:
            ascii_name = idna.encode(rest, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise CsrRejected(f"{what} is not a valid internationalized name: {e}") from e

    if len(ascii_name) + (2 if wildcard else 0) > 253:
        raise CsrRejected(f"{what} is longer than 253 characters in A-label form")
    labels = ascii_name.split(".")
    for label in labels:
        if not label:
            raise CsrRejected(f"{what} has an empty label (leading, trailing or double dot)")
        if len(label) > 63:
            raise CsrRejected(f"{what} has a label longer than 63 characters")
        if not _LDH_LABEL.fullmatch(label):
            bad = next(c for c in label if c not in string.ascii_lowercase + string.digits + "-")
            raise CsrRejected(
                f"{what} contains the character {bad!r}; only a-z, 0-9, - and . are allowed"
            )
        if label.startswith("-") or label.endswith("-"):
            raise CsrRejected(f"{what} has a label starting or ending with '-'")
        if label.startswith("xn--"):
            try:
                if idna.encode(idna.decode(label)).decode("ascii") != label:
                    raise idna.IDNAError("not in canonical form")
            except (idna.IDNAError, UnicodeError, ValueError) as e:
                raise CsrRejected(f"{what} has an invalid A-label {label!r}: {e}") from e
    if wildcard and len(labels) < 2:
        raise CsrRejected(f"{what}: a wildcard must be followed by at least two labels")
    if len(labels) < 2:
        raise CsrRejected(f"{what} is a single label; use a fully qualified name")
    if labels[-1].isdigit():
        raise CsrRejected(f"{what} ends in an all-numeric label and looks like an IP address")
    return ("*." if wildcard else "") + ascii_name


def _normalize_email(value: str) -> str:
    """Keep the local part as given (it may be case-sensitive); canonicalize the domain."""
    what = f"e-mail address {_show(value)}"
    if not isinstance(value, str) or "@" not in value:
        raise CsrRejected(f"{what} has no '@'")
    local, _, domain = value.rpartition("@")
    if not 1 <= len(local) <= 64:
        raise CsrRejected(f"{what}: the part before '@' must be 1 to 64 characters")
    for ch in local:
        if not ("\x21" <= ch <= "\x7e") or ch in _EMAIL_LOCAL_FORBIDDEN:
            raise CsrRejected(f"{what}: the part before '@' contains {ch!r}")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise CsrRejected(f"{what}: the part before '@' has a misplaced dot")
    try:
        domain = normalize_dns_name(domain, allow_wildcard=False)
    except CsrRejected as e:
        raise CsrRejected(f"{what}: bad domain: {e}") from e
    return f"{local}@{domain}"


def _normalize_uri(value: str) -> str:
    """Refuse URIs that parsers could split differently; lowercase only the scheme."""
    what = f"URI {_show(value)}"
    if not isinstance(value, str) or not value:
        raise CsrRejected("URI is empty")
    if len(value) > _URI_MAX_LENGTH:
        raise CsrRejected(f"{what} is longer than {_URI_MAX_LENGTH} characters")
    for ch in value:
        if _is_control(ch) or ch.isspace():
            raise CsrRejected(f"{what} contains whitespace or a control character {ch!r}")
        if not ch.isascii():
            raise CsrRejected(f"{what} contains non-ASCII {ch!r}; percent-encode it")
    scheme, sep, rest = value.partition(":")
    if not sep or not _URI_SCHEME.fullmatch(scheme):
        raise CsrRejected(f"{what} has no scheme (such as https: or urn:)")
    if not rest:
        raise CsrRejected(f"{what} has nothing after the scheme")
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises on a non-numeric port
    except ValueError as e:
        raise CsrRejected(f"{what} is malformed: {e}") from e
    scheme = scheme.lower()
    if scheme in _URI_NEEDS_HOST and not parts.hostname:
        raise CsrRejected(f"{what}: a {scheme} URI needs a host ('{scheme}://host/...')")
    return scheme + ":" + rest


def _normalize_san(name: x509.GeneralName, kind: str) -> x509.GeneralName:
    if kind == "dns":
        return x509.DNSName(normalize_dns_name(name.value))
    if kind == "ip":
        if not isinstance(name.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise CsrRejected(
                f"subjectAltName IP {_show(str(name.value))} is a network, not an address"
            )
        return x509.IPAddress(name.value)
    if kind == "email":
        return x509.RFC822Name(_normalize_email(name.value))
    return x509.UniformResourceIdentifier(_normalize_uri(name.value))


# UTS #39 "highly restrictive": one script per label, or Latin with the scripts
# that CJK writing combines with it.
_SCRIPT_COMBINATIONS = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
_SCRIPTLESS = frozenset({"COMMON", "INHERITED"})  # digits, '-', combining marks


def label_scripts(u_label: str) -> frozenset[str]:
    """The Unicode scripts (Scripts.txt, via confusable_homoglyphs) of a label's letters."""
    from confusable_homoglyphs import categories  # loaded only for non-ASCII names

    return frozenset(categories.alias(ch) for ch in u_label) - _SCRIPTLESS


def is_single_script(u_label: str) -> bool:
    """UTS #39 section 5.2 "highly restrictive": the test browsers use to show an IDN.

    ``раураl`` (Cyrillic but for the final Latin ``l``) looks like ``paypal``
    and is refused; ``пример`` (all Cyrillic) and ``日本語かな`` (Han with
    Hiragana) are single-script in this sense and pass. Whole-script
    look-alikes (every letter Cyrillic) are beyond this test.
    """
    if u_label.isascii():
        return True
    scripts = label_scripts(u_label)
    return len(scripts) <= 1 or any(scripts <= combo for combo in _SCRIPT_COMBINATIONS)


def _check_host_scripts(host: str, what: str) -> None:
    """Refuse a host name (A-labels) any of whose IDN labels mixes scripts."""
    for label in host.split("."):
        if not label.lower().startswith("xn--"):
            continue
        try:
            u_label = idna.decode(label)
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise CsrRejected(f"{what} has an invalid A-label {_show(label)}: {e}") from e
        if not is_single_script(u_label):
            scripts = ", ".join(sorted(s.title() for s in label_scripts(u_label)))
            raise CsrRejected(
                f"{what} has the label {_show(u_label)} ({label}) mixing scripts ({scripts}), "
                "a look-alike of another name; the profile allows only single-script labels "
                "(request.allow_mixed_script)"
            )


def _check_name_for_profile(name: x509.GeneralName, profile: Profile) -> None:
    """The profile's rules for one normalized SAN: URI schemes, single-script IDNs."""
    if isinstance(name, x509.UniformResourceIdentifier):
        scheme, _, _ = name.value.partition(":")
        if scheme not in profile.uri_schemes:
            raise CsrRejected(
                f"URI {_show(name.value)} has the scheme {_show(scheme, 32)}, which profile "
                f"{profile.name} does not allow (allowed: {', '.join(sorted(profile.uri_schemes))})"
            )
    if profile.allow_mixed_script:
        return
    if isinstance(name, x509.DNSName):
        _check_host_scripts(name.value, f"DNS name {_show(name.value)}")
    elif isinstance(name, x509.RFC822Name):
        _check_host_scripts(name.value.rpartition("@")[2], f"e-mail address {_show(name.value)}")
    elif isinstance(name, x509.UniformResourceIdentifier):
        host = urllib.parse.urlsplit(name.value).hostname
        if host:
            _check_host_scripts(host, f"URI {_show(name.value)}")


def _san_key(name: x509.GeneralName) -> tuple[str, str]:
    return (_SAN_KIND_OF[type(name)], str(name.value))


def is_country_code(value: str) -> bool:
    """An assigned ISO 3166-1 alpha-2 code (uppercase), from the iso3166 package.

    ``isalpha()`` accepted ``XX``, ``ZZ`` and ``QQ``; the iso3166 list is the
    one pkilint judges certificates by, so the CA and the linter agree.
    """
    import iso3166

    return len(value) == 2 and value.isascii() and value in iso3166.countries_by_alpha2


def _check_attribute_counts(
    attributes: list[x509.NameAttribute], error: type[Exception], where: str
) -> None:
    """Bound a subject's size: in all, and per attribute type."""
    if len(attributes) > _MAX_SUBJECT_ATTRIBUTES:
        raise error(
            f"{where} has {len(attributes)} attributes; at most {_MAX_SUBJECT_ATTRIBUTES} "
            "are accepted"
        )
    counts: dict[x509.ObjectIdentifier, int] = {}
    for attr in attributes:
        counts[attr.oid] = counts.get(attr.oid, 0) + 1
    for oid, n in counts.items():
        limit = _MAX_PER_TYPE_OVERRIDE.get(oid, _MAX_PER_TYPE)
        if n > limit:
            short = _OID_SHORT_NAMES.get(oid, oid.dotted_string)
            raise error(f"{where} has {n} {short} attributes; at most {limit} accepted")


def _check_attribute(attr: x509.NameAttribute, error: type[Exception], where: str) -> None:
    """Shared by CSR subjects and operator-typed DNs: both end up in certificates."""
    short = _OID_SHORT_NAMES.get(attr.oid, attr.oid.dotted_string)
    value = attr.value
    if isinstance(value, bytes):
        return  # bit-string attributes (x500UniqueIdentifier) carry no text
    if _has_control(value):
        raise error(f"{where} attribute {short} contains a control character: {_show(value)}")
    if not value:
        raise error(f"{where} attribute {short} is empty")
    if attr.oid == NameOID.COUNTRY_NAME and not is_country_code(value):
        raise error(
            f"{where} attribute C must be a two-letter country code, not {_show(value)} "
            "(an ISO 3166-1 alpha-2 code, such as NL)"
        )
    limit = _ATTRIBUTE_MAX_LENGTH.get(attr.oid, _ATTRIBUTE_DEFAULT_MAX_LENGTH)
    if len(value) > limit:
        raise error(
            f"{where} attribute {short} is {len(value)} characters, over the limit of {limit}: "
            f"{_show(value)}"
        )


# --------------------------------------------------------------------------- checking


def _check_key(public_key: PublicKeyTypes) -> None:
    """Refuse keys no profile should certify, before spending effort on the rest."""
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits < _RSA_MIN_BITS:
            raise CsrRejected(f"RSA key of {bits} bits is too small (minimum {_RSA_MIN_BITS})")
        if bits > _RSA_MAX_BITS:
            raise CsrRejected(f"RSA key of {bits} bits is too large (maximum {_RSA_MAX_BITS})")
        e = public_key.public_numbers().e
        if e % 2 == 0 or e < _RSA_MIN_EXPONENT:
            raise CsrRejected(
                f"RSA public exponent {_show(str(e), 40)} is not allowed "
                f"(must be odd and at least {_RSA_MIN_EXPONENT})"
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _ALLOWED_CURVES:
            raise CsrRejected(
                f"EC curve {public_key.curve.name} is not allowed "
                f"(allowed: {', '.join(_ALLOWED_CURVES.values())})"
            )
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        kind = type(public_key).__name__.removesuffix("PublicKey").removeprefix("_")
        raise CsrRejected(f"{kind} keys are not accepted (use RSA, EC P-256/384/521 or Ed25519)")


def _check_signature(csr: x509.CertificateSigningRequest, public_key: PublicKeyTypes) -> None:
    """Proof of possession, over a hash that still means something."""
    algorithm = _read("signature algorithm", lambda: csr.signature_hash_algorithm)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        if algorithm is not None:
            raise CsrRejected("CSR signature algorithm does not match its Ed25519 key")
    elif algorithm is None or algorithm.name not in _ALLOWED_HASHES:
        used = algorithm.name if isinstance(algorithm, hashes.HashAlgorithm) else "no hash"
        raise CsrRejected(
            f"CSR is signed with {used.upper()}, which is not accepted "
            "(use SHA-256, SHA-384 or SHA-512)"
        )
    if not _read("signature", lambda: csr.is_signature_valid):
        raise CsrRejected("CSR signature does not verify (no proof of possession)")


def _check_extensions(extensions: x509.Extensions, profile: Profile) -> None:
    """Requests may hint, never grant; refuse the hints that could only be an attack."""
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca and not profile.is_ca:
            raise CsrRejected(
                f"CSR asks for a CA certificate (basicConstraints CA:TRUE) "
                f"but profile {profile.name} is not a CA profile"
            )
        if (
            isinstance(value, x509.KeyUsage)
            and (value.key_cert_sign or value.crl_sign)
            and not profile.is_ca
        ):
            raise CsrRejected(
                f"CSR asks for keyUsage keyCertSign/cRLSign "
                f"but profile {profile.name} is not a CA profile"
            )
        if isinstance(value, x509.NameConstraints):
            raise CsrRejected("CSR asks for nameConstraints, which only the CA may set")
        if ext.critical and ext.oid not in _CRITICAL_OK:
            name = ext.oid._name if ext.oid._name != "Unknown OID" else ext.oid.dotted_string
            raise CsrRejected(f"CSR has an unsupported critical extension {_show(name)}")


def _check_subject(subject: x509.Name, profile: Profile) -> x509.Name:
    """Keep only what the profile allows; refuse what is ambiguous even if dropped."""
    common_names = 0
    _check_attribute_counts(list(subject), CsrRejected, "CSR subject")
    for rdn in subject.rdns:
        if len(rdn) > 1:
            raise CsrRejected(
                f"CSR subject has a multi-valued RDN {_show(rdn.rfc4514_string())}; "
                "put each attribute in its own RDN"
            )
        for attr in rdn:
            _check_attribute(attr, CsrRejected, "CSR subject")
            if attr.oid == NameOID.COMMON_NAME:
                common_names += 1
    if common_names > 1:
        raise CsrRejected(f"CSR subject has {common_names} common names (CN); give at most one")
    if profile.subject_attributes is None:
        return subject
    keep = {SUBJECT_ATTRIBUTE_OIDS[a] for a in profile.subject_attributes}
    return x509.Name([rdn for rdn in subject.rdns if next(iter(rdn)).oid in keep])


def _requested_sans(extensions: x509.Extensions, profile: Profile) -> list[x509.GeneralName]:
    try:
        ext = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = list(ext.value)
    if names and not profile.san_kinds:
        raise CsrRejected(
            f"CSR has subject alternative names but profile {profile.name} allows none"
        )
    # Count before normalizing anything: a request with thousands of names is
    # refused in constant time per name, not after IDNA-processing all of them.
    if len(names) > profile.max_sans:
        raise CsrRejected(
            f"CSR has {len(names)} subject alternative names; "
            f"profile {profile.name} allows at most {profile.max_sans}"
        )
    return names


def _cn_as_san(cn: str, profile: Profile) -> x509.GeneralName:
    """For cn_in_san profiles the CN is just a copy of one SAN, so it must be one."""
    try:
        ip = ipaddress.ip_address(cn)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise CsrRejected(f"subject CN {_show(cn)} is an IPv6 address with a zone index")
        return x509.IPAddress(ip)
    try:
        return x509.DNSName(normalize_dns_name(cn))
    except CsrRejected as e:
        raise CsrRejected(
            f"subject CN {_show(cn)} is neither a valid DNS name nor an IP address "
            f"(profile {profile.name} copies the CN into the SANs): {e}"
        ) from e


def check_request(csr: x509.CertificateSigningRequest, profile: Profile) -> CheckedRequest:
    """Decide whether ``profile`` may certify this request, and extract what it may use.

    Order matters only for the message a bad request gets: the key and the
    signature come first, because nothing else in an unproven request is worth
    explaining.
    """
    public_key = _read("public key", csr.public_key)
    _check_key(public_key)
    _check_signature(csr, public_key)
    key_type = key_type_of(public_key)
    if key_type not in profile.key_types:
        raise CsrRejected(
            f"key type {key_type} is not allowed by profile {profile.name}; "
            f"allowed: {', '.join(profile.key_types)}"
        )

    extensions = _read("extensions", lambda: csr.extensions)
    _check_extensions(extensions, profile)

    requested_subject = _read("subject", lambda: csr.subject)
    subject = _check_subject(requested_subject, profile)

    sans: list[x509.GeneralName] = []
    seen: set[tuple[str, str]] = set()

    def add(name: x509.GeneralName) -> None:
        _check_name_for_profile(name, profile)
        key = _san_key(name)
        if key not in seen:
            seen.add(key)
            sans.append(name)

    for name in _requested_sans(extensions, profile):
        kind = _SAN_KIND_OF.get(type(name))
        if kind is None:
            raise CsrRejected(
                f"subjectAltName of type {type(name).__name__} is not accepted "
                "(only DNS, IP, e-mail and URI names)"
            )
        if kind not in profile.san_kinds:
            raise CsrRejected(f"SAN kind {kind} is not allowed by profile {profile.name}")
        try:
            add(_normalize_san(name, kind))
        except CsrRejected as e:
            raise CsrRejected(f"subjectAltName: {e}") from e

    if profile.cn_in_san:
        subject = _cn_into_sans(requested_subject, subject, profile, add)

    if profile.san_required and not sans:
        raise CsrRejected(f"profile {profile.name} requires at least one subject alternative name")
    if len(sans) > profile.max_sans:
        raise CsrRejected(
            f"CSR has {len(sans)} subject alternative names (counting the CN); "
            f"profile {profile.name} allows at most {profile.max_sans}"
        )
    return CheckedRequest(
        csr=csr,
        public_key=public_key,
        key_type=key_type,
        subject=subject,
        sans=tuple(sans),
        csr_sha256=csr_sha256(csr),
    )


def _cn_into_sans(
    requested: x509.Name,
    subject: x509.Name,
    profile: Profile,
    add: Callable[[x509.GeneralName], None],
) -> x509.Name:
    """Make the requested CN a normalized SAN, and the kept CN (if any) a copy of it.

    The requested subject is used, not the filtered one, so a profile that drops
    the CN from the subject still moves it into the SANs instead of losing it.
    """
    cns = [
        a for a in requested.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)
    ]
    if not cns:
        return subject
    cn = str(cns[0].value)
    san = _cn_as_san(cn, profile)
    kind = _SAN_KIND_OF[type(san)]
    if kind not in profile.san_kinds:
        raise CsrRejected(
            f"subject CN {_show(cn)} would become a SAN of kind {kind}, "
            f"which profile {profile.name} does not allow"
        )
    add(san)
    normal = str(san.value)
    rdns = list(subject.rdns)
    for i, rdn in enumerate(rdns):
        if next(iter(rdn)).oid == NameOID.COMMON_NAME:
            if len(normal) > 64:
                # The A-label form can outgrow the U-label the requester typed.
                raise CsrRejected(
                    f"subject CN {_show(cn)} is {len(normal)} characters as {_show(normal)}, "
                    "over the CN limit of 64; put the name only in the SANs"
                )
            rdns[i] = x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.COMMON_NAME, normal)]
            )
    return x509.Name(rdns)


# --------------------------------------------------------------------------- DNs


def _split_rfc4514(text: str) -> Iterator[str]:
    """Yield each ``type=value`` component, honouring backslash escapes."""
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(ch)
            current.append(next(chars, ""))
        elif ch in ",+":
            yield "".join(current)
            current = []
        else:
            current.append(ch)
    yield "".join(current)


def parse_dn(text: str) -> x509.Name:
    """Parse an operator-typed DN such as ``CN=Example Root CA,O=Example,C=NL``.

    Operators write CA names by hand, so typos must fail loudly here rather
    than end up, permanently, in a root certificate. Attribute names are
    matched case-insensitively (as RFC 4514 says); ``C`` is upper-cased.
    """
    example = "write it like 'CN=Example Root CA,O=Example,C=NL'"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"the distinguished name is empty; {example}")
    if _has_control(text):
        raise UsageError(f"distinguished name {_show(text)} contains a control character")
    known = {name.lower(): name for name in _DN_ATTRIBUTE_OIDS}
    overrides: dict[str, x509.ObjectIdentifier] = {}
    for component in _split_rfc4514(text):
        attr_type, sep, value = component.partition("=")
        attr_type = attr_type.strip()
        if not sep or not attr_type:
            raise UsageError(
                f"distinguished name {_show(text)} is malformed near {_show(component)}; {example}"
            )
        if attr_type.lower() not in known and not re.fullmatch(r"[0-9]+(\.[0-9]+)+", attr_type):
            raise UsageError(
                f"distinguished name {_show(text)} has an unknown attribute {_show(attr_type)}; "
                f"known: {', '.join(_DN_ATTRIBUTE_OIDS)}"
            )
        if attr_type.lower() in known:
            overrides[attr_type] = _DN_ATTRIBUTE_OIDS[known[attr_type.lower()]]
        if value.startswith("#"):
            raise UsageError(
                f"distinguished name {_show(text)}: hex-encoded values ('#...') are not supported"
            )
        if not value.strip():
            raise UsageError(f"distinguished name {_show(text)}: attribute {attr_type} is empty")
        if attr_type.lower() == "c" and not is_country_code(value.strip().upper()):
            raise UsageError(
                f"distinguished name {_show(text)}: attribute C must be a two-letter "
                f"country code, not {_show(value)} (an ISO 3166-1 alpha-2 code, such as NL)"
            )
    try:
        name = x509.Name.from_rfc4514_string(text, attr_name_overrides=overrides)
    except ValueError as e:
        detail = f": {e}" if str(e) else ""
        raise UsageError(f"distinguished name {_show(text)} is malformed{detail}; {example}") from e
    if not name.rdns:
        raise UsageError(f"the distinguished name is empty; {example}")
    _check_attribute_counts(list(name), UsageError, f"distinguished name {_show(text, 40)}")
    rdns: list[x509.RelativeDistinguishedName] = []
    common_names = 0
    for rdn in name.rdns:
        if len(rdn) > 1:
            raise UsageError(
                f"distinguished name {_show(text)} has a multi-valued RDN "
                f"{_show(rdn.rfc4514_string())}; separate attributes with ','"
            )
        attr = next(iter(rdn))
        if attr.oid not in _OID_SHORT_NAMES:
            raise UsageError(
                f"distinguished name {_show(text)} has an unsupported attribute "
                f"{attr.oid.dotted_string}"
            )
        if attr.oid == NameOID.COUNTRY_NAME and attr.value != attr.value.upper():
            attr = x509.NameAttribute(NameOID.COUNTRY_NAME, str(attr.value).upper())
            rdn = x509.RelativeDistinguishedName([attr])
        _check_attribute(attr, UsageError, "distinguished name")
        if attr.oid == NameOID.COMMON_NAME:
            common_names += 1
        rdns.append(rdn)
    if common_names > 1:
        raise UsageError(f"distinguished name {_show(text)} has more than one CN")
    return x509.Name(rdns)
