"""Issue 13, findings 9-12: every user-named file is bounded, checked first, and fails in one line.

Real processes of the real CLI on a real home, real FIFOs (os.mkfifo),
/dev/zero and /dev/full. Where the bug was a hang or an endless read, each
process runs with a timeout and a memory limit, so a regression fails the
test instead of hanging it or eating the machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SO_PIN, TEST_SCRYPT_N, USER_PIN, make_csr, make_key
from cryptography.hazmat.primitives import serialization

QUICK = 10.0  # seconds: a refusal is one stat() away; this only has to beat a hang on a busy box


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float


def _limit_memory() -> None:  # the old code read /dev/zero until memory ran out
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def hsm(home: Path, *args: str, timeout: float = 30, cwd: Path | None = None,
        stdout: int | None = None) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
    env.update({"HSM_CA_PIN": USER_PIN, "HSM_CA_SO_PIN": SO_PIN})
    start = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "hsm_ca", "--home", str(home), *args],
        stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, timeout=timeout, cwd=cwd, preexec_fn=_limit_memory,
    )
    out = p.stdout.decode(errors="replace") if isinstance(p.stdout, bytes) else ""
    return Run(p.returncode, out, p.stderr.decode(errors="replace"), time.monotonic() - start)


def ok(home: Path, *args: str) -> Run:
    r = hsm(home, *args)
    assert r.code == 0, f"hsm-ca {' '.join(args)}: {r.err}"
    return r


def one_error(r: Run, code: int = 1) -> str:
    """Exactly one line on stderr, an ``Error:`` line, no traceback, no internal error."""
    lines = r.err.strip().splitlines()
    assert r.code == code, (r.code, r.err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err
    assert "internal error" not in r.err and "Traceback" not in r.err
    return lines[0]


def audit_records(home: Path) -> list[dict]:
    return json.loads(ok(home, "--json", "audit", "list").out)


def refused_issues(home: Path) -> list[dict]:
    return [r for r in audit_records(home) if r["action"] == "issue" and r["outcome"] == "refused"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home (root, issuing CA, a code signer), and the files the tests point at."""
    d = tmp_path_factory.mktemp("bounds")
    home = d / "home"
    ok(home, "init", "--scrypt-n", str(TEST_SCRYPT_N))
    ok(home, "ca", "create-root", "root", "--subject", "CN=Bounds Root,O=Test")
    ok(home, "ca", "create-intermediate", "issuing", "--parent", "root",
       "--subject", "CN=Bounds Issuing,O=Test", "--path-length", "0")
    ok(home, "codesign", "new-signer", "rel", "--ca", "issuing", "--subject", "CN=Release,O=Test")
    ok(home, "ca", "export", "root", "-o", str(d / "root.pem"))
    ok(home, "audit", "cert", "-o", str(d / "audit.pem"))
    (d / "a.txt").write_text("release\n")
    ok(home, "codesign", "sign", str(d / "a.txt"), "--signer", "rel")
    (d / "web.csr").write_bytes(make_csr(dns=["www.example.com"]))
    ok(home, "audit", "export", "-o", str(d / "export.jsonl"))
    os.mkfifo(d / "fifo")
    os.mkfifo(d / "fifo.csr")
    return d


def _sign(d: Path, csr: Path | str, *extra: str) -> tuple[str, ...]:
    return ("sign", str(csr), "--ca", "issuing", "--profile", "tls-server", *extra)


