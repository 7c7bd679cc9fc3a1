"""Issuing: sign, list, show. No logic here: parse, call one service method, render."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from hsm_ca.cli.base import (
    emit_json,
    json_flag,
    read_input_file,
    report_rows,
    state,
    translate_os_errors,
    write_output,
)
from hsm_ca.cli.options import Path, pin_file_option
from hsm_ca.fileio import atomic_write, sync_directory


# ----------------------------------------------------------------- issuing
@click.command()
@json_flag
@click.argument("csr_files", nargs=-1, required=True, metavar="CSR_FILE...")
@click.option("--ca", "ca_name", required=True, metavar="NAME")
@click.option("--profile", required=True, metavar="PROFILE")
@click.option("--days", type=click.IntRange(min=1), default=None)
@click.option("--chain", is_flag=True, help="Append the issuing CA chain (root excluded).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="With several CSRs: write <csr stem>.pem for each into DIR.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1, max=64),
    default=None,
    metavar="N",
    help="With --out-dir: sign in N processes (default: one per core for 400+ CSRs).",
)
@pin_file_option
def sign(
    csr_files: tuple[str, ...],
    ca_name: str,
    profile: str,
    days: int | None,
    chain: bool,
    output: str | None,
    out_dir: str | None,
    jobs: int | None,
    pin_file: str | None,
) -> None:
    """Sign PKCS#10 CSRs (PEM or DER) with a CA under a profile."""
    from hsm_ca.authority import IssuedCertificate
    from hsm_ca.errors import HsmCaError, UsageError
    from hsm_ca.x509util import cert_pem

    st = state()
    if len(csr_files) > 1 and not out_dir:
        raise UsageError("several CSR files need --out-dir DIR")
    if output and out_dir:
        raise UsageError("use either -o FILE or --out-dir DIR, not both")
    if out_dir:
        from collections import Counter

        stems = Counter(Path(f).stem for f in csr_files)
        dupes = sorted(s for s, n in stems.items() if n > 1)
        if dupes:
            raise UsageError(
                f"several CSR files share the name {dupes[0]!r}; --out-dir needs unique stems"
            )
        if not Path(out_dir).is_dir():
            with translate_os_errors(f"cannot create {out_dir}"):
                Path(out_dir).mkdir(parents=True, exist_ok=True)
    auth = st.authority(pin_file)
    helpers: list[Any] = []
    if out_dir:
        jobs = jobs or (min(os.cpu_count() or 1, 4) if len(csr_files) >= 400 else 1)
        if jobs > 1 and len(csr_files) >= 2 * jobs:
            csr_files, helpers = _start_helpers(
                st, auth, pin_file, csr_files, jobs, ca_name, profile, days, chain, out_dir
            )
    inputs: list[tuple[str, bytes]] = []
    unreadable: list[tuple[str, HsmCaError]] = []
    for f in csr_files:
        try:
            inputs.append((f, read_input_file(f)))
        except HsmCaError as e:
            if len(csr_files) == 1:
                raise
            unreadable.append((f, e))
    results = auth.sign_csrs(ca_name, inputs, profile, days=days) if inputs else []
    if len(csr_files) == 1 and not out_dir:
        result = results[0]
        if not isinstance(result, IssuedCertificate):
            raise result.error
        pem = result.pem + ("".join(cert_pem(c) for c in result.chain) if chain else "")
        info = result.as_dict()
        if output:
            with translate_os_errors(f"cannot write {output}"):
                write_output(output, pem.encode())
            info["file"] = output
        if st.as_json:
            if not output:
                info["pem"] = pem
            emit_json(info)
        else:
            if not output:
                click.echo(pem, nl=False)
            msg = (
                f"Issued {info['serial']} to {info['subject'] or '(empty subject)'} "
                f"(profile {profile}, CA {ca_name}, valid until {info['not_after']})"
            )
            click.echo(msg + (f" -> {output}" if output else ""), err=not output)
        return
    report = []
    refused = 0
    for f, err in unreadable:
        refused += 1
        report.append({"source": f, "error": str(err), "refused": True})
    for result in results:
        if isinstance(result, IssuedCertificate):
            target = Path(out_dir) / f"{Path(result.source or result.serial).stem}.pem"  # type: ignore[arg-type]
            pem = result.pem + ("".join(cert_pem(c) for c in result.chain) if chain else "")
            with translate_os_errors(f"cannot write {target}"):
                # the certificate is already durable in the database (and can be exported
                # again); one directory sync at the end instead of two per file
                atomic_write(target, pem.encode(), 0o644, durable=False)
            info = result.as_dict()
            info["source"] = result.source
            info["file"] = str(target)
            report.append(info)
        else:
            refused += 1
            report.append(result.as_dict())
    for more in _collect_helpers(helpers):
        refused += sum(1 for r in more if r.get("refused"))
        report.extend(more)
    if out_dir:
        sync_directory(Path(out_dir))
    if st.as_json:
        emit_json(report)
    else:
        for r in report:
            if r.get("refused"):
                click.echo(f"Refused {r['source']}: {r['error']}", err=True)
            else:
                click.echo(f"Issued {r['serial']} {r['source']} -> {r['file']}")
        click.echo(f"{len(report) - refused} issued, {refused} refused", err=True)
    if refused:
        raise click.exceptions.Exit(1)


