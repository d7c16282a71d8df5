"""Settings kept in the state database (`dstack config`): never secrets, only where things are."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.state import State


def read_settings(state: State) -> dict[str, dict[str, Any]]:
    """Every section of the configuration, with the defaults filled in."""
    from dstack.home import home

    storage = json.loads(state.setting("storage") or "{}") or {"url": str(home() / "artifacts")}
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
    conf = {
        k: v
        for k, v in {"url": url, "endpoint_url": endpoint_url, "region": region, "profile": profile}.items()
        if v
    }
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