# ------------------------------------------------------------ finding 9
_NOT_REGULAR = [
    ("sign-fifo-csr", lambda d: _sign(d, d / "fifo.csr")),
    ("sign-dev-zero-csr", lambda d: _sign(d, "/dev/zero")),
    ("codesign-sign-fifo", lambda d: ("codesign", "sign", str(d / "fifo"), "--signer", "rel")),
    ("codesign-sign-dev-zero", lambda d: ("codesign", "sign", "/dev/zero", "--signer", "rel")),
    ("codesign-verify-sig-dev-zero", lambda d: (
        "codesign", "verify", str(d / "a.txt"), "/dev/zero", "--trust", str(d / "root.pem"))),
    ("codesign-verify-sig-fifo", lambda d: (
        "codesign", "verify", str(d / "a.txt"), str(d / "fifo"), "--trust", str(d / "root.pem"))),
    ("codesign-verify-file-dev-zero", lambda d: (
        "codesign", "verify", "/dev/zero", str(d / "a.txt.p7s"), "--trust", str(d / "root.pem"))),
    ("codesign-verify-trust-fifo", lambda d: (
        "codesign", "verify", str(d / "a.txt"), str(d / "a.txt.p7s"), "--trust", str(d / "fifo"))),
    ("codesign-verify-crl-dev-zero", lambda d: (
        "codesign", "verify", str(d / "a.txt"), str(d / "a.txt.p7s"), "--trust",
        str(d / "root.pem"), "--crl", "/dev/zero")),
    ("codesign-verify-tsa-trust-fifo", lambda d: (
        "codesign", "verify", str(d / "a.txt"), str(d / "a.txt.p7s"), "--trust",
        str(d / "root.pem"), "--tsa-trust", str(d / "fifo"))),
    ("pin-file-dev-zero", lambda d: ("--pin-file", "/dev/zero", "crl", "issuing")),
    ("pin-file-fifo", lambda d: ("--pin-file", str(d / "fifo"), "crl", "issuing")),
    ("audit-verify-dev-zero", lambda d: (
        "audit", "verify", "--file", "/dev/zero", "--trust", str(d / "audit.pem"))),
    ("audit-verify-fifo", lambda d: (
        "audit", "verify", "--file", str(d / "fifo"), "--trust", str(d / "audit.pem"))),
    ("audit-verify-trust-fifo", lambda d: (
        "audit", "verify", "--file", str(d / "export.jsonl"), "--trust", str(d / "fifo"))),
    ("hsm-restore-dev-zero", lambda d: ("--home", str(d / "new-home"), "hsm", "restore",
                                        "/dev/zero")),
    ("hsm-restore-fifo", lambda d: ("--home", str(d / "new-home"), "hsm", "restore",
                                    str(d / "fifo"))),
    ("new-pin-file-dev-zero", lambda d: ("hsm", "user", "add", "bob", "--new-pin-file",
                                         "/dev/zero")),
    ("bootstrap-fifo", lambda d: ("bootstrap", str(d / "fifo"), "--plan")),
]


@pytest.mark.parametrize("make_args", [c[1] for c in _NOT_REGULAR], ids=[c[0] for c in _NOT_REGULAR])
def test_fifos_and_devices_are_refused_at_once(pki: Path, make_args: object) -> None:
    r = hsm(pki / "home", *make_args(pki), timeout=20)  # type: ignore[operator]
    line = one_error(r)
    assert "not a regular file" in line
    assert r.seconds < QUICK, f"took {r.seconds:.1f}s"


def test_a_profile_override_that_is_a_fifo_is_refused_and_audited(pki: Path) -> None:
    home = pki / "home"
    profiles = home / "profiles"
    profiles.mkdir(exist_ok=True)
    os.mkfifo(profiles / "tls-client.toml")
    try:
        before = len(refused_issues(home))
        r = hsm(home, "sign", str(pki / "web.csr"), "--ca", "issuing", "--profile", "tls-client",
                timeout=20)
        assert "not a regular file" in one_error(r)
        assert len(refused_issues(home)) == before + 1
    finally:
        (profiles / "tls-client.toml").unlink()


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


@pytest.mark.parametrize(
    "name,size,make_args",
    [
        ("pin.txt", 4097, lambda d, f: ("--pin-file", str(f), "crl", "issuing")),
        ("big.p7s", (16 << 20) + 1, lambda d, f: (
            "codesign", "verify", str(d / "a.txt"), str(f), "--trust", str(d / "root.pem"))),
        ("big.pem", (4 << 20) + 1, lambda d, f: (
            "codesign", "verify", str(d / "a.txt"), str(d / "a.txt.p7s"), "--trust", str(f))),
        ("big.backup", (1 << 30) + 1, lambda d, f: (
            "--home", str(d / "new-home"), "hsm", "restore", str(f))),
        ("big-bootstrap.toml", (1 << 20) + 1, lambda d, f: ("bootstrap", str(f), "--plan")),
        ("big-export.jsonl", (64 << 30) + 1, lambda d, f: (
            "audit", "verify", "--file", str(f), "--trust", str(d / "audit.pem"))),
    ],
    ids=["pin-file", "signature", "trust-pem", "backup", "bootstrap-toml", "audit-export"],
)
def test_every_input_has_a_size_limit_checked_before_reading(
    pki: Path, name: str, size: int, make_args: object
) -> None:
    f = _sparse(pki / name, size)
    try:
        r = hsm(pki / "home", *make_args(pki, f), timeout=20)  # type: ignore[operator]
        assert "too large" in one_error(r)
        assert r.seconds < QUICK
    finally:
        f.unlink()


def test_audit_export_is_read_line_by_line_with_a_line_limit(pki: Path) -> None:
    export = pki / "export.jsonl"
    lines = export.read_text().splitlines(keepends=True)
    long_line = pki / "long.jsonl"
    long_line.write_text(lines[0] + '{"pad": "' + "x" * (1 << 20) + '"}\n' + "".join(lines[1:]))
    r = hsm(pki / "home", "audit", "verify", "--file", str(long_line), "--trust",
            str(pki / "audit.pem"))
    assert "line 2 is longer than 1048576 bytes" in one_error(r)
    ok(pki / "home", "audit", "verify", "--file", str(export), "--trust", str(pki / "audit.pem"))


