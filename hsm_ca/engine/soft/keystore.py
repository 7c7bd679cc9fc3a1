"""The built-in engine: a software partition modelled on an AWS CloudHSM one.

Layout of a partition directory::

    keystore       line 1: canonical JSON body; line 2: HMAC-SHA256 of line 1
    partition.key  32 random bytes keying that HMAC (0600)
    .lock          flock target serialising writers across processes

Beside the lock (``HOME/.hsm.lock``, so outside ``HOME/hsm`` and every replica
node) lives the attempt journal ``HOME/.hsm.attempt``: see :class:`_Attempts`.

A random 256-bit master key (MK) encrypts every private key with AES-256-GCM,
the key's label and attributes bound as associated data so blobs cannot be
swapped between labels. Each user's PIN derives (scrypt, parameters stored in
the authenticated header) a key that wraps the MK, so a PIN change rewrites
one small blob. Failed-login counters and lockout live in the same
authenticated file, so a restart does not reset them and an edit is seen as
tampering. What software cannot do (hide the files from root, slow a stolen
copy beyond the KDF) is said in the README's security model.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsm_ca import kdf
from hsm_ca.engine.base import (
    MAX_FAILED_LOGINS,
    KeySpec,
    Role,
    UserInfo,
    validate_key_type,
    validate_label,
)
from hsm_ca.engine.keys import new_software_key
from hsm_ca.errors import (
    AlreadyExists,
    EngineError,
    HsmCaError,
    KeyNotFound,
    LockedOut,
    LoginFailed,
    NotFound,
    PermissionDenied,
    Tampered,
    UsageError,
)
from hsm_ca.fileio import KEYSTORE_BYTES, InputError, atomic_write, read_regular_file, show_path
from hsm_ca.names import check_name, fold

FORMAT = "hsm-ca-keystore"
VERSION = 1
DEFAULT_SCRYPT_N = 2**14
MIN_SCRYPT_N = 2**10
KEYSTORE = "keystore"
PARTITION_KEY = "partition.key"
ATTEMPT_SUFFIX = ".attempt"
_ATTEMPT_BYTES = 4096  # one marker: {"user": <name of at most 64 characters>}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def canonical_json(obj: Any) -> bytes:
    """One byte string per value, so MACs and AADs are reproducible."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_small(path: Path, limit: int, what: str) -> bytes:
    """A regular file of at most ``limit`` bytes, whole (fileio's bounded reader).

    A FIFO, device or oversized file where a partition file should be is
    tampering, never a hang or an unbounded read; a missing file raises
    FileNotFoundError and an unreadable one OSError, as before, so the node
    is reported missing or unreachable.
    """
    st = os.stat(path)  # FileNotFoundError / OSError: missing or unreachable
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        raise Tampered(f"{what} {show_path(path)} has been tampered with: "
                       f"not a regular file of at most {limit} bytes")
    try:
        return read_regular_file(path, limit, what)
    except InputError as e:  # changed since the stat, or unreadable
        raise OSError(e.reason) from None


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably, mode 0600 from birth."""
    atomic_write(path, data, 0o600)


class _Attempts:
    """The attempt journal: a login attempt in progress, outside the replicated keystore.

    Used only under the keystore lock. Before a PIN is judged, a marker
    naming the user is written and synced here; a success clears it and
    writes nothing else (the keystore, its generation and its replicas are
    untouched unless a failure count has to be reset); a failure is counted
    in the keystore (authenticated, on every node) and then cleared. A
    marker still present at the next login under the lock is an attempt
    whose process died between marking and settling - mid-judge, or
    writing its failure - and is counted as a failure first. So a killed
    attempt is spent, as when the attempt was reserved in the keystore
    itself, at one write of a small local file instead of two writes of the
    whole keystore to every node per login.

    Crashes err on the side of counting: a success or a counted failure
    killed before the marker is cleared counts one failure more. Deleting
    the journal forgets only an attempt whose process was killed mid-way;
    whoever can do that can write the home, and could as well put back an
    older keystore copy (README: write access to the home can reset counters).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise EngineError(f"cannot open the HSM attempt journal {show_path(path)}: "
                              f"{e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise Tampered(f"the HSM attempt journal {show_path(path)} has been tampered with: "
                           "not a regular file")

    def pending(self) -> str | None:
        """The user whose attempt was left unsettled, if any (garbage names nobody)."""
        raw = os.pread(self._fd, _ATTEMPT_BYTES + 1, 0)
        if not raw:
            return None
        try:
            marker = json.loads(raw)
        except ValueError:
            return None
        user = marker.get("user") if isinstance(marker, dict) else None
        return user if isinstance(user, str) else None

    def mark(self, user: str) -> None:
        """Durably note an attempt for ``user`` before its PIN is judged."""
        data = canonical_json({"user": user}) + b"\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def clear(self) -> None:
        """Settled. Not synced: after a power loss the marker may be back, counting once more."""
        os.ftruncate(self._fd, 0)

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class SoftKeyHandle:
    """A handle to a key in a soft partition; signing goes through the engine."""

    label: str
    key_type: str
    extractable: bool
    _public_pem: str
    _engine: SoftEngine

    def public_key(self) -> PublicKeyTypes:
        cached = self.__dict__.get("_public_cache")
        if cached is None:
            cached = serialization.load_pem_public_key(self._public_pem.encode())
            self.__dict__["_public_cache"] = cached
        return cached

    def sign(self, data: bytes, algorithm: Any, padding_: Any = None) -> bytes:
        return self._engine._sign(self.label, data, algorithm, padding_)

    def __repr__(self) -> str:
        return f"SoftKeyHandle(label={self.label!r}, key_type={self.key_type!r})"


