"""`dstack runs delete|prune` and `dstack gc`: keeping storage in check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from dstack.cli.apps import new_app


def runs_group(list_runs: Callable[..., Any]) -> typer.Typer:
    """`dstack runs` as a group: bare, it lists runs (`list_runs` is its callback); plus delete and prune."""
    group = new_app(help="List runs, newest first; delete or prune old ones.")
    group.callback(invoke_without_command=True)(list_runs)
    group.command("delete")(delete)
    group.command("prune")(prune)
    return group


def register(app: typer.Typer) -> None:
    app.command("gc", help="Remove artifacts no kept run or tag needs, old work dirs and venvs.")(gc)


def delete(
    runs: list[str] = typer.Argument(..., help="Run names or prefixes."),
    force: bool = typer.Option(False, "--force", help="Delete tagged runs too (their tags go with them)."),
) -> None:
    """Delete runs: they stay in lineage but no longer keep their artifacts (`dstack gc` frees them)."""
    from dstack.cli import ui
    from dstack.gc import delete_runs
    from dstack.store.state import open_state

    with open_state() as state:
        deleted = delete_runs(state, runs, force=force)
    names = ", ".join(r.name for r in deleted)
    ui.info(f"Deleted {len(deleted)} run(s): {names}. `dstack gc` frees their artifacts.")


def prune(
    older_than: str = typer.Option(..., "--older-than", help="Age, e.g. 30d, 12h, 2w."),
    workflow: str = typer.Option(None, "--workflow", help="Only runs of this workflow."),
    force: bool = typer.Option(False, "--force", help="Delete tagged runs too (their tags go with them)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say which runs, delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Delete the runs created longer ago than --older-than (never active ones; tagged ones with --force)."""
    from dstack.cli import ui
    from dstack.gc import parse_age, prune_runs
    from dstack.store.state import open_state

    age = parse_age(older_than)
    with open_state() as state:
        result = prune_runs(state, age, workflow=workflow, force=force, dry_run=dry_run)
    if as_json:
        ui.print_json(
            {
                "dry_run": dry_run,
                "deleted": [r.name for r in result.deleted],
                "skipped": [{"name": r.name, "why": why} for r, why in result.skipped],
            }
        )
        return
    verb = "Would delete" if dry_run else "Deleted"
    ui.info(f"{verb} {len(result.deleted)} run(s) older than {older_than}.")
    for run, why in result.skipped:
        ui.info(f"Kept {run.name}: {why}.")


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be freed, remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Remove what no kept run or tag references, here and in the bucket; print what was freed."""
    from dstack.cli import ui
    from dstack.gc import collect
    from dstack.store import open_object_store
    from dstack.store.state import open_state

    with open_state() as state:
        result = collect(state, open_object_store(state), dry_run=dry_run)
    if as_json:
        ui.print_json(
            {
                "store": result.store,
                "dry_run": result.dry_run,
                "shared": result.shared,
                "grace_s": result.grace_s,
                "freed": [{"what": f.what, "count": f.count, "bytes": f.bytes} for f in result.freed],
                "freed_bytes": result.total_bytes,
                "spared_young_objects": result.spared_young,
                "kept_objects": result.kept_objects,
                "kept_bytes": result.kept_bytes,
            }
        )
        return
    ui.table(
        ["Removed" if not dry_run else "Would remove", "Count", "Size"],
        [[f.what, f.count, ui.size(f.bytes)] for f in result.freed if f.count],
        title=f"dstack gc{' --dry-run' if dry_run else ''} ({result.store})",
    )
    verb = "Would free" if dry_run else "Freed"
    ui.info(
        f"{verb} {ui.size(result.total_bytes)}; kept {result.kept_objects} object(s), "
        f"{ui.size(result.kept_bytes)}"
        + (
            f"; spared {result.spared_young} unreferenced object(s) younger than {result.grace_s:g}s"
            if result.spared_young
            else ""
        )
        + "."
    )
