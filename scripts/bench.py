#!/usr/bin/env python3
"""hsm-ca benchmarks: every figure measured next to its baseline, in the same run.

    python scripts/bench.py              # full run, human table
    python scripts/bench.py --quick      # short run (under ~3 minutes on 2 cores)
    python scripts/bench.py --smoke      # tiny sizes: proves every figure runs (seconds)
    python scripts/bench.py --json       # ONE JSON array of {name, value, unit, baseline,
                                         #   baseline_value, ratio} on stdout
    python scripts/bench.py --only crl   # one figure (a figure or a result name; repeatable)

``ratio`` > 1 means hsm-ca is better: value / baseline_value for rates (units ending
in ``/s``), baseline_value / value for times and sizes. Each figure runs several rounds,
its baseline interleaved with it, and the median of the rounds is reported.

Everything happens in a fresh temporary directory (removed afterwards unless ``--keep``):
CA homes, a private SoftHSM2 token directory (``SOFTHSM2_CONF`` is set before pkcs11 or
hsm-ca's engine is imported), openssl CA directories. PINs reach hsm-ca through the
library's arguments or ``$HSM_CA_PIN``, and softhsm2-util through a pseudo-terminal:
never through argv. The OCSP figures need ApacheBench (``ab``); when it is missing the
benchmark installs Debian's apache2-utils (as root, or with sudo), saying so, and
otherwise skips those figures with a note.

Figures (result names in brackets; the quick and smoke runs keep the names, smaller sizes,
except that the quick run signs the full 1,000 CSRs of cli_sign_1000):

1. [issue_soft_{ec_p256,rsa2048}_{single,batch}] library issuance on the built-in engine,
   durable store and audit, tls-client leaves from P-256 CSRs; baseline: bare cryptography.
2. [issue_pkcs11_rsa2048(_single)] the same on a SoftHSM2 token; baseline: raw
   python-pkcs11 SHA256_RSA_PKCS signatures with the same token key. Batches of 100 go
   through the engine's signing helper process, which logs in during the first batched
   round (that round is signed mostly in-process; the median is over all rounds).
3. [cli_sign_1000] one `hsm-ca sign --out-dir` of many CSR files (default scrypt cost);
   baseline: a shell loop of `openssl ca`, one process per CSR.
4. [cli_sign_one_vs_openssl, cli_sign_one_vs_import] one `hsm-ca sign` end to end.
5. [crl_100k, crl_1m, crl_1m_peak_rss] authority.crl("issuing") in a fresh process (login
   untimed) over revoked rows inserted with SQL; baseline: bare cryptography's builder.
6. [ocsp_http, ocsp_http_idle_client] `hsm-ca serve` vs `openssl ocsp -port` under ab.
7. [help] `hsm-ca --help` vs `python -c "import click"`.
8. [lint_cost] single issue with a `lint = true` tls-server home override vs without.

Only the standard library and hsm-ca's own dependencies are used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import select
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USER_PIN = "bench-user-pin-1234"
SO_PIN = "bench-officer-pin-5678"
CHEAP_SCRYPT_N = 1024  # library figures; the CLI figures use the default cost, as users get
BATCH_CALL = 100  # certificates per Authority.sign_csrs call in the batched figures
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
BIN_DIR = Path(sys.executable).parent
HSM_CA = BIN_DIR / "hsm-ca"


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    rounds: int  # rounds of each library / CLI figure (median reported)
    single: int  # single issues per round
    batch: int  # certificates per round, BATCH_CALL per sign_csrs call
    pkcs11_batch: int
    raw_sigs: int  # raw PKCS#11 signatures per round
    cli_many: int  # CSR files in one `hsm-ca sign` invocation
    cli_one_rounds: int
    crl_small: int  # revoked entries for crl_100k
    crl_large: int  # revoked entries for crl_1m
    crl_rounds: int
    ocsp_seconds: int  # ab -t
    ocsp_rounds: int
    help_runs: int
    lint: int  # single issues per round, with and without lint


MODES = {
    "full": Sizes(
        rounds=5,
        single=100,
        batch=1000,
        pkcs11_batch=500,
        raw_sigs=500,
        cli_many=1000,
        cli_one_rounds=10,
        crl_small=100_000,
        crl_large=1_000_000,
        crl_rounds=3,
        ocsp_seconds=10,
        ocsp_rounds=3,
        help_runs=20,
        lint=50,
    ),
    "quick": Sizes(
        rounds=3,
        single=40,
        batch=300,
        pkcs11_batch=200,
        raw_sigs=300,
        cli_many=1000,  # the target is stated for 1,000 CSRs: fewer would not test it
        cli_one_rounds=5,
        crl_small=10_000,
        crl_large=100_000,
        crl_rounds=3,
        ocsp_seconds=3,
        ocsp_rounds=3,
        help_runs=10,
        lint=20,
    ),
    "smoke": Sizes(
        rounds=1,
        single=5,
        batch=5,
        pkcs11_batch=5,
        raw_sigs=5,
        cli_many=5,
        cli_one_rounds=1,
        crl_small=100,
        crl_large=300,
        crl_rounds=1,
        ocsp_seconds=1,
        ocsp_rounds=1,
        help_runs=3,
        lint=3,
    ),
}

# Targets (on the ratio) that the project set itself; shown in the human table only.
TARGETS: dict[str, tuple[float, str]] = {
    "issue_soft_ec_p256_batch": (0.5, ">= 0.5x bare cryptography"),
    "issue_pkcs11_rsa2048": (0.8, ">= 0.8x raw token signatures"),
    "cli_sign_1000": (10.0, ">= 10x the openssl ca loop"),
    "crl_1m": (1 / 1.5, "<= 1.5x bare cryptography's time"),
    "crl_1m_peak_rss": (1.0, "< 1 GiB"),
    "ocsp_http": (1.0, ">= openssl ocsp"),
    "ocsp_http_idle_client": (1.0, "never stalled, >= openssl"),
    "help": (1 / 1.5, "<= 1.5x import click"),
    "cli_sign_one_vs_import": (1 / 2.5, "<= 2.5x import cryptography.x509"),
}


# -------------------------------------------------------------------------- results
def _sig(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass
class Result:
    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    note: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.unit.endswith("/s")

    @property
    def ratio(self) -> float | None:
        if self.higher_is_better:
            return self.value / self.baseline_value if self.baseline_value else None
        return self.baseline_value / self.value if self.value else None

    def as_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "name": self.name,
            "value": _sig(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": _sig(self.baseline_value),
            "ratio": None if ratio is None else _sig(ratio),
        }


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


PYCACHE: Path | None = None  # set by main(): a bytecode cache inside the work directory


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no HSM_CA_* leaking in from the caller.

    Bytecode is written (to a cache in the work directory, not the source tree) even
    when the caller set PYTHONDONTWRITEBYTECODE: users' installs have .pyc files, so
    process-start figures must not recompile modules on every run.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HSM_CA_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    if PYCACHE is not None:
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env.update(extra)
    return env


def run_timed(
    cmd: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
    timeout: float = 600,
) -> float:
    """Wall-clock seconds of one process, start to exit; a failure raises with its stderr."""
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        p = subprocess.run(
            [str(c) for c in cmd],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out if log_file else subprocess.PIPE,
            timeout=timeout,
        )
        elapsed = time.perf_counter() - t0
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]
    if p.returncode != 0:
        detail = (
            p.stderr.decode(errors="replace")[-2000:]
            if p.stderr
            else (log_file.read_text(errors="replace")[-2000:] if log_file else "")
        )
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... exited {p.returncode}: {detail}")
    return elapsed


# ----------------------------------------------------------------- X.509 helpers
def make_csrs(n: int, *, prefix: str = "leaf", with_cn: bool = True) -> list[bytes]:
    """``n`` PEM PKCS#10 requests, each for a fresh P-256 key, with a DNS SAN."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = []
    for i in range(n):
        dns = f"{prefix}{i}.bench.example.com"
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)] if with_cn else [])
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(name)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return out


