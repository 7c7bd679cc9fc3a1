"""Scripted PKI bootstrap: a whole hierarchy from one declarative TOML file.

Three phases, so that a reviewed file either builds what it says or changes
nothing: *load* validates everything (unknown keys, missing parents, cycles,
duplicates, key types, profiles, CSRs against their profiles) and names the
file, line and field of the first problem; *plan* compares the file with the
home (create / exists / drift); *apply* refuses on any drift, then creates in
dependency order. Each item is committed on its own, so an interrupted run
keeps what it made and the next run continues from there.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hsm_ca.engine.base import KEY_TYPES
from hsm_ca.engine.keys import new_software_key
from hsm_ca.errors import ConfigError, HsmCaError, PolicyViolation
from hsm_ca.fileio import atomic_write
from hsm_ca.names import show as show_name
from hsm_ca.x509util import cert_pem, rfc3339

if TYPE_CHECKING:
    from hsm_ca.authority import Authority
    from hsm_ca.profiles import ProfileStore


class BootstrapError(ConfigError):
    """The bootstrap file is invalid; the message names file, line and field."""


_CA_KEYS = {"name", "subject", "parent", "key_type", "days", "path_length", "name_constraints"}
_NC_KEYS = {"permitted_dns", "excluded_dns", "permitted_ip", "excluded_ip", "permitted_email",
            "excluded_email"}
_CERT_KEYS = {"ca", "profile", "csr", "out", "days", "subject", "sans", "key_out", "key_type"}
_SIGNER_KEYS = {"label", "ca", "subject", "key_type", "days"}
_OUTPUT_KEYS = {"chains", "crls", "trust_bundle"}
_TOP_KEYS = {"ca", "certificate", "signer", "output"}


@dataclass(frozen=True)
class CaSpec:
    name: str
    subject: x509.Name
    parent: str | None
    key_type: str
    days: int | None
    path_length: int | None
    name_constraints: x509.NameConstraints | None
    line: int


@dataclass(frozen=True)
class CertSpec:
    ca: str
    profile: str
    out: Path
    days: int | None
    csr: Path | None
    csr_bytes: bytes | None
    subject: x509.Name | None
    sans: tuple[x509.GeneralName, ...]
    key_out: Path | None
    key_type: str
    line: int

    @property
    def item(self) -> str:
        return f"certificate:{self.out}"


@dataclass(frozen=True)
class SignerSpec:
    label: str
    ca: str
    subject: x509.Name
    key_type: str
    days: int | None
    line: int


@dataclass(frozen=True)
class OutputSpec:
    chains: Path | None = None
    crls: Path | None = None
    trust_bundle: Path | None = None


@dataclass(frozen=True)
class PkiSpec:
    path: Path
    cas: tuple[CaSpec, ...]
    certificates: tuple[CertSpec, ...]
    signers: tuple[SignerSpec, ...]
    output: OutputSpec

    def ordered_cas(self) -> list[CaSpec]:
        """Parents before children (the file was checked to be acyclic)."""
        done: set[str] = set()
        out: list[CaSpec] = []
        pending = list(self.cas)
        while pending:
            for spec in list(pending):
                if spec.parent is None or spec.parent in done or \
                        spec.parent not in {c.name for c in self.cas}:
                    out.append(spec)
                    done.add(spec.name)
                    pending.remove(spec)
        return out


@dataclass
class PlanItem:
    kind: str
    name: str
    action: str  # create | exists | drift
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "action": self.action, "detail": self.detail}


@dataclass
class Plan:
    items: list[PlanItem] = field(default_factory=list)

    @property
    def drift(self) -> list[PlanItem]:
        return [i for i in self.items if i.action == "drift"]

    def count(self, action: str) -> int:
        return sum(1 for i in self.items if i.action == action)


# -------------------------------------------------------------------- load
class _Locator:
    """Line numbers of ``[[table]]`` entries and their keys (tomllib gives none)."""

    def __init__(self, text: str) -> None:
        self.entries: dict[tuple[str, int], dict[str, int]] = {}
        self.tables: dict[tuple[str, int], int] = {}
        counts: dict[str, int] = {}
        current: tuple[str, int] | None = None
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if m := re.match(r"^\[\[\s*([A-Za-z0-9_-]+)\s*\]\]", line):
                name = m.group(1)
                current = (name, counts.get(name, 0))
                counts[name] = counts.get(name, 0) + 1
                self.tables[current] = n
                self.entries[current] = {}
            elif m := re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", line):
                current = (m.group(1), 0)
                self.tables[current] = n
                self.entries[current] = {}
            elif (m := re.match(r"^([A-Za-z0-9_-]+)\s*=", line)) and current is not None:
                self.entries[current].setdefault(m.group(1), n)

    def line(self, table: str, index: int, key: str | None = None) -> int:
        if key is not None and key in self.entries.get((table, index), {}):
            return self.entries[(table, index)][key]
        return self.tables.get((table, index), 1)


class _Loader:
    def __init__(self, path: Path, text: str, profiles: ProfileStore) -> None:
        self.path = path
        self.base = path.parent
        self.loc = _Locator(text)
        self.profiles = profiles

    def fail(self, table: str, index: int, key: str | None, message: str) -> BootstrapError:
        where = f"[[{table}]] #{index + 1}" if table in ("ca", "certificate", "signer") else f"[{table}]"
        fld = f" field {key!r}:" if key else ":"
        return BootstrapError(f"{self.path}:{self.loc.line(table, index, key)}: {where}{fld} {message}")

    def get(self, entry: dict[str, Any], table: str, index: int, key: str, typ: type,
            required: bool = False, default: Any = None) -> Any:
        if key not in entry:
            if required:
                raise self.fail(table, index, None, f"missing required field {key!r}")
            return default
        value = entry[key]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(table, index, key, f"must be an integer, not {_shown(value)}")
        if not isinstance(value, typ):
            raise self.fail(table, index, key, f"must be a {typ.__name__}, not {_shown(value)}")
        return value

    def unique_name(self, table: str, index: int, entry: dict[str, Any], key: str,
                    validate: Callable[[str], str], taken: set[str]) -> str:
        """A required name field that passes ``validate`` and is not used twice in the file.

        Names are unique regardless of case (CLI.md "Names"), so ``ROOT`` after
        ``root`` is a duplicate too.
        """
        from hsm_ca.names import fold

        value = self.get(entry, table, index, key, str, required=True)
        try:
            validate(value)
        except HsmCaError as e:
            raise self.fail(table, index, key, str(e)) from e
        clash = next((t for t in taken if fold(t) == fold(value)), None)
        if clash is not None:
            same = "" if clash == value else f" (same as {clash!r} regardless of case)"
            raise self.fail(table, index, key, f"duplicate {table} {key} {value!r}{same}")
        return value

    def dn(self, table: str, index: int, key: str, text: str) -> x509.Name:
        from hsm_ca.policy import parse_dn

        try:
            return parse_dn(text)
        except HsmCaError as e:
            raise self.fail(table, index, key, str(e)) from e

    def key_type(self, table: str, index: int, value: str) -> str:
        if value not in KEY_TYPES:
            raise self.fail(table, index, "key_type",
                            f"unknown key type {value!r}; choose one of {', '.join(KEY_TYPES)}")
        return value

    def days(self, table: str, index: int, entry: dict[str, Any]) -> int | None:
        from hsm_ca.profiles import MAX_DAYS

        days = self.get(entry, table, index, "days", int)
        if days is not None and not 1 <= days <= MAX_DAYS:
            raise self.fail(table, index, "days", f"must be from 1 to {MAX_DAYS}")
        return days

    def unknown(self, table: str, index: int, entry: dict[str, Any], allowed: set[str]) -> None:
        for key in entry:
            if key not in allowed:
                raise self.fail(table, index, key, f"unknown field; allowed: {', '.join(sorted(allowed))}")

    def name_constraints(self, index: int, value: Any) -> x509.NameConstraints | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail("ca", index, "name_constraints", "must be a table")
        for key in value:
            if key not in _NC_KEYS:
                raise self.fail("ca", index, "name_constraints",
                                f"unknown key {key!r}; allowed: {', '.join(sorted(_NC_KEYS))}")
        from hsm_ca.policy import normalize_dns_name

        def subtrees(kind: str) -> list[x509.GeneralName]:
            out: list[x509.GeneralName] = []
            for item in value.get(kind, []):
                if not isinstance(item, str):
                    raise self.fail("ca", index, "name_constraints", f"{kind} entries must be strings")
                try:
                    if kind.endswith("_dns"):
                        out.append(x509.DNSName(normalize_dns_name(item.lstrip("."), allow_wildcard=False)))
                    elif kind.endswith("_ip"):
                        out.append(x509.IPAddress(ipaddress.ip_network(item, strict=True)))
                    else:
                        out.append(x509.RFC822Name(item))
                except (HsmCaError, ValueError) as e:
                    raise self.fail("ca", index, "name_constraints", f"{kind}: {item!r}: {e}") from e
            return out

        permitted = subtrees("permitted_dns") + subtrees("permitted_ip") + subtrees("permitted_email")
        excluded = subtrees("excluded_dns") + subtrees("excluded_ip") + subtrees("excluded_email")
        if not permitted and not excluded:
            raise self.fail("ca", index, "name_constraints", "empty: name at least one subtree")
        return x509.NameConstraints(permitted_subtrees=permitted or None,
                                    excluded_subtrees=excluded or None)

    def resolve(self, table: str, index: int, key: str, value: str) -> Path:
        if not value or "\x00" in value:
            raise self.fail(table, index, key, "must be a non-empty path")
        p = Path(value)
        return p if p.is_absolute() else (self.base / p)


def load_spec(path: str | Path, profiles: ProfileStore | None = None,
              existing_cas: dict[str, str | None] | None = None) -> PkiSpec:
    """Read and validate a bootstrap file; nothing is created here.

    ``existing_cas`` (name → parent) lets a file refer to CAs the home already has.
    """
    from hsm_ca.policy import check_request, load_csr
    from hsm_ca.profiles import ProfileStore

    path = Path(path)
    profiles = profiles or ProfileStore(None)
    existing = existing_cas or {}
    from hsm_ca.config import read_toml

    data, text = read_toml(path, BootstrapError, "bootstrap file")
    ld = _Loader(path, text, profiles)
    for key in data:
        if key not in _TOP_KEYS:
            raise BootstrapError(f"{path}:{_first_line(text, key)}: unknown top-level field {key!r}; "
                                 f"allowed: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("ca", "certificate", "signer"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(e, dict) for e in data[key])):
            raise BootstrapError(f"{path}:{_first_line(text, key)}: '{key}' must be written as [[{key}]] tables")

    cas: list[CaSpec] = []
    for i, entry in enumerate(data.get("ca", [])):
        ld.unknown("ca", i, entry, _CA_KEYS)
        from hsm_ca.authority import validate_ca_name

        name = ld.unique_name("ca", i, entry, "name", validate_ca_name, {c.name for c in cas})
        from hsm_ca.names import fold

        home_name = next((k for k in existing if fold(k) == fold(name) and k != name), None)
        if home_name is not None:  # 'apply' would otherwise plan a create that must fail
            raise ld.fail("ca", i, "name", f"the home already has CA {home_name!r}; "
                          "CA names are unique regardless of case")
        parent = ld.get(entry, "ca", i, "parent", str)
        path_length = ld.get(entry, "ca", i, "path_length", int)
        from hsm_ca.profiles import MAX_PATH_LENGTH

        if path_length is not None and not 0 <= path_length <= MAX_PATH_LENGTH:
            raise ld.fail("ca", i, "path_length", f"must be from 0 to {MAX_PATH_LENGTH}")
        cas.append(CaSpec(
            name=name,
            subject=ld.dn("ca", i, "subject", ld.get(entry, "ca", i, "subject", str, required=True)),
            parent=parent,
            key_type=ld.key_type("ca", i, ld.get(entry, "ca", i, "key_type", str,
                                               default="ec-p384" if parent is None else "ec-p256")),
            days=ld.days("ca", i, entry),
            path_length=path_length,
            name_constraints=ld.name_constraints(i, entry.get("name_constraints")),
            line=ld.loc.line("ca", i),
        ))
        if parent is None and entry.get("name_constraints") is not None:
            raise ld.fail("ca", i, "name_constraints", "a root cannot carry name constraints")
    known = {c.name: c.parent for c in cas} | {k: v for k, v in existing.items() if k not in
                                                 {c.name for c in cas}}
    for i, spec in enumerate(cas):
        if spec.parent is not None and spec.parent not in known:
            raise ld.fail("ca", i, "parent", f"unknown parent CA {show_name(spec.parent)}")
        seen = {spec.name}
        cur = spec.parent
        while cur is not None:
            if cur in seen:
                raise ld.fail("ca", i, "parent", f"CA {spec.name!r} is part of a parent cycle")
            seen.add(cur)
            cur = known.get(cur)

    certs: list[CertSpec] = []
    outs: set[Path] = set()
    for i, entry in enumerate(data.get("certificate", [])):
        ld.unknown("certificate", i, entry, _CERT_KEYS)
        ca = ld.get(entry, "certificate", i, "ca", str, required=True)
        if ca not in known:
            raise ld.fail("certificate", i, "ca", f"unknown CA {show_name(ca)}")
        profile_name = ld.get(entry, "certificate", i, "profile", str, required=True)
        try:
            profile = profiles.get(profile_name)
        except HsmCaError as e:
            raise ld.fail("certificate", i, "profile", str(e)) from e
        out = ld.resolve("certificate", i, "out", ld.get(entry, "certificate", i, "out", str, required=True))
        if out in outs:
            raise ld.fail("certificate", i, "out", f"duplicate output path {out}")
        outs.add(out)
        csr_text = ld.get(entry, "certificate", i, "csr", str)
        subject_text = ld.get(entry, "certificate", i, "subject", str)
        sans_list = ld.get(entry, "certificate", i, "sans", list, default=[])
        key_out_text = ld.get(entry, "certificate", i, "key_out", str)
        key_type = ld.key_type("certificate", i, ld.get(entry, "certificate", i, "key_type", str,
                                                        default="ec-p256"))
        csr_path = csr_bytes = key_out = None
        subject = None
        sans: tuple[x509.GeneralName, ...] = ()
        if csr_text is not None:
            if subject_text is not None or key_out_text is not None or sans_list:
                raise ld.fail("certificate", i, "csr",
                              "give either 'csr' or 'subject'/'sans'/'key_out', not both")
            csr_path = ld.resolve("certificate", i, "csr", csr_text)
            from hsm_ca.fileio import CSR_BYTES, InputError, read_regular_file

            try:
                csr_bytes = read_regular_file(csr_path, CSR_BYTES, "CSR file")
            except InputError as e:
                raise ld.fail("certificate", i, "csr", str(e)) from None
            try:
                check_request(load_csr(csr_bytes, str(csr_path)), profile)
            except HsmCaError as e:
                raise ld.fail("certificate", i, "csr", str(e)) from e
        else:
            if key_out_text is None:
                raise ld.fail("certificate", i, None,
                              "needs 'csr', or 'subject'/'sans' with 'key_out' for a key made here")
            key_out = ld.resolve("certificate", i, "key_out", key_out_text)
            subject = ld.dn("certificate", i, "subject", subject_text) if subject_text else x509.Name([])
            sans = tuple(_parse_san(ld, i, s) for s in sans_list)
            if key_type not in profile.key_types:
                raise ld.fail("certificate", i, "key_type",
                              f"key type {key_type} is not allowed by profile {profile_name}")
            probe_profile = dataclasses.replace(
                profile, key_types=("rsa-2048" if key_type.startswith("rsa-") else key_type,))
            try:  # the same policy as a CSR would meet, before anything is made
                check_request(_probe_csr(subject, sans, key_type), probe_profile)
            except HsmCaError as e:
                raise ld.fail("certificate", i, "sans" if sans_list else "subject", str(e)) from e
        certs.append(CertSpec(ca=ca, profile=profile_name, out=out,
                              days=ld.days("certificate", i, entry), csr=csr_path,
                              csr_bytes=csr_bytes, subject=subject, sans=sans, key_out=key_out,
                              key_type=key_type, line=ld.loc.line("certificate", i)))

    signers: list[SignerSpec] = []
    for i, entry in enumerate(data.get("signer", [])):
        ld.unknown("signer", i, entry, _SIGNER_KEYS)
        from hsm_ca.names import check_name

        label = ld.unique_name("signer", i, entry, "label",
                               lambda v: check_name(v, "signer label"), {s.label for s in signers})
        ca = ld.get(entry, "signer", i, "ca", str, required=True)
        if ca not in known:
            raise ld.fail("signer", i, "ca", f"unknown CA {show_name(ca)}")
        signers.append(SignerSpec(
            label=label, ca=ca,
            subject=ld.dn("signer", i, "subject", ld.get(entry, "signer", i, "subject", str, required=True)),
            key_type=ld.key_type("signer", i, ld.get(entry, "signer", i, "key_type", str, default="ec-p256")),
            days=ld.days("signer", i, entry), line=ld.loc.line("signer", i),
        ))

    output = OutputSpec()
    if "output" in data:
        entry = data["output"]
        if not isinstance(entry, dict):
            raise ld.fail("output", 0, None, "must be a table")
        ld.unknown("output", 0, entry, _OUTPUT_KEYS)
        output = OutputSpec(**{k: ld.resolve("output", 0, k, ld.get(entry, "output", 0, k, str))
                               for k in _OUTPUT_KEYS if k in entry})
    return PkiSpec(path, tuple(cas), tuple(certs), tuple(signers), output)


def _shown(value: Any) -> str:
    """A value from the file for an error message: never more than ~64 characters of it."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:60]}..."


