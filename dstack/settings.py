"""Settings kept in the state database (`dstack config`): never secrets, only where things are."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.state import State


@dataclass
class StorageSettings:
    """Where artifacts live: `url` is s3://bucket/prefix, or empty for the local store under ~/.dstack."""

    url: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None  # an AWS profile from ~/.aws: credentials stay there, never here

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StorageSettings:
        known = {f.name for f in fields(cls)} - {"url"}
        return cls(str(data.get("url") or ""), **{k: v or None for k, v in data.items() if k in known})

    @classmethod
    def load(cls, state: State, default: StorageSettings | None = None) -> StorageSettings:
        """`dstack config storage`, else `default` (the repo's `.dstack/config.yaml`), else local."""
        raw = state.setting("storage")
        return cls.from_json(json.loads(raw)) if raw else (default or cls())

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def to_json(self) -> dict[str, str]:
        """The non-empty fields, as stored in the `storage` setting."""
        return {k: v for k, v in asdict(self).items() if v}


def read_settings(state: State) -> dict[str, dict[str, Any]]:
    """Every section of the configuration, with the defaults filled in."""
    from dstack.home import home

    storage = StorageSettings.load(state).to_json() or {"url": str(home() / "artifacts")}
    result: dict[str, dict[str, Any]] = {"storage": storage}
    aws = state.setting("aws")
    if aws:
        result["aws"] = json.loads(aws)
    return result


def set_storage(
    state: State,
    url: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
) -> dict[str, str]:
    """Make `url` the artifact store after checking it answers; `local` goes back to the default."""
    if url == "local":
        state.set_setting("storage", None)
        from dstack.home import home

        return {"url": str(home() / "artifacts")}
    from dstack.errors import UsageError

    if not url.startswith("s3://"):
        raise UsageError(f"unknown storage {url!r}", hint="use `local` or s3://bucket/prefix")
    conf = StorageSettings(url, endpoint_url=endpoint_url, region=region, profile=profile).to_json()
    from dstack.store.s3 import S3ObjectStore

    store = S3ObjectStore(url, endpoint_url=endpoint_url, region=region, profile=profile)
    check_bucket(store)
    state.set_setting("storage", json.dumps(conf))
    return conf


def check_bucket(store: Any) -> None:
    """StorageError naming the bucket, in one line, if it can't be reached with these credentials."""
    from dstack.errors import StorageError

    try:
        store.client.head_bucket(Bucket=store.bucket)
    except Exception as e:  # botocore's errors: no credentials, no bucket, no endpoint
        reason = getattr(e, "response", {}).get("Error", {}).get("Message") or str(e).splitlines()[0]
        raise StorageError(
            f"can't reach bucket '{store.bucket}': {reason}",
            hint="check the name, --endpoint-url/--region and your AWS credentials",
        ) from None