def memory_key(key_type: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(key_type)


def hash_for(key_type: str) -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA384() if key_type == "ec-p384" else hashes.SHA256()


def self_signed_ca(key: Any, cn: str, days: int = 3650) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-ca bench"),
        ]
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


class BareIssuer:
    """The baseline CA: bare ``cryptography`` with an in-memory key of the issuer's type.

    Per certificate it does what any CA must: parse the CSR, check its signature, build
    the certificate with the extensions an hsm-ca certificate of the same profile carries
    (taken from one: every extension copied, the two that depend on the request - the
    SubjectAlternativeName and the SubjectKeyIdentifier - taken from this CSR and its
    key), sign it, and serialise it to PEM.
    """

    def __init__(self, key_type: str, issuer_name: Any, template: Any) -> None:
        self.key = memory_key(key_type)
        self.hash = hash_for(key_type)
        self.issuer_name = issuer_name
        self.extensions = list(template.extensions)
        self.validity = template.not_valid_after_utc - template.not_valid_before_utc

    def issue(self, csrs: Sequence[bytes]) -> list[bytes]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        out = []
        for data in csrs:
            csr = x509.load_pem_x509_csr(data)
            if not csr.is_signature_valid:
                raise ValueError("bad CSR signature")
            public_key = csr.public_key()
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            builder = (
                x509.CertificateBuilder()
                .subject_name(csr.subject)
                .issuer_name(self.issuer_name)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(now + self.validity)
            )
            for ext in self.extensions:
                value = ext.value
                if isinstance(value, x509.SubjectKeyIdentifier):
                    value = x509.SubjectKeyIdentifier.from_public_key(public_key)
                elif isinstance(value, x509.SubjectAlternativeName):
                    value = csr.extensions.get_extension_for_class(
                        x509.SubjectAlternativeName
                    ).value
                builder = builder.add_extension(value, ext.critical)
            cert = builder.sign(self.key, self.hash)
            out.append(cert.public_bytes(serialization.Encoding.PEM))
        return out


# -------------------------------------------------------------------------- homes
def new_home(
    path: Path,
    *,
    key_type: str = "ec-p256",
    root_key_type: str = "ec-p384",
    scrypt_n: int | None = CHEAP_SCRYPT_N,
    **options: Any,
) -> Any:
    """A home with a root and an ``issuing`` intermediate (path length 0)."""
    import hsm_ca

    if scrypt_n is not None:
        options["scrypt_n"] = scrypt_n
    engine = options.get("engine", "soft")
    authority = hsm_ca.init_home(
        path, user_pin=USER_PIN, officer_pin=SO_PIN if engine == "soft" else None, **options
    )
    authority.create_root(
        "root", hsm_ca.parse_dn("CN=Bench Root CA,O=hsm-ca bench"), key_type=root_key_type
    )
    authority.create_intermediate(
        "issuing",
        "root",
        hsm_ca.parse_dn("CN=Bench Issuing CA,O=hsm-ca bench"),
        key_type=key_type,
        path_length=0,
    )
    authority.audit_certificate()  # the audit checkpoint key, made once per home, not mid-round
    return authority


def issued_or_raise(results: Sequence[Any]) -> None:
    from hsm_ca.authority import Refusal

    for r in results:
        if isinstance(r, Refusal):
            raise RuntimeError(f"hsm-ca refused {r.source}: {r.error}")


def softhsm_module() -> str:
    for path in SOFTHSM_MODULES:
        if Path(path).exists():
            return path
    raise RuntimeError("SoftHSM2 is not installed (apt-get install softhsm2)")


