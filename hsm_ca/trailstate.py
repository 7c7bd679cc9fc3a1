"""Certificate state as the audit trail says it is, and the database checked against it.

The certificate table is what CRLs, OCSP, the time-stamping authority and code
signing read, and anyone with write access to the database can edit it. The
audit trail cannot be edited unseen up to its last signed checkpoint, and every
change of a certificate's state is recorded in it (an *issued* record, a
*revoked* record). So the trail is the truth and the table a copy: before the
HSM signs anything that vouches for a certificate's state, the rows it is built
from are compared with what the trail says.

Walking a whole trail on every CRL would cost time in proportion to the CA's
history. Each CRL's *intent* record therefore carries a digest of the CA's
revoked rows as verified at that moment (``revoked=COUNT:SHA256``). The next
check starts from the newest such record that a later checkpoint signs (the
checkpoint's signature covers every record before it), walks only the records
after it, and proves that today's revoked rows are exactly that digest's rows
plus the revocations recorded since. A home with no such record yet is walked
from its first record.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hsm_ca.audit import FIELDS, GENESIS, TRAIL_META, walk_records
from hsm_ca.errors import Tampered

if TYPE_CHECKING:
    from cryptography import x509

    from hsm_ca.store import Store

# how far before its record's time a revocation made by older code may be dated (those
# records did not carry the revocation time; it was taken just before the write lock)
_LEGACY_WINDOW = _dt.timedelta(minutes=5)
_DIGEST = re.compile(r"(?:^|[ ;])revoked=(\d+):([0-9a-f]{64})(?:$|[ ;])")
_TOKEN = re.compile(r"(\w+)=(\S+)")
_SELECT = f"SELECT {', '.join(FIELDS)}, chain FROM audit WHERE seq > ? ORDER BY seq"


@dataclass(frozen=True)
class Revocation:
    """What a *revoked* record says: when, why, and the invalidity date if one was given.

    ``revoked_at`` is None for records written before the time was recorded in
    them; ``recorded`` is the record's own time, which bounds it.
    """

    ca: str | None
    revoked_at: str | None
    reason: str
    invalidity_date: str | None
    recorded: str

    def agrees(self, revoked_at: str | None, reason: str | None,
               invalidity_date: str | None) -> bool:
        """Whether a row's revocation fields say what this record says."""
        if reason != self.reason or invalidity_date != self.invalidity_date or revoked_at is None:
            return False
        if self.revoked_at is not None:
            return revoked_at == self.revoked_at
        try:
            when = _dt.datetime.fromisoformat(revoked_at)
            recorded = _dt.datetime.fromisoformat(self.recorded)
        except ValueError:
            return False
        return recorded - _LEGACY_WINDOW <= when <= recorded


def revocation_detail(reason: str, revoked_at: str, invalidity_date: str | None) -> str:
    """The detail of a *revoked* record: everything a CRL entry or OCSP answer carries."""
    return (f"reason={reason} revoked_at={revoked_at}"
            + (f" invalidity_date={invalidity_date}" if invalidity_date else ""))


def revocation_of(record: dict[str, Any]) -> Revocation | None:
    """The revocation a record makes, or None if it makes none."""
    if record["action"] != "revoke" or record["outcome"] != "revoked" or not record["serial"]:
        return None
    tokens = dict(_TOKEN.findall(record["detail"] or ""))
    return Revocation(record["ca"], tokens.get("revoked_at"), tokens.get("reason", "unspecified"),
                      tokens.get("invalidity_date"), record["time"])


def digest_text(count: int, digest: str) -> str:
    return f"revoked={count}:{digest}"


