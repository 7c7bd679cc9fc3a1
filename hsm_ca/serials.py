"""Certificate and CRL serial numbers.

CA/Browser Forum rules want at least 64 bits from a CSPRNG; we draw 127 so the
DER INTEGER stays positive and well under RFC 5280's 20-octet limit, and the
store's UNIQUE constraint turns the astronomically unlikely collision into a
redraw rather than a duplicate.
"""

from __future__ import annotations

import secrets

from hsm_ca.errors import UsageError

SERIAL_BITS = 127


def new_serial() -> int:
    """A positive serial with SERIAL_BITS random bits (never zero)."""
    while True:
        n = secrets.randbits(SERIAL_BITS)
        if n >= 1 << 63:  # keep at least 64 significant bits
            return n


def format_serial(n: int) -> str:
    """Serials are lowercase hex without separators or leading zeros, everywhere."""
    return format(n, "x")


def parse_serial(text: str) -> int:
    """Accept a serial in either case, with or without leading zeros or colons."""
    cleaned = text.strip().replace(":", "").lower()
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) > 42 or any(c not in "0123456789abcdef" for c in cleaned):
        raise UsageError(f"invalid serial {text!r}: expected hexadecimal digits")
    value = int(cleaned, 16)
    if value <= 0:
        raise UsageError(f"invalid serial {text!r}: serials are positive")
    return value
