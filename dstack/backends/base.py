"""The runner interface: where a job runs (this machine, an SSH host, a cloud instance).

A runner launches a job detached from the orchestrating process: the job's pid, exit code and log live in
a per-job directory on the runner, so the job survives the CLI exiting and can be re-attached to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.store.objects import Manifest, ObjectStore


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


@dataclass
class JobState:
    status: Literal["running", "exited", "lost"]
    exit_code: int | None = None
    reason: str | None = None


class Runner(ABC):
    """One place jobs run. Implementations: LocalRunner (this machine), SSHRunner (a registered host)."""

    name: str

    @abstractmethod
    def probe(self) -> Capacity:
        """Find what the runner has: CPUs, memory, GPUs, disk, Docker."""

    @abstractmethod
    def start_job(self, ctx: JobContext) -> None:
        """Lay out the job's directory (code + dependency artifacts) and launch it detached."""

    @abstractmethod
    def poll_job(self, job_id: str) -> JobState:
        """Is the job still running, did it exit (with which code), or is it gone?"""

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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
