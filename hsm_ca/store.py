"""The CA's state: one SQLite database, reached through sqlite-utils.

WAL mode with synchronous=FULL makes every commit durable before we return a
certificate; writes run in ``BEGIN IMMEDIATE`` transactions so concurrent
processes queue on the write lock instead of failing half-way; the schema is
versioned and migrated forward in one transaction.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsm_ca.errors import ConfigError

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 5
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _migration_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["cas"].create(
        {
            "name": str,
            "parent": str,
            "key_label": str,
            "key_type": str,
            "subject": str,
            "serial": str,
            "ski": str,
            "not_before": str,
            "not_after": str,
            "path_length": int,
            "pem": str,
            "created": str,
            "crl_number": int,
        },
        pk="name",
        not_null={"key_label", "key_type", "subject", "serial", "pem", "created"},
        defaults={"crl_number": 0},
    )
    db["serials"].create(
        {"serial": str, "ca": str, "state": str, "created": str},
        pk="serial",
        not_null={"ca", "state"},
    )
    db["certificates"].create(
        {
            "serial": str,
            "ca": str,
            "profile": str,
            "subject": str,
            "sans": str,
            "key_type": str,
            "not_before": str,
            "not_after": str,
            "sha256": str,
            "csr_sha256": str,
            "pem": str,
            "created": str,
            "status": str,
            "revoked_at": str,
            "revocation_reason": str,
            "invalidity_date": str,
        },
        pk="serial",
        not_null={"ca", "profile", "subject", "sha256", "pem", "status"},
        defaults={"status": "valid"},
    )
    db["certificates"].create_index(["ca", "status"])
    db["audit"].create(
        {
            "seq": int,
            "time": str,
            "os_user": str,
            "hsm_user": str,
            "action": str,
            "ca": str,
            "key_label": str,
            "profile": str,
            "serial": str,
            "subject": str,
            "csr_sha256": str,
            "object_sha256": str,
            "outcome": str,
            "detail": str,
            "chain": str,
        },
        pk="seq",
        not_null={"time", "action", "outcome", "chain"},
    )
    db["audit"].create_index(["serial"])


def _migration_2(db: sqlite_utils.Database) -> None:
    db["crls"].create(
        {
            "ca": str,
            "number": int,
            "base_number": int,
            "this_update": str,
            "next_update": str,
            "entries": int,
            "epoch": int,
            "sha256": str,
            "der": bytes,
            "created": str,
        },
        pk=("ca", "number"),
        not_null={"this_update", "next_update", "sha256", "der"},
    )
    db["responders"].create(
        {"ca": str, "key_label": str, "serial": str, "pem": str, "not_after": str, "created": str},
        pk="ca",
        not_null={"key_label", "serial", "pem"},
    )
    db["certificates"].add_column("revoked_epoch", int)
    db["certificates"].create_index(["ca", "revoked_epoch"])


def _migration_3(db: sqlite_utils.Database) -> None:
    db["signers"].create(
        {"label": str, "ca": str, "key_label": str, "serial": str, "pem": str, "created": str},
        pk="label",
        not_null={"ca", "key_label", "serial", "pem"},
    )
    db["tsa"].create(
        {"name": str, "ca": str, "key_label": str, "serial": str, "pem": str, "policy": str,
         "created": str},
        pk="name",
        not_null={"ca", "key_label", "serial", "pem", "policy"},
    )


def _migration_4(db: sqlite_utils.Database) -> None:
    db["bootstrap"].create(
        {"item": str, "kind": str, "spec_sha256": str, "ref": str, "created": str},
        pk="item",
        not_null={"kind", "spec_sha256"},
    )
    db["certificates"].create_index(["ca", "profile", "csr_sha256"])


def _migration_5(db: sqlite_utils.Database) -> None:
    # a CA's revoked rows in serial order, as their digest in a CRL intent record is taken;
    # covering (every column a CRL entry needs), so a million-entry CRL reads the index alone
    db["certificates"].create_index(["ca", "status", "serial", "revoked_at", "revocation_reason",
                                     "invalidity_date"])


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migration_1, 2: _migration_2, 3: _migration_3, 4: _migration_4, 5: _migration_5,
}


class Store:
    """The CA database. Only this module and audit.py write SQL."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise ConfigError(f"no CA database at {self.path}; run 'hsm-ca init' first")
        if create:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60.0)
            conn.execute("PRAGMA busy_timeout = 60000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"CA database {self.path} is unreadable: {e}") from e
        if mode.lower() != "wal":
            raise ConfigError(f"CA database {self.path} could not switch to WAL mode")
        self.conn = conn
        self._db: sqlite_utils.Database | None = None
        # per-transaction scratch (e.g. the audit head) and pre-commit hooks
        self.tx_state: dict[str, Any] = {}
        self._before_commit: dict[str, Callable[[], None]] = {}
        self._migrate()

    @property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils over the same connection, made on first use.

        Schema work and listings go through it; the few statements on the
        signing path are plain SQL, so a one-shot ``hsm-ca sign`` need not pay
        for importing sqlite-utils (about 50 ms here).
        """
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn)
        return self._db

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ schema
    def _version(self) -> int:
        if not self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone():
            return 0
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        try:
            if self._version() >= SCHEMA_VERSION:
                if self._version() > SCHEMA_VERSION:
                    raise ConfigError(
                        f"CA database {self.path} has schema {self._version()}, newer than "
                        f"this hsm-ca understands ({SCHEMA_VERSION}); upgrade hsm-ca"
                    )
                return
            with self.transaction():
                current = self._version()
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version](self.db)
                self.set_meta("schema_version", str(SCHEMA_VERSION))
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"CA database {self.path} is unusable: {e}") from e

    # ------------------------------------------------------- transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: take the write lock up front, all or nothing."""
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self.tx_state.clear()
        try:
            yield self
            for hook in list(self._before_commit.values()):
                hook()
        except BaseException:
            self._before_commit.clear()
            self.tx_state.clear()
            self.conn.execute("ROLLBACK")
            raise
        self._before_commit.clear()
        self.tx_state.clear()
        self.conn.execute("COMMIT")

    def before_commit(self, name: str, hook: Callable[[], None]) -> None:
        """Run ``hook`` once just before the current transaction commits (inside it)."""
        self._before_commit[name] = hook

    # -------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # --------------------------------------------------------------- CAs
    def insert_ca(self, row: dict[str, Any]) -> None:
        taken = self.name_in_use("cas", "name", row["name"])
        if taken is not None:  # a concurrent create of the same name in another case
            from hsm_ca.errors import AlreadyExists

            raise AlreadyExists(f"a CA named {taken!r} already exists (names ignore case)")
        self.db["cas"].insert(row)

    def get_ca(self, name: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM cas WHERE name = ?", [name])
        return rows[0] if rows else None

    def list_cas(self) -> list[dict[str, Any]]:
        return list(self.db["cas"].rows_where(order_by="created, name"))

    def ca_using_key(self, label: str) -> str | None:
        row = self.conn.execute("SELECT name FROM cas WHERE key_label=?", (label,)).fetchone()
        return row[0] if row else None

    # ----------------------------------------------------------- serials
    def reserve_serial(self, serial: str, ca: str, created: str) -> bool:
        """Reserve a serial for ``ca``; False if it was ever used before (by any CA)."""
        try:
            self.conn.execute(
                "INSERT INTO serials(serial, ca, state, created) VALUES(?, ?, 'intent', ?)",
                (serial, ca, created),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def mark_serial(self, serial: str, state: str) -> None:
        self.conn.execute("UPDATE serials SET state=? WHERE serial=?", (state, serial))

    def serials_in_state(self, state: str) -> list[dict[str, Any]]:
        return list(self.db["serials"].rows_where("state = ?", [state], order_by="created"))

    # ------------------------------------------------------ certificates
    def insert_certificate(self, row: dict[str, Any]) -> None:
        row = dict(row)
        if isinstance(row.get("sans"), list | tuple):
            row["sans"] = json.dumps(row["sans"])
        cols = list(row)
        self.conn.execute(
            f"INSERT INTO certificates({', '.join(cols)}) VALUES({', '.join('?' for _ in cols)})",
            [row[c] for c in cols],
        )

    def get_certificate(self, serial: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM certificates WHERE serial = ?", [serial])
        return _decode_cert(rows[0]) if rows else None

    def list_certificates(
        self, ca: str | None = None, revoked: bool = False, limit: int | None = None
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if ca is not None:
            where.append("ca = ?")
            args.append(ca)
        if revoked:
            where.append("status = 'revoked'")
        return [
            _decode_cert(r)
            for r in self.db["certificates"].rows_where(
                " AND ".join(where) or None, args, order_by="created, serial", limit=limit
            )
        ]

    def find_certificate(self, ca: str, profile: str, csr_sha256: str) -> dict[str, Any] | None:
        """An unrevoked certificate already issued for this CSR (what makes bootstrap idempotent)."""
        rows = list(self.db["certificates"].rows_where(
            "ca = ? AND profile = ? AND csr_sha256 = ? AND status = 'valid'",
            [ca, profile, csr_sha256], order_by="created desc", limit=1))
        return _decode_cert(rows[0]) if rows else None

    def iter_certificates(self) -> Iterator[dict[str, Any]]:
        yield from self.db["certificates"].rows_where(
            select="serial, ca, sha256, pem", order_by="serial"
        )

    # ------------------------------------------------------- revocation
    def revoke(self, serial: str, revoked_at: str, reason: str, invalidity_date: str | None) -> None:
        """Mark revoked, stamped with a fresh revocation epoch (what delta CRLs select on)."""
        epoch = self.bump_revocation_epoch()
        self.conn.execute(
            "UPDATE certificates SET status='revoked', revoked_at=?, revocation_reason=?, "
            "invalidity_date=?, revoked_epoch=? WHERE serial=?",
            (revoked_at, reason, invalidity_date, epoch, serial),
        )

    def bump_revocation_epoch(self) -> int:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES('revocation_epoch', '1') "
            "ON CONFLICT(key) DO UPDATE SET value=CAST(value AS INTEGER) + 1"
        )
        return self.revocation_epoch()

    def revocation_epoch(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='revocation_epoch'").fetchone()
        return int(row[0]) if row else 0

    def revoked_entries(
        self, ca: str, after_epoch: int | None = None
    ) -> list[tuple[str, str, str, str | None]]:
        """(serial, revoked_at, reason, invalidity_date) of a CA's revoked certificates, by serial."""
        sql = ("SELECT serial, revoked_at, revocation_reason, invalidity_date FROM certificates "
               "WHERE ca=? AND status='revoked'")
        args: list[Any] = [ca]
        if after_epoch is not None:
            sql += " AND revoked_epoch > ?"
            args.append(after_epoch)
        return self.conn.execute(sql + " ORDER BY serial", args).fetchall()

    def status_of(self, ca: str, serial: str) -> tuple[str, str | None, str | None] | None:
        """(status, revoked_at, reason) when ``ca`` issued ``serial``, else None."""
        row = self.conn.execute(
            "SELECT status, revoked_at, revocation_reason FROM certificates WHERE serial=? AND ca=?",
            (serial, ca),
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def certificate_row(self, ca: str, serial: str) -> dict[str, Any] | None:
        """What an OCSP answer is built from: the state columns, the PEM and its digest."""
        rows = self._rows(
            "SELECT status, revoked_at, revocation_reason, invalidity_date, sha256, pem "
            "FROM certificates WHERE serial=? AND ca=?", [serial, ca])
        return rows[0] if rows else None

    def next_crl_number(self, ca: str, now: _dt.datetime) -> int:
        """Reserve the CA's next CRL number (call inside a transaction; never reused).

        The number is derived from time, as large CAs do: the larger of the last one plus
        one and ``now`` in microseconds since 1970. A counter alone repeats after a restore
        of an older backup (the restored database never saw the CRLs signed after it, but
        relying parties did); the clock has moved on, so a time-derived number exceeds every
        number signed before without the CA having to know them. The write lock of the
        transaction keeps the numbers strictly increasing under concurrency, and "plus one"
        keeps them so if the clock steps back. Microseconds fit SQLite's 64-bit integers
        for some 290,000 years and stay far below RFC 5280's 20 octets.
        """
        floor = (now - _EPOCH) // _dt.timedelta(microseconds=1)
        self.conn.execute("UPDATE cas SET crl_number = max(crl_number + 1, ?) WHERE name=?",
                          (floor, ca))
        return int(self.conn.execute("SELECT crl_number FROM cas WHERE name=?", (ca,)).fetchone()[0])

    def insert_crl(self, row: dict[str, Any]) -> None:
        self.db["crls"].insert(row)

    def latest_crl(self, ca: str, delta: bool = False) -> dict[str, Any] | None:
        cond = "base_number IS NOT NULL" if delta else "base_number IS NULL"
        rows = list(self.db["crls"].rows_where(
            f"ca = ? AND {cond}", [ca], order_by="number desc", limit=1))
        return rows[0] if rows else None

    def set_responder(self, row: dict[str, Any]) -> None:
        self.db["responders"].upsert(row, pk="ca")

    def get_responder(self, ca: str) -> dict[str, Any] | None:
        rows = list(self.db["responders"].rows_where("ca = ?", [ca]))
        return rows[0] if rows else None

    # ------------------------------------------------- signers and the TSA
    def upsert_row(self, table: str, row: dict[str, Any], pk: str) -> None:
        self.db[table].upsert(row, pk=pk)

    def get_row(self, table: str, pk: str, value: str) -> dict[str, Any] | None:
        rows = list(self.db[table].rows_where(f"{pk} = ?", [value]))
        return rows[0] if rows else None

    def name_in_use(self, table: str, column: str, name: str) -> str | None:
        """The stored name equal to ``name`` ignoring case, if any (CLI.md: names are
        unique regardless of case). Called inside the creating transaction, whose
        write lock makes check-then-insert atomic."""
        if table not in ("cas", "signers", "tsa") or column not in ("name", "label"):
            raise ValueError(f"no name column {table}.{column}")
        row = self.conn.execute(
            f"SELECT {column} FROM {table} WHERE lower({column}) = lower(?) LIMIT 1", (name,)
        ).fetchone()
        return row[0] if row else None

    def all_rows(self, table: str, order_by: str) -> list[dict[str, Any]]:
        return list(self.db[table].rows_where(order_by=order_by))

    def count(self, table: str) -> int:
        return self.db[table].count


def _decode_cert(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["sans"] = json.loads(row["sans"]) if row.get("sans") else []
    return row
