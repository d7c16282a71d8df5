"""The EC2 instance types dstack knows: vCPUs, memory, GPUs and on-demand price (us-east-1, USD/hour).

Shipped with the code so choosing a type needs no pricing API; spot prices are asked from EC2 at launch.
GPU names are what `nvidia-smi` reports on the instance, so placement matches them like any host's GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.backends.base import Capacity
    from dstack.specs import JobSpec


@dataclass(frozen=True)
class InstanceType:
    """One EC2 instance type and what it has."""

    name: str
    vcpus: int
    memory_gib: float
    price: float  # on-demand USD/hour
    gpu_count: int = 0
    gpu_name: str = ""
    gpu_memory_mib: int = 0

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    def capacity(self, docker: bool = True) -> Capacity:
        """What a runner of this type has (the deep-learning AMI ships Docker and the NVIDIA runtime)."""
        from dstack.backends.base import Capacity, GpuInfo

        gpus = [GpuInfo(i, self.gpu_name, self.gpu_memory_mib) for i in range(self.gpu_count)]
        return Capacity(
            cpus=float(self.vcpus), memory_mib=int(self.memory_gib * 1024), gpus=gpus, docker=docker
        )

    def fits(self, spec: JobSpec) -> bool:
        """Whether a job's resources fit this type (GPU count and name, memory, CPUs)."""
        from dstack.scheduler.placement import shortfall

        return shortfall(self.capacity(), spec) is None

    def describe(self) -> str:
        gpus = f", {self.gpu_count}x {self.gpu_name}" if self.gpu_count else ""
        return f"{self.name} ({self.vcpus} vCPUs, {self.memory_gib:g} GiB{gpus})"


T4, A10G, L4 = "Tesla T4", "NVIDIA A10G", "NVIDIA L4"
V100, V100_32 = "Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"
A100_40, A100_80, H100 = "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def _t(
    name: str, vcpus: int, gib: float, price: float, gpus: int = 0, gpu: str = "", mib: int = 0
) -> InstanceType:
    return InstanceType(name, vcpus, gib, price, gpus, gpu, mib)


INSTANCE_TYPES: tuple[InstanceType, ...] = (
    # CPU only
    _t("c5.large", 2, 4, 0.085), _t("c5.xlarge", 4, 8, 0.17), _t("c5.2xlarge", 8, 16, 0.34),
    _t("c5.4xlarge", 16, 32, 0.68), _t("c5.9xlarge", 36, 72, 1.53),
    _t("m5.large", 2, 8, 0.096), _t("m5.xlarge", 4, 16, 0.192), _t("m5.2xlarge", 8, 32, 0.384),
    _t("m5.4xlarge", 16, 64, 0.768), _t("m5.8xlarge", 32, 128, 1.536),
    # NVIDIA T4
    _t("g4dn.xlarge", 4, 16, 0.526, 1, T4, 15360), _t("g4dn.2xlarge", 8, 32, 0.752, 1, T4, 15360),
    _t("g4dn.4xlarge", 16, 64, 1.204, 1, T4, 15360), _t("g4dn.8xlarge", 32, 128, 2.176, 1, T4, 15360),
    _t("g4dn.12xlarge", 48, 192, 3.912, 4, T4, 15360), _t("g4dn.16xlarge", 64, 256, 4.352, 1, T4, 15360),
    _t("g4dn.metal", 96, 384, 7.824, 8, T4, 15360),
    # NVIDIA A10G
    _t("g5.xlarge", 4, 16, 1.006, 1, A10G, 23028), _t("g5.2xlarge", 8, 32, 1.212, 1, A10G, 23028),
    _t("g5.4xlarge", 16, 64, 1.624, 1, A10G, 23028), _t("g5.8xlarge", 32, 128, 2.448, 1, A10G, 23028),
    _t("g5.12xlarge", 48, 192, 5.672, 4, A10G, 23028), _t("g5.16xlarge", 64, 256, 4.096, 1, A10G, 23028),
    _t("g5.24xlarge", 96, 384, 8.144, 4, A10G, 23028), _t("g5.48xlarge", 192, 768, 16.288, 8, A10G, 23028),
    # NVIDIA L4
    _t("g6.xlarge", 4, 16, 0.805, 1, L4, 23034), _t("g6.2xlarge", 8, 32, 0.978, 1, L4, 23034),
    _t("g6.4xlarge", 16, 64, 1.323, 1, L4, 23034), _t("g6.8xlarge", 32, 128, 2.014, 1, L4, 23034),
    _t("g6.12xlarge", 48, 192, 4.602, 4, L4, 23034), _t("g6.16xlarge", 64, 256, 3.397, 1, L4, 23034),
    _t("g6.24xlarge", 96, 384, 6.675, 4, L4, 23034), _t("g6.48xlarge", 192, 768, 13.35, 8, L4, 23034),
    # NVIDIA V100, A100, H100
    _t("p3.2xlarge", 8, 61, 3.06, 1, V100, 16384), _t("p3.8xlarge", 32, 244, 12.24, 4, V100, 16384),
    _t("p3.16xlarge", 64, 488, 24.48, 8, V100, 16384),
    _t("p3dn.24xlarge", 96, 768, 31.212, 8, V100_32, 32768),
    _t("p4d.24xlarge", 96, 1152, 32.7726, 8, A100_40, 40960),
    _t("p4de.24xlarge", 96, 1152, 40.9657, 8, A100_80, 81920),
    _t("p5.48xlarge", 192, 2048, 98.32, 8, H100, 81559),
)  # fmt: skip

BY_NAME: dict[str, InstanceType] = {t.name: t for t in INSTANCE_TYPES}


def instance_type(name: str) -> InstanceType:
    """The type called `name`; UsageError naming the families dstack knows if there is none."""
    from dstack.errors import UsageError

    try:
        return BY_NAME[name]
    except KeyError:
        families = sorted({t.family for t in INSTANCE_TYPES})
        raise UsageError(
            f"unknown instance type {name!r}", hint=f"dstack knows the families {', '.join(families)}"
        ) from None


def matching(patterns: list[str]) -> list[InstanceType]:
    """The known types any of `patterns` names (exact names or globs like `g5.*`)."""
    return [t for t in INSTANCE_TYPES if any(fnmatchcase(t.name, p) for p in patterns)]
