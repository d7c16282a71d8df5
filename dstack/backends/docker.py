"""Jobs in containers: the `docker run` line of a job with an image, and checks of images and engines.

A job with `spec.image` runs on its runner exactly like any other job (`run.sh` → `job.sh`, see
dstack.backends.script), except that `job.sh` hands its commands to the runner's docker CLI: the job's
`work/` folder is bind-mounted at /workflow, its variables go in as environment variables, its GPUs as a
device request, and the container (`dstack-<job_id>`) is removed when the job ends or is stopped. The same
script serves this machine and SSH hosts, whose docker CLI talks to their own engine.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from dstack.errors import RunError

if TYPE_CHECKING:
    from dstack.backends.base import JobContext

CONTAINER_ROOT = "/workflow"  # the job's `work/` folder (the repo state) inside the container
CONTAINER_FILE = "container"  # in the job dir: the container's name, for the wrapper's cleanup
REGISTRY_TIMEOUT_S = 5  # how long a registry may take to accept a connection before we call it absent
PULL_TIMEOUT_S = 1800
DOCKER_HUB = ("registry-1.docker.io", 443)
# set per container below: the host's values would be wrong inside (devices are renumbered from 0)
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def container_name(job_id: str) -> str:
    """The job's container name: `dstack-<job_id>` with characters docker refuses replaced."""
    return "dstack-" + _NAME_BAD.sub("-", job_id)


def registry_of(image: str) -> tuple[str, int]:
    """The registry (host, port) an image reference would be pulled from."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, _, port = first.partition(":")
        return host, int(port) if port.isdigit() else 443
    return DOCKER_HUB


def missing_image_message(image: str, host: str) -> str:
    """One line: the image is not on the host, nothing could pull it, and how to load it there."""
    if host in ("local", "this machine"):
        how = f"`docker load -i FILE` (from `docker save {image} -o FILE` where the image is)"
    else:
        how = f"`docker save {image} | ssh {host} docker load` (or `docker load -i FILE` on {host})"
    return f"image {image} is not on host {host} and no registry answers to pull it; load it with {how}"


def container_script(ctx: JobContext) -> str:
    """The shell script run inside the container: `set -e`, python set-up, then the job's commands."""
    spec = ctx.spec
    lines = [
        "set -e",
        # files written as root in the bind mount are handed back to the runner's user at the end
        '[ "${DSTACK_OWNER:-0:0}" = 0:0 ] || trap \'chown -R "$DSTACK_OWNER" '
        f"{CONTAINER_ROOT} 2>/dev/null || :' EXIT",
    ]
    py = spec.python
    if py is not None:
        candidates = " ".join(
            shlex.quote(c) for c in (f"python{py.version}" if py.version else "", "python3", "python") if c
        )
        lines += [
            "py=",
            f'for c in {candidates}; do if command -v "$c" >/dev/null 2>&1; then py=$(command -v "$c");'
            " break; fi; done",
            '[ -n "$py" ] || { echo "dstack: no python in this image" >&2; exit 127; }',
        ]
        if py.version:
            lines.append(
                f'case "$py" in */python{py.version}) ;; *) echo "dstack: python{py.version} '
                'is not in this image; using $("$py" --version 2>&1)" >&2;; esac'
            )
        lines += [
            'mkdir -p /tmp/dstack-bin && ln -sf "$py" /tmp/dstack-bin/python',
            'export PATH="/tmp/dstack-bin:$PATH"',
        ]
        if py.requirements:
            req = shlex.quote(py.requirements)
            lines += [
                "python -m pip --version >/dev/null 2>&1 || python -m ensurepip >/dev/null 2>&1 || :",
                f"PIP_ROOT_USER_ACTION=ignore python -m pip install -q --disable-pip-version-check -r {req}",
            ]
    lines += spec.commands
    return "\n".join(lines) + "\n"


def docker_run_argv(ctx: JobContext, job_dir: str, env_keys: list[str]) -> list[str]:
    """`docker run …` for the job (argv after `docker`): `env_keys` are passed by name from the caller's
    environment (the job's `env.sh`, sourced first), so their values never appear on the command line."""
    spec = ctx.spec
    assert spec.image is not None
    parts = (CONTAINER_ROOT, ctx.working_subdir, spec.working_dir)
    workdir = "/".join(p.strip("/") if i else p for i, p in enumerate(parts) if p not in ("", "."))
    argv = [
        "run",
        "--name",
        container_name(ctx.job_id),
        "--label",
        f"dstack.job={ctx.job_id}",
        "--label",
        f"dstack.run={ctx.run_name}",
        *_network(ctx.ports),
        "-v",
        f"{job_dir}/work:{CONTAINER_ROOT}",
        "-w",
        workdir,
    ]
    res = spec.resources
    if res.shm_size_mib:
        argv += ["--shm-size", f"{res.shm_size_mib}m"]
    if res.memory_mib:
        argv += ["--memory", f"{res.memory_mib}m"]
    if res.cpu:
        argv += ["--cpus", f"{res.cpu:g}"]
    for key in env_keys:
        if _ENV_NAME.match(key) and key not in GPU_ENV:
            argv += ["-e", key]
    argv += ["-e", "DSTACK_OWNER"]
    if ctx.gpu_indexes:
        # a device request; inside, the chosen GPUs are numbered from 0 (docker's NVIDIA hook sets
        # NVIDIA_VISIBLE_DEVICES to the host indexes itself, so it is not set here)
        argv += [
            "--gpus",
            '"device=' + ",".join(str(i) for i in ctx.gpu_indexes) + '"',
            "-e",
            "CUDA_VISIBLE_DEVICES=" + ",".join(str(i) for i in range(len(ctx.gpu_indexes))),
        ]
    else:
        argv += ["-e", "CUDA_VISIBLE_DEVICES=", "-e", "NVIDIA_VISIBLE_DEVICES=void"]
    if spec.commands or spec.python is not None:
        # bash when the image has it, else sh; the script is an argument, never pasted into a string
        pick = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; fi; exec sh -c "$1"'
        argv += ["--entrypoint", "sh", spec.image, "-c", pick, "dstack-job", container_script(ctx)]
    elif spec.entrypoint:
        argv += ["--entrypoint", spec.entrypoint[0], spec.image, *spec.entrypoint[1:]]
    else:
        argv.append(spec.image)  # the image's own command
    return argv


