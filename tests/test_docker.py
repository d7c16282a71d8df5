"""Jobs with `image:` run in a container on their runner, through the real CLI and a real Docker engine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import docker
import pytest
from helpers import dstack
from sshd import ssh_keys_fixture, ssh_pool_fixture, sshd_factory_fixture  # noqa: F401  (fixtures)

PIPELINE = """\
workflows:
  - name: prepare
    image: {image}
    commands:
      - mkdir -p data
      - echo "rows=$rows in $(pwd)" > data/set.txt
      - test -f /.dockerenv && echo "in a container"
    artifacts: [data]
  - name: train
    depends-on: [prepare]
    provider: docker
    image: {image}
    commands:
      - cat data/set.txt
      - mkdir -p model
      - echo "lr=$lr gpus=[$CUDA_VISIBLE_DEVICES]" > model/weights.txt
      - cat model/weights.txt
    artifacts: [model]
"""
VARIABLES = "variables:\n  global:\n    rows: 10\n  train:\n    lr: 0.01\n"


def runs_json(repo: Path) -> list[dict]:
    return json.loads(dstack("runs", "--json", cwd=repo).out)


def dstack_containers(client: docker.DockerClient) -> list[str]:
    return [c.name for c in client.containers.list(all=True, filters={"label": "dstack.job"})]


def test_image_pipeline_runs_in_containers_and_saves_artifacts(
    make_repo, tmp_path: Path, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": PIPELINE.format(image=busybox_image),
            ".dstack/variables.yaml": VARIABLES,
        }
    )
    res = dstack("run", "train", "--lr", "0.5", cwd=repo, timeout=90)
    assert "in a container" in res.out
    assert "rows=10 in /workflow" in res.out
    assert "lr=0.5 gpus=[]" in res.out
    [run] = runs_json(repo)
    assert run["status"] == "done"
    dstack("artifacts", "download", run["name"], "-o", str(tmp_path / "out"), cwd=repo)
    assert (tmp_path / "out/data/set.txt").read_text() == "rows=10 in /workflow\n"
    assert (tmp_path / "out/model/weights.txt").read_text() == "lr=0.5 gpus=[]\n"
    assert not [n for n in dstack_containers(docker_engine) if run["name"] in n]


@pytest.fixture(scope="session")
def sh_only_image(docker_engine: docker.DockerClient, busybox_image: str) -> str:
    """A busybox image with no bash (imported, never pulled)."""
    from dockerd import _BASE_CHANGES, RootFs, _add_busybox, _import_image

    fs = RootFs()
    _add_busybox(fs, with_bash=False)
    return _import_image(docker_engine, fs, "dstack-test/sh-only:latest", _BASE_CHANGES)


def test_working_dir_subfolder_and_image_without_bash(
    make_repo, docker_engine: docker.DockerClient, sh_only_image: str
) -> None:
    """`sh` runs the commands when the image has no bash; `working_dir` is a folder of the bind mount."""
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: where
    image: {sh_only_image}
    working_dir: src
    commands:
      - pwd
      - cat hello.txt
      - echo "shell=$0"
""",
            "src/hello.txt": "hello from the repo\n",
        }
    )
    res = dstack("run", "where", cwd=repo, timeout=60)
    assert "/workflow/src" in res.out
    assert "hello from the repo" in res.out
    assert "shell=sh" in res.out


def test_docker_provider_without_commands_runs_the_image_command(
    make_repo, docker_engine: docker.DockerClient, busybox_image: str, tmp_path: Path
) -> None:
    # an image whose own command prints something, built from the test image (no registry)
    build = tmp_path / "build"
    build.mkdir()
    (build / "Dockerfile").write_text(f'FROM {busybox_image}\nCMD ["sh", "-c", "echo own command in $PWD"]\n')
    docker_engine.images.build(path=str(build), tag="dstack-test/own-cmd:latest", rm=True, pull=False)
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: own
    provider: docker
    image: dstack-test/own-cmd:latest
