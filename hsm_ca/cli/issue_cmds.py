"""Issuing: sign, list, show. No logic here: parse, call one service method, render."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

from hsm_ca.cli.base import (
    echo_after,
    emit_json,
    json_flag,
    output_file,
    report_rows,
    state,
)
from hsm_ca.cli.options import Path, pin_file_option
from hsm_ca.errors import HsmCaError
from hsm_ca.fileio import sync_directory


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
    from hsm_ca.errors import UsageError
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
        from hsm_ca.fileio import check_output_dir

        check_output_dir(out_dir)
    # the destination is checked before a serial is spent on it
    dest = output_file(output, what="certificate file") if output else None
    if dest is not None:
        click.get_current_context().call_on_close(dest.close)
    auth = st.authority(pin_file)
    if out_dir:
        helpers: list[Any] = []
        jobs = jobs or (min(os.cpu_count() or 1, 4) if len(csr_files) >= 400 else 1)
        if jobs > 1 and len(csr_files) >= 2 * jobs:
            # a declared widening warns here, once, not in every forked helper; a refusal
            # is raised (and recorded for each CSR) by the signing below
            with contextlib.suppress(HsmCaError):
                auth.profiles.for_issuance(profile)
            if auth.config.engine == "soft" and hasattr(os, "fork"):
                csr_files, helpers = _fork_helpers(
                    auth, csr_files, jobs, ca_name, profile, days, chain, Path(out_dir))
            else:
                csr_files, helpers = _start_helpers(
                    st, auth, pin_file, csr_files, jobs, ca_name, profile, days, chain, out_dir
                )
        report = _issue_to_dir(auth, csr_files, ca_name, profile, days, chain, Path(out_dir))
        for helper in helpers:
            report.extend(helper.result())
        sync_directory(Path(out_dir))
        _report(st, report)
        return
    result = auth.sign_csrs(ca_name, [(csr_files[0], read_csr(csr_files[0]))], profile,
                            days=days)[0]
    if not isinstance(result, IssuedCertificate):
        raise result.error
    pem = result.pem + ("".join(cert_pem(c) for c in result.chain) if chain else "")
    info = result.as_dict()
    done = _issued_note(info["serial"])
    if dest is not None:
        dest.write(pem.encode(), done=done)
        info["file"] = output
    if st.as_json:
        if not output:
            info["pem"] = pem
        echo_after(_json_text(info), done)
    else:
        if not output:
            echo_after(pem, done)
        msg = (
            f"Issued {info['serial']} to {info['subject'] or '(empty subject)'} "
            f"(profile {profile}, CA {ca_name}, valid until {info['not_after']})"
        )
        click.echo(msg + (f" -> {output}" if output else ""), err=not output)


def _issue_to_dir(
    auth: Any, files: tuple[str, ...], ca_name: str, profile: str, days: int | None,
    chain: bool, out_dir: Any,
) -> list[dict[str, Any]]:
    """Read, issue and write ``<stem>.pem`` files; one report row per CSR file."""
    from hsm_ca.authority import IssuedCertificate
    from hsm_ca.errors import HsmCaError
    from hsm_ca.x509util import cert_pem

    report: list[dict[str, Any]] = []
    # unreadable inputs go in too: the authority records every refusal the same way
    inputs = [(f, read_csr(f)) for f in files]
    for result in auth.sign_csrs(ca_name, inputs, profile, days=days) if inputs else []:
        if not isinstance(result, IssuedCertificate):
            report.append(result.as_dict())
            continue
        target = out_dir / f"{Path(result.source or result.serial).stem}.pem"
        pem = result.pem + ("".join(cert_pem(c) for c in result.chain) if chain else "")
        info = result.as_dict()
        info["source"] = result.source
        info["file"] = str(target)
        try:
            # the certificate is already durable in the database (and can be exported
            # again); one directory sync at the end instead of two per file
            output_file(target, what="certificate file").write(pem.encode(), durable=False)
        except HsmCaError as e:
            info["written"] = False
            info["error"] = f"{e}; {_issued_note(info['serial'])}"
        report.append(info)
    return report


def read_csr(path: str) -> bytes | HsmCaError:
    """A CSR file's bytes, or why it cannot be read (a refusal the authority records)."""
    from hsm_ca.fileio import CSR_BYTES, read_regular_file

    try:
        return read_regular_file(path, CSR_BYTES, "CSR file")
    except HsmCaError as e:
        return e


def _issued_note(serial: str) -> str:
    return f"certificate {serial} was issued and recorded: 'hsm-ca show {serial}' prints it"


