"""A whole CA on a SoftHSM2 token, judged by openssl and OpenSC's pkcs11-tool."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import USER_PIN, new_softhsm_token, softhsm_module
from interop_support import hsm, openssl

pytestmark = pytest.mark.interop


def test_token_backed_ca_end_to_end(tmp_path: Path) -> None:
    token = new_softhsm_token()
    home = tmp_path / "home"
    hsm(home, "init", "--engine", "pkcs11", "--pkcs11-module", softhsm_module(),
        "--token-label", token, "--base-url", "http://pki.example.com")
    hsm(home, "ca", "create-root", "root", "--subject", "CN=Token Root,O=T,C=NL",
        "--key-type", "ec-p384")
    hsm(home, "ca", "create-intermediate", "issuing", "--parent", "root",
        "--subject", "CN=Token Issuing,O=T,C=NL", "--key-type", "rsa-2048", "--path-length", "0")
    key, csr = tmp_path / "w.key", tmp_path / "w.csr"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-subj", "/CN=www.example.com", "-out", csr)
    leaf = tmp_path / "w.pem"
    info = json.loads(hsm(home, "--json", "sign", str(csr), "--ca", "issuing",
                          "--profile", "tls-server", "--chain", "-o", str(leaf)))
    root = tmp_path / "root.pem"
    hsm(home, "ca", "export", "root", "-o", str(root))
    assert openssl("verify", "-x509_strict", "-CAfile", root, "-untrusted", leaf, leaf).stdout \
        .strip().endswith("OK")
    hsm(home, "revoke", info["serial"], "--reason", "keyCompromise")
    crl_i, crl_r = tmp_path / "i.crl", tmp_path / "r.crl"
    hsm(home, "crl", "issuing", "-o", str(crl_i))
    hsm(home, "crl", "root", "-o", str(crl_r))
    r = openssl("verify", "-crl_check_all", "-CAfile", root, "-untrusted", leaf,
                "-CRLfile", crl_i, "-CRLfile", crl_r, leaf, check=False)
    assert r.returncode != 0 and "certificate revoked" in (r.stdout + r.stderr)
    assert "intact" in hsm(home, "audit", "verify")

    # the token, seen by an independent PKCS#11 client: keys sensitive, never extractable
    base = ["pkcs11-tool", "--module", softhsm_module(), "--token-label", token,
            "--login", "--pin", USER_PIN]
    listing = subprocess.run([*base, "-O", "--type", "privkey"], capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0, listing.stderr
    for label in ("ca-root", "ca-issuing"):
        assert f"label:      {label}" in listing.stdout
    for access in (ln for ln in listing.stdout.splitlines() if "Access:" in ln):
        flags = {f.strip() for f in access.split(":", 1)[1].split(",")}
        assert {"sensitive", "always sensitive", "never extractable"} <= flags
        assert "extractable" not in flags
    # and no way to read them out: the value is sensitive, wrapping is refused
    script = f"""
import pkcs11
from pkcs11 import Attribute, ObjectClass, KeyType
lib = pkcs11.lib({softhsm_module()!r})
with lib.get_token(token_label={token!r}).open(rw=True, user_pin={USER_PIN!r}) as s:
    wrap = s.generate_key(KeyType.AES, 256, store=False, template={{Attribute.WRAP: True}})
    for label, attr in (("ca-root", Attribute.VALUE), ("ca-issuing", Attribute.PRIVATE_EXPONENT)):
        key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        try:
            key[attr]
            print("READ", label)
        except pkcs11.exceptions.AttributeSensitive:
            print("sensitive", label)
        try:
            wrap.wrap_key(key)
            print("WRAPPED", label)
        except (pkcs11.exceptions.KeyUnextractable, pkcs11.exceptions.MechanismInvalid) as e:
            print("unwrappable", label, type(e).__name__)
"""
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "READ" not in out.stdout and "WRAPPED" not in out.stdout
    assert out.stdout.count("sensitive") == 2 and out.stdout.count("unwrappable") == 2
