"""Helpers for the revocation interop suite: a real ``hsm-ca serve`` process and its clients.

The server runs as ``python -m hsm_ca --home H serve`` on a free loopback port;
its output goes to a log file (a pipe nobody drains would block it after a few
hundred access-log lines). Every socket has a timeout, so a hung server fails a
test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import USER_PIN
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp

HTTP_TIMEOUT = 10.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
OPENSSL_TIMEOUT = 30
BAD_SEVERITIES = {"WARNING", "ERROR", "FATAL"}


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class CaServer:
    """``hsm-ca serve`` as a subprocess: start, wait for /health, stop with SIGTERM."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        self.home = home
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None, "server already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
        env["HSM_CA_PIN"] = USER_PIN
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hsm_ca",
                "--home",
                str(self.home),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._close_log()
                self.proc = None
                raise AssertionError(f"hsm-ca serve exited {rc} at start:\n{self.log_tail()}")
            try:
                r = self.get("/health", timeout=1.0)
                if r.status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"hsm-ca serve did not answer /health in "
                    f"{START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds). Kill and fail when it outlives STOP_TIMEOUT."""
        assert self.proc is not None, "server not running"
        proc, self.proc = self.proc, None
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            self._close_log()
            raise AssertionError(
                f"hsm-ca serve ignored SIGTERM for {STOP_TIMEOUT:.0f} s "
                f"(killed):\n{self.log_tail()}"
            ) from None
        self._close_log()
        return rc, time.monotonic() - t0

    def stop_gracefully(self) -> None:
        rc, seconds = self.stop()
        assert rc == 0, f"hsm-ca serve exited {rc} on SIGTERM:\n{self.log_tail()}"
        assert seconds < STOP_TIMEOUT

    def restart(self) -> None:
        """Stop (SIGTERM, bounded) and start again. The exit code is judged elsewhere
        (the shutdown test and the fixture finalizer), not here, so one defect there
        does not take every later test down with it."""
        self.stop()
        self.start()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.proc = None
        self._close_log()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------ clients
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> HttpResult:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return HttpResult(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
        finally:
            conn.close()

    def get(self, path: str, timeout: float = HTTP_TIMEOUT) -> HttpResult:
        return self.request("GET", path, timeout=timeout)

    def post_ocsp(
        self,
        ca: str,
        der: bytes,
        content_type: str = "application/ocsp-request",
        timeout: float = HTTP_TIMEOUT,
    ) -> HttpResult:
        return self.request(
            "POST", f"/ocsp/{ca}", der, {"Content-Type": content_type}, timeout=timeout
        )

    def health(self) -> dict[str, Any]:
        r = self.get("/health")
        assert r.status == 200, f"/health answered {r.status}: {r.body!r}"
        doc = json.loads(r.body)
        assert doc.get("status") == "ok", doc
        return doc


# ------------------------------------------------------------------ files
def load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (``sign --chain`` files hold leaf then issuer)."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def write_first_cert(src: Path, dst: Path) -> Path:
    dst.write_bytes(load_cert(src).public_bytes(serialization.Encoding.PEM))
    return dst


# ------------------------------------------------------------------- OCSP
def ocsp_request(
    cert: x509.Certificate | None,
    issuer: x509.Certificate,
    *,
    serial: int | None = None,
    nonce: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A DER OCSPRequest built by cryptography (by certificate, or by issuer + serial)."""
    algorithm = algorithm or hashes.SHA1()
    b = ocsp.OCSPRequestBuilder()
    if cert is not None:
        b = b.add_certificate(cert, issuer, algorithm)
    else:
        assert serial is not None
        name_hash = _digest(algorithm, issuer.subject.public_bytes())
        key_hash = _digest(algorithm, public_key_bits(issuer))
        b = b.add_certificate_by_hash(name_hash, key_hash, serial, algorithm)
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    return hashlib.new(algorithm.name, data).digest()


def public_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents (what issuerKeyHash and a responder's KeyHash hash)."""
    from asn1crypto import x509 as asn1_x509

    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return bytes(parsed["tbs_certificate"]["subject_public_key_info"]["public_key"].contents[1:])


def ocsp_get_path(ca: str, der: bytes, *, quote: bool = True) -> str:
    """RFC 6960 appendix A.1 GET path: base64 of the DER request, URL-encoded."""
    b64 = base64.b64encode(der).decode()
    return f"/ocsp/{ca}/{urllib.parse.quote(b64, safe='') if quote else b64}"


def check_ocsp_signature(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    """Verify a successful response's signature; return the signer (issuer or delegate).

    A delegated signer must be in ``certs``, issued by ``issuer``, carry the
    OCSPSigning EKU, and be the one the ResponderID names.
    """
    if resp.certificates:
        signer = resp.certificates[0]
        signer.verify_directly_issued_by(issuer)
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in eku, "delegate lacks id-kp-OCSPSigning"
    else:
        signer = issuer
    if resp.responder_key_hash is not None:
        assert resp.responder_key_hash == hashlib.sha1(public_key_bits(signer)).digest(), (
            "ResponderID byKey does not name the signing certificate"
        )
    else:
        assert resp.responder_name == signer.subject, "ResponderID byName names another signer"
    key = signer.public_key()
    hash_alg = resp.signature_hash_algorithm
    if isinstance(key, ec.EllipticCurvePublicKey):
        assert hash_alg is not None
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hash_alg))
    elif isinstance(key, rsa.RSAPublicKey):
        assert hash_alg is not None
        key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), hash_alg)
    else:
        key.verify(resp.signature, resp.tbs_response_bytes)  # type: ignore[call-arg, union-attr]
    return signer


