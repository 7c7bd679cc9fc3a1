"""The hash-chained audit trail, kept in the CA database itself.

Each record's ``chain`` is SHA-256(previous chain || canonical JSON of the
record), so editing, deleting or reordering any record breaks every chain
value after it. Records are appended inside the caller's transaction: an
*issued* record commits atomically with the certificate it describes, which is
what lets ``verify`` cross-check certificates against the trail.
"""

from __future__ import annotations

import base64
import datetime as _dt
import getpass
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hsm_ca.store import Store

GENESIS = "0" * 64
TRAIL_META = "audit_trail_id"
# the audit signer's certificate names the trail it signs for in this subject attribute
TRAIL_ATTRIBUTE_PREFIX = "hsm-ca-audit-trail:"
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
            record, prev = self._new_record(actor, action, outcome, fields)
            return self._insert(record, prev)

    def append_checkpoint(
        self, actor: Actor, *, key_label: str, trail: str, reason: str,
        sign: Callable[[bytes], bytes],
    ) -> int:
        """Append a checkpoint record whose signature covers its own position and content.

        The signed payload names the record's own sequence number, the chain
        value of the record just before it (which commits to all earlier
        records), the trail's identity and every other field of the
        checkpoint record itself, so a genuine checkpoint copied anywhere
        else - later in the same trail, into a truncated or re-chained trail,
        or into another home's trail - no longer verifies.
        """
        with self.store.transaction():
            record, prev = self._new_record(actor, "checkpoint", "signed", {"key_label": key_label})
            info = {"v": CHECKPOINT_VERSION, "trail": trail, "seq": record["seq"] - 1,
                    "chain": prev, "reason": reason}
            signature = sign(checkpoint_payload_v2(record, info))
            info["signature"] = base64.b64encode(signature).decode()
            record["detail"] = json.dumps(info, sort_keys=True)
            return self._insert(record, prev)

    def _new_record(self, actor: Actor, action: str, outcome: str,
                    fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
        tx = self.store.tx_state
        seq, prev = tx["audit_head"] if "audit_head" in tx else self._head()
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown audit fields {sorted(unknown)}")
        record: dict[str, Any] = {k: None for k in FIELDS}
        record.update(fields)
        record.update(
            seq=seq + 1,
            time=utc_now(),
            os_user=actor.os_user,
            hsm_user=actor.hsm_user,
            action=action,
            outcome=outcome,
        )
        return record, prev

    def _insert(self, record: dict[str, Any], prev: str) -> int:
        record["chain"] = chain_value(prev, record)
        self.store.conn.execute(
            f"INSERT INTO audit({', '.join(FIELDS)}, chain) "
            f"VALUES({', '.join('?' for _ in FIELDS)}, ?)",
            [record[k] for k in FIELDS] + [record["chain"]],
        )
        self.store.tx_state["audit_head"] = (record["seq"], record["chain"])
        self.store.before_commit("audit_head", self._write_head)
        return int(record["seq"])

    def _write_head(self) -> None:
        seq, chain = self.store.tx_state["audit_head"]
        self.store.set_meta("audit_head", json.dumps({"seq": seq, "chain": chain}))

    def records(self, since: int = 0, until: int | None = None) -> Iterator[dict[str, Any]]:
        """Records after ``since`` up to and including ``until`` (all, without it)."""
        if until is None:
            yield from self.store.db["audit"].rows_where("seq > ?", [since], order_by="seq")
        else:
            yield from self.store.db["audit"].rows_where("seq > ? AND seq <= ?", [since, until],
                                                         order_by="seq")

    def verify(self, trust_key: Any = None, *, trail: str | None = None,
               anchors: dict[int, str] | None = None) -> AuditReport:
        """Walk the chain and checkpoints, then cross-check certificates against issued records.

        ``trust_key`` is the audit signing key's public key from a certificate
        the verifier trusts; without it the certificate stored in the home is
        used (which someone able to rewrite the database could replace).
        ``trail`` is the trail id the checkpoints must name (from that
        certificate; else the home's own), ``anchors`` as in ``walk_records``.
        """
        from hsm_ca.trailstate import TrailTally  # local: trailstate imports this module

        rows = (dict(zip((*FIELDS, "chain"), row, strict=True)) for row in self.store.conn.execute(
            f"SELECT {', '.join(FIELDS)}, chain FROM audit ORDER BY rowid"))
        if trust_key is None:
            trust_key = self.stored_checkpoint_key()
        tally = TrailTally()
        walk = walk_records(rows, trust_key, trail=trail or self.store.get_meta(TRAIL_META),
                            anchors=anchors, visit=tally.visit)
        if not walk.report.ok:
            return walk.report
        count, prev = walk.report.records, walk.last_chain
        head_seq, head_chain = self._head()
        if head_seq != count or (count and head_chain != prev):
            return AuditReport(
                False, count, min(head_seq, count) + 1 if head_seq > count else head_seq,
                f"audit trail ends at record {count} but its recorded head is record {head_seq}: "
                "records were removed from the end" if head_seq != count else
                f"the recorded head of the audit trail (record {head_seq}) names another chain "
                "value than the trail's last record: the trail was rewritten",
            )
        problem, checked = tally.check_database(self.store)
        if problem is not None:
            return AuditReport(False, count, None, problem)
        recorded = self.store.get_meta("hsm_generation")
        if recorded is not None and int(recorded) < walk.max_generation:
            return AuditReport(
                False, count, None,
                f"the store's keystore generation ({recorded}) is lower than the trail's "
                f"({walk.max_generation}): it was edited to hide a keystore rollback",
            )
        report = walk.report
        report.notes.append(
            f"{checked} certificate(s) match the trail's records (digest, status, revocation) "
            "and verify with their CA's key")
        intents = self.store.serials_in_state("intent")
        if intents:
            report.notes.append(
                f"{len(intents)} serial(s) reserved by an intent record with no certificate "
                f"(an interrupted signing; never reused): "
                + ", ".join(r["serial"] for r in intents[:10])
            )
        return report

    def chain_of(self, seq: int) -> str:
        """The chain value of record ``seq`` (what an anchor notes)."""
        row = self.store.conn.execute("SELECT chain FROM audit WHERE seq=?", (seq,)).fetchone()
        if row is None:
            from hsm_ca.errors import NotFound

            raise NotFound(f"no audit record {seq}")
        return str(row[0])

    def trail_id(self) -> str:
        """This home's audit trail id (made on first use), signed into every checkpoint."""
        trail = self.store.get_meta(TRAIL_META)
        if trail is None:
            import secrets

            with self.store.transaction():  # under the write lock: one id, whoever comes first
                trail = self.store.get_meta(TRAIL_META)
                if trail is None:
                    trail = secrets.token_hex(16)
                    self.store.set_meta(TRAIL_META, trail)
        return trail

    def stored_checkpoint_key(self) -> Any:
        pem = self.store.get_meta("audit_cert")
        if not pem:
            return None
        from cryptography import x509

        return x509.load_pem_x509_certificate(pem.encode()).public_key()

    def last_checkpoint(self) -> int:
        return int(self.store.get_meta("audit_checkpoint") or 0)


CHECKPOINT_VERSION = 2
_RECORD_KEYS = frozenset((*FIELDS, "chain"))
_TEXT_FIELDS = tuple(k for k in FIELDS if k != "seq")


def trail_of_certificate(cert: Any) -> str | None:
    """The trail id an audit signer's certificate was made for (None for older certificates)."""
    from cryptography.x509.oid import NameOID

    for attr in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        value = str(attr.value)
        if value.startswith(TRAIL_ATTRIBUTE_PREFIX):
            return value[len(TRAIL_ATTRIBUTE_PREFIX):]
    return None


def checkpoint_payload(seq: int, chain: str) -> bytes:
    """What a version-1 checkpoint signed: only a chain head (kept to verify old trails).

    It did not name its own position, so a copy of it placed later in a trail
    still verified; version-1 checkpoints are now accepted only directly after
    the record they sign, where the code that wrote them always put them.
    """
    return json.dumps({"type": "hsm-ca-audit-checkpoint", "seq": seq, "chain": chain},
                      sort_keys=True, separators=(",", ":")).encode()


def checkpoint_payload_v2(record: dict[str, Any], info: dict[str, Any]) -> bytes:
    """What a checkpoint signs: every field of its own record and its claim, all but the signature.

    The record's ``seq`` is the checkpoint's own position, ``info["seq"]`` and
    ``info["chain"]`` the record just before it and that record's chain value
    (which commits to the whole history), ``info["trail"]`` the home's trail id.
    """
    return json.dumps(
        {"type": "hsm-ca-audit-checkpoint", "v": CHECKPOINT_VERSION,
         "record": {k: record.get(k) for k in FIELDS if k != "detail"},
         "checkpoint": {k: v for k, v in info.items() if k != "signature"}},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class Walk:
    report: AuditReport
    last_chain: str = GENESIS
    issued: dict[str, str] = field(default_factory=dict)
    max_generation: int = 0
    last_checkpoint: int = 0
    last_checkpoint_time: str | None = None
    last_checkpoint_info: dict[str, Any] = field(default_factory=dict)
    trail: str | None = None
    last_seq: int = 0


def verify_signature(key: Any, signature: bytes, data: bytes) -> str | None:
    """None if ``signature`` over ``data`` verifies with ``key`` (the audit key's algorithms)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            return "the trusted key is of an unsupported type"
    except InvalidSignature:
        return "its signature does not verify with the audit key"
    return None


def _verify_checkpoint(key: Any, record: dict[str, Any], prev_chain: str,
                       walk: Walk) -> str | None:
    """None if the checkpoint signs exactly the record before it, in this trail, with ``key``."""
    try:
        info = json.loads(record["detail"] or "")
        if not isinstance(info, dict):
            raise TypeError
        version = info.get("v", 1)
        seq, chain = info["seq"], info["chain"]
        sig = base64.b64decode(info["signature"], validate=True)
        if type(seq) is not int or not isinstance(chain, str) or version not in (1, 2):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return "its content is malformed"
    if seq != record["seq"] - 1:
        return (f"it signs record {seq} but stands at record {record['seq']} "
                "(a checkpoint signs the record just before it: it was copied or moved)")
    if chain != prev_chain:
        return f"it signs a chain value that record {seq} does not have"
    if version == 1:
        # pinned to its place by the two checks above; a home upgraded from an older
        # version has these before its first version-2 checkpoint, and one run again
        # by older code writes them after: neither is a forgery
        data = checkpoint_payload(seq, chain)
    else:
        trail = info.get("trail")
        if not isinstance(trail, str) or not trail:
            return "its content is malformed"
        if walk.trail is not None and trail != walk.trail:
            return f"it belongs to audit trail {trail[:32]}, not to trail {walk.trail[:32]}"
        walk.trail = trail
        data = checkpoint_payload_v2(record, info)
    problem = None if key is None else verify_signature(key, sig, data)
    if problem is None:
        walk.last_checkpoint_info = dict(info, v=version)
    return problem


def _shape_problem(record: Any) -> str | None:
    """Why ``record`` is not an audit record (exports are hostile input), or None."""
    if not isinstance(record, dict):
        return "is not an audit record (not a JSON object)"
    if set(record) != _RECORD_KEYS:
        extra = sorted(set(record) - _RECORD_KEYS)[:3]
        missing = sorted(_RECORD_KEYS - set(record))[:3]
        return f"is not an audit record (missing {missing}, unexpected {extra})"
    if type(record["seq"]) is not int:
        return "is not an audit record (seq is not an integer)"
    for k in (*_TEXT_FIELDS, "chain"):
        if record[k] is not None and not isinstance(record[k], str):
            return f"is not an audit record ({k} is not text)"
    if not isinstance(record["chain"], str) or not record["action"] or not record["outcome"]:
        return "is not an audit record (chain, action or outcome missing)"
    return None


def walk_records(
    records: Iterable[Any], checkpoint_key: Any = None, *, trail: str | None = None,
    anchors: dict[int, str] | None = None, start: tuple[int, str] = (0, GENESIS),
    visit: Callable[[dict[str, Any]], None] | None = None,
) -> Walk:
    """Check shape, sequence, chain values and signed checkpoints of records in order.

    ``trail`` is the trail id every version-2 checkpoint must carry (from the
    trusted audit certificate or the home; without it, the first one's id binds
    the rest); ``anchors`` maps sequence numbers to chain
    values the verifier saw before (a checkpoint noted off the host), which
    catches a trail cut back to an older checkpoint. ``start`` is the record
    number and chain value the records continue from (the genesis by default):
    a walk of a trail's tail proves the tail's records only as far as a signed
    checkpoint in it, whose signature covers the chain value it continued from.
    ``visit`` sees each record once its chain value has been checked.
    """
    walk = Walk(AuditReport(True, 0), trail=trail)
    prev = start[1]
    expected_seq = start[0] + 1
    count = 0
    checkpoints = 0
    anchors = dict(anchors or {})

    def fail(seq: int | None, problem: str) -> Walk:
        walk.report = AuditReport(False, count, seq, problem)
        return walk

    for record in records:
        shape = _shape_problem(record)
        if shape is not None:
            return fail(expected_seq, f"audit record {expected_seq} {shape}")
        seq = record["seq"]
        if seq != expected_seq:
            what = "removed" if seq > expected_seq else "reordered or duplicated"
            return fail(expected_seq,
                        f"audit record {expected_seq} is missing ({what}); found {seq} in its place")
        if chain_value(prev, record) != record["chain"]:
            return fail(seq, f"audit record {seq} was altered (its chain value does not match its content)")
        detail = record["detail"] or ""
        if "generation=" in detail and (m := _GENERATION.search(detail)):
            walk.max_generation = max(walk.max_generation, int(m.group(1)))
        if record["action"] == "issue" and record["outcome"] == "issued" and record["serial"]:
            walk.issued[record["serial"]] = record["object_sha256"]
        if record["action"] == "checkpoint":
            problem = _verify_checkpoint(checkpoint_key, record, prev, walk)
            if problem is not None:
                return fail(seq, f"audit checkpoint {seq} is forged: {problem}")
            walk.last_checkpoint = seq
            walk.last_checkpoint_time = record["time"]
            checkpoints += 1
        if visit is not None:
            visit(record)
        if seq in anchors and anchors.pop(seq) != record["chain"]:
            return fail(seq, f"audit record {seq} differs from the anchor given for it "
                             "(the history before it was rewritten)")
        prev = record["chain"]
        expected_seq += 1
        count += 1
    walk.last_chain = prev
    walk.last_seq = expected_seq - 1
    if anchors:
        first = min(anchors)
        return fail(count + 1, f"the trail ends at record {count}, before anchor record {first}: "
                               "it was cut back")
    walk.report = AuditReport(True, count)
    if checkpoints:
        signed = "signed and verified" if checkpoint_key is not None else "present (no audit key to check them)"
        walk.report.notes.append(f"{checkpoints} checkpoint(s) {signed}; the last at record "
                                 f"{walk.last_checkpoint} ({walk.last_checkpoint_time})")
    if count > walk.last_checkpoint:
        walk.report.notes.append(f"{count - walk.last_checkpoint} record(s) after the last signed "
                                 "checkpoint are protected by the chain only")
    return walk


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:CHAIN`` as printed by ``audit checkpoint``, checked for form."""
    seq_text, _, chain = text.partition(":")
    if not seq_text.isdigit() or len(seq_text) > 18 or int(seq_text) < 1 \
            or not re.fullmatch(r"[0-9a-f]{64}", chain):
        raise ValueError("an anchor is SEQ:CHAIN, the record number and its 64-hex chain value")
    return int(seq_text), chain


EXPORT_REASON = "export"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook: a repeated key is refused (readers disagree on which one counts)."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise ValueError(f"the key {key[:32]!r} appears twice")
        record[key] = value
    return record


def verify_export(lines: Iterable[str], trust_key: Any, *, trail: str | None = None,
                  anchors: dict[int, str] | None = None) -> AuditReport:
    """Offline verification of an exported trail (JSON Lines) against a trusted audit key.

    An export must end with the signed checkpoint that ``audit export`` made
    for it (version 2, reason "export"): records after the last checkpoint
    could have been cut off without trace, and an export cut back to an
    earlier periodic or CRL checkpoint would otherwise look whole. Problems
    name the line of the file, since an export is read by people with a pager.
    """
    where = {"line": 0}
    problems: dict[int, str] = {}

    def records() -> Iterator[Any]:
        for n, line in enumerate(lines, start=1):
            where["line"] = n
            if line.strip():
                try:
                    yield json.loads(line, object_pairs_hook=_no_duplicate_keys)
                except RecursionError:
                    problems[n] = "is nested too deeply to be an audit record"
                    yield None
                except ValueError as e:
                    problems[n] = f"is not an audit record ({str(e)[:80]})"
                    yield None

    walk = walk_records(records(), trust_key, trail=trail, anchors=anchors)
    line = where["line"]
    if not walk.report.ok:
        report = walk.report
        detail = problems.get(line)
        if detail is not None and report.first_bad_seq is not None:
            report.problem = f"audit record {report.first_bad_seq} {detail}"
        report.problem = f"line {line}: {report.problem}"
        return report
    count = walk.report.records
    if walk.last_checkpoint == 0:
        return AuditReport(False, count, None, "the export holds no signed checkpoint to anchor it")
    if count > walk.last_checkpoint:
        return AuditReport(
            False, count, walk.last_checkpoint + 1,
            f"records after the last signed checkpoint ({walk.last_checkpoint}) are unsigned: "
            "the export was cut or extended after it was made (or made without a PIN or "
            "with --no-checkpoint)",
        )
    info = walk.last_checkpoint_info
    if info.get("v") != CHECKPOINT_VERSION:
        return AuditReport(
            False, count, None,
            "the export ends with a version-1 checkpoint, which does not sign that it was made "
            "for an export, so a cut back to it cannot be told apart: export it again",
        )
    if info.get("reason") != EXPORT_REASON:
        return AuditReport(
            False, count, None,
            f"the export ends with a {str(info.get('reason'))[:64]!r} checkpoint, not with an "
            "export checkpoint: it was made without a PIN or with --no-checkpoint, or cut back "
            "to an earlier checkpoint",
        )
    walk.report.notes.append(f"the export was made at {walk.last_checkpoint_time} "
                             f"(its checkpoint, record {walk.last_checkpoint}, is signed)")
    return walk.report
