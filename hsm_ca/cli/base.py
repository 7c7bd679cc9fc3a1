"""CLI plumbing: shared state, error mapping, output helpers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from pathlib import Path

    from hsm_ca.authority import Authority
    from hsm_ca.config import HomeConfig


class State:
    """Global options, plus the opened authority (closed when the command ends)."""

    def __init__(
        self, home_flag: str | None, as_json: bool, debug: bool, pin_file: str | None
    ) -> None:
        self.home_flag = home_flag
        self.as_json = as_json
        self.debug = debug
        self.pin_file = pin_file
        self._authority: Authority | None = None

    @property
    def home(self) -> Path:
        from hsm_ca.config import resolve_home

        return resolve_home(self.home_flag)

    def config(self) -> HomeConfig:
        from hsm_ca.config import load_config
        from hsm_ca.staging import sweep

        home = self.home
        sweep(home)  # what a killed init or restore of this home left beside it (staging.py)
        return load_config(home)

    def user_pin_source(self, pin_file: str | None = None) -> Any:
        from pathlib import Path

        from hsm_ca.config import pin_source

        chosen = pin_file or self.pin_file
        return pin_source("user", Path(chosen) if chosen else None, prompt=hidden_prompt)

    def authority(self, pin_file: str | None = None) -> Authority:
        if self._authority is None:
            from hsm_ca.authority import Authority

            self._authority = Authority(self.config(), pin=self.user_pin_source(pin_file))
            click.get_current_context().call_on_close(self._authority.close)
        return self._authority


def hidden_prompt(label: str) -> str:
    return click.prompt(label, hide_input=True, err=True)


class HsmCaGroup(click.Group):
    """A group whose ``run`` turns every failure into one ``Error:`` line."""

    def run(self, argv: list[str] | None) -> int:
        debug = "--debug" in (argv if argv is not None else sys.argv[1:])
        try:
            rv = self.main(args=argv, prog_name="hsm-ca", standalone_mode=False)
            return rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.exceptions.Abort:
            click.echo("Error: aborted", err=True)
            return 1
        except click.ClickException as e:
            if debug:
                raise
            click.echo(f"Error: {e.format_message()}", err=True)
            return e.exit_code
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            return 130
        except BrokenPipeError:
            return 1
        except Exception as e:
            from hsm_ca.errors import HsmCaError

            if debug:
                raise
            if isinstance(e, HsmCaError):
                click.echo(f"Error: {_one_line(str(e))}", err=True)
                return e.exit_code
            if isinstance(e, OSError) and e.strerror:  # e.g. stdout on a full disk
                from hsm_ca.fileio import show_path

                where = f" ({show_path(e.filename)})" if e.filename else ""
                click.echo(f"Error: {e.strerror}{where}", err=True)
                return 1
            click.echo(
                f"Error: internal error ({type(e).__name__}); run with --debug for details",
                err=True,
            )
            return 1


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "failed"


def json_flag(f: Any) -> Any:
    """``--json`` accepted after the command too, as people type it there."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.find_object(State).as_json = True  # type: ignore[union-attr]
        return value

    return click.option(
        "--json",
        "_json",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        is_eager=True,
        help="Print one JSON document instead of text.",
    )(f)


def state() -> State:
    return click.get_current_context().find_object(State)  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    import json

    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def report_rows(rows: list[Any], headers: list[str], cells: Any) -> None:
    """A listing: the rows as one JSON array with --json, else a table of ``cells(row)``."""
    if state().as_json:
        emit_json(rows)
    else:
        print_table(headers, [cells(r) for r in rows])


def print_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        table.add_column(c, no_wrap=c in ("serial", "seq", "label"), overflow="fold")
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    console = Console(soft_wrap=False)
    if not console.is_terminal:  # pipes and files get whole lines, not an 80-column fold
        console = Console(soft_wrap=False, width=240)
    console.print(table)


def output_file(path: str | Path, mode: int = 0o644, what: str = "output file") -> Any:
    """A command's output file, checked now, before the work (see fileio.OutputFile)."""
    from hsm_ca.fileio import OutputFile

    return OutputFile(path, mode, what)


def write_output(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Check and write a command's output file atomically (no work was done for it)."""
    with output_file(path, mode) as out:
        out.write(data)


def echo_after(text: str | bytes, done: str) -> None:
    """Print a result on stdout after work was ``done``; a failed write says what was done.

    ``hsm-ca sign x.csr > /dev/full`` must not lose the serial of the
    certificate it issued: the error (on stderr) names it.
    """
    import os

    try:
        if isinstance(text, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(text)
            sys.stdout.buffer.flush()
        else:
            click.echo(text, nl=False)
            sys.stdout.flush()
    except OSError as e:
        from hsm_ca.fileio import OutputError

        # nothing more can go to this stdout; keep the exit-time flush from failing again
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputError(
            f"cannot write to standard output: {e.strerror or type(e).__name__}; {done}"
        ) from None


@contextmanager
def translate_os_errors(what: str) -> Iterator[None]:
    from hsm_ca.errors import HsmCaError

    try:
        yield
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise HsmCaError(f"{what}: {reason}") from e


def read_input_file(path: str, limit: int | None = None, what: str = "file") -> bytes:
    """A user-named input: a regular file within ``limit`` (see fileio for the limits)."""
    from hsm_ca.fileio import PEM_BYTES, read_regular_file

    return read_regular_file(path, PEM_BYTES if limit is None else limit, what)
