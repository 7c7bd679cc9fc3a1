"""Crypto-officer operations on the built-in engine: users, backup and restore, nodes.

All of them log in as the crypto officer (audited, like every login) and run
through the engine, which enforces the roles itself; the CLI only collects
PINs. A backup is one blob, encrypted and authenticated under the officer PIN
(scrypt, AES-256-GCM), holding the partition and a consistent snapshot of the
database; restoring checks the whole blob before writing anything.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import secrets
import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsm_ca import kdf
from hsm_ca.config import (
    CONFIG_FILE,
    DB_FILE,
    HSM_DIR,
    PROFILES_DIR,
    HomeConfig,
    load_config,
    write_config,
)
from hsm_ca.engine.base import Role, UserInfo
from hsm_ca.errors import (
    AlreadyExists,
    ConfigError,
    HsmCaError,
    LockedOut,
    LoginFailed,
    PolicyViolation,
    Tampered,
    UsageError,
)
from hsm_ca.fileio import OutputFile, atomic_write

if TYPE_CHECKING:
    from hsm_ca.authority import Authority
    from hsm_ca.engine.soft import SoftEngine

BACKUP_MAGIC = b"HSMCA-BACKUP-1\n"
BACKUP_SCRYPT_N = 2**16
# at least a production keystore's cost (kdf.MIN_BACKUP_N says why); at most
# 2**18 * 128 * r=8 bytes = 256 MiB of scrypt memory
MIN_BACKUP_N, MAX_BACKUP_N = kdf.MIN_BACKUP_N, 2**18


def _record(authority: Authority, action: str, outcome: str, **fields: Any) -> None:
    """Officer actions are audited under the officer's name."""
    authority.record_engine_change(action, outcome, hsm_user=authority.config.officer, **fields)


def _soft(authority: Authority) -> SoftEngine:
    from hsm_ca.engine.soft import SoftEngine

    engine = authority.engine(login=False)
    if not isinstance(engine, SoftEngine):
        raise UsageError(
            "this is for the built-in engine; a PKCS#11 token manages its users, backups and "
            "replication with its own tools"
        )
    return engine


def officer_login(authority: Authority, so_pin: str) -> SoftEngine:
    """Log the engine in as the crypto officer (audited, lockout applies)."""
    engine = _soft(authority)
    authority.check_rollback()
    officer = authority.config.officer
    try:
        engine.login(officer, so_pin)
    except (LoginFailed, LockedOut) as e:
        _record(authority,
            "login", "locked" if isinstance(e, LockedOut) else "failed",
            detail=f"officer {officer}: {e}")
        raise
    _record(authority, "login", "ok", detail=f"officer {officer}")
    return engine


# -------------------------------------------------------------------- users
def list_users(authority: Authority) -> list[UserInfo]:
    return _soft(authority).list_users()


def add_user(authority: Authority, so_pin: str, name: str, role: str, pin: str) -> None:
    """Add an engine user. User names follow the name rule (hsm_ca.names) and are unique
    regardless of case, checked by the engine under its lock (SoftEngine.add_user)."""
    from hsm_ca.names import check_name

    check_name(name, "HSM user name")  # before a login is spent on it
    engine = officer_login(authority, so_pin)
    engine.add_user(name, Role(role), pin)
    _record(authority, "user-add", "ok", detail=f"user {name} role {role}")


def remove_user(authority: Authority, so_pin: str, name: str) -> None:
    engine = officer_login(authority, so_pin)
    engine.remove_user(name)
    _record(authority, "user-remove", "ok", detail=f"user {name}")


def unlock_user(authority: Authority, so_pin: str, name: str) -> None:
    engine = officer_login(authority, so_pin)
    engine.unlock_user(name)
    _record(authority, "user-unlock", "ok", detail=f"user {name}")


def change_pin(authority: Authority, so_pin: str, name: str, new_pin: str) -> None:
    engine = officer_login(authority, so_pin)
    engine.change_pin(name, new_pin)
    _record(authority, "user-change-pin", "ok", detail=f"user {name}")


# -------------------------------------------------------------------- nodes
def list_nodes(authority: Authority) -> list[dict[str, Any]]:
    engine = _soft(authority)
    with contextlib.suppress(HsmCaError):  # every node bad: the statuses say how
        engine._read()
    return [st.as_dict() for st in engine.node_status]


