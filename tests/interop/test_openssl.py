"""The openssl CLI judges what hsm-ca issues: chains verify, extensions read right.

CSRs are made by ``openssl req`` (PEM and DER), certificates by the real
``hsm-ca`` process, and every verdict comes from ``openssl verify`` or
``openssl x509 -text``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_support import (
    BASE_URL,
    Pki,
    build_pki,
    extensions,
    key_id,
    openssl,
    openssl_csr,
    pem_blocks,
    requires_openssl,
    x509_text,
)

pytestmark = [pytest.mark.interop, requires_openssl]

SIGNATURE_ALGORITHM = {
    "ec-p256": "ecdsa-with-SHA256",
    "ec-p384": "ecdsa-with-SHA384",
    "ec-p521": "ecdsa-with-SHA512",
    "rsa-2048": "sha256WithRSAEncryption",
    "ed25519": "ED25519",
}


def verify(pki: Pki, cert: Path, *options: str, untrusted: Path | None = None) -> None:
    """``openssl verify -x509_strict -CAfile root -untrusted chain CERT`` must say OK."""
    r = openssl(
        "verify",
        "-x509_strict",
        *options,
        "-CAfile",
        pki.root,
        "-untrusted",
        untrusted or pki.chain,
        cert,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.strip() == f"{cert}: OK", (
        f"openssl verify {' '.join(options)} rejected {cert.name}:\n{r.stdout}{r.stderr}"
    )


def verify_fails(pki: Pki, cert: Path, *options: str) -> str:
    r = openssl("verify", *options, "-CAfile", pki.root, "-untrusted", pki.chain, cert, check=False)
    assert r.returncode != 0, f"openssl verify {' '.join(options)} accepted {cert.name}"
    return r.stdout + r.stderr


def field(cert: Path, name: str) -> str:
    """``openssl x509 -NAME -noout`` (e.g. subject, issuer, serial), value only."""
    out = openssl("x509", "-in", cert, "-noout", f"-{name}", "-nameopt", "RFC2253").stdout
    key, _, value = out.strip().partition("=")
    assert key.strip() == name, out
    return value.strip()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Root ec-p384, issuing ec-p256 with --path-length 0, base URL set."""
    return build_pki(tmp_path_factory.mktemp("openssl-pki"), base_url=BASE_URL)


@pytest.fixture(scope="module", params=["pem", "der"])
def tls_leaf(request: pytest.FixtureRequest, pki: Pki) -> tuple[dict, Path]:
    """A tls-server certificate for an openssl-made CSR (PEM or DER), issued with --chain."""
    _, csr = openssl_csr(
        pki.dir,
        f"web-{request.param}",
        subject="/CN=www.example.com",
        san="DNS:www.example.com,DNS:example.com",
        der=request.param == "der",
    )
    return pki.sign(csr, "tls-server")


# ------------------------------------------------------------------ the CAs
def test_root_is_a_self_signed_ca(pki: Pki) -> None:
    verify(pki, pki.root)
    assert field(pki.root, "subject") == "CN=Interop Root CA,O=Interop,C=NL"
    assert field(pki.root, "issuer") == field(pki.root, "subject")
    ext = extensions(x509_text(pki.root))
    bc = ext["X509v3 Basic Constraints"]
    assert bc.critical and "CA:TRUE" in bc.body
    ku = ext["X509v3 Key Usage"]
    assert ku.critical and "Certificate Sign, CRL Sign" in ku.body
    ski = key_id(ext["X509v3 Subject Key Identifier"])
    if "X509v3 Authority Key Identifier" in ext:
        assert key_id(ext["X509v3 Authority Key Identifier"]) == ski


def test_intermediate_is_a_path_length_0_ca_under_the_root(pki: Pki) -> None:
    verify(pki, pki.issuing)
    assert field(pki.issuing, "issuer") == field(pki.root, "subject")
    assert field(pki.issuing, "subject") == "CN=Interop Issuing CA,O=Interop,C=NL"
    ext = extensions(x509_text(pki.issuing))
    bc = ext["X509v3 Basic Constraints"]
    assert bc.critical and bc.body == "CA:TRUE, pathlen:0"
    ku = ext["X509v3 Key Usage"]
    assert ku.critical and "Certificate Sign, CRL Sign" in ku.body
    assert key_id(ext["X509v3 Subject Key Identifier"])
    root_ski = key_id(extensions(x509_text(pki.root))["X509v3 Subject Key Identifier"])
    assert key_id(ext["X509v3 Authority Key Identifier"]) == root_ski


