"""`dstack ssh RUN`: the command line of a shell in a running job's working directory, on its runner or in
its container, over the system `ssh` with the host key dstack pinned (never a key it was not shown)."""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING

from dstack.errors import RunError, UsageError

if TYPE_CHECKING:
    from dstack.store.state import Job, State


def running_job(state: State, ref: str, workflow: str | None) -> Job:
    """The run's one running job (or the one of `workflow`)."""
    run = state.run(ref)
    jobs = [j for j in state.jobs(run.id) if j.status == "running"]
    if workflow:
        jobs = [j for j in jobs if j.workflow == workflow]
    if not jobs:
        what = f"job {workflow} of run {run.name}" if workflow else f"run {run.name}"
        raise RunError(f"{what} has no running job", hint=f"`dstack jobs {run.name}` shows its jobs")
    if len(jobs) > 1:
        names = ", ".join(j.workflow for j in jobs)
        raise UsageError(
            f"run {run.name} has several running jobs ({names})", hint="pick one with --job NAME"
        )
    return jobs[0]


def _inner(job_dir: str, workdir: str, job: Job, command: list[str], tty: bool) -> list[str]:
    """The argv run on the runner: the shell in the working directory, or in the job's container."""

    if job.spec.image:
        from dstack.backends.docker import container_name

        sh = shlex.join(command) if command else "command -v bash >/dev/null && exec bash || exec sh"
        return ["docker", "exec", "-i", *(["-t"] if tty else []), container_name(job.id), "sh", "-c", sh]
    env = shlex.quote(f"{job_dir}/env.sh")
    rest = shlex.join(command) if command else 'exec "${SHELL:-bash}" -i'
    return ["bash", "-c", f"cd {shlex.quote(workdir)} && set -a && . {env} && set +a && {rest}"]


def shell_argv(state: State, ref: str, workflow: str | None, command: list[str]) -> list[str]:
    """What to exec for a shell (or `command`) in the running job of run `ref`."""
    import posixpath

    if command[:1] == ["--"]:
        command = command[1:]
    job = running_job(state, ref, workflow)
    run = state.run(job.run_id)
    spec = job.spec
    tty = sys.stdin.isatty()
    name = (job.runner or "local").split("+")[0]  # a multi-node job's: rank 0's host (dstack.backends.gang)
    if name == "local":
        from dstack.backends.local import LocalRunner

        jd = str(LocalRunner().job_dir(job.id))
        workdir = posixpath.normpath(posixpath.join(jd, "work", run.working_subdir, spec.working_dir))
        return _inner(jd, workdir, job, command, tty)
    from dstack.backends.ssh import SSHRunner
    from dstack.ssh.connection import known_hosts_path, pinned_key

    runner = SSHRunner.for_runner(state, name)
    target = runner.target
    if pinned_key(target) is None:
        raise RunError(f"host {name} has no pinned key", hint=f"`dstack hosts add` it again ({name})")
    jd = runner.job_dir(job.id)
    workdir = posixpath.normpath(posixpath.join(jd, "work", run.working_subdir, spec.working_dir))
    argv = ["ssh", *(["-t"] if tty else ["-T"]), "-p", str(target.port)]
    argv += ["-o", f"UserKnownHostsFile={known_hosts_path()}", "-o", "GlobalKnownHostsFile=/dev/null"]
    argv += ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    for identity in target.identity_files:
        argv += ["-i", identity]
    if target.proxy_jump:
        argv += ["-J", target.proxy_jump]
    argv += ["-l", target.user, target.hostname, "--", shlex.join(_inner(jd, workdir, job, command, tty))]
    return argv
