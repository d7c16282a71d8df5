"""`dstack config`: where artifacts are stored, and cloud settings."""

from __future__ import annotations

import typer

from dstack.cli import aws as aws_cli
from dstack.cli.apps import new_app

app = new_app(help="Configure dstack: artifact storage, AWS.", no_args_is_help=True)
app.add_typer(aws_cli.app, name="aws")


@app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the configuration."""
    from dstack.cli import ui
    from dstack.home import home
    from dstack.settings import read_settings
    from dstack.store.state import open_state

    with open_state() as state:
        settings = read_settings(state)
    if as_json:
        ui.print_json({"home": str(home()), **settings})
        return
    rows = [["home", str(home())]]
    for section, values in settings.items():
        rows += [[f"{section}.{k}", v] for k, v in values.items()]
    ui.table(["Setting", "Value"], rows)


@app.command("storage")
def storage(
    url: str = typer.Argument(..., help="`local`, or s3://bucket/prefix"),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="An S3-compatible server's URL."),
    region: str = typer.Option(None, "--region", help="The bucket's region."),
    profile: str = typer.Option(
        None, "--profile", help="An AWS profile from ~/.aws (credentials stay there)."
    ),
) -> None:
    """Store artifacts locally (the default) or in an S3 bucket (credentials from boto3's usual chain)."""
    from dstack.cli import ui
    from dstack.settings import set_storage
    from dstack.store.state import open_state

    with open_state() as state:
        conf = set_storage(state, url, endpoint_url=endpoint_url, region=region, profile=profile)
    ui.info(f"Artifacts are stored in {conf['url']}.")
