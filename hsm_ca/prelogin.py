"""Start the PIN key derivation early, on another core, while the CLI is still importing.

scrypt releases the GIL, so a one-shot command can derive the user's key
while Python loads cryptography and checks the CSR, instead of after. The
derivation runs on the keystore's KDF parameters *as read*, unauthenticated;
login authenticates the keystore first and uses the early result only when
salt and parameters match exactly, so a forged file can at worst waste the
early work. Only the standard library is imported here, to start at once.

What the thread computes is only the key-encryption key; the verdict on the
PIN (does that key unwrap the master key?) is reached in login, after the
attempt has been counted under the keystore lock, so starting early never lets
a guess be judged without counting. The thread is not a daemon: the
interpreter waits for it before finalising, because exiting while scrypt runs
inside OpenSSL lets libcrypto's exit handlers free what the thread still uses
(a segfault, exit 139, seen under load on commands that fail fast). Nothing
it meets, however malformed the header, is printed: login reports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from pathlib import Path

from hsm_ca import kdf

_JOBS: dict[tuple[bytes, int, int, int, bytes], threading.Thread] = {}
_RESULTS: dict[tuple[bytes, int, int, int, bytes], bytes] = {}


def _key(salt: bytes, n: int, r: int, p: int, pin: str) -> tuple[bytes, int, int, int, bytes]:
    return salt, n, r, p, hashlib.sha256(pin.encode("utf-8")).digest()


def start(partition: Path, user: str, pin: str) -> None:
    """Begin deriving ``user``'s key-encryption key in a background thread (best effort)."""
    from hsm_ca.errors import HsmCaError
    from hsm_ca.fileio import KEYSTORE_BYTES, read_regular_file

    try:  # bounded, never a FIFO: this runs on the main thread before anything else
        raw = read_regular_file(Path(partition) / "keystore", KEYSTORE_BYTES, "HSM keystore")
    except HsmCaError:
        return  # login will find and report whatever is wrong
    try:
        body = raw.split(b"\n", 1)[0]
        state = json.loads(body)
        params = state["kdf"]
        salt = base64.b64decode(state["users"][user]["salt"])
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return  # login will find and report whatever is wrong
    if kdf.scrypt_problem(n, r, p) is not None:  # an unauthenticated header picks no cost
        return
    key = _key(salt, n, r, p, pin)
    if key in _JOBS:
        return

    def run() -> None:
        try:
            _RESULTS[key] = kdf.derive(pin, salt, n, r, p)
        except BaseException:  # noqa: BLE001 - login derives again and reports the problem
            return

    # not a daemon: interpreter exit waits for it (see the module docstring)
    job = threading.Thread(target=run, name="hsm-ca-kdf", daemon=False)
    _JOBS[key] = job
    job.start()


def take(salt: bytes, n: int, r: int, p: int, pin: str) -> bytes | None:
    """The early result for exactly these inputs (waiting for it if still running), once."""
    key = _key(salt, n, r, p, pin)
    job = _JOBS.pop(key, None)
    if job is None:
        return None
    job.join()
    return _RESULTS.pop(key, None)


# commands (and, for groups, subcommands) that log in to the engine as the crypto user;
# others must not spend a core on a derivation nobody will use
_KEY_COMMANDS: dict[str, set[str] | None] = {
    "sign": None, "crl": None, "serve": None, "bootstrap": None,
    "ca": {"create-root", "create-intermediate", "ocsp-responder"},
    "codesign": {"new-signer", "sign"},
    "tsa": {"create"},
    "audit": {"checkpoint", "cert", "export"},
}


def start_from_argv(argv: list[str], environ: dict[str, str]) -> None:
    """Begin the derivation at process start, before click and cryptography are imported.

    Only the cheapest cases: the PIN in ``$HSM_CA_PIN`` and a built-in-engine
    home. Anything unusual is left to the normal login.
    """
    pin = environ.get("HSM_CA_PIN")
    if not pin or "--pin-file" in argv or "-h" in argv or "--help" in argv:
        return
    home = environ.get("HSM_CA_HOME") or str(Path("~/.hsm-ca").expanduser())
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2:
        arg = argv[i]
        if arg == "--home" and i + 1 < len(argv):
            home = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--home="):
            home = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            words.append(arg)
        i += 1
    if not words or words[0] not in _KEY_COMMANDS:
        return
    subcommands = _KEY_COMMANDS[words[0]]
    if subcommands is not None and (len(words) < 2 or words[1] not in subcommands):
        return
    from hsm_ca.config import read_toml
    from hsm_ca.errors import HsmCaError

    # the CLI's own reader: bounded, never a FIFO, and linear in the file (tomllib alone takes
    # hours on a long dotted key); anything odd is left to the CLI to report
    try:
        config, _text = read_toml(Path(home).expanduser() / "hsm-ca.toml")
    except HsmCaError:
        return
    if config.get("engine", "soft") != "soft":
        return
    user = environ.get("HSM_CA_USER") or config.get("user") or "crypto-user"
    if isinstance(user, str):
        start(Path(home).expanduser() / "hsm", user, pin)
