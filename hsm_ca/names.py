"""The one rule for operator-chosen names (CLI.md "Names").

CA names, signer labels, TSA names (and the ACME directory, token and approver
names to come) end up in URLs, HSM key labels, file names and audit records,
and are read by people. So they are plain ASCII: letters, digits, ``-``,
``_`` and ``.``, starting with a letter or digit, at most 64 characters.
``str.isalnum()`` is not that rule: it accepts ``é`` and ``𝔯`` (mathematical
letters that look like ASCII), which broke URLs and let look-alikes sit beside
the real name. Names are also unique regardless of case (``ROOT`` beside
``root`` would be two CAs a person cannot tell apart, and two URLs that
case-insensitive tooling would merge): :func:`fold` gives the key to compare.

A CA name never ends in ``-delta``, because ``/crl/NAME-delta.crl`` is NAME's
delta CRL URL.

Errors are usage errors (exit 2) that state the rule and never echo more than
64 characters of the input.
"""

from __future__ import annotations

import re

from hsm_ca.errors import UsageError

MAX_NAME = 64
"""Longest name (CLI.md "Names")."""

MAX_KEY_LABEL = 96
"""Longest HSM key label: a name plus a prefix such as ``codesign-``."""

SHOWN = 64
"""At most this many characters of a refused name are echoed in a message."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RULE = "ASCII letters, digits, '-', '_' or '.', starting with a letter or digit"
DELTA_SUFFIX = "-delta"


def show(value: str, limit: int = SHOWN) -> str:
    """A refused value for a message: repr'd (controls show), cut to ``limit`` characters."""
    if len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def check_name(value: object, kind: str = "name", *, max_len: int = MAX_NAME) -> str:
    """Return ``value`` if it follows the name rule, else raise a UsageError naming it.

    ``kind`` ("CA name", "signer label", ...) starts the message, so the
    operator knows which argument or file field was wrong.
    """
    if not isinstance(value, str):
        raise UsageError(f"invalid {kind}: it must be text")
    rule = f"use 1-{max_len} {RULE}"
    if not value:
        raise UsageError(f"invalid {kind} (empty): {rule}")
    if len(value) > max_len:
        raise UsageError(f"invalid {kind} {show(value)}: longer than {max_len} characters; {rule}")
    # re's [A-Za-z0-9] is ASCII-only by construction (no re.IGNORECASE, whose Unicode
    # folding would let 'K' (KELVIN SIGN) match 'k'); fullmatch also refuses a final "\n"
    if not _NAME.fullmatch(value):
        raise UsageError(f"invalid {kind} {show(value)}: {rule}")
    return value


def check_ca_name(value: object) -> str:
    """The name rule plus the CA-only one: no ``-delta`` suffix (any case)."""
    name = check_name(value, "CA name")
    if name.lower().endswith(DELTA_SUFFIX):
        raise UsageError(
            f"invalid CA name {show(name)}: a CA name must not end in '{DELTA_SUFFIX}' "
            f"(/crl/NAME{DELTA_SUFFIX}.crl is NAME's delta CRL)"
        )
    return name


def fold(name: str) -> str:
    """The comparison key for uniqueness: names that differ only in case are one name."""
    return name.lower()  # names are ASCII, so lower() is exact case folding
