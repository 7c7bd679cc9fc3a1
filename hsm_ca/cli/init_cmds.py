"""The init command. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import emit_json, json_flag, state
from hsm_ca.cli.options import Path, pin_file_option


# ------------------------------------------------------------------ init
@click.command()
@json_flag
@click.option("--engine", type=click.Choice(["soft", "pkcs11"]), default="soft", show_default=True)
@click.option("--pkcs11-module", metavar="PATH", help="PKCS#11 module (.so) for --engine pkcs11.")
@click.option("--token-label", metavar="LABEL", help="Token label for --engine pkcs11.")
@click.option("--pkcs11-uri", metavar="URI", help="RFC 7512 pkcs11: URI selecting the token.")
@click.option(
    "--base-url", metavar="URL", help="Where 'hsm-ca serve' is reachable (CRL/OCSP/AIA URLs)."
)
@click.option(
    "--user", "user_name", default="crypto-user", show_default=True, help="Crypto-user name."
)
@click.option(
    "--officer", "officer_name", default="admin", show_default=True, help="Crypto-officer name."
)
@click.option(
    "--so-pin-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read the crypto-officer PIN from FILE (else $HSM_CA_SO_PIN, else a prompt).",
)
@click.option(
    "--scrypt-n",
    type=int,
    default=None,
    metavar="N",
    help="scrypt cost of the PIN KDF (power of two; default 16384). Lower only for tests.",
)
@pin_file_option
def init(
    engine: str,
    pkcs11_module: str | None,
    token_label: str | None,
    pkcs11_uri: str | None,
    base_url: str | None,
    user_name: str,
    officer_name: str,
    so_pin_file: str | None,
    scrypt_n: int | None,
    pin_file: str | None,
) -> None:
    """Create a CA home and its HSM partition (or bind to a PKCS#11 token)."""
    from hsm_ca.authority import Authority
    from hsm_ca.config import Pkcs11Settings, pin_source, validate_base_url
    from hsm_ca.errors import UsageError

    st = state()
    home = st.home
    if base_url:
        base_url = validate_base_url(base_url)
    pkcs11 = None
    if engine == "pkcs11":
        if not pkcs11_module:
            raise UsageError("--engine pkcs11 needs --pkcs11-module PATH")
        if not token_label and not pkcs11_uri:
            raise UsageError("--engine pkcs11 needs --token-label LABEL or --pkcs11-uri URI")
        pkcs11 = Pkcs11Settings(module=pkcs11_module, token_label=token_label, uri=pkcs11_uri)
    user_pin = st.user_pin_source(pin_file)()
    officer_pin = None
    if engine == "soft":
        so = pin_source(
            "officer",
            Path(so_pin_file) if so_pin_file else None,
            prompt=lambda label: click.prompt(
                label, hide_input=True, err=True, confirmation_prompt=True
            ),
        )
        officer_pin = so()
        if officer_pin == user_pin:
            raise UsageError("the crypto-officer and crypto-user PINs must differ")
    with Authority.initialize(
        home,
        engine=engine,
        user_pin=user_pin,
        officer_pin=officer_pin,
        base_url=base_url,
        user=user_name,
        officer=officer_name,
        scrypt_n=scrypt_n,
        pkcs11=pkcs11,
    ):
        pass
    if st.as_json:
        emit_json(
            {
                "home": str(home),
                "engine": engine,
                "base_url": base_url,
                "user": user_name,
                "officer": officer_name if engine == "soft" else None,
            }
        )
    else:
        click.echo(f"Initialised hsm-ca home {home} (engine: {engine})")
