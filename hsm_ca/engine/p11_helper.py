"""A signing helper process for the PKCS#11 engine.

Why a process: python-pkcs11 holds the GIL for the whole of ``C_Sign`` (measured
with 0.10.1), so a signing thread cannot overlap the Python work of issuance
(CSR checks, building, audit, commits). A second process with its own logged-in
session can: the CA process builds certificate *k+1* and stores *k-1* while the
helper's token call signs *k*. The helper holds nothing but a session; the key
stays on the token.

Protocol on the helper's stdin/stdout (binary frames, nothing else is written):

- hello, once: ``>I`` length + JSON ``{"settings", "user", "pin", "label"}``.
  The PIN travels over this pipe, never on argv or in the environment.
- answer to hello: a response frame with an empty payload (logged in, key found)
  or an error.
- request: ``>IBBH`` (data length, hash code, padding code, PSS salt length) + data.
- response: ``>BI`` (status 0 = signature, 1 = error text) + payload.

The helper exits on end of input, which is also what happens when the CA
process dies, so no helper outlives its parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import subprocess
import sys
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from hsm_ca.errors import EngineError

_REQUEST = struct.Struct(">IBBH")
_RESPONSE = struct.Struct(">BI")
_HELLO = struct.Struct(">I")
HASHES: dict[int, Any] = {0: None, 1: hashes.SHA256, 2: hashes.SHA384, 3: hashes.SHA512}
HASH_CODES = {None: 0, "sha256": 1, "sha384": 2, "sha512": 3}
PAD_NONE, PAD_PKCS1, PAD_PSS = 0, 1, 2
MAX_FRAME = 64 * 1024 * 1024
ANSWER_TIMEOUT = 300.0  # seconds a signature may take before the helper is given up


class HelperGone(EngineError):
    """The helper process stopped answering; the caller signs in-process instead."""


def encode_request(data: bytes, algorithm: Any, padding_: Any) -> bytes:
    """Frame one signing request; refuses what the helper could not reproduce exactly."""
    name = None if algorithm is None else algorithm.name
    if name not in HASH_CODES:
        raise EngineError(f"the signing helper does not handle {name}")
    if padding_ is None:
        pad, salt = PAD_NONE, 0
    elif isinstance(padding_, padding.PKCS1v15):
        pad, salt = PAD_PKCS1, 0
    elif isinstance(padding_, padding.PSS) and isinstance(padding_._salt_length, int):
        pad, salt = PAD_PSS, padding_._salt_length
    else:
        raise EngineError("the signing helper handles PKCS#1 v1.5 and fixed-salt PSS only")
    return _REQUEST.pack(len(data), HASH_CODES[name], pad, salt) + data


def _decode_request(header: bytes) -> tuple[int, Any, Any]:
    n, hcode, pad, salt = _REQUEST.unpack(header)
    hash_cls = HASHES.get(hcode)
    algorithm = hash_cls() if hash_cls is not None else None
    if pad == PAD_PKCS1:
        padding_: Any = padding.PKCS1v15()
    elif pad == PAD_PSS and algorithm is not None:
        padding_ = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=salt)
    else:
        padding_ = None
    return n, algorithm, padding_


class SigningHelper:
    """The CA side of one helper process, for one key.

    ``submit`` never waits for the token; ``result`` returns signatures in
    submission order. Any failure of the process (exit, garbage, timeout) is
    raised as ``HelperGone`` and the helper is not used again.
    """

    def __init__(self, settings: dict[str, Any], user: str, pin: str, label: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_CA_")}
        self.label = label
        self.broken: str | None = None
        self._buf = bytearray()
        self._pending = 0
        self._ready = False
        self.signed = 0  # signatures delivered (for tests and diagnostics)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hsm_ca.engine.p11_helper"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True, env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in = self._proc.stdin.fileno()
        self._out = self._proc.stdout.fileno()
        hello = json.dumps({"settings": settings, "user": user, "pin": pin, "label": label}).encode()
        self._write(_HELLO.pack(len(hello)) + hello)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def ready(self, wait: float = 0.0) -> bool:
        """True once the helper has logged in and found the key (never blocks past ``wait``)."""
        if self._ready:
            return True
        if self.broken is not None:
            return False
        try:
            if not self._buf and not select.select([self._out], [], [], wait)[0]:
                return False
            self._read_response(time.monotonic() + ANSWER_TIMEOUT)
        except HelperGone:
            return False
        except EngineError as e:  # the helper could not log in or find the key
            self._fail(str(e))
            return False
        self._ready = True
        return True

    def submit(self, data: bytes, algorithm: Any, padding_: Any) -> None:
        frame = encode_request(data, algorithm, padding_)
        self._write(frame)
        self._pending += 1

    def result(self) -> bytes:
        """The next signature in submission order; EngineError for a token refusal."""
        if self._pending <= 0:
            raise EngineError("no signature requested from the signing helper")
        self._pending -= 1
        signature = self._read_response(time.monotonic() + ANSWER_TIMEOUT)
        self.signed += 1
        return signature

    def discard(self) -> None:
        """Read and drop the answers still due (after an error cut a batch short)."""
        while self._pending > 0:
            try:
                self.result()
            except HelperGone:
                self._pending = 0
            except EngineError:
                continue

    def close(self) -> None:
        """End input (the helper logs out and exits), then make sure it has."""
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        with contextlib.suppress(OSError):
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self.broken is None:
            self.broken = "closed"

    # ------------------------------------------------------------ plumbing
    def _fail(self, why: str) -> HelperGone:
        if self.broken is None:
            self.broken = why
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
        return HelperGone(f"signing helper (pid {self._proc.pid}) {self.broken}")

    def _write(self, frame: bytes) -> None:
        if self.broken is not None:
            raise HelperGone(f"signing helper {self.broken}")
        view = memoryview(frame)
        try:
            while view:
                view = view[os.write(self._in, view):]
        except OSError as e:
            raise self._fail(f"stopped reading ({e.strerror})") from e

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                raise self._fail("did not answer in time")
            try:
                chunk = os.read(self._out, 1 << 16)
            except OSError as e:
                raise self._fail(f"cannot be read ({e.strerror})") from e
            if not chunk:
                code = self._proc.poll()
                raise self._fail(f"exited (code {code})" if code is not None else "closed its output")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read_response(self, deadline: float) -> bytes:
        if self.broken is not None:
            raise HelperGone(f"signing helper {self.broken}")
        status, n = _RESPONSE.unpack(self._read_exact(_RESPONSE.size, deadline))
        if n > MAX_FRAME or status not in (0, 1):
            raise self._fail("sent a malformed answer")
        payload = self._read_exact(n, deadline)
        if status == 1:
            raise EngineError(payload.decode(errors="replace"))
        return payload


# ------------------------------------------------------------- helper side
def _serve(inp: Any, out: Any) -> int:
    def respond(status: int, payload: bytes) -> None:
        out.write(_RESPONSE.pack(status, len(payload)) + payload)
        out.flush()

    def read_exact(n: int) -> bytes | None:
        data = inp.read(n)
        if len(data) < n:
            return None
        return bytes(data)

    head = read_exact(_HELLO.size)
    if head is None:
        return 0
    (n,) = _HELLO.unpack(head)
    body = read_exact(n) if n <= MAX_FRAME else None
    if body is None:
        return 2
    from hsm_ca.config import Pkcs11Settings
    from hsm_ca.engine.pkcs11 import Pkcs11Engine
    from hsm_ca.errors import HsmCaError

    hello = json.loads(body)
    engine = None
    try:
        engine = Pkcs11Engine(Pkcs11Settings(**hello.pop("settings")))
        engine.login(hello.pop("user"), hello.pop("pin"))
        handle = engine.get_key(hello.pop("label"))
    except HsmCaError as e:
        respond(1, str(e).encode())
        if engine is not None:
            engine.close()
        return 1
    respond(0, b"")
    try:
        while True:
            header = read_exact(_REQUEST.size)
            if header is None:
                return 0
            n, algorithm, padding_ = _decode_request(header)
            data = read_exact(n) if n <= MAX_FRAME else None
            if data is None:
                return 2
            try:
                respond(0, handle.sign(data, algorithm, padding_))
            except HsmCaError as e:
                respond(1, str(e).encode())
    except BrokenPipeError:
        return 0
    finally:
        engine.close()


def main() -> int:
    """Entry point of ``python -m hsm_ca.engine.p11_helper`` (started by SigningHelper only)."""
    out = os.fdopen(os.dup(1), "wb")
    # nothing but frames may reach the CA process: stray prints go nowhere
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    inp = os.fdopen(os.dup(0), "rb")
    try:
        return _serve(inp, out)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
