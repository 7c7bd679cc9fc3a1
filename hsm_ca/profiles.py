"""Certificate profiles: named, validated data that decides every extension.

A profile, never the CSR, says what a certificate may contain. Profiles are
TOML files shipped in ``profiles/``; a file of the same name in the home's
``profiles/`` overrides the shipped one. They are validated once, when loaded,
with errors naming the file and the field, so a typo cannot silently issue a
certificate with the wrong key usage.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsm_ca.engine.base import KEY_TYPES
from hsm_ca.errors import ProfileInvalid, ProfileNotFound

KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)
EXTENDED_KEY_USAGES = {
    "serverAuth": "1.3.6.1.5.5.7.3.1",
    "clientAuth": "1.3.6.1.5.5.7.3.2",
    "codeSigning": "1.3.6.1.5.5.7.3.3",
    "emailProtection": "1.3.6.1.5.5.7.3.4",
    "timeStamping": "1.3.6.1.5.5.7.3.8",
    "OCSPSigning": "1.3.6.1.5.5.7.3.9",
}
SAN_KINDS = ("dns", "ip", "email", "uri")
DEFAULT_URI_SCHEMES = ("https", "spiffe", "urn")
"""URI SAN schemes a profile allows unless it says otherwise: no javascript:, data:, file:."""
MAX_DAYS = 36500  # a century; beyond it dates stop being meaningful (and 9999-12-31 nears)
MAX_PATH_LENGTH = 32  # no real hierarchy is deeper; bounds the integer a profile may give
SUBJECT_ATTRIBUTES = ("CN", "O", "OU", "C", "L", "ST", "emailAddress", "serialNumber")
SHIPPED_PROFILES = (
    "root-ca",
    "intermediate-ca",
    "tls-server",
    "tls-client",
    "code-signing",
    "ocsp-signing",
    "timestamping",
)


@dataclass(frozen=True)
class Profile:
    """A validated certificate profile."""

    name: str
    source: str
    description: str
    is_ca: bool
    path_length: int | None
    key_usage: frozenset[str]
    extended_key_usage: tuple[str, ...]
    eku_critical: bool
    key_types: tuple[str, ...]
    san_kinds: frozenset[str]
    san_required: bool
    max_sans: int
    subject_attributes: tuple[str, ...] | None
    cn_in_san: bool
    default_days: int
    max_days: int
    cabf_server_auth: bool
    policies: tuple[str, ...]
    subject_key_identifier: bool
    ocsp_no_check: bool
    crl_next_update_days: int
    lint: bool
    uri_schemes: frozenset[str] = frozenset(DEFAULT_URI_SCHEMES)
    allow_mixed_script: bool = False
    sha256: str = ""
    """SHA-256 of the profile file's bytes: issuance records carry it (finding 17)."""
    widens: frozenset[str] = frozenset()
    """What a home override declares it widens over the shipped profile (WIDENINGS)."""

    def eku_oids(self) -> list[str]:
        return [EXTENDED_KEY_USAGES[e] for e in self.extended_key_usage]


WIDENINGS = (
    "ca",
    "key_usage",
    "extended_key_usage",
    "eku_critical",
    "max_days",
    "path_length",
    "cabf_server_auth",
    "ocsp_no_check",
    "policies",
    "lint",
    "key_types",
    "san_kinds",
    "san_required",
    "max_sans",
    "subject_attributes",
    "cn_in_san",
    "uri_schemes",
    "allow_mixed_script",
)
"""The powers a home override may add to a shipped profile only by declaring them."""

