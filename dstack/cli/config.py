"""`dstack config`: where artifacts are stored."""

from __future__ import annotations

import typer

app = typer.Typer(help="Configure dstack (artifact storage).", no_args_is_help=True)


@app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the configuration."""
    import json

    from dstack.cli import ui
    from dstack.home import home
    from dstack.store.state import open_state

    with open_state() as state:
        storage = json.loads(state.setting("storage") or "{}") or {"url": str(home() / "artifacts")}
    if as_json:
        ui.print_json({"home": str(home()), "storage": storage})
        return
    ui.table(["Setting", "Value"], [["home", str(home())]] + [[f"storage.{k}", v] for k, v in storage.items()])
