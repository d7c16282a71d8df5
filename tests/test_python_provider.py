"""The python provider without an image: a per-job venv of the asked version, cached by requirements."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from helpers import dstack

INSTALLING = "dstack: installing"


def local_wheel(folder: Path, version: str = "0.1") -> Path:
    """Write a tiny pure-Python wheel (`dstack_hello_pkg`) into `folder`: installs with no index or build."""
    folder.mkdir(parents=True, exist_ok=True)
    name = "dstack_hello_pkg"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": 'GREETING = "hello from a wheel"\n',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: dstack-hello-pkg\nVersion: {version}\n",
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: dstack-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def python_repo(make_repo, workflow: str, extra: dict[str, str] | None = None) -> Path:
    files = {
        ".dstack/workflows.yaml": workflow,
        "train.py": (
            "import sys\n"
            "try:\n    import dstack_hello_pkg as p; g = p.GREETING\nexcept ImportError:\n    g = None\n"
            "print('python', '.'.join(map(str, sys.version_info[:2])), 'venv', sys.prefix != sys.base_prefix,"
            " 'greeting', g, 'args', sys.argv[1:])\n"
        ),
        "requirements.txt": "--no-index\n./wheels/dstack_hello_pkg-0.1-py3-none-any.whl\n",
        **(extra or {}),
    }
    repo = make_repo(files, commit=False)
    local_wheel(repo / "wheels")
    from helpers import git

    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


WITH_REQUIREMENTS = """\
workflows:
  - name: train
    provider: python
    script: train.py
    args: ["--lr", "0.1", "a b"]
    requirements: requirements.txt
"""


def test_requirements_go_into_a_venv_cached_for_the_next_run(make_repo) -> None:
    repo = python_repo(make_repo, WITH_REQUIREMENTS)
    started = time.monotonic()
    first = dstack("run", "train", cwd=repo, timeout=120)
    first_s = time.monotonic() - started
    assert "venv True greeting hello from a wheel args ['--lr', '0.1', 'a b']" in first.out
    assert INSTALLING in first.output
    started = time.monotonic()
    second = dstack("run", "train", "--force", cwd=repo, timeout=120)
    second_s = time.monotonic() - started
    assert "venv True greeting hello from a wheel" in second.out
    assert INSTALLING not in second.output, "the second run installed the requirements again"
    assert second_s < first_s
    runs = json.loads(dstack("runs", "--json", cwd=repo).out)
    assert [r["status"] for r in runs] == ["done", "done"]


def test_changed_requirements_get_a_new_venv(make_repo) -> None:
    repo = python_repo(make_repo, WITH_REQUIREMENTS)
    dstack("run", "train", cwd=repo, timeout=120)
    (repo / "requirements.txt").write_text("--no-index\n")  # uncommitted changes count too
    res = dstack("run", "train", cwd=repo, timeout=120)
    assert INSTALLING in res.output
    assert "greeting None" in res.out


def test_a_failing_install_fails_the_job(make_repo) -> None:
    repo = python_repo(
        make_repo, WITH_REQUIREMENTS, {"requirements.txt": "--no-index\nno-such-package-here\n"}
    )
    res = dstack("run", "train", cwd=repo, check=False, timeout=120)
    assert res.code == 4
    assert "no-such-package-here" in res.output


def test_without_requirements_the_job_uses_the_runner_python(make_repo) -> None:
    repo = python_repo(make_repo, "workflows:\n  - name: train\n    provider: python\n    script: train.py\n")
    res = dstack("run", "train", cwd=repo, timeout=60)
    # the runner's own `python3`, as it is: itself a virtualenv's when the tests run from one
    probe = "import sys; print(sys.prefix != sys.base_prefix)"
    runner_is_venv = subprocess.run(["python3", "-c", probe], capture_output=True, text=True, timeout=30)
    assert f"venv {runner_is_venv.stdout.strip()} greeting None args []" in res.out
    assert INSTALLING not in res.err


def _real_python(version: str) -> str | None:
    """A working `pythonX.Y` on this machine (a pyenv shim that refuses to run doesn't count)."""
    candidates = [shutil.which(f"python{version}")] + sorted(
        glob.glob(f"/root/.pyenv/versions/{version}*/bin/python{version}")
    )
    for path in filter(None, candidates):
        proc = subprocess.run([path, "-c", "import venv"], capture_output=True, timeout=30)
        if proc.returncode == 0:
            return path
    return None


def test_version_picks_that_python(make_repo, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    python310 = _real_python("3.10")
    if python310 is None:
        pytest.skip("no Python 3.10 on this machine")
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(python310), os.environ["PATH"]]))
    workflow = WITH_REQUIREMENTS.replace(
        "    provider: python\n", "    provider: python\n    version: '3.10'\n"
    )
    repo = python_repo(make_repo, workflow)
    res = dstack("run", "train", cwd=repo, timeout=120)
    assert "python 3.10 venv True greeting hello from a wheel" in res.out


def test_missing_version_falls_back_with_a_note(make_repo) -> None:
    workflow = "workflows:\n  - name: t\n    provider: python\n    version: '3.99'\n    script: train.py\n"
    repo = python_repo(make_repo, workflow)
    res = dstack("run", "t", cwd=repo, timeout=60)
    assert "dstack: python3.99 not found on this runner; using Python 3." in res.output
    assert "venv False" in res.out
