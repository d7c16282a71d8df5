"""`dstack artifacts list|download|du`."""

from __future__ import annotations

from pathlib import Path

import typer

from dstack.cli.apps import new_app

app = new_app(help="List and download a run's artifacts.", no_args_is_help=True)


@app.command("list")
def list_(
    run: str = typer.Argument(..., help="Run name or prefix."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List every artifact file of a run."""
    from dstack.cli import ui
    from dstack.results import list_artifacts
    from dstack.store.state import open_state

    with open_state() as state:
        run_ = state.run(run)
        items = list_artifacts(state, run_)
    if as_json:
        ui.print_json(
            [
                {"name": a.path, "workflow": a.workflow, "job": a.job_id, "size": a.size, "digest": a.digest}
                for a in items
            ]
        )
        return
    if not items:
        ui.info(f"Run {run_.name} has no artifacts.")
        return
    ui.table(
        ["Workflow", "Path", "Size", "Digest"],
        [[a.workflow, a.path, ui.size(a.size), a.digest[:12]] for a in items],
        title=f"Artifacts of {run_.name}",
    )


@app.command("download")
def download(
    run: str = typer.Argument(..., help="Run name or prefix."),
    path: str = typer.Argument(None, help="Only this file or folder of the artifacts."),
    output: Path = typer.Option(Path("."), "-o", "--output", help="Where to put them."),
) -> None:
    """Download a run's artifacts, every file checked against its digest."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from dstack.cli import ui
    from dstack.results import download_artifacts
    from dstack.store.state import open_state

    with open_state() as state:
        run_ = state.run(run)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=ui.err_console(),
            transient=True,
        ) as progress:
            task = progress.add_task(f"Downloading {run_.name}", total=None)

            def on_progress(p: object) -> None:
                progress.update(
                    task, completed=getattr(p, "done_bytes", 0), total=getattr(p, "total_bytes", 0)
                )

            skipped: list[str] = []
            files = download_artifacts(state, run_, output, path, on_progress, skipped.append)
    for what in skipped:
        ui.info(f"[yellow]Skipped[/yellow] {escape(what)}")
    ui.info(f"Downloaded {len(files)} file(s) of {run_.name} to {output}")


@app.command("du")
def du(
    by: str = typer.Option("workflow", "--by", help="Group by workflow, tag or run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """What kept runs' artifacts take, per workflow, tag or run; each distinct file counted once."""
    from dstack.cli import ui
    from dstack.store import open_object_store
    from dstack.store.state import open_state
    from dstack.usage import disk_usage

    with open_state() as state:
        usage = disk_usage(state, by, open_object_store(state))
    if as_json:
        ui.print_json(
            {
                "by": usage.by,
                "groups": [
                    {"name": r.name, "files": r.files, "bytes": r.bytes, "only_here_bytes": r.only_here}
                    for r in usage.rows
                ],
                "unique_bytes": usage.unique_bytes,
                "logical_bytes": usage.logical_bytes,
                "store_objects": usage.store_objects,
                "store_bytes": usage.store_bytes,
            }
        )
        return
    ui.table(
        [by.capitalize(), "Files", "Size", "Only here"],
        [[r.name, r.files, ui.size(r.bytes), ui.size(r.only_here)] for r in usage.rows],
        title="Artifacts of kept runs",
    )
    ui.info(
        f"Total {ui.size(usage.unique_bytes)} distinct ({ui.size(usage.logical_bytes)} counting every copy). "
        f"Size counts a file shared within a {by} once; 'only here' is what no other {by} shares, "
        f"what deleting it would free."
    )
    if usage.store_bytes is not None:
        ui.info(
            f"The store holds {usage.store_objects} object(s), {ui.size(usage.store_bytes)} "
            "(code snapshots and unreferenced objects included; `dstack gc --dry-run` shows what is free)."
        )
