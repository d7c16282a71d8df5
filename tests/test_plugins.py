"""Providers are plugins: the example in examples/provider-plugin installs and runs as `provider: hello`.

The package is pip-installed into a temporary target folder put on the CLI's PYTHONPATH, so this machine's
Python environment is never changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from helpers import EXAMPLES, dstack

from dstack.providers import BUILTIN

WORKFLOWS = """\
workflows:
  - name: greet
    provider: hello
    commands: ["echo after the greeting"]
  - name: shout
    depends-on: [greet]
    commands: ["tr a-z A-Z < greeting.txt"]
"""
VARIABLES = "variables:\n  greet:\n    name: world\n"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """examples/provider-plugin pip-installed (no deps) into a temporary folder; returns that folder."""
    base = tmp_path_factory.mktemp("plugin")
    source = base / "src"
    # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(
        EXAMPLES / "provider-plugin", source, ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    target = base / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"},
    )
    assert proc.returncode == 0, f"pip install of the example provider failed:\n{proc.stdout}\n{proc.stderr}"
    return str(target)


def with_plugin(plugin_path: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [plugin_path, os.environ.get("PYTHONPATH")]))}


def test_installed_provider_runs_and_saves_its_artifact(make_repo, plugin_path: str, tmp_path: Path) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": VARIABLES})
    res = dstack("run", "shout", "--name", "Ada", cwd=repo, env=with_plugin(plugin_path), timeout=60)
    assert res.out.splitlines() == [
        "greet | Hello, Ada!",
        "greet | after the greeting",
        "shout | HELLO, ADA!",
    ]
    [run] = json.loads(dstack("runs", "--json", cwd=repo).out)
    assert run["status"] == "done"
    listing = json.loads(dstack("artifacts", "list", run["name"], "--json", cwd=repo).out)
    assert {a["name"] for a in listing} == {"greeting.txt"}


def test_the_provider_is_listed_with_the_built_ins(make_repo, plugin_path: str) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": VARIABLES})
    res = dstack("validate", cwd=repo, env=with_plugin(plugin_path), check=False)
    assert res.code == 0, res.output
    probe = subprocess.run(
        [sys.executable, "-c", "from dstack.providers import provider_names; print(provider_names())"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **with_plugin(plugin_path)},
    )
    names = eval(probe.stdout)  # a printed list of str
    assert names[: len(BUILTIN)] == list(BUILTIN) and "hello" in names


def test_without_the_plugin_the_provider_is_unknown(make_repo) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, ".dstack/variables.yaml": VARIABLES})
    res = dstack("run", "greet", cwd=repo, check=False)
    assert res.code == 2
    assert "unknown provider 'hello'" in res.err
    assert "Traceback" not in res.err


def test_built_ins_are_registered_as_entry_points_too() -> None:
    """bash, python and docker come through the same `dstack.providers` group a plugin uses."""
    registered = {ep.name: ep.value for ep in entry_points(group="dstack.providers")}
    for name in ("bash", "python", "docker"):
        assert registered[name] == BUILTIN[name]
