"""What a host of kind 'ec2' records of its instance: the host row's `cloud` JSON, as a typed model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.hosts import Host


@dataclass
class Ec2Instance:
    """An instance dstack launched: its type and region from the start, its id and price once launched."""

    instance_type: str = ""
    region: str = ""
    launched_at: float = 0.0
    idle_timeout: float = 900.0  # seconds without a job before it is terminated
    instance_id: str | None = None
    price: float | None = None  # USD per hour, as offered
    spot: bool | None = None
    ready_at: float | None = None  # when it first answered over SSH and was probed
    address: str | None = None  # its own public (or private) address, as the API gives it

    @classmethod
    def of(cls, host: Host) -> Ec2Instance:
        """The host's instance record (empty for a host with none; keys it does not know are dropped)."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in (host.cloud or {}).items() if k in known and v is not None}
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
