"""Durability and concurrency of the CA home, with real processes on a real database.

* Crash consistency: a driver process (tests/drivers/ca_driver.py) issues,
  revokes and signs CRLs in a loop and is SIGKILLed at random instants, many
  times in a row on the same home; each driver goes on from whatever the last
  one left. Afterwards the database must be intact, the audit trail must
  verify (interrupted signings are notes, not corruption), and everything a
  driver printed - that is, everything the library had returned to a caller -
  must be in the database.
* Concurrency: four processes released together on one home, each doing a
  hundred operations; none may fail (no "database is locked"), and what they
  report must add up to exactly what the database and the audit trail hold.
* The race behind CRL time stamps, made deterministic with two connections in
  one process: a CRL that queued on the write lock must not be dated before
  the CRL signed while it waited.

Set HSM_CA_DURABILITY_SEED to replay one random schedule of kills.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SO_PIN, TEST_SCRYPT_N, USER_PIN, make_csr
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import hsm_ca
from hsm_ca.policy import parse_dn

DRIVER = Path(__file__).parent / "drivers" / "ca_driver.py"
CRASH_KILLS = 50
CRASH_WINDOW = (0.05, 0.6)  # seconds after the chosen start instant
CONCURRENT_WORKERS = 4
CONCURRENT_OPS = 100


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A home with a root and an issuing CA, and a file of ready-made CSRs."""
    h = tmp_path / "home"
    with hsm_ca.init_home(h, user_pin=USER_PIN, officer_pin=SO_PIN, scrypt_n=TEST_SCRYPT_N) as a:
        a.create_root("root", parse_dn("CN=Durability Root,O=Test"))
        a.create_intermediate(
            "issuing", "root", parse_dn("CN=Durability Issuing,O=Test"), path_length=0
        )
    csrs = [make_csr(cn=f"client-{i}.example.com").decode() for i in range(200)]
    (tmp_path / "csrs.json").write_text(json.dumps(csrs))
    yield h


# ----------------------------------------------------------------- the checks


@dataclass
class Reported:
    """What drivers said the library returned to them."""

    issued: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    crls: list[tuple[str, int, int | None]] = field(default_factory=list)