def _first_line(text: str, key: str) -> int:
    for n, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*(\[\[?\s*{re.escape(key)}\s*\]\]?|{re.escape(key)}\s*=)", line):
            return n
    return 1


def _parse_san(ld: _Loader, index: int, text: Any) -> x509.GeneralName:
    if not isinstance(text, str):
        raise ld.fail("certificate", index, "sans", f"entries must be strings like 'DNS:host', not {text!r}")
    kind, _, value = text.partition(":")
    try:
        kind_l = kind.strip().lower()
        if kind_l == "dns":
            return x509.DNSName(value)
        if kind_l == "ip":
            return x509.IPAddress(ipaddress.ip_address(value))
        if kind_l == "email":
            return x509.RFC822Name(value)
        if kind_l == "uri":
            return x509.UniformResourceIdentifier(value)
    except ValueError as e:
        raise ld.fail("certificate", index, "sans", f"{text!r}: {e}") from e
    raise ld.fail("certificate", index, "sans", f"{text!r}: use DNS:, IP:, email: or URI:")


def _csr_for(key: Any, subject: x509.Name, sans: tuple[x509.GeneralName, ...]) -> x509.CertificateSigningRequest:
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, alg)


_PROBE_KEYS: dict[str, Any] = {}


def _probe_csr(subject: x509.Name, sans: tuple[x509.GeneralName, ...], key_type: str) -> x509.CertificateSigningRequest:
    """A CSR from a throwaway key, so names meet the same policy a real CSR would.

    RSA probes use one cached 2048-bit key (the caller checks the key type itself).
    """
    probe_type = "rsa-2048" if key_type.startswith("rsa-") else key_type
    if probe_type not in _PROBE_KEYS:
        _PROBE_KEYS[probe_type] = new_software_key(probe_type)
    return _csr_for(_PROBE_KEYS[probe_type], subject, sans)


