"""Every way to splice an audit history around its signed checkpoints, and the verdict on each.

The attacker here can write the database and the export (and recompute every
chain value), but has no access to the HSM's audit key. Each case builds the
forgery the way such an attacker would, then asks the real CLI.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import USER_PIN, Cli, init_args, issue_tls

from hsm_ca.audit import (
    FIELDS,
    GENESIS,
    chain_value,
    checkpoint_payload,
    verify_export,
    walk_records,
)


def _export(cli: Cli, path: Path) -> list[dict[str, Any]]:
    cli.ok("audit", "export", "-o", str(path))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rechain(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Renumber and re-chain, as an attacker with write access would."""
    out, prev = [], GENESIS
    for n, record in enumerate(records, start=1):
        record = dict(record, seq=n)
        record["chain"] = prev = chain_value(prev, record)
        out.append(record)
    return out


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def _checkpoints(records: list[dict[str, Any]]) -> list[int]:
    return [i for i, r in enumerate(records) if r["action"] == "checkpoint"]


def _verify_file(cli: Cli, export: Path, cert: Path, *extra: str) -> Any:
    return cli("audit", "verify", "--file", str(export), "--trust", str(cert), *extra)


@pytest.fixture
def trail(pki: Cli, tmp_path: Path) -> tuple[Cli, Path, list[dict[str, Any]]]:
    """A home with two issuances, a CRL checkpoint, two more issuances; its audit cert."""
    issue_tls(pki, tmp_path, 2)
    pki.ok("crl", "issuing")
    issue_tls(pki, tmp_path, 2, tag="d")
    cert = tmp_path / "audit.pem"
    pki.ok("audit", "cert", "-o", str(cert))
    return pki, cert, _export(pki, tmp_path / "genuine.jsonl")


def test_the_genuine_export_verifies(trail: tuple[Cli, Path, list[dict[str, Any]]],
                                     tmp_path: Path) -> None:
    cli, cert, records = trail
    r = _verify_file(cli, _write(tmp_path / "g.jsonl", records), cert)
    assert r.code == 0, r.err
    assert "checkpoint(s) signed and verified" in r.out


