"""What only the PKCS#11 engine does: token attributes, sessions, retries, URIs, pkcs11-tool."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import USER_PIN, Cli, new_softhsm_token, softhsm_module
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hsm_ca.config import ConfigError, Pkcs11Settings
from hsm_ca.engine import KeySpec
from hsm_ca.engine.pkcs11 import Pkcs11Engine, ckr_name, parse_pkcs11_uri
from hsm_ca.errors import EngineError, LoginFailed


@pytest.fixture
def token() -> str:
    return new_softhsm_token()


def _engine(token: str, **kw: object) -> Pkcs11Engine:
    eng = Pkcs11Engine(Pkcs11Settings(module=softhsm_module(), token_label=token), **kw)  # type: ignore[arg-type]
    eng.login("crypto-user", USER_PIN)
    return eng


def test_keys_are_sensitive_and_never_extractable(token: str) -> None:
    eng = _engine(token)
    for kt in ("ec-p256", "rsa-2048", "ed25519"):
        h = eng.generate_key(KeySpec(kt, f"k-{kt}"))
        assert h.attributes() == {
            "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "ALWAYS_SENSITIVE": True,
            "EXTRACTABLE": False, "NEVER_EXTRACTABLE": True,
        }
    # what pkcs11-tool (OpenSC), an independent client, sees on the token
    r = subprocess.run(
        ["pkcs11-tool", "--module", softhsm_module(), "--token-label", token, "--login",
         "--pin", USER_PIN, "-O"], capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("Private Key Object")[1:]
    assert len(blocks) == 3
    for block in blocks:
        access = next(ln for ln in block.splitlines() if ln.strip().startswith("Access:"))
        flags = {f.strip() for f in access.split(":", 1)[1].split(",")}
        assert {"sensitive", "always sensitive", "never extractable"} <= flags, access
        assert "extractable" not in flags, access


def test_session_lost_is_recovered_by_logging_in_again(token: str) -> None:
    eng = _engine(token)
    h = eng.generate_key(KeySpec("ec-p256", "k"))
    eng._session.close()  # the token closed our session (device reset, idle timeout, ...)
    sig = h.sign(b"data", hashes.SHA256())
    h.public_key().verify(sig, b"data", ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr]


def test_transient_errors_are_retried_with_backoff(token: str) -> None:
    import pkcs11.exceptions as p11e

    sleeps: list[float] = []
    eng = _engine(token, sleep=sleeps.append)
    calls = {"n": 0}

    def flaky() -> str:  # what CloudHSM does when throttled: CKR_FUNCTION_FAILED, then fine
        calls["n"] += 1
        if calls["n"] < 3:
            raise p11e.FunctionFailed()
        return "ok"

    assert eng._call("throttled op", flaky) == "ok"
    assert sleeps == [0.05, 0.2]

    def broken() -> str:
        raise p11e.FunctionFailed()

    with pytest.raises(EngineError, match="after 5 attempts: CKR_FUNCTION_FAILED"):
        eng._call("doomed op", broken)
    assert len(sleeps) == 2 + 4


def test_errors_name_the_return_code(token: str) -> None:
    import pkcs11.exceptions as p11e

    assert ckr_name(p11e.PinIncorrect()) == "CKR_PIN_INCORRECT"
    assert ckr_name(p11e.FunctionFailed()) == "CKR_FUNCTION_FAILED"
    with pytest.raises(LoginFailed, match="CKR_PIN_INCORRECT"):
        Pkcs11Engine(Pkcs11Settings(module=softhsm_module(), token_label=token)).login("u", "wrong")
    with pytest.raises(ConfigError, match="no PKCS#11 token labelled"):
        Pkcs11Engine(Pkcs11Settings(module=softhsm_module(), token_label="absent")).login("u", "x")
    with pytest.raises(ConfigError, match="cannot load"):
        Pkcs11Engine(Pkcs11Settings(module="/nonexistent/lib.so", token_label="x"))


def test_uri_parsing_and_binding(token: str) -> None:
    assert parse_pkcs11_uri("pkcs11:token=My%20Token;object=ca-root?pin-source=file:/x") == {
        "token": "My Token", "object": "ca-root"}
    with pytest.raises(ConfigError):
        parse_pkcs11_uri("https://example.com")
    eng = Pkcs11Engine(Pkcs11Settings(module=softhsm_module(), uri=f"pkcs11:token={token}"))
    eng.login("u", USER_PIN)
    assert eng.list_keys() == []


def test_ca_on_a_token_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    token = new_softhsm_token()
    cli.ok("init", "--engine", "pkcs11", "--pkcs11-module", softhsm_module(),
           "--pkcs11-uri", f"pkcs11:token={token}")
    cli.ok("ca", "create-root", "root", "--subject", "CN=Token Root,C=NL", "--key-type", "rsa-2048")
    keys = json.loads(cli.ok("--json", "keys", "list").out)
    assert keys == [{"label": "ca-root", "key_type": "rsa-2048", "extractable": False,
                     "used_by": "ca:root"}]
    root = x509.load_pem_x509_certificate(cli.ok("ca", "export", "root").out.encode())
    root.verify_directly_issued_by(root)
    assert not (cli.home / "hsm").exists()  # no software keystore for a token-backed home
    r = cli("init", "--engine", "pkcs11", "--pkcs11-module", softhsm_module())
    assert r.code in (1, 2) and r.err.startswith("Error:")
