"""Restoring an older backup (issue 14 finding 6): what relying parties already hold stays
ahead of nothing the restored CA signs, and a backup is never weaker than a keystore.

The restored database has never seen the CRLs signed after its backup, yet relying
parties may hold them. CRL numbers are derived from time, so the restored CA's next CRL
number exceeds every number signed before, judged by ``openssl crl -crlnumber``, and
``openssl verify`` still combines the new full and delta CRLs. A backup's own KDF is
chosen by ``hsm backup`` and may not be cheaper than a production keystore's.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import SO_PIN, Cli, init_args, make_csr
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsm_ca import kdf

MIN_BACKUP_N = 2**14  # = kdf.MIN_BACKUP_N: the cheapest cost a backup may have
BACKUP_N = str(MIN_BACKUP_N)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def crl_number(path: Path) -> int:
    """The CRL number as openssl reads it (hex, as ``openssl crl -crlnumber`` prints it)."""
    r = openssl("crl", "-in", path, "-noout", "-crlnumber")
    found = re.fullmatch(r"crlNumber=(?:0x)?([0-9A-Fa-f]+)\s*", r.stdout)
    assert r.returncode == 0 and found, r.stdout + r.stderr
    return int(found.group(1), 16)


def leaf(cli: Cli, tmp_path: Path, name: str) -> tuple[str, Path]:
    csr = tmp_path / f"{name}.csr"
    csr.write_bytes(make_csr(cn=None, dns=[f"{name}.example.com"]))
    out = tmp_path / f"{name}.pem"
    info = json.loads(cli.ok("--json", "sign", str(csr), "--ca", "issuing", "--profile",
                             "tls-server", "-o", str(out)).out)
    return info["serial"], out


def test_a_restored_older_backup_signs_crl_numbers_above_every_one_signed_before(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = cli
    old.ok(*init_args("soft", "--base-url", "http://pki.example.com/"))
    old.ok("ca", "create-root", "root", "--subject", "CN=Restore Root,C=NL")
    old.ok("ca", "create-intermediate", "issuing", "--parent", "root", "--subject",
           "CN=Restore Issuing,C=NL")
    root, issuing = tmp_path / "root.pem", tmp_path / "issuing.pem"
    old.ok("ca", "export", "root", "-o", str(root))
    old.ok("ca", "export", "issuing", "-o", str(issuing))
    lost, _ = leaf(old, tmp_path, "lost")
    b, b_pem = leaf(old, tmp_path, "b")
    c, c_pem = leaf(old, tmp_path, "c")
    _, good_pem = leaf(old, tmp_path, "good")
    signed: list[tuple[str, Path]] = []

    def crl(cli: Cli, ca: str, *extra: str) -> Path:
        path = tmp_path / f"crl-{len(signed)}.pem"
        cli.ok("crl", ca, *extra, "-o", str(path))
        signed.append((ca, path))
        return path

    crl(old, "issuing")
    crl(old, "root")
    backup = tmp_path / "old.backup"
    old.ok("hsm", "backup", "-o", str(backup), "--scrypt-n", BACKUP_N)
    # after the backup: CRLs relying parties now hold, which the backup never saw
    old.ok("revoke", lost, "--reason", "keyCompromise")
    crl(old, "issuing")
    crl(old, "issuing", "--delta")
    crl(old, "issuing")
    crl(old, "root")
    before = {ca: [crl_number(p) for c, p in signed if c == ca] for ca in ("root", "issuing")}
    assert all(numbers == sorted(set(numbers)) for numbers in before.values()), before

    new = Cli(tmp_path / "restored", capsys, monkeypatch)
    new.ok("hsm", "restore", str(backup))
    new.ok("revoke", b, "--reason", "superseded")
    base = crl(new, "issuing")
    new.ok("revoke", c, "--reason", "affiliationChanged")
    delta = crl(new, "issuing", "--delta")
    root_crl = crl(new, "root")
    for ca, path in (("issuing", base), ("issuing", delta), ("root", root_crl)):
        assert crl_number(path) > max(before[ca]), (path.name, crl_number(path), before)
    assert crl_number(base) < crl_number(delta)
    text = openssl("crl", "-in", delta, "-noout", "-text").stdout
    found = re.search(r"Delta CRL Indicator: critical\s+(0x[0-9A-Fa-f]+|[0-9]+)\s", text)
    assert found and int(found.group(1), 0) == crl_number(base), text  # -text: decimal

    def verify(pem: Path) -> subprocess.CompletedProcess[str]:
        return openssl("verify", "-x509_strict", "-crl_check_all", "-extended_crl",
                       "-use_deltas", "-CAfile", root, "-untrusted", issuing,
                       "-CRLfile", root_crl, "-CRLfile", base, "-CRLfile", delta, pem)

    for pem in (b_pem, c_pem):  # c is revoked on the delta only: openssl combined them
        r = verify(pem)
        assert r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr, \
            (pem.name, r.stdout + r.stderr)
    r = verify(good_pem)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    new.ok("audit", "verify")


def _reencrypt(blob: bytes, n: int) -> bytes:
    """What an older version (or someone holding the officer PIN) could write: the same
    backup under a cheaper scrypt cost, otherwise well formed and authentic."""
    magic_end = blob.index(b"\n") + 1
    header_end = blob.index(b"\n", magic_end) + 1
    params = json.loads(blob[magic_end:header_end])

    def key(cost: int, salt: bytes) -> bytes:
        return hashlib.scrypt(SO_PIN.encode(), salt=salt, n=cost, r=8, p=1, dklen=32,
                              maxmem=1 << 30)

    payload = AESGCM(key(params["n"], bytes.fromhex(params["salt"]))).decrypt(
        bytes.fromhex(params["nonce"]), blob[header_end:], blob[:header_end])
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = blob[:magic_end] + json.dumps(
        {**params, "n": n, "salt": salt.hex(), "nonce": nonce.hex()}, sort_keys=True
    ).encode() + b"\n"
    return header + AESGCM(key(n, salt)).encrypt(nonce, payload, header)


def test_a_backup_with_a_weak_kdf_is_refused_and_none_is_made(
    soft_pki: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backup = tmp_path / "ca.backup"
    soft_pki.ok("hsm", "backup", "-o", str(backup), "--scrypt-n", BACKUP_N)
    parent = tmp_path / "targets"
    parent.mkdir()
    for n in (2**10, MIN_BACKUP_N // 2):
        weak = tmp_path / f"weak-{n}.backup"
        weak.write_bytes(_reencrypt(backup.read_bytes(), n))
        target = Cli(parent / f"home-{n}", capsys, monkeypatch)
        r = target("hsm", "restore", str(weak))
        assert r.code == 1 and r.out == "", (n, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:"), (n, r.err)
        assert "too weak" in lines[0] and f"n={n}" in lines[0], lines
        assert list(parent.iterdir()) == [], n  # no home, no staging directory
    # the same blob at the minimum cost restores: only the cost was refused
    fine = tmp_path / "fine.backup"
    fine.write_bytes(_reencrypt(backup.read_bytes(), MIN_BACKUP_N))
    Cli(parent / "fine", capsys, monkeypatch).ok("hsm", "restore", str(fine))

    # and hsm backup makes none: a test home (keystore scrypt n=1024) is backed up at the
    # backup's own cost, never its keystore's
    for n in ("1024", str(MIN_BACKUP_N // 2)):
        out = tmp_path / f"cheap-{n}.backup"
        r = soft_pki("hsm", "backup", "-o", str(out), "--scrypt-n", n)
        assert r.code == 2 and r.err.startswith("Error:") and not out.exists(), (n, r.err)
    header = json.loads(backup.read_bytes().split(b"\n")[1])
    assert header["n"] == MIN_BACKUP_N == getattr(kdf, "MIN_BACKUP_N", None)


def test_a_backup_is_never_cheaper_than_the_partition_it_carries(cli: Cli, tmp_path: Path) -> None:
    """The backup holds the partition: guessing the officer PIN offline must not get
    cheaper than against the keystore itself, whatever --scrypt-n says."""
    own = 2 * MIN_BACKUP_N
    cli.ok("init", "--scrypt-n", str(own))
    cheap = tmp_path / "cheap.backup"
    r = cli("hsm", "backup", "-o", str(cheap), "--scrypt-n", str(MIN_BACKUP_N))
    assert r.code == 2 and r.err.startswith("Error:") and str(own) in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not cheap.exists()
    default = tmp_path / "default.backup"
    cli.ok("hsm", "backup", "-o", str(default))
    assert json.loads(default.read_bytes().split(b"\n")[1])["n"] == 2**16
