"""What only the S3 store does: multipart uploads, chunked resumable downloads, presigned URLs, URL errors.

The behaviour shared with the local store (stored once, corruption caught, path escapes, resume) is
tested against both in test_artifacts.py.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from s3server import S3Server

from dstack.errors import ArtifactError, StorageError, UsageError
from dstack.hashing import digest_bytes
from dstack.store import s3 as s3mod
from dstack.store import s3_download
from dstack.store.objects import open_store
from dstack.store.s3 import S3ObjectStore, parse_s3_url


@pytest.fixture
def server(request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue("s3_server")  # type: ignore[no-any-return]


@pytest.fixture
def store(request: pytest.FixtureRequest, server: S3Server) -> S3ObjectStore:
    url: str = request.getfixturevalue("s3_url")
    return S3ObjectStore(url, endpoint_url=server.endpoint_url, region="us-east-1")


def test_big_file_multipart_and_chunked_resume(store: S3ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(s3mod.MULTIPART_THRESHOLD + 1234)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    d = digest_bytes(data)
    assert store.put_file(src, d) is True
    assert store.put_file(src, d) is False
    # an interrupted download: chunk 0 done, the rest not
    dest = tmp_path / "out" / "big.bin"
    dest.parent.mkdir()
    part = dest.parent / f".big.bin.{d[:16]}.part"
    part.write_bytes(data[: s3_download.CHUNK] + b"\0" * (len(data) - s3_download.CHUNK))
    Path(f"{part}.chunks").write_text("[0]")
    ranges: list[str] = []

    def record(params: dict[str, dict[str, str]], **_: object) -> None:
        ranges.append(params.get("headers", {}).get("Range", ""))

    store.client.meta.events.register("before-call.s3.GetObject", record)
    store.get_file(d, dest)
    assert dest.read_bytes() == data
    assert ranges == [f"bytes={s3_download.CHUNK}-{len(data) - 1}"]
    assert not part.exists() and not Path(f"{part}.chunks").exists()


def test_a_bad_resumed_part_is_downloaded_again(store: S3ObjectStore, tmp_path: Path) -> None:
    data = b"0123456789" * 100
    d = digest_bytes(data)
    store.put_bytes(data, d)
    dest = tmp_path / "f"
    part = tmp_path / f".f.{d[:16]}.part"
    part.write_bytes(b"X" * len(data))
    Path(f"{part}.chunks").write_text("[0]")  # claims done, but garbage
    store.get_file(d, dest)
    assert dest.read_bytes() == data


def test_presigned_urls(store: S3ObjectStore) -> None:
    d = digest_bytes(b"uploaded without credentials")
    req = urllib.request.Request(store.presigned_put(d), data=b"uploaded without credentials", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert store.has(d)
    with urllib.request.urlopen(store.presigned_get(d), timeout=10) as resp:
        assert resp.read() == b"uploaded without credentials"


def test_url_parsing() -> None:
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(UsageError, match="no bucket"):
        parse_s3_url("s3:///x")
    with pytest.raises(UsageError, match="not an S3 URL"):
        parse_s3_url("http://x")


def test_open_store_gives_s3(server: S3Server, store: S3ObjectStore) -> None:
    opened = open_store(store.url, endpoint_url=server.endpoint_url, region="us-east-1")
    assert isinstance(opened, S3ObjectStore) and opened.url == store.url


def test_wrong_credentials_are_a_storage_error(
    server: S3Server, store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    denied = S3ObjectStore(store.url, endpoint_url=server.endpoint_url, region="us-east-1", max_attempts=1)
    with pytest.raises(StorageError, match=f"{store.url}: can't write k:"):
        denied.put_meta("k", b"v")
    with pytest.raises(StorageError, match=f"{store.url}: can't read"):
        denied.has("0" * 64)


def test_unreachable_endpoint_is_a_storage_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        dead = S3ObjectStore(
            "s3://b/x", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", max_attempts=1
        )
        with pytest.raises(StorageError, match="s3://b/x: can't read .* check the AWS credentials"):
            dead.has("0" * 64)


def _count_calls(store: S3ObjectStore) -> list[str]:
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    return calls


def test_a_small_object_is_one_conditional_put_and_a_big_one_is_hashed_once(
    store: S3ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_calls(store)
    small = tmp_path / "small.bin"
    small.write_bytes(b"small" * 1000)
    d = digest_bytes(small.read_bytes())
    assert store.put_file(small, d) is True
    assert store.put_file(small, d) is False  # If-None-Match answered: no HEAD first
    assert calls == ["PutObject", "PutObject"]

    hashed: list[Path] = []
    real = s3mod.digest_file
    monkeypatch.setattr(s3mod, "digest_file", lambda p: hashed.append(p) or real(p))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(s3mod.MULTIPART_THRESHOLD + 10))
    db = digest_bytes(big.read_bytes())
    assert store.put_file(big, db) is True
    assert hashed == [big]  # checked alongside the upload, once
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(s3mod.MULTIPART_THRESHOLD + 10))
    with pytest.raises(ArtifactError, match="other.bin changed while it was being saved"):
        store.put_file(other, digest_bytes(b"not its content"))
    assert not store.has(digest_bytes(b"not its content"))


def test_a_local_job_saving_an_unchanged_set_again_asks_the_bucket_nothing(
    store: S3ObjectStore, tmp_path: Path
) -> None:
    from dstack.backends.local import LocalRunner
    from dstack.specs import ArtifactSpec, JobSpec

    runner = LocalRunner(tmp_path / "jobs")
    spec = JobSpec(workflow="save", artifacts=[ArtifactSpec(path="out")])
    for job in ("job1", "job2"):
        out = runner.job_dir(job) / "work" / "out"
        out.mkdir(parents=True)
        for n in range(20):
            (out / f"f{n}").write_bytes(f"file {n}".encode() * 100)
    first, _ = runner.collect_artifacts("job1", spec, store)
    calls = _count_calls(store)
    second, _ = runner.collect_artifacts("job2", spec, store)
    assert second.digest() == first.digest()
    assert calls == []  # the digest cache knows every object is in the bucket


def test_a_new_manifest_is_one_conditional_put(store: S3ObjectStore) -> None:
    from dstack.store.objects import Manifest

    entry = {"path": "a", "size": 1, "mode": 0o100644, "digest": digest_bytes(b"a")}
    manifest = Manifest.model_validate({"entries": [entry]})
    calls = _count_calls(store)
    store.put_manifest("jobs/j1/attempt-1", manifest)
    assert calls == ["PutObject"]  # no HEAD first: a job's re-save of a known set is this one request
    store.put_manifest("jobs/j1/attempt-1", manifest)  # the same again: 412, then read and compared
    assert calls == ["PutObject", "PutObject", "GetObject"]
    other = Manifest.model_validate({"entries": [dict(entry, path="b")]})
    with pytest.raises(ArtifactError, match="already exists with different content"):
        store.put_manifest("jobs/j1/attempt-1", other)
    assert store.get_manifest("jobs/j1/attempt-1").digest() == manifest.digest()


def test_a_small_object_downloads_in_one_request(store: S3ObjectStore, tmp_path: Path) -> None:
    for data in (b"a small object", b""):
        d = digest_bytes(data)
        store.put_bytes(data, d)
        calls = _count_calls(store)
        store.get_file(d, tmp_path / d)
        assert (tmp_path / d).read_bytes() == data
        assert calls == ["GetObject"]  # the ranged GET's reply says the size: no HEAD first
