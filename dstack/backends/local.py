"""The local runner: jobs run on this machine, detached, in `$DSTACK_HOME/jobs/<job_id>/`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.backends.base import Capacity, GpuInfo, JobContext, JobState, Runner
from dstack.scheduler.daemon import process_alive

RECORD = "checkout.json"  # how work/ was handed out (dstack.backends.spare.RECORD)

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

    def probe(self, docker: bool = True, gpus: bool = True) -> Capacity:
        """What this machine has; `docker`/`gpus` False skip asking the engine / nvidia-smi (for a job that
        needs neither)."""
        import platform

        disk = shutil.disk_usage(self.root)
        return Capacity(
            cpus=float(os.cpu_count() or 1),
            memory_mib=local_memory_mib(),
            gpus=local_gpus() if gpus else [],
            disk_free_mib=disk.free // (1024 * 1024),
            docker=docker and docker_answers(),
            os=f"{platform.system()} {platform.release()}",
            python=platform.python_version(),
            rsync=bool(shutil.which("rsync")),
        )

    def start_job(self, ctx: JobContext) -> None:
        from dstack.artifacts import restore_artifacts
        from dstack.repo import checkout_files, working_tree

        if ctx.spec.image:
            from dstack.backends.docker import check_local_image

            check_local_image(ctx.spec.image)  # a missing image fails the job at once, with how to load it
        jd = self.job_dir(ctx.job_id)
        work = jd / "work"
        remove_tree(work)  # an earlier attempt's
        (jd / RECORD).unlink(missing_ok=True)
        include = ctx.spec.repo_include
        files = working_tree(ctx.code, ctx.working_subdir, include)  # the files the job's key covers
        if ctx.repo:
            from dstack.backends.checkout import checkout_copy

            checkout_copy(ctx.code, files, ctx.store, work, ctx.repo, include)
        else:
            work.mkdir(parents=True, exist_ok=True)
            checkout_files(files, ctx.store, work)
        project = work / ctx.working_subdir
        base = project / ctx.spec.working_dir
        for dep in ctx.dependencies:
            restore_artifacts(dep.manifest, ctx.store, base)
        for fname, (data, mode) in self.job_files(ctx, str(jd), str(self.venvs)).items():
            fd = os.open(jd / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(jd / fname, mode)  # an earlier attempt's file keeps its mode on O_TRUNC
        for stale in ("exit", "pid"):  # an earlier attempt's
            (jd / stale).unlink(missing_ok=True)
        proc = subprocess.Popen(
            ["bash", str(jd / "run.sh")],
            cwd=jd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._procs[ctx.job_id] = proc
        # the wrapper records the same pid itself; written here too so poll_job never sees a job with none
        (jd / "pid.start").write_text(str(proc.pid))
        os.replace(jd / "pid.start", jd / "pid")

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

    def read_metrics(self, job_id: str, offset: int) -> bytes:
        try:
            with open(self.job_dir(job_id) / "metrics", "rb") as f:
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
        stop_strays(job_id)
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):  # the job's cgroup, if the wrapper made one
            group = Path(root) / "dstack" / job_id
            if group.is_dir():
                try:
                    (group / "cgroup.kill").write_text("1")
                    group.rmdir()
                except OSError:
                    pass

    def collect_artifacts(
        self, job_id: str, spec: JobSpec, store: ObjectStore, working_subdir: str = "."
    ) -> tuple[Manifest, list[str]]:
        from dstack.artifacts import save_artifacts

        base = self.job_dir(job_id) / "work" / working_subdir / spec.working_dir
        paths = [a.path for a in spec.artifacts]
        if not store.url.startswith("s3://"):  # a local save touches what it finds (gc's freshening)
            result = save_artifacts(base, paths, store)
        else:
            from dstack.home import sub
            from dstack.store.digests import DigestCache

            with DigestCache(sub("cache") / "digests.sqlite") as cache:  # objects known in the bucket
                result = save_artifacts(base, paths, store, cache)
                cache.forget_under(os.path.abspath(self.job_dir(job_id)))  # the work dir goes: its digests
        if result.skipped:  # the job's log says what was not saved
            from dstack.artifacts import skip_notes

            with open(self.log_path(job_id), "ab") as log:
                log.write(skip_notes(job_id, result.skipped))
        return result.manifest, result.missing

    def cleanup_job(self, job_id: str, keep: bool = False) -> None:
        jd = self.job_dir(job_id)
        (jd / "env.sh").unlink(missing_ok=True)
        if keep:
            return
        if (jd / RECORD).exists():
            from dstack.backends import spare

            if spare.recycle(os.fspath(jd), job_id):  # the next job of the repo gets it, updated by diff
                return
        (jd / RECORD).unlink(missing_ok=True)
        remove_tree(jd / "work")


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


def job_processes(job_id: str) -> list[int]:
    """Processes whose environment names the job: its descendants, those that called setsid included."""
    mark = f"DSTACK_JOB={job_id}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_strays(job_id: str, grace: float = 2.0) -> None:
    """SIGTERM the job's processes outside its process group, then SIGKILL what is left after `grace`."""
    pids = job_processes(job_id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if process_alive(p)]
        if not pids:
            return


def remove_tree(path: Path) -> None:
    """Remove a job's folder: moved aside at once, deleted by a detached `rm -rf` (thousands of files take a
    while, and the run need not wait for that)."""
    from dstack.home import sub

    if not path.exists():
        return
    aside = sub("trash") / f"{path.parent.name}-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.replace(path, aside)
        proc = subprocess.Popen(
            ["rm", "-rf", str(aside)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc.returncode = 0  # detached: never waited for
    except OSError:
        shutil.rmtree(aside if aside.exists() else path, ignore_errors=True)