def nonce_of(resp: ocsp.OCSPResponse) -> bytes | None:
    for ext in resp.extensions:
        if isinstance(ext.value, x509.OCSPNonce):
            return ext.value.nonce
    return None


# ---------------------------------------------------------------- openssl
def openssl_bin() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("the openssl CLI is not installed")
    return found


def run_openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run openssl; the caller judges the exit code and output."""
    return subprocess.run(
        [openssl_bin(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def ocsp_line(output: str, name: str) -> str:
    """The ``NAME: status`` line openssl ocsp prints for one certificate or serial."""
    m = re.search(rf"^{re.escape(name)}: (\S+)$", output, flags=re.M)
    assert m, f"openssl ocsp printed no status for {name}:\n{output}"
    return m.group(1)


# ---------------------------------------------------------------- pkilint
def pkilint_tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"pkilint's {name} is not installed")
    return found


def pkilint(
    tool: str, document: Path, *options: str
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Run a pkilint tool with ``-s ALL -f JSON``: (validators that ran, bad findings)."""
    r = subprocess.run(
        [pkilint_tool(tool), "lint", *options, "-s", "ALL", "-f", "JSON", str(document)],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert r.stdout.strip(), f"{tool} printed nothing (exit {r.returncode}): {r.stderr}"
    doc = json.loads(r.stdout)
    ran: list[str] = []
    bad: list[tuple[str, str, str]] = []
    for result in doc["results"]:
        ran.append(result["validator"])
        for finding in result["finding_descriptions"]:
            if finding["severity"] in BAD_SEVERITIES:
                bad.append((finding["severity"], finding["code"], result["node_path"]))
    return ran, bad


# ------------------------------------------------------------- pyhanko
def asn1_cert(cert: x509.Certificate) -> Any:
    from asn1crypto import x509 as asn1_x509

    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def pyhanko_validate(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    root: x509.Certificate,
    eku: str = "server_auth",
    **context: Any,
) -> None:
    """Validate LEAF for TLS use (``eku``) with pyhanko-certvalidator; raises what it raises.

    The validation context is closed (its aiohttp session too) after the run.
    """
    from pyhanko_certvalidator import CertificateValidator, ValidationContext

    async def run() -> None:
        async with aclosing(ValidationContext(trust_roots=[asn1_cert(root)], **context)) as vc:
            validator = CertificateValidator(
                asn1_cert(leaf), [asn1_cert(c) for c in intermediates], validation_context=vc
            )
            await asyncio.wait_for(
                validator.async_validate_usage({"digital_signature"}, {eku}),
                timeout=60,
            )

    asyncio.run(run())
