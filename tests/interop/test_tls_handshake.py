"""Python's ssl module (OpenSSL's TLS stack) judges hsm-ca's certificates in real handshakes.

A one-shot TLS server runs on 127.0.0.1 in a thread with a certificate chain
hsm-ca issued; clients trust only the exported root. Every socket has a
timeout and every thread is joined, so nothing is left running.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from interop_support import Pki, build_pki, hsm

pytestmark = pytest.mark.interop

TIMEOUT = 10.0
PAYLOAD = b"hello over TLS"
# hsm-ca refuses the single-label name "localhost" (see test_localhost_certificate); the
# server certificate therefore names a FQDN plus IP:127.0.0.1. Clients connect to 127.0.0.1
# and send SERVER_NAME as SNI / the name to verify; no DNS lookup is involved.
SERVER_NAME = "tls.example.com"


@dataclass
class Credential:
    chain: Path  # leaf followed by the issuing CA (sign --chain)
    key: Path


@dataclass
class Material:
    pki: Pki
    other_root: Path
    server: Credential
    client: Credential


def _issue(
    pki: Pki, name: str, profile: str, subject: x509.Name, sans: list[x509.GeneralName]
) -> Credential:
    """Generate an EC key here, build a CSR, and have hsm-ca sign it with --chain."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr_path = pki.dir / f"{name}.csr"
    csr_path.write_bytes(
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    key_path = pki.dir / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    _, chain = pki.sign(csr_path, profile, out=pki.dir / f"{name}.pem")
    return Credential(chain, key_path)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    pki = build_pki(tmp_path_factory.mktemp("tls-pki"))
    # a second, unrelated root in the same home
    hsm(
        pki.home,
        "ca",
        "create-root",
        "other",
        "--subject",
        "CN=Other Root CA,O=Elsewhere",
        "--key-type",
        "ec-p256",
    )
    other_root = pki.dir / "other-root.pem"
    hsm(pki.home, "ca", "export", "other", "-o", str(other_root))
    server = _issue(
        pki,
        "server",
        "tls-server",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]),
        [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _issue(
        pki,
        "client",
        "tls-client",
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "interop-client"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Interop"),
            ]
        ),
        [],
    )
    return Material(pki, other_root, server, client)


@dataclass
class ServerResult:
    peer: dict[str, Any] | None = None
    received: bytes | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@contextmanager