def test_export_chain_is_issuing_then_root(pki: Pki) -> None:
    blocks = pem_blocks(pki.chain)
    assert blocks == pem_blocks(pki.issuing) + pem_blocks(pki.root)


# ---------------------------------------------------------- tls-server leaf
def test_tls_server_leaf_verifies(pki: Pki, tls_leaf: tuple[dict, Path]) -> None:
    _, leaf = tls_leaf
    verify(pki, leaf)
    verify(pki, leaf, "-purpose", "sslserver")
    # the file written by ``sign --chain`` alone is enough as the untrusted chain
    verify(pki, leaf, "-purpose", "sslserver", untrusted=leaf)


def test_tls_server_leaf_rejected_under_another_root(
    pki: Pki, tls_leaf: tuple[dict, Path], tmp_path: Path
) -> None:
    _, leaf = tls_leaf
    other = tmp_path / "other-root.pem"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        tmp_path / "other.key",
        "-subj",
        "/CN=Interop Root CA/O=Interop/C=NL",
        "-days",
        "1",
        "-out",
        other,
    )
    r = openssl("verify", "-CAfile", other, "-untrusted", pki.issuing, leaf, check=False)
    assert r.returncode != 0, r.stdout


def test_sign_chain_output_is_leaf_then_issuing_without_root(
    pki: Pki, tls_leaf: tuple[dict, Path]
) -> None:
    _, leaf = tls_leaf
    blocks = pem_blocks(leaf)
    assert len(blocks) == 2, f"expected leaf + issuing CA, got {len(blocks)} certificates"
    assert blocks[1] == pem_blocks(pki.issuing)[0]
    assert pem_blocks(pki.root)[0] not in blocks


def test_tls_server_leaf_extensions(tls_leaf: tuple[dict, Path]) -> None:
    _, leaf = tls_leaf
    ext = extensions(x509_text(leaf))
    bc = ext["X509v3 Basic Constraints"]
    assert bc.critical and bc.body == "CA:FALSE"
    ku = ext["X509v3 Key Usage"]
    assert ku.critical and ku.body == "Digital Signature"  # EC key: no key encipherment
    assert ext["X509v3 Extended Key Usage"].body == "TLS Web Server Authentication"
    sans = {s.strip() for s in ext["X509v3 Subject Alternative Name"].body.split(",")}
    assert sans == {"DNS:www.example.com", "DNS:example.com"}
    assert "Policy: 2.23.140.1.2.1" in ext["X509v3 Certificate Policies"].lines


def test_tls_server_leaf_carries_base_url_locations(tls_leaf: tuple[dict, Path]) -> None:
    _, leaf = tls_leaf
    ext = extensions(x509_text(leaf))
    aia = ext["Authority Information Access"].lines
    assert f"OCSP - URI:{BASE_URL}/ocsp/issuing" in aia
    assert f"CA Issuers - URI:{BASE_URL}/ca/issuing.crt" in aia
    assert f"URI:{BASE_URL}/crl/issuing.crl" in ext["X509v3 CRL Distribution Points"].lines


def test_sign_json_serial_matches_openssl(tls_leaf: tuple[dict, Path]) -> None:
    info, leaf = tls_leaf
    printed = field(leaf, "serial")  # upper-case hex, may carry a leading 0
    value = int(printed, 16)
    assert int(info["serial"], 16) == value
    assert info["serial"] == format(value, "x"), "serial not lowercase hex without leading zeros"
    assert value.bit_length() >= 64, f"serial {info['serial']} has fewer than 64 bits"


def test_sign_json_names_match_openssl(pki: Pki, tls_leaf: tuple[dict, Path]) -> None:
    info, leaf = tls_leaf
    assert info["issuer"] == field(leaf, "issuer") == field(pki.issuing, "subject")
    assert info["profile"] == "tls-server" and info["ca"] == "issuing"