# ----------------------------------------------------------- finding 10
def _issued_serials(home: Path) -> set[str]:
    return {r["serial"] for r in json.loads(ok(home, "--json", "list").out)}


@pytest.mark.parametrize("target", ["missing/dir/x.pem", "fifo"], ids=["missing-dir", "fifo"])
def test_sign_checks_the_destination_before_issuing(pki: Path, target: str) -> None:
    home = pki / "home"
    before, records = _issued_serials(home), len(audit_records(home))
    r = hsm(home, *_sign(pki, pki / "web.csr", "-o", str(pki / target)), timeout=20)
    line = one_error(r)
    assert "does not exist" in line or "no process is reading it" in line
    assert _issued_serials(home) == before  # no serial spent, nothing recorded
    assert len(audit_records(home)) == records


def _serial_in(line: str) -> str:
    found = re.search(r"certificate ([0-9a-f]+) was issued and recorded", line)
    assert found, line
    return found.group(1)


def test_sign_to_dev_full_names_the_serial_to_fetch(pki: Path) -> None:
    home = pki / "home"
    line = one_error(hsm(home, *_sign(pki, pki / "web.csr", "-o", "/dev/full")))
    assert "No space left on device" in line
    serial = _serial_in(line)
    assert f"hsm-ca show {serial}" in line
    assert "BEGIN CERTIFICATE" in ok(home, "show", serial).out


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
def test_sign_to_a_full_stdout_names_the_serial(pki: Path, json_flag: bool) -> None:
    home = pki / "home"
    args = (("--json",) if json_flag else ()) + _sign(pki, pki / "web.csr")
    with open("/dev/full", "wb") as full:
        r = hsm(home, *args, stdout=full.fileno())
    line = one_error(r)
    assert "standard output" in line
    assert "BEGIN CERTIFICATE" in ok(home, "show", _serial_in(line)).out


def test_sign_writes_through_a_fifo_that_is_read(pki: Path) -> None:
    fifo = pki / "read.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    time.sleep(0.2)
    try:
        ok(pki / "home", *_sign(pki, pki / "web.csr", "-o", str(fifo)))
        reader.join(10)
        assert got and got[0].startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        fifo.unlink()


