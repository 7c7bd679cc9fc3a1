"""The built-in engine administered through the CLI: users and roles, lockout,
tamper evidence, rollback, backup and restore, replica nodes, key hygiene.

Everything runs against real homes on disk (the ``soft_pki`` fixture: a root on
ec-p384 and an issuing CA on ec-p256); keystores are read and damaged as files,
the way an attacker or a failing disk would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import SO_PIN, USER_PIN, Cli, CliResult, init_args, make_csr, run_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsm_ca.engine.base import KeySpec, Role
from hsm_ca.engine.soft import SoftEngine
from hsm_ca.engine.soft.keystore import canonical_json
from hsm_ca.errors import PermissionDenied

USER = "crypto-user"
OFFICER = "admin"
ALICE_PIN = "alice-pin-0001"
ALICE_PIN2 = "alice-pin-0002"
AUDITOR_PIN = "auditor-pin-0003"
SCRYPT = ("--scrypt-n", "16384")  # the least a backup may cost (kdf.MIN_BACKUP_N)


# ------------------------------------------------------------------ helpers
def primary(cli: Cli) -> Path:
    return cli.home / "hsm"


def body_of(keystore: Path) -> dict[str, Any]:
    """The keystore's JSON body (line 1); line 2 is its MAC."""
    return json.loads(keystore.read_bytes().split(b"\n")[0])


def rewrite_with_valid_mac(partition: Path, state: dict[str, Any]) -> None:
    """Write a keystore body as the engine would, MAC and all (an insider's edit)."""
    key = (partition / "partition.key").read_bytes()
    body = canonical_json(state)
    mac = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    (partition / "keystore").write_bytes(body + b"\n" + mac + b"\n")


