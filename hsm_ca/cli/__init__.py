"""The ``hsm-ca`` command line: a thin shell over the services.

Command modules are imported only when their command runs, and heavy modules
(cryptography, sqlite-utils, rich) only inside commands, so ``hsm-ca --help``
costs little more than importing click.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from hsm_ca.cli.base import HsmCaGroup, State

# name -> (module, attribute, one-line help shown by --help without importing the module)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": (
        "init_cmds",
        "init",
        "Create a CA home and its HSM partition (or bind to a PKCS#11 token).",
    ),
    "ca": ("ca_cmds", "ca", "Create, list and export certificate authorities."),
    "sign": ("issue_cmds", "sign", "Sign PKCS#10 CSRs (PEM or DER) with a CA under a profile."),
    "list": ("issue_cmds", "list_certs", "List issued certificates."),
    "show": ("issue_cmds", "show", "Show one certificate by serial."),
    "revoke": ("revocation_cmds", "revoke", "Revoke a certificate by serial."),
    "crl": ("revocation_cmds", "crl", "Sign a fresh CRL for a CA with the next CRL number."),
    "serve": (
        "revocation_cmds",
        "serve",
        "Serve CA certificates, CRLs, OCSP and time stamps over HTTP.",
    ),
    "keys": ("keys_cmds", "keys", "Keys held by the HSM engine."),
    "hsm": (
        "hsm_cmds",
        "hsm",
        "The built-in HSM engine: users, backup and restore, replica nodes.",
    ),
    "audit": ("audit_cmds", "audit", "The tamper-evident audit trail."),
    "codesign": (
        "codesign_cmds",
        "codesign",
        "Sign release artifacts with HSM-held keys; verify signatures.",
    ),
    "tsa": ("codesign_cmds", "tsa", "The RFC 3161 time-stamping authority (key in the HSM)."),
    "bootstrap": (
        "bootstrap_cmds",
        "bootstrap",
        "Create a whole PKI from one declarative TOML file.",
    ),
}


class LazyGroup(HsmCaGroup):
    """Imports a command's module when the command is used, not at start-up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(f"hsm_ca.cli.{entry[0]}")
        command: click.Command = getattr(module, entry[1])
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, entry[2]) for name, entry in COMMANDS.items()])


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from hsm_ca import __version__

        click.echo(f"hsm-ca {__version__}")
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", "home", metavar="DIR", help="CA home (default $HSM_CA_HOME or ~/.hsm-ca).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option(
    "--pin-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read the crypto-user PIN from FILE (else $HSM_CA_PIN, else a prompt).",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Show the version and exit.",
)
@click.pass_context
def cli(
    ctx: click.Context, home: str | None, as_json: bool, debug: bool, pin_file: str | None
) -> None:
    """hsm-ca: a private certificate authority whose keys never leave the HSM engine."""
    ctx.obj = State(home_flag=home, as_json=as_json, debug=debug, pin_file=pin_file)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: maps every error to one ``Error:`` line and an exit code."""
    sys.exit(cli.run(argv))
