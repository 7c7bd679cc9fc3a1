#!/usr/bin/env python3
"""Hand-made mutants of the guards that keep verifiers honest; outside the default suite.

    python scripts/mutants.py            # every mutant, against the tests that guard it
    python scripts/mutants.py -k ocsp    # only mutants whose name contains "ocsp"

Each mutant breaks one guard (one line replaced) in a copy of the package, runs
the named tests against the copy, and counts the mutant killed when they fail.
A surviving mutant is a guard no test protects: the script exits 1 naming it.
Mutants are written by hand, one per guard, rather than generated (a generic
mutation tool spends its time on log messages and docstrings); add one next to
every new guard.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE_TESTS = ["tests/test_trail_state.py"]
AUDIT_TESTS = ["tests/test_audit.py", "tests/test_audit_splices.py", "tests/test_guards.py"]
KEYSTORE_TESTS = ["tests/test_engine.py", "tests/test_engine_hardening.py",
                  "tests/test_hsm_admin.py"]
KS = "hsm_ca/engine/soft/keystore.py"

# (name, file, exact text, replacement, tests)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    ("verify: revocation must agree", "hsm_ca/trailstate.py",
     "if status != \"revoked\" or rev.ca != ca or \\\n                        not rev.agrees(",
     "if False and \\\n                        not rev.agrees(", STATE_TESTS),
    ("verify: unrevoked row", "hsm_ca/trailstate.py",
     "elif status != \"valid\" or revoked_at is not None or reason is not None:\n                return (f\"certificate {serial} is {status} in the database",
     "elif False:\n                return (f\"certificate {serial} is {status} in the database",
     STATE_TESTS),
    ("verify: certificate signature", "hsm_ca/trailstate.py",
     "            if problem is not None:\n                return f\"certificate {serial}: {problem}; its CA never signed it\", checked",
     "            if False:\n                return f\"certificate {serial}: {problem}; its CA never signed it\", checked",
     STATE_TESTS),
    ("verify: swapped CA certificate", "hsm_ca/trailstate.py",
     "if serial in ca_serials and ca_serials[serial] != pem:",
     "if False:", STATE_TESTS),
    ("agrees: reason compared", "hsm_ca/trailstate.py",
     "if reason != self.reason or invalidity_date != self.invalidity_date or revoked_at is None:",
     "if invalidity_date != self.invalidity_date or revoked_at is None:", STATE_TESTS),
    ("agrees: invalidity compared", "hsm_ca/trailstate.py",
     "if reason != self.reason or invalidity_date != self.invalidity_date or revoked_at is None:",
     "if reason != self.reason or revoked_at is None:", STATE_TESTS),
    ("agrees: time compared", "hsm_ca/trailstate.py",
     "return revoked_at == self.revoked_at", "return True", STATE_TESTS),
    ("crl: digest compared", "hsm_ca/trailstate.py",
     "if kept_digest != (count, digest):", "if False:", STATE_TESTS),
    ("crl: tail revocation must agree", "hsm_ca/trailstate.py",
     "elif not rev.agrees(revoked_at, reason, invalidity):\n                raise Tampered(f\"certificate {serial} of CA",
     "elif False:\n                raise Tampered(f\"certificate {serial} of CA", STATE_TESTS),
    ("crl: tail revocation must have a row", "hsm_ca/trailstate.py",
     "        if since:\n            serial = min(since)", "        if False:\n            serial = min(since)",
     STATE_TESTS),
    ("crl: base must be signed", "hsm_ca/trailstate.py",
     "if walked[0].checkpoints:", "if True:", STATE_TESTS),
    ("checkpoint: issued row matches", "hsm_ca/trailstate.py",
     "if ca != rec_ca or sha != rec_sha or pem_sha256(pem) != sha:", "if False:", STATE_TESTS),
    ("checkpoint: certificate signature", "hsm_ca/trailstate.py",
     "                if problem is not None:\n                    raise Tampered(f\"certificate {serial}: {problem}; the CA never signed it\")",
     "                if False:\n                    raise Tampered(f\"certificate {serial}: {problem}; the CA never signed it\")",
     STATE_TESTS),
    ("checkpoint: CA key is the HSM's", "hsm_ca/authority.py",
     "if _spki(held) != _spki(cert.public_key()):", "if False:", STATE_TESTS),
    ("checkpoint: proof before signing", "hsm_ca/authority.py",
     "                check_since_checkpoint(self.store, handle.public_key(), self.issuer_checker(),\n                                       known=self._vouched)",
     "                pass", STATE_TESTS),
    ("ocsp: row must agree with a revocation", "hsm_ca/ocsp.py",
     "if status_row[\"status\"] != \"revoked\" or not rev.agrees(",
     "if False and not rev.agrees(", STATE_TESTS),
    ("ocsp: revoked row without a record", "hsm_ca/ocsp.py",
     "elif status_row[\"status\"] != \"valid\":", "elif False:", STATE_TESTS),
    ("ocsp: good needs a genuine certificate", "hsm_ca/ocsp.py",
     "elif not self._genuine(signer.ca, status_row, serial):", "elif False:", STATE_TESTS),
    ("ocsp: follows the trail", "hsm_ca/trailstate.py",
     "        if rev.ca == view.ca:\n            view.revoked[serial] = rev",
     "        if False:\n            view.revoked[serial] = rev", STATE_TESTS),
    ("ocsp: a full cache sweeps dead answers", "hsm_ca/ocsp.py",
     "                and now_mono >= self._next_sweep:", "                and False:",
     ["tests/test_ocsp.py"]),
    # ---------------------------------------------------------------- audit (issue 13)
    ("audit: chain value checked", "hsm_ca/audit.py",
     "if chain_value(prev, record) != record[\"chain\"]:", "if False:", AUDIT_TESTS),
    ("audit: checkpoint signs its own position", "hsm_ca/audit.py",
     "if seq != record[\"seq\"] - 1:", "if False:", AUDIT_TESTS),
    ("audit: checkpoint signs the chain before it", "hsm_ca/audit.py",
     "if chain != prev_chain:", "if False:", AUDIT_TESTS),
    ("audit: checkpoint of this trail", "hsm_ca/audit.py",
     "if walk.trail is not None and trail != walk.trail:", "if False:", AUDIT_TESTS),
    ("audit: anchors", "hsm_ca/audit.py",
     "if seq in anchors and anchors.pop(seq) != record[\"chain\"]:",
     "if seq in anchors and anchors.pop(seq) and False:", AUDIT_TESTS),
    ("audit: export ends signed", "hsm_ca/audit.py",
     "    if count > walk.last_checkpoint:\n        return AuditReport(",
     "    if False:\n        return AuditReport(", AUDIT_TESTS),
    ("audit: export checkpoint reason", "hsm_ca/audit.py",
     "if info.get(\"reason\") != EXPORT_REASON:", "if False:", AUDIT_TESTS),
    ("audit: duplicate keys", "hsm_ca/audit.py",
     "        if key in record:\n            raise ValueError", "        if False:\n            raise ValueError",
     AUDIT_TESTS),
    # ------------------------------------------------------------- keystore (issue 13)
    ("keystore: MAC checked", KS,
     "        if not hmac.compare_digest(mac, expected):\n            raise Tampered(f\"HSM keystore",
     "        if False:\n            raise Tampered(f\"HSM keystore", KEYSTORE_TESTS),
    ("keystore: locked user refused", KS,
     "if frec[\"locked\"] or frec[\"failed_logins\"] >= MAX_FAILED_LOGINS:",
     "if frec[\"failed_logins\"] > MAX_FAILED_LOGINS:", KEYSTORE_TESTS),
    ("keystore: lockout set", KS,
     "                    if frec[\"failed_logins\"] >= MAX_FAILED_LOGINS:\n                        frec[\"locked\"] = True",
     "                    if False:\n                        frec[\"locked\"] = True", KEYSTORE_TESTS),
    ("keystore: attempt noted before it is judged", KS,
     "journal.mark(user)  # the attempt is noted before it is judged", "pass", KEYSTORE_TESTS),
    ("crl: proven rows are signed", "hsm_ca/revocation.py",
     "            view = verified_revocations(store, ca_name, audit_key)",
     "            view = None\n            raise Tampered('x')", STATE_TESTS),
]


def run(name: str, path: str, old: str, new: str, tests: list[str], work: Path) -> bool:
    """True if the tests kill the mutant (fail with the guard broken)."""
    target = work / path
    original = (ROOT / path).read_text()
    if original.count(old) != 1:
        raise SystemExit(f"mutant {name!r}: its text occurs {original.count(old)} times in {path}")
    target.write_text(original.replace(old, new))
    try:
        p = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=work, capture_output=True, text=True, timeout=1200,
            env={**__import__("os").environ, "PYTHONPATH": str(work)},
        )
    finally:
        target.write_text(original)
    return p.returncode != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k in m[0]]
    work = Path(tempfile.mkdtemp(prefix="hsm-ca-mutants-"))
    try:
        for part in ("hsm_ca", "tests", "profiles", "scripts", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / part)
        survived = []
        t0 = time.perf_counter()
        for name, path, old, new, tests in chosen:
            killed = run(name, path, old, new, tests, work)
            print(f"{'killed  ' if killed else 'SURVIVED'} {name}", flush=True)
            if not killed:
                survived.append(name)
        score = len(chosen) - len(survived)
        print(f"{score}/{len(chosen)} mutants killed in {time.perf_counter() - t0:.0f}s")
        return 1 if survived else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