def revoked_digest(rows: Iterable[tuple[str, str, str, str | None]]) -> tuple[int, str]:
    """(count, SHA-256) of revoked rows in serial order, as a CRL intent record carries it."""
    lines = [f"{s} {t} {r} {i or '-'}" for s, t, r, i in rows]
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass
class TrailTally:
    """What a walked stretch of the trail did to certificates."""

    issued: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    revoked: dict[str, Revocation] = field(default_factory=dict)
    checkpoints: int = 0

    def visit(self, record: dict[str, Any]) -> None:
        action = record["action"]
        if action == "issue" and record["outcome"] == "issued" and record["serial"]:
            self.issued[record["serial"]] = (record["ca"], record["object_sha256"])
        elif action == "revoke":
            rev = revocation_of(record)
            if rev is not None:
                self.revoked[record["serial"]] = rev
        elif action == "checkpoint":
            self.checkpoints += 1

    def check_database(self, store: Store) -> tuple[str | None, int]:
        """Every certificate row against a whole trail's records: (problem or None, rows checked).

        What ``audit verify`` proves about the database: each row's digest, CA,
        status, revocation time, reason and invalidity date are what the trail
        recorded, each certificate verifies with its CA's key, each CA's
        certificate is the one the trail recorded issuing, and every
        certificate the trail records exists.
        """
        from cryptography import x509

        from hsm_ca.x509util import pem_sha256

        cas: dict[str, x509.Certificate] = {}
        ca_serials: dict[str, str] = {}
        for name, serial, pem in store.conn.execute("SELECT name, serial, pem FROM cas"):
            cas[name] = x509.load_pem_x509_certificate(pem.encode())
            ca_serials[serial] = pem
        checked = 0
        cur = store.conn.execute(
            "SELECT serial, ca, sha256, pem, status, revoked_at, revocation_reason, "
            "invalidity_date FROM certificates ORDER BY serial")
        for serial, ca, sha, pem, status, revoked_at, reason, invalidity in cur:
            if pem_sha256(pem) != sha:
                return f"certificate {serial} was altered in the database", checked
            if self.issued.get(serial) != (ca, sha):
                return f"certificate {serial} has no matching 'issued' audit record", checked
            rev = self.revoked.get(serial)
            if rev is not None:
                if status != "revoked" or rev.ca != ca or \
                        not rev.agrees(revoked_at, reason, invalidity):
                    return (f"certificate {serial} is recorded revoked ({rev.reason}, "
                            f"{rev.revoked_at or rev.recorded}) but its row says {status} "
                            f"({reason}, {revoked_at}): the database was edited"), checked
            elif status != "valid" or revoked_at is not None or reason is not None:
                return (f"certificate {serial} is {status} in the database, but the trail "
                        "records no revocation of it: the database was edited"), checked
            issuer = cas.get(ca)
            if issuer is None:
                return f"certificate {serial} names CA {ca!r}, which the database lacks", checked
            if serial in ca_serials and ca_serials[serial] != pem:
                return f"the certificate of the CA with serial {serial} was swapped", checked
            problem = check_certificate(x509.load_pem_x509_certificate(pem.encode()), issuer)
            if problem is not None:
                return f"certificate {serial}: {problem}; its CA never signed it", checked
            checked += 1
        for serial in ca_serials:
            if serial not in self.issued:
                return f"the CA certificate {serial} has no matching 'issued' audit record", checked
        missing = set(self.issued) - {r[0] for r in store.conn.execute(
            "SELECT serial FROM certificates")}
        missing |= set(self.revoked) - set(self.issued)
        if missing:
            serial = min(missing)
            return (f"audit records certificate {serial} as issued but the database has no "
                    "such certificate"), checked
        return None, checked


def _records(store: Store, after: int) -> Iterator[dict[str, Any]]:
    names = (*FIELDS, "chain")
    for row in store.conn.execute(_SELECT, (after,)):
        yield dict(zip(names, row, strict=True))


def _chain_at(store: Store, seq: int) -> str:
    if seq == 0:
        return GENESIS
    row = store.conn.execute("SELECT chain FROM audit WHERE seq=?", (seq,)).fetchone()
    if row is None:
        raise Tampered(f"audit record {seq} is missing")
    return str(row[0])


def walk_tail(store: Store, key: Any, after: int) -> tuple[TrailTally, int, str]:
    """Walk the records after ``after``, checking chain and checkpoints, up to the recorded head.

    Returns what they did, and the last record's number and chain value. A
    broken chain, a forged checkpoint or a head beyond the last record raises
    Tampered: whatever the caller was about to sign is not signed.
    """
    tail = TrailTally()
    walk = walk_records(_records(store, after), key, trail=store.get_meta(TRAIL_META),
                        start=(after, _chain_at(store, after)), visit=tail.visit)
    if not walk.report.ok:
        raise Tampered(f"the audit trail is broken: {walk.report.problem}")
    recorded = _recorded_head(store)
    if recorded is not None and (recorded[0] != walk.last_seq or (
            walk.last_seq and recorded[1] != walk.last_chain)):
        raise Tampered(f"the audit trail ends at record {walk.last_seq}, but its recorded "
                       f"head is record {recorded[0]}: records were removed or rewritten")
    return tail, walk.last_seq, walk.last_chain