FIELD_EFFECTS: dict[str, str] = {
    # what each schema field can do to the certificates a profile grants: the WIDENINGS
    # entry that names the direction in which it adds power, or "" for a field that
    # cannot add any (tests check that every field of _SCHEMA is classified here)
    "description": "",  # text for people
    "widens": "",  # the declaration itself
    "certificate.ca": "ca",  # leaf -> CA
    "certificate.path_length": "path_length",  # deeper or unlimited
    "certificate.key_usage": "key_usage",  # any usage added
    "certificate.extended_key_usage": "extended_key_usage",  # added, or all removed (any)
    "certificate.eku_critical": "eku_critical",  # critical -> not: unaware parties accept it
    "certificate.default_days": "",  # always <= max_days, which is judged
    "certificate.max_days": "max_days",  # longer validity
    "certificate.cabf_server_auth": "cabf_server_auth",  # the CA/B validity clamp off
    "certificate.policies": "policies",  # a policy OID asserted that was not
    "certificate.subject_key_identifier": "",  # an identifier, grants nothing
    "certificate.ocsp_no_check": "ocsp_no_check",  # relying parties stop checking
    "certificate.lint": "lint",  # pre-issuance linting off
    "request.key_types": "key_types",  # a key type accepted that was not
    "request.san_kinds": "san_kinds",  # a SAN kind accepted that was not
    "request.san_required": "san_required",  # certificates without SANs
    "request.max_sans": "max_sans",  # more names per certificate
    "request.subject_attributes": "subject_attributes",  # attributes kept that were dropped
    "request.cn_in_san": "cn_in_san",  # a kept CN no longer checked as a host name
    "request.uri_schemes": "uri_schemes",  # a URI scheme accepted that was not
    "request.allow_mixed_script": "allow_mixed_script",  # look-alike labels accepted
    # the CRL cadence: bounded to 1..366 days when loaded, grants no certificate any
    # power, and must never stop a CA from publishing revocations
    "crl.next_update_days": "",
}

_SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "": {"description": (str, ""), "widens": (list, [])},
    "certificate": {
        "ca": (bool, False),
        "path_length": (int, None),
        "key_usage": (list, None),
        "extended_key_usage": (list, []),
        "eku_critical": (bool, False),
        "default_days": (int, None),
        "max_days": (int, None),
        "cabf_server_auth": (bool, False),
        "policies": (list, []),
        "subject_key_identifier": (bool, True),
        "ocsp_no_check": (bool, False),
        "lint": (bool, False),
    },
    "request": {
        "key_types": (list, list(KEY_TYPES)),
        "san_kinds": (list, []),
        "san_required": (bool, False),
        "max_sans": (int, 100),
        "subject_attributes": (list, None),
        "cn_in_san": (bool, False),
        "uri_schemes": (list, list(DEFAULT_URI_SCHEMES)),
        "allow_mixed_script": (bool, False),
    },
    "crl": {"next_update_days": (int, 7)},
}


def _field(data: dict[str, Any], section: str, key: str, where: str) -> Any:
    typ, default = _SCHEMA[section][key]
    value = data.get(key, default)
    name = f"{section}.{key}" if section else key
    if value is None:
        if default is None and key in ("default_days", "max_days", "key_usage"):
            raise ProfileInvalid(f"{where}: missing required field {name!r}")
        return None
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProfileInvalid(f"{where}: field {name!r} must be an integer, not {_shown(value)}")
    if not isinstance(value, typ):
        raise ProfileInvalid(
            f"{where}: field {name!r} must be a {typ.__name__}, not {_shown(value)}")
    if typ is list and not all(isinstance(v, str) for v in value):
        raise ProfileInvalid(f"{where}: field {name!r} must be a list of strings")
    return value