def add_node(authority: Authority, so_pin: str, path: Path) -> list[dict[str, Any]]:
    """Add a replica partition; it is brought up to date at once."""
    path = Path(path).expanduser().resolve()
    cfg = authority.config
    if path == cfg.hsm_path.resolve() or path in [n.resolve() for n in cfg.nodes]:
        engine = officer_login(authority, so_pin)
        engine.sync_nodes()
        return [st.as_dict() for st in engine.node_status]
    engine = officer_login(authority, so_pin)
    engine.add_node(path)
    write_config(replace(cfg, nodes=(*cfg.nodes, path)))
    authority.config = load_config(cfg.home)
    _record(authority, "node-add", "ok", detail=f"node {path}")
    return [st.as_dict() for st in engine.node_status]


# ------------------------------------------------------------------- backup
def _kdf(pin: str, salt: bytes, n: int) -> bytes:
    return kdf.derive(pin, salt, n, 8, 1)


def _snapshot_db(path: Path) -> bytes:
    """A consistent copy of the live database through SQLite's backup API."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "snapshot.db"
        src = sqlite3.connect(str(path))
        dst = sqlite3.connect(str(target))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return target.read_bytes()


def backup(authority: Authority, so_pin: str, output: OutputFile | str | Path, *,
           scrypt_n: int | None = None) -> dict[str, Any]:
    """Write an encrypted, authenticated backup of the partition and the database.

    ``output`` is best the ``OutputFile`` the caller checked before asking for
    the officer PIN: the backup is written through it (a FIFO stays the one
    opened, a regular file is replaced atomically); a path is checked here.
    The backup's scrypt cost (default BACKUP_SCRYPT_N) is never below
    MIN_BACKUP_N nor below the partition's own: the backup carries the
    partition, and guessing the officer PIN must not get cheaper offline.
    """
    dest = output if isinstance(output, OutputFile) else OutputFile(output, 0o600, "backup file")
    own = _partition_n(_soft(authority))
    if scrypt_n is None:
        scrypt_n = max(BACKUP_SCRYPT_N, own)
    _check_backup_n(scrypt_n, UsageError)
    if scrypt_n < own:
        raise UsageError(f"backup scrypt cost {scrypt_n} is below the partition's own ({own}); "
                         f"use --scrypt-n {own} or more")
    engine = officer_login(authority, so_pin)
    cfg = authority.config
    db = _snapshot_db(cfg.db_path)  # the database first: the keystore is then never older
    with engine._locked():
        assert engine._raw_best is not None
        keystore, partition_key = engine._raw_best
    from hsm_ca.fileio import CONFIG_BYTES, read_regular_file

    files = {  # the home's TOML files bounded like every read of them (never a FIFO)
        f"{HSM_DIR}/keystore": keystore,
        f"{HSM_DIR}/partition.key": partition_key,
        DB_FILE: db,
        CONFIG_FILE: read_regular_file(cfg.config_path, CONFIG_BYTES, "configuration file"),
    }
    if cfg.profiles_path.is_dir():
        for p in sorted(cfg.profiles_path.glob("*.toml")):
            files[f"{PROFILES_DIR}/{p.name}"] = read_regular_file(p, CONFIG_BYTES, "profile")
    payload = json.dumps({
        "format": "hsm-ca-backup", "version": 1,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {k: base64.b64encode(v).decode() for k, v in files.items()},
    }).encode()
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = BACKUP_MAGIC + json.dumps(
        {"kdf": "scrypt", "n": scrypt_n, "r": 8, "p": 1, "salt": salt.hex(), "nonce": nonce.hex(),
         "cipher": "AES-256-GCM"}, sort_keys=True).encode() + b"\n"
    blob = header + AESGCM(_kdf(so_pin, salt, scrypt_n)).encrypt(nonce, payload, header)
    dest.write(blob)
    _record(authority, "backup", "ok", detail=f"to {Path(dest.path).name}",
            object_sha256=hashlib.sha256(blob).hexdigest())
    return {"file": dest.path, "bytes": len(blob), "files": sorted(files)}


def _partition_n(engine: SoftEngine) -> int:
    """The scrypt cost of the partition's own PIN derivation (read before any login)."""
    params = engine._read().get("kdf")
    n = params.get("n") if isinstance(params, dict) else None
    return n if isinstance(n, int) else 0  # the keystore's read bounds it already