def _spec_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cert_spec_hash(c: CertSpec) -> str:
    return _spec_hash({"ca": c.ca, "profile": c.profile, "subject": c.subject.rfc4514_string()
                       if c.subject is not None else None,
                       "sans": [str(s.value) for s in c.sans], "key_type": c.key_type,
                       "csr": hashlib.sha256(c.csr_bytes).hexdigest() if c.csr_bytes else None})


# -------------------------------------------------------------------- plan
def plan(authority: Authority | None, spec: PkiSpec) -> Plan:
    """Compare the file with the home; writes nothing."""
    result = Plan()
    store = authority.store if authority is not None else None
    for ca in spec.ordered_cas():
        row = store.get_ca(ca.name) if store else None
        if row is None:
            result.items.append(PlanItem("ca", ca.name, "create",
                                         f"{ca.subject.rfc4514_string()} ({ca.key_type})"))
            continue
        diffs = []
        if row["subject"] != ca.subject.rfc4514_string():
            diffs.append(f"subject {row['subject']!r} in the home, {ca.subject.rfc4514_string()!r} in the file")
        if (row["parent"] or None) != ca.parent:
            diffs.append(f"parent {row['parent']!r} in the home, {ca.parent!r} in the file")
        if row["key_type"] != ca.key_type:
            diffs.append(f"key type {row['key_type']} in the home, {ca.key_type} in the file")
        if ca.path_length is not None and row["path_length"] != ca.path_length:
            diffs.append(f"path length {row['path_length']} in the home, {ca.path_length} in the file")
        result.items.append(PlanItem("ca", ca.name, "drift" if diffs else "exists", "; ".join(diffs)))
    for c in spec.certificates:
        name = str(c.out)
        if store is None:
            result.items.append(PlanItem("certificate", name, "create", f"{c.profile} from CA {c.ca}"))
            continue
        record = store.get_row("bootstrap", "item", c.item)
        if c.csr_bytes is None and record is not None \
                and record["spec_sha256"] != _cert_spec_hash(c):
            result.items.append(PlanItem("certificate", name, "drift",
                                         "subject, SANs, profile or CA changed since it was issued"))
            continue
        existing = _existing_cert(authority, c) if authority is not None else None
        if existing is not None:
            result.items.append(PlanItem("certificate", name, "exists", f"serial {existing['serial']}"))
        else:
            result.items.append(PlanItem("certificate", name, "create", f"{c.profile} from CA {c.ca}"))
    for s in spec.signers:
        row = store.get_row("signers", "label", s.label) if store else None
        if row is None:
            result.items.append(PlanItem("signer", s.label, "create", s.subject.rfc4514_string()))
            continue
        cert = x509.load_pem_x509_certificate(row["pem"].encode())
        diffs = []
        if row["ca"] != s.ca:
            diffs.append(f"CA {row['ca']} in the home, {s.ca} in the file")
        if cert.subject.rfc4514_string() != s.subject.rfc4514_string():
            diffs.append(f"subject {cert.subject.rfc4514_string()!r} in the home")
        result.items.append(PlanItem("signer", s.label, "drift" if diffs else "exists", "; ".join(diffs)))
    return result


