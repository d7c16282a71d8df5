"""One timed upload of a folder to S3, as the bench's S3 rows compare them: dstack's or boto3's.

    python scripts/bench_s3_put.py dstack SRC ENDPOINT BUCKET PREFIX CACHE_DB
    python scripts/bench_s3_put.py boto3 SRC ENDPOINT BUCKET PREFIX

Both sides are timed the same way, in this process: from a ready client to the last byte stored (the
interpreter's start, imports and making the client are not timed: the orchestrator opens its store once a
run, not once a job). dstack's side is what a job's end does with S3 storage: open the
store like the orchestrator (`S3ObjectStore(url, endpoint_url, region)`), `save_artifacts` with the digest
cache at CACHE_DB, then `put_manifest`. boto3's side is `upload_file` of each file to PREFIX/RELPATH,
8 files at a time, TransferConfig(max_concurrency=8). Prints {"seconds": S, "requests": N}, N counted by
a `before-send.s3` hook.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self, **_: Any) -> None:
        with self._lock:
            self.n += 1


def dstack_put(src: Path, endpoint: str, bucket: str, prefix: str, cache_db: str, count: Counter) -> float:
    from dstack.artifacts import save_artifacts
    from dstack.store.digests import DigestCache
    from dstack.store.s3 import S3ObjectStore

    store = S3ObjectStore(f"s3://{bucket}/{prefix}", endpoint_url=endpoint, region="us-east-1")
    store.client.meta.events.register("before-send.s3", count)
    start = time.perf_counter()
    with DigestCache(Path(cache_db)) as cache:
        result = save_artifacts(src.parent, [src.name], store, cache)
    store.put_manifest(f"jobs/{uuid.uuid4().hex}/attempt-1", result.manifest)
    return time.perf_counter() - start


def boto3_put(src: Path, endpoint: str, bucket: str, prefix: str, count: Counter) -> float:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.meta.events.register("before-send.s3", count)
    start = time.perf_counter()
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    config = TransferConfig(max_concurrency=8)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(
            lambda rel: client.upload_file(str(src / rel), bucket, f"{prefix}/{rel}", Config=config), names
        ):
            pass
    return time.perf_counter() - start


def main() -> None:
    side, src, endpoint, bucket, prefix = sys.argv[1:6]
    count = Counter()
    if side == "dstack":
        took = dstack_put(Path(src), endpoint, bucket, prefix, sys.argv[6], count)
    else:
        took = boto3_put(Path(src), endpoint, bucket, prefix, count)
    print(json.dumps({"seconds": took, "requests": count.n}))
    sys.stdout.flush()
    os._exit(0)  # no waiting on boto3's idle connections


if __name__ == "__main__":
    main()
