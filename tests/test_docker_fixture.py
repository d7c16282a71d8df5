"""The docker fixtures work: an engine answers and the registry-free images run commands."""

from __future__ import annotations

import os

import docker


def test_busybox_image_runs_echo(docker_engine: docker.DockerClient, busybox_image: str) -> None:
    out = docker_engine.containers.run(busybox_image, ["echo", "hi"], remove=True)
    assert out == b"hi\n"
    assert os.environ["DOCKER_HOST"]


def test_busybox_image_has_bash_and_sh(docker_engine: docker.DockerClient, busybox_image: str) -> None:
    out = docker_engine.containers.run(
        busybox_image, ["bash", "-c", "set -e; x=$(sh -c 'echo ok'); echo $x; ls /tmp"], remove=True
    )
    assert out == b"ok\n"


def test_python_image_runs_stdlib_python(docker_engine: docker.DockerClient, python_image: str) -> None:
    script = "import json, sqlite3, ssl, hashlib, sys; print(json.dumps([sys.version_info[0], 'ok']))"
    out = docker_engine.containers.run(python_image, ["python", "-c", script], remove=True)
    assert out == b'[3, "ok"]\n'


def test_python_image_makes_venvs_as_a_non_root_user(
    docker_engine: docker.DockerClient, python_image: str
) -> None:
    command = (
        "python -m venv --without-pip /tmp/venv && /tmp/venv/bin/python -c 'import sys; print(sys.prefix)'"
    )
    out = docker_engine.containers.run(python_image, ["bash", "-c", command], user="65534", remove=True)
    assert out == b"/tmp/venv\n"
