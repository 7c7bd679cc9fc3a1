"""The certificate authority service: CAs, issuance, and the home that holds them.

Issuance follows one path for roots, intermediates and leaves:

1. check the request against the profile (no PIN needed, so bad input is
   refused before the HSM is touched), recording refusals;
2. draw serials and commit *intent* records;
3. sign through the engine handle;
4. commit certificate rows and *issued* records in one transaction;
5. only then hand certificates back.

A crash between 2 and 4 leaves an intent whose serial is never reused, never
a certificate without a record. Large batches on a PKCS#11 token go through
these steps in parts, overlapped with the token's signing in a helper
process (see ``sign_csrs``); each part keeps the same order.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from hsm_ca.audit import Actor, AuditLog, os_user
from hsm_ca.config import (
    DEFAULT_OFFICER,
    DEFAULT_USER,
    HomeConfig,
    PinSource,
    Pkcs11Settings,
    render_config,
)
from hsm_ca.engine.base import HsmEngine, KeyHandle, KeySpec, validate_key_type
from hsm_ca.engine.keys import SignatureRequest, as_private_key, capturing_key, key_type_of
from hsm_ca.errors import (
    AlreadyExists,
    ConfigError,
    EngineError,
    HsmCaError,
    KeyNotFound,
    LockedOut,
    LoginFailed,
    NotFound,
    PolicyViolation,
    UsageError,
)
from hsm_ca.names import check_ca_name
from hsm_ca.names import show as show_name
from hsm_ca.profiles import Profile, ProfileStore
from hsm_ca.serials import format_serial, new_serial, parse_serial
from hsm_ca.store import Store
from hsm_ca.x509util import (
    cert_pem,
    general_names_as_strings,
    pem_from_der,
    rfc3339,
    sans_as_strings,
    signature_hash_for,
    ski_hex,
)

# CA/Browser Forum maximum TLS server certificate validity (ballot SC-081).
CABF_SCHEDULE: tuple[tuple[_dt.datetime, int], ...] = (
    (_dt.datetime(2029, 3, 15, tzinfo=_dt.UTC), 47),
    (_dt.datetime(2027, 3, 15, tzinfo=_dt.UTC), 100),
    (_dt.datetime(2026, 3, 15, tzinfo=_dt.UTC), 200),
)
CABF_BEFORE = 398
# Batches this large are signed through the PKCS#11 engine's helper process, in parts
# small enough that the token is never idle for long (see engine/p11_helper.py).
HELPER_MIN_BATCH = 64
PIPELINE_DEPTH = 2  # parts in flight at the helper while the oldest one is stored


def cabf_max_days(now: _dt.datetime) -> int:
    """The BR maximum validity (days) in force at ``now``."""
    for start, days in CABF_SCHEDULE:
        if now >= start:
            return days
    return CABF_BEFORE


def validate_ca_name(name: str) -> str:
    """CA names appear in URLs and key labels: the shared name rule (hsm_ca.names)."""
    return check_ca_name(name)


def _issue_detail(d: _Draft) -> str:
    """An intent/issued record's detail: the request's source and the profile file's SHA-256,
    so a profile changed between two issuances shows in the trail."""
    parts = [d.source] if d.source else []
    return " ".join([*parts, f"profile_sha256={d.profile.sha256}"])


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class CaRecord:
    """A CA as stored: its certificate and the label of its HSM key."""

    name: str
    parent: str | None
    key_label: str
    key_type: str
    certificate: x509.Certificate
    path_length: int | None
    crl_number: int

    @property
    def subject(self) -> x509.Name:
        return self.certificate.subject

    @property
    def not_after(self) -> _dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def serial(self) -> str:
        return format_serial(self.certificate.serial_number)

    def as_dict(self) -> dict[str, Any]:
        c = self.certificate
        return {
            "name": self.name,
            "parent": self.parent,
            "subject": c.subject.rfc4514_string(),
            "key_type": self.key_type,
            "key_label": self.key_label,
            "serial": self.serial,
            "not_before": rfc3339(c.not_valid_before_utc),
            "not_after": rfc3339(c.not_valid_after_utc),
            "path_length": self.path_length,
            "ski": ski_hex(c),
        }


@dataclass(frozen=True)
class IssuedCertificate:
    """What issuance returns once the certificate is durable and audited."""

    certificate: x509.Certificate
    ca: str
    profile: str
    chain: tuple[x509.Certificate, ...] = ()
    source: str | None = None
    pem_text: str | None = None
    summary: dict[str, Any] | None = None  # as_dict() precomputed by the issuer

    @property
    def serial(self) -> str:
        return format_serial(self.certificate.serial_number)

    @property
    def pem(self) -> str:
        return self.pem_text or cert_pem(self.certificate)

    def as_dict(self) -> dict[str, Any]:
        if self.summary is not None:
            return dict(self.summary)
        c = self.certificate
        return {
            "serial": self.serial,
            "subject": c.subject.rfc4514_string(),
            "issuer": c.issuer.rfc4514_string(),
            "not_before": rfc3339(c.not_valid_before_utc),
            "not_after": rfc3339(c.not_valid_after_utc),
            "profile": self.profile,
            "ca": self.ca,
            "sans": sans_as_strings(c),
        }


@dataclass(frozen=True)
class Refusal:
    """A request refused in a batch (others went on)."""

    source: str
    error: HsmCaError

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "error": str(self.error), "refused": True}


@dataclass
class _Draft:
    """A checked request waiting for a serial and a signature."""

    profile: Profile
    subject: x509.Name
    public_key: PublicKeyTypes
    sans: tuple[x509.GeneralName, ...]
    not_before: _dt.datetime
    not_after: _dt.datetime
    csr_sha256: str | None
    key_type: str
    path_length: int | None = None
    source: str | None = None
    serial: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    _subject_text: str | None = None

    @property
    def subject_text(self) -> str:
        if self._subject_text is None:
            self._subject_text = self.subject.rfc4514_string()
        return self._subject_text


@dataclass(frozen=True)
class _IssueContext:
    """Everything the three issuance steps need, gathered once per batch."""

    ca_name: str
    issuer_name: x509.Name
    issuer_handle: KeyHandle
    issuer_key_type: str
    issuer_cert: x509.Certificate | None
    new_ca: tuple[str, str | None, str, str] | None
    on_issued: Callable[[IssuedCertificate], None] | None
    base_url: str | None
    publishes_deltas: bool
    private_key: Any
    hash_alg: Any
    issuer_public: Any
    issuer_text: str
    capture: tuple[Any, SignatureRequest] | None = None


@dataclass
class _Ticket:
    """A certificate built around a placeholder signature, its TBS out for signing."""

    placeholder: bytes
    tbs: bytes
    algorithm: Any
    padding: Any
    submitted: bool = False


def _ca_from_row(row: dict[str, Any]) -> CaRecord:
    cert = x509.load_pem_x509_certificate(row["pem"].encode())
    return CaRecord(
        name=row["name"],
        parent=row["parent"],
        key_label=row["key_label"],
        key_type=row["key_type"],
        certificate=cert,
        path_length=row["path_length"],
        crl_number=row["crl_number"] or 0,
    )


class Authority:
    """One CA home: config, database, audit trail, profiles and the HSM engine.

    The engine is opened and logged in lazily, on the first operation that
    needs a key, so listing and refusing never ask for a PIN.
    """

    def __init__(
        self,
        config: HomeConfig,
        *,
        pin: PinSource | None = None,
        engine_factory: Callable[[HomeConfig], HsmEngine] | None = None,
    ) -> None:
        self.config = config
        self.store = Store(config.db_path)
        self.audit = AuditLog(self.store)
        self.profiles = ProfileStore(config.profiles_path)
        self._pin = pin
        self._engine_factory = engine_factory or open_engine
        self._engine: HsmEngine | None = None
        self._logged_in = False
        # serial -> SHA-256 of certificates this process stored since its last checkpoint,
        # their signatures checked before storing (see trailstate.check_rows)
        self._vouched: dict[str, str] = {}
        self._ca_cache: dict[str, CaRecord] = {}

    # ----------------------------------------------------------- lifecycle
    @classmethod
    def initialize(
        cls,
        home: Path,
        *,
        engine: str = "soft",
        user_pin: str,
        officer_pin: str | None = None,
        base_url: str | None = None,
        user: str = DEFAULT_USER,
        officer: str = DEFAULT_OFFICER,
        scrypt_n: int | None = None,
        pkcs11: Pkcs11Settings | None = None,
    ) -> Authority:
        """Create a new home; refuses, changing nothing, if one is there already."""
        home = Path(home)
        existed = home.exists()
        if existed:
            if not home.is_dir():
                raise ConfigError(f"{home} exists and is not a directory")
            if any(home.iterdir()):
                raise AlreadyExists(
                    f"{home} already exists and is not empty; refusing to initialise over it"
                )
        # Build the home in a staging directory beside it and rename it into place, so
        # a run killed half-way leaves no half-made home that blocks the next attempt;
        # staging.py removes what such a run left (never a live run's staging).
        from hsm_ca.staging import Staging

        stage = Staging(home, "init")
        staging = stage.path
        cfg = HomeConfig(
            home=staging, engine=engine, base_url=base_url, user=user, officer=officer,
            pkcs11=pkcs11,
        )
        try:
            if engine == "soft":
                from hsm_ca.engine.soft import DEFAULT_SCRYPT_N, SoftEngine

                if officer_pin is None:
                    raise ConfigError("the built-in engine needs a crypto-officer PIN too")
                created = SoftEngine.create(
                    cfg.hsm_path, officer=officer, officer_pin=officer_pin, user=user,
                    user_pin=user_pin, scrypt_n=scrypt_n or DEFAULT_SCRYPT_N,
                )
                cfg = replace(cfg, partition_id=created.current_partition_id())
            elif engine == "pkcs11":
                if pkcs11 is None:
                    raise UsageError("--engine pkcs11 needs --pkcs11-module")
                probe = open_engine(cfg)
                try:
                    probe.login(user, user_pin)
                finally:
                    probe.close()
            else:
                raise UsageError(f"unknown engine {engine!r}; choose soft or pkcs11")
            fd = os.open(cfg.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(render_config(cfg))
            store = Store(cfg.db_path, create=True)
            try:
                AuditLog(store).append(Actor(os_user(), user), "init", "ok",
                                       detail=f"engine={engine}")
            finally:
                store.close()
            if existed:
                home.rmdir()  # empty, checked above
            stage.commit()
        except BaseException:
            stage.abort()
            raise
        return cls(replace(cfg, home=home), pin=lambda: user_pin)

    def fork(self) -> int:
        """``os.fork()`` with the logged-in engine shared and the database connection not.

        For parallel issuing without a second login or interpreter start-up:
        the child inherits the engine session (one login, audited once, serves
        both processes), while each side opens its own SQLite connection —
        SQLite keeps per-process lock state that must not cross a fork, so the
        connection is closed before forking. Returns 0 in the child, the
        child's pid in the parent. Only for the built-in engine: a PKCS#11
        library must be initialised again in a child.
        """
        if self.config.engine != "soft":
            raise EngineError("only the built-in engine's session can be shared with a child process")
        if self.store.conn.in_transaction:
            raise EngineError("cannot fork inside a database transaction")
        self.engine()
        self.store.close()
        try:
            pid = os.fork()
        finally:
            self.store = Store(self.config.db_path)
            self.audit = AuditLog(self.store)
        return pid

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.store.close()

    def __enter__(self) -> Authority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def actor(self, hsm_user: str | None = None) -> Actor:
        return Actor(os_user(), hsm_user or self.config.user)

    # -------------------------------------------------------------- engine
    def engine(self, *, login: bool = True) -> HsmEngine:
        """The engine, logged in as the configured crypto user on first need."""
        if self._engine is None:
            self._engine = self._engine_factory(self.config)
        if login and not self._logged_in:
            if self._pin is None:
                raise ConfigError("this operation needs the crypto-user PIN")
            pin = self._pin()
            self.check_rollback()
            try:
                self._engine.login(self.config.user, pin)
            except (LoginFailed, LockedOut) as e:
                self.record_engine_change(
                    "login", "locked" if isinstance(e, LockedOut) else "failed", detail=str(e)
                )
                raise
            self._logged_in = True
            sync = getattr(self._engine, "sync_nodes", None)
            if sync is not None:
                sync()  # bring a stale or re-added replica up to date
            self.record_engine_change("login", "ok")
        return self._engine

    # ----------------------------------------------------- audit checkpoints
    CHECKPOINT_EVERY = 1000
    AUDIT_KEY = "audit-signing"

    def _audit_key(self) -> KeyHandle:
        """The HSM key that signs checkpoints, with a self-signed certificate kept in the store."""
        engine = self.engine()
        try:
            handle = engine.get_key(self.AUDIT_KEY)
        except KeyNotFound:
            try:
                handle = self._new_key(self.AUDIT_KEY, "ec-p256", self.actor())
            except AlreadyExists:  # another process made it first: it is the one
                handle = engine.get_key(self.AUDIT_KEY)
        if not self.store.get_meta("audit_cert"):
            now = _now()
            from hsm_ca.audit import TRAIL_ATTRIBUTE_PREFIX

            name = x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, "hsm-ca audit trail signer"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER,
                                   TRAIL_ATTRIBUTE_PREFIX + self.audit.trail_id()),
            ])
            cert = (
                x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(handle.public_key()).serial_number(new_serial())  # type: ignore[arg-type]
                .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=36500))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=True, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(as_private_key(handle), signature_hash_for("ec-p256"))
            )
            with self.store.transaction():
                self.store.set_meta("audit_cert", cert_pem(cert))
        return handle

    def audit_public_key(self) -> Any:
        """The audit key's public key as the HSM holds it: what internal checks trust.

        Read from the HSM once per process (the OCSP path asks on every request)."""
        key = self.__dict__.get("_audit_public")
        if key is None:
            key = self.__dict__["_audit_public"] = self._audit_key().public_key()
        return key

    def audit_certificate(self) -> x509.Certificate:
        """The audit signer's certificate (created on first use), for offline verification."""
        self._audit_key()
        return x509.load_pem_x509_certificate(self.store.get_meta("audit_cert").encode())  # type: ignore[union-attr]

    def checkpoint(self, reason: str = "manual") -> int:
        """Sign the audit trail, up to and including this checkpoint's own record, with the HSM audit key."""
        from cryptography.hazmat.primitives.asymmetric import ec

        handle = self._audit_key()
        key = as_private_key(handle)
        algorithm = ec.ECDSA(signature_hash_for("ec-p256"))

        def sign(data: bytes) -> bytes:
            return key.sign(data, algorithm)  # type: ignore[call-arg,arg-type,no-any-return]

        from hsm_ca.errors import Tampered
        from hsm_ca.trailstate import check_since_checkpoint

        trail = self.audit.trail_id()
        try:
            with self.store.transaction():
                # nothing is signed unverified: the records since the last checkpoint, and
                # the certificate rows they describe, are proven first (under the write lock)
                check_since_checkpoint(self.store, handle.public_key(), self.issuer_checker(),
                                       known=self._vouched)
                new_seq = self.audit.append_checkpoint(
                    self.actor(), key_label=handle.label, trail=trail, reason=reason, sign=sign)
                self.store.set_meta("audit_checkpoint", str(new_seq))
            self._vouched.clear()  # signed into the trail now; the next check starts after it
        except Tampered as e:
            # not a "checkpoint" record: those are signed, and an unsigned one is a forgery
            self.audit.append(self.actor(), "state-check", "refused", key_label=handle.label,
                              detail=f"checkpoint ({reason}) refused: {e}")
            raise
        return new_seq

    def maybe_checkpoint(self, *, force: str | None = None) -> None:
        """Checkpoint every CHECKPOINT_EVERY records, or now with a reason (e.g. at a CRL).

        A periodic checkpoint refused because the database disagrees with the
        trail does not fail the operation that triggered it (that operation was
        checked on its own); it is audited and warned about. A forced one raises.
        """
        if force is None:
            head, _ = self.audit._head()
            if head - self.audit.last_checkpoint() < self.CHECKPOINT_EVERY:
                return
        from hsm_ca.errors import Tampered

        try:
            self.checkpoint(force or "periodic")
        except Tampered as e:
            if force is not None:
                raise
            import sys

            sys.stderr.write(f"Warning: audit checkpoint refused: {e}\n")

    def issuer_checker(self) -> Callable[[str], x509.Certificate]:
        """CA name -> its certificate, once its public key is proven to be the HSM key's.

        The ``cas`` rows are database rows too: a swapped CA certificate would
        make forged certificates verify. The HSM holds the only copy of each CA
        key that counts, so the certificate's key must be the engine's.
        """
        from hsm_ca.errors import Tampered

        cache: dict[str, x509.Certificate] = {}
        engine = self.engine()

        def issuer_of(name: str) -> x509.Certificate:
            if name in cache:
                return cache[name]
            row = self.store.get_ca(name)
            if row is None:
                raise Tampered(f"certificates name CA {name!r}, which the database lacks")
            cert = x509.load_pem_x509_certificate(row["pem"].encode())
            try:
                held = engine.get_key(row["key_label"]).public_key()
            except KeyNotFound:
                raise Tampered(f"CA {name!r} names HSM key {row['key_label']!r}, which the HSM "
                               "does not hold") from None
            if _spki(held) != _spki(cert.public_key()):
                raise Tampered(f"the certificate of CA {name!r} in the database does not carry "
                               f"the public key of its HSM key {row['key_label']!r}")
            cache[name] = cert
            return cert

        return issuer_of

    def revocation_view(self, ca_name: str) -> Any:
        """The CA's revocations as proven against the trail; kept and advanced per process.

        A fresh process proves the CA's revoked rows once (from its last CRL's
        digest, see trailstate); after that only new audit records are walked.
        """
        from hsm_ca.trailstate import advance, verified_revocations

        views: dict[str, Any] = self.__dict__.setdefault("_revocation_views", {})
        key = self.audit_public_key()
        view = views.get(ca_name)
        if view is None:
            view = views[ca_name] = verified_revocations(self.store, ca_name, key, with_map=True)
            view.rows = []  # the map is what is kept; the rows list would double the memory
        else:
            advance(view, self.store, key)
        return view

    def certificate_status(self, ca_name: str, serial: str) -> str | None:
        """'valid', 'revoked' or None (not this CA's), as the trail says and the row agrees.

        A row that disagrees with the trail raises Tampered: nothing is
        vouched for on the strength of an edited row.
        """
        from hsm_ca.errors import Tampered

        row = self.store.status_of(ca_name, serial)
        rev = self.revocation_view(ca_name).revoked.get(serial)
        if row is None:
            if rev is not None:
                raise Tampered(f"certificate {serial} is recorded revoked but has no row")
            return None
        if rev is not None:
            if row[0] != "revoked" or not rev.agrees(row[1], row[2], self.store.get_certificate(
                    serial)["invalidity_date"]):  # type: ignore[index]
                raise Tampered(f"certificate {serial} is recorded revoked, but its row says "
                               f"{row[0]}: the database was edited")
            return "revoked"
        if row[0] != "valid":
            raise Tampered(f"certificate {serial} is {row[0]} in the database, but the audit "
                           "trail records no revocation of it: the database was edited")
        return "valid"

    def _generation(self) -> int | None:
        generation = getattr(self._engine, "generation", None)
        return int(generation()) if callable(generation) else None

    def check_rollback(self) -> None:
        """Refuse a keystore older than the newest generation the audit trail has seen.

        Every keystore change is audited with its generation (and the highest
        one kept in the store), so swapping in an older copy of the keystore -
        to undo a lockout, or bring back a destroyed key - is detected.
        """
        if self._engine is None:
            self._engine = self._engine_factory(self.config)
        # the trail first: what it has seen the keystore had reached before it was recorded,
        # so a keystore read after it is never older unless rolled back (read the other way
        # round, another process's write and record in between looked like a rollback)
        seen = int(self.store.get_meta("hsm_generation") or 0)
        current = self._generation()
        if current is not None and current < seen:
            from hsm_ca.errors import Tampered

            message = (f"HSM keystore rolled back: it is at generation {current}, but the audit "
                       f"trail has seen generation {seen} (tampered or restored from an old copy)")
            self.audit.append(self.actor(), "login", "refused", detail=message)
            raise Tampered(message)

    def record_engine_change(self, action: str, outcome: str, *, hsm_user: str | None = None,
                             **fields: Any) -> None:
        """An audit record carrying the keystore generation, kept with it in one transaction.

        Replica nodes the engine found stale, missing or tampered and rewrote
        on the way (it reports them in ``engine.repairs``; it knows nothing of
        the trail) are recorded first, one ``node-repair`` record each, and
        each is a ``Warning:`` line on stderr: a repair is never silent.
        """
        generation = self._generation()
        detail = fields.pop("detail", None)
        if generation is not None:
            detail = f"{detail + '; ' if detail else ''}generation={generation}"
        queued = getattr(self._engine, "repairs", None)
        repairs = list(queued) if queued else []
        with self.store.transaction():
            for rep in repairs:
                self.audit.append(
                    self.actor(hsm_user), "node-repair", "repaired",
                    detail=f"node {rep['node']} was {rep['problem']}"
                           f"{': ' + rep['detail'] if rep['detail'] else ''}; rewritten at "
                           f"generation={rep['generation']}",
                )
            self.audit.append(self.actor(hsm_user), action, outcome, detail=detail, **fields)
            if generation is not None:
                seen = int(self.store.get_meta("hsm_generation") or 0)
                self.store.set_meta("hsm_generation", str(max(seen, generation)))
        if repairs:
            del queued[:len(repairs)]  # type: ignore[index]
            import sys

            for rep in repairs:
                sys.stderr.write(f"Warning: HSM node {rep['node']} was {rep['problem']}; "
                                 "repaired from the newest authentic copy (audited)\n")

    def revoke(
        self, serial: str, reason: str = "unspecified", invalidity_date: _dt.datetime | None = None
    ) -> Any:
        """Revoke a certificate by serial (see revocation.revoke)."""
        from hsm_ca.revocation import revoke

        return revoke(self, serial, reason, invalidity_date)

    def crl(self, ca_name: str, *, delta: bool = False) -> Any:
        """Sign a fresh full or delta CRL for a CA (see revocation.sign_crl)."""
        from hsm_ca.revocation import sign_crl

        return sign_crl(self, ca_name, delta=delta)

    def list_keys(self) -> list[dict[str, Any]]:
        engine = self.engine(login=False)
        lister = getattr(engine, "list_keys_public", None) or engine.list_keys
        try:
            keys = lister()
        except EngineError:
            keys = self.engine().list_keys()
        used: dict[str, list[str]] = {}
        for ca in self.store.list_cas():
            used.setdefault(ca["key_label"], []).append(f"ca:{ca['name']}")
            responder = self.store.get_responder(ca["name"])
            if responder:
                used.setdefault(responder["key_label"], []).append(f"ocsp:{ca['name']}")
        for signer in self.store.all_rows("signers", "label"):
            used.setdefault(signer["key_label"], []).append(f"codesign:{signer['label']}")
        for tsa in self.store.all_rows("tsa", "name"):
            used.setdefault(tsa["key_label"], []).append(f"tsa:{tsa['name']}")
        used.setdefault(self.AUDIT_KEY, []).append("audit checkpoints")
        return [
            {
                "label": k.label,
                "key_type": k.key_type,
                "extractable": bool(k.extractable),
                "used_by": ", ".join(used.get(k.label, [])) or None,
            }
            for k in keys
        ]

    # ------------------------------------------------------------------ CAs
    def get_ca(self, name: str) -> CaRecord:
        cached = self._ca_cache.get(name)
        if cached is not None:
            return cached
        row = self.store.get_ca(name)
        if row is None:
            known = [r["name"] for r in self.store.list_cas()]
            hint = f"; known CAs: {', '.join(known)}" if known else "; create one with 'hsm-ca ca create-root'"
            raise NotFound(f"unknown CA {show_name(name)}{hint}")
        record = _ca_from_row(row)
        self._ca_cache[name] = record
        return record

    def list_cas(self) -> list[CaRecord]:
        return [_ca_from_row(r) for r in self.store.list_cas()]

    def chain(self, name: str, *, include_root: bool = True) -> list[x509.Certificate]:
        """The CA's certificate followed by its issuers up to the root."""
        out: list[x509.Certificate] = []
        seen: set[str] = set()
        current: str | None = name
        while current is not None and current not in seen:
            seen.add(current)
            ca = self.get_ca(current)
            if ca.parent is None and not include_root:
                break
            out.append(ca.certificate)
            current = ca.parent
        return out

    def ca(self, name: str) -> CertificateAuthority:
        return CertificateAuthority(self, self.get_ca(name))

    def create_root(
        self,
        name: str,
        subject: x509.Name,
        *,
        key_type: str = "ec-p384",
        days: int | None = None,
        path_length: int | None = None,
    ) -> CaRecord:
        return self._create_ca(name, subject, key_type, days, path_length, parent=None)

    def create_intermediate(
        self,
        name: str,
        parent: str,
        subject: x509.Name,
        *,
        key_type: str = "ec-p256",
        days: int | None = None,
        path_length: int | None = None,
        name_constraints: x509.NameConstraints | None = None,
    ) -> CaRecord:
        """Create a CA certified by ``parent``; ``name_constraints`` (critical) limit its names."""
        return self._create_ca(name, subject, key_type, days, path_length, parent=parent,
                               name_constraints=name_constraints)

    def _create_ca(
        self,
        name: str,
        subject: x509.Name,
        key_type: str,
        days: int | None,
        path_length: int | None,
        parent: str | None,
        name_constraints: x509.NameConstraints | None = None,
    ) -> CaRecord:
        validate_ca_name(name)
        validate_key_type(key_type)
        profile_name = "root-ca" if parent is None else "intermediate-ca"
        actor = self.actor()
        try:
            taken = self.store.name_in_use("cas", "name", name)
            if taken is not None:
                raise AlreadyExists(
                    f"a CA named {taken!r} already exists"
                    + (" (names are unique regardless of case)" if taken != name else "")
                )
            if not len(subject):
                raise UsageError("the CA subject must not be empty")
            profile = self.profiles.for_issuance(profile_name)
            if key_type not in profile.key_types:
                raise PolicyViolation(
                    f"key type {key_type} is not allowed by profile {profile_name}"
                )
            if path_length is not None and path_length < 0:
                raise UsageError("--path-length must be 0 or more")
            issuer = self.get_ca(parent) if parent is not None else None
            if issuer is not None:
                path_length = self._child_path_length(issuer, path_length)
            now = _now()
            not_before, not_after = _validity(profile, days, now, issuer)
        except HsmCaError as e:
            self.audit.append(
                actor, "issue", "refused", ca=parent or name, profile=profile_name,
                subject=subject.rfc4514_string(), detail=f"create CA {name!r}: {e}",
            )
            raise
        label = f"ca-{name}"
        handle = self._new_key(label, key_type, actor)
        draft = _Draft(
            profile=profile, subject=subject, public_key=handle.public_key(), sans=(),
            not_before=not_before, not_after=not_after, csr_sha256=None, key_type=key_type,
            path_length=path_length, source=name,
            extra={"name_constraints": name_constraints} if name_constraints else {},
        )
        signer = CertificateAuthority(self, issuer) if issuer is not None else None
        if signer is None:
            cert = self._issue_batch([draft], self._context(
                ca_name=name, issuer_name=subject, issuer_handle=handle,
                issuer_key_type=key_type, issuer_cert=None, new_ca=(name, None, label, key_type),
            ))[0]
        else:
            cert = self._issue_batch([draft], self._context(
                ca_name=issuer.name, issuer_name=issuer.subject,
                issuer_handle=signer.key_handle(), issuer_key_type=issuer.key_type,
                issuer_cert=issuer.certificate, new_ca=(name, parent, label, key_type),
            ))[0]
        if isinstance(cert, Refusal):
            raise cert.error
        return self.get_ca(name)

    @staticmethod
    def _child_path_length(issuer: CaRecord, requested: int | None) -> int | None:
        if issuer.path_length is None:
            return requested
        if issuer.path_length == 0:
            raise PolicyViolation(
                f"CA {issuer.name!r} has path length 0 and cannot certify another CA"
            )
        if requested is None:
            return issuer.path_length - 1
        if requested > issuer.path_length - 1:
            raise PolicyViolation(
                f"--path-length {requested} exceeds what CA {issuer.name!r} allows "
                f"({issuer.path_length - 1})"
            )
        return requested

    def _new_key(self, label: str, key_type: str, actor: Actor) -> KeyHandle:
        """Generate a key, or adopt an orphan of the same type left by an interrupted run."""
        engine = self.engine()
        try:
            existing = engine.get_key(label)
        except KeyNotFound:
            existing = None
        if existing is not None:
            if self.store.ca_using_key(label) is not None or existing.key_type != key_type:
                raise AlreadyExists(f"a key labelled {label!r} already exists in the HSM")
            self.audit.append(
                actor, "generate-key", "ok", key_label=label,
                detail=f"{key_type}; adopted unused key left by an interrupted run",
            )
            return existing
        handle = engine.generate_key(KeySpec(key_type=key_type, label=label))
        self.record_engine_change("generate-key", "ok", key_label=label, detail=key_type)
        return handle

    # -------------------------------------------------------------- issuing
    def sign_csrs(
        self,
        ca_name: str,
        csrs: Sequence[tuple[str, bytes | HsmCaError]],
        profile_name: str,
        *,
        days: int | None = None,
    ) -> list[IssuedCertificate | Refusal]:
        """Check and issue several CSRs (``(source, bytes)``) in one batch.

        An ``HsmCaError`` in place of the bytes is a request that could not even
        be read (too large, missing, a FIFO): it is refused and recorded here
        like every other refusal, so each refused request leaves one record.

        Refused CSRs are recorded and returned as ``Refusal``; the others are
        issued with one commit for the intents and one for the certificates —
        per part when a PKCS#11 signing helper takes the signatures: then the
        token signs one part while this process checks, builds and stores the
        others, because signing in-line would leave the token idle for half
        the time.
        """
        try:
            profile = self.profiles.for_issuance(profile_name)
            ca = self.get_ca(ca_name)
            if profile.name == "root-ca":
                raise PolicyViolation(
                    "profile root-ca is for self-signed roots; use 'hsm-ca ca create-root'"
                )
            if days is not None and days < 1:
                raise UsageError("--days must be at least 1")
            now = _now()
            if now > ca.not_after:
                raise PolicyViolation(f"CA {ca_name!r} expired on {rfc3339(ca.not_after)}")
            if profile.cabf_server_auth and ca.key_type == "ed25519":
                raise PolicyViolation(
                    f"profile {profile.name} follows the CA/Browser Forum baseline requirements, "
                    f"which do not allow Ed25519 signatures; CA {ca_name!r} has an Ed25519 key"
                )
            path_length = None
            if profile.is_ca:
                path_length = self._child_path_length(ca, profile.path_length)
        except HsmCaError as e:
            self._refuse_all(ca_name, profile_name, e, raw=csrs)
            raise
        results: list[IssuedCertificate | Refusal | None] = [None] * len(csrs)
        helper: Any = None
        pipelined = (len(csrs) >= HELPER_MIN_BATCH and self.config.pkcs11 is not None
                     and self.config.pkcs11.signing_helper)
        ctx: _IssueContext | None = None
        pending: list[tuple[list[_Draft], list[_Ticket | HsmCaError]]] = []

        def place(drafts: list[_Draft], issued: list[IssuedCertificate | Refusal]) -> None:
            for d, item in zip(drafts, issued, strict=True):
                results[d.index] = item

        offset = 0
        try:
            for size in _chunk_sizes(len(csrs)) if pipelined else [len(csrs)]:
                part, first = csrs[offset:offset + size], offset
                offset += size
                drafts = self._check_csrs(part, first, profile, ca, days, now, path_length, results)
                if not drafts:
                    continue
                if ctx is None:
                    try:
                        handle = CertificateAuthority(self, ca).key_handle()
                    except HsmCaError as e:
                        self._refuse_all(ca_name, profile_name, e, drafts=drafts,
                                         raw=csrs[offset:])
                        raise
                    if pipelined:
                        start = getattr(self.engine(), "signing_helper", None)
                        helper = start(ca.key_label) if start is not None else None
                    ctx = self._context(
                        ca_name=ca.name, issuer_name=ca.subject, issuer_handle=handle,
                        issuer_key_type=ca.key_type, issuer_cert=ca.certificate, new_ca=None,
                        capture=helper is not None,
                    )
                self._reserve(drafts, ctx)
                if helper is not None and helper.broken is None and helper.ready():
                    # the helper signs this part while we store the one before the last
                    pending.append((drafts, self._submit(drafts, ctx, helper)))
                    if len(pending) > PIPELINE_DEPTH:
                        done, tickets = pending.pop(0)
                        place(done, self._store(done, self._collect(tickets, ctx, helper), ctx))
                else:
                    place(drafts, self._store(drafts, self._sign(drafts, ctx), ctx))
            while pending:
                done, tickets = pending.pop(0)
                assert ctx is not None and helper is not None
                place(done, self._store(done, self._collect(tickets, ctx, helper), ctx))
        finally:
            if pending and helper is not None:
                helper.discard()  # answers nobody will read must not reach the next batch
        if ctx is not None:
            chain = tuple(self.chain(ca.name, include_root=False))
            for i, r in enumerate(results):
                if isinstance(r, IssuedCertificate):
                    results[i] = IssuedCertificate(
                        r.certificate, r.ca, r.profile, chain, r.source, r.pem_text, r.summary,
                    )
            self.maybe_checkpoint()
        return [r for r in results if r is not None]

    def _refuse_all(
        self, ca_name: str, profile_name: str, error: HsmCaError, *,
        drafts: Sequence[_Draft] = (), raw: Sequence[tuple[str, bytes | HsmCaError]] = (),
    ) -> None:
        """A refused record for every request a batch-wide error stopped, in one commit
        (checked drafts name their subject; unchecked requests their bytes' SHA-256)."""
        actor = self.actor()
        with self.store.transaction():
            for d in drafts:
                self.audit.append(
                    actor, "issue", "refused", ca=ca_name, profile=profile_name,
                    csr_sha256=d.csr_sha256, subject=d.subject_text, detail=f"{d.source}: {error}",
                )
            for source, data in raw:
                self.audit.append(
                    actor, "issue", "refused", ca=ca_name, profile=profile_name,
                    csr_sha256=None if isinstance(data, HsmCaError)
                    else hashlib.sha256(data).hexdigest(),
                    detail=f"{source}: {error}",
                )

    def _check_csrs(
        self, part: Sequence[tuple[str, bytes | HsmCaError]], first: int, profile: Profile,
        ca: CaRecord,
        days: int | None, now: _dt.datetime, path_length: int | None,
        results: list[IssuedCertificate | Refusal | None],
    ) -> list[_Draft]:
        """Check CSRs against the profile; refusals are recorded and placed in ``results``."""
        from hsm_ca.policy import check_request, csr_sha256, load_csr

        actor = self.actor()
        drafts: list[_Draft] = []
        for i, (source, data) in enumerate(part, first):
            digest = None if isinstance(data, HsmCaError) else hashlib.sha256(data).hexdigest()
            csr = None
            try:
                if isinstance(data, HsmCaError):  # could not be read: refused like the rest
                    raise data
                csr = load_csr(data, source)
                digest = csr_sha256(csr)
                checked = check_request(csr, profile)
                nb, na = _validity(profile, days, now, ca)
                drafts.append(
                    _Draft(
                        profile=profile, subject=checked.subject, public_key=checked.public_key,
                        sans=checked.sans, not_before=nb, not_after=na,
                        csr_sha256=checked.csr_sha256, key_type=checked.key_type,
                        path_length=path_length, source=source, index=i,
                    )
                )
            except HsmCaError as e:
                subject_text = None
                if csr is not None:
                    with contextlib.suppress(Exception):
                        subject_text = csr.subject.rfc4514_string()
                self.audit.append(
                    actor, "issue", "refused", ca=ca.name, profile=profile.name,
                    subject=subject_text, csr_sha256=digest, detail=f"{source}: {e}",
                )
                results[i] = Refusal(source, e)
        return drafts

    def _context(
        self,
        *,
        ca_name: str,
        issuer_name: x509.Name,
        issuer_handle: KeyHandle,
        issuer_key_type: str,
        issuer_cert: x509.Certificate | None,
        new_ca: tuple[str, str | None, str, str] | None,
        on_issued: Callable[[IssuedCertificate], None] | None = None,
        capture: bool = False,
    ) -> _IssueContext:
        # Signatures from a hardware token are checked before they are stored (a faulty HSM
        # must not issue); the built-in engine signs with cryptography in this process, where
        # a check would cost as much as the signature and test cryptography against itself.
        check = capture or not getattr(self._engine, "signatures_trusted", False)
        return _IssueContext(
            ca_name=ca_name, issuer_name=issuer_name, issuer_handle=issuer_handle,
            issuer_key_type=issuer_key_type, issuer_cert=issuer_cert, new_ca=new_ca,
            on_issued=on_issued, base_url=self.config.base_url,
            publishes_deltas=self._issuer_publishes_deltas(ca_name),
            private_key=as_private_key(issuer_handle),
            hash_alg=signature_hash_for(issuer_key_type),
            issuer_public=issuer_handle.public_key() if check else None,
            issuer_text=issuer_name.rfc4514_string(),
            capture=capturing_key(issuer_handle) if capture else None,
        )

    def _issue_batch(self, drafts: list[_Draft], ctx: _IssueContext) -> list[IssuedCertificate | Refusal]:
        """Reserve, sign in this process and store: the path for CAs and engine-held keys."""
        self._reserve(drafts, ctx)
        return self._store(drafts, self._sign(drafts, ctx), ctx)

    def _reserve(self, drafts: list[_Draft], ctx: _IssueContext) -> None:
        """Step 1: serials and intent records, durable before the HSM signs anything."""
        actor, audit, store = self.actor(), self.audit, self.store
        created = rfc3339(_now())
        with store.transaction():
            for d in drafts:
                while True:
                    d.serial = new_serial()
                    if store.reserve_serial(format_serial(d.serial), ctx.ca_name, created):
                        break
                audit.append(
                    actor, "issue", "intent", ca=ctx.ca_name, key_label=ctx.issuer_handle.label,
                    profile=d.profile.name, serial=format_serial(d.serial),
                    subject=d.subject_text, csr_sha256=d.csr_sha256,
                    detail=_issue_detail(d),
                )

    def _sign(self, drafts: list[_Draft], ctx: _IssueContext) -> list[x509.Certificate | HsmCaError]:
        """Step 2: build and sign through the engine. Touches no database, so nothing is
        recorded until step 3 has every result."""
        signed: list[x509.Certificate | HsmCaError] = []
        for d in drafts:
            try:
                builder = _builder(d, ctx)
                linted = _prelint(builder, d.profile, ctx.issuer_key_type, ctx.hash_alg)
                cert = builder.sign(ctx.private_key, ctx.hash_alg)
                if linted is not None and linted != cert.tbs_certificate_bytes:
                    raise EngineError("the signed certificate differs from the one that was linted")
                if ctx.issuer_public is not None:
                    _check_signature(cert, ctx.issuer_public)
                signed.append(cert)
            except HsmCaError as e:
                signed.append(e)
            except (ValueError, TypeError) as e:
                signed.append(EngineError(f"signing failed: {e}"))
        return signed

    def _submit(self, drafts: list[_Draft], ctx: _IssueContext,
                helper: Any) -> list[_Ticket | HsmCaError]:
        """Step 2, pipelined: build each certificate around a placeholder signature and send
        its TBS to the signing helper, without waiting for the token."""
        assert ctx.capture is not None
        capture_key, request = ctx.capture
        tickets: list[_Ticket | HsmCaError] = []
        for d in drafts:
            try:
                builder = _builder(d, ctx)
                linted = _prelint(builder, d.profile, ctx.issuer_key_type, ctx.hash_alg)
                placeholder = builder.sign(capture_key, ctx.hash_alg)
                tbs = request.data
                assert tbs is not None
                if linted is not None and linted != tbs:
                    raise EngineError("the signed certificate differs from the one that was linted")
                ticket = _Ticket(placeholder.public_bytes(serialization.Encoding.DER), tbs,
                                 request.algorithm, request.padding)
                try:
                    helper.submit(tbs, request.algorithm, request.padding)
                    ticket.submitted = True
                except EngineError:
                    pass  # signed in this process when collected
                tickets.append(ticket)
            except HsmCaError as e:
                tickets.append(e)
            except (ValueError, TypeError) as e:
                tickets.append(EngineError(f"signing failed: {e}"))
        return tickets

    def _collect(self, tickets: list[_Ticket | HsmCaError], ctx: _IssueContext,
                 helper: Any) -> list[x509.Certificate | HsmCaError]:
        """Step 2, second half: take the helper's signatures in order, splice each into its
        certificate and check it against the CA's public key before anything is stored."""
        from hsm_ca.engine.p11_helper import HelperGone
        from hsm_ca.x509util import splice_signature

        signed: list[x509.Certificate | HsmCaError] = []
        for t in tickets:
            if isinstance(t, HsmCaError):
                signed.append(t)
                continue
            try:
                signature = None
                if t.submitted:
                    with contextlib.suppress(HelperGone):  # the helper died: sign here instead
                        signature = helper.result()
                if signature is None:
                    signature = ctx.issuer_handle.sign(t.tbs, t.algorithm, t.padding)
                cert = x509.load_der_x509_certificate(splice_signature(t.placeholder, t.tbs, signature))
                _check_signature(cert, ctx.issuer_public)  # type: ignore[arg-type]
                signed.append(cert)
            except HsmCaError as e:
                signed.append(e)
            except (ValueError, TypeError) as e:
                signed.append(EngineError(f"signing failed: {e}"))
        return signed

    def _store(self, drafts: list[_Draft], signed: list[x509.Certificate | HsmCaError],
               ctx: _IssueContext) -> list[IssuedCertificate | Refusal]:
        """Step 3: certificate rows and issued records, one transaction."""
        actor, audit, store = self.actor(), self.audit, self.store
        created = rfc3339(_now())
        ca_name, issuer_handle, new_ca, on_issued = (
            ctx.ca_name, ctx.issuer_handle, ctx.new_ca, ctx.on_issued)
        results: list[IssuedCertificate | Refusal] = []
        formatted: dict[_dt.datetime, str] = {}  # a batch shares its validity: format it once

        def times(when: _dt.datetime) -> str:
            text = formatted.get(when)
            if text is None:
                text = formatted[when] = rfc3339(when)
            return text

        with store.transaction():
            for d, cert in zip(drafts, signed, strict=True):
                serial = format_serial(d.serial)
                if isinstance(cert, HsmCaError):
                    refused = isinstance(cert, PolicyViolation)
                    store.mark_serial(serial, "refused" if refused else "failed")
                    audit.append(
                        actor, "issue", "refused" if refused else "failed", ca=ca_name,
                        key_label=issuer_handle.label,
                        profile=d.profile.name, serial=serial,
                        subject=d.subject_text, csr_sha256=d.csr_sha256,
                        detail=f"{d.source}: {cert}",
                    )
                    results.append(Refusal(d.source or serial, cert))
                    continue
                der = cert.public_bytes(serialization.Encoding.DER)
                sha = hashlib.sha256(der).hexdigest()
                pem = pem_from_der(der)
                not_before, not_after = times(d.not_before), times(d.not_after)
                sans = general_names_as_strings(d.sans)
                if new_ca is not None:
                    name, parent, label, key_type = new_ca
                    store.insert_ca(
                        {
                            "name": name,
                            "parent": parent,
                            "key_label": label,
                            "key_type": key_type,
                            "subject": d.subject_text,
                            "serial": serial,
                            "ski": ski_hex(cert),
                            "not_before": not_before,
                            "not_after": not_after,
                            "path_length": d.path_length,
                            "pem": pem,
                            "created": created,
                            "crl_number": 0,
                        }
                    )
                store.insert_certificate(
                    {
                        "serial": serial,
                        "ca": ca_name,
                        "profile": d.profile.name,
                        "subject": d.subject_text,
                        "sans": sans,
                        "key_type": d.key_type,
                        "not_before": not_before,
                        "not_after": not_after,
                        "sha256": sha,
                        "csr_sha256": d.csr_sha256,
                        "pem": pem,
                        "created": created,
                        "status": "valid",
                    }
                )
                store.mark_serial(serial, "issued")
                self._vouched[serial] = sha  # its signature was checked before it was stored
                audit.append(
                    actor, "issue", "issued", ca=ca_name, key_label=issuer_handle.label,
                    profile=d.profile.name, serial=serial, subject=d.subject_text,
                    csr_sha256=d.csr_sha256, object_sha256=sha, detail=_issue_detail(d),
                )
                summary = {
                    "serial": serial, "subject": d.subject_text, "issuer": ctx.issuer_text,
                    "not_before": not_before, "not_after": not_after,
                    "profile": d.profile.name, "ca": ca_name, "sans": list(sans),
                }
                issued = IssuedCertificate(cert, ca_name, d.profile.name, (), d.source, pem,
                                           summary)
                if on_issued is not None:  # rows that must exist iff the certificate does
                    on_issued(issued)
                results.append(issued)
        return results

    def issue_for_engine_key(
        self,
        ca_name: str,
        profile_name: str,
        subject: x509.Name,
        key_label: str,
        key_type: str,
        *,
        days: int | None = None,
        reuse_key: bool = False,
        on_issued: Callable[[IssuedCertificate], None] | None = None,
    ) -> IssuedCertificate:
        """Issue a certificate for a key generated inside the engine (responders, signers, TSA).

        ``on_issued`` runs inside the transaction that stores the certificate,
        so a signer's or responder's own row is committed with it or not at all.

        With ``reuse_key`` an existing key of that label is certified again
        (renewal); otherwise the label must be new (or an orphan of an
        interrupted run).
        """
        validate_key_type(key_type)
        actor = self.actor()
        try:
            profile = self.profiles.for_issuance(profile_name)
            ca = self.get_ca(ca_name)
            if key_type not in profile.key_types:
                raise PolicyViolation(f"key type {key_type} is not allowed by profile {profile_name}")
            now = _now()
            if now > ca.not_after:
                raise PolicyViolation(f"CA {ca_name!r} expired on {rfc3339(ca.not_after)}")
            nb, na = _validity(profile, days, now, ca)
        except HsmCaError as e:
            self.audit.append(actor, "issue", "refused", ca=ca_name, profile=profile_name,
                              subject=subject.rfc4514_string(), key_label=key_label, detail=str(e))
            raise
        handle: KeyHandle | None = None
        if reuse_key:
            with contextlib.suppress(KeyNotFound):
                handle = self.engine().get_key(key_label)
        if handle is None:
            handle = self._new_key(key_label, key_type, actor)
        draft = _Draft(
            profile=profile, subject=subject, public_key=handle.public_key(), sans=(),
            not_before=nb, not_after=na, csr_sha256=None, key_type=handle.key_type,
            source=key_label,
        )
        signer = CertificateAuthority(self, ca)
        result = self._issue_batch([draft], self._context(
            ca_name=ca.name, issuer_name=ca.subject, issuer_handle=signer.key_handle(),
            issuer_key_type=ca.key_type, issuer_cert=ca.certificate, new_ca=None,
            on_issued=on_issued,
        ))[0]
        if isinstance(result, Refusal):
            raise result.error
        return IssuedCertificate(result.certificate, result.ca, result.profile,
                                 tuple(self.chain(ca.name, include_root=False)), key_label)

    def create_ocsp_responder(
        self, ca_name: str, *, key_type: str | None = None, days: int | None = None
    ) -> IssuedCertificate:
        """A delegated OCSP responder certificate (ocsp-signing profile) for a CA.

        Renewing re-certifies the same engine key; the new certificate replaces
        the old one in the responder table at once.
        """
        ca = self.get_ca(ca_name)
        existing = self.store.get_responder(ca_name)
        label = existing["key_label"] if existing else f"ocsp-{ca_name}"
        if key_type is None:
            key_type = "ec-p256" if ca.key_type == "ed25519" else ca.key_type
        cn = f"OCSP Responder {ca_name}"
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        def record(issued: IssuedCertificate) -> None:
            self.store.set_responder({
                "ca": ca_name, "key_label": label, "serial": issued.serial, "pem": issued.pem,
                "not_after": rfc3339(issued.certificate.not_valid_after_utc),
                "created": rfc3339(_now()),
            })

        return self.issue_for_engine_key(
            ca_name, "ocsp-signing", subject, label, key_type, days=days,
            reuse_key=existing is not None, on_issued=record,
        )

    def _issuer_publishes_deltas(self, ca_name: str) -> bool:
        """Intermediates publish delta CRLs; roots (rarely revoking, offline) do not."""
        row = self.store.get_ca(ca_name)
        return row is not None and row["parent"] is not None

    # ------------------------------------------------------------- queries
    def list_certificates(self, ca: str | None = None, revoked: bool = False) -> list[dict[str, Any]]:
        if ca is not None:
            self.get_ca(ca)
        return [_cert_summary(r) for r in self.store.list_certificates(ca, revoked)]

    def show_certificate(self, serial_text: str) -> dict[str, Any]:
        serial = format_serial(parse_serial(serial_text))
        row = self.store.get_certificate(serial)
        if row is None:
            raise NotFound(f"no certificate with serial {serial}")
        out = _cert_summary(row)
        cert = x509.load_pem_x509_certificate(row["pem"].encode())
        out.update(
            issuer=cert.issuer.rfc4514_string(),
            sha256=row["sha256"],
            key_type=row["key_type"],
            revoked_at=row["revoked_at"],
            revocation_reason=row["revocation_reason"],
            extensions=[e.oid._name for e in cert.extensions],
            pem=row["pem"],
        )
        return out