def _check_backup_n(n: int, error: type[HsmCaError]) -> None:
    if n < MIN_BACKUP_N or n > MAX_BACKUP_N or n & (n - 1):
        raise error(f"backup scrypt cost must be a power of two from {MIN_BACKUP_N} to {MAX_BACKUP_N}")


def _check_restored_n(n: int) -> None:
    """A backup whose own KDF is cheaper than the minimum is refused, not opened: whatever
    made it (an old version, or someone re-encrypting it) left it open to offline guessing,
    and restoring it would vouch for it. Any other cost out of range is a damaged header."""
    if kdf.MIN_N <= n < MIN_BACKUP_N and not n & (n - 1):
        raise PolicyViolation(
            f"the backup's key derivation is too weak (scrypt n={n}, at least {MIN_BACKUP_N} "
            "is required); make a new backup with 'hsm backup' on the original home"
        )
    _check_backup_n(n, Tampered)


def _open_backup(blob: bytes, so_pin: str) -> dict[str, bytes]:
    if not blob.startswith(BACKUP_MAGIC):
        raise ConfigError("not an hsm-ca backup file")
    end = blob.index(b"\n", len(BACKUP_MAGIC)) + 1 if b"\n" in blob[len(BACKUP_MAGIC):] else -1
    if end <= 0:
        raise Tampered("the backup's header is damaged")
    header = blob[:end]
    try:
        params = json.loads(header[len(BACKUP_MAGIC):])
        n, salt, nonce = int(params["n"]), bytes.fromhex(params["salt"]), bytes.fromhex(params["nonce"])
        if params.get("kdf") != "scrypt":
            raise ValueError("KDF")
    except (ValueError, KeyError, TypeError) as e:
        raise Tampered("the backup's header is damaged") from e
    try:
        _check_restored_n(n)  # bounded before use: the header is authenticated only after
    except Tampered as e:
        raise Tampered("the backup's header is damaged") from e
    try:
        payload = AESGCM(_kdf(so_pin, salt, n)).decrypt(nonce, blob[end:], header)
    except InvalidTag as e:
        raise LoginFailed("cannot open the backup: wrong officer PIN, or the file was altered") from e
    data = json.loads(payload)
    return {k: base64.b64decode(v) for k, v in data["files"].items()}


def restore(blob: bytes, so_pin: str, home: Path) -> HomeConfig:
    """Recreate a whole home from a backup; checks everything before writing anything.

    The home is built in a staging directory beside it (see staging.py: a
    run killed half-way leaves nothing the next command does not remove),
    and the ``restore`` audit record is written into the staged trail before
    the rename, so the restored home exists with its record or not at all.
    """
    from hsm_ca.authority import Authority
    from hsm_ca.staging import Staging

    home = Path(home).expanduser()
    if home.exists() and any(home.iterdir()):
        raise AlreadyExists(f"{home} exists and is not empty; restore into a new home")
    files = _open_backup(blob, so_pin)
    for required in (f"{HSM_DIR}/keystore", f"{HSM_DIR}/partition.key", DB_FILE, CONFIG_FILE):
        if required not in files:
            raise Tampered(f"the backup lacks {required}")
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise Tampered(f"the backup names an unsafe path {name!r}")
    stage = Staging(home, "restore")
    staging = stage.path
    try:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(target, data, 0o600)
        conn = sqlite3.connect(str(staging / DB_FILE))
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
        if ok != "ok":
            raise Tampered(f"the backup's database fails its integrity check: {ok}")
        cfg = load_config(staging)
        if cfg.nodes:  # replicas belong to the old installation; start with the primary only
            write_config(replace(cfg, home=staging, nodes=()))
        # the partition must authenticate and the officer PIN must open it (audited, in
        # the staged trail), and the restore is recorded there before the home appears
        staged = Authority(load_config(staging))
        try:
            officer_login(staged, so_pin)
            _record(staged, "restore", "ok", detail=f"restored into {home}")
        finally:
            staged.close()
        if home.exists():
            home.rmdir()
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    return load_config(home)


def restore_into(blob: bytes, so_pin: str, home: Path) -> Authority:
    """Restore (the restore recorded in the restored trail), then open the restored home."""
    from hsm_ca.authority import Authority

    return Authority(restore(blob, so_pin, home))
