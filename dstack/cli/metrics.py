"""`dstack metrics RUN [JOB]`: CPU, memory, disk and GPU use per job (current, peak, mean, sparkline)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from dstack.metrics.summary import JobMetrics


def register(app: typer.Typer) -> None:
    app.command("metrics", help="Show a run's hardware use per job: current, peak, mean and a sparkline.")(
        metrics
    )


def metrics(
    run: str = typer.Argument(..., help="Run name (or a unique prefix)."),
    job: str = typer.Argument(None, help="Only this job (workflow name or job id)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Refresh until the run ends."),
    interval: float = typer.Option(2.0, "--every", help="Seconds between refreshes with --follow."),
) -> None:
    from dstack.cli import ui
    from dstack.metrics.summary import run_metrics
    from dstack.store.state import ACTIVE_RUN, open_state

    with open_state() as state:
        while True:
            items = run_metrics(state, run, job)
            active = state.run(run).status in ACTIVE_RUN
            if as_json:
                ui.print_json([m.to_json() for m in items])
            else:
                if follow:
                    ui.console().clear()
                _render(items)
            if not follow or not active:
                return
            time.sleep(interval)


def _render(items: list[JobMetrics]) -> None:
    from rich.text import Text

    from dstack.cli import ui
    from dstack.metrics.summary import format_value, human_bytes, sparkline

    for m in items:
        head = f"[bold]{m.workflow}[/bold] {ui.status_markup(m.status)} on {m.runner or '-'}"
        if not m.samples:
            ui.console().print(
                head + "  [dim]no samples (the job ended before its first, or is waiting)[/dim]"
            )
            continue
        span = ui.duration(m.first_t, m.last_t)
        extra = f", limit {human_bytes(m.limit)}" if m.limit else ""
        ui.console().print(f"{head}  [dim]{m.samples} samples over {span}, {m.source}{extra}[/dim]")
        rows = []
        for s in m.series:
            rows.append(
                [
                    s.label,
                    format_value(s.current, s.unit),
                    format_value(s.peak, s.unit),
                    format_value(s.mean, s.unit),
                    Text(sparkline(s.points), style="cyan"),
                ]
            )
        ui.table(["SERIES", "NOW" if m.status == "running" else "LAST", "PEAK", "MEAN", "HISTORY"], rows)
        ui.out()
