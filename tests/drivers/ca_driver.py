"""A CA client run as a separate process by tests/test_durability.py.

Two modes, both on an existing home with a root CA ``root`` and an issuing CA
``issuing``:

``crash HOME CSRS SEED [MAX_OPS]``
    Issue (single CSRs and batches of five), revoke and sign CRLs in a loop
    until killed (or until MAX_OPS operations). Every result is printed, and
    flushed, only after the library call returned it, so the test knows exactly
    what was handed back to a caller:

        READY                      logged in, about to start
        I <serial>                 certificate issued
        R <serial>                 certificate revoked
        C <ca> <number> <base|->   CRL signed (base is the delta CRL's base)

``batches HOME CSRS SEED``
    Like ``crash`` but issuing batches large enough for the PKCS#11 signing
    helper (80 CSRs), with a revocation now and then; same output lines.

``concurrent HOME CSRS SEED WORKER OPS BARRIER_DIR``
    Wait until BARRIER_DIR/go exists (after creating BARRIER_DIR/ready-WORKER),
    then do OPS operations and print one JSON object: what it issued, revoked
    and which CRL numbers it got. Any exception ends the process with a
    traceback (the test treats that as a failure).

CSRS is a JSON list of PEM CSR strings, made by the test, so no key is
generated here.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import hsm_ca
from hsm_ca.authority import Refusal

PIN = "user-pin-1234"  # tests/conftest.py USER_PIN


def _issue(authority, rng, csrs, count):
    batch = [(f"csr-{i}", csrs[i].encode()) for i in rng.sample(range(len(csrs)), count)]
    results = authority.sign_csrs("issuing", batch, "tls-client")
    refused = [r for r in results if isinstance(r, Refusal)]
    if refused or len(results) != count:
        raise SystemExit(f"unexpected refusal: {[r.as_dict() for r in refused]}")
    return [r.serial for r in results]


def crash(home: str, csrs_path: str, seed: int, max_ops: int | None) -> None:
    csrs = json.loads(Path(csrs_path).read_text())
    rng = random.Random(seed)
    authority = hsm_ca.open_home(home, pin=PIN)
    authority.engine()  # log in now, so READY means "operations start"
    out = sys.stdout

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    say("READY")
    own: list[str] = []
    ops = 0
    while max_ops is None or ops < max_ops:
        ops += 1
        r = rng.random()
        if r < 0.40:
            serials = _issue(authority, rng, csrs, 1)
        elif r < 0.65:
            serials = _issue(authority, rng, csrs, 5)
        elif r < 0.80:
            # revoke one of ours, or one left valid by an earlier (killed) driver
            if own and rng.random() < 0.7:
                serial = own.pop(rng.randrange(len(own)))
            else:
                row = authority.store.conn.execute(
                    "SELECT serial FROM certificates WHERE ca='issuing' AND status='valid' "
                    "AND profile='tls-client' ORDER BY random() LIMIT 1"
                ).fetchone()
                if row is None:
                    continue
                serial = row[0]
                if serial in own:
                    own.remove(serial)
            result = authority.revoke(serial, rng.choice(["unspecified", "keyCompromise"]))
            say(f"R {result.serial}")
            continue
        else:
            ca = "root" if rng.random() < 0.2 else "issuing"
            delta = (
                ca == "issuing"
                and rng.random() < 0.3
                and authority.store.latest_crl(ca) is not None
            )
            crl = authority.crl(ca, delta=delta)
            say(f"C {crl.ca} {crl.number} {crl.delta_base if crl.delta_base is not None else '-'}")
            continue
        for s in serials:
            say(f"I {s}")
        own.extend(serials)


def batches(home: str, csrs_path: str, seed: int) -> None:
    csrs = json.loads(Path(csrs_path).read_text())
    rng = random.Random(seed)
    authority = hsm_ca.open_home(home, pin=PIN)
    authority.engine()
    print("READY", flush=True)
    own: list[str] = []
    while True:
        if own and rng.random() < 0.2:
            result = authority.revoke(own.pop(rng.randrange(len(own))), "superseded")
            print(f"R {result.serial}", flush=True)
            continue
        serials = _issue(authority, rng, csrs, 80)
        print("".join(f"I {s}\n" for s in serials), end="", flush=True)
        own.extend(serials)


def concurrent(home: str, csrs_path: str, seed: int, worker: int, ops: int, barrier: str) -> None:
    csrs = json.loads(Path(csrs_path).read_text())
    rng = random.Random(seed)
    barrier_dir = Path(barrier)
    (barrier_dir / f"ready-{worker}").touch()
    deadline = time.monotonic() + 60
    while not (barrier_dir / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("barrier never opened")
        time.sleep(0.002)
    # opening the home and logging in are part of the contention on purpose
    authority = hsm_ca.open_home(home, pin=PIN)
    issued: list[str] = []
    revoked: list[str] = []
    crls: list[list] = []  # [ca, number, base or None], in the order this worker got them
    valid: list[str] = []
    have_full = False
    for _ in range(ops):
        r = rng.random()
        if r < 0.6 or (r < 0.8 and not valid):
            serials = _issue(authority, rng, csrs, 1 if rng.random() < 0.75 else 3)
            issued.extend(serials)
            valid.extend(serials)
        elif r < 0.8:
            serial = valid.pop(rng.randrange(len(valid)))
            revoked.append(authority.revoke(serial, "superseded").serial)
        else:
            ca = "root" if rng.random() < 0.25 else "issuing"
            delta = ca == "issuing" and have_full and rng.random() < 0.4
            crl = authority.crl(ca, delta=delta)
            have_full = have_full or (ca == "issuing" and not delta)
            crls.append([crl.ca, crl.number, crl.delta_base])
    authority.close()
    print(json.dumps({"worker": worker, "issued": issued, "revoked": revoked, "crls": crls}))


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "crash":
        crash(argv[1], argv[2], int(argv[3]), int(argv[4]) if len(argv) > 4 else None)
    elif mode == "batches":
        batches(argv[1], argv[2], int(argv[3]))
    elif mode == "concurrent":
        concurrent(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]), argv[6])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