def init_softhsm_token(label: str) -> None:
    """``softhsm2-util --init-token`` with the PINs typed into a pseudo-terminal, not argv."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            ["softhsm2-util", "--init-token", "--free", "--label", label],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
        )
    finally:
        os.close(slave)
    answers = [SO_PIN, SO_PIN, USER_PIN, USER_PIN]
    transcript = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                transcript += chunk
                while answers and transcript.count(b"PIN: ") > 4 - len(answers):
                    os.write(master, answers.pop(0).encode() + b"\n")
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    if rc != 0:
        text = transcript.decode(errors="replace")
        for pin in (SO_PIN, USER_PIN):
            text = text.replace(pin, "***")
        raise RuntimeError(f"softhsm2-util --init-token failed ({rc}): {text[-500:]}")


# ------------------------------------------------------------------------- ab
def _as_root(cmd: list[str]) -> list[str] | None:
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo"):
        return ["sudo", *([] if sys.stdin.isatty() else ["-n"]), *cmd]
    return None


def ensure_ab(notes: list[str]) -> str | None:
    """ApacheBench's path; installs apache2-utils when missing (root or sudo), else None."""
    found = shutil.which("ab")
    if found:
        return found
    if not shutil.which("apt-get"):
        notes.append(
            "OCSP figures skipped: ApacheBench (ab) is missing and apt-get is not "
            "available to install apache2-utils; install it by hand"
        )
        return None
    install = _as_root(
        [
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "apache2-utils",
        ]
    )
    update = _as_root(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-q"])
    if install is None or update is None:
        notes.append(
            "OCSP figures skipped: ApacheBench (ab) is missing, and installing "
            "apache2-utils needs root (not root, no sudo): apt-get install apache2-utils"
        )
        return None
    for attempt in ([install], [update, install]):
        ok = True
        for cmd in attempt:
            log(f"ab (apache2-utils) is missing; running: {' '.join(cmd)}")
            r = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
            )
            if r.returncode != 0:
                log(f"  failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
                ok = False
                break
        if ok and shutil.which("ab"):
            log(f"installed apache2-utils: {shutil.which('ab')}")
            return shutil.which("ab")
    notes.append(
        "OCSP figures skipped: could not install apache2-utils (for ab); "
        "see the messages above, or install it by hand"
    )
    return None


@dataclass
class AbRun:
    rate: float
    complete: int = 0
    failed: int = 0
    non_2xx: int = 0
    keep_alive: int = 0
    stalled: bool = False
    text: str = ""

    @property
    def clean(self) -> bool:
        return not self.stalled and self.complete > 0 and self.failed == 0 and self.non_2xx == 0


def run_ab(ab: str, url: str, body: Path, seconds: int) -> AbRun:
    """``ab -k -c 8 -t S -p body -T application/ocsp-request URL``, bounded by a timeout."""
    cmd = [
        ab,
        "-k",
        "-c",
        "8",
        "-t",
        str(seconds),
        "-p",
        str(body),
        "-T",
        "application/ocsp-request",
        url,
    ]
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + max(2, seconds),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return AbRun(0.0, stalled=True, text="ab timed out: the server stalled")

    def number(pattern: str) -> float:
        m = re.search(pattern, p.stdout)
        return float(m.group(1)) if m else 0.0

    run = AbRun(
        rate=number(r"Requests per second:\s+([\d.]+)"),
        complete=int(number(r"Complete requests:\s+(\d+)")),
        failed=int(number(r"Failed requests:\s+(\d+)")),
        non_2xx=int(number(r"Non-2xx responses:\s+(\d+)")),
        keep_alive=int(number(r"Keep-Alive requests:\s+(\d+)")),
        text=(p.stdout + p.stderr)[-3000:],
    )
    if p.returncode != 0 and run.complete == 0:
        run.stalled = True
        run.rate = 0.0
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, timeout: float = 5) -> bytes:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/ocsp-request"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


def check_ocsp_good(der: bytes, serial: int) -> None:
    from cryptography.x509 import ocsp

    resp = ocsp.load_der_ocsp_response(der)
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise RuntimeError(f"OCSP response status {resp.response_status.name}")
    if resp.certificate_status != ocsp.OCSPCertStatus.GOOD or resp.serial_number != serial:
        raise RuntimeError(
            f"OCSP answered {resp.certificate_status.name} for "
            f"{resp.serial_number:x}, expected good for {serial:x}"
        )