def _recorded_head(store: Store) -> tuple[int, str] | None:
    """The head as this connection sees it: inside a transaction that appended, its own
    (the stored one is written just before the commit), else the stored one."""
    if "audit_head" in store.tx_state:
        seq, chain = store.tx_state["audit_head"]
        return int(seq), str(chain)
    head = store.get_meta("audit_head")
    if head is None:
        return None
    import json

    recorded = json.loads(head)
    return int(recorded["seq"]), str(recorded["chain"])


@dataclass
class RevocationView:
    """A CA's revocations as the trail says, proven to match the database at ``seq``."""

    ca: str
    seq: int
    chain: str
    revoked: dict[str, Revocation]
    rows: list[tuple[str, str, str, str | None]]
    count: int
    digest: str


def _bases(store: Store, ca: str) -> Iterator[tuple[int, int, str]]:
    """CRL intent records of ``ca`` carrying a digest, newest first: (seq, count, digest)."""
    cur = store.conn.execute(
        "SELECT seq, detail FROM audit WHERE action='crl' AND outcome='intent' AND ca=? "
        "AND detail LIKE '%revoked=%' ORDER BY seq DESC", (ca,))
    for seq, detail in cur:
        m = _DIGEST.search(detail or "")
        if m:
            yield int(seq), int(m.group(1)), m.group(2)


def verified_revocations(store: Store, ca: str, key: Any, *,
                         with_map: bool = False) -> RevocationView:
    """The CA's revoked rows, after proving they are what the trail says (else Tampered).

    ``key`` is the audit key's public key from the HSM (not the certificate
    stored in the database, which whoever edits the database can replace).
    Call inside a transaction when the rows feed something signed, so nothing
    changes between the check and the use. ``with_map`` fills ``revoked``
    (serial -> Revocation), which a view kept for OCSP needs and a CRL does not.
    """
    if key is None:
        raise Tampered("no audit key to check the trail's checkpoints with")
    found = None
    for candidate in _bases(store, ca):
        # the base record counts once a checkpoint after it, whose signature covers it,
        # has been verified; an unsigned one (a crash before its checkpoint) is skipped
        walked = walk_tail(store, key, candidate[0] - 1)
        if walked[0].checkpoints:
            found = candidate, walked
            break
    if found is None:
        found = (0, *revoked_digest(())), walk_tail(store, key, 0)
    (base, count, digest), (tail, seq, chain) = found
    rows = store.revoked_entries(ca)
    since = {s: r for s, r in tail.revoked.items() if r.ca == ca}
    kept = rows
    if since:  # (the common case at a CRL has none: its rows are then the digest's rows)
        kept = []
        for row in rows:
            serial, revoked_at, reason, invalidity = row
            rev = since.pop(serial, None)
            if rev is None:
                kept.append(row)
            elif not rev.agrees(revoked_at, reason, invalidity):
                raise Tampered(f"certificate {serial} of CA {ca!r} is recorded revoked "
                               f"({rev.reason}, {rev.revoked_at or rev.recorded}) but its row "
                               f"says {reason}, {revoked_at}: the database was edited")
        if since:
            serial = min(since)
            raise Tampered(f"the audit trail records certificate {serial} of CA {ca!r} as "
                           "revoked, but its row is not revoked: the database was edited")
    kept_digest = revoked_digest(kept)
    if kept_digest != (count, digest):
        where = f"CRL intent record {base}" if base else "the audit trail"
        raise Tampered(f"the revoked certificates of CA {ca!r} differ from what {where} and the "
                       "revocations recorded since say: the database was edited")
    total, now_digest = kept_digest if kept is rows else revoked_digest(rows)
    revoked: dict[str, Revocation] = {}
    if with_map:
        for serial, revoked_at, reason, invalidity in rows:
            revoked[serial] = Revocation(ca, revoked_at, reason, invalidity, revoked_at)
    return RevocationView(ca, seq, chain, revoked, rows, total, now_digest)