def _existing_cert(authority: Authority, c: CertSpec) -> dict[str, Any] | None:
    """The certificate this entry already produced: by its CSR's hash, or by the record."""
    if c.csr_bytes is not None:
        from hsm_ca.policy import csr_sha256, load_csr

        return authority.store.find_certificate(c.ca, c.profile, csr_sha256(load_csr(c.csr_bytes)))
    record = authority.store.get_row("bootstrap", "item", c.item)
    if record is None or not record["ref"] or c.key_out is None or not c.key_out.exists():
        return None
    row = authority.store.get_certificate(record["ref"])
    return row if row is not None and row["status"] == "valid" else None


# ------------------------------------------------------------------- apply
def apply(authority: Authority, spec: PkiSpec,
          progress: Callable[[str], None] | None = None) -> Plan:
    """Create what the plan says is missing; refuse, creating nothing, on any drift."""
    say = progress or (lambda _m: None)
    current = plan(authority, spec)
    if current.drift:
        first = current.drift[0]
        raise PolicyViolation(
            f"{spec.path}: {len(current.drift)} item(s) differ from the home (drift), refusing to "
            f"re-issue; first: {first.kind} {first.name}: {first.detail}"
        )
    _check_profiles(authority, spec, current)
    done = Plan()
    for ca in spec.ordered_cas():
        if authority.store.get_ca(ca.name) is not None:
            done.items.append(PlanItem("ca", ca.name, "exists"))
            continue
        if ca.parent is None:
            authority.create_root(ca.name, ca.subject, key_type=ca.key_type, days=ca.days,
                                  path_length=ca.path_length)
        else:
            authority.create_intermediate(ca.name, ca.parent, ca.subject, key_type=ca.key_type,
                                          days=ca.days, path_length=ca.path_length,
                                          name_constraints=ca.name_constraints)
        say(f"created CA {ca.name}")
        done.items.append(PlanItem("ca", ca.name, "create"))
    for c in spec.certificates:
        action, serial = _apply_certificate(authority, c)
        if action == "create":
            say(f"issued {c.profile} certificate {serial} -> {c.out}")
        done.items.append(PlanItem("certificate", str(c.out), action, f"serial {serial}"))
    from hsm_ca.codesign import new_signer

    for s in spec.signers:
        if authority.store.get_row("signers", "label", s.label) is not None:
            done.items.append(PlanItem("signer", s.label, "exists"))
            continue
        new_signer(authority, s.label, s.ca, s.subject, key_type=s.key_type, days=s.days)
        say(f"created code-signing signer {s.label}")
        done.items.append(PlanItem("signer", s.label, "create"))
    _write_outputs(authority, spec, say)
    return done


