"""`provider: lab` for real: JupyterLab from PyPI in the cached venv on an SSH host, opened through the
forward with its token (and refused without it), and rendered by headless Chromium.

The host is a loopback sshd, so its 127.0.0.1:$PORT_0 is taken by JupyterLab itself and the forward must
take another local port: a URL whose port differs from the job's proves the bytes went over SSH. The
first run installs JupyterLab (PyPI must answer; skipped where it does not), later ones reuse the venv.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from helpers import CHROMIUM_ARGS, dstack
from sshd import SSHDFactory
from test_ports import Cli, add_host, get, job_row, last_run, stop_runs

LAB_URL = re.compile(r"^ide-lab: http://localhost:(\d+)(/lab\?token=[\w-]+)")  # the CLI's line


@pytest.fixture(scope="session")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        pytest.skip("PyPI does not answer from here: JupyterLab can't be installed")
    return tmp_path_factory.mktemp("venvs")


def _no_redirect(url: str) -> int:
    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    try:
        with urllib.request.build_opener(Keep).open(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


@pytest.mark.timeout(240)
def test_lab_through_the_forward_with_its_token(
    sshd_factory: SSHDFactory, make_repo, venvs: Path, ssh_pool, tmp_path: Path
) -> None:
    server = sshd_factory.loopback()
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"workflows:\n  - name: ide-lab\n    provider: lab\n"
            f"    env:\n      - DSTACK_VENVS={venvs}\n"
        }
    )
    add_host(server, repo, "gpu")
    cli = Cli("run", "ide-lab", "--host", "gpu", cwd=repo)
    try:
        m = cli.wait_for(LAB_URL, timeout=180)
        url, local = m.group(0).split(": ", 1)[1], int(m.group(1))
        run = last_run(repo)["name"]
        remote = job_row(repo, run)["reserved"]["ports"][0]
        assert local != remote  # the host's port is JupyterLab's own: this one is the forward's
        status, page = get(url)
        assert status == 200 and "JupyterLab" in page
        token = m.group(2).split("token=")[1]
        base = f"http://localhost:{local}"
        assert get(f"{base}/api/contents?token={token}")[0] == 200
        assert get(f"{base}/api/contents")[0] == 403  # no token: refused
        assert _no_redirect(f"{base}/lab") == 302  # to the login page
        from dstack.store.state import open_state

        with open_state() as state:  # the token is in no saved state
            assert token not in state.db.execute("SELECT * FROM jobs").fetchall().__repr__()

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            dom = subprocess.run(
                [
                    chromium,
                    "--headless",
                    *CHROMIUM_ARGS,
                    "--disable-dev-shm-usage",
                    f"--user-data-dir={tmp_path / 'chromium'}",
                    "--virtual-time-budget=20000",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
            assert "jp-LabShell" in dom or "lm-Widget" in dom, dom[-2000:]
    finally:
        cli.kill()
        stop_runs(repo)


def test_code_says_how_to_preinstall_where_it_cannot_fetch(make_repo, tmp_path: Path) -> None:
    """No openvscode-server here and github.com does not answer (no DNS for it in this sandbox, or a
    stub that fails): one line saying where to put it."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("curl", "wget"):  # whatever the network does here, the download fails
        (bin_dir / tool).write_text("#!/bin/sh\nexit 6\n")
        (bin_dir / tool).chmod(0o755)
    repo = make_repo({".dstack/workflows.yaml": "workflows:\n  - name: ide\n    provider: code\n"})
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    res = dstack("run", "ide", cwd=repo, check=False, env=env, timeout=60)
    assert res.code != 0
    job = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    assert "cannot fetch openvscode-server on" in job["reason"] and "put it on PATH there" in job["reason"]
    log = dstack("logs", job["name"], cwd=repo).out
    assert (
        "or unpack openvscode-server-v1.95.3-linux-x64.tar.gz (its GitHub release) into ~/.dstack/tools/"
        in log
    )


@pytest.mark.timeout(300)
def test_fastapi_prints_its_url(make_repo, venvs: Path) -> None:
    """`provider: fastapi` (installed from PyPI through `requirements`) prints its localhost URL too."""
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: api\n    provider: fastapi\n    app: main:app\n"
            "    requirements: requirements.txt\n",
            "requirements.txt": "fastapi\nuvicorn\n",
            "main.py": "from fastapi import FastAPI\napp = FastAPI()\n\n\n@app.get('/hello')\n"
            "def hello() -> dict:\n    return {'hello': 'world'}\n",
        }
    )
    cli = Cli("run", "api", cwd=repo)
    try:
        m = cli.wait_for(r"^api: (http://localhost:\d+)/docs$", timeout=240)
        assert get(m.group(1) + "/hello") == (200, '{"hello":"world"}')
    finally:
        cli.kill()
        stop_runs(repo)
