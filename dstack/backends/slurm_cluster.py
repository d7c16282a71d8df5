"""What a Slurm cluster is to dstack: its options (partition, account, ...) and what `sinfo` says it has.

Read over SSH on the login node in one command, with `sinfo -h -o` formats every Slurm since 20.11 knows.
Stored in the host's `cloud` column (as an EC2 host's instance details are) and parsed back here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.backends.base import Capacity, GpuInfo
from dstack.errors import HostError

if TYPE_CHECKING:
    from dstack.ssh.connection import Connection

KIND = "slurm"
# node states (sinfo %t, short) in which a node takes no jobs at all
DOWN_STATES = ("down", "drain", "drng", "fail", "failg", "maint", "boot", "unk", "npc", "futr", "inval")

READ_SCRIPT = r"""
for c in sbatch squeue sinfo scancel srun; do command -v "$c" >/dev/null 2>&1 || echo "missing=$c"; done
echo "home=$HOME"
echo "version=$(sinfo -V 2>&1 | head -n 1)"
if command -v sacct >/dev/null 2>&1 && sacct -n -X -j 1 -o State >/dev/null 2>&1; then echo sacct=1
else echo sacct=0; fi
echo "--- partitions"
sinfo -h -o '%R|%a|%l|%P' 2>&1 || echo "error=sinfo failed"
echo "--- nodes"
sinfo -h -N -o '%N|%R|%c|%m|%G|%t' 2>&1 || echo "error=sinfo failed"
"""


@dataclass
class SlurmOptions:
    """What the user chose for the cluster's jobs at `hosts add --slurm`."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    workdir: str | None = None  # the jobs' folder on the shared filesystem (default ~/.dstack/slurm)


def options_from_cli(
    slurm: bool,
    partition: str | None,
    account: str | None,
    qos: str | None,
    sbatch_args: list[str] | None,
    workdir: str | None,
) -> SlurmOptions | None:
    """The Slurm options of `hosts add`, or None without --slurm (UsageError if some are given alone)."""
    from dstack.errors import UsageError

    named = (("--partition", partition), ("--account", account), ("--qos", qos))
    given = [n for n, v in (*named, ("--sbatch-arg", sbatch_args), ("--workdir", workdir)) if v]
    if not slurm:
        if given:
            raise UsageError(f"{given[0]} is for Slurm clusters", hint="add --slurm")
        return None
    return SlurmOptions(partition, account, qos, list(sbatch_args or []), workdir)


@dataclass
class SlurmNode:
    name: str
    cpus: int
    memory_mib: int
    gpus: list[tuple[str, int]]  # (GRES type, count); type "" when the GRES is a plain `gpu:N`
    state: str

    @property
    def up(self) -> bool:
        return not self.state.rstrip("*~#!%$@^-").startswith(DOWN_STATES)

    @property
    def idle(self) -> bool:
        return self.state.rstrip("*~#!%$@^-") == "idle"


@dataclass
class SlurmPartition:
    name: str
    up: bool
    default: bool
    time_limit: str  # as sinfo says it: "infinite", "1-00:00:00", ...
    nodes: list[SlurmNode] = field(default_factory=list)

    @property
    def free(self) -> int:
        return sum(1 for n in self.nodes if n.idle)