def advance(view: RevocationView, store: Store, key: Any) -> bool:
    """Bring a view up to the trail's head; True if a revocation of its CA was added."""
    recorded = _recorded_head(store)
    if recorded is None or recorded == (view.seq, view.chain):
        return False
    tail = TrailTally()
    walk = walk_records(_records(store, view.seq), key, trail=store.get_meta(TRAIL_META),
                        start=(view.seq, view.chain), visit=tail.visit)
    if not walk.report.ok:
        raise Tampered(f"the audit trail is broken: {walk.report.problem}")
    changed = False
    for serial, rev in tail.revoked.items():
        if rev.ca == view.ca:
            view.revoked[serial] = rev
            changed = True
    view.seq, view.chain = walk.last_seq, walk.last_chain
    return changed


def check_certificate(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """Why ``cert`` was not signed by ``issuer``'s key, or None if it was."""
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception as e:  # InvalidSignature, ValueError (name mismatch), TypeError
        return f"its signature does not verify with its CA's key ({type(e).__name__})"
    return None


def check_rows(store: Store, tail: TrailTally, issuer_of: Any,
               known: dict[str, str] | None = None) -> None:
    """Require the rows of the certificates a walked stretch issued or revoked to say so.

    ``issuer_of(ca_name)`` gives the certificate of the CA whose key must have
    signed a certificate (checked against the HSM's key by the caller), so a
    row with a matching forged *issued* record still fails: only the HSM can
    make a signature that verifies. ``known`` maps serials this process stored
    itself, after checking their signatures, to their digests: those rows need
    only still hash to what was stored (a bulk issuance is not verified twice).
    """
    known = known or {}
    from cryptography import x509

    from hsm_ca.x509util import pem_sha256

    for serial in sorted(set(tail.issued) | set(tail.revoked)):
        row = store.conn.execute(
            "SELECT ca, sha256, pem, status, revoked_at, revocation_reason, invalidity_date "
            "FROM certificates WHERE serial=?", (serial,)).fetchone()
        if row is None:
            raise Tampered(f"the audit trail records certificate {serial}, but the database has "
                           "no such certificate")
        ca, sha, pem, status, revoked_at, reason, invalidity = row
        if serial in tail.issued:
            rec_ca, rec_sha = tail.issued[serial]
            if ca != rec_ca or sha != rec_sha or pem_sha256(pem) != sha:
                raise Tampered(f"certificate {serial} differs from its 'issued' audit record")
            if known.get(serial) != sha:
                issuer = issuer_of(ca)
                problem = check_certificate(x509.load_pem_x509_certificate(pem.encode()), issuer)
                if problem is not None:
                    raise Tampered(f"certificate {serial}: {problem}; the CA never signed it")
        rev = tail.revoked.get(serial)
        if rev is not None:
            if status != "revoked" or rev.ca != ca or not rev.agrees(revoked_at, reason, invalidity):
                raise Tampered(f"certificate {serial} is recorded revoked, but its row says "
                               f"{status} ({reason}, {revoked_at}): the database was edited")
        elif status != "valid" or revoked_at is not None or reason is not None:
            raise Tampered(f"certificate {serial} is recorded issued and not revoked, but its "
                           f"row says {status}: the database was edited")


def last_checkpoint_seq(store: Store) -> int:
    """The newest checkpoint record (found in the trail, not read from a pointer)."""
    row = store.conn.execute(
        "SELECT seq FROM audit WHERE action='checkpoint' ORDER BY seq DESC LIMIT 1").fetchone()
    return int(row[0]) if row else 0


def check_since_checkpoint(store: Store, key: Any, issuer_of: Any,
                           known: dict[str, str] | None = None) -> int:
    """Prove the records since the last checkpoint and the rows they describe; the head seq.

    What a new checkpoint is allowed to sign: the walk starts at the last
    checkpoint (whose signature covers everything before it) and every
    certificate the records since issued or revoked must be in the database
    as recorded, signed by its CA's HSM key. Without an earlier checkpoint the
    whole trail is walked.
    """
    last = last_checkpoint_seq(store)
    tail, seq, _ = walk_tail(store, key, max(last - 1, 0))
    check_rows(store, tail, issuer_of, known)
    return seq
