"""The files that run a job on any runner: `env.sh`, `job.sh` (the user's commands), `run.sh` (the wrapper).

The wrapper is started detached (`setsid`); it records its pid (which is also the job's process group),
sends the job's output to `log` and writes the exit code to `exit` atomically when the job ends. The
same files serve the local runner and SSH hosts, so a job behaves the same wherever it runs.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.backends.base import JobContext

RUN_SH = """#!/usr/bin/env bash
# dstack job wrapper: pid, log and exit code live next to this file.
case $0 in */*) cd "${0%/*}" || exit 1 ;; esac
echo $$ > pid.tmp && mv pid.tmp pid
job=${PWD##*/}
# room to record the end even when the job fills the disk: freed before the exit code is written
printf '%262144s' '' > .reserve 2>/dev/null
# a job with an image runs in a container named in ./container: it goes when the job ends or is stopped
remove_container() {
  if [ -s container ]; then docker rm -f "$(cat container)" >/dev/null 2>&1; rm -f container; fi
}
# the job's whole tree: a cgroup (v2) of its own where this user may make one, plus every process whose
# environment names the job (those that left its process group with setsid)
cg=""
for root in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  if [ -f "$root/cgroup.controllers" ] && mkdir -p "$root/dstack/$job" 2>/dev/null; then
    cg="$root/dstack/$job" && break
  fi
done
job_pids() {
  { if [ -n "$cg" ]; then cat "$cg/cgroup.procs" 2>/dev/null; fi
    grep -lzx "DSTACK_JOB=$job" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3; } | grep -vx "$$"
}
end_tree() {
  local p; p=$(job_pids); [ -n "$p" ] || return 0
  kill -TERM $p 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do sleep 0.1; p=$(job_pids); [ -n "$p" ] || return 0; done
  if [ -n "$cg" ]; then echo 1 > "$cg/cgroup.kill"; fi 2>/dev/null
  kill -KILL $p 2>/dev/null
}
# the end: env.sh (0600, secrets too; `dstack ssh` loads it while the job runs) removed;
# a disk the job filled is named in its log; the exit code recorded
finish() {
  local full=""
  [ "$1" != 0 ] && [ "$(df -Pk . 2>/dev/null | awk 'NR==2 {print $4}')" = 0 ] && full=1
  rm -f env.sh .reserve
  [ -n "$full" ] && echo "dstack: no space left on device (the job filled the disk under $PWD)" >> log
  if [ -n "$cg" ]; then rmdir "$cg" 2>/dev/null; fi
  echo "$1" > exit.tmp && mv exit.tmp exit
}
on_stop() {
  remove_container
  kill -TERM "$child" 2>/dev/null
  end_tree
  wait "$child"
  finish 143
  exit 143
}
trap on_stop TERM INT
# metrics (dstack.metrics.sampler): one sampler per job appends to ./metrics until ./exit appears
# (its settings are read here from env.sh: the sampler never sources the job's secrets itself). Its first
# sample comes at 0.5 s, so it starts at 0.4 s: a job done by then costs no python3 (a sweep of short jobs)
[ -f sampler.py ] && command -v python3 >/dev/null && (
  sleep 0.4; [ -f exit ] && exit 0
  DSTACK_SAMPLER_SETTINGS=$(. ./env.sh >/dev/null 2>&1
    printf '%s|%s|%s' "${CUDA_VISIBLE_DEVICES+set}" "$CUDA_VISIBLE_DEVICES" "$DSTACK_METRICS_INTERVAL") \
    exec python3 sampler.py $$ 0.1
) >/dev/null 2>&1 </dev/null &
( if [ -n "$cg" ]; then echo "$BASHPID" > "$cg/cgroup.procs"; fi 2>/dev/null; exec bash ./job.sh ) \
  > log 2>&1 < /dev/null &
