"""Helpers for the interop suite: real hsm-ca processes, the real openssl CLI.

Nothing here judges a certificate; the tests hand what hsm-ca produced to an
independent tool (openssl, Python's ssl module, pkilint) and read its verdict.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_SCRYPT_N, run_process

OPENSSL = shutil.which("openssl")
TIMEOUT = 60

requires_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")

ROOT_SUBJECT = "CN=Interop Root CA,O=Interop,C=NL"
ISSUING_SUBJECT = "CN=Interop Issuing CA,O=Interop,C=NL"
BASE_URL = "http://pki.example.com"

# ``openssl req -newkey`` arguments per hsm-ca key type.
OPENSSL_NEWKEY: dict[str, list[str]] = {
    "ec-p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "ec-p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "ec-p521": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
    "rsa-2048": ["-newkey", "rsa:2048"],
    "ed25519": ["-newkey", "ed25519"],
}


def hsm(home: Path, *args: str) -> str:
    """Run ``hsm-ca --home HOME ARGS`` as a real process; return stdout, fail on exit != 0."""
    r = run_process(home, *args)
    assert r.returncode == 0, f"hsm-ca {' '.join(args)} exited {r.returncode}: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the openssl CLI; with ``check`` fail the test on a non-zero exit."""
    if OPENSSL is None:
        pytest.skip("the openssl CLI is not installed")
    r = subprocess.run(
        [OPENSSL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert r.returncode == 0, f"openssl {' '.join(map(str, args))} failed: {r.stderr}"
    return r


@dataclass
class Pki:
    """A home with a root and an issuing CA (path length 0), exported as PEM files."""

    home: Path
    dir: Path
    root_key: str
    issuing_key: str
    root: Path  # ca export root
    issuing: Path  # ca export issuing
    chain: Path  # ca export issuing --chain (issuing, then root)

    def sign(
        self,
        csr: Path,
        profile: str,
        *,
        ca: str = "issuing",
        out: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> tuple[dict[str, Any], Path]:
        """``hsm-ca --json sign CSR --ca CA --profile P --chain -o OUT``; returns (json, OUT)."""
        out = out or self.dir / f"{csr.stem}.{profile}.pem"
        text = hsm(
            self.home,
            "--json",
            "sign",
            str(csr),
            "--ca",
            ca,
            "--profile",
            profile,
            "--chain",
            "-o",
            str(out),
            *extra,
        )
        info = json.loads(text)
        assert isinstance(info, dict), text
        return info, out


def build_pki(
    directory: Path,
    *,
    root_key: str = "ec-p384",
    issuing_key: str = "ec-p256",
    base_url: str | None = None,
) -> Pki:
    """Create a PKI with the hsm-ca CLI (real processes) and export its certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "home"
    init = ["init", "--scrypt-n", str(TEST_SCRYPT_N)]
    if base_url:
        init += ["--base-url", base_url]
    hsm(home, *init)
    hsm(home, "ca", "create-root", "root", "--subject", ROOT_SUBJECT, "--key-type", root_key)
    hsm(
        home,
        "ca",
        "create-intermediate",
        "issuing",
        "--parent",
        "root",
        "--subject",
        ISSUING_SUBJECT,
        "--key-type",
        issuing_key,
        "--path-length",
        "0",
    )
    root, issuing, chain = (
        directory / "root.pem",
        directory / "issuing.pem",
        directory / "chain.pem",
    )
    hsm(home, "ca", "export", "root", "-o", str(root))
    hsm(home, "ca", "export", "issuing", "-o", str(issuing))
    hsm(home, "ca", "export", "issuing", "--chain", "-o", str(chain))
    return Pki(home, directory, root_key, issuing_key, root, issuing, chain)


def openssl_csr(
    directory: Path,
    name: str,
    *,
    key_type: str = "ec-p256",
    subject: str = "/CN=www.example.com",
    san: str | None = None,
    der: bool = False,
) -> tuple[Path, Path]:
    """A CSR made by ``openssl req -new -newkey``; returns (key file, CSR file)."""
    key = directory / f"{name}.key"
    csr = directory / f"{name}.{'der' if der else 'csr'}"
    args: list[str] = ["req", "-new", *OPENSSL_NEWKEY[key_type], "-nodes", "-keyout", str(key)]
    args += ["-subj", subject]
    if san:
        args += ["-addext", f"subjectAltName={san}"]
    if der:
        args += ["-outform", "DER"]
    openssl(*args, "-out", str(csr))
    return key, csr


def x509_text(cert: Path) -> str:
    """``openssl x509 -text -noout`` of the first certificate in the file."""
    return openssl("x509", "-in", cert, "-noout", "-text").stdout


@dataclass(frozen=True)
class Extension:
    critical: bool
    lines: tuple[str, ...]

    @property
    def body(self) -> str:
        return "\n".join(self.lines)


def extensions(text: str) -> dict[str, Extension]:
    """Parse the ``X509v3 extensions:`` block of ``openssl x509 -text`` by indentation."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "X509v3 extensions:"]
    assert starts, f"openssl printed no extensions:\n{text}"
    start = starts[0]
    header_indent = _indent(lines[start]) + 4
    parsed: dict[str, tuple[bool, list[str]]] = {}
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent < header_indent:
            break
        if indent == header_indent:
            name, _, rest = line.strip().partition(":")
            current = name.strip()
            assert current not in parsed, f"extension {current!r} printed twice"
            parsed[current] = (rest.strip() == "critical", [])
        else:
            assert current is not None
            parsed[current][1].append(line.strip())
    return {k: Extension(c, tuple(body)) for k, (c, body) in parsed.items()}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def key_id(ext: Extension) -> str:
    """A key identifier as printed by openssl (with or without 'keyid:'), upper-case hex."""
    for line in ext.lines:
        m = re.fullmatch(r"(?:keyid:)?((?:[0-9A-Fa-f]{2}:)*[0-9A-Fa-f]{2})", line)
        if m:
            return m.group(1).upper()
    raise AssertionError(f"no key identifier in {ext.lines}")


def pem_blocks(path: Path) -> list[str]:
    """The PEM certificate blocks in a file, in order, each normalised to end with a newline."""
    text = path.read_text()
    blocks = re.findall(
        r"-----BEGIN CERTIFICATE-----\n.*?-----END CERTIFICATE-----\n?", text, flags=re.S
    )
    return [b if b.endswith("\n") else b + "\n" for b in blocks]