"""
        }
    )
    res = dstack("run", "own", cwd=repo, timeout=60)
    assert "own command in /workflow" in res.out


def test_failing_command_fails_the_job_with_its_exit_code(
    make_repo, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: bad
    image: {busybox_image}
    commands: [echo before, "exit 3", echo never]
"""
        }
    )
    res = dstack("run", "bad", cwd=repo, check=False, timeout=60)
    assert res.code == 4
    assert "before" in res.out and "never" not in res.out
    [run] = runs_json(repo)
    assert run["jobs"][0]["status"] == "failed"
    assert "exited with code 3" in json.dumps(run)


def test_missing_image_fails_with_how_to_load_it(make_repo, docker_engine: docker.DockerClient) -> None:
    # a registry on a closed port: nothing answers, so nothing is pulled
    image = "localhost:1/dstack-test/missing:1"
    repo = make_repo(
        {".dstack/workflows.yaml": f"workflows:\n  - name: m\n    image: {image}\n    commands: [true]\n"}
    )
    res = dstack("run", "m", cwd=repo, check=False, timeout=60)
    assert res.code == 4
    line = (
        f"image {image} is not on host local and no registry answers to pull it; "
        "load it with `docker load -i FILE`"
    )
    assert line in res.output
    assert "Traceback" not in res.output


def test_stop_removes_the_container(
    make_repo, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: forever
    image: {busybox_image}
    commands: ["echo started", "sleep 300"]
"""
        }
    )
    dstack("run", "forever", "-d", cwd=repo)
    [run] = runs_json(repo)
    name = f"dstack-{run['jobs'][0]['id']}" if "id" in run["jobs"][0] else None
    deadline = time.time() + 30
    running: list = []
    while time.time() < deadline:
        running = docker_engine.containers.list(filters={"label": "dstack.run=" + run["name"]})
        if running:
            break
        time.sleep(0.1)
    assert running, "the job's container never started"
    [container] = running
    if name:
        assert container.name == name
    assert container.labels["dstack.run"] == run["name"]
    started = time.monotonic()
    dstack("stop", run["name"], cwd=repo)
    assert runs_json(repo)[0]["status"] == "stopped"
    deadline = time.time() + 15
    while docker_engine.containers.list(all=True, filters={"label": "dstack.run=" + run["name"]}):
        assert time.time() < deadline, "the container is still there after `dstack stop`"
        time.sleep(0.1)
    assert time.monotonic() - started < 15


def test_logs_stream_from_the_container_as_they_come(
    make_repo, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: slow
    image: {busybox_image}
    commands: ["echo first", "sleep 4", "echo second"]
"""
        }
    )
    dstack("run", "slow", "-d", cwd=repo)
    [run] = runs_json(repo)
    deadline = time.time() + 30
    seen = ""
    while time.time() < deadline:
        seen = dstack("logs", run["name"], cwd=repo).out
        if "first" in seen:
            break
        time.sleep(0.2)
    assert "first" in seen and "second" not in seen, "the first line only showed up at the end"
    follow = dstack("logs", "-f", run["name"], cwd=repo, timeout=60)
    assert follow.out.splitlines() == ["first", "second"]