child=$!
wait "$child"
code=$?
remove_container
finish $code
"""

ENV_NAME_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def job_env(ctx: JobContext, passthrough: dict[str, str] | None = None) -> dict[str, str]:
    """Every environment variable the job gets, in order: the spec's, the reserved ones, ports, GPUs."""
    env: dict[str, str] = {}
    env.update(passthrough or {})
    env.update(ctx.spec.env)
    env.update(
        {
            "RUN_NAME": ctx.run_name,
            "run_name": ctx.run_name,
            "JOB_ID": ctx.job_id,
            "job_id": ctx.job_id,
            "DSTACK_RUN": ctx.run_name,
            "DSTACK_JOB": ctx.job_id,
            "DSTACK_WORKFLOW": ctx.spec.workflow,
        }
    )
    for i, port in enumerate(ctx.ports):
        env[f"PORT_{i}"] = str(port)
    if ctx.gpu_indexes or ctx.spec.resources.gpu.count == 0:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ctx.gpu_indexes)
        env["NVIDIA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] or "void"
    env.update(ctx.extra_env)
    return env


MASTER_PORT = 29500  # a multi-node job's rendezvous port on rank 0 (the next free one where it is taken)


def nodes_env(nodes: str, ips: str, master: str, port: str, gpus_per_node: str) -> dict[str, str]:
    """What every rank of a multi-node job shares: the node count, the nodes' addresses, the rendezvous.

    The one list of these names: Slurm's batch script exports them with shell words, SSH hosts as values."""
    return {
        "DSTACK_NODES_NUM": nodes,
        "WORLD_SIZE": nodes,
        "DSTACK_NODES_IPS": ips,
        "DSTACK_MASTER_NODE_ADDR": master,
        "MASTER_ADDR": master,
        "MASTER_PORT": port,
        "DSTACK_GPUS_PER_NODE": gpus_per_node,
    }


def node_rank_env(rank: str) -> dict[str, str]:
    """What tells the ranks of a multi-node job apart."""
    return {"DSTACK_NODE_RANK": rank, "NODE_RANK": rank}


def shell_exports(env: dict[str, str]) -> str:
    """One `export K=WORD ...` line whose values are shell words, as written (`$rank`, `"${ips%%,*}"`)."""
    return "export " + " ".join(f"{key}={word}" for key, word in env.items())


def render_env(env: dict[str, str]) -> str:
    """`export K=v` lines: only `$NAME`/`${NAME}` references in values are expanded by the shell, never
    `$(…)` or backticks; names that are not valid shell identifiers are skipped."""
    from dstack.workflows.envquote import quote_env_value

    lines = []
    for key, value in env.items():
        if key and set(key) <= ENV_NAME_OK and not key[0].isdigit():
            lines.append(f"export {key}={quote_env_value(value)}")
    return "\n".join(lines) + "\n"


def python_setup(ctx: JobContext, venv_root: str, requirements_digest: str | None) -> str:
    """Shell lines that put the right `python` first on PATH: a cached venv when requirements are given."""
    py = ctx.spec.python
    if py is None:
        return ""
    want = f"python{py.version}" if py.version else "python3"
    # the real interpreter, not a launcher (a pyenv shim answers to any name but runs another version)
    real = "-c 'import sys; print(sys.executable)'"
    lines = [
        f"want={shlex.quote(want)}",
        f'if py=$("$want" {real} 2>/dev/null) && [ -n "$py" ]; then :; '
        f'else py=$(python3 {real}); echo "dstack: $want not found on this runner;'
        ' using $("$py" --version 2>&1)" >&2; fi',
    ]
    if py.requirements and requirements_digest:
        req = shlex.quote(py.requirements)
        venv = f'{venv_root}/{requirements_digest[:24]}-$(basename "$py")'
        lines += [
            f'venv="{venv}"',
            'mkdir -p "$(dirname "$venv")"',
            '( flock 9; if [ ! -e "$venv/.ready" ]; then rm -rf "$venv";'
            ' echo "dstack: installing $(basename "$py") requirements from "'
            + req
            + '" (cached for next runs)" >&2;'
            ' "$py" -m venv --system-site-packages "$venv" &&'
            f' "$venv/bin/python" -m pip install -q --disable-pip-version-check -r {req} &&'
            ' touch "$venv/.ready"; fi ) 9>"$venv.lock"',
            'export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"',
        ]
    else:
        lines += [
            'mkdir -p "$DSTACK_JOB_DIR/bin"',
            'ln -sf "$py" "$DSTACK_JOB_DIR/bin/python"',
            'export PATH="$DSTACK_JOB_DIR/bin:$PATH"',
        ]
    return "\n".join(lines) + "\n"


def render_job(ctx: JobContext, job_dir: str, venv_root: str, requirements_digest: str | None = None) -> str:
    """The job's own script: environment, working directory, python set-up, then the commands with `set -e`;
    for a job with an image, the `docker run` of those commands on the runner instead."""
    spec = ctx.spec
    workdir = f"{job_dir}/work/{ctx.working_subdir}/{spec.working_dir}".replace("/./", "/")
    folders = artifact_folders(workdir, [a.path for a in spec.artifacts])
    if spec.image:
        from dstack.backends.docker import render_container_job

        keys = list(job_env(ctx)) + [k for k in spec.passthrough_env if k not in spec.env]
        shebang, _, rest = render_container_job(ctx, job_dir, keys).partition("\n")
        return "\n".join([shebang, *folders, rest])
    if folders:  # those the job left empty go again, so they read as "not produced", as before
        folders.append("trap 'dstack_rc=$?; rmdir -- \"${made[@]}\" 2>/dev/null || :; exit $dstack_rc' EXIT")
    parts = [
        "#!/usr/bin/env bash",
        *folders,
        "set -e",
        f"export DSTACK_JOB_DIR={shlex.quote(job_dir)}",
        f". {shlex.quote(job_dir + '/env.sh')}",
        f"cd {shlex.quote(workdir)}",
        python_setup(ctx, venv_root, requirements_digest),
    ]
    parts += spec.commands
    return "\n".join(p.rstrip("\n") for p in parts if p) + "\n"


def artifact_folders(workdir: str, declared: list[str]) -> list[str]:
    """Lines that create the declared artifact folders the repo state lacks, as the 2022 runners did: a
    path ending in '/' or whose last part has no suffix (`output`, `./checkpoints`) is a folder; for any
    other (`model.pkl`, `out/log.txt`) only its parent is. Absolute paths and `..` are left alone. The
    folders made are listed in the bash array `made`."""
    import posixpath

    lines = []
    for path in declared:
        norm = posixpath.normpath(path)
        if path.startswith("/") or norm == ".." or norm.startswith("../"):
            continue
        is_folder = path.endswith("/") or not posixpath.splitext(posixpath.basename(norm))[1]
        folder = norm if is_folder else posixpath.dirname(norm)
        if folder in ("", "."):
            continue
        q = shlex.quote(f"{workdir}/{folder}")
        lines.append(f"[ -e {q} ] || [ -L {q} ] || {{ mkdir -p -- {q} && made+=({q}); }} || exit 1")
    return ["made=()", *dict.fromkeys(lines)] if lines else []


def requirements_digest(ctx: JobContext) -> str | None:
    """The digest of the python provider's requirements file in the run's repo state."""
    py = ctx.spec.python
    if py is None or not py.requirements:
        return None
    want = posixpath.normpath(posixpath.join(ctx.working_subdir, ctx.spec.working_dir, py.requirements))
    for entry in ctx.code.entries:
        if entry.path == want:
            return f"{entry.digest}{py.version or ''}"
    return None
