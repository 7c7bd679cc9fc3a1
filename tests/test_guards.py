"""Guards a mutation run found unprotected (issue 14, "Tests that let such bugs through").

Each test here fails when the guard it names is removed: the recorded audit head's
chain value, an issued record without its certificate, the one unsigned record after
an export's checkpoint, the serial-collision redraw, the check of a token's
certificate and CRL signatures, and the comparison of the signed TBS with the linted
one. Faults are injected around a real engine or a real home, never into product code.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import USER_PIN, Cli, issue_tls, make_csr

import hsm_ca
import hsm_ca.authority as authority_module
from hsm_ca.audit import chain_value
from hsm_ca.errors import EngineError
from hsm_ca.profiles import shipped_profiles_dir
from hsm_ca.serials import new_serial


@contextlib.contextmanager
def _db(cli: Cli) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(cli.home / "ca.db", isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def _count(cli: Cli, table: str) -> int:
    with _db(cli) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _records(cli: Cli) -> list[dict[str, Any]]:
    return json.loads(cli.ok("--json", "audit", "list").out)  # type: ignore[no-any-return]


def _csr(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.csr"
    path.write_bytes(make_csr(cn=name))
    return path


# ----------------------------------------------------------- audit verify (database)

def test_a_recorded_head_with_the_right_seq_but_another_chain_fails(
        soft_pki: Cli, tmp_path: Path) -> None:
    """Guard: AuditLog.verify's ``head_chain != prev`` (only the count was tested)."""
    issue_tls(soft_pki, tmp_path, 1)
    soft_pki.ok("audit", "verify")
    with _db(soft_pki) as db:
        head = json.loads(db.execute("SELECT value FROM meta WHERE key='audit_head'").fetchone()[0])
        seq, chain = db.execute("SELECT max(seq), (SELECT chain FROM audit WHERE seq = "
                                "(SELECT max(seq) - 1 FROM audit)) FROM audit").fetchone()
        assert head["seq"] == seq and head["chain"] != chain
        # the right record number, but the chain value of the record before it
        db.execute("UPDATE meta SET value=? WHERE key='audit_head'",
                   (json.dumps({"seq": seq, "chain": chain}),))
    r = soft_pki("audit", "verify")
    assert r.code == 1, r.out
    assert "Error:" in r.err


def test_an_issued_record_without_its_certificate_row_fails_naming_the_serial(
        soft_pki: Cli, tmp_path: Path) -> None:
    """Guard: AuditLog.verify's "the trail records an issuance the database lacks"."""
    serial, kept = issue_tls(soft_pki, tmp_path, 2)
    soft_pki.ok("audit", "verify")
    with _db(soft_pki) as db:  # the certificate row only: its serial and audit records stay
        assert db.execute("DELETE FROM certificates WHERE serial=?", (serial,)).rowcount == 1
    r = soft_pki("audit", "verify")
    assert r.code == 1, r.out
    assert serial in r.err and kept not in r.err


# ----------------------------------------------------------- audit verify --file (export)

def test_one_chained_record_after_the_export_checkpoint_fails(
        soft_pki: Cli, tmp_path: Path) -> None:
    """Guard: verify_export's ``count > walk.last_checkpoint`` at its boundary (one record)."""
    issue_tls(soft_pki, tmp_path, 1)
    export, cert = tmp_path / "audit.jsonl", tmp_path / "audit.pem"
    soft_pki.ok("audit", "export", "-o", str(export))
    soft_pki.ok("audit", "cert", "-o", str(cert))
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert records[-1]["action"] == "checkpoint"
    assert soft_pki.ok("audit", "verify", "--file", str(export), "--trust", str(cert)).code == 0
    # one record more, correctly numbered and chained: what an attacker appends
    issued = next(r for r in reversed(records) if r["outcome"] == "issued")
    extra = dict(issued, seq=records[-1]["seq"] + 1, subject="CN=appended.example.com")
    extra["chain"] = chain_value(records[-1]["chain"], extra)
    extended = tmp_path / "extended.jsonl"
    extended.write_text(export.read_text() + json.dumps(extra, sort_keys=True) + "\n")
    r = soft_pki("audit", "verify", "--file", str(extended), "--trust", str(cert))
    assert r.code == 1, r.out
    assert "unsigned" in r.err


# ----------------------------------------------------------- serials