def wait_ocsp(
    url: str, body: bytes, serial: int, proc: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the responder exited ({proc.returncode}) before answering")
        try:
            check_ocsp_good(post(url, body, timeout=2), serial)
            return
        except (OSError, ValueError) as e:
            last = e
            time.sleep(0.05)
    raise RuntimeError(f"no OCSP answer from {url} within {timeout}s: {last}")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def time_issuance(
    authority: Any, csrs: list[bytes], single: int, batch: int, round_no: int
) -> tuple[float, float]:
    """Certificates/s issued one per call, then BATCH_CALL per ``sign_csrs`` call."""
    ca = authority.ca("issuing")
    t0 = time.perf_counter()
    for data in csrs[:single]:
        ca.issue(data, "tls-client")
    one = single / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for part in chunks(csrs[:batch], BATCH_CALL):
        issued_or_raise(
            authority.sign_csrs(
                "issuing", [(f"r{round_no}-{i}", d) for i, d in enumerate(part)], "tls-client"
            )
        )
    return one, batch / (time.perf_counter() - t0)


# ----------------------------------------------------------------------- bench
@dataclass
class Bench:
    work: Path
    sizes: Sizes
    mode: str
    notes: list[str] = field(default_factory=list)
    _cli: dict[str, Any] | None = None

    @property
    def rounds(self) -> int:
        return self.sizes.rounds

    # ------------------------------------------------ 1. library issuance, built-in engine
    def issue_soft(self, key_type: str, name: str) -> list[Result]:
        s = self.sizes
        log(f"{name}: home with an {key_type} issuing CA (built-in engine)")
        authority = new_home(self.work / f"soft-{key_type}", key_type=key_type)
        try:
            csrs = make_csrs(max(s.single, s.batch))
            ca = authority.ca("issuing")
            template = ca.issue(csrs[0], "tls-client").certificate  # warms up the login too
            bare = BareIssuer(key_type, authority.get_ca("issuing").subject, template)
            bare.issue(csrs[:1])
            single, batch, base = [], [], []
            for r in range(self.rounds):
                one, many = time_issuance(authority, csrs, s.single, s.batch, r)
                single.append(one)
                batch.append(many)
                t0 = time.perf_counter()
                bare.issue(csrs[: s.batch])
                base.append(s.batch / (time.perf_counter() - t0))
                log(
                    f"  round {r + 1}: single {single[-1]:.0f}/s, batch {batch[-1]:.0f}/s, "
                    f"bare cryptography {base[-1]:.0f}/s"
                )
        finally:
            authority.close()
        baseline = f"bare cryptography, in-memory {key_type} key (load+verify CSR, build, sign)"
        return [
            Result(
                f"{name}_single",
                median(single),
                "certs/s",
                baseline,
                median(base),
                "CertificateAuthority.issue: one CSR per call, 2 durable commits each",
            ),
            Result(
                f"{name}_batch",
                median(batch),
                "certs/s",
                baseline,
                median(base),
                f"Authority.sign_csrs, {BATCH_CALL} CSRs per call",
            ),
        ]

    def fig_issue_soft_ec_p256(self) -> list[Result]:
        return self.issue_soft("ec-p256", "issue_soft_ec_p256")

    def fig_issue_soft_rsa2048(self) -> list[Result]:
        return self.issue_soft("rsa-2048", "issue_soft_rsa2048")

    # ------------------------------------------------ 2. library issuance on SoftHSM2
    def fig_issue_pkcs11_rsa2048(self) -> list[Result]:
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass

        from hsm_ca.config import Pkcs11Settings

        s = self.sizes
        module = softhsm_module()
        label = "hsm-ca-bench"
        log(f"issue_pkcs11_rsa2048: SoftHSM2 token {label!r} in {os.environ['SOFTHSM2_CONF']}")
        init_softhsm_token(label)
        authority = new_home(
            self.work / "pkcs11-home",
            key_type="rsa-2048",
            engine="pkcs11",
            pkcs11=Pkcs11Settings(module=module, token_label=label),
            scrypt_n=None,
        )
        session = None
        try:
            csrs = make_csrs(max(s.single, s.pkcs11_batch), prefix="p11-")
            ca = authority.ca("issuing")
            template = ca.issue(csrs[0], "tls-client").certificate
            token = pkcs11.lib(module).get_token(token_label=label)
            try:
                session = token.open(user_pin=USER_PIN)
            except pkcs11.exceptions.UserAlreadyLoggedIn:  # login is per process and token
                session = token.open()
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="ca-issuing")
            tbs = template.tbs_certificate_bytes
            key.sign(tbs, mechanism=Mechanism.SHA256_RSA_PKCS)
            single, batch, raw = [], [], []
            for r in range(self.rounds):
                one, many = time_issuance(authority, csrs, s.single, s.pkcs11_batch, r)
                single.append(one)
                batch.append(many)
                t0 = time.perf_counter()
                for _ in range(s.raw_sigs):
                    key.sign(tbs, mechanism=Mechanism.SHA256_RSA_PKCS)
                raw.append(s.raw_sigs / (time.perf_counter() - t0))
                log(
                    f"  round {r + 1}: batch {batch[-1]:.0f}/s, single {single[-1]:.0f}/s, "
                    f"raw token signatures {raw[-1]:.0f}/s"
                )
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.close()
            authority.close()
        baseline = "raw python-pkcs11 SHA256_RSA_PKCS signatures/s, same token key"
        return [
            Result(
                "issue_pkcs11_rsa2048",
                median(batch),
                "certs/s",
                baseline,
                median(raw),
                f"Authority.sign_csrs, {BATCH_CALL} CSRs per call, SoftHSM2",
            ),
            Result(
                "issue_pkcs11_rsa2048_single",
                median(single),
                "certs/s",
                baseline,
                median(raw),
                "CertificateAuthority.issue, SoftHSM2",
            ),
        ]

    # ------------------------------------------------ 3./4. the command line
    def cli_setup(self) -> dict[str, Any]:
        """A default-scrypt home, CSR files, and an openssl CA with a file key."""
        if self._cli is not None:
            return self._cli
        s = self.sizes
        base = self.work / "cli"
        log("cli: home with the DEFAULT scrypt cost, and an openssl ca with a file key")
        authority = new_home(base / "home", scrypt_n=None)
        authority.close()
        csr_dir = base / "csrs"
        csr_dir.mkdir(parents=True)
        files = []
        for i, data in enumerate(make_csrs(s.cli_many + 1, prefix="cli")):
            path = csr_dir / f"leaf{i:05d}.csr"
            path.write_bytes(data)
            files.append(path)
        key = memory_key("ec-p256")
        template = base / "openssl-template"
        template.mkdir()
        (template / "ca.key").write_bytes(pem_key(key))
        os.chmod(template / "ca.key", 0o600)
        (template / "ca.pem").write_bytes(pem_cert(self_signed_ca(key, "Bench openssl CA")))
        self._cli = {
            "home": base / "home",
            "one": files[-1],
            "many": files[:-1],
            "template": template,
            "env": clean_env(HSM_CA_PIN=USER_PIN),
        }
        # one untimed run fills the bytecode and page caches, as on a machine in use
        run_timed(
            [
                HSM_CA,
                "--home",
                base / "home",
                "sign",
                files[-1],
                "--ca",
                "issuing",
                "--profile",
                "tls-client",
                "-o",
                base / "warm-up.pem",
            ],
            env=self._cli["env"],
        )
        return self._cli

    def openssl_ca(self, where: Path) -> Path:
        """A fresh openssl ca directory (index, serial, new_certs_dir); returns its config."""
        t = self.cli_setup()["template"]
        where.mkdir(parents=True)
        for f in ("ca.key", "ca.pem"):
            shutil.copy2(t / f, where / f)
        (where / "index.txt").write_text("")
        (where / "index.txt.attr").write_text("unique_subject = no\n")
        (where / "serial").write_text("1000\n")
        (where / "newcerts").mkdir()
        conf = where / "openssl.cnf"
        conf.write_text(f"""\
[ ca ]
default_ca = bench

[ bench ]
dir = {where}
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir/newcerts
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_days = 365
policy = policy_anything
unique_subject = no
email_in_dn = no
copy_extensions = copy
x509_extensions = leaf

[ policy_anything ]
countryName = optional
stateOrProvinceName = optional
localityName = optional
organizationName = optional
organizationalUnitName = optional
commonName = supplied
emailAddress = optional

[ leaf ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
""")
        return conf

    def fig_cli_sign_1000(self) -> list[Result]:
        c = self.cli_setup()
        files = c["many"]
        n = len(files)
        loop = (
            'conf=$1; out=$2; shift 2; for f in "$@"; do n=${f##*/}; '
            'openssl ca -batch -config "$conf" -in "$f" -out "$out/${n%.csr}.pem" -notext '
            "|| exit 1; done"
        )
        ours, base = [], []
        for r in range(self.rounds):
            out = self.work / "cli" / f"many-out-{r}"
            ours.append(
                n
                / run_timed(
                    [
                        HSM_CA,
                        "--home",
                        c["home"],
                        "sign",
                        *files,
                        "--ca",
                        "issuing",
                        "--profile",
                        "tls-client",
                        "--out-dir",
                        out,
                    ],
                    env=c["env"],
                )
            )
            if len(list(out.glob("*.pem"))) != n:
                raise RuntimeError(f"hsm-ca sign wrote {len(list(out.glob('*.pem')))} of {n}")
            conf = self.openssl_ca(self.work / "cli" / f"openssl-many-{r}")
            oout = self.work / "cli" / f"openssl-many-out-{r}"
            oout.mkdir()
            base.append(
                n
                / run_timed(
                    ["bash", "-c", loop, "bench-loop", conf, oout, *files],
                    log_file=conf.parent / "loop.log",
                )
            )
            if len(list(oout.glob("*.pem"))) != n:
                raise RuntimeError("the openssl ca loop did not write every certificate")
            log(
                f"  round {r + 1}: hsm-ca sign x{n} {ours[-1]:.0f}/s, "
                f"openssl ca loop {base[-1]:.0f}/s"
            )
        return [
            Result(
                "cli_sign_1000",
                median(ours),
                "certs/s",
                f"shell loop of openssl ca -batch -notext, one process per CSR ({n} CSRs)",
                median(base),
                f"{n} CSR files in one `hsm-ca sign --out-dir`, default scrypt cost",
            )
        ]

    def fig_cli_sign_one(self) -> list[Result]:
        c = self.cli_setup()
        conf = self.openssl_ca(self.work / "cli" / "openssl-one")
        out = self.work / "cli" / "one-out"
        out.mkdir()
        ours, ossl, imp = [], [], []
        rounds = self.sizes.cli_one_rounds
        for r in range(rounds + 1):  # round 0 warms the page cache and is dropped
            t_ours = run_timed(
                [
                    HSM_CA,
                    "--home",
                    c["home"],
                    "sign",
                    c["one"],
                    "--ca",
                    "issuing",
                    "--profile",
                    "tls-client",
                    "-o",
                    out / f"ours-{r}.pem",
                ],
                env=c["env"],
            )
            t_ossl = run_timed(
                [
                    "openssl",
                    "ca",
                    "-batch",
                    "-config",
                    conf,
                    "-in",
                    c["one"],
                    "-out",
                    out / f"openssl-{r}.pem",
                    "-notext",
                ],
                log_file=conf.parent / "one.log",
            )
            t_imp = run_timed([sys.executable, "-c", "import cryptography.x509"], env=clean_env())
            if r:
                ours.append(t_ours)
                ossl.append(t_ossl)
                imp.append(t_imp)
        log(
            f"  hsm-ca sign {median(ours) * 1000:.0f} ms, openssl ca {median(ossl) * 1000:.0f} ms,"
            f" import cryptography.x509 {median(imp) * 1000:.0f} ms"
        )
        note = "one `hsm-ca sign` end to end: start, unlock (default scrypt), sign, write"
        return [
            Result(
                "cli_sign_one_vs_openssl",
                median(ours),
                "s",
                "one openssl ca -batch process",
                median(ossl),
                note,
            ),
            Result(
                "cli_sign_one_vs_import",
                median(ours),
                "s",
                'python -c "import cryptography.x509"',
                median(imp),
                note,
            ),
        ]

    # ------------------------------------------------ 5. CRLs
    def crl_home(self, n: int) -> Path:
        home = self.work / f"crl-{n}"
        new_home(home).close()
        t0 = time.perf_counter()
        populate_revoked(home / "ca.db", "issuing", n)
        seal_revoked(home, "issuing")
        log(f"  {n:,} revoked certificates inserted with SQL in {time.perf_counter() - t0:.1f}s")
        return home

    def worker(self, kind: str, home: Path) -> dict[str, Any]:
        p = subprocess.run(
            [sys.executable, __file__, "--worker", kind, str(home)],
            env=clean_env(HSM_CA_PIN=USER_PIN),
            capture_output=True,
            text=True,
            timeout=1800,
            stdin=subprocess.DEVNULL,
        )
        if p.returncode != 0:
            raise RuntimeError(f"worker {kind} failed ({p.returncode}): {p.stderr[-2000:]}")
        return dict(json.loads(p.stdout.strip().splitlines()[-1]))

    def fig_crl(self) -> list[Result]:
        s = self.sizes
        results = []
        for n, name in ((s.crl_small, "crl_100k"), (s.crl_large, "crl_1m")):
            log(f"{name}: {n:,} revoked entries")
            home = self.crl_home(n)
            ours, bare, rss, bare_rss = [], [], [], []
            for r in range(s.crl_rounds):
                a = self.worker("crl-hsm", home)
                b = self.worker("crl-bare", home)
                if a["entries"] != n or b["entries"] != n:
                    raise RuntimeError(f"CRL entries {a['entries']} / {b['entries']}, expected {n}")
                ours.append(a["seconds"])
                rss.append(a["maxrss_mib"])
                bare.append(b["seconds"])
                bare_rss.append(b["maxrss_mib"])
                log(
                    f"  round {r + 1}: authority.crl {a['seconds']:.2f}s ({a['maxrss_mib']:.0f} "
                    f"MiB peak), bare cryptography {b['seconds']:.2f}s ({b['maxrss_mib']:.0f} MiB)"
                )
            results.append(
                Result(
                    name,
                    median(ours),
                    "s",
                    f"bare cryptography CertificateRevocationListBuilder, {n:,} entries, "
                    "in-memory ec-p256 key",
                    median(bare),
                    f"authority.crl('issuing') in a fresh process (login untimed), {n:,} entries",
                )
            )
            if name == "crl_1m":
                results.append(
                    Result(
                        "crl_1m_peak_rss",
                        median(rss),
                        "MiB",
                        "1 GiB budget",
                        1024.0,
                        f"peak RSS (getrusage) of the process that signed the {n:,}-entry CRL; "
                        f"bare cryptography's process: {median(bare_rss):.0f} MiB",
                    )
                )
            shutil.rmtree(home, ignore_errors=True)
        return results

    # ------------------------------------------------ 6. OCSP over HTTP
    def fig_ocsp_http(self) -> list[Result]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509 import ocsp

        s = self.sizes
        ab = ensure_ab(self.notes)
        if ab is None:
            log(self.notes[-1])
            return []
        base = self.work / "ocsp"
        base.mkdir()
        log(
            "ocsp_http: rsa-2048 issuing CAs (constant-length responses, so ab's length "
            "check is exact)"
        )
        authority = new_home(base / "home", key_type="rsa-2048")
        csr = make_csrs(1, prefix="ocsp")[0]
        leaf = authority.ca("issuing").issue(csr, "tls-client").certificate
        issuer = authority.get_ca("issuing").certificate
        authority.close()
        req = base / "req.der"
        req.write_bytes(
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, issuer, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        # the openssl responder: a file-key CA that issued a leaf for the same CSR
        okey = memory_key("rsa-2048")
        ocert = self_signed_ca(okey, "Bench openssl OCSP CA")
        (base / "ca.key").write_bytes(pem_key(okey))
        (base / "ca.pem").write_bytes(pem_cert(ocert))
        request = x509.load_pem_x509_csr(csr)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        oleaf = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(ocert.subject)
            .public_key(request.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(okey, hashes.SHA256())
        )
        (base / "index.txt").write_text(
            f"V\t{oleaf.not_valid_after_utc:%y%m%d%H%M%S}Z\t\t{oleaf.serial_number:X}\tunknown\t"
            f"/CN={oleaf.subject.rfc4514_string()[3:]}\n"
        )
        oreq = base / "req-openssl.der"
        oreq.write_bytes(
            ocsp.OCSPRequestBuilder()
            .add_certificate(oleaf, ocert, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )

        def start_openssl() -> tuple[subprocess.Popen[bytes], str]:
            port = free_port()
            with open(base / "openssl-ocsp.log", "ab") as fh:
                proc = subprocess.Popen(
                    [
                        "openssl",
                        "ocsp",
                        "-index",
                        base / "index.txt",
                        "-port",
                        str(port),
                        "-rsigner",
                        base / "ca.pem",
                        "-rkey",
                        base / "ca.key",
                        "-CA",
                        base / "ca.pem",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=fh,
                    cwd=base,
                )
            url = f"http://127.0.0.1:{port}/ocsp/issuing"
            try:
                wait_ocsp(url, oreq.read_bytes(), oleaf.serial_number, proc)
            except BaseException:
                stop(proc)
                raise
            return proc, url

        port = free_port()
        url = f"http://127.0.0.1:{port}/ocsp/issuing"
        server_log = open(base / "serve.log", "ab")  # noqa: SIM115
        server = subprocess.Popen(
            [
                str(HSM_CA),
                "--home",
                str(base / "home"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=clean_env(HSM_CA_PIN=USER_PIN),
            stdin=subprocess.DEVNULL,
            stdout=server_log,
            stderr=server_log,
        )
        ours: dict[bool, list[float]] = {False: [], True: []}
        theirs: dict[bool, list[float]] = {False: [], True: []}
        problems: list[str] = []
        try:
            wait_ocsp(url, req.read_bytes(), leaf.serial_number, server)
            for r in range(s.ocsp_rounds):
                for idle in (False, True):
                    for who in ("hsm-ca", "openssl"):
                        proc = None
                        if who == "openssl":
                            proc, target = start_openssl()
                            body = oreq
                        else:
                            target, body = url, req
                        idler = None
                        try:
                            if idle:  # one client that connects and sends nothing
                                idler = socket.create_connection(
                                    ("127.0.0.1", int(target.split(":")[2].split("/")[0]))
                                )
                                time.sleep(0.3)
                            run = run_ab(ab, target, body, s.ocsp_seconds)
                        finally:
                            if idler is not None:
                                idler.close()
                            stop(proc)
                        if who == "hsm-ca" and not run.clean:
                            raise RuntimeError(
                                f"ab against hsm-ca serve{' (idle client)' if idle else ''}: "
                                f"{'stalled' if run.stalled else 'failed requests'}\n{run.text}"
                            )
                        if who == "openssl" and not run.stalled and not run.clean:
                            problems.append(
                                f"openssl{' (idle client)' if idle else ''}: "
                                f"{run.failed} failed, {run.non_2xx} non-2xx"
                            )
                        (ours if who == "hsm-ca" else theirs)[idle].append(run.rate)
                        log(
                            f"  round {r + 1}: {who}{' + idle client' if idle else ''}: "
                            + (
                                "STALLED (0/s)"
                                if run.stalled
                                else f"{run.rate:.0f}/s, {run.complete} requests ({run.keep_alive} kept "
                                f"alive), {run.failed} failed, {run.non_2xx} non-2xx"
                            )
                        )
        finally:
            stop(server)  # type: ignore[arg-type]
            server_log.close()
        note = f"ab -k -c 8 -t {s.ocsp_seconds}, no-nonce request for a good certificate" + (
            f"; openssl problems: {'; '.join(problems)}" if problems else ""
        )
        baseline = "openssl ocsp -index -port (file rsa-2048 key, signs every response)"
        return [
            Result(
                "ocsp_http",
                median(ours[False]),
                "responses/s",
                baseline,
                median(theirs[False]),
                note,
            ),
            Result(
                "ocsp_http_idle_client",
                median(ours[True]),
                "responses/s",
                baseline + ", with one idle client connected (0 = stalled)",
                median(theirs[True]),
                note,
            ),
        ]

    # ------------------------------------------------ 7. --help
    def fig_help(self) -> list[Result]:
        env = clean_env()
        ours, base = [], []
        for r in range(self.sizes.help_runs + 1):
            a = run_timed([HSM_CA, "--help"], env=env)
            b = run_timed([sys.executable, "-c", "import click"], env=env)
            if r:  # the first pair warms the page cache
                ours.append(a)
                base.append(b)
        log(
            f"  hsm-ca --help {median(ours) * 1000:.0f} ms, import click "
            f"{median(base) * 1000:.0f} ms"
        )
        return [
            Result(
                "help",
                median(ours),
                "s",
                'python -c "import click"',
                median(base),
                f"median of {len(ours)} runs each",
            )
        ]

    # ------------------------------------------------ 8. pre-issuance lint
    def fig_lint_cost(self) -> list[Result]:
        from hsm_ca.profiles import shipped_profiles_dir

        s = self.sizes
        url = "http://pki.bench.example.com"
        linted = new_home(self.work / "lint-on", base_url=url)
        plain = new_home(self.work / "lint-off", base_url=url)
        try:
            text = (shipped_profiles_dir() / "tls-server.toml").read_text()
            override = linted.config.profiles_path / "tls-server.toml"
            override.parent.mkdir(parents=True, exist_ok=True)
            override.write_text(text.replace("[certificate]", "[certificate]\nlint = true", 1))
            if not linted.profiles.get("tls-server").lint:
                raise RuntimeError("the home profile override did not take effect")
            csrs = make_csrs(s.lint + 1, prefix="lint", with_cn=False)
            on, off = linted.ca("issuing"), plain.ca("issuing")
            on.issue(csrs[-1], "tls-server")  # loads pkilint's validators
            off.issue(csrs[-1], "tls-server")
            with_lint, without = [], []
            for r in range(self.rounds):
                t0 = time.perf_counter()
                for data in csrs[: s.lint]:
                    on.issue(data, "tls-server")
                with_lint.append(s.lint / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for data in csrs[: s.lint]:
                    off.issue(data, "tls-server")
                without.append(s.lint / (time.perf_counter() - t0))
                log(f"  round {r + 1}: lint {with_lint[-1]:.0f}/s, no lint {without[-1]:.0f}/s")
        finally:
            linted.close()
            plain.close()
        cost_ms = (1 / median(with_lint) - 1 / median(without)) * 1000
        return [
            Result(
                "lint_cost",
                median(with_lint),
                "certs/s",
                "the same single issue without lint (tls-server, base URL set)",
                median(without),
                f"pkilint adds {cost_ms:.1f} ms per certificate",
            )
        ]


def populate_revoked(db: Path, ca: str, n: int) -> None:
    """A benchmark fixture: ``n`` revoked certificates of ``ca``, straight into the table."""
    reasons = (
        "unspecified",
        "keyCompromise",
        "superseded",
        "cessationOfOperation",
        "affiliationChanged",
    )
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    mult = 0x9E3779B97F4A7C15F39CC0605CEDC835  # odd: i -> i*mult mod 2^126 is a bijection
    mask = (1 << 126) - 1

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            serial = format((1 << 126) | (((i + 1) * mult) & mask), "x")
            when = (start + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            yield (
                serial,
                ca,
                "tls-client",
                f"CN=revoked{i}.bench.example.com",
                "[]",
                "ec-p256",
                "2025-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z",
                f"{i:064x}",
                None,
                "",
                when,
                "revoked",
                when,
                reasons[i % len(reasons)],
                None,
                1,
            )

    con = sqlite3.connect(str(db), isolation_level=None)
    try:
        con.execute("PRAGMA synchronous = OFF")
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO certificates(serial, ca, profile, subject, sans, key_type, not_before, "
            "not_after, sha256, csr_sha256, pem, created, status, revoked_at, revocation_reason, "
            "invalidity_date, revoked_epoch) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows(),
        )
        con.execute(
            "INSERT INTO meta(key, value) VALUES('revocation_epoch', '1') "
            "ON CONFLICT(key) DO UPDATE SET value='1'"
        )
        con.execute("COMMIT")
    finally:
        con.close()


def seal_revoked(home: Path, ca: str) -> None:
    """Make the SQL-inserted rows the state the trail vouches for, as a CRL would.

    The rows bypassed the trail, so CRL signing would rightly refuse them as
    edited. A CRL's intent record carries the digest of the CA's revoked rows
    and the next CRL proves its rows from there; the fixture records that
    digest the same way and signs a checkpoint over it, so the timed CRL is
    what every CRL after a home's first is: a proof from the last digest.
    """
    import hsm_ca
    from hsm_ca.trailstate import digest_text, revoked_digest

    authority = hsm_ca.open_home(home, pin=USER_PIN)
    try:
        with authority.store.transaction():
            count, digest = revoked_digest(authority.store.revoked_entries(ca))
            authority.audit.append(authority.actor(), "crl", "intent", ca=ca,
                                   detail="benchmark fixture; " + digest_text(count, digest))
        authority.checkpoint("benchmark fixture")
    finally:
        authority.close()


# ------------------------------------------------------------------ CRL workers
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_crl_hsm(home: str) -> dict[str, Any]:
    import hsm_ca

    authority = hsm_ca.open_home(home)  # PIN from $HSM_CA_PIN
    authority.ca("issuing").key_handle()  # log in outside the timing
    t0 = time.perf_counter()
    result = authority.crl("issuing")
    der = result.der()
    seconds = time.perf_counter() - t0
    authority.close()
    return {
        "seconds": seconds,
        "entries": result.entries,
        "bytes": len(der),
        "maxrss_mib": _maxrss_mib(),
    }


def worker_crl_bare(home: str) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    flags = {
        "keyCompromise": x509.ReasonFlags.key_compromise,
        "superseded": x509.ReasonFlags.superseded,
        "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
        "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    }
    con = sqlite3.connect(str(Path(home) / "ca.db"))
    ca_pem = con.execute("SELECT pem FROM cas WHERE name='issuing'").fetchone()[0]
    entries = [
        (int(serial, 16), dt.datetime.fromisoformat(when), flags.get(reason))
        for serial, when, reason in con.execute(
            "SELECT serial, revoked_at, revocation_reason FROM certificates "
            "WHERE ca='issuing' AND status='revoked'"
        )
    ]
    con.close()
    ca_cert = x509.load_pem_x509_certificate(ca_pem.encode())
    key = memory_key("ec-p256")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    t0 = time.perf_counter()
    revoked = []
    for serial, when, flag in entries:
        b = x509.RevokedCertificateBuilder(serial_number=serial, revocation_date=when)
        if flag is not None:
            b = b.add_extension(x509.CRLReason(flag), critical=False)
        revoked.append(b.build())
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca_cert.subject,
        last_update=now,
        next_update=now + dt.timedelta(days=7),
        extensions=[
            x509.Extension(aki.oid, False, aki),
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(1)),
        ],
        revoked_certificates=revoked,
    )
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "entries": len(revoked),
        "bytes": len(der),
        "maxrss_mib": _maxrss_mib(),
    }


WORKERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "crl-hsm": worker_crl_hsm,
    "crl-bare": worker_crl_bare,
}

# figure -> the results it emits (in order); --only accepts either
FIGURES: dict[str, tuple[str, ...]] = {
    "issue_soft_ec_p256": ("issue_soft_ec_p256_single", "issue_soft_ec_p256_batch"),
    "issue_soft_rsa2048": ("issue_soft_rsa2048_single", "issue_soft_rsa2048_batch"),
    "issue_pkcs11_rsa2048": ("issue_pkcs11_rsa2048", "issue_pkcs11_rsa2048_single"),
    "cli_sign_1000": ("cli_sign_1000",),
    "cli_sign_one": ("cli_sign_one_vs_openssl", "cli_sign_one_vs_import"),
    "crl": ("crl_100k", "crl_1m", "crl_1m_peak_rss"),
    "ocsp_http": ("ocsp_http", "ocsp_http_idle_client"),
    "help": ("help",),
    "lint_cost": ("lint_cost",),
}
ALL_RESULTS = tuple(name for names in FIGURES.values() for name in names)


def choose(only: list[str] | None) -> dict[str, set[str]]:
    """The figures to run, each with the results to keep."""
    if not only:
        return {fig: set(names) for fig, names in FIGURES.items()}
    chosen: dict[str, set[str]] = {}
    for want in only:
        if want in FIGURES:
            chosen.setdefault(want, set()).update(FIGURES[want])
            continue
        owner = next((fig for fig, names in FIGURES.items() if want in names), None)
        if owner is None:
            raise ValueError(
                f"unknown figure {want!r}; choose from: "
                + ", ".join(dict.fromkeys([*FIGURES, *ALL_RESULTS]))
            )
        chosen.setdefault(owner, set()).add(want)
    return chosen


def print_table(results: list[Result], notes: list[str], mode: str, sizes: Sizes) -> None:
    rows = [("figure", "hsm-ca", "baseline", "ratio", "target", "")]
    for r in results:
        ratio = r.ratio
        target = TARGETS.get(r.name)
        verdict = ""
        if target is not None:
            if r.name == "ocsp_http_idle_client":
                ok = r.value > 0 and (ratio is None or ratio >= target[0])
            else:
                ok = ratio is not None and ratio >= target[0]
            verdict = "ok" if ok else "MISS"
        rows.append(
            (
                r.name,
                f"{r.value:,.4g} {r.unit}",
                f"{r.baseline_value:,.4g} {r.unit}",
                "n/a (baseline 0)" if ratio is None else f"{ratio:.3g}x",
                target[1] if target else "",
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"hsm-ca benchmarks ({mode}; ratio > 1 means hsm-ca is better)")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("Baselines and notes:")
    for r in results:
        print(f"  {r.name}: baseline = {r.baseline}" + (f"; {r.note}" if r.note else ""))
    if mode != "full":
        print(
            f"  ({mode} sizes: crl_100k ran with {sizes.crl_small:,} entries, crl_1m with "
            f"{sizes.crl_large:,}; cli_sign_1000 with {sizes.cli_many} CSRs)"
        )
    for note in notes:
        print(f"  NOTE: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short run (< ~3 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON array on stdout")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run one figure (figure or result name); repeatable",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](args.worker[1])))
        return 0

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = MODES[mode]
    if args.rounds:
        sizes = Sizes(
            **{
                **sizes.__dict__,
                "rounds": args.rounds,
                "crl_rounds": args.rounds,
                "ocsp_rounds": args.rounds,
            }
        )
    try:
        wanted = choose(args.only)
    except ValueError as e:
        parser.error(str(e))
    if not HSM_CA.exists():
        raise SystemExit(
            f"bench.py: no hsm-ca console script next to {sys.executable}; run it "
            "with the Python of the environment hsm-ca is installed in"
        )

    work = Path(tempfile.mkdtemp(prefix="hsm-ca-bench-"))
    # SoftHSM2 reads its configuration once, when the module is first loaded: point it at
    # a private token directory before anything imports pkcs11 or hsm-ca's engine.
    (work / "softhsm" / "tokens").mkdir(parents=True)
    (work / "softhsm" / "softhsm2.conf").write_text(
        f"directories.tokendir = {work / 'softhsm' / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(work / "softhsm" / "softhsm2.conf")
    for name in [k for k in os.environ if k.startswith("HSM_CA_")]:
        del os.environ[name]  # the library must not pick up the caller's home, user or PIN

    global PYCACHE
    PYCACHE = work / "pycache"
    bench = Bench(work, sizes, mode)
    results: list[Result] = []
    failed: list[str] = []
    started = time.perf_counter()
    log(f"{mode} run in {work}")
    try:
        for fig, keep in wanted.items():
            t0 = time.perf_counter()
            log(f"== {fig}")
            try:
                out = getattr(bench, f"fig_{fig}")()
            except Exception as e:  # one broken figure must not hide the others
                traceback.print_exc(file=sys.stderr)
                failed.append(f"{fig}: {type(e).__name__}: {e}")
                continue
            results.extend(r for r in out if r.name in keep)
            log(f"   {fig} done in {time.perf_counter() - t0:.1f}s")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"total {time.perf_counter() - started:.1f}s")
    for problem in failed:
        bench.notes.append(f"FAILED {problem}")
    if args.json:
        print(json.dumps([r.as_json() for r in results], indent=1))
        for note in bench.notes:
            log(note)
    else:
        print_table(results, bench.notes, mode, sizes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
