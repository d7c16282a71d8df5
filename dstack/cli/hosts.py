"""`dstack hosts`: the runners jobs are placed on (this machine, SSH hosts, EC2 instances)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from dstack.cli.apps import new_app

if TYPE_CHECKING:
    from dstack.metrics.summary import HostUsage

app = new_app(
    help="Runners: this machine (`local`), your hosts over SSH, and EC2 instances dstack launched.",
    invoke_without_command=True,
)


@app.callback()
def hosts(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    cloud: bool = typer.Option(False, "--cloud", help="List what dstack created in the AWS account."),
) -> None:
    """List runners with their hardware, status and the jobs on them now."""
    if ctx.invoked_subcommand is not None:
        return
    if cloud:
        _cloud(as_json)
        return
    from dstack.cli import ui
    from dstack.hosts import list_hosts
    from dstack.store.state import open_state

    with open_state() as state:
        items = list_hosts(state.db)
        busy: dict[str, list[str]] = {}
        for job in state.jobs(statuses=("starting", "running")):
            for name in (job.runner or "local").split("+"):  # a multi-node job is on each of its hosts
                busy.setdefault(name, []).append(f"{job.run_name}/{job.workflow}")
        from dstack.metrics.summary import host_usage

        usage = host_usage(state)  # from the latest samples of jobs running there now
        cloud_info = {}
        for h in items:
            if h.kind == "ec2":
                from dstack.backends.ec2 import describe

                cloud_info[h.name] = describe(state, h)
    if as_json:
        ui.print_json(
            [
                {
                    **h.to_json(),
                    "jobs": busy.get(h.name, []),
                    "usage": usage[h.name].to_json() if h.name in usage else None,
                    **({"cloud": cloud_info[h.name]} if h.name in cloud_info else {}),
                }
                for h in items
            ]
        )
        return
    rows = []
    for h in items:
        cap = h.capacity
        gpus = (
            ", ".join(f"{g.name} ({g.memory_mib // 1024} GB)" for g in cap.gpus) if cap and cap.gpus else ""
        )
        where = h.address or h.hostname or ""
        if h.name in cloud_info:
            c = cloud_info[h.name]
            where = f"{c.get('instance_type')} {'spot' if c.get('spot') else 'on-demand'} ${c.get('price')}/h"
            if c.get("idle_s") is not None:
                where += f", idle {int(c['idle_s'])}s"
        if h.kind == "slurm":
            from dstack.backends.slurm_cluster import SlurmCluster

            where += f" ({SlurmCluster.from_json(h.cloud).summary()})"
        status = h.status if h.enabled else "disabled"
        rows.append(
            [
                h.name,
                h.kind,
                where,
                f"{cap.cpus:g}" if cap else "",
                ui.size((cap.memory_mib if cap else 0) * 1024 * 1024) if cap else "",
                gpus,
                "yes" if cap and cap.docker else "",
                ui.status(status)
                if status == "ready"
                else ui.status("failed" if status == "unreachable" else status),
                *_usage_cells(usage.get(h.name)),
                ", ".join(busy.get(h.name, [])) or (h.last_error or ""),
            ]
        )
    columns = ["Host", "Kind", "Address", "CPUs", "Memory", "GPUs", "Docker", "Status"]
    ui.table([*columns, "CPU use", "Mem use", "GPU use", "Jobs"], rows)


def _usage_cells(u: HostUsage | None) -> list[str]:
    """CPU %, memory used (and %) and GPU % of a host now; blanks when nothing running there sampled it."""
    if u is None or u.cpu_percent is None:
        return ["", "", ""]
    from dstack.metrics.summary import human_bytes

    mem = ""
    if u.memory_used is not None and u.memory_total:
        mem = f"{human_bytes(u.memory_used)} ({u.memory_used / u.memory_total:.0%})"
    return [f"{u.cpu_percent:.0f}%", mem, "" if u.gpu_util is None else f"{u.gpu_util:.0f}%"]


def _cloud(as_json: bool) -> None:
    from dstack.cli import ui
    from dstack.cloud.inventory import list_cloud
    from dstack.store.state import open_state

    with open_state() as state:
        entries = list_cloud(state)
    if as_json:
        ui.print_json(
            [
                {
                    "name": e.resource.id,
                    "kind": e.resource.kind,
                    "region": e.resource.region,
                    "known": e.known,
                    "mine": e.mine,
                    "state": getattr(e.resource, "state", None),
                }
                for e in entries
            ]
        )
        return
    ui.table(
        ["Resource", "Kind", "Region", "State", "Known to dstack"],
        [
            [
                e.resource.id,
                e.resource.kind,
                e.resource.region,
                getattr(e.resource, "state", ""),
                "yes" if e.known else "no",
            ]
            for e in entries
        ],
    )


@app.command("add")
def add(
    address: str = typer.Argument(..., help="user@host[:port], or a Host alias from ~/.ssh/config."),
    name: str = typer.Option(None, "--name", help="What to call it (default: the host)."),
    identity: str = typer.Option(None, "-i", "--identity", help="The private key to log in with."),
    proxy_jump: str = typer.Option(None, "-J", "--proxy-jump", help="Jump through this host."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Accept the host's key without asking."),
    slurm: bool = typer.Option(
        False, "--slurm", help="It is a Slurm cluster's login node: jobs go via sbatch."
    ),
    partition: str = typer.Option(None, "--partition", help="Slurm: submit to this partition only."),
    account: str = typer.Option(None, "--account", help="Slurm: charge jobs to this account."),
    qos: str = typer.Option(None, "--qos", help="Slurm: the jobs' quality of service."),
    sbatch_args: list[str] = typer.Option(None, "--sbatch-arg", help="Slurm: one more sbatch option."),
    workdir: str = typer.Option(None, "--workdir", help="Slurm: jobs' folder (default ~/.dstack/slurm)."),
) -> None:
    """Register a host reached over SSH: pin its key, probe its CPUs, memory, GPUs and Docker.

    With --slurm, the cluster behind a login node: its partitions and nodes, one runner for all of them."""
    from dstack.backends.slurm_cluster import options_from_cli
    from dstack.cli import ui
    from dstack.hosts import add_host
    from dstack.store.state import open_state

    def accept(fingerprint: str) -> bool:
        ui.info(f"The host {address} is new to dstack. Its key's fingerprint is [bold]{fingerprint}[/bold].")
        if yes:
            return True
        import sys

        if not sys.stdin.isatty():
            ui.info("Not a terminal: pass --yes to accept it.")
            return False
        return typer.confirm("Trust it and pin it?", default=False)

    with open_state() as state:
        host = add_host(
            state.db,
            address,
            name=name,
            identity=identity,
            accept=accept,
            proxy_jump=proxy_jump,
            slurm=options_from_cli(slurm, partition, account, qos, sbatch_args, workdir),
        )
    if host.kind == "slurm":
        from dstack.backends.slurm_cluster import SlurmCluster

        cluster = SlurmCluster.from_json(host.cloud)
        ui.info(
            f"Added Slurm cluster [bold]{host.name}[/bold] (Slurm {cluster.version}): {cluster.summary()}"
        )
        return
    cap = host.capacity
    gpus = f", {len(cap.gpus)} GPU(s)" if cap and cap.gpus else ""
    ui.info(
        f"Added host [bold]{host.name}[/bold] ({host.user}@{host.hostname}:{host.port}): "
        f"{cap.cpus:g} CPUs, {ui.size(cap.memory_mib * 1024 * 1024)} memory{gpus}"
        + (", Docker" if cap.docker else "")
        if cap
        else f"Added host {host.name}."
    )


@app.command("check")
def check(name: str = typer.Argument(None, help="One host (default: all).")) -> None:
    """Probe hosts again: what they have now, and whether they answer."""
    from dstack.cli import ui
    from dstack.hosts import check_host, check_hosts
    from dstack.store.state import open_state

    with open_state() as state:
        items = [check_host(state.db, name)] if name else check_hosts(state.db)
    for h in items:
        if h.status == "ready" and h.kind == "slurm":
            from dstack.backends.slurm_cluster import SlurmCluster

            ui.info(f"{h.name}: [green]ready[/green] {SlurmCluster.from_json(h.cloud).summary()}")
        elif h.status == "ready":
            ui.info(f"{h.name}: [green]ready[/green]")
        else:
            ui.info(f"{h.name}: [red]{h.status}[/red] {h.last_error or ''}")


@app.command("remove")
def remove(
    name: str = typer.Argument(..., help="The host."),
    force: bool = typer.Option(False, "--force", help="Terminate an EC2 instance even with jobs on it."),
) -> None:
    """Forget a host (an EC2 instance dstack launched is terminated)."""
    from dstack.cli import ui
    from dstack.hosts import get, remove_host
    from dstack.store.state import open_state

    with open_state() as state:
        host = get(state.db, name)
        if host.kind == "ec2":
            from dstack.backends.ec2 import terminate

            terminate(state, name, force=force)
        else:
            remove_host(state.db, name)
    ui.info(f"Removed host {name}.")


@app.command("prune")
def prune() -> None:
    """Remove cloud resources dstack created and no longer knows about."""
    from dstack.cli import ui
    from dstack.cloud.inventory import prune as prune_cloud
    from dstack.store.state import open_state

    with open_state() as state:
        result = prune_cloud(state)
    for item in result.removed:
        ui.info(f"removed {item.kind} {item.id} ({item.region})")
    for note in result.notes:
        ui.info(note)
    if not result.removed:
        ui.info("Nothing to prune.")


@app.command("disable")
def disable(name: str = typer.Argument(..., help="Runner name (`local` is this machine).")) -> None:
    """Stop placing jobs on a runner."""
    from dstack.cli import ui
    from dstack.hosts import set_enabled
    from dstack.store.state import open_state

    with open_state() as state:
        set_enabled(state.db, name, False)
    ui.info(f"{name} takes no new jobs.")


@app.command("enable")
def enable(name: str = typer.Argument(..., help="Runner name.")) -> None:
    """Place jobs on a runner again."""
    from dstack.cli import ui
    from dstack.hosts import set_enabled
    from dstack.store.state import open_state

    with open_state() as state:
        set_enabled(state.db, name, True)
    ui.info(f"{name} takes jobs.")