def _pem_sha256(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_consistency(home: Path, reported: Reported, *, one_writer: bool) -> dict[str, int]:
    """Every invariant the crash and concurrency tests share; returns some counts.

    With ``one_writer`` (one process at a time) CRLs must also have been stored in
    the order of their numbers; concurrent signers may store them out of order.
    """
    db = home / "ca.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        certs = conn.execute("SELECT serial, ca, sha256, pem, status FROM certificates").fetchall()
        serials = conn.execute("SELECT serial, ca, state FROM serials").fetchall()
        audit = conn.execute(
            "SELECT seq, action, outcome, ca, serial, object_sha256, detail FROM audit ORDER BY seq"
        ).fetchall()
        crls = conn.execute(
            "SELECT rowid, ca, number, base_number, sha256, der, epoch FROM crls ORDER BY rowid"
        ).fetchall()
        cas = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT name, crl_number, pem FROM cas")}
        dup_certs = conn.execute(
            "SELECT serial, count(*) FROM certificates GROUP BY serial HAVING count(*) > 1"
        ).fetchall()
        dup_serials = conn.execute(
            "SELECT serial, count(*) FROM serials GROUP BY serial HAVING count(*) > 1"
        ).fetchall()
    finally:
        conn.close()

    # no serial twice, in certificates or among the reserved serials
    assert dup_certs == [] and dup_serials == []
    assert len({c[0] for c in certs}) == len(certs)
    assert len({s[0] for s in serials}) == len(serials)

    issued_records: dict[str, list[tuple[int, str]]] = defaultdict(list)
    intent_records: dict[str, list[int]] = defaultdict(list)
    outcomes = Counter()
    revoke_records: Counter[str] = Counter()
    crl_issued_sha: list[str] = []
    for seq, action, outcome, _ca, serial, sha, _detail in audit:
        if action == "issue":
            outcomes[outcome] += 1
            if outcome == "issued":
                issued_records[serial].append((seq, sha))
            elif outcome == "intent":
                intent_records[serial].append(seq)
        elif action == "revoke" and outcome == "revoked":
            revoke_records[serial] += 1
        elif action == "crl" and outcome == "issued":
            crl_issued_sha.append(sha)
    assert outcomes["failed"] == 0, "the engine never fails here; a 'failed' issue is a bug"

    # every stored certificate: exactly one intent, then exactly one matching 'issued' record
    serial_state = {s: (ca, state) for s, ca, state in serials}
    cert_serials = set()
    for serial, ca, sha, pem, status in certs:
        cert_serials.add(serial)
        actual = _pem_sha256(pem)
        assert actual == sha, f"certificate {serial}: stored sha256 does not match its PEM"
        assert format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x") == serial
        recs = issued_records.get(serial, [])
        assert len(recs) == 1, f"certificate {serial} has {len(recs)} 'issued' audit records"
        assert recs[0][1] == sha, f"certificate {serial}: 'issued' record has another sha256"
        intents = intent_records.get(serial, [])
        assert len(intents) == 1, f"certificate {serial} has {len(intents)} intent records"
        assert intents[0] < recs[0][0], f"certificate {serial}: issued before its intent"
        assert serial_state.get(serial) == (ca, "issued"), (serial, serial_state.get(serial))
        assert status in ("valid", "revoked")
    for serial in issued_records:
        assert serial in cert_serials, f"'issued' record for {serial} but no certificate"

    # reserved serials: an intent without a certificate is never used by one later
    dangling = 0
    for serial, (_ca, state) in serial_state.items():
        assert state in ("intent", "issued"), (serial, state)
        assert len(intent_records.get(serial, [])) == 1, f"serial {serial} reserved twice"
        if state == "intent":
            dangling += 1
            assert serial not in cert_serials and serial not in issued_records
    for serial in intent_records:
        assert serial in serial_state, f"intent record for {serial} without a reserved serial"

    # revocations: one audit record per revoked certificate
    revoked_rows = {c[0] for c in certs if c[4] == "revoked"}
    assert set(revoke_records) == revoked_rows
    assert all(n == 1 for n in revoke_records.values()), revoke_records.most_common(3)

    # what callers were handed back is durable
    missing = [s for s in reported.issued if s not in cert_serials]
    assert not missing, f"{len(missing)} returned serials are not in the database: {missing[:5]}"
    assert len(set(reported.issued)) == len(reported.issued), "a serial was returned twice"
    not_revoked = [s for s in reported.revoked if s not in revoked_rows]
    assert not not_revoked, f"returned revocations not in the database: {not_revoked[:5]}"

    # CRLs: numbers strictly increase per CA, each CRL is what was recorded and signed,
    # a higher-numbered full CRL never lacks an entry of a lower-numbered one, and time
    # agrees with the numbers: a higher number never has an earlier thisUpdate (relying
    # parties that pick "the newest" by thisUpdate would pick the older list), and no CRL
    # lists a revocation dated after its own thisUpdate
    by_ca: dict[str, list[Any]] = defaultdict(list)
    late_entries = []
    stored_crl_sha = []
    for _rowid, ca, number, base, sha, der, epoch in crls:
        crl = x509.load_der_x509_crl(bytes(der))
        assert hashlib.sha256(bytes(der)).hexdigest() == sha
        stored_crl_sha.append(sha)
        ca_cert = x509.load_pem_x509_certificate(cas[ca][1].encode())
        assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number
        by_ca[ca].append((number, base, {r.serial_number for r in crl}, epoch, crl.last_update_utc))
        late_entries += [
            (
                ca,
                number,
                crl.last_update_utc.isoformat(),
                format(r.serial_number, "x"),
                r.revocation_date_utc.isoformat(),
            )
            for r in crl
            if r.revocation_date_utc > crl.last_update_utc
        ]
    assert sorted(stored_crl_sha) == sorted(crl_issued_sha), "crls rows vs 'crl issued' records"
    for ca, rows in by_ca.items():
        numbers = [r[0] for r in rows]
        assert len(numbers) == len(set(numbers)), f"CA {ca}: a CRL number used twice"
        if one_writer:
            assert numbers == sorted(numbers), f"CA {ca}: CRL numbers not strictly increasing"
        rows.sort(key=lambda r: r[0])
        assert max(numbers) <= cas[ca][0], f"CA {ca}: a CRL number above the CA's counter"
        full = [r for r in rows if r[1] is None]
        for (n1, _, s1, e1, _), (n2, _, s2, e2, _) in zip(full, full[1:], strict=False):
            assert e1 <= e2, f"CA {ca}: CRL {n2} reflects an older revocation epoch than {n1}"
            assert s1 <= s2, f"CA {ca}: CRL {n2} lacks entries of CRL {n1}: {s1 - s2}"
        inversions = [
            (n1, t1.isoformat(), n2, t2.isoformat())
            for (n1, *_, t1), (n2, *_, t2) in zip(rows, rows[1:], strict=False)
            if t2 < t1
        ]
        assert not inversions, f"CA {ca}: higher CRL number, earlier thisUpdate: {inversions[:3]}"
        for number, base, *_ in rows:
            if base is not None:
                assert base in {r[0] for r in full} and base < number
    assert not late_entries, (
        f"{len(late_entries)} CRL entries dated after their CRL's thisUpdate "
        f"(ca, number, thisUpdate, serial, revocationDate): {late_entries[:3]}"
    )
    stored = {(ca, r[0], r[1]) for ca, rows in by_ca.items() for r in rows}
    for ca, number, base in reported.crls:
        assert (ca, number, base) in stored, f"returned CRL {ca} #{number} is not stored"

    # the library's own verification agrees, and reports the interrupted signings as notes
    with hsm_ca.open_home(home, pin=USER_PIN) as authority:
        report = authority.audit.verify()
    assert report.ok, report.problem
    assert report.records == len(audit)
    intent_notes = [n for n in report.notes if "reserved by an intent" in n]
    if dangling:
        assert len(intent_notes) == 1 and intent_notes[0].startswith(f"{dangling} serial(s) "), (
            report.notes
        )
    else:
        assert intent_notes == [], report.notes
    return {
        "certificates": len(certs),
        "dangling_intents": dangling,
        "revoked": len(revoked_rows),
        "crls": len(crls),
        "audit": len(audit),
    }


def _cli_audit_verify(home: Path) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "hsm_ca", "--home", str(home), "audit", "verify"],
        capture_output=True,
        text=True,
        env=_env() | {"HSM_CA_PIN": USER_PIN},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Audit trail intact:"), r.stdout
    return r.stdout


