"""The hash-chained audit trail, kept in the CA database itself.

Each record's ``chain`` is SHA-256(previous chain || canonical JSON of the
record), so editing, deleting or reordering any record breaks every chain
value after it. Records are appended inside the caller's transaction: an
*issued* record commits atomically with the certificate it describes, which is
what lets ``verify`` cross-check certificates against the trail.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hsm_ca.store import Store

GENESIS = "0" * 64
_GENERATION = re.compile(r"generation=(\d+)")
FIELDS = (
    "seq",
    "time",
    "os_user",
    "hsm_user",
    "action",
    "ca",
    "key_label",
    "profile",
    "serial",
    "subject",
    "csr_sha256",
    "object_sha256",
    "outcome",
    "detail",
)


_SORTED_FIELDS = tuple(sorted(FIELDS))
# one encoder for every record (json.dumps with options builds a new one per call);
# keys go in sorted order, so the output equals json.dumps(..., sort_keys=True)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _canonical(record: dict[str, Any]) -> bytes:
    return _ENCODER.encode({k: record.get(k) for k in _SORTED_FIELDS}).encode()


def chain_value(prev: str, record: dict[str, Any]) -> str:
    """SHA-256 over the previous chain value and this record's canonical JSON."""
    return hashlib.sha256(bytes.fromhex(prev) + _canonical(record)).hexdigest()


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Actor:
    """Who asked: the OS account and the HSM user it acted as."""

    os_user: str
    hsm_user: str | None = None


@dataclass
class AuditReport:
    """Outcome of walking the trail."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "notes": self.notes,
        }


class AuditLog:
    """Appends to and verifies the chain; must be given the store it lives in."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _head(self) -> tuple[int, str]:
        if "audit_head" in self.store.tx_state:
            return self.store.tx_state["audit_head"]  # type: ignore[no-any-return]
        raw = self.store.get_meta("audit_head")
        if raw is None:
            return 0, GENESIS
        head = json.loads(raw)
        return int(head["seq"]), str(head["chain"])

    def append(self, actor: Actor, action: str, outcome: str, **fields: Any) -> int:
        """Append one record inside the caller's transaction (opened here if none).

        The head is read once per transaction and written once, just before the
        commit: a batch of a thousand records costs one read and one write of it.
        """
        with self.store.transaction():
            tx = self.store.tx_state
            seq, prev = tx["audit_head"] if "audit_head" in tx else self._head()
            record: dict[str, Any] = {k: None for k in FIELDS}
            unknown = set(fields) - set(FIELDS)
            if unknown:
                raise ValueError(f"unknown audit fields {sorted(unknown)}")
            record.update(fields)
            record.update(
                seq=seq + 1,
                time=utc_now(),
                os_user=actor.os_user,
                hsm_user=actor.hsm_user,
                action=action,
                outcome=outcome,
            )
            record["chain"] = chain_value(prev, record)
            self.store.conn.execute(
                f"INSERT INTO audit({', '.join(FIELDS)}, chain) "
                f"VALUES({', '.join('?' for _ in FIELDS)}, ?)",
                [record[k] for k in FIELDS] + [record["chain"]],
            )
            tx["audit_head"] = (record["seq"], record["chain"])
            self.store.before_commit("audit_head", self._write_head)
            return int(record["seq"])

    def _write_head(self) -> None:
        seq, chain = self.store.tx_state["audit_head"]
        self.store.set_meta("audit_head", json.dumps({"seq": seq, "chain": chain}))

    def records(self, since: int = 0) -> Iterator[dict[str, Any]]:
        yield from self.store.db["audit"].rows_where("seq > ?", [since], order_by="seq")

    def verify(self, trust_key: Any = None) -> AuditReport:
        """Walk the chain and checkpoints, then cross-check certificates against issued records.

        ``trust_key`` is the audit signing key's public key from a certificate
        the verifier trusts; without it the certificate stored in the home is
        used (which someone able to rewrite the database could replace).
        """
        rows = (dict(zip((*FIELDS, "chain"), row, strict=True)) for row in self.store.conn.execute(
            f"SELECT {', '.join(FIELDS)}, chain FROM audit ORDER BY rowid"))
        if trust_key is None:
            trust_key = self.stored_checkpoint_key()
        walk = walk_records(rows, trust_key)
        if not walk.report.ok:
            return walk.report
        count, prev, issued = walk.report.records, walk.last_chain, walk.issued
        head_seq, head_chain = self._head()
        if head_seq != count or (count and head_chain != prev):
            return AuditReport(
                False, count, min(head_seq, count) + 1 if head_seq > count else head_seq,
                f"audit trail ends at record {count} but its recorded head is record {head_seq}: "
                "records were removed from the end",
            )
        cert_sha: dict[str, str] = {}
        from hsm_ca.x509util import pem_sha256  # local: keeps audit import-light

        for cert in self.store.iter_certificates():
            actual = pem_sha256(cert["pem"])
            if actual != cert["sha256"]:
                return AuditReport(
                    False, count, None,
                    f"certificate {cert['serial']} was altered in the database",
                )
            cert_sha[cert["serial"]] = actual
            if issued.get(cert["serial"]) != actual:
                return AuditReport(
                    False, count, None,
                    f"certificate {cert['serial']} has no matching 'issued' audit record",
                )
        for serial in issued:
            if serial not in cert_sha:
                return AuditReport(
                    False, count, None,
                    f"audit records certificate {serial} as issued but the database has no such certificate",
                )
        recorded = self.store.get_meta("hsm_generation")
        if recorded is not None and int(recorded) < walk.max_generation:
            return AuditReport(
                False, count, None,
                f"the store's keystore generation ({recorded}) is lower than the trail's "
                f"({walk.max_generation}): it was edited to hide a keystore rollback",
            )
        report = walk.report
        intents = self.store.serials_in_state("intent")
        if intents:
            report.notes.append(
                f"{len(intents)} serial(s) reserved by an intent record with no certificate "
                f"(an interrupted signing; never reused): "
                + ", ".join(r["serial"] for r in intents[:10])
            )
        return report

    def stored_checkpoint_key(self) -> Any:
        pem = self.store.get_meta("audit_cert")
        if not pem:
            return None
        from cryptography import x509

        return x509.load_pem_x509_certificate(pem.encode()).public_key()

    def last_checkpoint(self) -> int:
        return int(self.store.get_meta("audit_checkpoint") or 0)