def _cert_summary(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "serial": row["serial"],
        "ca": row["ca"],
        "profile": row["profile"],
        "subject": row["subject"],
        "name": row["subject"] or (row["sans"][0] if row["sans"] else ""),
        "sans": row["sans"],
        "not_before": row["not_before"],
        "not_after": row["not_after"],
        "status": row["status"],
    }


def _chunk_sizes(n: int, first: int = 4, top: int = 16) -> list[int]:
    """Part sizes for a pipelined batch: small at both ends, so the token starts signing
    early and little is left to store once it has finished, ``top`` in between."""
    ramp = []
    size = first
    while size < top:
        ramp.append(size)
        size *= 2
    if n <= 2 * sum(ramp):
        return [first] * (n // first) + ([n % first] if n % first else [])
    middle = n - 2 * sum(ramp)
    count = -(-middle // top)
    return ramp + [middle // count + (1 if i < middle % count else 0) for i in range(count)] \
        + ramp[::-1]


def _validity(
    profile: Profile, days: int | None, now: _dt.datetime, issuer: CaRecord | None
) -> tuple[_dt.datetime, _dt.datetime]:
    """Requested or default days, clamped to the profile, the BRs and the issuer."""
    wanted = profile.default_days if days is None else days
    if wanted < 1:
        raise UsageError("--days must be at least 1")
    wanted = min(wanted, profile.max_days)
    if profile.cabf_server_auth:
        wanted = min(wanted, cabf_max_days(now))
    not_after = now + _dt.timedelta(days=wanted) - _dt.timedelta(seconds=1)
    if issuer is not None and not_after > issuer.not_after:
        not_after = issuer.not_after
    return now, not_after


def _builder(d: _Draft, ctx: _IssueContext) -> x509.CertificateBuilder:
    """The certificate the profile says, for a checked draft (pure: no I/O, no engine)."""
    ca_name, issuer_name, issuer_cert = ctx.ca_name, ctx.issuer_name, ctx.issuer_cert
    p = d.profile
    b = (
        x509.CertificateBuilder()
        .subject_name(d.subject)
        .issuer_name(issuer_name)
        .public_key(d.public_key)  # type: ignore[arg-type]
        .serial_number(d.serial)
        .not_valid_before(d.not_before)
        .not_valid_after(d.not_after)
    )
    b = b.add_extension(
        x509.BasicConstraints(ca=p.is_ca, path_length=d.path_length if p.is_ca else None),
        critical=True,
    )
    ku = set(p.key_usage)
    if d.key_type.startswith("ec-") or d.key_type == "ed25519":
        ku.discard("key_encipherment")
        ku.discard("data_encipherment")
    if d.key_type == "ed25519" or d.key_type.startswith("rsa-"):
        ku.discard("key_agreement")
    b = b.add_extension(
        x509.KeyUsage(
            digital_signature="digital_signature" in ku,
            content_commitment="content_commitment" in ku,
            key_encipherment="key_encipherment" in ku,
            data_encipherment="data_encipherment" in ku,
            key_agreement="key_agreement" in ku,
            key_cert_sign="key_cert_sign" in ku,
            crl_sign="crl_sign" in ku,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if p.extended_key_usage:
        b = b.add_extension(
            x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in p.eku_oids()]),
            critical=p.eku_critical,
        )
    if d.sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(d.sans)), critical=not len(d.subject))
    if p.is_ca or p.subject_key_identifier:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(d.public_key), critical=False)  # type: ignore[arg-type]
    if issuer_cert is not None:
        try:
            ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]
        b = b.add_extension(aki, critical=False)
    elif p.is_ca:  # self-signed root: AKI equal to its own SKI
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(d.public_key),  # type: ignore[arg-type]
            critical=False,
        )
    if p.policies:
        b = b.add_extension(
            x509.CertificatePolicies(
                [x509.PolicyInformation(x509.ObjectIdentifier(o), None) for o in p.policies]
            ),
            critical=False,
        )
    if d.extra.get("name_constraints") is not None:
        b = b.add_extension(d.extra["name_constraints"], critical=True)
    if p.ocsp_no_check:
        b = b.add_extension(x509.OCSPNoCheck(), critical=False)
    base = ctx.base_url
    if base and issuer_cert is not None:
        b = b.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP,
                        x509.UniformResourceIdentifier(f"{base}/ocsp/{ca_name}"),
                    ),
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(f"{base}/ca/{ca_name}.crt"),
                    ),
                ]
            ),
            critical=False,
        )
        b = b.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(f"{base}/crl/{ca_name}.crl")],
                        relative_name=None, reasons=None, crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
        if ctx.publishes_deltas and not p.cabf_server_auth:
            # (the BRs allow no Freshest CRL extension in TLS server certificates)
            # where delta CRLs are found (RFC 5280 4.2.1.15); validators such as
            # pyhanko look for deltas only through this extension of the certificate
            b = b.add_extension(
                x509.FreshestCRL([
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(
                            f"{base}/crl/{ca_name}-delta.crl")],
                        relative_name=None, reasons=None, crl_issuer=None,
                    )
                ]),
                critical=False,
            )
    return b

