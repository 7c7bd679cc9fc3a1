"""Revocation and distribution: revoke, crl, serve. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import echo_after, emit_json, json_flag, output_file, state
from hsm_ca.cli.options import pin_file_option

# -------------------------------------------------------------- revocation
REASON_CHOICE = click.Choice(
    [
        "unspecified",
        "keyCompromise",
        "cACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "privilegeWithdrawn",
        "aACompromise",
    ]
)


@click.command()
@click.argument("serial")
@click.option("--reason", type=REASON_CHOICE, default="unspecified", show_default=True)
@click.option(
    "--invalidity-date",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"]),
    default=None,
    help="When the key is known or suspected to have been compromised (UTC).",
)
@json_flag
def revoke(serial: str, reason: str, invalidity_date: object) -> None:
    """Revoke a certificate by serial."""
    st = state()
    result = st.authority().revoke(serial, reason, invalidity_date)  # type: ignore[arg-type]
    if st.as_json:
        emit_json(result.as_dict())
    else:
        click.echo(f"Revoked {result.serial} (CA {result.ca}, reason {result.reason})")


@click.command()
@click.argument("name")
@click.option("--der", is_flag=True, help="Write DER instead of PEM.")
@click.option("--delta", is_flag=True, help="Sign a delta CRL against the latest full CRL.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@pin_file_option
@json_flag
def crl(name: str, der: bool, delta: bool, output: str | None, pin_file: str | None) -> None:
    """Sign a fresh CRL for CA NAME with the next CRL number."""
    st = state()
    dest = output_file(output, what="CRL file") if output else None  # checked before signing
    if dest is not None:
        click.get_current_context().call_on_close(dest.close)
    result = st.authority(pin_file).crl(name, delta=delta)
    data = result.der() if der else result.pem()
    done = (f"CRL {result.number} of {name} was signed and recorded; "
            f"'hsm-ca crl {name}' signs a new one")
    if dest is not None:
        dest.write(data, done=done)
    if st.as_json:
        info = result.as_dict()
        if output:
            info["file"] = output
        elif not der:
            info["pem"] = data.decode()
        emit_json(info)
        return
    if not output:
        echo_after(data if der else data.decode("ascii"), done)
    click.echo(
        f"CRL {result.number} of {name}: {result.entries} entries"
        + (f" (delta on {result.delta_base})" if delta else "")
        + (f" -> {output}" if output else ""),
        err=not output,
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@pin_file_option
def serve(host: str, port: int, log_level: str, pin_file: str | None) -> None:
    """Serve CA certificates, CRLs, OCSP and time stamps over HTTP.

    Timeouts and the connection cap are read from [server] in hsm-ca.toml
    (idle_timeout, read_timeout, write_timeout in seconds, max_connections);
    OCSP nonces from ocsp_nonces, ocsp_nonce_rate and ocsp_nonce_burst (per
    client), ocsp_nonce_global_rate and ocsp_nonce_global_burst (all clients).
    """
    from hsm_ca.server import serve as run

    auth = state().authority(pin_file)
    auth.engine()  # log in now: a wrong PIN fails here, not on the first request
    responder = None
    if auth.store.get_row("tsa", "name", "default") is not None:
        from hsm_ca.tsa import TimeStampAuthority

        responder = TimeStampAuthority(auth).respond
    run(auth, host, port, log_level=log_level, tsa=responder)
