"""`dstack init`, `dstack schema`, `dstack validate`."""

from __future__ import annotations

from pathlib import Path

import typer

STARTER = """\
# dstack workflows: `dstack run --help` lists them, `dstack run hello` runs one.
workflows:
  - name: hello
    help: Say hello and save a file as an artifact
    provider: bash
    commands:
      - mkdir -p output
      - echo "Hello, $name!" | tee output/hello.txt
    artifacts:
      - output
"""
STARTER_VARIABLES = """\
variables:
  hello:
    name: world
"""


def register(app: typer.Typer) -> None:
    app.command("init", help="Create a starter .dstack/ in the current repo.")(init)
    app.command("schema", help="Print the JSON schema of .dstack/workflows.yaml.")(schema)
    app.command("validate", help="Check all of .dstack/ and print every problem.")(validate)


def init(force: bool = typer.Option(False, "--force", help="Overwrite existing files.")) -> None:
    from dstack.cli import ui
    from dstack.errors import UsageError

    root = Path.cwd() / ".dstack"
    target = root / "workflows.yaml"
    if target.exists() and not force:
        raise UsageError(f"{target} exists", hint="pass --force to overwrite it")
    root.mkdir(exist_ok=True)
    target.write_text(STARTER)
    (root / "variables.yaml").write_text(STARTER_VARIABLES)
    ui.info(f"Wrote {target} and {root / 'variables.yaml'}. Try `dstack run hello --name you`.")


def schema() -> None:
    from dstack.cli import ui
    from dstack.workflows import json_schema

    ui.print_json(json_schema())


def validate(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    from dstack.cli import ui
    from dstack.workflows import load_project

    project = load_project(Path.cwd())
    problems = project.validate()
    if as_json:
        ui.print_json([{"file": p.file, "line": p.line, "message": str(p)} for p in problems])
    else:
        for p in problems:
            ui.error(str(p))
        if not problems:
            ui.info(f"{project.root / '.dstack'}: {len(project.names())} workflow(s), no problems.")
    if problems:
        raise typer.Exit(2)
