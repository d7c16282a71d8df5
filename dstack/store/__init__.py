"""State (SQLite) and artifact stores (local folder or S3)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.store.objects import ObjectStore
    from dstack.store.state import State


def open_object_store(state: State, default: dict[str, str] | None = None) -> ObjectStore:
    """The artifact store: `dstack config storage`, else the repo's `.dstack/config.yaml`, else local."""
    raw = state.setting("storage")
    conf: dict[str, str] = json.loads(raw) if raw else dict(default or {})
    if conf.get("url", "").startswith("s3://"):
        from dstack.store.s3 import S3ObjectStore

        return S3ObjectStore(
            conf["url"],
            endpoint_url=conf.get("endpoint_url"),
            region=conf.get("region"),
            profile=conf.get("profile"),
        )
    from dstack.home import sub
    from dstack.store.objects import LocalObjectStore

    return LocalObjectStore(sub("artifacts"))
