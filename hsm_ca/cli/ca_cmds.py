"""The ca command group: create, list and export CAs. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import (
    emit_json,
    json_flag,
    output_file,
    report_rows,
    state,
    write_output,
)
from hsm_ca.cli.options import KEY_TYPE_CHOICE, pin_file_option


# -------------------------------------------------------------------- CAs
@click.group()
def ca() -> None:
    """Create, list and export certificate authorities."""


def _ca_created(record: object) -> None:
    st = state()
    d = record.as_dict()  # type: ignore[attr-defined]
    if st.as_json:
        emit_json(d)
    else:
        click.echo(
            f"Created CA {d['name']}: {d['subject']} (serial {d['serial']}, "
            f"{d['key_type']}, valid until {d['not_after']})"
        )


@ca.command("create-root")
@json_flag
@click.argument("name")
@click.option(
    "--subject", required=True, metavar="DN", help="e.g. 'CN=Example Root CA,O=Example,C=NL'"
)
@click.option("--key-type", type=KEY_TYPE_CHOICE, default="ec-p384", show_default=True)
@click.option(
    "--days", type=click.IntRange(min=1), default=None, help="Validity (profile default otherwise)."
)
@click.option("--path-length", type=click.IntRange(min=0), default=None)
@pin_file_option
def create_root(
    name: str,
    subject: str,
    key_type: str,
    days: int | None,
    path_length: int | None,
    pin_file: str | None,
) -> None:
    """Create a self-signed root CA whose key is generated inside the HSM."""
    from hsm_ca.policy import parse_dn

    dn = parse_dn(subject)
    record = (
        state()
        .authority(pin_file)
        .create_root(name, dn, key_type=key_type, days=days, path_length=path_length)
    )
    _ca_created(record)


@ca.command("create-intermediate")
@json_flag
@click.argument("name")
@click.option("--parent", required=True, metavar="CA", help="The issuing (parent) CA.")
@click.option("--subject", required=True, metavar="DN")
@click.option("--key-type", type=KEY_TYPE_CHOICE, default="ec-p256", show_default=True)
@click.option("--days", type=click.IntRange(min=1), default=None)
@click.option("--path-length", type=click.IntRange(min=0), default=None)
@pin_file_option
def create_intermediate(
    name: str,
    parent: str,
    subject: str,
    key_type: str,
    days: int | None,
    path_length: int | None,
    pin_file: str | None,
) -> None:
    """Create an intermediate CA certified by PARENT."""
    from hsm_ca.policy import parse_dn

    dn = parse_dn(subject)
    record = (
        state()
        .authority(pin_file)
        .create_intermediate(
            name, parent, dn, key_type=key_type, days=days, path_length=path_length
        )
    )
    _ca_created(record)


@ca.command("list")
@json_flag
def ca_list() -> None:
    """List the CAs of this home."""
    st = state()
    records = [r.as_dict() for r in st.authority().list_cas()]
    report_rows(
        records,
        ["name", "parent", "subject", "key type", "serial", "not after"],
        lambda r: [
            r["name"],
            r["parent"] or "-",
            r["subject"],
            r["key_type"],
            r["serial"],
            r["not_after"],
        ],
    )


@ca.command("export")
@json_flag
@click.argument("name")
@click.option("--chain", is_flag=True, help="Append the issuers up to and including the root.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
def ca_export(name: str, chain: bool, output: str | None) -> None:
    """Write a CA's certificate (PEM)."""
    from hsm_ca.x509util import cert_pem

    auth = state().authority()
    certs = auth.chain(name) if chain else [auth.get_ca(name).certificate]
    pem = "".join(cert_pem(c) for c in certs)
    if output:
        write_output(output, pem.encode())
        if state().as_json:
            emit_json({"ca": name, "file": output, "certificates": len(certs)})
    else:
        click.echo(pem, nl=False)


@ca.command("ocsp-responder")
@click.argument("name")
@click.option(
    "--key-type",
    type=KEY_TYPE_CHOICE,
    default=None,
    help="Responder key type (default: the CA's, ec-p256 for Ed25519 CAs).",
)
@click.option("--days", type=click.IntRange(min=1), default=None)
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@pin_file_option
@json_flag
def ca_ocsp_responder(
    name: str, key_type: str | None, days: int | None, output: str | None, pin_file: str | None
) -> None:
    """Issue (or renew) CA NAME's delegated OCSP responder certificate (key in the HSM)."""
    st = state()
    dest = output_file(output, what="certificate file") if output else None  # before issuing
    if dest is not None:
        click.get_current_context().call_on_close(dest.close)
    issued = st.authority(pin_file).create_ocsp_responder(name, key_type=key_type, days=days)
    if dest is not None:
        dest.write(issued.pem.encode(), done=f"certificate {issued.serial} was issued and "
                   f"recorded: 'hsm-ca show {issued.serial}' prints it")
    info = issued.as_dict()
    if st.as_json:
        emit_json(info)
    else:
        click.echo(
            f"OCSP responder for {name}: serial {info['serial']}, valid until {info['not_after']}"
        )