def test_sign_replaces_the_file_a_symlink_points_to(pki: Path) -> None:
    real, link = pki / "real.pem", pki / "link.pem"
    real.write_text("old\n")
    link.symlink_to(real)
    ok(pki / "home", *_sign(pki, pki / "web.csr", "-o", str(link)))
    assert link.is_symlink() and real.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_out_dir_checked_first_and_unwritten_files_name_their_serial(pki: Path) -> None:
    home = pki / "home"
    not_a_dir = pki / "plain-file"
    not_a_dir.write_text("x")
    before = _issued_serials(home)
    one_error(hsm(home, "sign", str(pki / "web.csr"), str(pki / "a.txt"), "--ca", "issuing",
                  "--profile", "tls-server", "--out-dir", str(not_a_dir)), code=2)
    assert _issued_serials(home) == before
    out = pki / "out"
    (out / "two.pem").mkdir(parents=True)  # a directory where a certificate must go
    (pki / "one.csr").write_bytes(make_csr(dns=["one.example.com"]))
    (pki / "two.csr").write_bytes(make_csr(dns=["two.example.com"]))
    r = hsm(home, "--json", "sign", str(pki / "one.csr"), str(pki / "two.csr"), "--ca", "issuing",
            "--profile", "tls-server", "--out-dir", str(out))
    assert r.code == 1, r.err
    rows = {Path(row["source"]).name: row for row in json.loads(r.out)}
    assert (out / "one.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert rows["two.csr"]["written"] is False
    serial = rows["two.csr"]["serial"]
    assert f"hsm-ca show {serial}" in rows["two.csr"]["error"]
    ok(home, "show", serial)


def test_crl_to_dev_full_names_the_crl_and_a_missing_dir_signs_nothing(pki: Path) -> None:
    home = pki / "home"
    line = one_error(hsm(home, "crl", "issuing", "-o", "/dev/full"))
    found = re.search(r"CRL (\d+) of issuing was signed and recorded", line)
    assert found and "No space left on device" in line, line
    number = int(found.group(1))

    def crl_intents() -> list[str]:
        return [r["detail"] for r in json.loads(ok(home, "--json", "audit", "list").out)
                if r["action"] == "crl" and r["outcome"] == "intent"]

    intents = crl_intents()
    assert f"CRL number {number};" in intents[-1], intents
    one_error(hsm(home, "crl", "issuing", "-o", str(pki / "missing" / "x.crl")))
    assert crl_intents() == intents  # the refused run reserved no CRL number
    after = json.loads(ok(home, "--json", "crl", "issuing", "-o", str(pki / "x.crl")).out)
    assert after["number"] > number


@pytest.mark.parametrize(
    "make_args,action",
    [
        (lambda d, t: ("codesign", "sign", str(d / "a.txt"), "--signer", "rel", "-o", t),
         "codesign"),
        (lambda d, t: ("audit", "export", "-o", t), "checkpoint"),
        (lambda d, t: ("hsm", "backup", "-o", t), "backup"),
        (lambda d, t: ("ca", "export", "root", "-o", t), None),
        (lambda d, t: ("ca", "ocsp-responder", "issuing", "-o", t), "issue"),
    ],
    ids=["codesign-sign", "audit-export", "hsm-backup", "ca-export", "ocsp-responder"],
)
def test_outputs_are_checked_before_the_work(pki: Path, make_args: object,
                                             action: str | None) -> None:
    home = pki / "home"
    before = len(audit_records(home))
    r = hsm(home, *make_args(pki, str(pki / "missing" / "out")), timeout=20)  # type: ignore[operator]
    assert "does not exist" in one_error(r)
    assert len(audit_records(home)) == before  # nothing signed, checkpointed or backed up


def test_codesign_to_dev_full_says_the_signature_was_recorded(pki: Path) -> None:
    line = one_error(hsm(pki / "home", "codesign", "sign", str(pki / "a.txt"), "--signer", "rel",
                         "-o", "/dev/full"))
    assert "No space left on device" in line and "recorded in the audit trail" in line


# ----------------------------------------------------------- finding 11
def _key_file(d: Path) -> Path:
    key = make_key()
    path = d / "key.pem"
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


_REFUSALS = [
    ("too-big", lambda d: _sign(d, _sparse(d / "big.csr", (1 << 20) + 1)), "too large"),
    ("missing", lambda d: _sign(d, d / "no-such.csr"), "No such file"),
    ("fifo", lambda d: _sign(d, d / "fifo.csr"), "not a regular file"),
    ("dev-zero", lambda d: _sign(d, "/dev/zero"), "not a regular file"),
    ("directory", lambda d: _sign(d, d), "not a regular file"),
    ("undecodable", lambda d: _sign(d, d / "a.txt"), "not a PEM or DER"),
    ("private-key", lambda d: _sign(d, _key_file(d)), "private key"),
    ("unknown-ca", lambda d: ("sign", str(d / "web.csr"), "--ca", "nope", "--profile",
                              "tls-server"), "unknown CA"),
    ("unknown-profile", lambda d: ("sign", str(d / "web.csr"), "--ca", "issuing", "--profile",
                                   "nope"), "unknown profile"),
    ("unknown-ca-and-unreadable", lambda d: ("sign", str(d / "fifo.csr"), "--ca", "nope",
                                             "--profile", "tls-server"), "unknown CA"),
]


@pytest.mark.parametrize("make_args,reason", [(c[1], c[2]) for c in _REFUSALS],
                         ids=[c[0] for c in _REFUSALS])
def test_every_refused_request_leaves_one_refused_record(pki: Path, make_args: object,
                                                         reason: str) -> None:
    home = pki / "home"
    before = refused_issues(home)
    r = hsm(home, *make_args(pki), timeout=20)  # type: ignore[operator]
    assert reason in one_error(r)
    after = refused_issues(home)
    assert len(after) == len(before) + 1
    assert reason in after[-1]["detail"]
    ok(home, "audit", "verify")


def test_unreadable_csrs_in_a_batch_are_refused_and_recorded_the_others_issued(pki: Path) -> None:
    home = pki / "home"
    before = refused_issues(home)
    (pki / "good.csr").write_bytes(make_csr(dns=["good.example.com"]))
    big = _sparse(pki / "huge.csr", (1 << 20) + 1)
    r = hsm(home, "--json", "sign", str(pki / "good.csr"), str(big), str(pki / "fifo.csr"),
            "--ca", "issuing", "--profile", "tls-server", "--out-dir", str(pki / "batch"))
    assert r.code == 1, r.err
    rows = {Path(row["source"]).name: row for row in json.loads(r.out)}
    assert "serial" in rows["good.csr"] and rows["huge.csr"]["refused"]
    assert rows["fifo.csr"]["refused"]
    assert len(refused_issues(home)) == len(before) + 2
    ok(home, "audit", "verify")


# ----------------------------------------------------------- finding 12
_PROFILE = (Path(__file__).parent.parent / "profiles" / "tls-client.toml").read_text()


def _profile_case(d: Path, text: str) -> tuple[str, ...]:
    (d / "home" / "profiles").mkdir(exist_ok=True)
    (d / "home" / "profiles" / "tls-client.toml").write_text(text)
    return ("sign", str(d / "web.csr"), "--ca", "issuing", "--profile", "tls-client")


def _with(text: str, key: str, value: str) -> str:
    lines = [f"{key} = {value}" if line.split("=")[0].strip() == key else line
             for line in text.splitlines()]
    assert any(line.startswith(f"{key} = {value}") for line in lines)
    return "\n".join(lines) + "\n"


_TOML_CASES = [
    ("profile-nested-arrays", lambda d: _profile_case(
        d, _PROFILE + "deep = " + "[" * 3000 + "]" * 3000 + "\n"), "tls-client.toml:",
     "nested deeper"),
    ("profile-dotted-keys", lambda d: _profile_case(
        d, "a" + ".a" * 400 + " = 1\n" + _PROFILE), "tls-client.toml", "nested deeper"),
    ("profile-5000-digit-days", lambda d: _profile_case(
        d, _with(_PROFILE, "default_days", "9" * 5000)), "tls-client.toml:",
     "'default_days'"),
    ("profile-4000-digit-days", lambda d: _profile_case(
        d, _with(_PROFILE, "default_days", "9" * 4000)), "tls-client.toml",
     "'certificate.default_days'"),
    ("bootstrap-nested", lambda d: ("bootstrap", str(_write(
        d / "deep.toml", '[[ca]]\nname = "r"\nsubject = "CN=r"\nx = '
        + "{a = " * 2000 + "1" + "}" * 2000 + "\n")), "--plan"), "deep.toml:4", "nested deeper"),
    ("bootstrap-5000-digit-days", lambda d: ("bootstrap", str(_write(
        d / "days.toml", '[[ca]]\nname = "r"\nsubject = "CN=r"\ndays = ' + "7" * 5000 + "\n")),
        "--plan"), "days.toml:4", "'days'"),
    ("bootstrap-4000-digit-days", lambda d: ("bootstrap", str(_write(
        d / "days2.toml", '[[ca]]\nname = "r"\nsubject = "CN=r"\ndays = ' + "7" * 4000 + "\n")),
        "--plan"), "days2.toml:4", "'days'"),
    ("bootstrap-huge-path-length", lambda d: ("bootstrap", str(_write(
        d / "pl.toml", '[[ca]]\nname = "r"\nsubject = "CN=r"\npath_length = ' + "7" * 400
        + "\n")), "--plan"), "pl.toml:4", "'path_length'"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args,where,what", [(c[1], c[2], c[3]) for c in _TOML_CASES],
                         ids=[c[0] for c in _TOML_CASES])
def test_hostile_toml_names_the_file_and_field(pki: Path, make_args: object, where: str,
                                               what: str) -> None:
    try:
        r = hsm(pki / "home", *make_args(pki))  # type: ignore[operator]
        line = one_error(r)
        assert where in line and what in line, line
        assert len(line) < 400  # the hostile value is not echoed
    finally:
        (pki / "home" / "profiles" / "tls-client.toml").unlink(missing_ok=True)


@pytest.mark.parametrize(
    "extra,what",
    [
        ("x = " + "[" * 3000 + "]" * 3000, "nested deeper"),
        ("ocsp_cache_seconds = " + "9" * 5000, "'ocsp_cache_seconds'"),
        ("ocsp_cache_seconds = " + "9" * 400, "'ocsp_cache_seconds'"),
    ],
    ids=["nested", "5000-digits", "400-digits"],
)
def test_hostile_home_config_names_the_file(pki: Path, extra: str, what: str) -> None:
    config = pki / "home" / "hsm-ca.toml"
    original = config.read_text()
    lines = [line for line in original.splitlines() if not line.startswith("ocsp_cache_seconds")]
    config.write_text("\n".join([extra, *lines]) + "\n")
    try:
        # 'crl' starts the early PIN derivation, which reads the config before the CLI does
        line = one_error(hsm(pki / "home", "crl", "issuing"))
        assert "hsm-ca.toml" in line and what in line, line
    finally:
        config.write_text(original)


def test_backup_refuses_a_fifo_among_the_home_profiles(pki: Path) -> None:
    fifo = pki / "home" / "profiles" / "stray.toml"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    try:
        r = hsm(pki / "home", "hsm", "backup", "-o", str(pki / "b.backup"), timeout=20)
        assert "not a regular file" in one_error(r)
        assert not (pki / "b.backup").exists()
    finally:
        fifo.unlink()


# ------------------------------------------- issue 13 review, Medium 3: TOML in linear time
def _toml_fill(prefix: str, unit: str, suffix: str = "") -> str:
    """``prefix`` + as many ``unit`` as fit + ``suffix``: a file of the largest size read."""
    from hsm_ca.fileio import CONFIG_BYTES

    room = CONFIG_BYTES - len(prefix.encode()) - len(suffix.encode())
    return prefix + unit * (room // len(unit.encode())) + suffix


def _toml_lines(make_line: object, room: int = 1 << 20) -> str:
    lines, size, i = [], 0, 0
    while size + len(line := make_line(i)) <= room:  # type: ignore[operator]
        lines.append(line)
        size, i = size + len(line), i + 1
    return "".join(lines)


# Each is 1 MiB (the limit read), hostile to the old pre-scan regex (an unclosed quote rescanned
# the rest of the text: quadratic), to its huge-number fallback, or to tomllib itself (which
# rebuilds a dotted key for each of its parts: quadratic in a key's length).
_HOSTILE_TOML = {
    "unclosed-string-of-escapes": _toml_fill('a = "', '\\"'),
    "unclosed-multiline-escaped-quotes": _toml_fill('a = """', '\\"""\n'),
    "unclosed-multiline-backslash-at-end": _toml_fill('a = """', '\\"""\n', "\\"),
    "unclosed-multiline-literal": _toml_fill("a = '''", "''x\n"),
    "unclosed-strings-each-line": _toml_fill("", 'a = "\\"\\"\\"\n'),
    "many-open-brackets": _toml_fill("", "[["),
    "many-open-braces": _toml_fill("a = ", "{"),
    "deep-inline-tables": _toml_fill("a = ", "{b="),
    "deep-arrays-closed": "a = " + "[" * 524_000 + "]" * 524_000,
    "long-multiline-string": _toml_fill('a = """', "x", '"""\n'),
    "long-multiline-escapes": _toml_fill('a = """', "\\n\\\n", '"""\n'),
    "long-string-unicode-escapes": _toml_fill('a = "', "\\u00e9", '"\n'),
    "huge-integer": _toml_fill("a = ", "9"),
    "huge-hex": _toml_fill("a = 0x", "f"),
    "huge-float": _toml_fill("a = 1.", "9"),
    "digit-runs-then-a-huge-number": _toml_lines(
        lambda i: f"k{i} = {'9' * 3999}\n", (1 << 20) - 6000) + "z = " + "9" * 5000 + "\n",
    "long-dotted-key": _toml_fill("", "a.", "a = 1\n"),
    "long-dotted-key-spaced": _toml_fill("", "a . ", "a = 1\n"),
    "long-dotted-header": _toml_fill("[", "a.", "a]\n"),
    "long-header-then-many-keys": "[" + "a." * 100_000 + "a]\n" + "b=1\n" * 150_000,
    "long-dotted-key-in-inline-table": _toml_fill("a = {", "b.", "c = 1}\n"),
    "quoted-dotted-key": _toml_fill("", '"a".', "a = 1\n"),
    # the largest documents allowed: 16-part keys, many tables, many values
    "many-16-part-headers": _toml_lines(lambda i: f"[k{i}." + "a." * 14 + "a]\nb=1\n"),
    "many-16-part-keys": _toml_lines(lambda i: f"k{i}." + "a." * 14 + "a=1\n"),
    "many-tables": _toml_lines(lambda i: f"[t{i}]\nb=1\n"),
    "many-arrays-of-tables": _toml_fill("", "[[a.b]]\n"),
    "many-empty-arrays": _toml_fill("a = [", "[],", "]\n"),
    "many-floats": _toml_fill("a = [", "1.5,", "]\n"),
    "many-keys": _toml_lines(lambda i: f"k{i} = 1\n"),
    "blank-lines": _toml_fill("", "\n"),
}


@pytest.mark.parametrize("text", list(_HOSTILE_TOML.values()), ids=list(_HOSTILE_TOML))
def test_hostile_toml_of_the_largest_size_is_refused_or_parsed_at_once(text: str) -> None:
    import signal

    from hsm_ca.config import parse_toml
    from hsm_ca.errors import ConfigError

    assert len(text.encode()) <= 1 << 20

    def overdue(*_: object) -> None:  # the old scan took minutes to hours: fail, don't hang
        raise TimeoutError("still parsing after 20 s")

    previous = signal.signal(signal.SIGALRM, overdue)
    signal.alarm(20)
    start = time.monotonic()
    try:
        parse_toml(text, "hostile.toml")
    except ConfigError as e:
        assert str(e).startswith("hostile.toml"), e
        assert len(str(e)) < 400
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.monotonic() - start
    # ~1 s on an idle core (tomllib's own pace for 1 MiB); allow for a loaded CI machine
    assert seconds < 4, f"{seconds:.1f} s"


@pytest.mark.parametrize(
    "text,line",
    [
        ('a = 1\nb = "[[[["\n# [[[[[[[[[[[[[[[[[[[[\nc = ' + "[" * 20 + "]" * 20 + "\n", 4),
        ("a = '''\n[[[[[[[[[[[[[[[[[[[[\n'''\n\n[t]\nx = {y = " + "{z = " * 20 + "1"
         + "}" * 21 + "\n", 6),
        ('x = "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r"\n' + "k" + ".k" * 16 + " = 1\n", 2),
        ("f = [" + "1.5, " * 40 + "]\n[" + ".".join(["t"] * 17) + "]\n", 2),
        ('a = """\n\\"""\n"""\n' + "[" * 17 + "]" * 17 + "\n", 4),
    ],
    ids=["array", "inline-table", "dotted-key", "dotted-header", "after-escaped-quotes"],
)
def test_deep_toml_names_the_file_and_line(text: str, line: int) -> None:
    from hsm_ca.config import parse_toml
    from hsm_ca.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_toml(text, "deep.toml")
    assert str(e.value) == f"deep.toml:{line}: nested deeper than 16 levels"


_VALID_TOML = [
    'a = "[{.#" # ]]]]\nb = \'\'\'\n[[[[ ".\'\'\'\n',
    'k = """x""""\nl = """\n\\\n  y"""\n',
    "[" + ".".join(["t"] * 15) + "]\nk = 1\n",  # 16 levels: the most allowed
    ".".join(f'"p{i}"' for i in range(16)) + " = 1\n",
    "f = [" + ", ".join(["1.5"] * 40) + "]\nd = [" + ", ".join(["1979-05-27T07:32:00.999Z"] * 20)
    + "]\n" + "g" + ".g" * 15 + " = 2\n",
    "a = " + "[" * 16 + "]" * 16 + "\n",
]


_SHIPPED_TOML = [*sorted((Path(__file__).parent.parent / "profiles").glob("*.toml")),
                 Path(__file__).parent.parent / "examples" / "pki.toml"]


@pytest.mark.parametrize(
    "text", _VALID_TOML + [p.read_text() for p in _SHIPPED_TOML],
    ids=[f"tricky-{i}" for i in range(len(_VALID_TOML))] + [p.name for p in _SHIPPED_TOML],
)
def test_the_nesting_scan_accepts_valid_toml_as_tomllib_reads_it(text: str) -> None:
    import tomllib

    from hsm_ca.config import parse_toml

    assert parse_toml(text, "ok.toml") == tomllib.loads(text)


def test_a_1mib_hostile_profile_is_refused_in_one_line_at_once(pki: Path) -> None:
    """The real CLI on a home profile: the old scan spent about an hour on this file."""
    try:
        r = hsm(pki / "home", *_profile_case(pki, _toml_fill(_PROFILE + 'x = "', '\\"')),
                timeout=60)
        line = one_error(r)
        assert "tls-client.toml" in line and "not valid TOML" in line, line
        assert r.seconds < QUICK, f"took {r.seconds:.1f}s"
    finally:
        (pki / "home" / "profiles" / "tls-client.toml").unlink(missing_ok=True)


def test_a_long_dotted_key_in_the_home_config_is_refused_at_once(pki: Path) -> None:
    """'crl' reads the config early (prelogin) as well; tomllib alone took hours on this."""
    config = pki / "home" / "hsm-ca.toml"
    original = config.read_text()
    config.write_text(original + "a." * (((1 << 20) - len(original) - 8) // 2) + "a = 1\n")
    try:
        r = hsm(pki / "home", "crl", "issuing", timeout=60)
        line = one_error(r)
        assert re.match(r"Error: .*hsm-ca\.toml:\d+: nested deeper than 16 levels", line), line
        assert r.seconds < QUICK, f"took {r.seconds:.1f}s"
    finally:
        config.write_text(original)


# ------------------------------ issue 13 review, Medium 6: the checked destination is the written one
class _FifoReader:
    """A FIFO with a reader (``cat fifo > got`` in a thread): it reads until the last writer closes.

    The thread is in open() (waiting for a writer) before the command starts,
    so the command's non-blocking open finds a reader. A command that opened,
    closed and reopened the FIFO gave this reader an empty read and then
    blocked (or failed) on the reopen with nobody reading.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.got: list[bytes] = []
        os.mkfifo(path)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wchan = Path(f"/proc/self/task/{self.thread.native_id}/wchan")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and wchan.read_text() != "wait_for_partner":
            time.sleep(0.01)

    def _read(self) -> None:
        with open(self.path, "rb") as fh:
            self.got.append(fh.read())

    def result(self) -> bytes:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the reader never saw the end of the output"
        return self.got[0]

    def close(self) -> None:
        if self.thread.is_alive():  # release a reader stuck in open() so the thread ends
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        self.path.unlink()


def _restores(pki: Path, blob: bytes) -> None:
    backup = pki / "from-fifo.backup"
    backup.write_bytes(blob)
    new_home = pki / "restored-from-fifo"
    try:
        ok(new_home, "hsm", "restore", str(backup))
        ok(new_home, "audit", "verify")
    finally:
        backup.unlink()
        shutil.rmtree(new_home, ignore_errors=True)


def _verifies_signature(pki: Path, blob: bytes) -> None:
    sig = pki / "from-fifo.p7s"
    sig.write_bytes(blob)
    try:
        ok(pki / "home", "codesign", "verify", str(pki / "a.txt"), str(sig),
           "--trust", str(pki / "root.pem"))
    finally:
        sig.unlink()


def _is_certificate(pki: Path, blob: bytes) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(blob)
    issued = {int(s, 16) for s in _issued_serials(pki / "home")}
    assert cert.serial_number in issued


def _is_crl(pki: Path, blob: bytes) -> None:
    from cryptography import x509

    crl = x509.load_pem_x509_crl(blob)
    assert "Bounds Issuing" in crl.issuer.rfc4514_string()


def _verifies_export(pki: Path, blob: bytes) -> None:
    export = pki / "from-fifo.jsonl"
    export.write_bytes(blob)
    try:
        assert blob.endswith(b"\n") and blob.count(b"\n") > 5
        ok(pki / "home", "audit", "verify", "--file", str(export), "--trust",
           str(pki / "audit.pem"))
    finally:
        export.unlink()


_FIFO_OUTPUTS = [
    ("hsm-backup", lambda d, o: ("hsm", "backup", "-o", o, "--scrypt-n", "16384"), _restores),
    ("codesign-sign", lambda d, o: ("codesign", "sign", str(d / "a.txt"), "--signer", "rel",
                                    "-o", o), _verifies_signature),
    ("sign", lambda d, o: _sign(d, d / "web.csr", "-o", o), _is_certificate),
    ("crl", lambda d, o: ("crl", "issuing", "-o", o), _is_crl),
    ("audit-export", lambda d, o: ("audit", "export", "-o", o), _verifies_export),
]


@pytest.mark.parametrize("make_args,check", [(c[1], c[2]) for c in _FIFO_OUTPUTS],
                         ids=[c[0] for c in _FIFO_OUTPUTS])
def test_a_fifo_being_read_receives_the_whole_output(pki: Path, make_args: object,
                                                    check: object) -> None:
    reader = _FifoReader(pki / "out.fifo")
    try:
        r = hsm(pki / "home", *make_args(pki, str(reader.path)), timeout=30)  # type: ignore[operator]
        assert r.code == 0, r.err
        assert r.seconds < QUICK, f"took {r.seconds:.1f}s"
        check(pki, reader.result())  # type: ignore[operator]
    finally:
        reader.close()


@pytest.mark.parametrize("make_args", [c[1] for c in _FIFO_OUTPUTS],
                         ids=[c[0] for c in _FIFO_OUTPUTS])
def test_a_fifo_nobody_reads_is_refused_before_the_work(pki: Path, make_args: object) -> None:
    home = pki / "home"
    fifo = pki / "unread.fifo"
    os.mkfifo(fifo)
    try:
        records = len(audit_records(home))
        r = hsm(home, *make_args(pki, str(fifo)), timeout=30)  # type: ignore[operator]
        assert "no process is reading it" in one_error(r)
        assert r.seconds < QUICK, f"took {r.seconds:.1f}s"
        assert len(audit_records(home)) == records  # nothing signed, backed up or recorded
    finally:
        fifo.unlink()


def test_atomic_write_never_blocks_on_a_fifo_nobody_reads(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    code = ("import sys\nfrom hsm_ca.fileio import atomic_write\n"
            "try:\n    atomic_write(sys.argv[1], b'x')\n"
            "except OSError as e:\n    print(e.errno)\n")
    p = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 0 and p.stdout.strip() == str(errno.ENXIO), (p.stdout, p.stderr)


# --------------------------- issue 13 review, Low: blank lines of a line-by-line input are bounded
@pytest.mark.parametrize("line", ["\n", "\x1c\n", " \t\r\n"], ids=["newlines", "unicode-space",
                                                                   "whitespace"])
def test_an_export_of_blank_lines_ends_at_once(pki: Path, line: str) -> None:
    """128 MiB of lines the verifier skips as blank: the old reader looped for half a minute
    (64 GiB, the size allowed, would have taken hours)."""
    blanks = pki / "blank.jsonl"
    blanks.write_bytes(line.encode() * ((128 << 20) // len(line.encode())))
    try:
        r = hsm(pki / "home", "audit", "verify", "--file", str(blanks), "--trust",
                str(pki / "audit.pem"), timeout=120)
        assert "bytes of blank lines" in one_error(r)
        assert r.seconds < 5, f"took {r.seconds:.1f}s"
    finally:
        blanks.unlink()


def test_an_export_with_a_few_blank_lines_still_verifies(pki: Path) -> None:
    lines = (pki / "export.jsonl").read_text().splitlines(keepends=True)
    spaced = pki / "spaced.jsonl"
    spaced.write_text("\n" * 100 + "".join(line + " \r\n" * 10 for line in lines) + "\n\n")
    try:
        ok(pki / "home", "audit", "verify", "--file", str(spaced), "--trust",
           str(pki / "audit.pem"))
    finally:
        spaced.unlink()