def checkpoint_payload(seq: int, chain: str) -> bytes:
    """What a checkpoint signs: the chain head, in a form no record can be confused with."""
    return json.dumps({"type": "hsm-ca-audit-checkpoint", "seq": seq, "chain": chain},
                      sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Walk:
    report: AuditReport
    last_chain: str = GENESIS
    issued: dict[str, str] = field(default_factory=dict)
    max_generation: int = 0
    last_checkpoint: int = 0


def _verify_checkpoint(key: Any, record: dict[str, Any], chains: dict[int, str]) -> str | None:
    """None if the checkpoint's signature covers a chain value the trail really has."""
    import base64

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        info = json.loads(record["detail"] or "")
        seq, chain, sig = int(info["seq"]), str(info["chain"]), base64.b64decode(info["signature"])
    except (ValueError, KeyError, TypeError):
        return "its content is malformed"
    if chains.get(seq) != chain:
        return f"it signs a chain value that record {seq} does not have"
    if key is None:
        return None
    data = checkpoint_payload(seq, chain)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            return "the trusted key is of an unsupported type"
    except InvalidSignature:
        return "its signature does not verify with the audit key"
    return None


def walk_records(records: Iterable[dict[str, Any]], checkpoint_key: Any = None) -> Walk:
    """Check sequence, chain values and signed checkpoints of records in order."""
    walk = Walk(AuditReport(True, 0))
    prev = GENESIS
    expected_seq = 1
    count = 0
    chains: dict[int, str] = {}
    checkpoints = 0
    for record in records:
        seq = record.get("seq")
        if seq != expected_seq:
            what = "removed" if isinstance(seq, int) and seq > expected_seq else "reordered or duplicated"
            walk.report = AuditReport(
                False, count, expected_seq,
                f"audit record {expected_seq} is missing ({what}); found {seq} in its place",
            )
            return walk
        if chain_value(prev, record) != record.get("chain"):
            walk.report = AuditReport(
                False, count, seq,
                f"audit record {seq} was altered (its chain value does not match its content)",
            )
            return walk
        detail = record.get("detail") or ""
        if "generation=" in detail and (m := _GENERATION.search(detail)):
            walk.max_generation = max(walk.max_generation, int(m.group(1)))
        if record["action"] == "issue" and record["outcome"] == "issued" and record["serial"]:
            walk.issued[record["serial"]] = record["object_sha256"]
        if record["action"] == "checkpoint":
            problem = _verify_checkpoint(checkpoint_key, record, chains)
            if problem is not None:
                walk.report = AuditReport(False, count, seq, f"audit checkpoint {seq} is forged: {problem}")
                return walk
            walk.last_checkpoint = seq
            checkpoints += 1
        chains[seq] = record["chain"]
        prev = record["chain"]
        expected_seq += 1
        count += 1
    walk.last_chain = prev
    walk.report = AuditReport(True, count)
    if checkpoints:
        signed = "signed and verified" if checkpoint_key is not None else "present (no audit key to check them)"
        walk.report.notes.append(f"{checkpoints} checkpoint(s) {signed}; the last at record "
                                 f"{walk.last_checkpoint}")
    if count > walk.last_checkpoint:
        walk.report.notes.append(f"{count - walk.last_checkpoint} record(s) after the last signed "
                                 "checkpoint are protected by the chain only")
    return walk


def verify_export(lines: Iterable[str], trust_key: Any) -> AuditReport:
    """Offline verification of an exported trail (JSON Lines) against a trusted audit key.

    An export must end with a signed checkpoint: records after the last one
    could have been cut off without trace, so they fail the check.
    """
    def records() -> Iterator[dict[str, Any]]:
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    yield {"seq": f"unparsable line {n}"}

    walk = walk_records(records(), trust_key)
    if not walk.report.ok:
        return walk.report
    if walk.last_checkpoint == 0:
        return AuditReport(False, walk.report.records, None,
                           "the export holds no signed checkpoint to anchor it")
    if walk.report.records > walk.last_checkpoint:
        return AuditReport(
            False, walk.report.records, walk.last_checkpoint + 1,
            f"records after the last signed checkpoint ({walk.last_checkpoint}) are unsigned: "
            "the export was cut or extended after it was made",
        )
    return walk.report
