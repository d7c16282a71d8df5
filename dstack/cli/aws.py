"""`dstack config aws`: where and what dstack may rent on EC2 when no host fits a job."""

from __future__ import annotations

import typer

from dstack.cli.apps import new_app

app = new_app(
    help="Let dstack launch EC2 instances for jobs no host fits (credentials: boto3's usual chain).",
    invoke_without_command=True,
)


@app.callback()
def aws(
    region: list[str] | None = typer.Option(None, "--region", help="A region to launch in (repeat)."),
    instance_type: list[str] | None = typer.Option(
        None, "--type", help="An allowed instance type or glob, e.g. g5.xlarge or 'g5.*' (repeat)."
    ),
    spot: bool | None = typer.Option(None, "--spot/--no-spot", help="Try spot instances first."),
    on_demand: bool | None = typer.Option(
        None, "--on-demand/--no-on-demand", help="Use on-demand when spot is off or refused."
    ),
    max_price: float | None = typer.Option(None, "--max-price", help="Most USD per hour per instance."),
    max_instances: int | None = typer.Option(None, "--max-instances", help="Most instances at once."),
    idle_timeout: int | None = typer.Option(
        None, "--idle-timeout", help="Seconds idle before an instance is terminated."
    ),
    ami: str | None = typer.Option(None, "--ami", help="An AMI id (default: newest deep-learning AMI)."),
    ami_name: str | None = typer.Option(None, "--ami-name", help="AMI name pattern to look up."),
    ami_owner: str | None = typer.Option(None, "--ami-owner", help="Owner of the AMI name pattern."),
    ssh_user: str | None = typer.Option(None, "--ssh-user", help="The AMI's login user."),
    key_name: str | None = typer.Option(
        None, "--key-name", help="An existing key pair (default: dstack's own, in $DSTACK_HOME/aws)."
    ),
    key_file: str | None = typer.Option(None, "--key-file", help="The private key of --key-name."),
    disk: int | None = typer.Option(None, "--disk", help="Root disk size in GiB."),
    ssh_cidr: str | None = typer.Option(None, "--ssh-cidr", help="Who may reach port 22 (CIDR)."),
    reset: bool = typer.Option(False, "--reset", help="Start again from the defaults."),
    off: bool = typer.Option(False, "--off", help="Forget the settings: launch nothing more."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Set AWS settings (only those given change) and print them."""
    from dstack.cli import ui
    from dstack.cloud.config import config_json, configure, remove_config
    from dstack.store.state import open_state

    with open_state() as state:
        if off:
            remove_config(state)
            ui.info("AWS is off: dstack launches no instances (running ones are still reaped).")
            return
        config = configure(
            state,
            reset=reset,
            regions=region or None,
            instance_types=instance_type or None,
            spot=spot,
            on_demand=on_demand,
            max_price=max_price,
            max_instances=max_instances,
            idle_timeout=idle_timeout,
            ami=ami,
            ami_name=ami_name,
            ami_owner=ami_owner,
            ssh_user=ssh_user,
            key_name=key_name,
            key_file=key_file,
            disk_gib=disk,
            ssh_cidr=ssh_cidr,
        )
    data = config_json(config)
    if as_json:
        ui.print_json(data)
        return
    ui.table(
        ["Setting", "Value"],
        [
            [k, ", ".join(v) if isinstance(v, list) else ("-" if v is None else str(v))]
            for k, v in data.items()
        ],
    )


def register(parent: typer.Typer) -> None:
    """Mount as a plain command `aws` of `parent` (`dstack config aws`), the alternative to add_typer."""
    parent.command("aws", help=app.info.help)(aws)
