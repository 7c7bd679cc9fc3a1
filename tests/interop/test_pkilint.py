"""pkilint judges hsm-ca's certificates against RFC 5280 and the CA/B Forum TLS BRs.

CA certificates and non-TLS-server leaves go through ``lint_pkix_cert``;
tls-server leaves through ``lint_cabf_serverauth_cert -t DV-FINAL-CERTIFICATE``
(whose CA/B rules supersede some PKIX ones, such as the subscriber SKI). Any
finding of severity WARNING, ERROR or FATAL fails the test; INFO and NOTICE
are fine.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_csr, make_key, run_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from interop_support import BASE_URL, Pki, build_pki

pytestmark = pytest.mark.interop

BAD_SEVERITIES = {"WARNING", "ERROR", "FATAL"}


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"pkilint's {name} is not installed")
    return found


def lint(tool: str, cert: Path, *options: str) -> list[tuple[str, str, str]]:
    """Run a pkilint CLI with JSON output; return every (severity, code, node path) found."""
    r = subprocess.run(
        [_tool(tool), "lint", *options, "-s", "INFO", "-f", "JSON", str(cert)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in r.stderr, r.stderr
    try:
        report = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{tool} printed no JSON ({e}): {r.stdout}{r.stderr}") from e
    findings = [
        (d["severity"], d["code"], result["node_path"])
        for result in report["results"]
        for d in result["finding_descriptions"]
    ]
    # the exit code counts the findings at or above the -s threshold
    assert (r.returncode == 0) is (not findings), (r.returncode, findings)
    return findings


def lint_pkix(cert: Path) -> list[tuple[str, str, str]]:
    return lint("lint_pkix_cert", cert)


def lint_dv(cert: Path) -> list[tuple[str, str, str]]:
    return lint("lint_cabf_serverauth_cert", cert, "-t", "DV-FINAL-CERTIFICATE")


def bad(findings: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [f for f in findings if f[0] in BAD_SEVERITIES]


def leaf_only(path: Path) -> Path:
    """pkilint lints the first certificate of a file; keep only the leaf to be explicit."""
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    out = path.with_suffix(".leaf.pem")
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pkilint-pki"), base_url=BASE_URL)


@pytest.fixture(scope="module")
def rsa_ed25519_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(
        tmp_path_factory.mktemp("pkilint-pki-2"),
        root_key="rsa-2048",
        issuing_key="ed25519",
        base_url=BASE_URL,
    )


def issue(pki: Pki, name: str, profile: str, csr: bytes) -> Path:
    path = pki.dir / f"{name}.csr"
    path.write_bytes(csr)
    _, cert = pki.sign(path, profile)
    return leaf_only(cert)


# ------------------------------------------------------------------- the CAs
@pytest.mark.parametrize("which", ["root", "issuing"])
def test_ca_certificates_are_pkix_clean(pki: Pki, which: str) -> None:
    cert = pki.root if which == "root" else pki.issuing
    assert bad(lint_pkix(cert)) == []


@pytest.mark.parametrize("which", ["root", "issuing"])
def test_rsa_and_ed25519_ca_certificates_are_pkix_clean(rsa_ed25519_pki: Pki, which: str) -> None:
    cert = rsa_ed25519_pki.root if which == "root" else rsa_ed25519_pki.issuing
    assert bad(lint_pkix(cert)) == []


# ---------------------------------------------------------- non-TLS-server
def _subject_csr(profile: str, key_type: str) -> bytes:
    key = make_key(key_type) if key_type != "ec-p521" else ec.generate_private_key(ec.SECP521R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = []
    if profile == "tls-client":
        extensions.append(
            (x509.SubjectAlternativeName([x509.RFC822Name("alice@example.com")]), False)
        )
    if profile == "code-signing":
        extensions.append(
            (
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier("https://example.com/")]
                ),
                False,
            )
        )
    return make_csr(cn=f"Example {profile} ({key_type})", key=key, extensions=extensions)


PKIX_LEAVES = [
    ("code-signing", "ec-p256"),
    ("code-signing", "rsa-2048"),
    ("tls-client", "ec-p256"),
    ("tls-client", "ed25519"),
    ("ocsp-signing", "ec-p256"),
    ("timestamping", "ec-p256"),
    ("timestamping", "ec-p384"),
]


@pytest.mark.parametrize(
    ("profile", "key_type"), PKIX_LEAVES, ids=["/".join(c) for c in PKIX_LEAVES]
)
def test_leaf_is_pkix_clean(pki: Pki, profile: str, key_type: str) -> None:
    cert = issue(pki, f"{profile}-{key_type}", profile, _subject_csr(profile, key_type))
    assert bad(lint_pkix(cert)) == []


# ---------------------------------------------------------------- tls-server
@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_tls_server_leaf_is_cabf_dv_clean(pki: Pki, key_type: str) -> None:
    csr = make_csr(
        cn="www.example.com", dns=["www.example.com", "example.com"], key=make_key(key_type)
    )
    cert = issue(pki, f"web-{key_type}", "tls-server", csr)
    assert bad(lint_dv(cert)) == []


def test_tls_server_leaf_without_common_name_is_cabf_dv_clean(pki: Pki) -> None:
    csr = make_csr(cn=None, dns=["api.example.com"], key=make_key("ec-p256"))
    cert = issue(pki, "web-no-cn", "tls-server", csr)
    assert bad(lint_dv(cert)) == []


def test_tls_server_leaf_under_ed25519_issuing_ca_is_refused(rsa_ed25519_pki: Pki) -> None:
    """tls-server promises BR compliance; BR 7.1.3.2 has no Ed25519 signatures, so refuse."""
    pki = rsa_ed25519_pki
    csr = pki.dir / "web-under-ed25519.csr"
    csr.write_bytes(
        make_csr(cn="www.example.com", dns=["www.example.com"], key=make_key("ec-p256"))
    )
    out = pki.dir / "web-under-ed25519.pem"
    r = run_process(
        pki.home, "sign", str(csr), "--ca", "issuing", "--profile", "tls-server", "-o", str(out)
    )
    assert r.returncode == 1 and r.stderr.startswith("Error:"), r.stderr
    assert "ed25519" in r.stderr.lower(), r.stderr
    assert not out.exists()


# --------------------------------------------------------- the harness bites
def test_harness_reports_findings_of_a_bad_certificate(tmp_path: Path) -> None:
    """A CA certificate with non-critical basicConstraints, no key usage and no SKI."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bad CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1 << 70)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "bad.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    codes = {code for _, code, _ in bad(lint_pkix(path))}
    assert "pkix.basic_constraints_extension_not_critical" in codes
    assert "pkix.ca_certificate_no_ku_extension" in codes
    assert {code for _, code, _ in bad(lint_dv(path))}