def test_a_colliding_serial_is_redrawn(
        soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: Authority._reserve redraws when store.reserve_serial says the serial was used."""
    used = issue_tls(soft_pki, tmp_path, 1)[0]
    draws: list[int] = []

    def colliding() -> int:  # first the serial already issued, then real draws
        draws.append(int(used, 16) if not draws else new_serial())
        return draws[-1]

    monkeypatch.setattr(authority_module, "new_serial", colliding)
    fresh = issue_tls(soft_pki, tmp_path, 1, tag="d")[0]
    assert draws[0] == int(used, 16) and len(draws) >= 2
    assert fresh == format(draws[1], "x") != used
    with _db(soft_pki) as db:
        assert db.execute("SELECT state FROM serials WHERE serial=?", (fresh,)).fetchone() == ("issued",)
        assert db.execute("SELECT count(*) FROM serials WHERE serial=?", (used,)).fetchone() == (1,)
    old = json.loads(soft_pki.ok("--json", "show", used).out)
    assert "c0.example.com" in json.dumps(old)  # the first certificate is untouched
    assert [r["outcome"] for r in _records(soft_pki) if r["serial"] == used] == ["intent", "issued"]
    soft_pki.ok("audit", "verify")


# ----------------------------------------------------------- a token that signs wrongly

class _WrongSignatureHandle:
    """A real key handle whose signatures are well-formed but over other bytes."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.label, self.key_type, self.extractable = handle.label, handle.key_type, handle.extractable

    def public_key(self) -> Any:
        return self._handle.public_key()

    def sign(self, data: bytes, algorithm: Any, padding: Any = None) -> bytes:
        return self._handle.sign(data + b"\x00", algorithm, padding)  # type: ignore[no-any-return]


class _FaultyToken:
    """A real engine (soft or SoftHSM2) whose key ``label`` signs the wrong bytes.

    It stands for a hardware token, so it does not carry the built-in engine's
    ``signatures_trusted``: the CA must check its signatures before storing anything.
    """

    signatures_trusted = False

    def __init__(self, engine: Any, label: str) -> None:
        self._engine, self._label = engine, label

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def get_key(self, label: str) -> Any:
        handle = self._engine.get_key(label)
        return _WrongSignatureHandle(handle) if label == self._label else handle


def test_a_token_signing_wrongly_issues_nothing_and_signs_no_crl(
        pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: authority._check_signature on issuance, and sign_crl's signature check."""
    real_open = authority_module.open_engine
    monkeypatch.setattr(authority_module, "open_engine",
                        lambda config: _FaultyToken(real_open(config), "ca-issuing"))
    certs = _count(pki, "certificates")
    out = tmp_path / "w.pem"
    r = pki("sign", str(_csr(tmp_path, "w")), "--ca", "issuing", "--profile", "tls-client",
            "-o", str(out))
    assert r.code == 1 and "Error:" in r.err, (r.code, r.out, r.err)
    assert _count(pki, "certificates") == certs and not out.exists()
    last = [x for x in _records(pki) if x["action"] == "issue"][-1]
    assert last["outcome"] == "failed" and last["ca"] == "issuing" and last["serial"]
    with _db(pki) as db:
        assert db.execute("SELECT state FROM serials WHERE serial=?",
                          (last["serial"],)).fetchone() == ("failed",)

    r = pki("crl", "issuing", "-o", str(tmp_path / "issuing.crl"))
    assert r.code == 1 and "Error:" in r.err, (r.code, r.out, r.err)
    from hsm_ca.revocation import sign_crl

    authority = hsm_ca.open_home(pki.home, pin=USER_PIN)
    try:
        with pytest.raises(EngineError):
            sign_crl(authority, "issuing")
    finally:
        authority.close()
    assert _count(pki, "crls") == 0 and not (tmp_path / "issuing.crl").exists()
    crl = [x["outcome"] for x in _records(pki) if x["action"] == "crl" and x["ca"] == "issuing"]
    assert crl.count("failed") == 2 and "issued" not in crl
    pki.ok("audit", "verify")


# ----------------------------------------------------------- signed TBS != linted TBS

def test_a_signed_tbs_other_than_the_linted_one_is_refused(
        soft_pki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the linted-vs-signed TBS comparison in Authority._sign and in sign_crl.

    Both are built once, signed with a throwaway key for pkilint, then signed again
    by the CA's key; the TBS names its signature algorithm, so a throwaway key of
    another type (RSA for this EC CA, through ``hsm_ca.linting.throwaway_key``) makes
    the linted TBS differ from the signed one in that field alone. Linting itself
    passes either way: first the same requests succeed with the honest throwaway key.
    """
    (soft_pki.home / "profiles").mkdir(exist_ok=True)
    for name in ("tls-client", "intermediate-ca"):
        text = (shipped_profiles_dir() / f"{name}.toml").read_text()
        (soft_pki.home / "profiles" / f"{name}.toml").write_text(
            text.replace("[certificate]", "[certificate]\nlint = true", 1))
    args = ("--ca", "issuing", "--profile", "tls-client")
    soft_pki.ok("sign", str(_csr(tmp_path, "honest")), *args)
    soft_pki.ok("crl", "issuing")

    import hsm_ca.linting
    from hsm_ca.engine.keys import new_software_key

    other = new_software_key("rsa-2048")
    monkeypatch.setattr(hsm_ca.linting, "throwaway_key", lambda key_type: other)
    certs, crls = _count(soft_pki, "certificates"), _count(soft_pki, "crls")
    r = soft_pki("sign", str(_csr(tmp_path, "w")), *args)
    assert r.code == 1 and "linted" in r.err, (r.code, r.out, r.err)
    assert _count(soft_pki, "certificates") == certs
    last = [x for x in _records(soft_pki) if x["action"] == "issue"][-1]
    assert last["outcome"] == "failed" and "linted" in last["detail"]
    r = soft_pki("crl", "issuing")
    assert r.code == 1 and "linted" in r.err, (r.code, r.out, r.err)
    assert _count(soft_pki, "crls") == crls
    last = json.loads(soft_pki.ok("--json", "audit", "list").out)[-1]
    assert (last["action"], last["outcome"]) == ("crl", "failed") and "linted" in last["detail"]
    soft_pki.ok("audit", "verify")
