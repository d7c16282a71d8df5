"""Typed job specs: what a provider makes of a workflow, and what a backend runs.

A workflow in `.dstack/` is parsed and normalized by `dstack.workflows`; a provider
(`dstack.providers`) turns it into one `JobSpec`; the graph and the runners only see `JobSpec`s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class GpuSpec(_Model):
    count: int = 0
    name: str | None = None  # product name, matched case-insensitively ("A100", "v100")
    memory_mib: int | None = None


class Resources(_Model):
    cpu: float | None = None  # cores; None = no explicit request (counts as 1 for placement)
    memory_mib: int | None = None
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    shm_size_mib: int | None = None
    interruptible: bool = False
    local: bool = False  # pinned to this machine
    remote: bool = False
    nodes: int = 1
    disk_mib: int | None = None


class ArtifactSpec(_Model):
    path: str  # relative to the job's working directory, or absolute
    real_time: bool = False
    mount: bool = False


class DependencySpec(_Model):
    """One upstream: a workflow of this repo (run or reused in the same run) or a tag's run."""

    workflow: str | None = None
    tag: str | None = None  # with workflow=None: a tag alone (`:tag`, `{tag: T}`)

    def label(self) -> str:
        if self.workflow and self.tag:
            return f"{self.workflow}:{self.tag}"
        return self.workflow or f":{self.tag}"


class RetrySpec(_Model):
    limit: int = 0  # extra attempts after the first
    on: list[Literal["error", "interruption", "host-lost"]] = Field(
        default_factory=lambda: ["interruption", "host-lost"]  # type: ignore[arg-type,unused-ignore]
    )


class PortsSpec(_Model):
    count: int = 0  # `ports: N`: N free ports, passed as $PORT_0..$PORT_{N-1}
    fixed: list[int] = Field(default_factory=list)  # `ports: [8888]`


class PythonSpec(_Model):
    """The python provider's needs: the job runs in a venv cached by (version, requirements digest)."""

    version: str | None = None  # "3.10" as written, never a float
    requirements: str | None = None  # path of a requirements file, relative to the working dir


class JobSpec(_Model):
    """Everything a runner needs to run one job. Values of variables are already substituted.

    `commands` are bash lines run in order with `set -e` semantics inside `working_dir`; variables
    reach them as environment variables (`env`), never pasted unquoted.
    """

    workflow: str
    provider: str = "bash"
    image: str | None = None  # run in Docker when set
    entrypoint: list[str] | None = None  # docker provider with no commands: the image's own command
    commands: list[str] = Field(default_factory=list)
    working_dir: str = "."  # relative to the repo root (the folder holding `.dstack/`)
    env: dict[str, str] = Field(default_factory=dict)
    passthrough_env: list[str] = Field(default_factory=list)  # `env: [KEY]`: the user's own value
    artifacts: list[ArtifactSpec] = Field(default_factory=list)
    depends_on: list[DependencySpec] = Field(default_factory=list)
    repo_include: list[str] | None = None  # `depends-on: {repo: {include: [...]}}` globs
    resources: Resources = Field(default_factory=Resources)
    ports: PortsSpec = Field(default_factory=PortsSpec)
    retry: RetrySpec | None = None
    inactivity_s: float | None = None  # stop after this long with no connection to its ports; 0: never
    max_duration_s: int | None = None  # `max_duration`: the runner ends the job after it (Slurm: --time)
    python: PythonSpec | None = None
    variables: dict[str, str] = Field(default_factory=dict)  # the workflow's resolved variables
    help: str | None = None
    notices: list[str] = Field(default_factory=list)  # said once when the job is created

    def key_material(self) -> dict[str, object]:
        """The parts of the spec that decide the job's output (not the runner or resources)."""
        return self.model_dump(
            include={
                "provider",
                "image",
                "entrypoint",
                "commands",
                "working_dir",
                "env",
                "artifacts",
                "python",
                "variables",
            }
        )
