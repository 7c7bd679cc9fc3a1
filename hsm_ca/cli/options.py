"""Options and helpers shared by the command modules."""

from __future__ import annotations

from typing import Any

import click


def Path(*parts: Any) -> Any:  # noqa: N802 - pathlib costs start-up time; import it on use
    from pathlib import Path as _Path

    return _Path(*parts)


KEY_TYPE_CHOICE = click.Choice(
    ["ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"]
)
pin_file_option = click.option(
    "--pin-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read the crypto-user PIN from FILE (else $HSM_CA_PIN, else a prompt).",
)
