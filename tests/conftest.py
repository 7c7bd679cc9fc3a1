"""Shared fixtures: real homes on disk, real SQLite, the real CLI entry point.

Homes are created with a cheap scrypt cost through the explicit ``init``
option meant for tests; nothing weakens an existing home behind its back.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

USER_PIN = "user-pin-1234"
SO_PIN = "officer-pin-5678"
TEST_SCRYPT_N = 1024
ENGINES = ["soft", "pkcs11"]

# SoftHSM2 reads its configuration once per process, when the module is first
# initialised, so the whole run shares one private token directory; each test
# gets tokens of its own in it.
_SOFTHSM_DIR = Path(tempfile.mkdtemp(prefix="hsm-ca-softhsm-"))
atexit.register(shutil.rmtree, _SOFTHSM_DIR, ignore_errors=True)  # tokens die with the run
(_SOFTHSM_DIR / "tokens").mkdir()
(_SOFTHSM_DIR / "softhsm2.conf").write_text(
    f"directories.tokendir = {_SOFTHSM_DIR / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
)
os.environ["SOFTHSM2_CONF"] = str(_SOFTHSM_DIR / "softhsm2.conf")
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str:
    """The SoftHSM2 module; missing is a failure, not a skip (scripts/test.sh installs it)."""
    for path in SOFTHSM_MODULES:
        if Path(path).exists():
            return path
    pytest.fail("SoftHSM2 is not installed (apt-get install softhsm2; scripts/test.sh does it)")


def new_softhsm_token(label: str | None = None) -> str:
    """Initialise a fresh SoftHSM2 token with the test user PIN; returns its label."""
    label = label or f"t{uuid.uuid4().hex[:12]}"
    r = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--pin", USER_PIN, "--so-pin", SO_PIN],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return label


@dataclass
class CliResult:
    code: int
    out: str
    err: str


class Cli:
    """Runs ``hsm-ca`` in-process through the same entry point as the console script."""

    def __init__(self, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.home = home
        self.capsys = capsys
        monkeypatch.setenv("HSM_CA_PIN", USER_PIN)
        monkeypatch.setenv("HSM_CA_SO_PIN", SO_PIN)
        monkeypatch.delenv("HSM_CA_HOME", raising=False)
        monkeypatch.delenv("HSM_CA_USER", raising=False)

    def __call__(self, *args: str) -> CliResult:
        from hsm_ca.cli import cli

        self.capsys.readouterr()
        code = cli.run(["--home", str(self.home), *args])
        captured = self.capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    def ok(self, *args: str) -> CliResult:
        r = self(*args)
        assert r.code == 0, f"hsm-ca {' '.join(args)} failed ({r.code}): {r.err}"
        return r


def run_process(home: Path, *args: str, env: dict[str, str] | None = None,
                input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hsm_ca`` as a real process (for tracebacks, exit codes, argv checks)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
    full_env.update({"HSM_CA_PIN": USER_PIN, "HSM_CA_SO_PIN": SO_PIN})
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hsm_ca", "--home", str(home), *args],
        capture_output=True, text=True, env=full_env, timeout=120,
        stdin=subprocess.DEVNULL if input is None else None,
    )


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path / "home", capsys, monkeypatch)


def init_args(engine: str, *extra: str) -> list[str]:
    """``init`` arguments for a test home on ``engine`` (a new SoftHSM2 token for pkcs11)."""
    if engine == "soft":
        return ["init", "--scrypt-n", str(TEST_SCRYPT_N), *extra]
    return ["init", "--engine", "pkcs11", "--pkcs11-module", softhsm_module(),
            "--token-label", new_softhsm_token(), *extra]


@pytest.fixture(params=ENGINES)
def engine_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def initialised(cli: Cli, engine_kind: str) -> Cli:
    """A fresh home on each engine: the CA suite runs on both."""
    cli.ok(*init_args(engine_kind))
    cli.engine = engine_kind  # type: ignore[attr-defined]
    return cli


@pytest.fixture
def soft_initialised(cli: Cli) -> Cli:
    """A fresh home on the built-in engine, for what only it does (lockout, tamper, files)."""
    cli.ok(*init_args("soft"))
    return cli


def _make_pki(cli: Cli) -> Cli:
    cli.ok("ca", "create-root", "root", "--subject", "CN=Test Root CA,O=Test,C=NL")
    cli.ok(
        "ca", "create-intermediate", "issuing", "--parent", "root",
        "--subject", "CN=Test Issuing CA,O=Test", "--path-length", "0",
    )
    return cli


@pytest.fixture
def pki(initialised: Cli) -> Cli:
    """A home with a root (ec-p384) and an issuing CA (ec-p256, path length 0), on each engine."""
    return _make_pki(initialised)


@pytest.fixture
def soft_pki(soft_initialised: Cli) -> Cli:
    return _make_pki(soft_initialised)


def make_key(kind: str = "ec-p256") -> object:
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def make_csr(
    cn: str | None = "www.example.com",
    dns: list[str] | None = None,
    key: object | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
    pem: bool = True,
) -> bytes:
    key = key or make_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical=critical)
    alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, alg)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


@pytest.fixture
def csr_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "web.csr"
    path.write_bytes(make_csr(dns=["www.example.com", "example.com"]))
    yield path


def issue_tls(cli: Cli, tmp_path: Path, n: int = 2, tag: str = "c") -> list[str]:
    """Sign ``n`` tls-server CSRs (``TAG0.example.com``...) under ``issuing``; their serials."""
    serials = []
    for i in range(n):
        p = tmp_path / f"{tag}{i}.csr"
        p.write_bytes(make_csr(dns=[f"{tag}{i}.example.com"]))
        serials.append(json.loads(cli.ok("--json", "sign", str(p), "--ca", "issuing",
                                          "--profile", "tls-server").out)["serial"])
    return serials