def _shown(value: Any) -> str:
    """A field's value for an error message: never more than ~64 characters of the file."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:60]}..."


def _choices(values: list[str], allowed: Any, where: str, name: str) -> list[str]:
    for v in values:
        if v not in allowed:
            raise ProfileInvalid(
                f"{where}: field {name!r} has unknown value {_shown(v)}; allowed: {', '.join(allowed)}"
            )
    return values


def parse_profile(name: str, text: str, source: str) -> Profile:
    """Validate a profile's TOML text; errors name ``source`` and the field."""
    from hsm_ca.config import parse_toml

    data = parse_toml(text, source, ProfileInvalid)
    for key, value in data.items():
        if key in _SCHEMA and key:
            if not isinstance(value, dict):
                raise ProfileInvalid(f"{source}: {key!r} must be a table")
            for sub in value:
                if sub not in _SCHEMA[key]:
                    raise ProfileInvalid(f"{source}: unknown field '{key}.{sub}'")
        elif key not in _SCHEMA[""]:
            raise ProfileInvalid(f"{source}: unknown field {key!r}")
    cert = data.get("certificate", {})
    req = data.get("request", {})
    crl = data.get("crl", {})
    if "certificate" not in data:
        raise ProfileInvalid(f"{source}: missing table [certificate]")

    is_ca = _field(cert, "certificate", "ca", source)
    path_length = _field(cert, "certificate", "path_length", source)
    if path_length is not None and (not is_ca or not 0 <= path_length <= MAX_PATH_LENGTH):
        raise ProfileInvalid(
            f"{source}: 'certificate.path_length' needs ca = true and 0 to {MAX_PATH_LENGTH}")
    ku = _choices(_field(cert, "certificate", "key_usage", source), KEY_USAGES, source, "certificate.key_usage")
    if is_ca and "key_cert_sign" not in ku:
        raise ProfileInvalid(f"{source}: a CA profile's 'certificate.key_usage' needs key_cert_sign")
    if not is_ca and ("key_cert_sign" in ku or "crl_sign" in ku):
        raise ProfileInvalid(
            f"{source}: 'certificate.key_usage' has key_cert_sign/crl_sign but ca = false"
        )
    eku = _choices(
        _field(cert, "certificate", "extended_key_usage", source),
        EXTENDED_KEY_USAGES, source, "certificate.extended_key_usage",
    )
    default_days = _field(cert, "certificate", "default_days", source)
    max_days = _field(cert, "certificate", "max_days", source)
    if not 1 <= default_days <= max_days <= MAX_DAYS:
        raise ProfileInvalid(
            f"{source}: need 1 <= 'certificate.default_days' <= 'certificate.max_days' <= {MAX_DAYS}"
        )
    policies = _field(cert, "certificate", "policies", source)
    for oid in policies:
        parts = oid.split(".")
        ok = len(parts) >= 2 and all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts) \
            and int(parts[0]) <= 2 and (int(parts[0]) == 2 or int(parts[1]) < 40)
        if not ok:
            raise ProfileInvalid(f"{source}: 'certificate.policies' has a bad OID {_shown(oid)}")
    key_types = _choices(_field(req, "request", "key_types", source), KEY_TYPES, source, "request.key_types")
    if not key_types:
        raise ProfileInvalid(f"{source}: 'request.key_types' must not be empty")
    san_kinds = _choices(_field(req, "request", "san_kinds", source), SAN_KINDS, source, "request.san_kinds")
    max_sans = _field(req, "request", "max_sans", source)
    if not 0 <= max_sans <= 1000:
        raise ProfileInvalid(f"{source}: 'request.max_sans' must be between 0 and 1000")
    subject_attributes = _field(req, "request", "subject_attributes", source)
    if subject_attributes is not None:
        _choices(subject_attributes, SUBJECT_ATTRIBUTES, source, "request.subject_attributes")
    san_required = _field(req, "request", "san_required", source)
    if san_required and not san_kinds:
        raise ProfileInvalid(f"{source}: 'request.san_required' needs 'request.san_kinds'")
    uri_schemes = _field(req, "request", "uri_schemes", source)
    for scheme in uri_schemes:
        # RFC 3986 scheme syntax, lowercase (the canonical form URIs are compared in)
        if not (0 < len(scheme) <= 32 and scheme.isascii() and scheme[0].isalpha()
                and scheme == scheme.lower() and all(c.isalnum() or c in "+.-" for c in scheme)):
            raise ProfileInvalid(
                f"{source}: 'request.uri_schemes' has a bad scheme {scheme[:40]!r}; "
                "write lowercase scheme names without ':', such as \"https\""
            )
        if scheme in ("javascript", "data", "vbscript", "file"):
            raise ProfileInvalid(
                f"{source}: 'request.uri_schemes' must not allow {scheme!r} "
                "(it names no resource a relying party can check)"
            )
    next_update = _field(crl, "crl", "next_update_days", source)
    if not 1 <= next_update <= 366:
        raise ProfileInvalid(f"{source}: 'crl.next_update_days' must be between 1 and 366")
    return Profile(
        name=name,
        source=source,
        description=_field(data, "", "description", source),
        is_ca=is_ca,
        path_length=path_length,
        key_usage=frozenset(ku),
        extended_key_usage=tuple(eku),
        eku_critical=_field(cert, "certificate", "eku_critical", source),
        key_types=tuple(key_types),
        san_kinds=frozenset(san_kinds),
        san_required=san_required,
        max_sans=max_sans,
        subject_attributes=tuple(subject_attributes) if subject_attributes is not None else None,
        cn_in_san=_field(req, "request", "cn_in_san", source),
        default_days=default_days,
        max_days=max_days,
        cabf_server_auth=_field(cert, "certificate", "cabf_server_auth", source),
        policies=tuple(policies),
        subject_key_identifier=_field(cert, "certificate", "subject_key_identifier", source),
        ocsp_no_check=_field(cert, "certificate", "ocsp_no_check", source),
        crl_next_update_days=next_update,
        lint=_field(cert, "certificate", "lint", source),
        uri_schemes=frozenset(uri_schemes),
        allow_mixed_script=_field(req, "request", "allow_mixed_script", source),
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        widens=frozenset(_choices(_field(data, "", "widens", source), WIDENINGS, source, "widens")),
    )