def flip(path: Path, pos: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def csr_file(tmp_path: Path, name: str = "web") -> Path:
    path = tmp_path / f"{name}.csr"
    path.write_bytes(make_csr(cn=f"{name}.example.com", dns=[f"{name}.example.com"]))
    return path


def sign(cli: Cli, csr: Path, *extra: str) -> CliResult:
    return cli("sign", str(csr), "--ca", "issuing", "--profile", "tls-server", *extra)


def sign_ok(cli: Cli, csr: Path) -> dict[str, Any]:
    r = sign(cli, csr, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def as_json(cli: Cli, *args: str) -> Any:
    return json.loads(cli.ok(*args, "--json").out)


def audit(cli: Cli, since: int = 0) -> list[dict[str, Any]]:
    return as_json(cli, "audit", "list", "--since", str(since))


def last_seq(cli: Cli) -> int:
    records = audit(cli)
    return records[-1]["seq"] if records else 0


def node_list(cli: Cli) -> dict[str, dict[str, Any]]:
    return {n["path"]: n for n in as_json(cli, "hsm", "node", "list")}


def private_keys(home: Path) -> dict[str, Any]:
    """Every private key of the home's partition, as the engine itself holds them."""
    engine = SoftEngine(home / "hsm", lock_path=home / ".hsm.lock")
    engine.login(USER, USER_PIN)
    try:
        return {h.label: engine._private_key(h.label) for h in engine.list_keys()}
    finally:
        engine.close()


def key_secrets(key: Any) -> list[bytes]:
    """Byte strings that would betray a private key: DER, base64 of it, the scalar."""
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        scalar = value.to_bytes((key.curve.key_size + 7) // 8, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        value = key.private_numbers().d
        scalar = value.to_bytes((value.bit_length() + 7) // 8, "big")
    else:
        scalar = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        value = int.from_bytes(scalar, "big")
    return [
        der,
        base64.b64encode(der),
        der.hex().encode(),
        scalar,
        scalar.hex().encode(),
        base64.b64encode(scalar),
        str(value).encode(),
    ]


def assert_no_secrets(data: bytes, keys: dict[str, Any], where: str) -> None:
    assert b"PRIVATE KEY" not in data, where
    for label, key in keys.items():
        for i, secret in enumerate(key_secrets(key)):
            assert secret not in data, f"{where}: key {label!r} leaks (form {i})"


def cert_of(pem_text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem_text.encode())


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


# ------------------------------------------------------- 1. users and roles
def test_officer_manages_users_and_roles_decide_who_signs(
    soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_NEW_PIN", ALICE_PIN)
        assert "alice" in cli.ok("hsm", "user", "add", "alice").out
        m.setenv("HSM_CA_NEW_PIN", AUDITOR_PIN)
        cli.ok("hsm", "user", "add", "aud", "--role", "auditor")
    users = {u["name"]: u for u in as_json(cli, "hsm", "user", "list")}
    assert {n: u["role"] for n, u in users.items()} == {
        OFFICER: "crypto-officer",
        USER: "crypto-user",
        "alice": "crypto-user",
        "aud": "auditor",
    }
    assert all(u["failed_logins"] == 0 and u["locked"] is False for u in users.values())
    issuing_key = cert_of(cli.ok("ca", "export", "issuing").out).public_key()
    issued_before = len(as_json(cli, "list"))

    with monkeypatch.context() as m:
        # the new crypto user signs, and the audit trail names it
        m.setenv("HSM_CA_USER", "alice")
        m.setenv("HSM_CA_PIN", ALICE_PIN)
        info = sign_ok(cli, csr)
        leaf = cert_of(info["pem"])
        assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
        issuing_key.verify(
            leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
        )  # type: ignore[arg-type]
        issued = [r for r in audit(cli) if r["action"] == "issue" and r["outcome"] == "issued"]
        assert issued[-1]["serial"] == info["serial"] and issued[-1]["hsm_user"] == "alice"
        # an auditor logs in but may not sign
        m.setenv("HSM_CA_USER", "aud")
        m.setenv("HSM_CA_PIN", AUDITOR_PIN)
        r = sign(cli, csr)
        assert r.code == 1 and r.err.startswith("Error:")
        assert "auditor" in r.err and "crypto-user" in r.err, r.err
        # nor may the officer, even with its own right PIN
        m.setenv("HSM_CA_USER", OFFICER)
        m.setenv("HSM_CA_PIN", SO_PIN)
        r = sign(cli, csr)
        assert r.code == 1 and "crypto-officer" in r.err, r.err
    assert len(as_json(cli, "list")) == issued_before + 1

    # change-pin re-wraps alice's blob and nothing else
    before = body_of(primary(cli) / "keystore")
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_NEW_PIN", ALICE_PIN2)
        cli.ok("hsm", "user", "change-pin", "alice")
    after = body_of(primary(cli) / "keystore")
    assert after["keys"] == before["keys"]
    assert {n: u for n, u in after["users"].items() if n != "alice"} == {
        n: u for n, u in before["users"].items() if n != "alice"
    }
    for field in ("wrapped_mk", "salt"):
        assert after["users"]["alice"][field] != before["users"]["alice"][field]
    assert after["users"]["alice"]["role"] == "crypto-user"
    assert {k: v for k, v in after.items() if k not in ("users", "generation")} == {
        k: v for k, v in before.items() if k not in ("users", "generation")
    }
    # the officer's login writes nothing to the keystore (its attempt is noted in the journal
    # beside the lock): the re-wrap is the one new generation
    assert after["generation"] == before["generation"] + 1
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_USER", "alice")
        m.setenv("HSM_CA_PIN", ALICE_PIN)
        r = sign(cli, csr)
        assert r.code == 1 and "wrong PIN" in r.err, r.err
        m.setenv("HSM_CA_PIN", ALICE_PIN2)
        sign_ok(cli, csr)

    # a crypto user's PIN does not open the officer role: no user is added
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_NEW_PIN", "mallory-pin-1")
        for user, pin in ((USER, USER_PIN), ("alice", ALICE_PIN2)):
            m.setenv("HSM_CA_USER", user)
            m.setenv("HSM_CA_SO_PIN", pin)
            r = cli("hsm", "user", "add", "mallory")
            assert r.code == 1 and r.err.startswith("Error:"), r.err
    assert "mallory" not in {u["name"] for u in as_json(cli, "hsm", "user", "list")}

    # remove: alice is gone and can no longer sign; the officer cannot remove itself
    cli.ok("hsm", "user", "remove", "alice")
    assert {u["name"] for u in as_json(cli, "hsm", "user", "list")} == {OFFICER, USER, "aud"}
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_USER", "alice")
        m.setenv("HSM_CA_PIN", ALICE_PIN2)
        r = sign(cli, csr)
        assert r.code == 1 and "alice" in r.err, r.err
    r = cli("hsm", "user", "remove", OFFICER)
    assert r.code == 1 and r.err.startswith("Error:")
    assert OFFICER in {u["name"] for u in as_json(cli, "hsm", "user", "list")}


def test_roles_are_enforced_inside_the_engine(
    soft_pki: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = soft_pki
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_NEW_PIN", AUDITOR_PIN)
        cli.ok("hsm", "user", "add", "aud", "--role", "auditor")
    path, lock = primary(cli), cli.home / ".hsm.lock"
    engine = SoftEngine(path, lock_path=lock)
    engine.login(USER, USER_PIN)
    handle = engine.get_key("ca-issuing")
    handle.sign(b"ok", hashes.SHA256())

    # the same engine object, now logged in as the auditor: every key or user operation refused
    engine.login("aud", AUDITOR_PIN)
    assert engine.current_role is Role.AUDITOR
    refused = {
        "sign through an old handle": lambda: handle.sign(b"no", hashes.SHA256()),
        "get_key": lambda: engine.get_key("ca-issuing"),
        "_private_key": lambda: engine._private_key("ca-root"),
        "generate_key": lambda: engine.generate_key(KeySpec("ec-p256", "aud-key")),
        "destroy_key": lambda: engine.destroy_key("ca-root"),
        "add_user": lambda: engine.add_user("x1", Role.OFFICER, "x1-pin-1234"),
        "remove_user": lambda: engine.remove_user(USER),
        "unlock_user": lambda: engine.unlock_user(USER),
        "change_pin of another user": lambda: engine.change_pin(USER, "new-pin-1234"),
    }
    for what, call in refused.items():
        with pytest.raises(PermissionDenied):
            call()
        assert what  # keeps the failing operation's name in the traceback

    # a crypto user signs but administers nobody
    user = SoftEngine(path, lock_path=lock)
    user.login(USER, USER_PIN)
    for call in (
        lambda: user.add_user("x2", Role.USER, "x2-pin-1234"),
        lambda: user.remove_user("aud"),
        lambda: user.unlock_user("aud"),
        lambda: user.change_pin("aud", "new-pin-1234"),
    ):
        with pytest.raises(PermissionDenied):
            call()
    # the officer administers but holds no key
    officer = SoftEngine(path, lock_path=lock)
    officer.login(OFFICER, SO_PIN)
    for call in (
        lambda: officer.get_key("ca-root"),
        lambda: officer._private_key("ca-root"),
        lambda: officer.generate_key(KeySpec("ec-p256", "so-key")),
    ):
        with pytest.raises(PermissionDenied):
            call()
    # nothing above changed the partition's keys or users
    state = body_of(path / "keystore")
    assert sorted(state["keys"]) == ["ca-issuing", "ca-root"]
    assert sorted(state["users"]) == [OFFICER, "aud", USER]


# ----------------------------------------------------------------- 2. lockout
def test_five_wrong_pins_lock_the_user_across_restarts_until_unlocked(
    soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    since = last_seq(cli)
    with monkeypatch.context() as m:
        for i in range(5):
            m.setenv("HSM_CA_PIN", f"wrong-pin-{i}")
            r = sign(cli, csr)
            assert r.code == 1 and r.err.startswith("Error:"), r.err
            assert "wrong PIN" in r.err
            assert ("locked" in r.err) == (i == 4), r.err
    r = sign(cli, csr)  # the right PIN, in the same process
    assert r.code == 1 and "locked" in r.err, r.err
    p = run_process(cli.home, "sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    assert p.returncode == 1 and "locked" in p.stderr and "Traceback" not in p.stderr, p.stderr
    user = next(u for u in as_json(cli, "hsm", "user", "list") if u["name"] == USER)
    assert user["locked"] is True and user["failed_logins"] == 5

    cli.ok("hsm", "user", "unlock", USER)
    user = next(u for u in as_json(cli, "hsm", "user", "list") if u["name"] == USER)
    assert user["locked"] is False and user["failed_logins"] == 0
    sign_ok(cli, csr)

    logins = [r for r in audit(cli, since) if r["action"] == "login"]
    user_logins = [r for r in logins if not (r["detail"] or "").startswith("officer ")]
    assert [r["outcome"] for r in user_logins] == ["failed"] * 4 + ["locked"] * 3 + ["ok"]
    assert all(USER in r["detail"] for r in user_logins[:-1])
    assert all("generation=" in r["detail"] for r in user_logins)
    officer_logins = [r for r in logins if (r["detail"] or "").startswith("officer ")]
    assert [r["outcome"] for r in officer_logins] == ["ok"]
    assert [r["action"] for r in audit(cli, since)].count("user-unlock") == 1
    cli.ok("audit", "verify")


def test_editing_the_failed_login_counter_is_tampering(
    soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_PIN", "wrong-pin-x")
        for _ in range(5):
            assert sign(cli, csr).code == 1
    ks = primary(cli) / "keystore"
    locked = ks.read_bytes()
    for old, new in (
        (b'"failed_logins":5', b'"failed_logins":0'),
        (b'"locked":true', b'"locked":false'),
    ):
        assert locked.count(old) == 1
        ks.write_bytes(locked.replace(old, new))
        r = sign(cli, csr)
        assert r.code == 1 and "tamper" in r.err.lower(), r.err
        assert cli("hsm", "user", "list").code == 1
    ks.write_bytes(locked)
    r = sign(cli, csr)
    assert r.code == 1 and "locked" in r.err, r.err


# ------------------------------------------------------------------ 3. tamper
def test_any_flipped_byte_of_the_partition_is_tampering(soft_pki: Cli, tmp_path: Path) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    ks = primary(cli) / "keystore"
    original = ks.read_bytes()
    newline = original.index(b"\n")
    positions = {round(i * (len(original) - 1) / 35) for i in range(36)}
    positions |= {
        0,
        1,
        2,
        10,
        newline - 1,
        newline,
        newline + 1,
        newline + 33,
        len(original) - 2,
        len(original) - 1,
    }  # header, MAC line, both newlines
    assert len(positions) >= 40
    for pos in sorted(positions):
        flip(ks, pos)
        r = sign(cli, csr)
        assert r.code == 1, f"byte {pos} flipped, yet signing worked"
        assert "tamper" in r.err.lower() and "Traceback" not in r.err, (pos, r.err)
        ks.write_bytes(original)
    sign_ok(cli, csr)  # the untouched keystore still works: the flips were what failed

    pk = primary(cli) / "partition.key"
    key = pk.read_bytes()
    for pos in (0, 17, 31):
        flip(pk, pos)
        r = sign(cli, csr)
        assert r.code == 1 and "tamper" in r.err.lower(), r.err
        pk.write_bytes(key)
    pk.write_bytes(key[:31])
    r = sign(cli, csr)
    assert r.code == 1 and "tamper" in r.err.lower(), r.err
    pk.unlink()
    r = sign(cli, csr)
    assert r.code == 1 and "partition key" in r.err, r.err
    pk.write_bytes(key)
    sign_ok(cli, csr)


# ---------------------------------------------------------------- 4. rollback
def test_an_older_keystore_copied_back_is_refused_as_rolled_back(
    soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    ks = primary(cli) / "keystore"

    # undoing failed logins
    old = ks.read_bytes()
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_PIN", "wrong-pin-r")
        for _ in range(3):
            assert sign(cli, csr).code == 1
    newer = ks.read_bytes()
    ks.write_bytes(old)
    r = sign(cli, csr)
    assert r.code == 1 and "rolled back" in r.err, r.err
    refusal = [x for x in audit(cli) if x["action"] == "login"][-1]
    assert refusal["outcome"] == "refused" and "rolled back" in refusal["detail"]
    with monkeypatch.context() as m:  # officer operations are refused too
        m.setenv("HSM_CA_NEW_PIN", "eve-pin-1234")
        r = cli("hsm", "user", "add", "eve")
    assert r.code == 1 and "rolled back" in r.err, r.err
    assert "eve" not in body_of(ks)["users"]
    ks.write_bytes(newer)
    sign_ok(cli, csr)

    # undoing a key generation
    old = ks.read_bytes()
    cli.ok("ca", "create-root", "root2", "--subject", "CN=Second Root")
    ks.write_bytes(old)
    r = sign(cli, csr)
    assert r.code == 1 and "rolled back" in r.err, r.err
    cli.ok("audit", "verify")


def test_audit_verify_catches_a_lowered_generation_in_the_database(soft_pki: Cli) -> None:
    cli = soft_pki
    cli.ok("audit", "verify")
    conn = sqlite3.connect(cli.home / "ca.db")
    with conn:
        (seen,) = conn.execute("SELECT value FROM meta WHERE key='hsm_generation'").fetchone()
        assert int(seen) >= 3
        conn.execute("UPDATE meta SET value=? WHERE key='hsm_generation'", (str(int(seen) - 1),))
    conn.close()
    r = cli("audit", "verify")
    assert r.code == 1 and "generation" in r.err, r.err
    report = json.loads(cli("audit", "verify", "--json").out)
    assert report["ok"] is False and "generation" in report["problem"]


# ---------------------------------------------------------- 5. backup/restore
def test_backup_restores_the_whole_ca_into_a_new_home(
    soft_pki: Cli,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert shutil.which("openssl"), "the openssl CLI is needed"
    old = soft_pki
    first = sign_ok(old, csr_file(tmp_path, "a"))
    sign_ok(old, csr_file(tmp_path, "b"))
    old.ok("revoke", first["serial"], "--reason", "superseded")
    crl_numbers = {"issuing": [], "root": []}
    for ca in ("issuing", "issuing", "root"):
        crl_numbers[ca].append(as_json(old, "crl", ca)["number"])
    root_pem = tmp_path / "old-root.pem"
    old.ok("ca", "export", "root", "-o", str(root_pem))
    old_serials = {c["serial"] for c in as_json(old, "list")}
    old_cas = as_json(old, "ca", "list")
    old_keys = as_json(old, "keys", "list")

    backup = tmp_path / "ca.backup"
    old.ok("hsm", "backup", "-o", str(backup), *SCRYPT)
    assert mode(backup) == 0o600
    blob = backup.read_bytes()
    keys = private_keys(old.home)
    assert {"ca-issuing", "ca-root"} <= set(keys)
    assert_no_secrets(blob, keys, "backup")
    assert b"ca-issuing" not in blob and b"BEGIN" not in blob  # the payload is encrypted whole
    assert "backup" in [r["action"] for r in audit(old)][-3:]

    new = Cli(tmp_path / "restored", capsys, monkeypatch)
    new.ok("hsm", "restore", str(backup))
    assert mode(new.home / "hsm" / "keystore") == 0o600
    assert mode(new.home / "hsm" / "partition.key") == 0o600
    assert as_json(new, "ca", "list") == old_cas
    assert as_json(new, "keys", "list") == old_keys
    for ca in ("root", "issuing"):
        assert ski(cert_of(new.ok("ca", "export", ca).out)) == ski(
            cert_of(old.ok("ca", "export", ca).out)
        )
    restored_keys = private_keys(new.home)
    assert restored_keys.keys() == keys.keys()
    for label, key in keys.items():
        assert restored_keys[label].private_numbers() == key.private_numbers(), label

    leaf = tmp_path / "restored-leaf.pem"
    issuing = tmp_path / "restored-issuing.pem"
    new.ok(
        "sign",
        str(csr_file(tmp_path, "c")),
        "--ca",
        "issuing",
        "--profile",
        "tls-server",
        "-o",
        str(leaf),
    )
    new.ok("ca", "export", "issuing", "-o", str(issuing))
    v = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root_pem), "-untrusted", str(issuing), str(leaf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert v.returncode == 0 and "OK" in v.stdout, v.stdout + v.stderr

    new_serials = [c["serial"] for c in as_json(new, "list")]
    assert len(new_serials) == len(set(new_serials)) == len(old_serials) + 1
    assert old_serials < set(new_serials)
    assert format(cert_of(leaf.read_text()).serial_number, "x") not in old_serials
    for ca, numbers in crl_numbers.items():
        assert as_json(new, "crl", ca)["number"] > max(numbers)
    assert "restore" in [r["action"] for r in audit(new)]
    new.ok("audit", "verify")
    old.ok("audit", "verify")


def test_bad_backups_and_occupied_homes_are_refused_without_a_trace(
    soft_pki: Cli,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = soft_pki
    backup = tmp_path / "ca.backup"
    cli.ok("hsm", "backup", "-o", str(backup), *SCRYPT)
    blob = backup.read_bytes()
    header_end = blob.index(b"\n", blob.index(b"\n") + 1) + 1
    salt_at = blob.index(b'"salt": "') + len(b'"salt": "') + 3
    parent = tmp_path / "targets"
    parent.mkdir()

    def refused(name: str, data: bytes, so_pin: str = SO_PIN) -> str:
        src = tmp_path / f"{name}.backup"
        src.write_bytes(data)
        target = Cli(parent / name, capsys, monkeypatch)
        monkeypatch.setenv("HSM_CA_SO_PIN", so_pin)
        try:
            r = target("hsm", "restore", str(src))
        finally:
            monkeypatch.setenv("HSM_CA_SO_PIN", SO_PIN)
        assert r.code == 1, (name, r.err)
        assert r.err.startswith("Error:") and "internal error" not in r.err, (name, r.err)
        assert not target.home.exists(), name
        assert list(parent.iterdir()) == [], (name, list(parent.iterdir()))  # no staging left
        return r.err

    assert "PIN" in refused("wrong-pin", blob, so_pin="not-the-officer-pin")
    for name, pos in (
        ("ct-start", header_end),
        ("ct-middle", (header_end + len(blob)) // 2),
        ("ct-tag", len(blob) - 1),
    ):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        assert "altered" in refused(name, bytes(damaged))
    for name, pos in (
        ("magic", 0),
        ("salt", salt_at),
        ("header-nl", header_end - 1),
        ("header-brace", header_end - 2),
    ):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        refused(name, bytes(damaged))
    refused("truncated", blob[: len(blob) // 2])

    # an existing, non-empty home is refused and left exactly as it was
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    r = Cli(occupied, capsys, monkeypatch)("hsm", "restore", str(backup))
    assert r.code == 1 and "not empty" in r.err, r.err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert (occupied / "notes.txt").read_text() == "keep me"
    before = {p.name: p.read_bytes() for p in (cli.home / "hsm").iterdir()}
    r = cli("hsm", "restore", str(backup))  # over the live home itself
    assert r.code == 1 and "not empty" in r.err, r.err
    assert {p.name: p.read_bytes() for p in (cli.home / "hsm").iterdir()} == before
    # and the good backup still restores
    Cli(parent / "good", capsys, monkeypatch).ok("hsm", "restore", str(backup))


def test_a_backup_header_with_an_inflated_scrypt_cost_is_refused_cleanly(
    soft_pki: Cli,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The header is only authenticated after the KDF ran: its cost must not crash it."""
    cli = soft_pki
    backup = tmp_path / "ca.backup"
    cli.ok("hsm", "backup", "-o", str(backup), *SCRYPT)
    blob = backup.read_bytes()
    magic_end = blob.index(b"\n") + 1
    header_end = blob.index(b"\n", magic_end)
    header = json.loads(blob[magic_end:header_end])
    header["n"] = 2**20  # within the accepted range (<= 2**22), a power of two
    crafted = tmp_path / "crafted.backup"
    crafted.write_bytes(
        blob[:magic_end] + json.dumps(header, sort_keys=True).encode() + blob[header_end:]
    )
    target = Cli(tmp_path / "target", capsys, monkeypatch)
    r = target("hsm", "restore", str(crafted))
    assert r.code == 1, r.err
    assert r.err.startswith("Error:") and "internal error" not in r.err, r.err
    assert not target.home.exists()


# ------------------------------------------------------------------ 6. nodes
def test_replica_nodes_keep_signing_and_heal(
    soft_pki: Cli,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    main, replica = str(primary(cli)), tmp_path / "node2"
    rep = str(replica.resolve())

    def healthy() -> int:
        nodes = node_list(cli)
        assert set(nodes) == {main, rep}
        assert [n["health"] for n in nodes.values()] == ["ok", "ok"], nodes
        generations = {n["generation"] for n in nodes.values()}
        assert len(generations) == 1, nodes
        for name in ("keystore", "partition.key"):
            assert (primary(cli) / name).read_bytes() == (replica / name).read_bytes()
            assert mode(primary(cli) / name) == mode(replica / name) == 0o600
        assert mode(primary(cli)) == mode(replica) == 0o700
        return generations.pop()

    added = as_json(cli, "hsm", "node", "add", str(replica))
    assert [(n["path"], n["health"]) for n in added] == [(main, "ok"), (rep, "ok")]
    assert added[0]["generation"] == added[1]["generation"]
    assert rep in (cli.home / "hsm-ca.toml").read_text()
    healthy()

    # losing HOME/hsm altogether: the replica signs, then the primary is recreated
    shutil.rmtree(primary(cli))
    assert node_list(cli)[main]["health"] == "missing"
    sign_ok(cli, csr)
    healthy()

    # a corrupted replica: reported, ignored for signing, then healed
    flip(replica / "keystore", 100)
    nodes = node_list(cli)
    assert nodes[rep]["health"] == "tampered" and nodes[main]["health"] == "ok", nodes
    sign_ok(cli, csr)
    healthy()

    # a stale replica (an older generation of this partition) is brought up to date on login
    old = (replica / "keystore").read_bytes()
    with monkeypatch.context() as m:
        m.setenv("HSM_CA_NEW_PIN", ALICE_PIN)
        cli.ok("hsm", "user", "add", "alice")
    current = healthy()
    (replica / "keystore").write_bytes(old)
    nodes = node_list(cli)
    assert nodes[rep]["health"] == "stale" and nodes[rep]["generation"] < current, nodes
    sign_ok(cli, csr)
    # the login repairs the stale node: one new generation (a login on healthy nodes writes none)
    assert healthy() == current + 1
    current += 1

    # re-adding the same path resyncs it and does not list it twice
    (replica / "keystore").write_bytes(old)
    again = as_json(cli, "hsm", "node", "add", str(replica))
    current += 1  # the officer's login repairs the stale node
    assert [(n["health"], n["generation"]) for n in again] == [("ok", current), ("ok", current)]
    assert (cli.home / "hsm-ca.toml").read_text().count(rep) == 1
    healthy()

    # a non-empty directory that is not this partition is refused and left alone
    config = (cli.home / "hsm-ca.toml").read_bytes()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    r = cli("hsm", "node", "add", str(junk))
    assert r.code == 1 and "not empty" in r.err, r.err
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]
    other = Cli(tmp_path / "other", capsys, monkeypatch)
    other.ok(*init_args("soft"))
    theirs = {p.name: p.read_bytes() for p in (other.home / "hsm").iterdir()}
    r = cli("hsm", "node", "add", str(other.home / "hsm"))
    assert r.code == 1 and "another HSM partition" in r.err, r.err
    assert {p.name: p.read_bytes() for p in (other.home / "hsm").iterdir()} == theirs
    assert (cli.home / "hsm-ca.toml").read_bytes() == config
    healthy()


def test_a_foreign_partition_in_a_replica_never_replaces_the_primary(
    soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another partition dropped into a replica directory (a mix-up, or an attacker
    who can write there) must not become the CA's partition, however high its
    generation: the primary, which holds the CA's keys, is never overwritten."""
    cli = soft_pki
    csr = csr_file(tmp_path)
    replica = tmp_path / "node2"
    cli.ok("hsm", "node", "add", str(replica))
    ours = body_of(primary(cli) / "keystore")

    foreign_dir = tmp_path / "foreign"
    foreign = SoftEngine.create(
        foreign_dir,
        officer=OFFICER,
        officer_pin=SO_PIN,
        user=USER,
        user_pin=USER_PIN,
        scrypt_n=1024,
    )
    foreign.login(OFFICER, SO_PIN)
    while foreign.generation() <= ours["generation"] + 2:
        foreign.add_user(f"u{foreign.generation()}", Role.AUDITOR, "filler-pin")
    foreign.close()
    for name in ("keystore", "partition.key"):
        shutil.copyfile(foreign_dir / name, replica / name)

    problems = []
    nodes = node_list(cli)
    health = {
        "primary": nodes[str(primary(cli))]["health"],
        "replica": nodes[str(replica.resolve())]["health"],
    }
    if health != {"primary": "ok", "replica": "foreign"}:
        problems.append(f"node list says {health}")
    with monkeypatch.context() as m:  # a failed login writes the partition
        m.setenv("HSM_CA_PIN", "wrong-pin-f")
        assert sign(cli, csr).code == 1
    r = sign(cli, csr)  # a healthy node remains, the primary: signing goes on
    if r.code != 0:
        problems.append(f"signing failed: {r.err.strip()}")
    after = body_of(primary(cli) / "keystore")
    if after["partition_id"] != ours["partition_id"] or after["keys"] != ours["keys"]:
        problems.append(
            f"the primary was overwritten: it now holds partition "
            f"{after['partition_id']} with keys {sorted(after['keys'])}, "
            f"was {ours['partition_id']} with {sorted(ours['keys'])}"
        )
    assert not problems, problems


# ------------------------------------------------------------- 7. hygiene
def test_secrets_stay_out_of_files_modes_and_debug_output(soft_pki: Cli, tmp_path: Path) -> None:
    cli = soft_pki
    csr = csr_file(tmp_path)
    hsm = primary(cli)
    assert mode(hsm) == 0o700
    assert mode(hsm / "keystore") == mode(hsm / "partition.key") == 0o600
    keys = private_keys(cli.home)
    for f in (hsm / "keystore", hsm / "partition.key", cli.home / "ca.db"):
        assert_no_secrets(f.read_bytes(), keys, str(f))
    backup = tmp_path / "ca.backup"
    backup.write_text("an old file, world-readable")
    backup.chmod(0o644)
    cli.ok("hsm", "backup", "-o", str(backup), *SCRYPT)
    assert mode(backup) == 0o600

    def clean_debug_failure(env: dict[str, str], *args: str) -> str:
        p = run_process(cli.home, "--debug", *args, env=env)
        out = p.stdout + p.stderr
        assert p.returncode == 1, out
        assert "Traceback" in out  # --debug really shows the traceback
        for pin in (USER_PIN, SO_PIN, *env.values()):
            assert pin not in out, f"PIN {pin!r} in --debug output"
        assert_no_secrets(out.encode(), keys, "--debug output")
        return out

    sign_args = ("sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    out = clean_debug_failure({"HSM_CA_PIN": "wrong-secret-pin-7391"}, *sign_args)
    assert "LoginFailed" in out
    out = clean_debug_failure(
        {"HSM_CA_SO_PIN": "wrong-secret-so-pin-2208"},
        "hsm",
        "backup",
        "-o",
        str(tmp_path / "b2"),
        *SCRYPT,
    )
    assert "LoginFailed" in out and not (tmp_path / "b2").exists()

    # a key blob altered by someone able to re-MAC the keystore: caught by the blob's own tag
    state = body_of(hsm / "keystore")
    blob = bytearray(base64.b64decode(state["keys"]["ca-issuing"]["blob"]))
    blob[20] ^= 0x01
    state["keys"]["ca-issuing"]["blob"] = base64.b64encode(bytes(blob)).decode()
    rewrite_with_valid_mac(hsm, state)
    out = clean_debug_failure({}, *sign_args)
    assert "Tampered" in out and "integrity" in out
    r = sign(cli, csr)
    assert r.code == 1 and "integrity" in r.err and "Traceback" not in r.err, r.err