@dataclass
class SlurmCluster:
    """A registered cluster: the user's options and what its last read found."""

    options: SlurmOptions
    version: str = ""
    home: str = ""
    sacct: bool = False
    partitions: list[SlurmPartition] = field(default_factory=list)

    @property
    def root(self) -> str:
        """The dstack folder on the shared filesystem: jobs, object cache, venvs."""
        return self.options.workdir or f"{self.home}/.dstack/slurm"

    def usable(self) -> list[SlurmPartition]:
        """The partitions jobs may go to: the chosen one, or every partition that is up."""
        if self.options.partition:
            return [p for p in self.partitions if p.name == self.options.partition]
        return [p for p in self.partitions if p.up]

    def capacity(self) -> Capacity:
        """The cluster as one runner: totals, and its usable partitions' nodes (placement fits jobs there)."""
        parts = []
        for p in self.usable():
            shapes = [_node_capacity(n) for n in p.nodes if n.up]
            parts.append(
                Capacity(
                    cpus=sum(n.cpus for n in shapes),
                    memory_mib=sum(n.memory_mib for n in shapes),
                    os=f"partition {p.name}",
                    parts=shapes,
                )
            )
        up = {n.name: n for p in self.usable() for n in p.nodes if n.up}
        return Capacity(
            cpus=float(sum(n.cpus for n in up.values())),
            memory_mib=sum(n.memory_mib for n in up.values()),
            os=f"Slurm {self.version}".strip(),
            queued=True,
            parts=parts,
        )

    def summary(self) -> str:
        """`main: 1/2 nodes free, gpu: 0/4 nodes free` for listings."""
        return ", ".join(f"{p.name}: {p.free}/{len(p.nodes)} nodes free" for p in self.usable())

    def to_json(self) -> dict[str, Any]:
        return {KIND: asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SlurmCluster:
        raw = dict((data or {}).get(KIND) or {})
        options = SlurmOptions(**raw.pop("options", {}))
        partitions = [
            SlurmPartition(
                **{k: v for k, v in p.items() if k != "nodes"},
                nodes=[SlurmNode(**{**n, "gpus": [tuple(g) for g in n["gpus"]]}) for n in p["nodes"]],
            )
            for p in raw.pop("partitions", [])
        ]
        return cls(options=options, partitions=partitions, **raw)


def _node_capacity(node: SlurmNode) -> Capacity:
    gpus = [GpuInfo(index=i, name=name or "gpu") for name, count in node.gpus for i in range(count)]
    return Capacity(cpus=float(node.cpus), memory_mib=node.memory_mib, gpus=gpus)


def parse_gres(text: str) -> list[tuple[str, int]]:
    """GPUs in a GRES string: `gpu:a100:4(S:0-1),gpu:2` -> [("a100", 4), ("", 2)]; others are ignored."""
    gpus = []
    for item in re.split(r",(?![^(]*\))", text.strip()):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        count = parts[-1]
        if not count.isdigit():
            continue
        gpus.append((":".join(parts[1:-1]), int(count)))
    return gpus


def parse_cluster(output: str, options: SlurmOptions, where: str) -> SlurmCluster:
    """A SlurmCluster from READ_SCRIPT's output; HostError saying what is missing or failed."""
    values: dict[str, str] = {}
    missing: list[str] = []
    section = ""
    partitions: dict[str, SlurmPartition] = {}
    nodes: list[tuple[str, SlurmNode]] = []
    for line in output.splitlines():
        if line.startswith("--- "):
            section = line[4:].strip()
            continue
        if line.startswith("error=") or ("|" not in line and section and line.strip()):
            raise HostError(f"{where}: `sinfo` failed: {line.removeprefix('error=').strip()[:200]}")
        if section == "partitions":
            name, avail, limit, raw_name = (line.split("|") + ["", "", ""])[:4]
            partitions[name] = SlurmPartition(name, avail.startswith("up"), raw_name.endswith("*"), limit)
        elif section == "nodes":
            fields = line.split("|")
            if len(fields) < 6:
                continue
            try:
                cpus, memory = int(fields[2]), int(fields[3].rstrip("+"))
            except ValueError:
                continue
            nodes.append((fields[1], SlurmNode(fields[0], cpus, memory, parse_gres(fields[4]), fields[5])))
        else:
            key, sep, value = line.partition("=")
            if key == "missing":
                missing.append(value)
            elif sep:
                values[key] = value.strip()
    if missing:
        raise HostError(
            f"{where} is no Slurm login node: {', '.join(missing)} not found on its PATH",
            hint="install Slurm's client commands there, or add the host without --slurm",
        )
    version = values.get("version", "")
    match = re.search(r"(\d+\.\d+(\.\d+)?)", version)
    if not match:
        raise HostError(f"{where}: `sinfo -V` did not say Slurm's version: {version[:200]!r}")
    for partition_name, node in nodes:
        if partition_name in partitions:
            partitions[partition_name].nodes.append(node)
    cluster = SlurmCluster(
        options=options,
        version=match.group(1),
        home=values.get("home", ""),
        sacct=values.get("sacct") == "1",
        partitions=sorted(partitions.values(), key=lambda p: (not p.default, p.name)),
    )
    if options.partition and not cluster.usable():
        known = ", ".join(p.name for p in cluster.partitions) or "none"
        raise HostError(f"{where} has no partition {options.partition!r}", hint=f"its partitions: {known}")
    return cluster


def read_cluster(conn: Connection, options: SlurmOptions, where: str) -> SlurmCluster:
    """Ask the login node what the cluster has (one remote command)."""
    result = conn.run(f"bash -lc {shlex.quote(READ_SCRIPT)} 2>&1", timeout=60, check=False)
    return parse_cluster(result.stdout, options, where)
