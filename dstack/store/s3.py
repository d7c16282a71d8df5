"""The object store in an S3 bucket: objects/<digest>, manifests/<name>.json and meta/<key> under a prefix."""

from __future__ import annotations

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
from dstack.store.s3_download import WORKERS, error_code, error_status, is_missing
from dstack.store.s3_download import get_file as download

MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART = 64 * 1024 * 1024  # multipart upload parts: fewer, bigger requests measured faster than 16 MiB
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of an s3://bucket/prefix URL."""
    if not url.startswith("s3://"):
        raise UsageError(f"not an S3 URL: {url!r}", hint="use s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise UsageError(f"no bucket in {url!r}", hint="use s3://bucket/prefix")
    return bucket, prefix.strip("/")


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
            max_pool_connections=4 * WORKERS,
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
            msg = e.response.get("Error", {}).get("Message") or error_code(e)
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
                if is_missing(e):
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
                if _lost_race(e):
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
            max_concurrency=WORKERS,
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
        download(self, digest, dest)

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
                if is_missing(e):
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
                if _lost_race(e):
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


def _lost_race(e: Exception) -> bool:
    """A conditional write (If-None-Match) refused: someone stored the key first."""
    return error_status(e) == 412 or error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict")
