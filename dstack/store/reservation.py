"""What a job holds where it runs (the jobs table's `reserved` JSON), as typed models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Hold:
    """What a job holds on one runner: CPUs, memory, GPU indexes, ports; placement adds these up."""

    cpu: float = 0.0
    memory_mib: int = 0
    gpus: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)


@dataclass
class RankHold(Hold):
    """What one rank of a multi-node job holds on its host."""

    runner: str = ""


@dataclass
class Reservation(Hold):
    """A job's reservation: what it holds where it runs (rank 0's host for a multi-node job), its ranks'
    holds, and the rendezvous port it got on rank 0's host."""

    ranks: list[RankHold] = field(default_factory=list)
    master_port: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reservation:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["ranks"] = [_rank(r) for r in data.get("ranks") or []]
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def on(self, runner: str) -> list[Hold]:
        """What the job holds on `runner`: one hold, or its ranks' there (rank 0 has the job's ports too)."""
        if not self.ranks:
            return [self]
        return [
            Hold(r.cpu, r.memory_mib, list(r.gpus), [*r.ports, *(self.ports if i == 0 else [])])
            for i, r in enumerate(self.ranks)
            if r.runner == runner
        ]


def _rank(data: dict[str, Any]) -> RankHold:
    known = {f.name for f in fields(RankHold)}
    return RankHold(**{k: v for k, v in data.items() if k in known})
