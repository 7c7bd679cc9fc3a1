"""The bootstrap command. No logic here: parse, call one service method, render."""

from __future__ import annotations

import click

from hsm_ca.cli.base import emit_json, json_flag, print_table, state
from hsm_ca.cli.options import Path, pin_file_option


# ---------------------------------------------------------------- bootstrap
@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--plan", "plan_only", is_flag=True, help="Show what would be created; write nothing."
)
@click.option(
    "--base-url", metavar="URL", help="For a home that does not exist yet: as 'init --base-url'."
)
@click.option(
    "--scrypt-n",
    type=int,
    default=None,
    metavar="N",
    help="For a home that does not exist yet: as 'init --scrypt-n'.",
)
@click.option(
    "--so-pin-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Officer PIN, when the home must be created.",
)
@pin_file_option
@json_flag
def bootstrap(
    file: str,
    plan_only: bool,
    base_url: str | None,
    scrypt_n: int | None,
    so_pin_file: str | None,
    pin_file: str | None,
) -> None:
    """Create a whole PKI from one declarative TOML file (idempotent)."""
    from hsm_ca import bootstrap as bs
    from hsm_ca.config import CONFIG_FILE, pin_source, validate_base_url
    from hsm_ca.errors import PolicyViolation

    st = state()
    home_exists = (st.home / CONFIG_FILE).exists()
    authority = st.authority(pin_file) if home_exists else None
    existing = (
        {r["name"]: r["parent"] for r in authority.store.list_cas()}
        if authority is not None
        else {}
    )
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

        so = pin_source(
            "officer",
            Path(so_pin_file) if so_pin_file else None,
            prompt=lambda label: click.prompt(
                label, hide_input=True, err=True, confirmation_prompt=True
            ),
        )
        Authority.initialize(
            st.home,
            user_pin=st.user_pin_source(pin_file)(),
            officer_pin=so(),
            base_url=validate_base_url(base_url) if base_url else None,
            scrypt_n=scrypt_n,
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
        emit_json(
            {
                "items": [i.as_dict() for i in result.items],
                "created": created,
                "exists": result.count("exists"),
            }
        )
    elif created:
        click.echo(f"Created {created} item(s); {result.count('exists')} already existed")
    else:
        click.echo(f"Nothing to create: all {len(result.items)} item(s) in {file} already exist")


def _render_plan(result: object, title: str) -> None:
    items = result.items  # type: ignore[attr-defined]
    if state().as_json:
        emit_json(
            {
                "items": [i.as_dict() for i in items],
                "create": sum(1 for i in items if i.action == "create"),
                "exists": sum(1 for i in items if i.action == "exists"),
                "drift": sum(1 for i in items if i.action == "drift"),
            }
        )
        return
    print_table(
        ["kind", "name", "action", "detail"],
        [[i.kind, i.name, i.action, i.detail] for i in items],
        title=title,
    )