def widenings(shipped: Profile, override: Profile) -> dict[str, str]:
    """What ``override`` lets a certificate do that ``shipped`` does not, each described.

    Narrowing (fewer days, fewer SAN kinds) is what overrides are for and is
    free; these are the powers a typo or a hostile edit of the home could
    add, one entry per WIDENINGS kind (FIELD_EFFECTS says which schema field
    each comes from): a CA where a leaf was meant, new key usages, an EKU added
    (or all removed, which means "any purpose") or made non-critical, longer
    validity, a deeper or unlimited path, the CA/B validity clamp, OCSP
    checking or linting turned off, a certificate policy asserted, and every
    request check relaxed: key types, SAN kinds, a required SAN, the SAN count,
    subject attributes kept, the CN-as-host-name check, URI schemes and
    single-script labels.
    """
    found: dict[str, str] = {}

    def added(kind: str, ship: Any, over: Any) -> None:
        extra = ", ".join(sorted(set(over) - set(ship)))
        if extra:  # policies and schemes are the file's own text: at most ~64 characters
            found[kind] = "adds " + (extra if len(extra) <= 64 else f"{extra[:60]}...")

    if override.is_ca and not shipped.is_ca:
        found["ca"] = "leaf -> CA"
    added("key_usage", shipped.key_usage, override.key_usage)
    if shipped.extended_key_usage and not override.extended_key_usage:
        found["extended_key_usage"] = "none (any purpose)"
    else:
        added("extended_key_usage", shipped.extended_key_usage, override.extended_key_usage)
    if shipped.eku_critical and override.extended_key_usage and not override.eku_critical:
        found["eku_critical"] = "EKU no longer critical"
    if override.max_days > shipped.max_days:
        found["max_days"] = f"{shipped.max_days} -> {override.max_days}"
    if shipped.is_ca and override.is_ca and shipped.path_length is not None and (
        override.path_length is None or override.path_length > shipped.path_length
    ):
        found["path_length"] = f"{shipped.path_length} -> {override.path_length}"
    if shipped.cabf_server_auth and not override.cabf_server_auth:
        found["cabf_server_auth"] = "CA/B validity clamp off"
    if override.ocsp_no_check and not shipped.ocsp_no_check:
        found["ocsp_no_check"] = "OCSP no-check on"
    added("policies", shipped.policies, override.policies)
    if shipped.lint and not override.lint:
        found["lint"] = "pre-issuance lint off"
    added("key_types", shipped.key_types, override.key_types)
    added("san_kinds", shipped.san_kinds, override.san_kinds)
    if shipped.san_required and not override.san_required:
        found["san_required"] = "SANs no longer required"
    if override.max_sans > shipped.max_sans:
        found["max_sans"] = f"{shipped.max_sans} -> {override.max_sans}"
    if shipped.subject_attributes is not None:
        if override.subject_attributes is None:
            found["subject_attributes"] = "any attribute kept"
        else:
            added("subject_attributes", shipped.subject_attributes, override.subject_attributes)
    keeps_cn = override.subject_attributes is None or "CN" in override.subject_attributes
    if shipped.cn_in_san and not override.cn_in_san and keeps_cn:
        # with the CN dropped from the subject, not copying it is only fewer names
        found["cn_in_san"] = "a kept CN is no longer checked as a host name"
    if "uri" in override.san_kinds:
        added("uri_schemes", shipped.uri_schemes, override.uri_schemes)
    if override.allow_mixed_script and not shipped.allow_mixed_script:
        found["allow_mixed_script"] = "mixed-script (look-alike) labels allowed"
    return found