def test_variables_and_env_reach_the_container(
    make_repo, docker_engine: docker.DockerClient, busybox_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_TOKEN", "from-the-user's-shell")
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: env
    image: {busybox_image}
    env:
      - GREETING=hello world
      - MY_TOKEN
    commands:
      - echo "msg=$msg MSG=$MSG greeting=$GREETING token=$MY_TOKEN run=$RUN_NAME"
      - echo "nvidia=$NVIDIA_VISIBLE_DEVICES cuda=[$CUDA_VISIBLE_DEVICES]"
""",
            ".dstack/variables.yaml": "variables:\n  env:\n    msg: a; touch pwned\n",
        }
    )
    res = dstack("run", "env", cwd=repo, timeout=60)
    [run] = runs_json(repo)
    assert (
        f"msg=a; touch pwned MSG=a; touch pwned greeting=hello world token=from-the-user's-shell "
        f"run={run['name']}" in res.out
    )
    assert "nvidia=void cuda=[]" in res.out
    assert not (repo / "pwned").exists()


def test_image_job_on_a_runner_without_docker_never_fits(make_repo, busybox_image: str) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": (
                f"workflows:\n  - name: x\n    image: {busybox_image}\n    commands: [true]\n"
            )
        }
    )
    res = dstack("run", "x", cwd=repo, check=False, env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert res.code == 4
    assert "Docker (the job runs image" in res.output


def test_python_provider_in_an_image_installs_requirements_inside(
    make_repo, docker_engine: docker.DockerClient, python_image: str
) -> None:
    from test_python_provider import local_wheel

    files = {
        ".dstack/workflows.yaml": f"""\
workflows:
  - name: train
    provider: python
    image: {python_image}
    script: train.py
    args: ["--epochs", "2"]
    requirements: requirements.txt
""",
        "train.py": (
            "import sys, dstack_hello_pkg\nprint('greeting', dstack_hello_pkg.GREETING, sys.argv[1:])\n"
        ),
        "requirements.txt": "--no-index\n./wheels/dstack_hello_pkg-0.1-py3-none-any.whl\n",
    }
    repo = make_repo(files, commit=False)
    local_wheel(repo / "wheels")
    from helpers import git

    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "x")
    res = dstack("run", "train", cwd=repo, timeout=120)
    assert "greeting hello from a wheel ['--epochs', '2']" in res.out
    # nothing was installed on this machine's Python
    import subprocess
    import sys

    check = subprocess.run([sys.executable, "-c", "import dstack_hello_pkg"], capture_output=True, timeout=30)
    assert check.returncode != 0


def set_session_env(config: Path, key: str, value: str) -> None:
    """Add `key=value` to an sshd_config's sessions (sshd honours only its first `SetEnv` line)."""
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("SetEnv "):
            lines[i] = f"{line} {key}={value}"
            break
    else:
        lines.append(f"SetEnv {key}={value}")
    config.write_text("\n".join(lines) + "\n")


def test_image_job_on_an_ssh_host_runs_in_that_hosts_docker(
    make_repo, tmp_path: Path, sshd_factory, ssh_pool, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    """A registered host (a loopback sshd whose sessions reach the test engine) runs jobs in its Docker."""
    from dstack import hosts
    from dstack.store.state import open_state

    server = sshd_factory.loopback()
    set_session_env(server.dir / "sshd_config", "DOCKER_HOST", os.environ["DOCKER_HOST"])
    server.stop()
    server.start()
    with open_state() as state:
        host = hosts.add_host(
            state.db, server.address, name="box", identity=str(server.key), accept=lambda fp: True
        )
    assert host.capacity is not None and host.capacity.docker, (
        "the host's probe did not find its Docker engine"
    )
    repo = make_repo(
        {
            ".dstack/workflows.yaml": PIPELINE.format(image=busybox_image),
            ".dstack/variables.yaml": VARIABLES,
        }
    )
    res = dstack("run", "train", "--lr", "0.7", "--host", "box", cwd=repo, timeout=120)
    assert "in a container" in res.out
    assert "lr=0.7 gpus=[]" in res.out
    [run] = runs_json(repo)
    assert run["status"] == "done"
    assert {j["runner"] for j in run["jobs"] if "runner" in j} <= {"box"}
    dstack("artifacts", "download", run["name"], "-o", str(tmp_path / "out"), cwd=repo)
    assert (tmp_path / "out/model/weights.txt").read_text() == "lr=0.7 gpus=[]\n"
    assert not docker_engine.containers.list(all=True, filters={"label": f"dstack.run={run['name']}"})
