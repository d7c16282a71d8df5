"""The example pipeline (examples/digits) with `image:` on a registered SSH host, in that host's Docker:
a loopback sshd whose sessions reach the test engine stands in for a GPU box with Docker."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from helpers import EXAMPLES, dstack, init_repo
from test_docker import set_session_env


def test_digits_pipeline_in_docker_on_a_registered_host(
    tmp_path: Path, sshd_factory, docker_engine, ml_image
):
    repo = tmp_path / "digits"
    shutil.copytree(
        EXAMPLES / "digits", repo, ignore=shutil.ignore_patterns("__pycache__", "data", "model", "eval")
    )
    workflows = (repo / ".dstack/workflows.yaml").read_text()
    (repo / ".dstack/workflows.yaml").write_text(workflows.replace("provider: bash", f"image: {ml_image}"))
    init_repo(repo)

    server = sshd_factory.loopback()
    set_session_env(server.dir / "sshd_config", "DOCKER_HOST", os.environ["DOCKER_HOST"])
    server.stop()
    server.start()
    dstack("hosts", "add", server.address, "--name", "gpu-box", "-i", str(server.key), "--yes", cwd=repo)
    [host] = [h for h in json.loads(dstack("hosts", "--json", cwd=repo).out) if h["name"] == "gpu-box"]
    assert host["capacity"]["docker"] is True

    res = dstack("run", "evaluate", "--host", "gpu-box", cwd=repo, timeout=240)
    assert "accuracy:" in res.out
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    assert run["status"] == "done"
    jobs = json.loads(dstack("jobs", run["name"], "--json", cwd=repo).out)
    assert {j["runner"] for j in jobs} == {"gpu-box"}
    out = tmp_path / "out"
    dstack("artifacts", "download", run["name"], "-o", str(out), cwd=repo)
    report = json.loads((out / "eval/report.json").read_text())
    assert report["accuracy"] > 0.9
    assert not docker_engine.containers.list(all=True, filters={"label": f"dstack.run={run['name']}"})
