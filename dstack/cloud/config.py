"""`dstack config aws`: which instances dstack may rent, stored as JSON in the state's `settings` (key `aws`).

Nothing secret is kept here: credentials come from boto3's usual chain (environment, ~/.aws, SSO, roles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dstack.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from dstack.store.state import State

SETTING = "aws"
DEFAULT_AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
DEFAULT_TYPES = ["g4dn.*", "g5.*", "g6.*", "c5.*", "m5.*"]


class AwsConfig(BaseModel):
    """Where and what dstack may launch; every limit here is hard."""

    model_config = ConfigDict(extra="forbid")

    regions: list[str] = Field(default_factory=lambda: ["us-east-1"])
    instance_types: list[str] = Field(default_factory=lambda: list(DEFAULT_TYPES))  # names or globs
    spot: bool = True  # try spot first
    on_demand: bool = True  # on-demand when spot is off, refused or too dear
    max_price: float = 5.0  # USD/hour per instance
    max_instances: int = 2
    idle_timeout: int = 900  # seconds an instance may sit idle before it is terminated
    ami: str | None = None  # an AMI id; None: the newest image named like `ami_name`
    ami_name: str = DEFAULT_AMI_NAME
    ami_owner: str = "amazon"
    ssh_user: str = "ubuntu"
    key_name: str | None = None  # an existing key pair; None: dstack's own, kept in $DSTACK_HOME/aws
    key_file: str | None = None  # the private key of `key_name`
    disk_gib: int = 100
    ssh_cidr: str = "0.0.0.0/0"  # who may reach port 22 of dstack's instances
    launch_timeout: int = 600  # seconds from launch until SSH must answer

    @field_validator("regions", "instance_types")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("max_price")
    @classmethod
    def _price(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above 0")
        return value

    @field_validator("max_instances", "idle_timeout", "disk_gib", "launch_timeout")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value


def load_config(state: State) -> AwsConfig | None:
    """The AWS settings, or None when `dstack config aws` was never run."""
    text = state.setting(SETTING)
    if not text:
        return None
    try:
        return AwsConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(
            f"the stored AWS settings are invalid: {_first(exc)}",
            hint="run `dstack config aws --reset` and set them again",
        ) from exc


def configure(state: State, reset: bool = False, **changes: Any) -> AwsConfig:
    """Change some AWS settings (None values are left as they are) and store them; returns the result."""
    from dstack.cloud.instance_types import matching

    current = None if reset else load_config(state)
    data = current.model_dump() if current is not None else {}
    data.update({k: v for k, v in changes.items() if v is not None})
    try:
        config = AwsConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"bad AWS setting: {_first(exc)}") from exc
    for pattern in config.instance_types:
        if not matching([pattern]):
            raise UsageError(
                f"no known instance type matches {pattern!r}",
                hint="use names like g5.xlarge or globs like 'g5.*'",
            )
    if config.key_name and not config.key_file:
        raise UsageError("--key-name needs --key-file (the key pair's private key on this machine)")
    if config.key_file:
        path = Path(config.key_file).expanduser()
        if not path.is_file():
            raise UsageError(f"key file {config.key_file} does not exist")
        config.key_file = str(path.resolve())
        if not config.key_name:
            raise UsageError("--key-file needs --key-name (the key pair's name in EC2)")
    state.set_setting(SETTING, config.model_dump_json())
    return config


def remove_config(state: State) -> None:
    """Forget the AWS settings: dstack launches nothing more (instances it runs stay until reaped)."""
    state.set_setting(SETTING, None)


def config_json(config: AwsConfig) -> dict[str, Any]:
    """The settings as plain data (for `--json`)."""
    return json.loads(config.model_dump_json())


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]