def _check_profiles(authority: Authority, spec: PkiSpec, current: Plan) -> None:
    """Judge every profile 'apply' will issue under before it creates anything.

    Loading and planning only read profiles, so an override that widens a
    shipped one without declaring it is found here, not half-way through the
    run (after the CAs were made); the refusal is recorded like any other,
    and a declared widening warns once for the whole run.
    """
    creates = {(i.kind, i.name) for i in current.items if i.action == "create"}
    needed: dict[str, str] = {}  # profile -> the CA that would sign under it
    for ca in spec.ordered_cas():
        if ("ca", ca.name) in creates:
            needed.setdefault("root-ca" if ca.parent is None else "intermediate-ca",
                              ca.parent or ca.name)
    for c in spec.certificates:
        if ("certificate", str(c.out)) in creates:
            needed.setdefault(c.profile, c.ca)
    for s in spec.signers:
        if ("signer", s.label) in creates:
            needed.setdefault("code-signing", s.ca)
    for profile, ca_name in needed.items():
        try:
            authority.profiles.for_issuance(profile)
        except HsmCaError as e:
            authority.audit.append(authority.actor(), "issue", "refused", ca=ca_name,
                                   profile=profile, detail=f"bootstrap {spec.path}: {e}")
            raise


def _apply_certificate(authority: Authority, c: CertSpec) -> tuple[str, str]:
    from hsm_ca.policy import csr_sha256 as csr_hash
    from hsm_ca.policy import load_csr

    if c.csr_bytes is not None:
        csr_bytes = c.csr_bytes
    else:
        assert c.key_out is not None and c.subject is not None
        key = None
        if c.key_out.exists():  # written by an interrupted run: keep the subscriber's key
            from hsm_ca.fileio import KEY_FILE_BYTES, read_regular_file

            try:
                key = serialization.load_pem_private_key(
                    read_regular_file(c.key_out, KEY_FILE_BYTES, "key file"), password=None)
            except (ValueError, TypeError) as e:
                raise HsmCaError(f"{c.key_out} exists but is not a private key we can reuse") from e
        if key is None:
            key = new_software_key(c.key_type)
            c.key_out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(c.key_out, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), 0o600)
        csr_bytes = _csr_for(key, c.subject, c.sans).public_bytes(serialization.Encoding.PEM)
        public = key.public_key()
        del key
    if c.csr_bytes is not None:
        existing = authority.store.find_certificate(c.ca, c.profile, csr_hash(load_csr(csr_bytes)))
    else:  # a fresh CSR from the same key differs (ECDSA is randomised): match the key itself
        existing = _find_by_public_key(authority, c, public)
    if existing is not None:
        pem = existing["pem"]
        serial = existing["serial"]
        action = "exists"
    else:
        issued = authority.ca(c.ca).issue(csr_bytes, c.profile, days=c.days, source=str(c.out))
        pem, serial, action = issued.pem, issued.serial, "create"
    chain = "".join(cert_pem(x) for x in authority.chain(c.ca, include_root=False))
    _write_if_changed(c.out, (pem + chain).encode())
    authority.store.upsert_row("bootstrap", {
        "item": c.item, "kind": "certificate", "spec_sha256": _cert_spec_hash(c), "ref": serial,
        "created": rfc3339(_dt.datetime.now(_dt.UTC)),
    }, "item")
    return action, serial


