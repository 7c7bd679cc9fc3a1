"""The PKCS#11 signing helper: large batches signed by a second process on a real SoftHSM2 token.

What must hold whatever the helper does: every certificate carries a signature
checked against the CA key before it is stored, results stay in request order,
the audit chain verifies, no PIN reaches argv or the environment, and no helper
outlives its engine or its parent process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import USER_PIN, make_csr, new_softhsm_token, softhsm_module
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import hsm_ca
from hsm_ca.authority import HELPER_MIN_BATCH, Authority, IssuedCertificate, Refusal, _chunk_sizes
from hsm_ca.config import ConfigError, Pkcs11Settings, load_config
from hsm_ca.engine import KeySpec
from hsm_ca.engine.p11_helper import HelperGone, SigningHelper
from hsm_ca.errors import EngineError


def _home(tmp_path: Path, *, key_type: str = "rsa-2048", helper: bool = True) -> Authority:
    token = new_softhsm_token()
    authority = hsm_ca.init_home(
        tmp_path / "home", user_pin=USER_PIN, engine="pkcs11", scrypt_n=1024,
        pkcs11=Pkcs11Settings(module=softhsm_module(), token_label=token, signing_helper=helper),
    )
    authority.create_root("root", hsm_ca.parse_dn("CN=Helper Root"), key_type="ec-p256")
    authority.create_intermediate("issuing", "root", hsm_ca.parse_dn("CN=Helper Issuing"),
                                  key_type=key_type, path_length=0)
    return authority


def _ready_helper(authority: Authority) -> SigningHelper:
    helper = authority.engine().signing_helper(authority.get_ca("issuing").key_label)  # type: ignore[attr-defined]
    assert helper is not None and helper.ready(wait=60), helper and helper.broken
    return helper  # type: ignore[no-any-return]


def _csrs(n: int, bad: frozenset[int] | set[int] = frozenset()) -> list[tuple[str, bytes]]:
    return [(f"c{i}", b"not a CSR" if i in bad else make_csr(f"h{i}.example.com"))
            for i in range(n)]


def _issued(results: list[Any]) -> list[IssuedCertificate]:
    return [r for r in results if isinstance(r, IssuedCertificate)]


def test_chunk_sizes_cover_the_batch_small_at_both_ends() -> None:
    for n in range(0, 400):
        sizes = _chunk_sizes(n)
        assert sum(sizes) == n and all(s > 0 for s in sizes), n
        assert max(sizes, default=0) <= 16
        if n >= 64:
            assert sizes[0] == 4 and sizes[-1] == 4


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p256", "ed25519"])
def test_a_large_batch_is_signed_by_the_helper_in_order(tmp_path: Path, key_type: str) -> None:
    authority = _home(tmp_path, key_type=key_type)
    try:
        helper = _ready_helper(authority)
        csrs = _csrs(HELPER_MIN_BATCH + 17, bad={3, 40, 70})
        results = authority.sign_csrs("issuing", csrs, "tls-client")
        assert [r.source for r in results] == [s for s, _ in csrs]
        assert [isinstance(r, Refusal) for r in results] == [i in {3, 40, 70} for i in range(len(csrs))]
        issued = _issued(results)
        assert helper.signed == len(issued) == len(csrs) - 3  # every signature came from the helper
        issuing = authority.get_ca("issuing").certificate
        for i, r in enumerate(results):
            if isinstance(r, IssuedCertificate):
                r.certificate.verify_directly_issued_by(issuing)
                assert r.certificate.subject.rfc4514_string() == f"CN=h{i}.example.com"
                assert r.chain and r.chain[0] == issuing
        rows = authority.list_certificates("issuing")
        assert len(rows) == len(issued)
        assert {r.serial for r in issued} == {row["serial"] for row in rows}
        report = authority.audit.verify()
        assert report.ok, report.problem
    finally:
        authority.close()


def test_openssl_verifies_helper_signed_certificates(tmp_path: Path) -> None:
    authority = _home(tmp_path)
    try:
        _ready_helper(authority)
        results = _issued(authority.sign_csrs("issuing", _csrs(HELPER_MIN_BATCH), "tls-client"))
        pem = serialization.Encoding.PEM
        (tmp_path / "root.pem").write_bytes(authority.get_ca("root").certificate.public_bytes(pem))
        (tmp_path / "chain.pem").write_bytes(
            authority.get_ca("issuing").certificate.public_bytes(pem))
        for i in (0, len(results) // 2, len(results) - 1):
            leaf = tmp_path / f"leaf{i}.pem"
            leaf.write_text(results[i].pem)
            r = subprocess.run(
                ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem"),
                 "-untrusted", str(tmp_path / "chain.pem"), str(leaf)],
                capture_output=True, text=True, timeout=60,
            )
            assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr
    finally:
        authority.close()


def test_a_helper_signing_with_the_wrong_key_issues_nothing(tmp_path: Path) -> None:
    """A faulty HSM: the helper answers with signatures the CA key did not make."""
    authority = _home(tmp_path)
    try:
        engine = authority.engine()
        engine.generate_key(KeySpec("rsa-2048", "not-the-ca-key"))
        label = authority.get_ca("issuing").key_label
        wrong = engine.signing_helper("not-the-ca-key")  # type: ignore[attr-defined]
        assert wrong.ready(wait=60)
        engine._helpers[label] = wrong  # type: ignore[attr-defined]
        results = authority.sign_csrs("issuing", _csrs(HELPER_MIN_BATCH), "tls-client")
        assert all(isinstance(r, Refusal) for r in results)
        assert all("invalid signature" in str(r.error) for r in results)  # type: ignore[union-attr]
        assert authority.list_certificates("issuing") == []
        failed = [r for r in authority.audit.records() if r["outcome"] == "failed"]
        assert len(failed) == HELPER_MIN_BATCH
        assert authority.audit.verify().ok
    finally:
        authority.close()


def test_a_helper_killed_before_or_during_a_batch_changes_nothing_for_the_caller(
    tmp_path: Path,
) -> None:
    authority = _home(tmp_path)
    try:
        helper = _ready_helper(authority)
        os.kill(helper.pid, signal.SIGKILL)  # dead before the batch: signed in this process
        first = authority.sign_csrs("issuing", _csrs(HELPER_MIN_BATCH), "tls-client")
        assert len(_issued(first)) == HELPER_MIN_BATCH
        assert helper.broken
        # a new engine session gets a new helper; kill it in the middle of a batch
        authority.engine().logout()
        authority.engine().login(authority.config.user, USER_PIN)
        helper = _ready_helper(authority)

        def kill_midway() -> None:  # once the helper has signed a part, not all
            deadline = time.monotonic() + 60
            while helper.signed < 50 and time.monotonic() < deadline:
                time.sleep(0.0005)
            os.kill(helper.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_midway)
        killer.start()
        second = authority.sign_csrs("issuing", _csrs(400), "tls-client")
        killer.join()
        assert 50 <= helper.signed < 400 and helper.broken  # the rest was signed in-process
        assert len(_issued(second)) == 400
        issuing = authority.get_ca("issuing").certificate
        for r in _issued(first + second):
            r.certificate.verify_directly_issued_by(issuing)
        assert len(authority.list_certificates("issuing")) == HELPER_MIN_BATCH + 400
        assert authority.audit.verify().ok
    finally:
        authority.close()


def test_the_pin_never_reaches_the_helpers_argv_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HSM_CA_PIN", USER_PIN)
    authority = _home(tmp_path)
    try:
        helper = _ready_helper(authority)
        for name in ("cmdline", "environ"):
            data = Path(f"/proc/{helper.pid}/{name}").read_bytes()
            assert USER_PIN.encode() not in data, name
        assert b"p11_helper" in Path(f"/proc/{helper.pid}/cmdline").read_bytes()
    finally:
        authority.close()


def test_helpers_end_with_the_engine_and_with_a_dead_parent(tmp_path: Path) -> None:
    authority = _home(tmp_path)
    helper = _ready_helper(authority)
    authority.close()
    assert helper._proc.poll() is not None  # closed with the engine

    # a parent killed outright: the helper sees the end of its input and exits
    token = new_softhsm_token()
    script = textwrap.dedent(f"""
        import os, sys
        from hsm_ca.config import Pkcs11Settings
        from hsm_ca.engine import KeySpec
        from hsm_ca.engine.pkcs11 import Pkcs11Engine
        eng = Pkcs11Engine(Pkcs11Settings(module={softhsm_module()!r}, token_label={token!r}))
        eng.login("crypto-user", sys.stdin.readline().strip())
        eng.generate_key(KeySpec("ec-p256", "k"))
        helper = eng.signing_helper("k")
        assert helper.ready(wait=60)
        print(helper.pid, flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=USER_PIN + "\n",
                          capture_output=True, text=True, timeout=120)
    pid = int(proc.stdout.split()[0])

    def alive() -> bool:  # a zombie waiting for init to reap it has exited
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), f"signing helper {pid} outlived its killed parent"


