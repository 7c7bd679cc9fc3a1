"""The audit trail: chained, complete, and loud about any edit."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import Cli, issue_tls, make_csr

from hsm_ca.audit import GENESIS, chain_value


def _db(cli: Cli) -> sqlite3.Connection:
    return sqlite3.connect(cli.home / "ca.db", isolation_level=None)


def test_every_signing_is_recorded_with_intent_then_issued(pki: Cli, tmp_path: Path) -> None:
    serial = issue_tls(pki, tmp_path, 1)[0]
    records = json.loads(pki.ok("--json", "audit", "list").out)
    mine = [r for r in records if r["serial"] == serial]
    assert [r["outcome"] for r in mine] == ["intent", "issued"]
    issued = mine[1]
    cert = json.loads(pki.ok("--json", "show", serial).out)
    assert issued["object_sha256"] == cert["sha256"]
    assert issued["csr_sha256"] and issued["key_label"] == "ca-issuing"
    assert issued["profile"] == "tls-server" and issued["ca"] == "issuing"
    assert issued["os_user"] and issued["hsm_user"] == "crypto-user"
    # CA creation is recorded too: both CA certificates have issued records
    cas = {r["serial"] for r in records if r["outcome"] == "issued"}
    for name in ("root", "issuing"):
        ca = json.loads(pki.ok("--json", "ca", "list").out)
        assert {c["serial"] for c in ca if c["name"] == name} <= cas
    # the chain recomputes from genesis
    prev = GENESIS
    for r in records:
        assert chain_value(prev, r) == r["chain"]
        prev = r["chain"]


def test_verify_passes_then_catches_an_edited_record(pki: Cli, tmp_path: Path) -> None:
    issue_tls(pki, tmp_path)
    assert pki.ok("audit", "verify").out.startswith("Audit trail intact")
    with _db(pki) as db:
        db.execute("UPDATE audit SET subject='CN=evil' WHERE seq=5")
    r = pki("audit", "verify")
    assert r.code == 1 and "record 5" in r.err and "altered" in r.err


def test_verify_catches_a_deleted_record(pki: Cli, tmp_path: Path) -> None:
    issue_tls(pki, tmp_path)
    with _db(pki) as db:
        db.execute("DELETE FROM audit WHERE seq=4")
    r = pki("audit", "verify")
    assert r.code == 1 and "record 4" in r.err


def test_verify_catches_reordered_records(pki: Cli, tmp_path: Path) -> None:
    issue_tls(pki, tmp_path)
    with _db(pki) as db:
        cols = "time, os_user, hsm_user, action, ca, key_label, profile, serial, subject, " \
               "csr_sha256, object_sha256, outcome, detail, chain"
        a = db.execute(f"SELECT {cols} FROM audit WHERE seq=6").fetchone()
        b = db.execute(f"SELECT {cols} FROM audit WHERE seq=7").fetchone()
        sets = ", ".join(f"{c.strip()}=?" for c in cols.split(","))
        db.execute(f"UPDATE audit SET {sets} WHERE seq=6", b)
        db.execute(f"UPDATE audit SET {sets} WHERE seq=7", a)
    r = pki("audit", "verify")
    assert r.code == 1 and "record 6" in r.err


def test_verify_catches_a_cut_tail(pki: Cli, tmp_path: Path) -> None:
    issue_tls(pki, tmp_path)
    with _db(pki) as db:
        last = db.execute("SELECT max(seq) FROM audit").fetchone()[0]
        db.execute("DELETE FROM audit WHERE seq=?", (last,))
    r = pki("audit", "verify")
    assert r.code == 1 and "removed" in r.err


def test_verify_catches_certificate_without_record(pki: Cli, tmp_path: Path) -> None:
    serial = issue_tls(pki, tmp_path, 1)[0]
    with _db(pki) as db:
        db.execute("UPDATE certificates SET serial='abcdef1234567890' WHERE serial=?", (serial,))
    r = pki("audit", "verify")
    assert r.code == 1 and "abcdef1234567890" in r.err


def test_verify_catches_an_edited_certificate(pki: Cli, tmp_path: Path) -> None:
    serial = issue_tls(pki, tmp_path, 1)[0]
    with _db(pki) as db:
        pem = db.execute("SELECT pem FROM certificates WHERE serial=?", (serial,)).fetchone()[0]
        other = db.execute("SELECT pem FROM certificates WHERE serial!=? LIMIT 1", (serial,)).fetchone()[0]
        assert pem != other
        db.execute("UPDATE certificates SET pem=? WHERE serial=?", (other, serial))
    r = pki("audit", "verify")
    assert r.code == 1 and serial in r.err


def test_export_is_json_lines(pki: Cli, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    pki.ok("audit", "export", "-o", str(out))
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert all("chain" in r for r in records)
    since = json.loads(pki.ok("--json", "audit", "list", "--since", "3").out)
    assert since[0]["seq"] == 4


def test_refused_requests_are_recorded(pki: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csr"
    bad.write_bytes(b"garbage")
    assert pki("sign", str(bad), "--ca", "issuing", "--profile", "tls-server").code == 1
    assert pki("sign", str(bad), "--ca", "nope", "--profile", "tls-server").code == 1
    good = tmp_path / "g.csr"
    good.write_bytes(make_csr(dns=["a.example.com"]))
    assert pki("sign", str(good), "--ca", "issuing", "--profile", "nope").code == 1
    records = json.loads(pki.ok("--json", "audit", "list").out)
    refused = [r for r in records if r["outcome"] == "refused"]
    assert len(refused) == 3
    assert {r["ca"] for r in refused} == {"issuing", "nope"}
    assert all(r["detail"] for r in refused)
    pki.ok("audit", "verify")


def _rechain(cli: Cli) -> None:
    """What an attacker with write access does after editing: recompute every chain value."""
    from hsm_ca.audit import FIELDS

    with _db(cli) as db:
        rows = db.execute(f"SELECT {', '.join(FIELDS)} FROM audit ORDER BY seq").fetchall()
        prev = GENESIS
        for row in rows:
            record = dict(zip(FIELDS, row, strict=True))
            prev = chain_value(prev, record)
            db.execute("UPDATE audit SET chain=? WHERE seq=?", (prev, record["seq"]))
        db.execute("UPDATE meta SET value=? WHERE key='audit_head'",
                   (json.dumps({"seq": rows[-1][0], "chain": prev}),))


def test_checkpoints_catch_a_rewritten_history(pki: Cli, tmp_path: Path) -> None:
    issue_tls(pki, tmp_path, 2)
    pki.ok("crl", "issuing")  # every CRL is a checkpoint
    cert = tmp_path / "audit.pem"
    pki.ok("audit", "cert", "-o", str(cert))
    ok = pki.ok("audit", "verify", "--trust", str(cert)).out
    assert "checkpoint(s) signed and verified" in ok
    with _db(pki) as db:
        db.execute("UPDATE audit SET subject='CN=rewritten' WHERE seq=5")
    _rechain(pki)
    r = pki("audit", "verify", "--trust", str(cert))
    assert r.code == 1 and "checkpoint" in r.err and "forged" in r.err


def test_periodic_checkpoints(pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hsm_ca.authority import Authority

    monkeypatch.setattr(Authority, "CHECKPOINT_EVERY", 5)
    issue_tls(pki, tmp_path, 6)
    records = json.loads(pki.ok("--json", "audit", "list").out)
    checkpoints = [r["seq"] for r in records if r["action"] == "checkpoint"]
    assert len(checkpoints) >= 3
    assert all(b - a <= 5 + 4 for a, b in zip(checkpoints, checkpoints[1:], strict=False))


def test_offline_verification_of_an_export(pki: Cli, tmp_path: Path) -> None:
    issue_tls(pki, tmp_path, 1)
    pki.ok("audit", "checkpoint")
    issue_tls(pki, tmp_path, 1)
    export, cert = tmp_path / "a.jsonl", tmp_path / "audit.pem"
    pki.ok("audit", "export", "-o", str(export))
    pki.ok("audit", "cert", "-o", str(cert))
    assert "intact" in pki.ok("audit", "verify", "--file", str(export), "--trust", str(cert)).out
    lines = export.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:-2]))
    r = pki("audit", "verify", "--file", str(cut), "--trust", str(cert))
    assert r.code == 1 and "unsigned" in r.err
    other = tmp_path / "other.pem"  # a different key must not vouch for the trail
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "impostor")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    fake = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    other.write_bytes(fake.public_bytes(serialization.Encoding.PEM))
    r = pki("audit", "verify", "--file", str(export), "--trust", str(other))
    assert r.code == 1 and "signature does not verify" in r.err
