"""State (SQLite) and artifact stores (local folder or S3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.settings import StorageSettings
    from dstack.store.objects import ObjectStore
    from dstack.store.state import State


def open_object_store(state: State, default: StorageSettings | None = None) -> ObjectStore:
    """The artifact store: `dstack config storage`, else the repo's `.dstack/config.yaml`, else local."""
    from dstack.settings import StorageSettings

    conf = StorageSettings.load(state, default)
    if conf.is_s3:
        from dstack.store.s3 import S3ObjectStore

        return S3ObjectStore(
            conf.url, endpoint_url=conf.endpoint_url, region=conf.region, profile=conf.profile
        )
    from dstack.home import sub
    from dstack.store.objects import LocalObjectStore

    return LocalObjectStore(sub("artifacts"))
