"""The runner interface: where a job runs (this machine, an SSH host, a cloud instance).

A runner launches a job detached from the orchestrating process: the job's pid, exit code and log live in
a per-job directory on the runner, so the job survives the CLI exiting and can be re-attached to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pathlib import Path

    from dstack.specs import JobSpec
    from dstack.store.objects import Manifest, ObjectStore
    from dstack.store.state import Job


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_mib: int = 0


@dataclass
class Capacity:
    """What a runner has in total (placement subtracts what running jobs reserved)."""

    cpus: float
    memory_mib: int
    gpus: list[GpuInfo] = field(default_factory=list)
    disk_free_mib: int = 0
    docker: bool = False
    os: str = ""
    python: str = ""
    rsync: bool = False
    queued: bool = False  # the runner queues jobs itself (a Slurm cluster): placement reserves nothing on it
    # what a cluster is made of: its partitions, and a partition's nodes (each node of a job must fit one)
    parts: list[Capacity] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capacity:
        """A Capacity from its `asdict` form (as stored in the hosts table)."""
        data = dict(data)
        data["gpus"] = [GpuInfo(**g) for g in data.get("gpus", [])]
        data["parts"] = [cls.from_json(n) for n in data.get("parts", [])]
        return cls(**data)


@dataclass
class DependencyArtifacts:
    """An upstream job's saved artifacts, to be placed in the job's working directory."""

    label: str  # "prepare" or "prepare:latest"
    manifest: Manifest


@dataclass
class JobContext:
    """Everything a runner needs to start one job."""

    job_id: str
    run_name: str
    spec: JobSpec
    code: Manifest  # the run's repo state, relative to the repo root
    working_subdir: str  # the project root (folder with .dstack/) relative to the repo root
    dependencies: list[DependencyArtifacts]
    store: ObjectStore
    gpu_indexes: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    repo: str = ""  # the repo the code comes from (the run's repo root): a runner may keep a copy per repo
    note: str = ""  # the job's log's first line, if any (which attempt this is and what it resumes from)


@dataclass
class JobState:
    status: Literal["running", "exited", "lost"]
    exit_code: int | None = None
    reason: str | None = None
    waiting: bool = False  # placed but not started: in the runner's own queue (Slurm's); `reason` says why


JobFiles = dict[str, tuple[bytes, int]]  # a file in the job's directory: name -> (content, mode)


class Runner(ABC):
    """One place jobs run. Implementations: LocalRunner (this machine), SSHRunner (a registered host).

    Everything the scheduler calls is here; shared steps are template methods (`job_files`)."""

    name: str

    def job_files(self, ctx: JobContext, job_dir: str, venv_root: str, note: str = "") -> JobFiles:
        """The files every runner writes into the job's directory: env.sh, job.sh, run.sh, sampler.py.

        `note`, if any, is echoed first by job.sh (how the job's inputs arrived)."""
        import os

        from dstack.backends.script import RUN_SH, job_env, render_env, render_job, requirements_digest
        from dstack.metrics import sampler_source

        job_sh = render_job(ctx, job_dir, venv_root, requirements_digest(ctx))
        for line in (note, ctx.note):  # each goes first: the attempt's line heads the log
            if line:
                job_sh = with_note(job_sh, line)
        passthrough = {k: os.environ[k] for k in ctx.spec.passthrough_env if k in os.environ}
        return {
            "env.sh": (render_env(job_env(ctx, passthrough)).encode(), 0o600),
            "job.sh": (job_sh.encode(), 0o644),
            "run.sh": (RUN_SH.encode(), 0o755),
            "sampler.py": (sampler_source().encode(), 0o644),  # metrics, started by run.sh
        }

    @abstractmethod
    def probe(self) -> Capacity:
        """Find what the runner has: CPUs, memory, GPUs, disk, Docker."""

    @abstractmethod
    def start_job(self, ctx: JobContext) -> None:
        """Lay out the job's directory (code + dependency artifacts) and launch it detached."""

    @abstractmethod
    def poll_job(self, job_id: str) -> JobState:
        """Is the job still running, did it exit (with which code), or is it gone?"""

    def poll_jobs(self, job_ids: list[str]) -> dict[str, JobState]:
        """`poll_job` for several jobs (a remote runner answers in one round trip)."""
        return {j: self.poll_job(j) for j in job_ids}

    def begin_pass(self, running: list[str]) -> None:  # noqa: B027 - optional hook
        """The scheduler starts a pass over its jobs (`running`: those running here). A remote runner may
        poll them all now (HostError: it does not answer), and keep starts and clean-ups until `end_pass`."""

    def end_pass(self) -> dict[str, Exception]:
        """The pass is over: do what was kept for its end. Returns the jobs that could not start, with why."""
        return {}

    def log_path(self, job_id: str) -> Path | None:
        """The job's log as a file on this machine, or None where it must be mirrored with `read_log`."""
        return None

    @abstractmethod
    def read_log(self, job_id: str, offset: int) -> bytes:
        """The job's output from byte `offset` on (what is there now)."""

    def read_metrics(self, job_id: str, offset: int) -> bytes:
        """The job's metrics samples (JSON lines, see dstack.metrics.sampler) from byte `offset` on."""
        return b""

    @abstractmethod
    def stop_job(self, job_id: str) -> None:
        """End the job's whole process tree."""

    @abstractmethod
    def collect_artifacts(
        self, job_id: str, spec: JobSpec, store: ObjectStore, working_subdir: str = "."
    ) -> tuple[Manifest, list[str]]:
        """Save the job's declared artifacts (relative to work/<working_subdir>/<spec.working_dir>) into the
        store; return the manifest and the declared paths that were missing."""

    @abstractmethod
    def cleanup_job(self, job_id: str, keep: bool = False) -> None:
        """Remove the job's working directory (its log and exit code stay until the runner prunes them)."""

    def tcp_table(self) -> str:
        """The runner's `/proc/net/tcp` and `/proc/net/tcp6` text: which ports are taken, what connects."""
        from dstack.ports import read_local_tcp_table

        return read_local_tcp_table()

    def read_rank_log(self, job_id: str, rank: int, offset: int) -> bytes:
        """Rank `rank`'s output of a multi-node job from byte `offset` on (rank 0's is `read_log`)."""
        from dstack.errors import UsageError

        raise UsageError(f"{self.name} runs no multi-node jobs: it keeps no logs of other ranks")

    def remove_job(self, job_id: str) -> None:
        """Delete the job's whole directory (log and exit code included)."""
        self.cleanup_job(job_id)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def job_inputs(store: ObjectStore, job: Job, upstream: list[Job]) -> tuple[list[DependencyArtifacts], str]:
    """What a job's working tree gets besides its code, on every runner: its dependencies' artifacts, then
    (an attempt after an interruption) the real-time artifacts the last attempt saved; and the log's note."""
    from dstack.backends.ssh import _size
    from dstack.errors import DstackError
    from dstack.graph import load_manifest
    from dstack.runs import resume_point

    deps = [DependencyArtifacts(up.workflow, load_manifest(store, up.manifest)) for up in upstream]
    if job.attempt <= 1:
        return deps, ""
    head = f"dstack: attempt {job.attempt} of job {job.id}"
    point = resume_point(job)
    if point is None:
        return deps, f"{head}, starting afresh: no real-time artifacts were saved before"
    saved_by, name = point
    try:
        manifest = load_manifest(store, name)
    except DstackError as e:  # e.g. removed from the store meanwhile: the attempt starts afresh, saying why
        return deps, f"{head}, starting afresh: can't restore attempt {saved_by}'s real-time artifacts ({e})"
    deps.append(DependencyArtifacts(f"attempt {saved_by}", manifest))
    n, size = len(manifest.entries), sum(e.size for e in manifest.entries)
    files = f"{n} file" if n == 1 else f"{n} files"
    return (
        deps,
        f"{head}, resuming from attempt {saved_by}: restored {files} ({_size(size)}) of real-time artifacts",
    )


def with_note(job_sh: str, note: str) -> str:
    """The job's script with `note` echoed first, so the job's log says how its inputs arrived."""
    import shlex

    line = f"echo {shlex.quote(note)}\n"
    if job_sh.startswith("#!"):
        first, _, rest = job_sh.partition("\n")
        return f"{first}\n{line}{rest}"
    return line + job_sh
