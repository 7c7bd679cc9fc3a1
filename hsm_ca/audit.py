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
from collections.abc import Iterator
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


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: record.get(k) for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()


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
        raw = self.store.get_meta("audit_head")
        if raw is None:
            return 0, GENESIS
        head = json.loads(raw)
        return int(head["seq"]), str(head["chain"])

    def append(self, actor: Actor, action: str, outcome: str, **fields: Any) -> int:
        """Append one record inside the caller's transaction (opened here if none)."""
        with self.store.transaction():
            seq, prev = self._head()
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
            self.store.set_meta(
                "audit_head", json.dumps({"seq": record["seq"], "chain": record["chain"]})
            )
            return int(record["seq"])

    def records(self, since: int = 0) -> Iterator[dict[str, Any]]:
        yield from self.store.db["audit"].rows_where("seq > ?", [since], order_by="seq")

    def verify(self) -> AuditReport:
        """Walk the chain, then cross-check certificates against their issued records."""
        prev = GENESIS
        expected_seq = 1
        count = 0
        issued: dict[str, str] = {}
        max_generation = 0
        for row in self.store.conn.execute(
            f"SELECT {', '.join(FIELDS)}, chain FROM audit ORDER BY rowid"
        ):
            record = dict(zip((*FIELDS, "chain"), row, strict=True))
            seq = record["seq"]
            if seq != expected_seq:
                what = "removed" if seq > expected_seq else "reordered or duplicated"
                return AuditReport(
                    False, count, expected_seq,
                    f"audit record {expected_seq} is missing ({what}); found {seq} in its place",
                )
            if chain_value(prev, record) != record["chain"]:
                return AuditReport(
                    False, count, seq,
                    f"audit record {seq} was altered (its chain value does not match its content)",
                )
            if record["detail"] and "generation=" in record["detail"]:
                m = _GENERATION.search(record["detail"])
                if m:
                    max_generation = max(max_generation, int(m.group(1)))
            if record["action"] == "issue" and record["outcome"] == "issued" and record["serial"]:
                issued[record["serial"]] = record["object_sha256"]
            prev = record["chain"]
            expected_seq += 1
            count += 1
        head_seq, head_chain = self._head()
        if head_seq != count or (count and head_chain != prev):
            return AuditReport(
                False, count, min(head_seq, count) + 1 if head_seq > count else head_seq,
                f"audit trail ends at record {count} but its recorded head is record {head_seq}: "
                "records were removed from the end",
            )
        cert_sha: dict[str, str] = {}
        for cert in self.store.iter_certificates():
            from hsm_ca.x509util import pem_sha256  # local: keeps audit import-light

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
        if recorded is not None and int(recorded) < max_generation:
            return AuditReport(
                False, count, None,
                f"the store's keystore generation ({recorded}) is lower than the trail's "
                f"({max_generation}): it was edited to hide a keystore rollback",
            )
        report = AuditReport(True, count)
        intents = self.store.serials_in_state("intent")
        if intents:
            report.notes.append(
                f"{len(intents)} serial(s) reserved by an intent record with no certificate "
                f"(an interrupted signing; never reused): "
                + ", ".join(r["serial"] for r in intents[:10])
            )
        return report