# ----------------------------------------------------------- crash consistency


def _parse_driver_output(text: str, reported: Reported) -> bool:
    """Add one driver's printed results; True if it got as far as READY."""
    ready = False
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a line cut by the kill was not yet "returned" as far as we know
        parts = line.split()
        if parts == ["READY"]:
            ready = True
        elif parts[0] == "I":
            reported.issued.append(parts[1])
        elif parts[0] == "R":
            reported.revoked.append(parts[1])
        elif parts[0] == "C":
            reported.crls.append(
                (parts[1], int(parts[2]), None if parts[3] == "-" else int(parts[3]))
            )
        else:
            raise AssertionError(f"unexpected driver output {line!r}")
    return ready


def _wait_for_ready(out: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.read_bytes().startswith(b"READY\n"):
            return time.monotonic()
        if proc.poll() is not None:
            return time.monotonic()  # the caller reports the early exit
        time.sleep(0.002)
    raise AssertionError("driver never became ready")


def test_sigkill_at_random_instants_leaves_a_consistent_home(home: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("HSM_CA_DURABILITY_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    csrs = tmp_path / "csrs.json"
    reported = Reported()
    runs = tmp_path / "runs"
    runs.mkdir()
    reached_ready = 0
    for n in range(CRASH_KILLS):
        out, err = runs / f"{n}.out", runs / f"{n}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, str(DRIVER), "crash", str(home), str(csrs), str(seed + n)],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=_env(),
            )
        try:
            # Odd runs are timed from the spawn (so kills land in start-up, login and the
            # first operations too), even runs from READY (so most land mid-operation).
            start = time.monotonic() if n % 2 else _wait_for_ready(out, proc)
            time.sleep(max(0.0, start + rng.uniform(*CRASH_WINDOW) - time.monotonic()))
            early = proc.poll()
        finally:
            proc.kill()  # SIGKILL: no handler, no flush, no atexit
            proc.wait(timeout=30)
        assert early is None, (
            f"seed {seed}: driver {n} exited by itself ({early}) before it was killed:\n"
            + err.read_text()
        )
        assert proc.returncode == -signal.SIGKILL
        if _parse_driver_output(out.read_text(), reported):
            reached_ready += 1
        assert "Traceback" not in err.read_text(), err.read_text()

    # the home is still usable: one more driver finishes a few operations cleanly
    done = subprocess.run(
        [sys.executable, str(DRIVER), "crash", str(home), str(csrs), str(seed - 1), "30"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _parse_driver_output(done.stdout, reported)

    t_check = time.monotonic()
    counts = check_consistency(home, reported, one_writer=True)
    t_check = time.monotonic() - t_check
    assert reached_ready >= CRASH_KILLS // 2
    # kills did land between an intent's commit and its certificate's (the window that matters)
    assert counts["dangling_intents"] >= 1, counts
    assert reported.issued, "no driver got to issue anything"
    _cli_audit_verify(home)
    print(
        f"seed {seed}: {reached_ready} kills after READY, {len(reported.issued)} "
        f"certificates returned, {len(reported.revoked)} revocations, "
        f"{len(reported.crls)} CRLs; database: {counts}; checked in {t_check:.1f} s"
    )


def _helper_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"hsm_ca.engine.p11_helper" in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def test_sigkill_during_pipelined_pkcs11_batches_leaves_a_consistent_home(tmp_path: Path) -> None:
    """The PKCS#11 signing helper pipeline (parts in flight, one transaction per part)
    killed at random instants: same invariants, and no helper process left behind."""
    from conftest import new_softhsm_token, softhsm_module

    from hsm_ca.config import Pkcs11Settings

    seed = int(os.environ.get("HSM_CA_DURABILITY_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    home = tmp_path / "home"
    settings = Pkcs11Settings(module=softhsm_module(), token_label=new_softhsm_token())
    with hsm_ca.init_home(home, user_pin=USER_PIN, engine="pkcs11", pkcs11=settings,
                          scrypt_n=TEST_SCRYPT_N) as a:
        a.create_root("root", parse_dn("CN=Pipeline Root"))
        a.create_intermediate("issuing", "root", parse_dn("CN=Pipeline Issuing"),
                              key_type="rsa-2048", path_length=0)
    csrs = tmp_path / "csrs.json"
    csrs.write_text(json.dumps([make_csr(cn=f"p-{i}.example.com").decode() for i in range(200)]))
    before = _helper_pids()
    reported = Reported()
    for n in range(12):
        out = tmp_path / f"{n}.out"
        with out.open("wb") as fo:
            proc = subprocess.Popen(
                [sys.executable, str(DRIVER), "batches", str(home), str(csrs), str(seed + n)],
                stdout=fo, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env(),
            )
        try:
            start = _wait_for_ready(out, proc, timeout=60)
            time.sleep(max(0.0, start + rng.uniform(0.2, 1.5) - time.monotonic()))
            early = proc.poll()
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=30)
        assert early is None, f"seed {seed}: driver {n} exited by itself:\n{err.decode()}"
        _parse_driver_output(out.read_text(), reported)
    assert len(reported.issued) >= 80, f"seed {seed}: too little was issued to test anything"
    counts = check_consistency(home, reported, one_writer=True)
    _cli_audit_verify(home)
    deadline = time.monotonic() + 30
    while _helper_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)  # orphaned helpers see the end of their input and exit
    left = [pid for pid in _helper_pids() - before
            if "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()]
    assert left == [], f"signing helpers outlived their killed parents: {left}"
    print(f"seed {seed}: {len(reported.issued)} certificates returned; database: {counts}")


# ----------------------------------------------------------------- concurrency


def test_four_processes_at_once_all_succeed_and_add_up(home: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("HSM_CA_DURABILITY_SEED") or random.randrange(1 << 32))
    csrs = tmp_path / "csrs.json"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    conn = sqlite3.connect(f"file:{home / 'ca.db'}?mode=ro", uri=True)
    before_certs = conn.execute("SELECT count(*) FROM certificates").fetchone()[0]
    before_revoked = conn.execute(
        "SELECT count(*) FROM certificates WHERE status='revoked'"
    ).fetchone()[0]
    conn.close()

    procs = []
    for w in range(CONCURRENT_WORKERS):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(DRIVER),
                    "concurrent",
                    str(home),
                    str(csrs),
                    str(seed + w),
                    str(w),
                    str(CONCURRENT_OPS),
                    str(barrier),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=_env(),
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("ready-*"))) < CONCURRENT_WORKERS:
            assert all(p.poll() is None for p in procs), "a worker died before the barrier"
            assert time.monotonic() < deadline, "workers never reached the barrier"
            time.sleep(0.005)
        (barrier / "go").touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failures = [
        (w, p.returncode, err)
        for w, (p, (_, err)) in enumerate(zip(procs, results, strict=True))
        if p.returncode != 0 or err.strip()
    ]
    assert not failures, f"seed {seed}: workers failed: {failures}"
    reports = [json.loads(out) for out, _ in results]

    reported = Reported()
    per_ca: dict[str, list[int]] = defaultdict(list)
    for rep in reports:
        reported.issued += rep["issued"]
        reported.revoked += rep["revoked"]
        mine: dict[str, list[int]] = defaultdict(list)
        for ca, number, base in rep["crls"]:
            reported.crls.append((ca, number, base))
            mine[ca].append(number)
            per_ca[ca].append(number)
        for ca, numbers in mine.items():  # what one process gets only ever goes up
            assert numbers == sorted(set(numbers)), (rep["worker"], ca, numbers)
    for ca, numbers in per_ca.items():
        assert len(numbers) == len(set(numbers)), f"CA {ca}: a CRL number handed out twice"
    assert len(set(reported.issued)) == len(reported.issued), "a serial handed out twice"
    assert set(reported.revoked) <= set(reported.issued)

    counts = check_consistency(home, reported, one_writer=False)
    # the counts add up exactly: nothing lost, nothing extra
    assert counts["certificates"] - before_certs == len(reported.issued)
    assert counts["revoked"] - before_revoked == len(reported.revoked)
    assert counts["dangling_intents"] == 0
    conn = sqlite3.connect(f"file:{home / 'ca.db'}?mode=ro", uri=True)
    try:
        issued_records = conn.execute(
            "SELECT count(*) FROM audit WHERE action='issue' AND outcome='issued'"
        ).fetchone()[0]
        assert issued_records == counts["certificates"]
        for ca, numbers in per_ca.items():
            stored = [
                r[0]
                for r in conn.execute("SELECT number FROM crls WHERE ca=? ORDER BY number", (ca,))
            ]
            # no crash here, so no gaps: exactly the numbers the workers were handed, each
            # reserved once (one intent record each), the counter at the highest of them
            assert stored == sorted(numbers) == sorted(set(numbers)), ca
            reserved = sorted(
                int(detail.split("CRL number ", 1)[1].split(";", 1)[0])
                for (detail,) in conn.execute(
                    "SELECT detail FROM audit WHERE action='crl' AND outcome='intent' AND ca=?",
                    (ca,),
                )
            )
            assert reserved == stored, ca
            counter = conn.execute("SELECT crl_number FROM cas WHERE name=?", (ca,)).fetchone()[0]
            assert counter == stored[-1]
    finally:
        conn.close()
    assert sum(len(r["issued"]) for r in reports) >= CONCURRENT_WORKERS * CONCURRENT_OPS // 2


def test_a_crl_that_waited_for_the_lock_is_not_dated_before_its_predecessor(home: Path) -> None:
    """The race the four-process test runs into now and then, made deterministic.

    B starts signing a CRL and queues on the write lock; meanwhile A revokes a
    certificate and signs a CRL in a later second. B's CRL gets the next number
    and lists A's revocation, so it must not claim an earlier thisUpdate than
    A's CRL, nor predate the revocation it lists.
    """
    with hsm_ca.open_home(home, pin=USER_PIN) as a:
        serial = a.ca("issuing").issue(make_csr(cn="race.example.com"), "tls-client").serial
        a.engine()
        logged_in, go, queued = threading.Event(), threading.Event(), threading.Event()
        result: dict[str, Any] = {}

        def other_process() -> None:  # its own connection, as another process would have
            try:
                with hsm_ca.open_home(home, pin=USER_PIN) as b:
                    b.engine()  # logged in beforehand, so its next write is the CRL's

                    def trace(sql: str) -> None:
                        # sign_crl reads the CA row, takes the time, then asks for the lock
                        # (a statement is traced once it has the lock, so not BEGIN itself)
                        if "FROM cas WHERE" in sql:
                            queued.set()

                    b.store.conn.set_trace_callback(trace)
                    logged_in.set()
                    go.wait(30)
                    result["crl"] = b.crl("issuing")
            except BaseException as e:  # reported by the main thread
                result["error"] = e
                logged_in.set()

        thread = threading.Thread(target=other_process)
        thread.start()
        try:
            assert logged_in.wait(30)
            with a.store.transaction():  # A holds the write lock
                go.set()
                assert queued.wait(30), "the other signer never started"
                time.sleep(0.3)  # it has taken the time and waits for the lock now
                time.sleep(1.05 - time.time() % 1)  # into the next second
                a.revoke(serial, "keyCompromise")
                mine = a.crl("issuing")
        finally:
            go.set()
            thread.join(60)
    assert "error" not in result, result.get("error")
    theirs = result["crl"]
    assert theirs.number > mine.number  # the next number: reserved after A's, under the lock
    revoked = {r.serial_number: r.revocation_date_utc for r in theirs.crl}
    assert int(serial, 16) in revoked
    problems = []
    if theirs.crl.last_update_utc < mine.crl.last_update_utc:
        problems.append(
            f"CRL {theirs.number} has thisUpdate {theirs.crl.last_update_utc}, before "
            f"CRL {mine.number}'s {mine.crl.last_update_utc}"
        )
    if revoked[int(serial, 16)] > theirs.crl.last_update_utc:
        problems.append(
            f"CRL {theirs.number} (thisUpdate {theirs.crl.last_update_utc}) lists a revocation "
            f"dated {revoked[int(serial, 16)]}"
        )
    assert not problems, "; ".join(problems)
