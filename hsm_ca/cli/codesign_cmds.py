"""Code signing and the time-stamping authority. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import (
    emit_json,
    json_flag,
    read_input_file,
    report_rows,
    state,
    write_output,
)
from hsm_ca.cli.options import KEY_TYPE_CHOICE, pin_file_option


# ------------------------------------------------------------- code signing
@click.group()
def codesign() -> None:
    """Sign release artifacts with HSM-held keys; verify signatures."""


@codesign.command("new-signer")
@click.argument("label")
@click.option("--ca", "ca_name", required=True, metavar="NAME")
@click.option("--subject", required=True, metavar="DN")
@click.option("--key-type", type=KEY_TYPE_CHOICE, default="ec-p256", show_default=True)
@click.option("--days", type=click.IntRange(min=1), default=None)
@pin_file_option
@json_flag
def codesign_new_signer(
    label: str, ca_name: str, subject: str, key_type: str, days: int | None, pin_file: str | None
) -> None:
    """Generate a signer key in the HSM and issue it a code-signing certificate."""
    from hsm_ca.codesign import new_signer
    from hsm_ca.policy import parse_dn

    st = state()
    info = new_signer(
        st.authority(pin_file), label, ca_name, parse_dn(subject), key_type=key_type, days=days
    )
    if st.as_json:
        emit_json(info)
    else:
        click.echo(
            f"Signer {label}: {info['subject']} (serial {info['serial']}, "
            f"valid until {info['not_after']})"
        )


@codesign.command("list")
@json_flag
def codesign_list() -> None:
    """List signers and the status of their certificates."""
    from hsm_ca.codesign import list_signers

    st = state()
    rows = list_signers(st.authority())
    report_rows(
        rows,
        ["label", "ca", "subject", "serial", "not after", "status"],
        lambda r: [r["label"], r["ca"], r["subject"], r["serial"], r["not_after"], r["status"]],
    )


@codesign.command("sign")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--signer", "signer_label", required=True, metavar="LABEL")
@click.option("--timestamp", is_flag=True, help="Add an RFC 3161 signature time stamp.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    metavar="SIGFILE",
    help="Signature file (default FILE.p7s; one FILE only).",
)
@pin_file_option
@json_flag
def codesign_sign(
    files: tuple[str, ...],
    signer_label: str,
    timestamp: bool,
    output: str | None,
    pin_file: str | None,
) -> None:
    """Write a detached CMS signature (DER) for each FILE."""
    import os
    import stat
    from contextlib import suppress

    from hsm_ca.codesign import sign_files

    st = state()
    auth = st.authority(pin_file)
    total = 0
    for f in files:  # for the progress bar; sign_files checks (and audits) unusable files
        with suppress(OSError, ValueError):
            info = os.stat(f)
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    if len(files) > 1 and not st.as_json:
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as progress:
            task = progress.add_task("signing", total=total)
            results = sign_files(
                auth,
                files,
                signer_label,
                timestamp=timestamp,
                output=output,
                progress=lambda n: progress.advance(task, n),
            )
    else:
        results = sign_files(auth, files, signer_label, timestamp=timestamp, output=output)
    if st.as_json:
        emit_json([r.as_dict() for r in results] if len(files) > 1 else results[0].as_dict())
        return
    for r in results:
        click.echo(
            f"Signed {r.file} -> {r.signature_file}" + (" (time-stamped)" if r.timestamped else "")
        )


def _stderr_console() -> object:
    from rich.console import Console

    return Console(stderr=True)


@codesign.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("sigfile", type=click.Path(dir_okay=False))
@click.option(
    "--trust",
    "trust_pem",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="ROOT_PEM",
    help="Trusted root certificate(s), PEM.",
)
@click.option(
    "--crl",
    "crl_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="CRL (PEM or DER) to check revocation; repeat for each CA.",
)
@click.option(
    "--at",
    "at_time",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"]),
    default=None,
    help="Verify as of this UTC time instead of now.",
)
@click.option(
    "--tsa-trust",
    "tsa_pem",
    type=click.Path(dir_okay=False),
    metavar="CERT",
    help="The time-stamping authority whose stamps extend validity, PEM "
    "(default: the home's TSA; without one, time stamps are not used).",
)
@json_flag
def codesign_verify(
    file: str,
    sigfile: str,
    trust_pem: str,
    crl_files: tuple[str, ...],
    at_time: object,
    tsa_pem: str | None,
) -> None:
    """Verify a detached signature; exit 0 if valid, 1 with the reason if not."""
    import datetime as dt

    from cryptography import x509

    from hsm_ca.codesign import verify_file
    from hsm_ca.errors import UsageError
    from hsm_ca.fileio import CRL_BYTES

    try:
        roots = x509.load_pem_x509_certificates(read_input_file(trust_pem, what="trust file"))
    except ValueError as e:
        raise UsageError(f"{trust_pem} holds no PEM certificate") from e
    crls = []
    for f in crl_files:
        data = read_input_file(f, CRL_BYTES, what="CRL file")
        try:
            crls.append(
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except ValueError as e:
            raise UsageError(f"{f} is not a CRL") from e
    at = at_time.replace(tzinfo=dt.UTC) if isinstance(at_time, dt.datetime) else None
    verdict = verify_file(file, sigfile, roots, crls, at, tsa_trust=_pinned_tsa(tsa_pem))
    if state().as_json:
        emit_json(verdict.as_dict())
    elif verdict.ok:
        click.echo(
            f"Valid signature by {verdict.signer}"
            + (f", time-stamped {verdict.timestamp}" if verdict.timestamp else "")
        )
        for note in verdict.notes:
            if note.startswith("the time stamp was not used"):
                click.echo(f"Note: {note}")
    if not verdict.ok:
        click.echo(f"Error: invalid signature: {verdict.reason}", err=True)
        raise click.exceptions.Exit(1)


def _pinned_tsa(tsa_pem: str | None) -> list[object]:
    """``--tsa-trust CERT``, else the home's TSA certificates, else none (stamps unused).

    Verification needs no home: without one (and without the option) a time
    stamp cannot extend validity, since any timeStamping certificate under the
    root could otherwise vouch for any time.
    """
    from cryptography import x509

    from hsm_ca.config import CONFIG_FILE
    from hsm_ca.errors import UsageError

    if tsa_pem is not None:
        try:
            return list(
                x509.load_pem_x509_certificates(read_input_file(tsa_pem, what="TSA trust file"))
            )
        except ValueError as e:
            raise UsageError(f"{tsa_pem} holds no PEM certificate") from e
    st = state()
    if not (st.home / CONFIG_FILE).exists():
        return []
    rows = st.authority().store.all_rows("tsa", "name")
    return [x509.load_pem_x509_certificate(r["pem"].encode()) for r in rows]


# ---------------------------------------------------------------------- TSA
@click.group()
def tsa() -> None:
    """The RFC 3161 time-stamping authority (key in the HSM)."""


@tsa.command("create")
@click.option("--ca", "ca_name", required=True, metavar="NAME", help="CA that certifies the TSA.")
@click.option("--subject", default=None, metavar="DN")
@click.option("--key-type", type=KEY_TYPE_CHOICE, default=None)
@click.option("--days", type=click.IntRange(min=1), default=None)
@pin_file_option
@json_flag
def tsa_create(
    ca_name: str, subject: str | None, key_type: str | None, days: int | None, pin_file: str | None
) -> None:
    """Create the time-stamping authority: key in the HSM, timestamping certificate."""
    from hsm_ca.policy import parse_dn
    from hsm_ca.tsa import create_tsa

    st = state()
    row = create_tsa(
        st.authority(pin_file),
        ca_name,
        subject=parse_dn(subject) if subject else None,
        key_type=key_type,
        days=days,
    )
    info = {k: row[k] for k in ("name", "ca", "key_label", "serial", "policy")}
    if st.as_json:
        emit_json(info)
    else:
        click.echo(
            f"Time-stamping authority under CA {ca_name}: serial {row['serial']}, "
            f"policy {row['policy']}"
        )


@tsa.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
def tsa_export(output: str | None) -> None:
    """Write the TSA certificate (PEM)."""
    from hsm_ca.errors import NotFound

    row = state().authority().store.get_row("tsa", "name", "default")
    if row is None:
        raise NotFound("no time-stamping authority; create one with 'hsm-ca tsa create --ca NAME'")
    if output:
        write_output(output, row["pem"].encode())
    else:
        click.echo(row["pem"], nl=False)