def test_a_helper_that_cannot_find_its_key_is_not_used(tmp_path: Path) -> None:
    authority = _home(tmp_path)
    try:
        engine = authority.engine()
        helper = engine.signing_helper("no-such-key")  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while helper.broken is None and time.monotonic() < deadline:
            helper.ready(wait=1)
        assert "no-such-key" in helper.broken
        assert engine.signing_helper("no-such-key") is None  # type: ignore[attr-defined]
    finally:
        authority.close()


def test_discarded_answers_do_not_reach_the_next_request(tmp_path: Path) -> None:
    authority = _home(tmp_path)
    try:
        helper = _ready_helper(authority)
        handle = authority.engine().get_key(authority.get_ca("issuing").key_label)
        for i in range(3):
            helper.submit(b"old %d" % i, hashes.SHA256(), padding.PKCS1v15())
        helper.discard()
        helper.submit(b"new", hashes.SHA256(), padding.PKCS1v15())
        handle.public_key().verify(helper.result(), b"new", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg, union-attr]
        with pytest.raises(EngineError):
            helper.result()  # nothing was asked
        with pytest.raises(EngineError, match="does not handle"):
            helper.submit(b"x", hashes.SHA1(), padding.PKCS1v15())
    finally:
        authority.close()


def test_signing_helper_false_keeps_signing_in_process(tmp_path: Path) -> None:
    authority = _home(tmp_path, helper=False)
    try:
        assert "signing_helper = false" in (authority.config.home / "hsm-ca.toml").read_text()
        assert load_config(authority.config.home).pkcs11.signing_helper is False  # type: ignore[union-attr]
        results = authority.sign_csrs("issuing", _csrs(HELPER_MIN_BATCH), "tls-client")
        assert len(_issued(results)) == HELPER_MIN_BATCH
        assert authority.engine().signing_helper("x") is None  # type: ignore[attr-defined]
        assert authority.engine()._helpers == {}  # type: ignore[attr-defined]
    finally:
        authority.close()


