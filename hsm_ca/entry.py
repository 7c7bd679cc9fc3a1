"""Console entry point: starts the PIN's key derivation before the heavy imports.

Deriving the key-encryption key (scrypt) costs about 40 ms of one core; a
one-shot ``hsm-ca sign`` spends longer than that importing click and
cryptography, so the derivation is started first, on another core.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from hsm_ca import prelogin

    prelogin.start_from_argv(sys.argv[1:], dict(os.environ))
    from hsm_ca.cli import main as cli_main

    cli_main()