def _prelint(builder: x509.CertificateBuilder, profile: Profile, issuer_key_type: str,
             hash_alg: Any) -> bytes | None:
    """With ``lint = true`` in the profile: sign the TBS with a throwaway key and lint it.

    Returns the linted TBS bytes (the HSM's certificate must match them), or
    raises PolicyViolation naming the findings, before the CA key is used.
    """
    if not profile.lint:
        return None
    from hsm_ca.linting import lint_certificate, throwaway_key

    pre = builder.sign(throwaway_key(issuer_key_type), hash_alg)
    findings = lint_certificate(pre.public_bytes(serialization.Encoding.DER),
                                cabf_serverauth=profile.cabf_server_auth)
    if findings:
        raise PolicyViolation(f"pre-issuance lint failed ({profile.name}): {', '.join(findings)}")
    return pre.tbs_certificate_bytes


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_signature(cert: x509.Certificate, public_key: PublicKeyTypes) -> None:
    """Refuse to store what the engine signed wrongly (a faulty HSM must not issue)."""
    try:
        _verify_with(cert, public_key)
    except HsmCaError:
        raise
    except Exception as e:  # InvalidSignature and friends
        raise EngineError(
            f"the HSM engine produced an invalid signature ({type(e).__name__})"
        ) from e


def _verify_with(cert: x509.Certificate, public_key: PublicKeyTypes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    sig = cert.signature
    tbs = cert.tbs_certificate_bytes
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(sig, tbs, ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(sig, tbs, padding.PKCS1v15(), cert.signature_hash_algorithm)  # type: ignore[arg-type]
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(sig, tbs)
    else:
        raise EngineError("unsupported issuer key type")


class CertificateAuthority:
    """One CA: its record and its key handle, for issuing (and later revoking)."""

    def __init__(self, authority: Authority, record: CaRecord) -> None:
        self.authority = authority
        self.record = record
        self._handle: KeyHandle | None = None

    @property
    def name(self) -> str:
        return self.record.name

    def key_handle(self) -> KeyHandle:
        if self._handle is None:
            handle = self.authority.engine().get_key(self.record.key_label)
            if key_type_of(handle.public_key()) != key_type_of(self.record.certificate.public_key()) \
                    or handle.public_key() != self.record.certificate.public_key():
                raise EngineError(
                    f"HSM key {self.record.key_label!r} does not match CA {self.name!r}'s certificate"
                )
            self._handle = handle
        return self._handle

    def issue(
        self, csr: bytes, profile: str, *, days: int | None = None, source: str = "CSR"
    ) -> IssuedCertificate:
        """Issue one certificate; raises the refusal instead of returning it."""
        result = self.authority.sign_csrs(self.name, [(source, csr)], profile, days=days)[0]
        if isinstance(result, Refusal):
            raise result.error
        return result


def open_engine(config: HomeConfig) -> HsmEngine:
    """Build the engine a home is configured for."""
    if config.engine == "soft":
        from hsm_ca.engine.soft import SoftEngine

        return SoftEngine(config.hsm_path, config.nodes, lock_path=config.home / ".hsm.lock",
                          partition_id=config.partition_id)
    if config.engine == "pkcs11":
        try:
            from hsm_ca.engine.pkcs11 import Pkcs11Engine  # type: ignore[import-not-found]
        except ImportError as e:
            raise ConfigError(
                "the pkcs11 engine needs python-pkcs11: pip install 'hsm-ca[pkcs11]'"
            ) from e
        assert config.pkcs11 is not None
        return Pkcs11Engine(config.pkcs11)  # type: ignore[no-any-return]
    raise ConfigError(f"unknown engine {config.engine!r}")