@dataclass
class NodeStatus:
    """What one replica partition looks like right now."""

    path: Path
    health: str  # ok | stale | missing | unreachable | tampered | foreign
    generation: int | None
    detail: str = ""
    last_repair: str | None = None  # when this node was last rewritten because it was bad
    last_problem: str | None = None  # what it was then: stale, missing or tampered (and why)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "health": self.health, "generation": self.generation,
                "detail": self.detail, "last_repair": self.last_repair,
                "last_problem": self.last_problem}


class SoftEngine:
    """A software HSM partition: users, roles, lockout, encrypted keys, tamper evidence.

    The partition may be replicated to several *nodes* (directories, ideally on
    different disks). Every change is written to all reachable nodes or to
    none (temporary files everywhere first, then renames); reads take the
    authentic node with the highest generation, so signing goes on while one
    healthy node remains, and stale or re-added nodes are brought up to date.
    """

    name = "soft"
    # signatures are made by cryptography in this process (see Authority._context)
    signatures_trusted = True

    def __init__(self, path: Path, replicas: Sequence[Path] = (), lock_path: Path | None = None,
                 partition_id: str | None = None) -> None:
        self.path = Path(path)
        self.partition_id = partition_id
        self.nodes = [self.path, *(Path(r) for r in replicas)]
        self.lock_path = Path(lock_path) if lock_path else self.path.parent / ".hsm.lock"
        # one journal per lock (".hsm.lock" -> ".hsm.attempt"), used only while holding it
        self.attempts_path = self.lock_path.with_suffix(ATTEMPT_SUFFIX)
        self._mk: bytes | None = None
        self._user: str | None = None
        self._role: Role | None = None
        self._loaded_keys: dict[str, Any] = {}
        self._state_cache: dict[str, Any] | None = None
        self._raw_best: tuple[bytes, bytes] | None = None
        self.node_status: list[NodeStatus] = []
        # nodes found stale, missing or tampered and rewritten by this object, oldest first;
        # the engine knows nothing of the audit trail, so whoever drives it drains this
        # list and records each one (Authority.record_engine_change)
        self.repairs: list[dict[str, Any]] = []
        self._joining: set[Path] = set()  # nodes being added: their first sync is no repair

    # ----------------------------------------------------------------- files
    @classmethod
    def create(
        cls,
        path: Path,
        *,
        officer: str,
        officer_pin: str,
        user: str,
        user_pin: str,
        scrypt_n: int = DEFAULT_SCRYPT_N,
    ) -> SoftEngine:
        """Create a new partition with one crypto officer and one crypto user."""
        path = Path(path)
        if (path / KEYSTORE).exists():
            raise AlreadyExists(f"an HSM partition already exists at {path}")
        for name in (officer, user):
            check_name(name, "HSM user name")
        if fold(officer) == fold(user):  # one would overwrite the other: no officer left
            raise UsageError("the crypto-officer and crypto-user names must differ "
                             "(names are unique regardless of case)")
        if kdf.scrypt_problem(scrypt_n, 8, 1) is not None or scrypt_n < MIN_SCRYPT_N:
            raise UsageError(
                f"scrypt cost must be a power of two from {MIN_SCRYPT_N} to "
                f"{kdf.MAX_WORK // (128 * 8)}"
            )
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        write_private_file(path / PARTITION_KEY, secrets.token_bytes(32))
        engine = cls(path)
        mk = secrets.token_bytes(32)
        state: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "partition_id": secrets.token_hex(16),
            "generation": 0,
            "created": _now(),
            "kdf": {"name": "scrypt", "n": scrypt_n, "r": 8, "p": 1},
            "users": {},
            "keys": {},
        }
        for name, pin, role in ((officer, officer_pin, Role.OFFICER), (user, user_pin, Role.USER)):
            _check_pin(pin)
            state["users"][name] = engine._wrap_for_user(state, mk, name, role, pin)
        engine._write(state)
        return engine

    @staticmethod
    def _read_node(node: Path) -> tuple[dict[str, Any], bytes, bytes]:
        """Authenticate one node: (state, keystore bytes, partition key); any altered byte is tampering."""
        try:
            raw = _read_small(node / KEYSTORE, KEYSTORE_BYTES, "HSM keystore")
        except FileNotFoundError as e:
            raise EngineError(f"no HSM partition at {node}") from e
        try:
            key = _read_small(node / PARTITION_KEY, 64, "HSM partition key")
        except FileNotFoundError as e:
            raise Tampered(f"HSM partition at {node} has been tampered with: its partition key is missing") from e
        if len(key) != 32:
            raise Tampered(f"HSM partition at {node}: partition key has been tampered with")
        parts = raw.split(b"\n")
        if len(parts) != 3 or parts[2] != b"":
            raise Tampered(f"HSM keystore {node / KEYSTORE} has been tampered with")
        body, mac = parts[0], parts[1]
        expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(mac, expected):
            raise Tampered(f"HSM keystore {node / KEYSTORE} has been tampered with")
        try:
            state = json.loads(body)
        except ValueError as e:  # authenticated yet unparsable: treat as tampering
            raise Tampered(f"HSM keystore {node / KEYSTORE} is corrupt") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT or \
                state.get("version") != VERSION:
            raise EngineError(f"unsupported HSM keystore format at {node}")
        params = state.get("kdf")
        problem = (kdf.scrypt_problem(params.get("n"), params.get("r"), params.get("p"))
                   if isinstance(params, dict) and params.get("name") == "scrypt"
                   else "no scrypt parameters")
        if problem is not None:  # authentic yet absurd: only someone with the key wrote it
            raise Tampered(f"HSM keystore {node / KEYSTORE} has been tampered with: {problem}")
        return state, raw, key

    def _read(self) -> dict[str, Any]:
        """The authentic state with the highest generation among the nodes."""
        found: list[tuple[Path, dict[str, Any], bytes, bytes]] = []
        status: list[NodeStatus] = []
        first_tamper: Tampered | None = None
        for node in self.nodes:
            try:
                state, raw, key = self._read_node(node)
            except Tampered as e:
                first_tamper = first_tamper or e
                status.append(NodeStatus(node, "tampered", None, str(e)))
                continue
            except EngineError as e:
                health = "missing" if node.parent.exists() else "unreachable"
                status.append(NodeStatus(node, health, None, str(e)))
                continue
            except OSError as e:
                status.append(NodeStatus(node, "unreachable", None, e.strerror or str(e)))
                continue
            found.append((node, state, raw, key))
            status.append(NodeStatus(node, "ok", int(state["generation"])))
        if not found:
            self.node_status = status
            if first_tamper is not None:
                raise first_tamper
            # the home says there is a partition: a keystore that vanished is tampering too
            raise Tampered(f"HSM keystore missing at {self.path}: deleted or tampered with")
        # Which partition is ours: the configured one, else the primary's, else the newest.
        # A node holding another partition is never read from and never written to.
        wanted = self.partition_id
        if wanted is None:
            primary = next((f for f in found if f[0] == self.path), None)
            wanted = (primary or max(found, key=lambda f: int(f[1]["generation"])))[1]["partition_id"]
        ours = [f for f in found if f[1]["partition_id"] == wanted]
        for st in status:
            if st.health == "ok" and next(f for f in found if f[0] == st.path)[1]["partition_id"] != wanted:
                st.health, st.detail = "foreign", "holds another HSM partition; left untouched"
        if not ours:
            self.node_status = status
            raise Tampered(f"no node holds this CA's HSM partition {wanted}; the nodes hold others")
        best = max(ours, key=lambda f: int(f[1]["generation"]))
        repaired = best[1].get("node_repairs")
        for st in status:
            if st.health == "ok" and st.generation is not None and \
                    st.generation < int(best[1]["generation"]):
                st.health = "stale"
            last = repaired.get(str(st.path)) if isinstance(repaired, dict) else None
            if isinstance(last, dict):
                st.last_repair, st.last_problem = last.get("at"), last.get("problem")
        self.node_status = status
        self._raw_best = (best[2], best[3])
        self._state_cache = best[1]
        return best[1]

    def _partition_key(self) -> bytes:
        if self._raw_best is None:
            self._read()
        assert self._raw_best is not None
        return self._raw_best[1]

    def _write(self, state: dict[str, Any]) -> None:
        """Write the next generation to every reachable node, or to none.

        A node last read as stale, missing or tampered is repaired by this
        write; each such repair is noted in the state itself (authenticated,
        so ``node list`` can say when) and queued in ``self.repairs``.
        """
        state["generation"] = int(state.get("generation", 0)) + 1
        mending = self._mending()
        if mending:
            now = _now()
            notes = state.get("node_repairs")
            notes = dict(notes) if isinstance(notes, dict) else {}
            for st in mending:
                problem = f"{st.health}: {st.detail}" if st.detail else st.health
                notes[str(st.path)] = {"at": now, "problem": problem[:300]}
            state["node_repairs"] = notes
        if self._raw_best is not None:
            key = self._raw_best[1]
        elif self._any_node():
            key = self._partition_key()
        else:  # a partition being created: its key was just written
            key = _read_small(self.path / PARTITION_KEY, 64, "HSM partition key")
        body = canonical_json(state)
        mac = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
        self._replicate(body + b"\n" + mac + b"\n", key)
        self._state_cache = state
        self._raw_best = (body + b"\n" + mac + b"\n", key)
        for st in mending:
            self.repairs.append({"node": str(st.path), "problem": st.health, "detail": st.detail,
                                 "at": state["node_repairs"][str(st.path)]["at"],
                                 "generation": state["generation"]})
            st.health, st.generation, st.detail = "ok", state["generation"], ""
            st.last_repair = state["node_repairs"][str(st.path)]["at"]
            st.last_problem = state["node_repairs"][str(st.path)]["problem"]
        self._joining.clear()

    def _mending(self) -> list[NodeStatus]:
        """The nodes the next write will rewrite although they were not healthy."""
        return [st for st in self.node_status
                if st.health in ("stale", "missing", "tampered") and st.path.parent.exists()
                and st.path not in self._joining]

    def _any_node(self) -> bool:
        return any((n / KEYSTORE).exists() for n in self.nodes)

    def _replicate(self, raw: bytes, key: bytes, only: Sequence[Path] | None = None) -> None:
        """Two-phase write: temporary files on all reachable nodes, then renames."""
        prepared: list[tuple[Path, Path]] = []
        foreign = {st.path for st in self.node_status if st.health == "foreign"}
        targets = [n for n in (only or self.nodes) if n.parent.exists() and n not in foreign]
        if not targets:
            raise EngineError("no reachable HSM node to write to")
        try:
            for node in targets:
                node.mkdir(mode=0o700, exist_ok=True)
                pk = node / PARTITION_KEY
                try:
                    same = _read_small(pk, 64, "HSM partition key") == key
                except (OSError, Tampered):  # absent, or anything but a small regular file
                    same = False
                if not same:
                    write_private_file(pk, key)
                tmp = node / f".{KEYSTORE}.{secrets.token_hex(4)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(raw)
                    fh.flush()
                    os.fsync(fh.fileno())
                prepared.append((node, tmp))
        except OSError as e:
            for _node, tmp in prepared:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise EngineError(f"cannot write HSM node {node}: {e.strerror or e}; nothing was changed") from e
        for node, tmp in prepared:
            os.replace(tmp, node / KEYSTORE)
            dfd = os.open(node, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def sync_nodes(self) -> list[NodeStatus]:
        """Bring stale, missing or damaged reachable nodes up to the best generation.

        A new generation is written to every node (not the old bytes copied to
        the bad ones), so the repair is itself recorded in the partition.
        """
        with self._locked() as state:
            behind = [st for st in self.node_status
                      if st.health in ("stale", "missing", "tampered") and st.path.parent.exists()]
            if behind:
                self._write(state)
                self._read()
        return self.node_status

    def add_node(self, path: Path) -> None:
        """Register a replica directory (empty, absent, or an older copy of this partition)."""
        path = Path(path)
        if path in self.nodes:
            return
        if (path / KEYSTORE).exists():
            try:
                other, _raw, _key = self._read_node(path)
            except HsmCaError as e:
                raise AlreadyExists(
                    f"{path} holds an HSM keystore that does not authenticate; refusing to overwrite it"
                ) from e
            state = self._read()
            if other.get("partition_id") != state["partition_id"]:
                raise AlreadyExists(f"{path} holds another HSM partition; refusing to overwrite it")
        elif path.exists() and any(path.iterdir()):
            raise AlreadyExists(f"{path} is not empty and holds no HSM partition")
        if not path.parent.exists():
            raise EngineError(f"{path.parent} does not exist")
        self.nodes.append(path)
        self._joining.add(path)
        self._read()
        self.sync_nodes()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock shared by all processes."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ------------------------------------------------------------ users, MK
    def _kek(self, state: dict[str, Any], salt: bytes, pin: str) -> bytes:
        """The PIN's key-encryption key: no verdict on the PIN yet, only _unwrap gives one."""
        params = state["kdf"]
        from hsm_ca import prelogin

        early = prelogin.take(salt, params["n"], params["r"], params["p"], pin)
        if early is not None:
            return early
        try:
            return kdf.derive(pin, salt, params["n"], params["r"], params["p"])
        except ValueError as e:  # bounded in _read_node already; a last line of defence
            raise Tampered(f"HSM keystore KDF parameters have been tampered with: {e}") from e

    def _user_aad(self, state: dict[str, Any], name: str, role: str) -> bytes:
        return canonical_json({"partition_id": state["partition_id"], "user": name, "role": role})

    def _wrap_for_user(
        self, state: dict[str, Any], mk: bytes, name: str, role: Role, pin: str
    ) -> dict[str, Any]:
        salt = secrets.token_bytes(16)
        nonce = secrets.token_bytes(12)
        ct = AESGCM(self._kek(state, salt, pin)).encrypt(
            nonce, mk, self._user_aad(state, name, role.value)
        )
        return {
            "role": role.value,
            "salt": _b64(salt),
            "wrapped_mk": _b64(nonce + ct),
            "failed_logins": 0,
            "locked": False,
            "created": _now(),
        }

    def _unwrap(self, state: dict[str, Any], name: str, kek: bytes) -> bytes | None:
        """The verdict on a PIN: its key unwraps the master key (authenticated) or it does not."""
        rec = state["users"][name]
        blob = _unb64(rec["wrapped_mk"])
        try:
            return AESGCM(kek).decrypt(blob[:12], blob[12:], self._user_aad(state, name, rec["role"]))
        except InvalidTag:
            return None

    def login(self, user: str, pin: str) -> None:
        """Log in; every attempt is noted, durably, before its PIN is judged.

        The lockout must hold however many processes guess at once: under the
        keystore lock an earlier attempt left unsettled is counted, the count
        is checked, the attempt is noted in the journal (:class:`_Attempts`),
        the PIN judged and the attempt settled within the same hold - a
        failure counted in the keystore (the user locked at the limit), a
        success only clearing the note - so at most MAX_FAILED_LOGINS wrong
        PINs are ever judged between successes, and a process killed mid-way
        has spent its attempt. A success writes the keystore only to reset a
        failure count or to repair a damaged node. The KDF, the slow part,
        runs before the lock: its output says nothing about the PIN until it
        is tried on the wrapped master key, which happens only after noting.
        """
        self.logout()
        state = self._read()
        rec = state["users"].get(user)
        if rec is None:
            raise LoginFailed(f"no HSM user named {user!r}")
        if rec["locked"]:
            raise self._locked_out(user)
        kek = self._kek(state, _unb64(rec["salt"]), pin)  # no verdict yet
        with self._locked() as fresh:
            journal = _Attempts(self.attempts_path)
            try:
                self._count_unsettled(fresh, journal)
                frec = fresh["users"].get(user)
                if frec is None:
                    raise LoginFailed(f"no HSM user named {user!r}")
                if frec["locked"] or frec["failed_logins"] >= MAX_FAILED_LOGINS:
                    raise self._locked_out(user)
                if frec["salt"] != rec["salt"] or fresh["kdf"] != state["kdf"]:
                    kek = self._kek(fresh, _unb64(frec["salt"]), pin)  # the PIN changed meanwhile
                journal.mark(user)  # the attempt is noted before it is judged
                mk = self._unwrap(fresh, user, kek)
                if mk is None:
                    frec["failed_logins"] += 1
                    if frec["failed_logins"] >= MAX_FAILED_LOGINS:
                        frec["locked"] = True
                    self._write(fresh)
                elif frec["failed_logins"] or self._mending():
                    frec["failed_logins"] = 0
                    self._write(fresh)
                journal.clear()
                failed, role = frec["failed_logins"], frec["role"]
            finally:
                journal.close()
        if mk is None:
            if failed >= MAX_FAILED_LOGINS:
                raise LockedOut(
                    f"wrong PIN for HSM user {user!r}; the user is now locked after "
                    f"{MAX_FAILED_LOGINS} failed logins"
                )
            left = MAX_FAILED_LOGINS - failed
            raise LoginFailed(f"wrong PIN for HSM user {user!r} ({left} attempts left)")
        self._mk, self._user, self._role = mk, user, Role(role)

    def _count_unsettled(self, state: dict[str, Any], journal: _Attempts) -> None:
        """Count an attempt whose process died before settling it as a failure (under the lock)."""
        user = journal.pending()
        if user is None:
            journal.clear()  # empty, or garbage that names nobody
            return
        rec = state["users"].get(user)
        if rec is not None and not rec["locked"]:
            rec["failed_logins"] += 1
            if rec["failed_logins"] >= MAX_FAILED_LOGINS:
                rec["locked"] = True
            self._write(state)
        journal.clear()

    @staticmethod
    def _locked_out(user: str) -> LockedOut:
        return LockedOut(
            f"HSM user {user!r} is locked after {MAX_FAILED_LOGINS} failed logins; "
            "a crypto officer must unlock it (hsm-ca hsm user unlock)"
        )

    def logout(self) -> None:
        self._mk = None
        self._user = None
        self._role = None
        self._loaded_keys.clear()

    def close(self) -> None:
        self.logout()

    @property
    def current_user(self) -> str | None:
        return self._user

    @property
    def current_role(self) -> Role | None:
        return self._role

    def _require(self, *roles: Role) -> bytes:
        if self._mk is None or self._role is None:
            raise PermissionDenied("not logged in to the HSM engine")
        if self._role not in roles:
            wanted = " or ".join(r.value for r in roles)
            raise PermissionDenied(
                f"HSM user {self._user!r} has the role {self._role.value}; this needs a {wanted}"
            )
        return self._mk

    def list_users(self) -> list[UserInfo]:
        state = self._read()
        return [
            UserInfo(n, Role(r["role"]), r["failed_logins"], r["locked"])
            for n, r in sorted(state["users"].items())
        ]

    def add_user(self, name: str, role: Role, pin: str) -> None:
        """Officer only: create a user whose PIN wraps the same master key.

        User names follow the name rule and are unique regardless of case
        (``Officer`` beside ``officer`` would make the trail ambiguous); the
        check is made under the keystore lock, so two concurrent adds of
        ``Foo`` and ``foo`` cannot both pass it.
        """
        mk = self._require(Role.OFFICER)
        check_name(name, "HSM user name")
        _check_pin(pin)
        with self._locked() as state:
            taken = next((u for u in state["users"] if fold(u) == fold(name)), None)
            if taken is not None:
                raise AlreadyExists(
                    f"HSM user {taken!r} already exists"
                    + (" (names are unique regardless of case)" if taken != name else "")
                )
            state["users"][name] = self._wrap_for_user(state, mk, name, Role(role), pin)
            self._write(state)

    def remove_user(self, name: str) -> None:
        self._require(Role.OFFICER)
        with self._locked() as state:
            if name not in state["users"]:
                raise NotFound(f"no HSM user named {name!r}")
            if name == self._user:
                raise PermissionDenied("an officer cannot remove itself")
            del state["users"][name]
            self._write(state)

    def unlock_user(self, name: str) -> None:
        self._require(Role.OFFICER)
        with self._locked() as state:
            if name not in state["users"]:
                raise NotFound(f"no HSM user named {name!r}")
            state["users"][name]["failed_logins"] = 0
            state["users"][name]["locked"] = False
            self._write(state)

    def change_pin(self, name: str, new_pin: str) -> None:
        """Re-wrap one blob: the user's own (any role) or, for an officer, anyone's."""
        mk = self._require(Role.OFFICER, Role.USER, Role.AUDITOR)
        if name != self._user and self._role is not Role.OFFICER:
            raise PermissionDenied("only a crypto officer may change another user's PIN")
        _check_pin(new_pin)
        with self._locked() as state:
            rec = state["users"].get(name)
            if rec is None:
                raise NotFound(f"no HSM user named {name!r}")
            state["users"][name] = self._wrap_for_user(state, mk, name, Role(rec["role"]), new_pin)
            self._write(state)

    # ------------------------------------------------------------------ keys
    def _key_aad(self, state: dict[str, Any], label: str, rec: dict[str, Any]) -> bytes:
        return canonical_json(
            {
                "partition_id": state["partition_id"],
                "label": label,
                "key_type": rec["key_type"],
                "extractable": rec["extractable"],
            }
        )

    def _handle(self, label: str, rec: dict[str, Any]) -> SoftKeyHandle:
        return SoftKeyHandle(label, rec["key_type"], rec["extractable"], rec["public"], self)

    def generate_key(self, spec: KeySpec) -> SoftKeyHandle:
        """Generate inside the engine; only the public half is ever returned."""
        mk = self._require(Role.USER)
        validate_key_type(spec.key_type)
        validate_label(spec.label)
        if spec.extractable:
            raise PermissionDenied("the built-in engine only makes non-extractable keys")
        key = new_software_key(spec.key_type)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with self._locked() as state:
            if spec.label in state["keys"]:
                raise AlreadyExists(f"a key labelled {spec.label!r} already exists in the HSM")
            rec: dict[str, Any] = {
                "key_type": spec.key_type,
                "extractable": False,
                "public": key.public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .decode(),
                "created": _now(),
                "owner": self._user,
            }
            nonce = secrets.token_bytes(12)
            rec["blob"] = _b64(nonce + AESGCM(mk).encrypt(nonce, der, self._key_aad(state, spec.label, rec)))
            state["keys"][spec.label] = rec
            self._write(state)
        del der
        self._loaded_keys[spec.label] = key
        return self._handle(spec.label, rec)

    def get_key(self, label: str) -> SoftKeyHandle:
        self._require(Role.USER)
        state = self._state_cache or self._read()
        rec = state["keys"].get(label)
        if rec is None:
            state = self._read()
            rec = state["keys"].get(label)
        if rec is None:
            raise KeyNotFound(f"no key labelled {label!r} in the HSM engine")
        return self._handle(label, rec)

    def list_keys(self) -> list[SoftKeyHandle]:
        """Key metadata is public (authenticated, not secret): no login needed."""
        state = self._read()
        return [self._handle(label, rec) for label, rec in sorted(state["keys"].items())]

    def destroy_key(self, label: str) -> None:
        self._require(Role.USER)
        with self._locked() as state:
            if label not in state["keys"]:
                raise KeyNotFound(f"no key labelled {label!r} in the HSM engine")
            del state["keys"][label]
            self._write(state)
        self._loaded_keys.pop(label, None)

    def current_partition_id(self) -> str:
        return str(self._read()["partition_id"])

    def generation(self) -> int:
        return int(self._read()["generation"])

    def _private_key(self, label: str) -> Any:
        mk = self._require(Role.USER)
        key = self._loaded_keys.get(label)
        if key is not None:
            return key
        state = self._read()
        rec = state["keys"].get(label)
        if rec is None:
            raise KeyNotFound(f"no key labelled {label!r} in the HSM engine")
        blob = _unb64(rec["blob"])
        try:
            der = AESGCM(mk).decrypt(blob[:12], blob[12:], self._key_aad(state, label, rec))
        except InvalidTag as e:
            raise Tampered(f"key {label!r} failed its integrity check") from e
        key = serialization.load_der_private_key(der, password=None)
        del der
        self._loaded_keys[label] = key
        return key

    def _sign(self, label: str, data: bytes, algorithm: Any, padding_: Any) -> bytes:
        key = self._private_key(label)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(algorithm))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding_ or padding.PKCS1v15(), algorithm or hashes.SHA256())
        return key.sign(data)


def _check_pin(pin: str) -> None:
    if not isinstance(pin, str) or len(pin) < 4:
        raise UsageError("PINs must be at least 4 characters")
    if len(pin) > 256:
        raise UsageError("PINs must be at most 256 characters")
