"""`dstack tags add|list|delete`."""

from __future__ import annotations

from pathlib import Path

import typer

from dstack.cli.apps import new_app

app = new_app(
    help="Name successful runs so workflows can depend on them (`prepare:latest`).", no_args_is_help=True
)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="The tag."),
    run: str = typer.Argument(None, help="The run to tag (name or prefix)."),
    from_path: Path = typer.Option(None, "--from", help="Make the tag from files you already have."),
    force: bool = typer.Option(False, "--force", help="Move the tag if it exists."),
) -> None:
    """Tag a successful run, or files you already have (`--from PATH`)."""
    from dstack.cli import ui
    from dstack.store.state import open_state
    from dstack.tags import add_tag

    with open_state() as state:
        tag = add_tag(state, name, run, from_path, force=force)
    ui.info(
        f"Tagged {tag.run_name} as [bold]{tag.name}[/bold]; depend on it with `:{tag.name}` "
        f"or `WORKFLOW:{tag.name}`."
    )


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List tags."""
    from dstack.cli import ui
    from dstack.store.state import open_state
    from dstack.tags import list_tags

    with open_state() as state:
        tags = list_tags(state)
    if as_json:
        ui.print_json(
            [
                {"name": t.name, "run": t.run_name, "workflows": t.workflows, "created_at": t.created_at}
                for t in tags
            ]
        )
        return
    if not tags:
        ui.info("No tags yet: `dstack tags add NAME RUN`.")
        return
    ui.table(
        ["Tag", "Run", "Workflows", "Created"],
        [[t.name, t.run_name, ", ".join(t.workflows), ui.ago(t.created_at)] for t in tags],
    )


@app.command("delete")
def delete(name: str = typer.Argument(..., help="The tag.")) -> None:
    """Delete a tag (the run and its artifacts stay)."""
    from dstack.cli import ui
    from dstack.store.state import open_state
    from dstack.tags import delete_tag

    with open_state() as state:
        delete_tag(state, name)
    ui.info(f"Deleted tag {name}.")
