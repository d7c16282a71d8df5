"""The object store in an S3 bucket: objects/<digest>, manifests/<name>.json and meta/<key> under a prefix."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dstack.errors import ArtifactError, NotFoundError, StorageError, UsageError
from dstack.hashing import digest_bytes, digest_file
from dstack.store.base import (
    Manifest,
    ObjectStore,
    StoredItem,
    check_digest,
    check_name,
    parse_manifest,
)

MULTIPART_THRESHOLD = 16 * 1024 * 1024
CHUNK = 16 * 1024 * 1024  # ranged downloads, resumable chunk by chunk
PART = 64 * 1024 * 1024  # multipart upload parts: fewer, bigger requests measured faster than 16 MiB
_WORKERS = 8
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of an s3://bucket/prefix URL."""
    if not url.startswith("s3://"):
        raise UsageError(f"not an S3 URL: {url!r}", hint="use s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise UsageError(f"no bucket in {url!r}", hint="use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(e: Exception) -> int:
    response = getattr(e, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(e: Exception) -> bool:
    return _code(e) in ("404", "NoSuchKey", "NotFound") or _status(e) == 404


def _no_expect_continue(request: Any, **_: Any) -> None:
    request.headers.pop("Expect", None)


class S3ObjectStore(ObjectStore):
    """An object store in an S3 (or S3-compatible) bucket; nothing in it is ever overwritten but meta."""

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_attempts: int = 5,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except Exception as e:  # botocore's ProfileNotFound and friends
            raise StorageError(f"can't use AWS profile {profile!r}: {e}") from e
        config = Config(
            max_pool_connections=4 * _WORKERS,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            signature_version="s3v4",
            # no SHA-256 (botocore signs every body over plain http) nor CRC32 over every byte sent: the
            # bytes are named by their BLAKE3 digest, checked on every read (TLS guards them on the way)
            s3={"payload_signing_enabled": False, **({"addressing_style": "path"} if endpoint_url else {})},
            request_checksum_calculation="when_required",
        )
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        # single PUTs are small (big files go multipart): waiting for "100 Continue" gains nothing, and
        # some S3 servers (SeaweedFS) now and then never send it, stalling the upload for a read timeout
        self.client.meta.events.register("before-send.s3.PutObject", _no_expect_continue)

    # -- keys ---------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def object_key(self, digest: str) -> str:
        """The key of object `digest` in the bucket."""
        return self._key("objects", check_digest(digest))

    def _manifest_key(self, name: str) -> str:
        return self._key("manifests", f"{check_name(name)}.json")

    def _meta_key(self, key: str) -> str:
        return self._key("meta", check_name(key, "meta key"))

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn boto errors into one-line StorageErrors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            msg = e.response.get("Error", {}).get("Message") or _code(e)
            raise StorageError(f"{self.url}: can't {what}: {msg}") from e
        except BotoCoreError as e:
            raise StorageError(
                f"{self.url}: can't {what}: {e}", hint="check the AWS credentials and the endpoint"
            ) from e

    # -- objects ------------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self._errors(f"read {key}"):
            try:
                return dict(self.client.head_object(Bucket=self.bucket, Key=key))
            except ClientError as e:
                if _missing(e):
                    return None
                raise

    def has(self, digest: str) -> bool:
        return self._head(self.object_key(digest)) is not None

    def put_file(self, path: Path, digest: str) -> bool:
        """One conditional PUT for a small file (no HEAD first: If-None-Match says whether it was there),
        read once and hashed from the same bytes; a big one is hashed while it uploads, not before."""
        key = self.object_key(digest)
        before = os.stat(path)
        if before.st_size < MULTIPART_THRESHOLD:
            # bytes, not a file object: some servers stall on an empty streamed body
            data = path.read_bytes()
            actual = digest_bytes(data)
            if actual != digest:
                raise ArtifactError(f"{path} changed while it was being saved (digest {actual[:12]})")
            if not self._put_new(key, data):
                return False
        else:
            if self._head(key) is not None:
                return False
            self._upload_big(path, key, digest)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            with self._errors(f"delete {key}"):
                self.client.delete_object(Bucket=self.bucket, Key=key)
            raise ArtifactError(f"{path} changed while it was being uploaded")
        return True

    def _put_new(self, key: str, data: bytes) -> bool:
        """PUT `data` at `key` unless something is there already (then False)."""
        from botocore.exceptions import ClientError

        with self._errors(f"upload {key}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as e:
                if _status(e) == 412 or _code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False  # someone stored it before us
                raise
        return True

    def _upload_big(self, path: Path, key: str, digest: str) -> None:
        """Multipart upload of `path`, its digest checked by a thread alongside (the object is deleted if
        the file turns out not to be `digest`)."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=PART,
            max_concurrency=_WORKERS,
        )
        with ThreadPoolExecutor(max_workers=1) as hasher:
            checked = hasher.submit(digest_file, path)
            with self._errors(f"upload {path} to {key}"):
                self.client.upload_file(str(path), self.bucket, key, Config=config)
            actual = checked.result()
        if actual != digest:
            with self._errors(f"delete {key}"):
                self.client.delete_object(Bucket=self.bucket, Key=key)
            raise ArtifactError(f"{path} changed while it was being saved (digest {actual[:12]})")

    def get_file(self, digest: str, dest: Path) -> None:
        key = self.object_key(digest)
        part = dest.parent / f".{dest.name[:100]}.{digest[:16]}.part"
        for attempt in (1, 2):
            resumed = self._download(key, part, digest)
            actual = digest_file(part)
            if actual == digest:
                break
            self._forget_part(part)
            if not resumed or attempt == 2:
                raise ArtifactError(
                    f"object {digest} is corrupt (its content hashes to {actual[:12]}): "
                    f"s3://{self.bucket}/{key}",
                    hint="delete it and save the artifact again",
                )
        try:
            os.replace(part, dest)
        except OSError as e:
            raise StorageError(f"can't write {dest}: {e.strerror or e}") from e
        Path(f"{part}.chunks").unlink(missing_ok=True)

    def _first_chunk(self, key: str, part: Path, digest: str) -> int:
        """GET the first chunk of `key` into a new `part` (a small object: all of it, in one request, no
        HEAD first) and return the object's size, which the reply's Content-Range gives."""
        from botocore.exceptions import ClientError

        with self._errors(f"download {key}"):
            try:
                reply = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{CHUNK - 1}")
            except ClientError as e:
                if _missing(e):
                    raise ArtifactError(f"object {digest} is missing from {self.url}") from None
                if _status(e) == 416 or _code(e) == "InvalidRange":  # an empty object has no byte 0
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
            raise StorageError(f"{self.url}: short read of {key} ({got} bytes of chunk 0)")
        return size

    @staticmethod
    def _forget_part(part: Path) -> None:
        part.unlink(missing_ok=True)
        Path(f"{part}.chunks").unlink(missing_ok=True)

    def _download(self, key: str, part: Path, digest: str) -> bool:
        """Fetch `key` into `part` in ranged chunks, in parallel, skipping chunks a previous try finished.

        Returns whether anything was resumed.
        """
        chunks_file = Path(f"{part}.chunks")
        done: set[int] = set()
        if part.exists() and chunks_file.exists():
            head = self._head(key)
            if head is None:
                raise ArtifactError(f"object {digest} is missing from {self.url}")
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
                size = self._first_chunk(key, part, digest)
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
                with self._errors(f"download {key}"):
                    body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")[
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
                    raise StorageError(
                        f"{self.url}: short read of {key} ({offset - start} bytes of chunk {i})"
                    )
                return i

            if len(todo) == 1:
                done.add(fetch(todo[0]))
            elif todo:
                with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
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

    # -- presigned URLs (hosts that upload or download without credentials) --------------------

    def presigned_put(self, digest: str, expires_s: int = 3600) -> str:
        """A URL that lets anyone PUT object `digest` for `expires_s` seconds."""
        with self._errors("sign a URL"):
            return str(
                self.client.generate_presigned_url(
                    "put_object",
                    Params={"Bucket": self.bucket, "Key": self.object_key(digest)},
                    ExpiresIn=expires_s,
                )
            )

    def presigned_get(self, digest: str, expires_s: int = 3600) -> str:
        """A URL that lets anyone GET object `digest` for `expires_s` seconds."""
        with self._errors("sign a URL"):
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self.object_key(digest)},
                    ExpiresIn=expires_s,
                )
            )

    # -- manifests ----------------------------------------------------------------------------

    def _get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors(f"read {key}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as e:
                if _missing(e):
                    return None
                raise
            try:
                return bytes(body.read())
            finally:
                body.close()

    def put_manifest(self, name: str, manifest: Manifest) -> None:
        from botocore.exceptions import ClientError

        key = self._manifest_key(name)

        def check_same() -> None:
            data = self._get(key)
            if data is not None and parse_manifest(data, name).digest() != manifest.digest():
                raise ArtifactError(f"manifest {name!r} already exists with different content")

        # one conditional PUT, no HEAD first: a new job's manifest is one request (412: it was there)
        with self._errors(f"write {key}"):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=manifest.canonical_json().encode(),
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
            except ClientError as e:
                if _status(e) == 412 or _code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    check_same()
                    return
                raise

    def get_manifest(self, name: str) -> Manifest:
        data = self._get(self._manifest_key(name))
        if data is None:
            raise NotFoundError(f"no manifest {name!r} in {self.url}")
        return parse_manifest(data, name)

    # -- meta ---------------------------------------------------------------------------------

    def put_meta(self, key: str, data: bytes) -> None:
        with self._errors(f"write {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._meta_key(key), Body=data)

    def get_meta(self, key: str) -> bytes | None:
        return self._get(self._meta_key(key))

    def list_meta(self, prefix: str = "") -> list[str]:
        base = self._key("meta") + "/"
        keys: list[str] = []
        with self._errors("list meta records"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            ):
                keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_meta(self, key: str) -> None:
        with self._errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._meta_key(key))

    # -- listing and deleting (garbage collection) ---------------------------------------------

    def _list(self, base: str) -> Iterator[tuple[str, int, float]]:
        """(key after `base`, size, LastModified as a time) of every key under `base`, 1000 a page."""
        with self._errors(f"list {base}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            ):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(base) :], int(obj["Size"]), obj["LastModified"].timestamp()

    def list_objects(self) -> Iterator[StoredItem]:
        for name, size, mtime in self._list(self._key("objects") + "/"):
            yield StoredItem(name, size, mtime)

    def list_manifests(self) -> Iterator[StoredItem]:
        for name, size, mtime in self._list(self._key("manifests") + "/"):
            if name.endswith(".json"):
                yield StoredItem(name[: -len(".json")], size, mtime)

    def _delete_keys(self, keys: list[str]) -> list[str]:
        """Delete keys with DeleteObjects, DELETE_BATCH at a time; the keys deleted."""
        done: list[str] = []
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            with self._errors(f"delete {len(batch)} keys"):
                reply = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                why = first.get("Message") or first.get("Code")
                raise StorageError(
                    f"{self.url}: can't delete {first.get('Key')}: {why}"
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                )
            done += batch
        return done

    def delete_objects(self, digests: list[str], written_before: float) -> list[str]:
        # S3 has no conditional delete by age: the caller's listing (LastModified) already chose these
        keys = [self.object_key(d) for d in digests]
        cut = len(self._key("objects")) + 1
        return [k[cut:] for k in self._delete_keys(keys)]

    def delete_manifests(self, names: list[str]) -> None:
        self._delete_keys([self._manifest_key(n) for n in names])

    def clean_tmp(self, written_before: float) -> tuple[int, int]:
        """Abort multipart uploads of objects begun before `written_before` (interrupted saves)."""
        count = 0
        base = self._key("objects") + "/"
        with self._errors("list unfinished uploads"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=base
            ):
                for up in page.get("Uploads", []):
                    if up["Initiated"].timestamp() < written_before:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        count += 1
        return count, 0