def _find_by_public_key(authority: Authority, c: CertSpec, public: Any) -> dict[str, Any] | None:
    for row in reversed(authority.store.list_certificates(c.ca)):
        if row["profile"] != c.profile or row["status"] != "valid":
            continue
        if x509.load_pem_x509_certificate(row["pem"].encode()).public_key() == public:
            return row
    return None


def _write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write unless a regular file of the same bytes is there (never reads a device or FIFO)."""
    import stat

    from hsm_ca.fileio import OutputFile, read_regular_file

    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode) and st.st_size == len(data) \
                and read_regular_file(path, len(data)) == data:
            return False
    except (OSError, HsmCaError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    OutputFile(path, mode).write(
        data, done="what was created is kept; run the bootstrap again once it can be written")
    return True


def _write_outputs(authority: Authority, spec: PkiSpec, say: Callable[[str], None]) -> None:
    out = spec.output
    names = [c.name for c in spec.cas]
    if out.chains is not None:
        for name in names:
            pem = "".join(cert_pem(c) for c in authority.chain(name))
            if _write_if_changed(out.chains / f"{name}-chain.pem", pem.encode()):
                say(f"wrote {out.chains / f'{name}-chain.pem'}")
    if out.crls is not None:
        from hsm_ca.revocation import current_crl

        for name in names:
            der = current_crl(authority, name)
            pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
            if _write_if_changed(out.crls / f"{name}.crl", pem):
                say(f"wrote {out.crls / f'{name}.crl'}")
    if out.trust_bundle is not None:
        roots = [c for c in authority.list_cas() if c.parent is None and c.name in names]
        pem = "".join(cert_pem(c.certificate) for c in roots)
        if _write_if_changed(out.trust_bundle, pem.encode()):
            say(f"wrote {out.trust_bundle}")


__all__ = ["BootstrapError", "Plan", "PlanItem", "PkiSpec", "apply", "load_spec", "plan"]
