"""`dstack runs` (`ps`), `dstack jobs`, `dstack logs`, `dstack stop`."""

from __future__ import annotations

import typer

from dstack.cli.following import follow
from dstack.cli.listing import origin_label


def register(app: typer.Typer) -> None:
    from dstack.cli.cleanup import runs_group  # `runs delete|prune` (issue 19)

    app.add_typer(runs_group(runs), name="runs")
    app.command("ps", help="List runs (same as `dstack runs`).", hidden=True)(runs)
    app.command("jobs", help="List the jobs of a run (or of the latest runs).")(jobs)
    app.command("logs", help="Show a run's output; -f follows it to its end.")(logs)
    app.command("stop", help="Stop a run: end its running jobs, cancel the rest.")(stop)
    app.command("lineage", help="Show what made a run's results (or one artifact file).")(lineage)


def runs(
    ctx: typer.Context,
    limit: int = typer.Option(20, "-n", "--limit", help="How many runs."),
    all_: bool = typer.Option(False, "-a", "--all", help="All runs, deleted ones too."),
    sweep: str = typer.Option(None, "--sweep", help="Only the runs of this sweep."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    if ctx.invoked_subcommand:
        return
    from dstack.cli.listing import list_runs

    list_runs(limit=limit, all_=all_, sweep=sweep, as_json=as_json)


def lineage(
    run: str = typer.Argument(..., help="Run name or prefix."),
    path: str = typer.Argument(None, help="One artifact file or folder of the run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    from rich.tree import Tree

    from dstack.cli import ui
    from dstack.lineage import LineageNode, run_lineage
    from dstack.store.state import open_state

    with open_state() as state:
        roots = run_lineage(state, run, path)
    if as_json:
        ui.print_json([r.to_dict() for r in roots])
        return

    def add(tree: Tree, node: LineageNode) -> None:
        variables = " ".join(f"{k}={v}" for k, v in node.variables.items())
        head = f"[bold]{node.workflow}[/bold] {ui.status(node.status)} (run {node.run}, job {node.job_id})"
        branch = tree.add(head)
        commit = (node.commit or "no commit")[:12]
        branch.add(
            f"code: {commit} on {node.branch or '?'}, diff: {node.diff_summary}, "
            f"{node.untracked} untracked file(s)"
        )
        branch.add(f"started by: {origin_label(node.origin)}")
        if variables:
            branch.add(f"variables: {variables}")
        where = f"runner: {node.runner or '-'}" + (f", image: {node.image}" if node.image else "")
        if node.reused_from:
            where += f", reused from job {node.reused_from}"
        branch.add(where)
        if node.tags:
            branch.add(f"tags: {', '.join(node.tags)}")
        if node.artifacts:
            arts = branch.add(f"artifacts ({len(node.artifacts)} files)")
            for a in node.artifacts[:10]:
                arts.add(f"{a['path']} {ui.size(a['size'])} {a['digest'][:12]}")
            if len(node.artifacts) > 10:
                arts.add(f"… {len(node.artifacts) - 10} more")
        for up in node.upstream:
            add(branch, up)

    tree = Tree(f"Lineage of {run}" + (f" {path}" if path else ""))
    for r in roots:
        add(tree, r)
    ui.console().print(tree)


def jobs(
    run: str = typer.Argument(None, help="Run name or prefix (default: the latest runs)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    from dstack.cli import repair_runs as repair
    from dstack.cli import ui
    from dstack.store.state import open_state

    with open_state() as state:
        repair(state)
        if run:
            items = state.jobs(state.run(run).id)
        else:
            items = [j for r in state.runs(limit=10, include_deleted=False) for j in state.jobs(r.id)]
        if as_json:
            ui.print_json(
                [
                    {
                        "name": j.workflow,
                        "id": j.id,
                        "run": j.run_name,
                        "status": j.status,
                        "reason": j.reason,
                        "runner": j.runner,
                        "exit_code": j.exit_code,
                        "reused_from": j.reused_from,
                        "key": j.key,
                        "started_at": j.started_at,
                        "finished_at": j.finished_at,
                    }
                    for j in items
                ]
            )
            return
        rows = [
            [
                j.id,
                j.run_name,
                j.workflow,
                ui.status(j.status),
                j.runner or "",
                j.reason or (f"reused {j.reused_from}" if j.reused_from else ""),
                ui.duration(j.started_at, j.finished_at),
            ]
            for j in items
        ]
        ui.table(["Job", "Run", "Workflow", "Status", "Runner", "Reason", "Took"], rows)


def logs(
    run: str = typer.Argument(..., help="Run name or prefix."),
    follow_: bool = typer.Option(False, "-f", "--follow", help="Follow the output until the run ends."),
    rank: int = typer.Option(0, "--rank", help="A multi-node job's rank N (rank 0's log is the run's)."),
) -> None:
    from dstack.cli import repair_runs as repair
    from dstack.store.state import open_state

    with open_state() as state:
        repair(state)
        run_ = state.run(run)
        if rank:
            import sys

            from dstack.logs import follow_rank

            for data in follow_rank(state, run_.id, rank, follow=follow_):
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            return
        follow(state, run_.id, follow_output=follow_, exit_on_failure=follow_)


def stop(run: str = typer.Argument(..., help="Run name or prefix.")) -> None:
    from dstack.cli import ui
    from dstack.runs import stop_run
    from dstack.store.state import open_state

    with open_state() as state:
        stopped = stop_run(state, run)
        ui.info(f"Stopped run [bold]{stopped.name}[/bold].")