def test_a_replayed_checkpoint_does_not_vouch_for_a_forged_record(
        trail: tuple[Cli, Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The review's repro: keep 1..K, add a forgery, append a copy of the checkpoint signing K."""
    cli, cert, records = trail
    first = _checkpoints(records)[0]
    forged = dict(records[first - 1], subject="CN=forged.example.com", detail="forged")
    spliced = _rechain([*records[:first], forged, records[first]])
    r = _verify_file(cli, _write(tmp_path / "f.jsonl", spliced), cert)
    assert r.code == 1, r.out
    assert "forged" in r.err and "copied or moved" in r.err


def test_a_moved_checkpoint_is_refused(trail: tuple[Cli, Path, list[dict[str, Any]]],
                                       tmp_path: Path) -> None:
    cli, cert, records = trail
    last = _checkpoints(records)[-1]
    moved = [*records[:last - 1], records[last], records[last - 1], *records[last + 1:]]
    r = _verify_file(cli, _write(tmp_path / "m.jsonl", _rechain(moved)), cert)
    assert r.code == 1 and "forged" in r.err


def test_an_edited_field_of_the_checkpoint_record_itself_is_refused(
        trail: tuple[Cli, Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The last checkpoint's own time and actor are signed too, not only the chain it names."""
    cli, cert, records = trail
    edited = copy.deepcopy(records)
    last = _checkpoints(edited)[-1]
    edited[last]["time"] = "2020-01-01T00:00:00.000000Z"
    edited[last]["os_user"] = "someone-else"
    r = _verify_file(cli, _write(tmp_path / "e.jsonl", _rechain(edited)), cert)
    assert r.code == 1 and "signature does not verify" in r.err


def test_a_trail_cut_back_to_an_old_checkpoint_fails_against_an_anchor(
        pki: Cli, tmp_path: Path) -> None:
    """A cut exactly at an older checkpoint is a genuine prefix: only a noted anchor reveals it."""
    issue_tls(pki, tmp_path, 1)
    old = json.loads(pki.ok("--json", "audit", "checkpoint").out)
    issue_tls(pki, tmp_path, 1, tag="d")
    new = json.loads(pki.ok("--json", "audit", "checkpoint").out)
    assert new["anchor"] == f"{new['checkpoint']}:{new['chain']}"
    cert = tmp_path / "audit.pem"
    pki.ok("audit", "cert", "-o", str(cert))
    first = _export(pki, tmp_path / "first.jsonl")  # an earlier export, ending at its checkpoint
    issue_tls(pki, tmp_path, 1, tag="e")
    records = _export(pki, tmp_path / "all.jsonl")
    # cut back to a checkpoint that was not made for an export: refused by itself
    cut = _write(tmp_path / "cut.jsonl", records[:new["checkpoint"]])
    r = _verify_file(pki, cut, cert)
    assert r.code == 1 and "cut back to an earlier checkpoint" in r.err
    # cut back to exactly the earlier export's checkpoint: a genuine earlier export, honestly
    # intact (and says when it was made); only an anchor noted since reveals the cut
    cut = _write(tmp_path / "cut2.jsonl", records[:len(first)])
    r = _verify_file(pki, cut, cert)
    assert r.code == 0 and "the export was made at" in r.out
    r = _verify_file(pki, cut, cert, "--anchor", f"{len(records)}:{records[-1]['chain']}")
    assert r.code == 1 and "cut back" in r.err
    full = _write(tmp_path / "full.jsonl", records)
    assert _verify_file(pki, full, cert, "--anchor", new["anchor"], "--anchor", old["anchor"]).code == 0
    # an anchor that the trail contradicts: history before it was rewritten
    bad = f"{old['checkpoint']}:{'0' * 64}"
    r = _verify_file(pki, full, cert, "--anchor", bad)
    assert r.code == 1 and "rewritten" in r.err
    r = pki("audit", "verify", "--anchor", "12:nothex")
    assert r.code == 2 and r.err.startswith("Error:")
    # the same on the live home: cut the trail and the certificates back to the old checkpoint
    with sqlite3.connect(pki.home / "ca.db", isolation_level=None) as db:
        db.execute("DELETE FROM audit WHERE seq > ?", (old["checkpoint"],))
        db.execute("DELETE FROM certificates WHERE serial NOT IN "
                   "(SELECT serial FROM audit WHERE serial IS NOT NULL)")
        db.execute("UPDATE meta SET value=? WHERE key='audit_head'",
                   (json.dumps({"seq": old["checkpoint"], "chain": old["chain"]}),))
    assert pki("audit", "verify", "--trust", str(cert)).code == 0
    r = pki("audit", "verify", "--trust", str(cert), "--anchor", new["anchor"])
    assert r.code == 1 and "cut back" in r.err


def test_deleting_an_issuance_on_the_live_home_is_caught(pki: Cli, tmp_path: Path) -> None:
    """The review's live repro: delete intent + issued + certificate row after a checkpoint,
    put a copy of that older checkpoint where the newer one stood, re-chain, fix the head."""
    cert = tmp_path / "audit.pem"
    pki.ok("audit", "cert", "-o", str(cert))
    issue_tls(pki, tmp_path, 1)
    pki.ok("crl", "issuing")  # checkpoint 1
    serial = issue_tls(pki, tmp_path, 1, tag="d")[0]
    pki.ok("audit", "checkpoint")  # checkpoint 2, which would reveal the deletion
    assert pki("audit", "verify", "--trust", str(cert)).code == 0
    with sqlite3.connect(pki.home / "ca.db", isolation_level=None) as db:
        rows = [dict(zip((*FIELDS, "chain"), row, strict=True)) for row in db.execute(
            f"SELECT {', '.join(FIELDS)}, chain FROM audit ORDER BY seq")]
        first = next(r for r in rows if r["action"] == "checkpoint")
        kept = [r for r in rows if r["serial"] != serial]
        assert kept[-1]["action"] == "checkpoint"
        kept = _rechain([*kept[:-1], first])
        db.execute("DELETE FROM audit")
        db.execute("DELETE FROM certificates WHERE serial=?", (serial,))
        db.execute("DELETE FROM serials WHERE serial=?", (serial,))
        for r in kept:
            db.execute(f"INSERT INTO audit({', '.join(FIELDS)}, chain) VALUES "
                       f"({', '.join('?' * (len(FIELDS) + 1))})", [r[k] for k in (*FIELDS, 'chain')])
        db.execute("UPDATE meta SET value=? WHERE key='audit_head'",
                   (json.dumps({"seq": kept[-1]["seq"], "chain": kept[-1]["chain"]}),))
    r = pki("audit", "verify", "--trust", str(cert))
    assert r.code == 1 and "forged" in r.err
    r = pki("audit", "verify")  # the home's own certificate catches it too
    assert r.code == 1 and "forged" in r.err


def test_another_homes_checkpoint_is_refused(trail: tuple[Cli, Path, list[dict[str, Any]]],
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cli, cert, records = trail
    other = Cli(tmp_path / "other-home", capsys, monkeypatch)
    other.ok(*init_args("soft"))
    other.ok("ca", "create-root", "root", "--subject", "CN=Other Root")
    other.ok("audit", "checkpoint")
    other_records = _export(other, tmp_path / "other.jsonl")
    foreign = other_records[_checkpoints(other_records)[-1]]
    spliced = _rechain([*records, foreign])  # appended: it names another position
    r = _verify_file(cli, _write(tmp_path / "x.jsonl", spliced), cert)
    assert r.code == 1 and "forged" in r.err and "copied or moved" in r.err
    # at the position it names: the history it signs is not this one
    at = foreign["seq"] - 1
    spliced = _rechain([*records[:at], foreign])
    r = _verify_file(cli, _write(tmp_path / "y.jsonl", spliced), cert)
    assert r.code == 1 and f"signs a chain value that record {at} does not have" in r.err


def test_two_homes_sharing_one_audit_key_keep_their_trails_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two homes on one PKCS#11 token share the audit key; the trail id still tells them apart."""
    args = init_args("pkcs11")
    token = args[args.index("--token-label") + 1]
    a = Cli(tmp_path / "a", capsys, monkeypatch)
    b = Cli(tmp_path / "b", capsys, monkeypatch)
    a.ok(*args)
    b.ok(*[*args[:args.index("--token-label") + 1], token])
    a.ok("audit", "checkpoint")
    b.ok("audit", "checkpoint")
    cert_a, cert_b = tmp_path / "a.pem", tmp_path / "b.pem"
    a.ok("audit", "cert", "-o", str(cert_a))
    b.ok("audit", "cert", "-o", str(cert_b))
    export_b = tmp_path / "b.jsonl"
    b.ok("audit", "export", "-o", str(export_b))
    assert _verify_file(b, export_b, cert_b).code == 0
    r = _verify_file(a, export_b, cert_a)  # same key, but A's certificate names A's trail
    assert r.code == 1 and "trail" in r.err


def test_an_export_line_that_is_not_a_record_is_named(
        trail: tuple[Cli, Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    cli, cert, records = trail
    genuine = json.dumps(records[2])
    # a repeated key: a reader keeping the first value would see another record than the chain
    duplicate = '{"subject":"CN=someone else",' + genuine[1:]
    for n, bad in enumerate(["[1,2]", "{}", "not json", '"text"', "[" * 100_000,
                             json.dumps(dict(records[2], extra="x")),
                             json.dumps(dict(records[2], seq="3")), duplicate]):
        lines = [json.dumps(r) for r in records]
        lines[2] = bad
        export = tmp_path / f"bad{n}.jsonl"
        export.write_text("\n".join(["", *lines]) + "\n")  # a blank first line: line 4 is bad
        r = _verify_file(cli, export, cert)
        assert r.code == 1, bad[:20]
        err = r.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error:") and "audit record 3" in err[0], r.err
        assert "line 4:" in err[0], r.err
        assert "internal error" not in r.err and "Traceback" not in r.err
        if bad is duplicate:
            assert "appears twice" in err[0]


# ---------------------------------------------- version-1 checkpoints (homes from before)
def _v1_trail(n: int, checkpoint_after: list[int]) -> tuple[list[dict[str, Any]], Any]:
    """A trail with old-style checkpoints (they signed only seq and chain)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    records: list[dict[str, Any]] = []
    prev = GENESIS
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for i in range(1, n + 1):
        record: dict[str, Any] = {k: None for k in FIELDS}
        record.update(seq=len(records) + 1, time=now, os_user="op", action="issue",
                      outcome="refused", detail=f"r{i}")
        record["chain"] = prev = chain_value(prev, record)
        records.append(record)
        if i in checkpoint_after:
            seq = len(records)
            sig = key.sign(checkpoint_payload(seq, prev), ec.ECDSA(hashes.SHA256()))
            cp: dict[str, Any] = {k: None for k in FIELDS}
            cp.update(seq=seq + 1, time=now, os_user="op", action="checkpoint", outcome="signed",
                      detail=json.dumps({"seq": seq, "chain": prev,
                                         "signature": base64.b64encode(sig).decode()}))
            cp["chain"] = prev = chain_value(prev, cp)
            records.append(cp)
    return records, key.public_key()


def test_version_1_checkpoints_still_verify_in_place() -> None:
    records, key = _v1_trail(6, [3, 6])
    walk = walk_records(records, key)
    assert walk.report.ok, walk.report.problem
    # but an export must end with a checkpoint that signs it was made for the export
    report = verify_export([json.dumps(r) for r in records], key)
    assert not report.ok and "version-1" in (report.problem or "")


def test_a_replayed_version_1_checkpoint_is_refused() -> None:
    records, key = _v1_trail(6, [3])
    cp = records[3]
    forged = dict(records[2], detail="forged")
    spliced = _rechain([*records[:3], forged, cp])
    walk = walk_records(spliced, key)
    assert not walk.report.ok and "copied or moved" in (walk.report.problem or "")


def test_a_home_from_before_version_2_checkpoints_keeps_verifying(
        soft_pki: Cli, tmp_path: Path) -> None:
    """Old checkpoints (v1, old audit certificate without a trail id), then new ones, on a live home."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    import hsm_ca
    from hsm_ca.engine.keys import as_private_key
    from hsm_ca.x509util import cert_pem

    issue_tls(soft_pki, tmp_path, 1)
    with hsm_ca.open_home(soft_pki.home, pin=USER_PIN) as ca:  # what the older code wrote
        handle = ca._new_key(ca.AUDIT_KEY, "ec-p256", ca.actor())
        key = as_private_key(handle)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsm-ca audit trail signer")])
        now = dt.datetime.now(dt.UTC)
        old_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(handle.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
                    .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
        with ca.store.transaction():
            ca.store.set_meta("audit_cert", cert_pem(old_cert))
        for _ in range(2):
            with ca.store.transaction():
                seq, chain = ca.audit._head()
                sig = key.sign(checkpoint_payload(seq, chain), ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
                ca.audit.append(ca.actor(), "checkpoint", "signed", key_label=handle.label,
                                detail=json.dumps({"seq": seq, "chain": chain, "reason": "manual",
                                                   "signature": base64.b64encode(sig).decode()}))
    old_pem = tmp_path / "old-audit.pem"
    old_pem.write_bytes(old_cert.public_bytes(serialization.Encoding.PEM))
    assert soft_pki("audit", "verify", "--trust", str(old_pem)).code == 0
    soft_pki.ok("audit", "checkpoint")  # version 2 from now on
    issue_tls(soft_pki, tmp_path, 1, tag="d")
    soft_pki.ok("crl", "issuing")
    for args in ((), ("--trust", str(old_pem))):
        r = soft_pki("audit", "verify", *args)
        assert r.code == 0, r.err
        assert "4 checkpoint(s) signed and verified" in r.out
    export = tmp_path / "mixed.jsonl"
    records = _export(soft_pki, export)
    assert sorted({json.loads(r["detail"]).get("v", 1) for r in records
                   if r["action"] == "checkpoint"}) == [1, 2]
    assert _verify_file(soft_pki, export, old_pem).code == 0


def test_an_export_without_a_pin_says_it_cannot_be_verified(
        soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    soft_pki.ok("crl", "issuing")
    cert = tmp_path / "audit.pem"
    soft_pki.ok("audit", "cert", "-o", str(cert))
    monkeypatch.delenv("HSM_CA_PIN")
    export = tmp_path / "nopin.jsonl"
    r = soft_pki.ok("audit", "export", "-o", str(export))
    assert r.err.startswith("Warning:") and "without its signed checkpoint" in r.err
    r = _verify_file(soft_pki, export, cert)
    assert r.code == 1 and "made without a PIN or with --no-checkpoint" in r.err
