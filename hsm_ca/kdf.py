"""scrypt for PINs, with its parameters bounded before they are used.

The built-in engine stores its KDF parameters in the keystore header, and the
early derivation (prelogin.py) reads them before anything is authenticated.
Whoever can edit that file must not be able to make a command allocate
gigabytes or spin for minutes, or make OpenSSL fail with its own message, so
every derivation checks the parameters here first. Only the standard library
is imported: prelogin runs this before click and cryptography are loaded.
"""

from __future__ import annotations

import hashlib

MIN_N = 2**10
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
# 128 * n * r bytes of scrypt memory, times p for its work: 256 MiB is n = 2**18 at r = 8,
# about a second of one core
MAX_WORK = 256 * 1024 * 1024
# A backup leaves the CA host and is attacked offline, with no lockout and no file
# permissions in the way: its KDF never costs less than a production keystore's
# (keystore.DEFAULT_SCRYPT_N). MIN_N stays lower because 'init --scrypt-n' may make a
# cheap keystore for tests; a backup's cost is its own, chosen by 'hsm backup', so a
# backup of such a test home is still made (and accepted) only at this cost or more.
MIN_BACKUP_N = 2**14


def scrypt_problem(n: object, r: object, p: object) -> str | None:
    """Why (n, r, p) are not acceptable scrypt parameters for a PIN, or None if they are."""
    for name, value in (("n", n), ("r", r), ("p", p)):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"scrypt {name} is not an integer"
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if n < MIN_N or n > MAX_N or n & (n - 1):
        return f"scrypt n={n} is not a power of two from {MIN_N} to {MAX_N}"
    if not 1 <= r <= MAX_R:
        return f"scrypt r={r} is not from 1 to {MAX_R}"
    if not 1 <= p <= MAX_P:
        return f"scrypt p={p} is not from 1 to {MAX_P}"
    if n >= 1 << (16 * r):  # RFC 7914: n < 2**(128 * r / 8)
        return f"scrypt n={n} is too large for r={r}"
    if 128 * n * r * p > MAX_WORK:
        return f"scrypt n={n}, r={r}, p={p} would need more than {MAX_WORK >> 20} MiB of work"
    return None


def derive(pin: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The 32-byte key for ``pin``; ValueError (naming the bound) for parameters out of range."""
    problem = scrypt_problem(n, r, p)
    if problem is not None:
        raise ValueError(problem)
    # OpenSSL counts V (128 * r * (n + 2) bytes) and B (128 * r * p) against maxmem, with
    # some slack of its own; the bound above is what keeps this small
    maxmem = 2 * 128 * r * (n + 2 + p) + (1 << 20)
    return hashlib.scrypt(pin.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=32)