@click.command("list")
@json_flag
@click.option("--ca", "ca_name", metavar="NAME", help="Only certificates issued by this CA.")
@click.option("--revoked", is_flag=True, help="Only revoked certificates.")
def list_certs(ca_name: str | None, revoked: bool) -> None:
    """List issued certificates."""
    st = state()
    rows = st.authority().list_certificates(ca_name, revoked)
    report_rows(
        rows,
        ["serial", "ca", "profile", "subject (or first SAN)", "not after", "status"],
        lambda r: [r["serial"], r["ca"], r["profile"], r["name"], r["not_after"], r["status"]],
    )


@click.command()
@json_flag
@click.argument("serial")
def show(serial: str) -> None:
    """Show one certificate by serial (hex, any case, colons allowed)."""
    st = state()
    info = st.authority().show_certificate(serial)
    if st.as_json:
        emit_json(info)
        return
    for key in (
        "serial",
        "subject",
        "issuer",
        "ca",
        "profile",
        "key_type",
        "not_before",
        "not_after",
        "status",
        "revoked_at",
        "revocation_reason",
        "sha256",
    ):
        if info.get(key) is not None:
            click.echo(f"{key:>18}: {info[key]}")
    click.echo(f"{'sans':>18}: {', '.join(info['sans']) or '-'}")
    click.echo(f"{'extensions':>18}: {', '.join(info['extensions'])}")
    click.echo(info["pem"], nl=False)


def _start_helpers(
    st: Any,
    auth: Any,
    pin_file: str | None,
    files: tuple[str, ...],
    jobs: int,
    ca_name: str,
    profile: str,
    days: int | None,
    chain: bool,
    out_dir: str,
) -> tuple[tuple[str, ...], list[Any]]:
    """Start jobs-1 helper processes on shares of the CSRs; returns this process's share.

    Processes, not threads: signing holds the GIL. Each helper logs in itself
    (the PIN goes through its environment, never its argv) and records its
    own audit trail entries in the same database; this process starts a little
    earlier, so it keeps a slightly larger share.
    """
    import subprocess

    pin = st.user_pin_source(pin_file)()
    env = dict(os.environ, HSM_CA_PIN=pin, HSM_CA_USER=auth.config.user)
    n = len(files)
    own = (n * 11) // (10 * jobs)
    rest = files[own:]
    per = -(-len(rest) // (jobs - 1))
    helpers = []
    for i in range(jobs - 1):
        part = rest[i * per : (i + 1) * per]
        if not part:
            continue
        cmd = [
            sys.executable,
            "-m",
            "hsm_ca",
            "--home",
            str(st.home),
            "--json",
            "sign",
            *part,
            "--ca",
            ca_name,
            "--profile",
            profile,
            "--out-dir",
            out_dir,
            "--jobs",
            "1",
        ]
        if days is not None:
            cmd += ["--days", str(days)]
        if chain:
            cmd.append("--chain")
        helpers.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return files[:own], helpers


def _collect_helpers(helpers: list[Any]) -> list[list[dict[str, Any]]]:
    import json

    from hsm_ca.errors import HsmCaError

    out = []
    for proc in helpers:
        stdout, stderr = proc.communicate()
        if proc.returncode in (0, 1) and stdout.strip():
            out.append(json.loads(stdout))
        else:
            last = (stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
            raise HsmCaError(f"a signing helper process failed: {last}")
    return out
