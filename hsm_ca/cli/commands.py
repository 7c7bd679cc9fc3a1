"""Command definitions. No logic here: parse, call one service method, render."""

from __future__ import annotations

from pathlib import Path

import click

from hsm_ca.cli.base import (
    emit_json,
    json_flag,
    print_table,
    read_input_file,
    state,
    translate_os_errors,
    write_output,
)

KEY_TYPE_CHOICE = click.Choice(
    ["ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"]
)
pin_file_option = click.option(
    "--pin-file", type=click.Path(dir_okay=False), metavar="FILE",
    help="Read the crypto-user PIN from FILE (else $HSM_CA_PIN, else a prompt).",
)


def register(cli: click.Group) -> None:
    cli.add_command(init)
    cli.add_command(ca)
    cli.add_command(sign)
    cli.add_command(list_certs)
    cli.add_command(show)
    cli.add_command(keys)
    cli.add_command(audit)
    cli.add_command(revoke)
    cli.add_command(crl)
    cli.add_command(serve)
    cli.add_command(codesign)
    cli.add_command(tsa)
    cli.add_command(bootstrap)
    cli.add_command(hsm)


# ------------------------------------------------------------------ init
@click.command()
@json_flag
@click.option("--engine", type=click.Choice(["soft", "pkcs11"]), default="soft", show_default=True)
@click.option("--pkcs11-module", metavar="PATH", help="PKCS#11 module (.so) for --engine pkcs11.")
@click.option("--token-label", metavar="LABEL", help="Token label for --engine pkcs11.")
@click.option("--pkcs11-uri", metavar="URI", help="RFC 7512 pkcs11: URI selecting the token.")
@click.option("--base-url", metavar="URL", help="Where 'hsm-ca serve' is reachable (CRL/OCSP/AIA URLs).")
@click.option("--user", "user_name", default="crypto-user", show_default=True, help="Crypto-user name.")
@click.option("--officer", "officer_name", default="admin", show_default=True, help="Crypto-officer name.")
@click.option("--so-pin-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Read the crypto-officer PIN from FILE (else $HSM_CA_SO_PIN, else a prompt).")
@click.option("--scrypt-n", type=int, default=None, metavar="N",
              help="scrypt cost of the PIN KDF (power of two; default 16384). Lower only for tests.")