def _json_text(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def _report(st: Any, report: list[dict[str, Any]]) -> None:
    refused = sum(1 for r in report if r.get("refused"))
    unwritten = sum(1 for r in report if r.get("written") is False)
    if st.as_json:
        emit_json(report)
    else:
        lines = [f"Issued {r['serial']} {r['source']} -> {r['file']}"
                 for r in report if not r.get("refused") and r.get("written") is not False]
        if lines:
            click.echo("\n".join(lines))
        for r in report:
            if r.get("refused"):
                click.echo(f"Refused {r['source']}: {r['error']}", err=True)
            elif r.get("written") is False:
                click.echo(f"Not written {r['source']}: {r['error']}", err=True)
        click.echo(f"{len(report) - refused} issued, {refused} refused"
                   + (f", {unwritten} not written" if unwritten else ""), err=True)
    if refused or unwritten:
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


class _ForkedHelper:
    """A child made by Authority.fork(), reporting its rows as JSON over a pipe."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd

    def result(self) -> list[dict[str, Any]]:
        import json

        from hsm_ca.errors import HsmCaError

        chunks = []
        with os.fdopen(self.fd, "rb") as fh:
            chunks.append(fh.read())
        _, status = os.waitpid(self.pid, 0)
        try:
            payload = json.loads(b"".join(chunks))
        except ValueError:
            raise HsmCaError(
                f"a signing helper process failed (exit status {os.waitstatus_to_exitcode(status)})"
            ) from None
        if "error" in payload:
            raise HsmCaError(f"a signing helper process failed: {payload['error']}")
        return payload["rows"]  # type: ignore[no-any-return]


def _fork_helpers(
    auth: Any, files: tuple[str, ...], jobs: int, ca_name: str, profile: str,
    days: int | None, chain: bool, out_dir: Any,
) -> tuple[tuple[str, ...], list[_ForkedHelper]]:
    """Fork jobs-1 children that issue shares of the CSRs; returns this process's share.

    Processes, not threads: signing holds the GIL. Forking (built-in engine only)
    costs a few milliseconds where a new interpreter costs a tenth of a second,
    and the children share this process's login instead of repeating the KDF.
    Each child records its own audit entries in the same database.
    """
    import json

    from hsm_ca.errors import HsmCaError

    per = -(-len(files) // jobs)
    shares = [files[i * per:(i + 1) * per] for i in range(jobs)]
    helpers: list[_ForkedHelper] = []
    for share in shares[1:]:
        if not share:
            continue
        r, w = os.pipe()
        pid = auth.fork()
        if pid == 0:  # the child: issue, report over the pipe, never return into click
            code = 0
            try:
                os.close(r)
                for other in helpers:
                    os.close(other.fd)
                try:
                    payload: dict[str, Any] = {
                        "rows": _issue_to_dir(auth, share, ca_name, profile, days, chain, out_dir)
                    }
                except HsmCaError as e:
                    payload, code = {"error": str(e)}, 1
                except BaseException as e:  # noqa: BLE001 - reported by the parent
                    payload, code = {"error": f"internal error ({type(e).__name__})"}, 1
                view = memoryview(json.dumps(payload).encode())
                while view:
                    view = view[os.write(w, view):]
                auth.store.close()
            finally:
                os._exit(code)
        os.close(w)
        helpers.append(_ForkedHelper(pid, r))
    return shares[0], helpers


class _SpawnedHelper:
    """A ``python -m hsm_ca ... sign --json`` process (PKCS#11: no fork after C_Initialize)."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def result(self) -> list[dict[str, Any]]:
        import json

        from hsm_ca.errors import HsmCaError

        stdout, stderr = self.proc.communicate()
        if self.proc.returncode in (0, 1) and stdout.strip():
            return json.loads(stdout)  # type: ignore[no-any-return]
        last = (stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise HsmCaError(f"a signing helper process failed: {last}")


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
) -> tuple[tuple[str, ...], list[_SpawnedHelper]]:
    """Start jobs-1 helper processes on shares of the CSRs; returns this process's share.

    Each helper logs in itself (the PIN goes through its environment, never
    its argv) and records its own audit trail entries in the same database.
    A new interpreter takes about a tenth of a second to start, so this
    process, already running, keeps a larger share.
    """
    import subprocess

    pin = st.user_pin_source(pin_file)()
    env = dict(os.environ, HSM_CA_PIN=pin, HSM_CA_USER=auth.config.user)
    n = len(files)
    own = min(n - (jobs - 1), int(n * (1 + 0.25 * (jobs - 1)) / jobs))
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
        helpers.append(_SpawnedHelper(
            subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        ))
    return files[:own], helpers
