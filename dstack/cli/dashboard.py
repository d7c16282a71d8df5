"""`dstack ui`: the local dashboard (runs, DAGs, live logs, artifacts, metrics, hosts, tags) in a browser."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("ui", help="Open the local dashboard (127.0.0.1 only, behind a token in its URL).")(ui)


def ui(
    port: int = typer.Option(0, "--port", "-p", help="Port on 127.0.0.1 (default: any free one)."),
    no_open: bool = typer.Option(False, "--no-open", help="Print the URL without opening a browser."),
) -> None:
    from dstack.cli import ui as out
    from dstack.dashboard.server import serve

    server = serve(port)
    out.out(f"dstack ui: {server.url}")
    out.info("[dim]Serving on 127.0.0.1 only; Ctrl+C stops it.[/dim]")
    if not no_open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        out.info("stopped")
    finally:
        server.server_close()
