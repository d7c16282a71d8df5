"""Downloading an object from the S3 store: ranged chunks in parallel, resumable, checked by its digest."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import ArtifactError, StorageError
from dstack.hashing import digest_file

if TYPE_CHECKING:
    from dstack.store.s3 import S3ObjectStore

CHUNK = 16 * 1024 * 1024  # ranged downloads, resumable chunk by chunk
WORKERS = 8


def error_code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def error_status(e: Exception) -> int:
    response = getattr(e, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_missing(e: Exception) -> bool:
    return error_code(e) in ("404", "NoSuchKey", "NotFound") or error_status(e) == 404


def get_file(store: S3ObjectStore, digest: str, dest: Path) -> None:
    """Download object `digest` to `dest` in ranged chunks, resuming a part an earlier try left; checked."""
    key = store.object_key(digest)
    part = dest.parent / f".{dest.name[:100]}.{digest[:16]}.part"
    for attempt in (1, 2):
        resumed = _download(store, key, part, digest)
        actual = digest_file(part)
        if actual == digest:
            break
        _forget_part(part)
        if not resumed or attempt == 2:
            raise ArtifactError(
                f"object {digest} is corrupt (its content hashes to {actual[:12]}): "
                f"s3://{store.bucket}/{key}",
                hint="delete it and save the artifact again",
            )
    try:
        os.replace(part, dest)
    except OSError as e:
        raise StorageError(f"can't write {dest}: {e.strerror or e}") from e
    Path(f"{part}.chunks").unlink(missing_ok=True)


def _first_chunk(store: S3ObjectStore, key: str, part: Path, digest: str) -> int:
    """GET the first chunk of `key` into a new `part` (a small object: all of it, in one request, no
    HEAD first) and return the object's size, which the reply's Content-Range gives."""
    from botocore.exceptions import ClientError

    with store._errors(f"download {key}"):
        try:
            reply = store.client.get_object(Bucket=store.bucket, Key=key, Range=f"bytes=0-{CHUNK - 1}")
        except ClientError as e:
            if is_missing(e):
                raise ArtifactError(f"object {digest} is missing from {store.url}") from None
            if error_status(e) == 416 or error_code(e) == "InvalidRange":  # an empty object has no byte 0
                part.write_bytes(b"")
                return 0
            raise
        total = str(reply.get("ContentRange") or "").rpartition("/")[2]
        size = int(total) if total.isdigit() else int(reply["ContentLength"])
        body = reply["Body"]
        try:
            with open(part, "wb") as f:
                for data in iter(lambda: body.read(1024 * 1024), b""):
                    f.write(data)
                got = f.tell()
                f.truncate(size)
        finally:
            body.close()
    if got != min(size, CHUNK):
        raise StorageError(f"{store.url}: short read of {key} ({got} bytes of chunk 0)")
    return size


def _forget_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    Path(f"{part}.chunks").unlink(missing_ok=True)


def _download(store: S3ObjectStore, key: str, part: Path, digest: str) -> bool:
    """Fetch `key` into `part` in ranged chunks, in parallel, skipping chunks a previous try finished.

    Returns whether anything was resumed.
    """
    chunks_file = Path(f"{part}.chunks")
    done: set[int] = set()
    if part.exists() and chunks_file.exists():
        head = store._head(key)
        if head is None:
            raise ArtifactError(f"object {digest} is missing from {store.url}")
        size = int(head["ContentLength"])
        try:
            done = set(json.loads(chunks_file.read_text()))
        except ValueError:
            done = set()
        if part.stat().st_size != size:
            done = set()
    resumed = bool(done)
    if not done:
        try:
            size = _first_chunk(store, key, part, digest)
        except OSError as e:
            raise StorageError(f"can't write {part}: {e.strerror or e}") from e
        done = {0}
    count = (size + CHUNK - 1) // CHUNK
    todo = [i for i in range(count) if i not in done]
    if not todo:
        return resumed
    fd = os.open(part, os.O_RDWR)
    try:

        def fetch(i: int) -> int:
            start, end = i * CHUNK, min(size, (i + 1) * CHUNK) - 1
            with store._errors(f"download {key}"):
                body = store.client.get_object(Bucket=store.bucket, Key=key, Range=f"bytes={start}-{end}")[
                    "Body"
                ]
                offset = start
                try:
                    for data in iter(lambda: body.read(1024 * 1024), b""):
                        os.pwrite(fd, data, offset)
                        offset += len(data)
                finally:
                    body.close()
            if offset != end + 1:
                raise StorageError(f"{store.url}: short read of {key} ({offset - start} bytes of chunk {i})")
            return i

        if len(todo) == 1:
            done.add(fetch(todo[0]))
        elif todo:
            with ThreadPoolExecutor(max_workers=WORKERS) as pool:
                for i in pool.map(fetch, todo):
                    done.add(i)
                    tmp = Path(f"{chunks_file}.tmp")
                    tmp.write_text(json.dumps(sorted(done)))
                    os.replace(tmp, chunks_file)
    except OSError as e:
        raise StorageError(f"can't write {part}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return resumed