def tls_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, ServerResult]]:
    """Serve exactly one connection: handshake, read one message, echo it back."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    result = ServerResult()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    result.peer = tls.getpeercert()
                    data = tls.recv(4096)
                    result.received = data
                    tls.sendall(b"echo:" + data)
        except (OSError, ssl.SSLError) as e:  # SSLError is an OSError; both kept for clarity
            result.error = e
        finally:
            result.done.set()

    thread = threading.Thread(target=serve, name="interop-tls-server", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], result
    finally:
        thread.join(TIMEOUT + 5)
        listener.close()
        assert not thread.is_alive(), "TLS server thread did not finish"


def server_context(
    cred: Credential, require_client_cert_from: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cred.chain, cred.key)
    if require_client_cert_from is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=require_client_cert_from)
    return ctx


def client_roundtrip(
    port: int, ctx: ssl.SSLContext, server_hostname: str
) -> tuple[bytes, dict[str, Any], str]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        peer = tls.getpeercert()
        version = tls.version() or ""
        tls.sendall(PAYLOAD)
        reply = b""
        while len(reply) < len(b"echo:" + PAYLOAD):
            chunk = tls.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply, peer, version


def test_handshake_with_dns_name(material: Material) -> None:
    client = ssl.create_default_context(cafile=material.pki.root)
    with tls_server(server_context(material.server)) as (port, result):
        reply, peer, version = client_roundtrip(port, client, SERVER_NAME)
    assert result.error is None, result.error
    assert reply == b"echo:" + PAYLOAD
    assert result.received == PAYLOAD
    assert version in ("TLSv1.2", "TLSv1.3")
    assert ("DNS", SERVER_NAME) in peer["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]


def test_handshake_with_ip_address_san(material: Material) -> None:
    client = ssl.create_default_context(cafile=material.pki.root)
    with tls_server(server_context(material.server)) as (port, result):
        reply, _, _ = client_roundtrip(port, client, "127.0.0.1")
    assert result.error is None, result.error
    assert reply == b"echo:" + PAYLOAD


def test_client_trusting_another_root_refuses(material: Material) -> None:
    client = ssl.create_default_context(cafile=material.other_root)
    with tls_server(server_context(material.server)) as (port, result):
        with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
            client_roundtrip(port, client, SERVER_NAME)
        result.done.wait(TIMEOUT)
    # 20 = X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert excinfo.value.verify_code == 20, excinfo.value
    assert result.received is None
    assert isinstance(result.error, OSError)


def test_hostname_not_in_sans_refused(material: Material) -> None:
    client = ssl.create_default_context(cafile=material.pki.root)
    with tls_server(server_context(material.server)) as (port, result):
        with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
            client_roundtrip(port, client, "www.example.com")
        result.done.wait(TIMEOUT)
    assert result.received is None


def test_tls_client_certificate_is_not_accepted_as_server_certificate(material: Material) -> None:
    """The EKU matters: a clientAuth-only certificate must not serve TLS."""
    client = ssl.create_default_context(cafile=material.pki.root)
    client.check_hostname = False  # isolate the purpose check from name matching
    with tls_server(server_context(material.client)) as (port, result):
        with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
            client_roundtrip(port, client, SERVER_NAME)
        result.done.wait(TIMEOUT)
    # 26 = X509_V_ERR_INVALID_PURPOSE
    assert excinfo.value.verify_code == 26, excinfo.value
    assert result.received is None


def test_mutual_tls(material: Material) -> None:
    client = ssl.create_default_context(cafile=material.pki.root)
    client.load_cert_chain(material.client.chain, material.client.key)
    server = server_context(material.server, require_client_cert_from=material.pki.root)
    with tls_server(server) as (port, result):
        reply, _, _ = client_roundtrip(port, client, SERVER_NAME)
    assert result.error is None, result.error
    assert reply == b"echo:" + PAYLOAD
    assert result.peer is not None
    subject = dict(rdn[0] for rdn in result.peer["subject"])
    assert subject == {"commonName": "interop-client", "organizationName": "Interop"}


def test_mutual_tls_refuses_client_without_certificate(material: Material) -> None:
    client = ssl.create_default_context(cafile=material.pki.root)
    server = server_context(material.server, require_client_cert_from=material.pki.root)
    with tls_server(server) as (port, result):
        try:
            reply, _, _ = client_roundtrip(port, client, SERVER_NAME)
        except (ssl.SSLError, OSError):  # TLS 1.3: the refusal may only show on read
            reply = b""
        result.done.wait(TIMEOUT)
    assert reply == b""
    assert result.received is None
    assert isinstance(result.error, ssl.SSLError), result.error


def test_mutual_tls_refuses_server_certificate_as_client_certificate(material: Material) -> None:
    """The tls-server leaf (serverAuth only) must not authenticate a TLS client."""
    client = ssl.create_default_context(cafile=material.pki.root)
    client.load_cert_chain(material.server.chain, material.server.key)
    server = server_context(material.server, require_client_cert_from=material.pki.root)
    with tls_server(server) as (port, result):
        try:
            reply, _, _ = client_roundtrip(port, client, SERVER_NAME)
        except (ssl.SSLError, OSError):
            reply = b""
        result.done.wait(TIMEOUT)
    assert reply == b""
    assert isinstance(result.error, ssl.SSLCertVerificationError), result.error
    assert result.error.verify_code == 26, result.error


def test_localhost_is_refused_for_tls_server(material: Material) -> None:
    """tls-server follows the BRs, which forbid internal names: localhost is refused clearly."""
    with pytest.raises(AssertionError, match="single label"):
        _issue(
            material.pki,
            "localhost",
            "tls-server",
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