@pytest.mark.parametrize(("line", "message"), [
    ("signing_helper = \"no\"", "must be true or false"),
    ("pin = \"1234\"", "unknown field 'pkcs11.pin'"),
    ("token_label = 7", "must be a string"),
])
def test_broken_pkcs11_settings_are_named(tmp_path: Path, line: str, message: str) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "hsm-ca.toml").write_text(
        f'engine = "pkcs11"\n[pkcs11]\nmodule = "/x.so"\n{line}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(home)


def test_helper_hello_failure_is_reported_not_raised() -> None:
    helper = SigningHelper({"module": softhsm_module(), "token_label": "absent-token", "uri": None},
                           "u", "0000", "k")
    try:
        assert not helper.ready(wait=60)
        assert helper.broken and "absent-token" in helper.broken
        with pytest.raises(HelperGone):
            helper.submit(b"x", hashes.SHA256(), padding.PKCS1v15())
    finally:
        helper.close()


def test_a_pkcs11_session_is_never_forked(tmp_path: Path) -> None:
    """After C_Initialize a PKCS#11 library must not be used in a forked child."""
    authority = _home(tmp_path)
    try:
        with pytest.raises(EngineError, match="built-in engine"):
            authority.fork()
    finally:
        authority.close()


def test_a_missing_ca_key_refuses_every_request_of_a_large_batch(tmp_path: Path) -> None:
    """The key is looked up after the first part is checked: that part and every part not
    yet checked get a refused record, all in one commit, and nothing is reserved."""
    from hsm_ca.errors import KeyNotFound

    authority = _home(tmp_path)
    try:
        authority.engine().destroy_key(authority.get_ca("issuing").key_label)
        before = len(list(authority.audit.records()))
        with pytest.raises(KeyNotFound):
            authority.sign_csrs("issuing", _csrs(HELPER_MIN_BATCH + 36, bad={0}), "tls-client")
        new = list(authority.audit.records())[before:]
        assert [r["outcome"] for r in new] == ["refused"] * (HELPER_MIN_BATCH + 36)
        assert len({r["detail"].split(":")[0] for r in new}) == HELPER_MIN_BATCH + 36
        assert all(r["csr_sha256"] for r in new)
        assert authority.store.conn.execute("SELECT count(*) FROM serials").fetchone()[0] == 2
        assert authority.audit.verify().ok
    finally:
        authority.close()
