"""boto3 set-up: EC2 clients from the usual credential chain (and `AWS_ENDPOINT_URL`), errors as CloudError.

Every instance, key pair and security group dstack creates carries `dstack:managed=true` and
`dstack:home=<id of this DSTACK_HOME>`, so what one home launched is told apart from another's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dstack.errors import CloudError

if TYPE_CHECKING:
    from dstack.store.state import State

MANAGED_TAG = "dstack:managed"
HOME_TAG = "dstack:home"
HOST_TAG = "dstack:host"
HOME_SETTING = "home_id"


def home_id(state: State) -> str:
    """A random id for this DSTACK_HOME, made once and kept in its settings."""
    value = state.setting(HOME_SETTING)
    if not value:
        value = uuid.uuid4().hex[:12]
        state.set_setting(HOME_SETTING, value)
    return value


def tags(home: str, **extra: str) -> list[dict[str, str]]:
    """dstack's tags (plus `extra`) in the API's shape."""
    pairs = {MANAGED_TAG: "true", HOME_TAG: home, **{k: v for k, v in extra.items()}}
    return [{"Key": k, "Value": v} for k, v in pairs.items()]


def tag_specs(resource: str, home: str, **extra: str) -> list[dict[str, Any]]:
    """`TagSpecifications` for one resource type: tagged at creation, so nothing exists untagged."""
    return [{"ResourceType": resource, "Tags": tags(home, **extra)}]


def managed_filters(home: str | None = None) -> list[dict[str, Any]]:
    """Filters for what dstack made (in this home only when `home` is given)."""
    filters: list[dict[str, Any]] = [{"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    if home:
        filters.append({"Name": f"tag:{HOME_TAG}", "Values": [home]})
    return filters


def tag_value(resource: dict[str, Any], key: str) -> str | None:
    """The value of tag `key` on an API resource."""
    for tag in resource.get("Tags") or []:
        if tag.get("Key") == key:
            return str(tag.get("Value"))
    return None


@contextmanager
def api_errors(action: str, region: str | None = None) -> Iterator[None]:
    """Turn boto errors into one-line CloudErrors: `could not <action> in <region>: <why>`."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    where = f" in {region}" if region else ""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code, message = err.get("Code", "Error"), err.get("Message", str(exc))
        raise CloudError(f"could not {action}{where}: {code}: {message}".splitlines()[0]) from exc
    except (NoCredentialsError, NoRegionError) as exc:
        raise CloudError(
            f"could not {action}{where}: {exc}",
            hint="configure AWS credentials (aws configure, AWS_PROFILE or AWS_ACCESS_KEY_ID)",
        ) from exc
    except BotoCoreError as exc:
        raise CloudError(f"could not {action}{where}: {exc}".splitlines()[0]) from exc


def error_code(exc: BaseException) -> str | None:
    """The API error code behind a CloudError raised by `api_errors` (None for other errors)."""
    from botocore.exceptions import ClientError

    cause = exc.__cause__
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code"))
    return None


class Clients:
    """EC2 clients, one per region, from one boto3 session; close them when done (they hold sockets)."""

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[str, Any] = {}

    def ec2(self, region: str) -> Any:
        """The EC2 client of `region` (boto3 honours AWS_ENDPOINT_URL and the usual credential chain)."""
        if region not in self._clients:
            import boto3
            from botocore.config import Config

            if self._session is None:
                self._session = boto3.session.Session()
            config = Config(
                connect_timeout=10, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"}
            )
            with api_errors("create an EC2 client", region):
                self._clients[region] = self._session.client("ec2", region_name=region, config=config)
        return self._clients[region]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
