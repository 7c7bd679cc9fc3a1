"""The keys command group. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import json_flag, report_rows, state
from hsm_ca.cli.options import pin_file_option


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
    report_rows(
        rows,
        ["label", "key type", "extractable", "used by"],
        lambda r: [
            r["label"],
            r["key_type"],
            "yes" if r["extractable"] else "no",
            r["used_by"] or "-",
        ],
    )
