"""The early PIN derivation is only a head start: it never changes what login decides."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import USER_PIN, Cli

from hsm_ca import prelogin


def test_early_derivation_is_used_only_for_matching_inputs(soft_pki: Cli, tmp_path: Path) -> None:
    hsm = soft_pki.home / "hsm"
    state = json.loads((hsm / "keystore").read_bytes().split(b"\n", 1)[0])
    import base64

    salt = base64.b64decode(state["users"]["crypto-user"]["salt"])
    kdf = state["kdf"]
    prelogin.start(hsm, "crypto-user", USER_PIN)
    early = prelogin.take(salt, kdf["n"], kdf["r"], kdf["p"], USER_PIN)
    import hashlib

    assert early == hashlib.scrypt(USER_PIN.encode(), salt=salt, n=kdf["n"], r=kdf["r"],
                                   p=kdf["p"], dklen=32, maxmem=256 * 1024 * 1024)
    assert prelogin.take(salt, kdf["n"], kdf["r"], kdf["p"], USER_PIN) is None  # used once
    prelogin.start(hsm, "crypto-user", "wrong-pin")
    assert prelogin.take(salt, kdf["n"], kdf["r"], kdf["p"], USER_PIN) is None  # other PIN


def test_started_from_argv_and_a_wrong_pin_still_fails(soft_pki: Cli, tmp_path: Path) -> None:
    from conftest import make_csr, run_process

    csr = tmp_path / "x.csr"
    csr.write_bytes(make_csr(cn=None, dns=["x.example.com"]))
    prelogin.start_from_argv(["--home", str(soft_pki.home), "sign", str(csr)],
                             {"HSM_CA_PIN": USER_PIN})
    assert prelogin._JOBS  # a derivation was started for the home's crypto user
    prelogin._JOBS.clear()
    for words in (["list"], ["ca", "list"], ["audit", "verify"], ["keys", "list"]):
        prelogin.start_from_argv(["--home", str(soft_pki.home), *words], {"HSM_CA_PIN": USER_PIN})
        assert not prelogin._JOBS, words  # commands that need no key start nothing
    prelogin.start_from_argv(["--home", str(soft_pki.home), "ca", "create-root", "x"],
                             {"HSM_CA_PIN": USER_PIN})
    assert prelogin._JOBS
    prelogin._JOBS.clear()
    r = run_process(soft_pki.home, "sign", str(csr), "--ca", "issuing", "--profile", "tls-server",
                    env={"HSM_CA_PIN": "wrong-pin-1"})
    assert r.returncode == 1 and "wrong PIN" in r.stderr
    r = run_process(soft_pki.home, "sign", str(csr), "--ca", "issuing", "--profile", "tls-server")
    assert r.returncode == 0, r.stderr
