"""The public Python API (``import hsm_ca``), used only through its curated names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SO_PIN, TEST_SCRYPT_N, USER_PIN, make_csr
from cryptography import x509

import hsm_ca


@pytest.fixture(autouse=True)
def _no_env_home(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HSM_CA_HOME", "HSM_CA_PIN", "HSM_CA_SO_PIN", "HSM_CA_USER"):
        monkeypatch.delenv(name, raising=False)


def _init(home: Path) -> None:
    hsm_ca.init_home(home, user_pin=USER_PIN, officer_pin=SO_PIN, scrypt_n=TEST_SCRYPT_N).close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    _init(path)
    return path


def _hierarchy(ca: hsm_ca.Authority) -> None:
    ca.create_root("root", hsm_ca.parse_dn("CN=API Root,O=Test,C=NL"), key_type="ec-p384")
    ca.create_intermediate(
        "issuing", "root", hsm_ca.parse_dn("CN=API Issuing,O=Test"), path_length=0
    )


def test_script_creates_issues_revokes_and_publishes_a_crl(home: Path) -> None:
    with hsm_ca.open_home(home, pin=USER_PIN) as ca:
        _hierarchy(ca)
        assert {c.name for c in ca.list_cas()} == {"root", "issuing"}
        cert = ca.ca("issuing").issue(make_csr(dns=["www.example.com"]), "tls-server")
        assert isinstance(cert, hsm_ca.IssuedCertificate)
        parsed = x509.load_pem_x509_certificate(cert.pem.encode())
        assert int(cert.serial, 16) == parsed.serial_number
        assert parsed.issuer.rfc4514_string() == "CN=API Issuing,O=Test"
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["www.example.com"]

        ca.revoke(cert.serial, "superseded")
        crl = ca.crl("issuing")
        der = crl.der() if hasattr(crl, "der") else crl
        parsed_crl = x509.load_der_x509_crl(der)
        entry = parsed_crl.get_revoked_certificate_by_serial_number(parsed.serial_number)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason == x509.ReasonFlags.superseded
        issuing = ca.get_ca("issuing").certificate
        assert parsed_crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]

    # the work is on disk: a second script sees it
    with hsm_ca.open_home(home, pin=USER_PIN) as again:
        assert {c.name for c in again.list_cas()} == {"root", "issuing"}


def test_pin_from_the_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_CA_PIN", USER_PIN)
    with hsm_ca.open_home(home) as ca:
        ca.create_root("root", hsm_ca.parse_dn("CN=Env Root"))
        assert [c.name for c in ca.list_cas()] == ["root"]


def test_home_from_the_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_CA_HOME", str(home))
    with hsm_ca.open_home(pin=USER_PIN) as ca:
        assert ca.list_cas() == []


def test_run_bootstrap_plans_without_writing_then_applies(home: Path, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    d.mkdir()
    (d / "web.csr").write_bytes(make_csr(dns=["www.example.com"]))
    toml = d / "pki.toml"
    toml.write_text(
        '[[ca]]\nname = "root"\nsubject = "CN=Boot Root"\n\n'
        '[[ca]]\nname = "issuing"\nparent = "root"\nsubject = "CN=Boot Issuing"\n\n'
        '[[certificate]]\nca = "issuing"\nprofile = "tls-server"\ncsr = "web.csr"\n'
        'out = "out/web.pem"\n'
    )
    db = (home / "ca.db").read_bytes()
    with hsm_ca.open_home(home, pin=USER_PIN) as ca:
        plan = hsm_ca.run_bootstrap(ca, toml, plan_only=True)
        assert [(i.kind, i.name, i.action) for i in plan.items] == [
            ("ca", "root", "create"),
            ("ca", "issuing", "create"),
            ("certificate", str(d / "out" / "web.pem"), "create"),
        ]
        assert plan.count("create") == 3 and plan.drift == []
        assert ca.list_cas() == []
    assert (home / "ca.db").read_bytes() == db
    assert not (d / "out").exists()

    with hsm_ca.open_home(home, pin=USER_PIN) as ca:
        done = hsm_ca.run_bootstrap(ca, toml)
        assert done.count("create") == 3
        assert (d / "out" / "web.pem").is_file()
        again = hsm_ca.run_bootstrap(ca, toml, plan_only=True)
        assert {i.action for i in again.items} == {"exists"}
        assert hsm_ca.run_bootstrap(ca, toml).count("create") == 0


def test_run_bootstrap_refuses_a_broken_file_with_a_typed_error(home: Path, tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('[[ca]]\nname = "root"\nsubject = "CN=R"\nparent = "ghost"\n')
    with hsm_ca.open_home(home, pin=USER_PIN) as ca:
        with pytest.raises(hsm_ca.BootstrapError) as e:
            hsm_ca.run_bootstrap(ca, toml, plan_only=True)
        assert f"{toml}:4:" in str(e.value) and "parent" in str(e.value)
        assert isinstance(e.value, hsm_ca.ConfigError)
        assert ca.list_cas() == []


# ------------------------------------------------------------------ errors
def test_typed_errors(home: Path, tmp_path: Path) -> None:
    with hsm_ca.open_home(home, pin=USER_PIN) as ca:
        _hierarchy(ca)
        with pytest.raises(hsm_ca.NotFound):
            ca.ca("no-such-ca")
        with pytest.raises(hsm_ca.CsrRejected):
            ca.ca("issuing").issue(b"this is not a CSR", "tls-server")
        with pytest.raises(hsm_ca.ProfileNotFound):
            ca.ca("issuing").issue(make_csr(dns=["www.example.com"]), "no-such-profile")
        with pytest.raises(hsm_ca.AlreadyExists):
            ca.create_root("root", hsm_ca.parse_dn("CN=Again"))
        with pytest.raises(hsm_ca.HsmCaError):
            hsm_ca.parse_dn("CN=Root,NOT A DN")

    with pytest.raises(hsm_ca.LoginFailed):  # noqa: SIM117 - the error may come on open or on use
        with hsm_ca.open_home(home, pin="wrong-pin-0000") as ca:
            ca.create_root("other", hsm_ca.parse_dn("CN=Other"))
    with hsm_ca.open_home(home, pin=USER_PIN) as ca:
        assert {c.name for c in ca.list_cas()} == {"root", "issuing"}

    with pytest.raises(hsm_ca.AlreadyExists):
        _init(home)
    with pytest.raises(hsm_ca.HsmCaError):
        hsm_ca.open_home(tmp_path / "nowhere", pin=USER_PIN)


@pytest.mark.parametrize(
    "name",
    [
        "NotFound",
        "CsrRejected",
        "LoginFailed",
        "AlreadyExists",
        "ConfigError",
        "EngineError",
        "LockedOut",
        "Tampered",
        "PolicyViolation",
        "ProfileNotFound",
        "AuditIntegrityError",
        "BootstrapError",
    ],
)
def test_errors_are_hsm_ca_errors(name: str) -> None:
    cls = getattr(hsm_ca, name)
    assert isinstance(cls, type) and issubclass(cls, hsm_ca.HsmCaError)
    assert issubclass(hsm_ca.HsmCaError, Exception)


# ----------------------------------------------------------- the surface
def test_all_names_resolve() -> None:
    assert len(hsm_ca.__all__) == len(set(hsm_ca.__all__))
    for name in ("open_home", "init_home", "run_bootstrap", "parse_dn", "Authority", "HsmCaError"):
        assert name in hsm_ca.__all__
    for name in hsm_ca.__all__:
        assert getattr(hsm_ca, name) is not None, name
    with pytest.raises(AttributeError):
        hsm_ca.no_such_name  # noqa: B018
    assert not any(n.startswith("_") and n != "__version__" for n in hsm_ca.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from hsm_ca import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(hsm_ca.__all__)


def test_import_is_cheap() -> None:
    code = "import sys, hsm_ca\nprint('cryptography' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", "import hsm_ca loaded cryptography"
