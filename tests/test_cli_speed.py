"""`dstack runs` without typer (dstack.cli.entry): the same output, options and errors as the typer command."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys

from helpers import dstack

from dstack.cli.entry import parse_listing, parse_run
from dstack.store.fresh import create_state_file
from dstack.store.state import MIGRATIONS

HELLO = """\
workflows:
  - name: hello
    provider: bash
    commands:
      - echo "hi $who"
"""
VARIABLES = """\
variables:
  hello:
    who: me
"""
TYPER = "import sys; sys.argv[0] = 'dstack'; from dstack.cli.main import main; main()"


def typer_path(*args: str, cwd: object) -> subprocess.CompletedProcess[str]:
    """The same command through the typer app, never the fast path."""
    return subprocess.run(
        [sys.executable, "-c", TYPER, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def steady(text: str) -> str:
    """A listing with its clock columns ("3s ago") made comparable between two calls."""
    return re.sub(r"\b\d+s ago\b", "Ns ago", text).replace("python -m dstack", "dstack")


ARGS = [
    ("runs",),
    ("runs", "--json"),
    ("ps", "-n", "1"),
    ("runs", "--all", "--json", "--limit=1"),
    ("--debug", "runs", "-a"),
    ("runs", "-n", "x"),
    ("runs", "--sweep", "nope"),
    ("runs", "--sweep=nope", "--json"),
    ("runs", "--help"),
    ("runs", "--bogus"),
]


def test_fast_listing_prints_what_typer_prints(make_repo):
    repo = make_repo({".dstack/workflows.yaml": HELLO, ".dstack/variables.yaml": VARIABLES})
    dstack("run", "hello", "--who", "you", cwd=repo)
    dstack("run", "hello", "--force", cwd=repo)
    for args in ARGS:
        fast = dstack(*args, cwd=repo, check=False)
        slow = typer_path(*args, cwd=repo)
        assert (fast.code, steady(fast.out), steady(fast.err)) == (
            slow.returncode,
            steady(slow.stdout),
            steady(slow.stderr),
        ), args


def test_fast_listing_imports_no_typer(make_repo):
    repo = make_repo({".dstack/workflows.yaml": HELLO})
    dstack("run", "hello", cwd=repo)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dstack", "runs", "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout)[0]["status"] == "done"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert not {"typer", "click", "rich", "pydantic"} & imported


def test_parse_listing_leaves_the_rest_to_typer():
    assert parse_listing(["runs"]) == {"limit": 20, "all_": False, "sweep": None, "as_json": False}
    assert parse_listing(["ps", "--json", "-n", "3", "--sweep", "s1"]) == {
        "limit": 3,
        "all_": False,
        "sweep": "s1",
        "as_json": True,
    }
    for argv in (["runs", "-h"], ["runs", "delete", "x"], ["runs", "-n"], ["runs", "-n", "-1"], ["jobs"], []):
        assert parse_listing(argv) is None, argv


def test_a_rerun_of_a_local_job_imports_no_typer_or_pydantic(make_repo):
    """A one-step local job whose plan is remembered: no typer, pydantic, YAML or rich before it ends."""
    repo = make_repo({".dstack/workflows.yaml": HELLO, ".dstack/variables.yaml": VARIABLES})
    dstack("run", "hello", cwd=repo)  # works the plan out (and remembers it)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dstack", "run", "hello", "--force"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout == "hi me\n"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert not {"typer", "click", "rich", "pydantic", "yaml"} & imported
    assert json.loads(dstack("runs", "--json", cwd=repo).out)[0]["status"] == "done"


def test_fast_run_prints_what_typer_prints(make_repo):
    repo = make_repo({".dstack/workflows.yaml": HELLO, ".dstack/variables.yaml": VARIABLES})
    for args in (("run", "hello", "--force"), ("run", "nope"), ("--debug", "run", "hello", "--keep")):
        fast = dstack(*args, cwd=repo, check=False)
        slow = typer_path(*args, cwd=repo)
        names = r"Run \S+ done in \d+\.\ds|Run \S+:"
        assert (fast.code, fast.out, re.sub(names, "Run", fast.err)) == (
            slow.returncode,
            slow.stdout,
            re.sub(names, "Run", slow.stderr),
        ), args
    assert parse_run(["run", "hello", "-d", "--host=box"]) == {
        "workflow": "hello",
        "host": "box",
        "detach": True,
    }
    for argv in (["run", "hello", "--lr", "1"], ["run", "hello", "x"], ["run", "-h"], ["run", "hello", "--"]):
        assert parse_run(argv) is None, argv


def test_a_new_state_is_built_aside_with_the_whole_schema(dstack_home, tmp_path):
    assert "No runs yet" in dstack("runs", cwd=tmp_path).err  # the first command makes the state
    state = dstack_home / "state.sqlite"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert sorted(p.name for p in dstack_home.iterdir() if "sqlite" in p.name) == ["state.sqlite"]
    in_place = sqlite3.connect(tmp_path / "in-place.sqlite", isolation_level=None)
    for script in MIGRATIONS:
        for statement in script.split(";"):
            if statement.strip():
                in_place.execute(statement)
    again = tmp_path / "again.sqlite"
    (tmp_path / f".again.sqlite.{os.getpid()}.new").write_text("left by a crashed process with this pid")
    create_state_file(again, MIGRATIONS)
    for made in (sqlite3.connect(state), sqlite3.connect(again)):
        try:
            assert made.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert made.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
            assert made.execute(schema).fetchall() == in_place.execute(schema).fetchall()
        finally:
            made.close()
    in_place.close()
    assert not list(tmp_path.glob(".again.sqlite.*"))