# ------------------------------------------------------------ other profiles
PROFILES = {
    # profile: (subject, SAN, EKU text, EKU critical, openssl purposes that must pass)
    "tls-client": (
        "/CN=alice/O=Example",
        "email:alice@example.com",
        "TLS Web Client Authentication",
        False,
        ["sslclient"],
    ),
    "code-signing": (
        "/CN=Example Release Signing/O=Example",
        None,
        "Code Signing",
        False,
        [],
    ),
    "timestamping": ("/CN=Example TSA/O=Example", None, "Time Stamping", True, ["timestampsign"]),
    "ocsp-signing": (
        "/CN=Example OCSP Responder/O=Example",
        None,
        "OCSP Signing",
        False,
        ["ocsphelper"],
    ),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_extended_key_usage(pki: Pki, profile: str) -> None:
    subject, san, eku_text, eku_critical, purposes = PROFILES[profile]
    _, csr = openssl_csr(pki.dir, f"p-{profile}", subject=subject, san=san)
    _, leaf = pki.sign(csr, profile)
    verify(pki, leaf)
    for purpose in purposes:
        verify(pki, leaf, "-purpose", purpose)
    # no profile but tls-server may pass as a TLS server certificate
    assert "unsuitable certificate purpose" in verify_fails(pki, leaf, "-purpose", "sslserver")
    ext = extensions(x509_text(leaf))
    eku = ext["X509v3 Extended Key Usage"]
    assert eku.body == eku_text
    assert eku.critical is eku_critical
    bc = ext["X509v3 Basic Constraints"]
    assert bc.critical and bc.body == "CA:FALSE"
    ku = ext["X509v3 Key Usage"]
    assert ku.critical and ku.body == "Digital Signature"
    assert ("OCSP No Check" in ext) is (profile == "ocsp-signing")


def test_tls_client_leaf_is_not_a_server_certificate(pki: Pki) -> None:
    """And the other way round: a tls-server leaf is no TLS client certificate."""
    _, csr = openssl_csr(pki.dir, "srv-only", san="DNS:srv.example.com")
    _, leaf = pki.sign(csr, "tls-server")
    assert "unsuitable certificate purpose" in verify_fails(pki, leaf, "-purpose", "sslclient")


# ------------------------------------------------------------ key-type matrix
# Each key type appears once as the root's and once as the issuing CA's key.
KEY_PAIRS = [
    ("ec-p256", "ec-p384"),
    ("ec-p384", "ec-p521"),
    ("ec-p521", "rsa-2048"),
    ("rsa-2048", "ed25519"),
    ("ed25519", "ec-p256"),
]
# tls-client accepts every key type; tls-server only EC P-256/P-384 and RSA.
LEAF_KEY = {
    "ec-p256": "ed25519",
    "ec-p384": "rsa-2048",
    "ec-p521": "ec-p521",
    "rsa-2048": "ec-p384",
    "ed25519": "ec-p256",
}


def public_key_line(key_type: str) -> str:
    return {
        "ec-p256": "NIST CURVE: P-256",
        "ec-p384": "NIST CURVE: P-384",
        "ec-p521": "NIST CURVE: P-521",
        "rsa-2048": "Public-Key: (2048 bit)",
        "ed25519": "ED25519 Public-Key:",
    }[key_type]


@pytest.mark.parametrize(
    ("root_key", "issuing_key"), KEY_PAIRS, ids=["/".join(p) for p in KEY_PAIRS]
)
def test_key_types_verify_with_openssl(tmp_path: Path, root_key: str, issuing_key: str) -> None:
    pki = build_pki(tmp_path, root_key=root_key, issuing_key=issuing_key)
    root_text, issuing_text = x509_text(pki.root), x509_text(pki.issuing)
    assert public_key_line(root_key) in root_text
    assert public_key_line(issuing_key) in issuing_text
    assert f"Signature Algorithm: {SIGNATURE_ALGORITHM[root_key]}" in root_text
    assert f"Signature Algorithm: {SIGNATURE_ALGORITHM[root_key]}" in issuing_text
    verify(pki, pki.issuing)

    if issuing_key != "ed25519":  # the BRs allow no Ed25519 signatures (test_pkilint)
        _, web_csr = openssl_csr(tmp_path, "web", san="DNS:www.example.com", der=True)
        _, web = pki.sign(web_csr, "tls-server")
        verify(pki, web, "-purpose", "sslserver")
        assert f"Signature Algorithm: {SIGNATURE_ALGORITHM[issuing_key]}" in x509_text(web)

    leaf_key = LEAF_KEY[root_key]
    _, client_csr = openssl_csr(
        tmp_path, "client", key_type=leaf_key, subject="/CN=client/O=Example"
    )
    _, client = pki.sign(client_csr, "tls-client")
    verify(pki, client, "-purpose", "sslclient")
    client_text = x509_text(client)
    assert public_key_line(leaf_key) in client_text
    assert f"Signature Algorithm: {SIGNATURE_ALGORITHM[issuing_key]}" in client_text
    ku = extensions(client_text)["X509v3 Key Usage"]
    assert ku.critical and ku.body == "Digital Signature"
