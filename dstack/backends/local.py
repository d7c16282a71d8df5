"""The local runner: jobs run on this machine, detached, in `$DSTACK_HOME/jobs/<job_id>/`."""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.backends.base import Capacity, GpuInfo, JobContext, JobState, Runner
from dstack.backends.script import RUN_SH, job_env, render_env, render_job

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.store.objects import Manifest, ObjectStore


def local_gpus() -> list[GpuInfo]:
    """GPUs on this machine, from nvidia-smi when it is there."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, memory = (x.strip() for x in line.split(","))
        gpus.append(GpuInfo(int(index), name, int(float(memory))))
    return gpus


def local_memory_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))


def docker_answers() -> bool:
    """Whether a Docker engine answers here (a CLI alone, or a socket nobody serves, is not enough)."""
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return False  # no engine to ask: skip importing the docker SDK
    from dstack.backends.docker import engine_answers

    return engine_answers()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


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


class LocalRunner(Runner):
    """Runs jobs on this machine."""

    name = "local"

    def __init__(self, root: Path | None = None) -> None:
        from dstack.home import sub

        self.root = root or sub("jobs")
        self.venvs = sub("venvs")
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # reaped here so no zombie is left

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def probe(self) -> Capacity:
        import platform

        disk = shutil.disk_usage(self.root)
        return Capacity(
            cpus=float(os.cpu_count() or 1),
            memory_mib=local_memory_mib(),
            gpus=local_gpus(),
            disk_free_mib=disk.free // (1024 * 1024),
            docker=docker_answers(),
            os=f"{platform.system()} {platform.release()}",
            python=platform.python_version(),
            rsync=bool(shutil.which("rsync")),
        )

    def start_job(self, ctx: JobContext) -> None:
        from dstack.artifacts import restore_artifacts
        from dstack.repo import checkout_files

        if ctx.spec.image:
            from dstack.backends.docker import check_local_image

            check_local_image(ctx.spec.image)  # a missing image fails the job at once, with how to load it
        jd = self.job_dir(ctx.job_id)
        work = jd / "work"
        work.mkdir(parents=True, exist_ok=True)
        checkout_files(ctx.code, ctx.store, work)
        project = work / ctx.working_subdir
        base = project / ctx.spec.working_dir
        for dep in ctx.dependencies:
            restore_artifacts(dep.manifest, ctx.store, base)
        passthrough = {k: os.environ[k] for k in ctx.spec.passthrough_env if k in os.environ}
        env_sh = jd / "env.sh"
        fd = os.open(env_sh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_env(job_env(ctx, passthrough)))
        (jd / "job.sh").write_text(render_job(ctx, str(jd), str(self.venvs), requirements_digest(ctx)))
        (jd / "run.sh").write_text(RUN_SH)
        self._procs[ctx.job_id] = subprocess.Popen(
            ["bash", str(jd / "run.sh")],
            cwd=jd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        # the wrapper writes its pid at once; wait briefly so poll_job never sees a job with no pid
        deadline = time.monotonic() + 5
        while not (jd / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.002)

    def poll_job(self, job_id: str) -> JobState:
        jd = self.job_dir(job_id)
        proc = self._procs.get(job_id)
        if proc is not None and proc.poll() is not None:
            del self._procs[job_id]
        exit_file = jd / "exit"
        if exit_file.exists():
            return JobState("exited", exit_code=int(exit_file.read_text().strip() or 1))
        try:
            pid = int((jd / "pid").read_text())
        except (OSError, ValueError):
            return JobState("lost", reason="the job's process never started")
        if process_alive(pid):
            return JobState("running")
        if exit_file.exists():  # it ended between the two checks
            return JobState("exited", exit_code=int(exit_file.read_text().strip() or 1))
        return JobState("lost", reason=f"the job's process (pid {pid}) is gone without an exit code")

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "log"

    def read_log(self, job_id: str, offset: int) -> bytes:
        try:
            with open(self.log_path(job_id), "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def stop_job(self, job_id: str) -> None:
        try:
            pid = int((self.job_dir(job_id) / "pid").read_text())
        except (OSError, ValueError):
            return
        stop_process_group(pid)

    def collect_artifacts(
        self, job_id: str, spec: JobSpec, store: ObjectStore, working_subdir: str = "."
    ) -> tuple[Manifest, list[str]]:
        from dstack.artifacts import save_artifacts

        base = self.job_dir(job_id) / "work" / working_subdir / spec.working_dir
        paths = [a.path for a in spec.artifacts]
        if not store.url.startswith("s3://"):  # a local save touches what it finds (gc's freshening)
            result = save_artifacts(base, paths, store)
            return result.manifest, result.missing
        from dstack.home import sub
        from dstack.store.digests import DigestCache

        with DigestCache(sub("cache") / "digests.sqlite") as cache:  # objects known in the bucket: no request
            result = save_artifacts(base, paths, store, cache)
            cache.forget_under(os.path.abspath(self.job_dir(job_id)))  # the work dir goes: its digests too
        return result.manifest, result.missing

    def cleanup_job(self, job_id: str, keep: bool = False) -> None:
        if not keep:
            shutil.rmtree(self.job_dir(job_id) / "work", ignore_errors=True)


def stop_process_group(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
