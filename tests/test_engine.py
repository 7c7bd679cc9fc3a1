"""Engine conformance: what every HSM engine must do, whatever is behind it."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ENGINES, new_softhsm_token, softhsm_module
from conftest import USER_PIN as CONFTEST_PIN
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from hsm_ca.engine import KeySpec, Role, as_private_key
from hsm_ca.engine.soft import SoftEngine
from hsm_ca.errors import (
    AlreadyExists,
    EngineError,
    KeyNotFound,
    LockedOut,
    LoginFailed,
    PermissionDenied,
    Tampered,
)

USER, OFFICER = "cu", "co"
UPIN, SOPIN = "user-pin-1", "officer-pin-1"


@pytest.fixture
def soft_engine(tmp_path: Path) -> SoftEngine:
    eng = SoftEngine.create(
        tmp_path / "hsm", officer=OFFICER, officer_pin=SOPIN, user=USER, user_pin=UPIN,
        scrypt_n=1024,
    )
    eng.login(USER, UPIN)
    return eng


@pytest.fixture(params=ENGINES)
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    """A factory of logged-in engines over one fresh partition or token (the conformance suite)."""
    if request.param == "soft":
        SoftEngine.create(tmp_path / "hsm", officer=OFFICER, officer_pin=SOPIN, user=USER,
                          user_pin=UPIN, scrypt_n=1024)

        def make() -> Any:
            eng = SoftEngine(tmp_path / "hsm")
            eng.login(USER, UPIN)
            return eng
    else:
        from hsm_ca.config import Pkcs11Settings
        from hsm_ca.engine.pkcs11 import Pkcs11Engine

        settings = Pkcs11Settings(module=softhsm_module(), token_label=new_softhsm_token())

        def make() -> Any:
            eng = Pkcs11Engine(settings)
            eng.login(USER, CONFTEST_PIN)
            return eng

    return make


@pytest.fixture
def engine(reopen: Callable[[], Any]) -> Any:
    return reopen()


FAST_TYPES = ["ec-p256", "ec-p384", "ec-p521", "rsa-2048", "ed25519"]


@pytest.mark.parametrize("key_type", FAST_TYPES)
def test_generated_key_signs_a_certificate_that_verifies(engine: Any, key_type: str) -> None:
    handle = engine.generate_key(KeySpec(key_type=key_type, label=f"k-{key_type}"))
    assert handle.extractable is False
    key = as_private_key(handle)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    alg = None if key_type == "ed25519" else hashes.SHA256()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(handle.public_key()).serial_number(1 << 70)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, alg)  # type: ignore[arg-type]
    )
    cert.verify_directly_issued_by(cert)


def test_all_key_types_are_supported(engine: Any) -> None:
    # rsa-3072 and rsa-4096 are slow to generate; one signature each proves them.
    for key_type, size in (("rsa-3072", 3072), ("rsa-4096", 4096)):
        h = engine.generate_key(KeySpec(key_type=key_type, label=key_type))
        sig = h.sign(b"data", hashes.SHA256(), padding.PKCS1v15())
        pub = h.public_key()
        assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == size
        pub.verify(sig, b"data", padding.PKCS1v15(), hashes.SHA256())


def test_ecdsa_signature_is_der_and_pss_works(engine: Any) -> None:
    h = engine.generate_key(KeySpec(key_type="ec-p256", label="ec"))
    sig = h.sign(b"msg", hashes.SHA256())
    assert sig[0] == 0x30  # DER SEQUENCE, not raw r||s
    pub = h.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"msg", ec.ECDSA(hashes.SHA256()))
    r = engine.generate_key(KeySpec(key_type="rsa-2048", label="rsa"))
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    sig = r.sign(b"msg", hashes.SHA256(), pss)
    r.public_key().verify(sig, b"msg", pss, hashes.SHA256())  # type: ignore[union-attr]


def test_private_key_never_leaves(engine: Any) -> None:
    for kt in ("ec-p256", "rsa-2048", "ed25519"):
        key = as_private_key(engine.generate_key(KeySpec(key_type=kt, label=f"x{kt}")))
        with pytest.raises(EngineError):
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            with pytest.raises(EngineError):
                key.private_numbers()  # type: ignore[union-attr]
        import pickle

        with pytest.raises(EngineError):
            pickle.dumps(key)
    with pytest.raises(PermissionDenied):
        engine.generate_key(KeySpec(key_type="ec-p256", label="exp", extractable=True))


def test_keys_found_again_after_reopen(engine: Any, reopen: Callable[[], Any]) -> None:
    h = engine.generate_key(KeySpec(key_type="ec-p256", label="persist"))
    engine.close()
    again = reopen()
    h2 = again.get_key("persist")
    assert h2.public_key() == h.public_key()
    sig = h2.sign(b"x", hashes.SHA256())
    h.public_key().verify(sig, b"x", ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr]
    assert [k.label for k in again.list_keys()] == ["persist"]
    with pytest.raises(KeyNotFound):
        again.get_key("nope")
    with pytest.raises(AlreadyExists):
        again.generate_key(KeySpec(key_type="ec-p256", label="persist"))
    again.destroy_key("persist")
    with pytest.raises(KeyNotFound):
        again.get_key("persist")


def test_no_plaintext_key_material_on_disk(soft_engine: SoftEngine) -> None:
    eng_key = soft_engine.generate_key(KeySpec(key_type="ec-p256", label="secret"))
    priv = soft_engine._private_key("secret")  # the soft_engine's own in-memory copy
    raw = priv.private_numbers().private_value.to_bytes(32, "big")
    der = priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    import base64

    for f in soft_engine.path.iterdir():
        data = f.read_bytes()
        assert raw not in data and der not in data and base64.b64encode(der) not in data
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert eng_key.public_key() == priv.public_key()


def test_roles_enforced_inside_engine(soft_engine: SoftEngine) -> None:
    officer = SoftEngine(soft_engine.path)
    officer.login(OFFICER, SOPIN)
    with pytest.raises(PermissionDenied):
        officer.generate_key(KeySpec(key_type="ec-p256", label="no"))
    soft_engine.generate_key(KeySpec(key_type="ec-p256", label="yes"))
    with pytest.raises(PermissionDenied):
        officer.get_key("yes")
    with pytest.raises(PermissionDenied):
        soft_engine.add_user("x", Role.USER, "pin-pin")
    officer.add_user("auditor1", Role.AUDITOR, "audit-pin")
    aud = SoftEngine(soft_engine.path)
    aud.login("auditor1", "audit-pin")
    with pytest.raises(PermissionDenied):
        aud.get_key("yes")
    not_logged = SoftEngine(soft_engine.path)
    with pytest.raises(PermissionDenied):
        not_logged.get_key("yes")


def test_lockout_persists_and_officer_unlocks(soft_engine: SoftEngine) -> None:
    path = soft_engine.path
    for i in range(4):
        with pytest.raises(LoginFailed) as e:
            SoftEngine(path).login(USER, f"wrong-{i}")
        assert "attempts left" in str(e.value)
    with pytest.raises(LockedOut):
        SoftEngine(path).login(USER, "wrong-5")
    # the right PIN is refused too, also by a fresh soft_engine object (a restart)
    with pytest.raises(LockedOut, match="locked"):
        SoftEngine(path).login(USER, UPIN)
    officer = SoftEngine(path)
    officer.login(OFFICER, SOPIN)
    assert [u.locked for u in officer.list_users() if u.name == USER] == [True]
    officer.unlock_user(USER)
    SoftEngine(path).login(USER, UPIN)


def test_successful_login_resets_failure_count(soft_engine: SoftEngine) -> None:
    for _ in range(4):
        with pytest.raises(LoginFailed):
            SoftEngine(soft_engine.path).login(USER, "bad-pin")
    SoftEngine(soft_engine.path).login(USER, UPIN)
    for _ in range(4):
        with pytest.raises(LoginFailed):
            SoftEngine(soft_engine.path).login(USER, "bad-pin")
    SoftEngine(soft_engine.path).login(USER, UPIN)


def test_editing_the_lock_counter_is_tampering(soft_engine: SoftEngine) -> None:
    with pytest.raises(LoginFailed):
        SoftEngine(soft_engine.path).login(USER, "bad-pin")
    ks = soft_engine.path / "keystore"
    data = ks.read_bytes()
    edited = data.replace(b'"failed_logins":1', b'"failed_logins":0')
    assert edited != data
    ks.write_bytes(edited)
    with pytest.raises(Tampered):
        SoftEngine(soft_engine.path).login(USER, UPIN)


def test_any_flipped_byte_is_tampering(soft_engine: SoftEngine) -> None:
    soft_engine.generate_key(KeySpec(key_type="ec-p256", label="k"))
    ks = soft_engine.path / "keystore"
    original = ks.read_bytes()
    step = max(1, len(original) // 97)
    for pos in range(0, len(original), step):
        flipped = bytearray(original)
        flipped[pos] ^= 0x01
        ks.write_bytes(bytes(flipped))
        with pytest.raises(Tampered):
            eng = SoftEngine(soft_engine.path)
            eng.login(USER, UPIN)
            eng.get_key("k").sign(b"x", hashes.SHA256())
    ks.write_bytes(original)
    pk = soft_engine.path / "partition.key"
    key = pk.read_bytes()
    pk.write_bytes(bytes([key[0] ^ 1]) + key[1:])
    with pytest.raises(Tampered):
        SoftEngine(soft_engine.path).login(USER, UPIN)


def test_change_pin_rewraps_only_the_user(soft_engine: SoftEngine) -> None:
    soft_engine.generate_key(KeySpec(key_type="ec-p256", label="k"))
    before = soft_engine._read()
    soft_engine.change_pin(USER, "new-user-pin")
    after = soft_engine._read()
    assert before["keys"] == after["keys"]
    assert before["users"][USER]["wrapped_mk"] != after["users"][USER]["wrapped_mk"]
    assert before["users"][OFFICER] == after["users"][OFFICER]
    with pytest.raises(LoginFailed):
        SoftEngine(soft_engine.path).login(USER, UPIN)
    e2 = SoftEngine(soft_engine.path)
    e2.login(USER, "new-user-pin")
    e2.get_key("k").sign(b"x", hashes.SHA256())
