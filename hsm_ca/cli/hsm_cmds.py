"""The hsm command group: users, backup and restore, nodes. No logic here: parse, call one service method, render."""

from __future__ import annotations

from typing import Any

import click

from hsm_ca.cli.base import (
    emit_json,
    json_flag,
    read_input_file,
    report_rows,
    state,
    translate_os_errors,
)
from hsm_ca.cli.options import Path

# ---------------------------------------------------------------------- HSM
so_pin_option = click.option(
    "--so-pin-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read the crypto-officer PIN from FILE (else $HSM_CA_SO_PIN, else a prompt).",
)


def _so_pin(so_pin_file: str | None) -> str:
    from hsm_ca.config import pin_source

    return pin_source(
        "officer",
        Path(so_pin_file) if so_pin_file else None,
        prompt=lambda label: click.prompt(label, hide_input=True, err=True),
    )()


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
    raise ConfigError(
        "no new PIN: set $HSM_CA_NEW_PIN, pass --new-pin-file FILE, or run on a terminal"
    )


new_pin_option = click.option(
    "--new-pin-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read the new user's PIN from FILE (else $HSM_CA_NEW_PIN, else a prompt).",
)


def _done(doc: dict[str, Any], text: str) -> None:
    """One JSON document with --json, a line of text otherwise."""
    if state().as_json:
        emit_json(doc)
    else:
        click.echo(text)


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
    users = [
        {"name": u.name, "role": u.role.value, "failed_logins": u.failed_logins, "locked": u.locked}
        for u in list_users(st.authority())
    ]
    report_rows(
        users,
        ["name", "role", "failed logins", "locked"],
        lambda u: [u["name"], u["role"], u["failed_logins"], "yes" if u["locked"] else "no"],
    )


@user.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["crypto-user", "auditor", "crypto-officer"]),
    default="crypto-user",
    show_default=True,
)
@new_pin_option
@so_pin_option
@json_flag
def hsm_user_add(name: str, role: str, new_pin_file: str | None, so_pin_file: str | None) -> None:
    """Add a user (officer only)."""
    from hsm_ca.hsm_admin import add_user

    st = state()
    add_user(st.authority(), _so_pin(so_pin_file), name, role, _new_pin(new_pin_file))
    _done({"user": name, "role": role, "added": True}, f"Added {role} {name}")


@user.command("remove")
@click.argument("name")
@so_pin_option
@json_flag
def hsm_user_remove(name: str, so_pin_file: str | None) -> None:
    """Remove a user (officer only)."""
    from hsm_ca.hsm_admin import remove_user

    remove_user(state().authority(), _so_pin(so_pin_file), name)
    _done({"user": name, "removed": True}, f"Removed {name}")


@user.command("unlock")
@click.argument("name")
@so_pin_option
@json_flag
def hsm_user_unlock(name: str, so_pin_file: str | None) -> None:
    """Unlock a user locked out by failed logins (officer only)."""
    from hsm_ca.hsm_admin import unlock_user

    unlock_user(state().authority(), _so_pin(so_pin_file), name)
    _done({"user": name, "unlocked": True}, f"Unlocked {name}")


@user.command("change-pin")
@click.argument("name")
@new_pin_option
@so_pin_option
@json_flag
def hsm_user_change_pin(name: str, new_pin_file: str | None, so_pin_file: str | None) -> None:
    """Set a user's PIN (officer only); re-wraps one blob, not every key."""
    from hsm_ca.hsm_admin import change_pin

    change_pin(state().authority(), _so_pin(so_pin_file), name, _new_pin(new_pin_file))
    _done({"user": name, "pin_changed": True}, f"Changed the PIN of {name}")


@hsm.command("backup")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FILE")
@click.option(
    "--scrypt-n",
    type=int,
    default=None,
    metavar="N",
    help="scrypt cost of the backup key (default 65536, or the partition's own if higher; "
    "at least 16384 and the partition's own).",
)
@so_pin_option
@json_flag
def hsm_backup(output: str, scrypt_n: int | None, so_pin_file: str | None) -> None:
    """Write the partition and the database, encrypted under the officer PIN."""
    from hsm_ca.fileio import OutputFile
    from hsm_ca.hsm_admin import backup

    st = state()
    # checked before the officer login, the KDF and the snapshot: a backup that cannot be
    # written is refused before any of that work; backup() then writes through this same
    # object (a FIFO stays open, never reopened; a regular file is replaced atomically)
    dest = OutputFile(output, 0o600, what="backup file")
    click.get_current_context().call_on_close(dest.close)
    with translate_os_errors(f"cannot write {output}"):
        info = backup(st.authority(), _so_pin(so_pin_file), dest, scrypt_n=scrypt_n)
    if st.as_json:
        emit_json(info)
    else:
        click.echo(f"Backup written to {output} ({info['bytes']} bytes, encrypted)")


@hsm.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@so_pin_option
@json_flag
def hsm_restore(file: str, so_pin_file: str | None) -> None:
    """Recreate a whole CA home (which must not exist yet) from a backup."""
    from hsm_ca.fileio import BACKUP_BYTES
    from hsm_ca.hsm_admin import restore_into

    st = state()
    blob = read_input_file(file, BACKUP_BYTES, what="backup file")
    restore_into(blob, _so_pin(so_pin_file), st.home).close()
    _done({"restored": file, "home": str(st.home)}, f"Restored {file} into {st.home}")


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
        click.echo(
            f"Node {path} added; {sum(1 for n in nodes if n['health'] == 'ok')} of "
            f"{len(nodes)} nodes healthy"
        )


@node.command("list")
@json_flag
def hsm_node_list() -> None:
    """Each node's path, health and generation, and when it was last repaired and why."""
    from hsm_ca.hsm_admin import list_nodes

    st = state()
    nodes = list_nodes(st.authority())
    report_rows(
        nodes,
        ["path", "health", "generation", "detail", "last repair"],
        lambda n: [n["path"], n["health"], n["generation"], n["detail"],
                   f"{n['last_repair']} ({n['last_problem']})" if n.get("last_repair") else "-"],
    )
