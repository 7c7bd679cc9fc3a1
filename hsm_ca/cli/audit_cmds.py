"""The audit command group. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import (
    emit_json,
    json_flag,
    output_file,
    read_input_file,
    report_rows,
    state,
)
from hsm_ca.cli.options import pin_file_option


# ------------------------------------------------------------------- audit
@click.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@audit.command("list")
@json_flag
@click.option(
    "--since", type=click.IntRange(min=0), default=0, metavar="SEQ", help="Only records after SEQ."
)
def audit_list(since: int) -> None:
    """List audit records."""
    st = state()
    rows = list(st.authority().audit.records(since))
    report_rows(
        rows,
        ["seq", "time", "user", "action", "outcome", "ca", "serial", "subject / detail"],
        lambda r: [
            r["seq"],
            r["time"],
            f"{r['os_user']}/{r['hsm_user'] or '-'}",
            r["action"],
            r["outcome"],
            r["ca"],
            r["serial"],
            r["subject"] or r["detail"],
        ],
    )


@audit.command("verify")
@click.option(
    "--trust",
    "trust_cert",
    type=click.Path(dir_okay=False),
    metavar="CERT",
    help="The audit signer's certificate (from 'audit cert') to check checkpoints with.",
)
@click.option(
    "--file",
    "export_file",
    type=click.Path(dir_okay=False),
    metavar="EXPORT",
    help="Verify an exported trail (JSON Lines) offline; needs --trust.",
)
@click.option(
    "--anchor",
    "anchor_texts",
    multiple=True,
    metavar="SEQ:CHAIN",
    help="A checkpoint noted earlier (from 'audit checkpoint'): the trail must still hold it "
    "unchanged, so a trail cut back to an older checkpoint fails. Repeatable.",
)
@json_flag
def audit_verify(trust_cert: str | None, export_file: str | None,
                 anchor_texts: tuple[str, ...]) -> None:
    """Check the whole trail and its signed checkpoints; exit 1 naming the first bad record."""
    from hsm_ca.audit import parse_anchor, trail_of_certificate
    from hsm_ca.errors import UsageError

    st = state()
    trust_key = None
    trail = None
    anchors: dict[int, str] = {}
    for text in anchor_texts:
        try:
            seq, chain = parse_anchor(text)
        except ValueError as e:
            raise UsageError(f"--anchor {text[:80]!r}: {e}") from None
        anchors[seq] = chain
    if trust_cert:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(
                read_input_file(trust_cert, what="certificate file"))
        except ValueError as e:
            raise UsageError(f"{trust_cert} is not a PEM certificate") from e
        trust_key, trail = cert.public_key(), trail_of_certificate(cert)
    if export_file:
        from hsm_ca.audit import verify_export

        if trust_key is None:
            raise UsageError("--file needs --trust CERT (the audit signer's certificate)")
        from hsm_ca.fileio import AUDIT_EXPORT_BYTES, AUDIT_LINE_BYTES, LineReader

        # line by line, each line and the whole bounded: an export can be large, and
        # /dev/zero or a FIFO is refused before anything is read
        with LineReader(export_file, line_limit=AUDIT_LINE_BYTES, total_limit=AUDIT_EXPORT_BYTES,
                        what="audit export") as lines:
            report = verify_export(lines, trust_key, trail=trail, anchors=anchors)
    else:
        report = st.authority().audit.verify(trust_key, trail=trail, anchors=anchors)
    if st.as_json:
        emit_json(report.as_dict())
    elif report.ok:
        click.echo(f"Audit trail intact: {report.records} records")
        for note in report.notes:
            click.echo(f"Note: {note}")
    if not report.ok:
        click.echo(f"Error: audit trail broken: {report.problem}", err=True)
        raise click.exceptions.Exit(1)


@audit.command("checkpoint")
@pin_file_option
@json_flag
def audit_checkpoint(pin_file: str | None) -> None:
    """Sign the current head of the trail with the HSM audit key now."""
    st = state()
    auth = st.authority(pin_file)
    seq = auth.checkpoint("manual")
    chain = auth.audit.chain_of(seq)
    if st.as_json:
        emit_json({"checkpoint": seq, "chain": chain, "anchor": f"{seq}:{chain}"})
    else:
        click.echo(f"Checkpoint {seq} signed")
        click.echo(f"Anchor: {seq}:{chain}  (keep it off this host; 'audit verify --anchor' checks it)")


@audit.command("cert")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@pin_file_option
def audit_cert(output: str | None, pin_file: str | None) -> None:
    """Write the audit signer's certificate (PEM), for 'audit verify --trust'."""
    from hsm_ca.x509util import cert_pem

    dest = output_file(output, what="certificate file") if output else None
    if dest is not None:
        click.get_current_context().call_on_close(dest.close)
    pem = cert_pem(state().authority(pin_file).audit_certificate())
    if dest is not None:
        dest.write(pem.encode())
    else:
        click.echo(pem, nl=False)


@audit.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@click.option(
    "--no-checkpoint",
    is_flag=True,
    help="Do not sign a checkpoint first (the export then cannot be verified to its end).",
)
@pin_file_option
def audit_export(output: str | None, no_checkpoint: bool, pin_file: str | None) -> None:
    """Write the trail as JSON Lines, one record a line, ending with a signed checkpoint."""
    import json
    import os

    from hsm_ca.config import PIN_ENV

    st = state()
    dest = output_file(output, what="audit export") if output else None  # before the checkpoint
    if dest is not None:
        click.get_current_context().call_on_close(dest.close)
    from hsm_ca.audit import EXPORT_REASON

    auth = st.authority(pin_file)
    until = None
    if not no_checkpoint and (pin_file or st.pin_file or os.environ.get(PIN_ENV)):
        # the export ends with its own checkpoint, even while others append to the trail
        until = auth.checkpoint(EXPORT_REASON)
    elif not no_checkpoint:
        click.echo("Warning: no PIN ($HSM_CA_PIN or --pin-file), so the export ends without its "
                   "signed checkpoint and 'audit verify --file' will refuse it", err=True)
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":"))
             for r in auth.audit.records(until=until)]
    data = "".join(line + "\n" for line in lines)
    if dest is not None:
        dest.write(data.encode())
    else:
        click.echo(data, nl=False)
