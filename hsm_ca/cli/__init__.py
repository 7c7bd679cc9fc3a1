"""The ``hsm-ca`` command line: a thin shell over the services.

Heavy modules (cryptography, sqlite-utils, rich) are imported inside commands,
so ``hsm-ca --help`` costs little more than importing click.
"""

from __future__ import annotations

import sys

import click

from hsm_ca.cli.base import HsmCaGroup, State
from hsm_ca.cli.commands import register


@click.group(cls=HsmCaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", "home", metavar="DIR", help="CA home (default $HSM_CA_HOME or ~/.hsm-ca).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option(
    "--pin-file", type=click.Path(dir_okay=False), metavar="FILE",
    help="Read the crypto-user PIN from FILE (else $HSM_CA_PIN, else a prompt).",
)
@click.version_option(package_name="hsm-ca")
@click.pass_context
def cli(ctx: click.Context, home: str | None, as_json: bool, debug: bool, pin_file: str | None) -> None:
    """hsm-ca: a private certificate authority whose keys never leave the HSM engine."""
    ctx.obj = State(home_flag=home, as_json=as_json, debug=debug, pin_file=pin_file)


register(cli)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps every error to one ``Error:`` line and an exit code."""
    sys.exit(cli.run(argv))