def shipped_profiles_dir() -> Path:
    """Profiles ship inside the wheel; in a source checkout they sit at the top level."""
    inside = Path(__file__).parent / "profiles"
    if inside.is_dir():
        return inside
    return Path(__file__).parent.parent / "profiles"


class ProfileStore:
    """Finds profiles in the home first, then among the shipped ones; caches parses."""

    def __init__(self, home_profiles: Path | None) -> None:
        self._dirs = [d for d in (home_profiles, shipped_profiles_dir()) if d is not None]
        self._cache: dict[str, Profile] = {}
        self._widened: dict[str, dict[str, str]] = {}
        self._warned: set[str] = set()

    def get(self, name: str) -> Profile:
        """The profile ``name``, for uses that grant no power: CRLs, plans, listings.

        A home override is not judged here: signing a CRL uses only the CA
        profile's ``crl.next_update_days``, and must go on (in ``serve`` too)
        whatever else an override says. Issuing anything goes through
        ``for_issuance``, which judges it.
        """
        return self._get(name)

    def for_issuance(self, name: str) -> Profile:
        """The profile ``name`` to issue a certificate, or create a CA or signer, under.

        This is where an override's powers are granted, so it is judged here:
        one adding any of WIDENINGS without listing it in ``widens`` is refused
        (ProfileInvalid, which callers record as a refused issuance); a declared
        widening writes one ``Warning:`` line on stderr the first time this
        store grants it, so once per command however many certificates the
        command issues, and never quietly.
        """
        profile = self._get(name)
        if name not in self._widened:
            self._widened[name] = self._check_override(profile)
        wide = self._widened[name]
        if wide and name not in self._warned:
            self._warned.add(name)
            what = "; ".join(f"{k}: {v}" for k, v in wide.items())
            sys.stderr.write(f"Warning: profile {name} ({profile.source}) widens the shipped "
                             f"profile: {what}\n")
        return profile

    def _check_override(self, profile: Profile) -> dict[str, str]:
        shipped_dir = shipped_profiles_dir()
        shipped_path = shipped_dir / f"{profile.name}.toml"
        if Path(profile.source).parent == shipped_dir or not shipped_path.is_file():
            return {}  # a shipped profile, or a home profile of a new name: nothing to widen
        shipped = parse_profile(profile.name, shipped_path.read_text(encoding="utf-8"),
                                str(shipped_path))
        found = widenings(shipped, profile)
        undeclared = [k for k in found if k not in profile.widens]
        if undeclared:
            what = "; ".join(f"{k}: {found[k]}" for k in undeclared)
            raise ProfileInvalid(
                f"{profile.source}: this override widens the shipped profile {profile.name} "
                f"({what}); if that is meant, declare it at the top of the file: "
                f"widens = [{', '.join(repr(k).replace(chr(39), chr(34)) for k in found)}]"
            )
        return found

    def _get(self, name: str) -> Profile:
        if name in self._cache:
            return self._cache[name]
        if not name or len(name) > 64 or name.startswith(".") or \
                not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
            raise ProfileNotFound(f"invalid profile name {name[:80]!r}")
        for d in self._dirs:
            path = d / f"{name}.toml"
            if path.exists():  # a FIFO or directory here is refused, not skipped
                from hsm_ca.fileio import CONFIG_BYTES, InputError, read_text_file

                try:  # bounded, and never a FIFO or device named like a profile
                    text = read_text_file(path, CONFIG_BYTES, "profile")
                except InputError as e:
                    raise ProfileInvalid(str(e)) from None
                profile = parse_profile(name, text, str(path))
                self._cache[name] = profile
                return profile
        raise ProfileNotFound(
            f"unknown profile {name!r}; available: {', '.join(self.names())}"
        )

    def names(self) -> list[str]:
        found: set[str] = set()
        for d in self._dirs:
            if d.is_dir():
                found.update(p.stem for p in d.glob("*.toml"))
        return sorted(found)