@pin_file_option
def init(
    engine: str, pkcs11_module: str | None, token_label: str | None, pkcs11_uri: str | None,
    base_url: str | None, user_name: str, officer_name: str, so_pin_file: str | None,
    scrypt_n: int | None, pin_file: str | None,
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
        so = pin_source("officer", Path(so_pin_file) if so_pin_file else None,
                        prompt=lambda label: click.prompt(label, hide_input=True, err=True,
                                                          confirmation_prompt=True))
        officer_pin = so()
        if officer_pin == user_pin:
            raise UsageError("the crypto-officer and crypto-user PINs must differ")
    with Authority.initialize(
        home, engine=engine, user_pin=user_pin, officer_pin=officer_pin, base_url=base_url,
        user=user_name, officer=officer_name, scrypt_n=scrypt_n, pkcs11=pkcs11,
    ):
        pass
    if st.as_json:
        emit_json({"home": str(home), "engine": engine, "base_url": base_url,
                   "user": user_name, "officer": officer_name if engine == "soft" else None})
    else:
        click.echo(f"Initialised hsm-ca home {home} (engine: {engine})")


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
        click.echo(f"Created CA {d['name']}: {d['subject']} (serial {d['serial']}, "
                   f"{d['key_type']}, valid until {d['not_after']})")


@ca.command("create-root")
@json_flag
@click.argument("name")
@click.option("--subject", required=True, metavar="DN", help="e.g. 'CN=Example Root CA,O=Example,C=NL'")
@click.option("--key-type", type=KEY_TYPE_CHOICE, default="ec-p384", show_default=True)
@click.option("--days", type=click.IntRange(min=1), default=None, help="Validity (profile default otherwise).")
@click.option("--path-length", type=click.IntRange(min=0), default=None)
@pin_file_option
def create_root(name: str, subject: str, key_type: str, days: int | None,
                path_length: int | None, pin_file: str | None) -> None:
    """Create a self-signed root CA whose key is generated inside the HSM."""
    from hsm_ca.policy import parse_dn

    dn = parse_dn(subject)
    record = state().authority(pin_file).create_root(
        name, dn, key_type=key_type, days=days, path_length=path_length
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
def create_intermediate(name: str, parent: str, subject: str, key_type: str, days: int | None,
                        path_length: int | None, pin_file: str | None) -> None:
    """Create an intermediate CA certified by PARENT."""
    from hsm_ca.policy import parse_dn

    dn = parse_dn(subject)
    record = state().authority(pin_file).create_intermediate(
        name, parent, dn, key_type=key_type, days=days, path_length=path_length
    )
    _ca_created(record)


@ca.command("list")
@json_flag
def ca_list() -> None:
    """List the CAs of this home."""
    st = state()
    records = [r.as_dict() for r in st.authority().list_cas()]
    if st.as_json:
        emit_json(records)
        return
    print_table(
        ["name", "parent", "subject", "key type", "serial", "not after"],
        [[r["name"], r["parent"] or "-", r["subject"], r["key_type"], r["serial"], r["not_after"]]
         for r in records],
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
        with translate_os_errors(f"cannot write {output}"):
            write_output(output, pem.encode())
        if state().as_json:
            emit_json({"ca": name, "file": output, "certificates": len(certs)})
    else:
        click.echo(pem, nl=False)


@ca.command("ocsp-responder")
@click.argument("name")
@click.option("--key-type", type=KEY_TYPE_CHOICE, default=None,
              help="Responder key type (default: the CA's, ec-p256 for Ed25519 CAs).")
@click.option("--days", type=click.IntRange(min=1), default=None)
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@pin_file_option
@json_flag
def ca_ocsp_responder(name: str, key_type: str | None, days: int | None, output: str | None,
                      pin_file: str | None) -> None:
    """Issue (or renew) CA NAME's delegated OCSP responder certificate (key in the HSM)."""
    st = state()
    issued = st.authority(pin_file).create_ocsp_responder(name, key_type=key_type, days=days)
    if output:
        with translate_os_errors(f"cannot write {output}"):
            write_output(output, issued.pem.encode())
    info = issued.as_dict()
    if st.as_json:
        emit_json(info)
    else:
        click.echo(f"OCSP responder for {name}: serial {info['serial']}, valid until "
                   f"{info['not_after']}")


# ----------------------------------------------------------------- issuing
@click.command()
@json_flag
@click.argument("csr_files", nargs=-1, required=True, metavar="CSR_FILE...")
@click.option("--ca", "ca_name", required=True, metavar="NAME")
@click.option("--profile", required=True, metavar="PROFILE")
@click.option("--days", type=click.IntRange(min=1), default=None)
@click.option("--chain", is_flag=True, help="Append the issuing CA chain (root excluded).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@click.option("--out-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="With several CSRs: write <csr stem>.pem for each into DIR.")
@pin_file_option
def sign(csr_files: tuple[str, ...], ca_name: str, profile: str, days: int | None, chain: bool,
         output: str | None, out_dir: str | None, pin_file: str | None) -> None:
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
        stems = [Path(f).stem for f in csr_files]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise UsageError(f"several CSR files share the name {dupes[0]!r}; --out-dir needs unique stems")
        if not Path(out_dir).is_dir():
            with translate_os_errors(f"cannot create {out_dir}"):
                Path(out_dir).mkdir(parents=True, exist_ok=True)
    auth = st.authority(pin_file)
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
            msg = f"Issued {info['serial']} to {info['subject'] or '(empty subject)'} " \
                  f"(profile {profile}, CA {ca_name}, valid until {info['not_after']})"
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
                write_output(target, pem.encode())
            info = result.as_dict()
            info["source"] = result.source
            info["file"] = str(target)
            report.append(info)
        else:
            refused += 1
            report.append(result.as_dict())
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
    if st.as_json:
        emit_json(rows)
        return
    print_table(
        ["serial", "ca", "profile", "subject (or first SAN)", "not after", "status"],
        [[r["serial"], r["ca"], r["profile"], r["name"], r["not_after"], r["status"]] for r in rows],
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
    for key in ("serial", "subject", "issuer", "ca", "profile", "key_type", "not_before",
                "not_after", "status", "revoked_at", "revocation_reason", "sha256"):
        if info.get(key) is not None:
            click.echo(f"{key:>18}: {info[key]}")
    click.echo(f"{'sans':>18}: {', '.join(info['sans']) or '-'}")
    click.echo(f"{'extensions':>18}: {', '.join(info['extensions'])}")
    click.echo(info["pem"], nl=False)


# -------------------------------------------------------------------- keys
@click.group()
def keys() -> None:
    """Keys held by the HSM engine."""


@keys.command("list")
@json_flag
@pin_file_option
def keys_list(pin_file: str | None) -> None:
    """List key labels, types, extractability and what uses them."""
    st = state()
    rows = st.authority(pin_file).list_keys()
    if st.as_json:
        emit_json(rows)
        return
    print_table(
        ["label", "key type", "extractable", "used by"],
        [[r["label"], r["key_type"], "yes" if r["extractable"] else "no", r["used_by"] or "-"]
         for r in rows],
    )


# ------------------------------------------------------------------- audit
@click.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@audit.command("list")
@json_flag
@click.option("--since", type=click.IntRange(min=0), default=0, metavar="SEQ",
              help="Only records after SEQ.")
def audit_list(since: int) -> None:
    """List audit records."""
    st = state()
    rows = list(st.authority().audit.records(since))
    if st.as_json:
        emit_json(rows)
        return
    print_table(
        ["seq", "time", "user", "action", "outcome", "ca", "serial", "subject / detail"],
        [[r["seq"], r["time"], f"{r['os_user']}/{r['hsm_user'] or '-'}", r["action"], r["outcome"],
          r["ca"], r["serial"], r["subject"] or r["detail"]] for r in rows],
    )


@audit.command("verify")
@click.option("--trust", "trust_cert", type=click.Path(dir_okay=False), metavar="CERT",
              help="The audit signer's certificate (from 'audit cert') to check checkpoints with.")
@click.option("--file", "export_file", type=click.Path(dir_okay=False), metavar="EXPORT",
              help="Verify an exported trail (JSON Lines) offline; needs --trust.")
@json_flag
def audit_verify(trust_cert: str | None, export_file: str | None) -> None:
    """Check the whole trail and its signed checkpoints; exit 1 naming the first bad record."""
    from hsm_ca.errors import UsageError

    st = state()
    trust_key = None
    if trust_cert:
        from cryptography import x509

        try:
            trust_key = x509.load_pem_x509_certificate(read_input_file(trust_cert)).public_key()
        except ValueError as e:
            raise UsageError(f"{trust_cert} is not a PEM certificate") from e
    if export_file:
        from hsm_ca.audit import verify_export

        if trust_key is None:
            raise UsageError("--file needs --trust CERT (the audit signer's certificate)")
        with translate_os_errors(f"cannot read {export_file}"), open(export_file, encoding="utf-8") as fh:
            report = verify_export(fh, trust_key)
    else:
        report = st.authority().audit.verify(trust_key)
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
    seq = st.authority(pin_file).checkpoint("manual")
    if st.as_json:
        emit_json({"checkpoint": seq})
    else:
        click.echo(f"Checkpoint {seq} signed")


@audit.command("cert")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@pin_file_option
def audit_cert(output: str | None, pin_file: str | None) -> None:
    """Write the audit signer's certificate (PEM), for 'audit verify --trust'."""
    from hsm_ca.x509util import cert_pem

    pem = cert_pem(state().authority(pin_file).audit_certificate())
    if output:
        with translate_os_errors(f"cannot write {output}"):
            write_output(output, pem.encode())
    else:
        click.echo(pem, nl=False)


@audit.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
@click.option("--no-checkpoint", is_flag=True,
              help="Do not sign a checkpoint first (the export then cannot be verified to its end).")
@pin_file_option
def audit_export(output: str | None, no_checkpoint: bool, pin_file: str | None) -> None:
    """Write the trail as JSON Lines, one record a line, ending with a signed checkpoint."""
    import json
    import os

    from hsm_ca.config import PIN_ENV

    st = state()
    auth = st.authority(pin_file)
    if not no_checkpoint and (pin_file or st.pin_file or os.environ.get(PIN_ENV)):
        auth.checkpoint("export")
    lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in auth.audit.records()]
    data = "".join(line + "\n" for line in lines)
    if output:
        with translate_os_errors(f"cannot write {output}"):
            write_output(output, data.encode())
    else:
        click.echo(data, nl=False)


# -------------------------------------------------------------- revocation
REASON_CHOICE = click.Choice([
    "unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
    "cessationOfOperation", "certificateHold", "privilegeWithdrawn", "aACompromise",
])


@click.command()
@click.argument("serial")
@click.option("--reason", type=REASON_CHOICE, default="unspecified", show_default=True)
@click.option("--invalidity-date", type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"]),
              default=None, help="When the key is known or suspected to have been compromised (UTC).")
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
    result = st.authority(pin_file).crl(name, delta=delta)
    data = result.der() if der else result.pem()
    if output:
        with translate_os_errors(f"cannot write {output}"):
            write_output(output, data)
    if st.as_json:
        info = result.as_dict()
        if output:
            info["file"] = output
        elif not der:
            info["pem"] = data.decode()
        emit_json(info)
        return
    if not output:
        if der:
            import sys

            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            click.echo(data.decode("ascii"), nl=False)
    click.echo(f"CRL {result.number} of {name}: {result.entries} entries"
               + (f" (delta on {result.delta_base})" if delta else "")
               + (f" -> {output}" if output else ""), err=not output)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@pin_file_option
def serve(host: str, port: int, log_level: str, pin_file: str | None) -> None:
    """Serve CA certificates, CRLs, OCSP and time stamps over HTTP."""
    from hsm_ca.server import serve as run

    auth = state().authority(pin_file)
    auth.engine()  # log in now: a wrong PIN fails here, not on the first request
    responder = None
    if auth.store.get_row("tsa", "name", "default") is not None:
        from hsm_ca.tsa import TimeStampAuthority

        responder = TimeStampAuthority(auth).respond
    run(auth, host, port, log_level=log_level, tsa=responder)


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
def codesign_new_signer(label: str, ca_name: str, subject: str, key_type: str, days: int | None,
                        pin_file: str | None) -> None:
    """Generate a signer key in the HSM and issue it a code-signing certificate."""
    from hsm_ca.codesign import new_signer
    from hsm_ca.policy import parse_dn

    st = state()
    info = new_signer(st.authority(pin_file), label, ca_name, parse_dn(subject),
                      key_type=key_type, days=days)
    if st.as_json:
        emit_json(info)
    else:
        click.echo(f"Signer {label}: {info['subject']} (serial {info['serial']}, "
                   f"valid until {info['not_after']})")


@codesign.command("list")
@json_flag
def codesign_list() -> None:
    """List signers and the status of their certificates."""
    from hsm_ca.codesign import list_signers

    st = state()
    rows = list_signers(st.authority())
    if st.as_json:
        emit_json(rows)
        return
    print_table(["label", "ca", "subject", "serial", "not after", "status"],
                [[r["label"], r["ca"], r["subject"], r["serial"], r["not_after"], r["status"]]
                 for r in rows])


@codesign.command("sign")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--signer", "signer_label", required=True, metavar="LABEL")
@click.option("--timestamp", is_flag=True, help="Add an RFC 3161 signature time stamp.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="SIGFILE",
              help="Signature file (default FILE.p7s; one FILE only).")
@pin_file_option
@json_flag
def codesign_sign(files: tuple[str, ...], signer_label: str, timestamp: bool, output: str | None,
                  pin_file: str | None) -> None:
    """Write a detached CMS signature (DER) for each FILE."""
    import os

    from hsm_ca.codesign import sign_files

    st = state()
    auth = st.authority(pin_file)
    total = 0
    for f in files:
        with translate_os_errors(f"cannot read {f}"):
            total += os.path.getsize(f)
    if len(files) > 1 and not st.as_json:
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as progress:
            task = progress.add_task("signing", total=total)
            results = sign_files(auth, files, signer_label, timestamp=timestamp, output=output,
                                 progress=lambda n: progress.advance(task, n))
    else:
        results = sign_files(auth, files, signer_label, timestamp=timestamp, output=output)
    if st.as_json:
        emit_json([r.as_dict() for r in results] if len(files) > 1 else results[0].as_dict())
        return
    for r in results:
        click.echo(f"Signed {r.file} -> {r.signature_file}" + (" (time-stamped)" if r.timestamped else ""))


def _stderr_console() -> object:
    from rich.console import Console

    return Console(stderr=True)


@codesign.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("sigfile", type=click.Path(dir_okay=False))
@click.option("--trust", "trust_pem", required=True, type=click.Path(dir_okay=False),
              metavar="ROOT_PEM", help="Trusted root certificate(s), PEM.")
@click.option("--crl", "crl_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="CRL (PEM or DER) to check revocation; repeat for each CA.")
@click.option("--at", "at_time", type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"]),
              default=None, help="Verify as of this UTC time instead of now.")
@json_flag
def codesign_verify(file: str, sigfile: str, trust_pem: str, crl_files: tuple[str, ...],
                    at_time: object) -> None:
    """Verify a detached signature; exit 0 if valid, 1 with the reason if not."""
    import datetime as dt

    from cryptography import x509

    from hsm_ca.codesign import verify_file
    from hsm_ca.errors import UsageError

    try:
        roots = x509.load_pem_x509_certificates(read_input_file(trust_pem))
    except ValueError as e:
        raise UsageError(f"{trust_pem} holds no PEM certificate") from e
    crls = []
    for f in crl_files:
        data = read_input_file(f, limit=256 << 20)
        try:
            crls.append(x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                        else x509.load_der_x509_crl(data))
        except ValueError as e:
            raise UsageError(f"{f} is not a CRL") from e
    at = at_time.replace(tzinfo=dt.UTC) if isinstance(at_time, dt.datetime) else None
    verdict = verify_file(file, sigfile, roots, crls, at)
    if state().as_json:
        emit_json(verdict.as_dict())
    elif verdict.ok:
        click.echo(f"Valid signature by {verdict.signer}"
                   + (f", time-stamped {verdict.timestamp}" if verdict.timestamp else ""))
    if not verdict.ok:
        click.echo(f"Error: invalid signature: {verdict.reason}", err=True)
        raise click.exceptions.Exit(1)


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
def tsa_create(ca_name: str, subject: str | None, key_type: str | None, days: int | None,
               pin_file: str | None) -> None:
    """Create the time-stamping authority: key in the HSM, timestamping certificate."""
    from hsm_ca.policy import parse_dn
    from hsm_ca.tsa import create_tsa

    st = state()
    row = create_tsa(st.authority(pin_file), ca_name,
                     subject=parse_dn(subject) if subject else None, key_type=key_type, days=days)
    info = {k: row[k] for k in ("name", "ca", "key_label", "serial", "policy")}
    if st.as_json:
        emit_json(info)
    else:
        click.echo(f"Time-stamping authority under CA {ca_name}: serial {row['serial']}, "
                   f"policy {row['policy']}")


@tsa.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE")
def tsa_export(output: str | None) -> None:
    """Write the TSA certificate (PEM)."""
    from hsm_ca.errors import NotFound

    row = state().authority().store.get_row("tsa", "name", "default")
    if row is None:
        raise NotFound("no time-stamping authority; create one with 'hsm-ca tsa create --ca NAME'")
    if output:
        with translate_os_errors(f"cannot write {output}"):
            write_output(output, row["pem"].encode())
    else:
        click.echo(row["pem"], nl=False)


# ---------------------------------------------------------------- bootstrap
@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_only", is_flag=True, help="Show what would be created; write nothing.")
@click.option("--base-url", metavar="URL", help="For a home that does not exist yet: as 'init --base-url'.")
@click.option("--scrypt-n", type=int, default=None, metavar="N",
              help="For a home that does not exist yet: as 'init --scrypt-n'.")
@click.option("--so-pin-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Officer PIN, when the home must be created.")
@pin_file_option
@json_flag
def bootstrap(file: str, plan_only: bool, base_url: str | None, scrypt_n: int | None,
              so_pin_file: str | None, pin_file: str | None) -> None:
    """Create a whole PKI from one declarative TOML file (idempotent)."""
    from hsm_ca import bootstrap as bs
    from hsm_ca.config import CONFIG_FILE, pin_source, validate_base_url
    from hsm_ca.errors import PolicyViolation

    st = state()
    home_exists = (st.home / CONFIG_FILE).exists()
    authority = st.authority(pin_file) if home_exists else None
    existing = ({r["name"]: r["parent"] for r in authority.store.list_cas()}
                if authority is not None else {})
    spec = bs.load_spec(file, authority.profiles if authority else None, existing)
    if plan_only:
        result = bs.plan(authority, spec)
        if not home_exists:
            result.items.insert(0, bs.PlanItem("home", str(st.home), "create", "soft engine"))
        _render_plan(result, title=f"Plan for {file}")
        if result.drift:
            raise click.exceptions.Exit(1)
        return
    if authority is None:
        from hsm_ca.authority import Authority

        so = pin_source("officer", Path(so_pin_file) if so_pin_file else None,
                        prompt=lambda label: click.prompt(label, hide_input=True, err=True,
                                                          confirmation_prompt=True))
        Authority.initialize(
            st.home, user_pin=st.user_pin_source(pin_file)(), officer_pin=so(),
            base_url=validate_base_url(base_url) if base_url else None, scrypt_n=scrypt_n,
        ).close()
        click.echo(f"initialised home {st.home}", err=True)
        authority = st.authority(pin_file)
    try:
        result = bs.apply(authority, spec, progress=lambda m: click.echo(m, err=True))
    except PolicyViolation:
        _render_plan(bs.plan(authority, spec), title=f"Drift between {file} and the home")
        raise
    created = result.count("create")
    if st.as_json:
        emit_json({"items": [i.as_dict() for i in result.items], "created": created,
                   "exists": result.count("exists")})
    elif created:
        click.echo(f"Created {created} item(s); {result.count('exists')} already existed")
    else:
        click.echo(f"Nothing to create: all {len(result.items)} item(s) in {file} already exist")


def _render_plan(result: object, title: str) -> None:
    items = result.items  # type: ignore[attr-defined]
    if state().as_json:
        emit_json({"items": [i.as_dict() for i in items],
                   "create": sum(1 for i in items if i.action == "create"),
                   "exists": sum(1 for i in items if i.action == "exists"),
                   "drift": sum(1 for i in items if i.action == "drift")})
        return
    print_table(["kind", "name", "action", "detail"],
                [[i.kind, i.name, i.action, i.detail] for i in items], title=title)


# ---------------------------------------------------------------------- HSM
so_pin_option = click.option(
    "--so-pin-file", type=click.Path(dir_okay=False), metavar="FILE",
    help="Read the crypto-officer PIN from FILE (else $HSM_CA_SO_PIN, else a prompt).",
)


def _so_pin(so_pin_file: str | None) -> str:
    from hsm_ca.config import pin_source

    return pin_source("officer", Path(so_pin_file) if so_pin_file else None,
                      prompt=lambda label: click.prompt(label, hide_input=True, err=True))()


def _new_pin(new_pin_file: str | None) -> str:
    import os
    import sys

    from hsm_ca.config import _read_pin_file
    from hsm_ca.errors import ConfigError

    if new_pin_file:
        return _read_pin_file(Path(new_pin_file))
    if os.environ.get("HSM_CA_NEW_PIN"):
        return os.environ["HSM_CA_NEW_PIN"]
    if sys.stdin is not None and sys.stdin.isatty():
        return str(click.prompt("new PIN", hide_input=True, confirmation_prompt=True, err=True))
    raise ConfigError("no new PIN: set $HSM_CA_NEW_PIN, pass --new-pin-file FILE, or run on a terminal")


new_pin_option = click.option(
    "--new-pin-file", type=click.Path(dir_okay=False), metavar="FILE",
    help="Read the new user's PIN from FILE (else $HSM_CA_NEW_PIN, else a prompt).",
)


@click.group()
def hsm() -> None:
    """The built-in HSM engine: users, backup and restore, replica nodes."""


@hsm.group()
def user() -> None:
    """Users of the built-in engine (crypto officer, crypto users, auditors)."""


@user.command("list")
@json_flag
def hsm_user_list() -> None:
    """List users, their roles and lockout state."""
    from hsm_ca.hsm_admin import list_users

    st = state()
    users = [{"name": u.name, "role": u.role.value, "failed_logins": u.failed_logins,
              "locked": u.locked} for u in list_users(st.authority())]
    if st.as_json:
        emit_json(users)
        return
    print_table(["name", "role", "failed logins", "locked"],
                [[u["name"], u["role"], u["failed_logins"], "yes" if u["locked"] else "no"]
                 for u in users])


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["crypto-user", "auditor", "crypto-officer"]),
              default="crypto-user", show_default=True)
@new_pin_option
@so_pin_option
def hsm_user_add(name: str, role: str, new_pin_file: str | None, so_pin_file: str | None) -> None:
    """Add a user (officer only)."""
    from hsm_ca.hsm_admin import add_user

    st = state()
    add_user(st.authority(), _so_pin(so_pin_file), name, role, _new_pin(new_pin_file))
    click.echo(f"Added {role} {name}")


@user.command("remove")
@click.argument("name")
@so_pin_option
def hsm_user_remove(name: str, so_pin_file: str | None) -> None:
    """Remove a user (officer only)."""
    from hsm_ca.hsm_admin import remove_user

    remove_user(state().authority(), _so_pin(so_pin_file), name)
    click.echo(f"Removed {name}")


@user.command("unlock")
@click.argument("name")
@so_pin_option
def hsm_user_unlock(name: str, so_pin_file: str | None) -> None:
    """Unlock a user locked out by failed logins (officer only)."""
    from hsm_ca.hsm_admin import unlock_user

    unlock_user(state().authority(), _so_pin(so_pin_file), name)
    click.echo(f"Unlocked {name}")


@user.command("change-pin")
@click.argument("name")
@new_pin_option
@so_pin_option
def hsm_user_change_pin(name: str, new_pin_file: str | None, so_pin_file: str | None) -> None:
    """Set a user's PIN (officer only); re-wraps one blob, not every key."""
    from hsm_ca.hsm_admin import change_pin

    change_pin(state().authority(), _so_pin(so_pin_file), name, _new_pin(new_pin_file))
    click.echo(f"Changed the PIN of {name}")


@hsm.command("backup")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FILE")
@click.option("--scrypt-n", type=int, default=None, metavar="N",
              help="scrypt cost of the backup key (default 65536).")
@so_pin_option
@json_flag
def hsm_backup(output: str, scrypt_n: int | None, so_pin_file: str | None) -> None:
    """Write the partition and the database, encrypted under the officer PIN."""
    from hsm_ca.hsm_admin import BACKUP_SCRYPT_N, backup

    st = state()
    with translate_os_errors(f"cannot write {output}"):
        info = backup(st.authority(), _so_pin(so_pin_file), Path(output),
                      scrypt_n=scrypt_n or BACKUP_SCRYPT_N)
    if st.as_json:
        emit_json(info)
    else:
        click.echo(f"Backup written to {output} ({info['bytes']} bytes, encrypted)")


@hsm.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@so_pin_option
def hsm_restore(file: str, so_pin_file: str | None) -> None:
    """Recreate a whole CA home (which must not exist yet) from a backup."""
    from hsm_ca.hsm_admin import restore_into

    st = state()
    blob = read_input_file(file, limit=1 << 30)
    restore_into(blob, _so_pin(so_pin_file), st.home).close()
    click.echo(f"Restored {file} into {st.home}")


@hsm.group()
def node() -> None:
    """Replica partitions of the built-in engine."""


@node.command("add")
@click.argument("path", type=click.Path(file_okay=False))
@so_pin_option
@json_flag
def hsm_node_add(path: str, so_pin_file: str | None) -> None:
    """Add (or re-add) a replica partition at PATH; it is synced at once."""
    from hsm_ca.hsm_admin import add_node

    st = state()
    nodes = add_node(st.authority(), _so_pin(so_pin_file), Path(path))
    if st.as_json:
        emit_json(nodes)
    else:
        click.echo(f"Node {path} added; {sum(1 for n in nodes if n['health'] == 'ok')} of "
                   f"{len(nodes)} nodes healthy")


@node.command("list")
@json_flag
def hsm_node_list() -> None:
    """Each node's path, health and generation."""
    from hsm_ca.hsm_admin import list_nodes

    st = state()
    nodes = list_nodes(st.authority())
    if st.as_json:
        emit_json(nodes)
        return
    print_table(["path", "health", "generation", "detail"],
                [[n["path"], n["health"], n["generation"], n["detail"]] for n in nodes])