def _network(ports: list[int]) -> list[str]:
    """The host's network, or with ports its own one, each port published on the host's 127.0.0.1 only
    (servers inside listen on `$DSTACK_BIND`, 0.0.0.0 there: the container's interfaces, not the host's)."""
    if not ports:
        return ["--network", "host"]
    argv = ["-e", "DSTACK_BIND=0.0.0.0"]
    for port in ports:
        argv += ["-p", f"127.0.0.1:{port}:{port}"]
    return argv


def render_container_job(ctx: JobContext, job_dir: str, env_keys: list[str]) -> str:
    """`job.sh` for a job with an image: check (or pull) the image, then `exec docker run …` on the runner."""
    image = ctx.spec.image
    assert image is not None
    reg_host, reg_port = registry_of(image)
    q = shlex.quote
    missing = '"$host"'.join(q(part) for part in missing_image_message(image, "\0").split("\0"))
    run = " ".join(q(a) for a in docker_run_argv(ctx, job_dir, env_keys))
    return (
        "\n".join(
            [
                "#!/usr/bin/env bash",
                "set -e",
                f"export DSTACK_JOB_DIR={q(job_dir)}",
                "docker=$(command -v docker) ||",
                '  { echo "dstack: docker is not installed on $(hostname)" >&2; exit 125; }',
                f". {q(job_dir + '/env.sh')}",
                'export DSTACK_OWNER="$(id -u):$(id -g)"',
                f"image={q(image)}",
                "host=$(hostname)",
                'if ! "$docker" image inspect "$image" >/dev/null 2>&1; then',
                f"  if timeout {REGISTRY_TIMEOUT_S} bash -c {q(f': </dev/tcp/{reg_host}/{reg_port}')}"
                " 2>/dev/null",
                "  then",
                '    echo "dstack: pulling $image on $host" >&2',
                f'    timeout {PULL_TIMEOUT_S} "$docker" pull -q "$image" >&2 ||'
                ' { echo "dstack: could not pull $image on $host" >&2; exit 125; }',
                "  else",
                f"    echo dstack: {missing} >&2",
                "    exit 125",
                "  fi",
                "fi",
                f'echo {q(container_name(ctx.job_id))} > "$DSTACK_JOB_DIR/{CONTAINER_FILE}"',
                # an earlier attempt's container, left running where its wrapper was killed, goes first
                f'"$docker" rm -f {q(container_name(ctx.job_id))} >/dev/null 2>&1 || :',
                # not `--rm` and not `exec`: an OOM kill is read from the container before it is removed
                "set +e",
                f'"$docker" {run}',
                "code=$?",
                f"name={q(container_name(ctx.job_id))}",
                'if [ "$code" = 137 ] &&',
                '  [ "$("$docker" inspect -f "{{.State.OOMKilled}}" "$name" 2>/dev/null)" = true ]; then',
                '  echo "dstack: the container ran out of memory (OOMKilled)" >&2',
                '  printf \'{"t": %s, "oomkilled": true}\\n\' "$(date +%s)" >> "$DSTACK_JOB_DIR/metrics"',
                "fi",
                '"$docker" rm -f "$name" >/dev/null 2>&1',
                'exit "$code"',
            ]
        )
        + "\n"
    )


# -- this machine's engine, through the docker SDK --------------------------------------------------------


def engine_answers(timeout: float = 5.0) -> bool:
    """Whether a Docker engine answers here (DOCKER_HOST, else the default socket)."""
    import os

    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if url.startswith("unix://"):
        return _ping_unix_socket(url[len("unix://") :], timeout)
    import docker

    try:
        client = docker.from_env(timeout=int(timeout))
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False
    finally:
        client.close()


def _ping_unix_socket(path: str, timeout: float) -> bool:
    """`GET /_ping` on the engine's socket, without the SDK (fast, and it leaks nothing on failure)."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    except OSError:
        return False


def image_present(image: str) -> bool:
    """Whether this machine's engine has `image` (no pull)."""
    import docker

    client = docker.from_env(timeout=30)
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


def registry_answers(image: str, timeout: float = REGISTRY_TIMEOUT_S) -> bool:
    """Whether the registry `image` would come from accepts a connection within `timeout` seconds."""
    import socket

    host, port = registry_of(image)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_local_image(image: str) -> None:
    """Raise RunError (one line, with how to load it) if `image` is missing here and no registry answers."""
    import docker

    try:
        if image_present(image) or registry_answers(image):
            return
    except docker.errors.DockerException as e:
        raise RunError(f"the Docker engine on this machine does not answer: {e}") from None
    raise RunError(missing_image_message(image, "local"))
