"""The object store (local and S3, same suite) and saving/restoring artifacts through it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from s3server import S3Server

from dstack.artifacts import Progress, manifest_from_path, restore_artifacts, save_artifacts
from dstack.errors import ArtifactError, NotFoundError, UsageError
from dstack.hashing import digest_bytes
from dstack.store.digests import DigestCache
from dstack.store.objects import LocalObjectStore, Manifest, ManifestEntry, ObjectStore, open_store

Tamper = Callable[[str, bytes], None]


@pytest.fixture(params=["local", "s3"])
def store_and_tamper(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStore, Tamper]:
    """Each store, with a way to overwrite an object behind its back."""
    if request.param == "local":
        local = LocalObjectStore(tmp_path / "artifacts")

        def tamper_local(digest: str, data: bytes) -> None:
            path = local.object_path(digest)
            path.chmod(0o644)
            path.write_bytes(data)

        return local, tamper_local
    from dstack.store.s3 import S3ObjectStore

    server: S3Server = request.getfixturevalue("s3_server")
    url: str = request.getfixturevalue("s3_url")
    s3 = S3ObjectStore(url, endpoint_url=server.endpoint_url, region="us-east-1")

    def tamper_s3(digest: str, data: bytes) -> None:
        s3.client.put_object(Bucket=s3.bucket, Key=s3.object_key(digest), Body=data)

    return s3, tamper_s3


@pytest.fixture
def store(store_and_tamper: tuple[ObjectStore, Tamper]) -> ObjectStore:
    return store_and_tamper[0]


def _file(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


# -- the store itself ----------------------------------------------------------------------------


def test_objects_are_stored_once_and_read_back(store: ObjectStore, tmp_path: Path) -> None:
    src = _file(tmp_path / "a.bin", b"payload")
    d = digest_bytes(b"payload")
    assert not store.has(d)
    assert store.put_file(src, d) is True
    assert store.put_file(src, d) is False
    assert store.has(d)
    dest = tmp_path / "out" / "a.bin"
    dest.parent.mkdir()
    store.get_file(d, dest)
    assert dest.read_bytes() == b"payload"
    assert store.get_bytes(d) == b"payload"
    assert store.put_bytes(b"payload", d) is False


def test_a_file_that_does_not_match_its_digest_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    src = _file(tmp_path / "a.bin", b"payload")
    with pytest.raises(ArtifactError, match="a.bin changed while it was being saved"):
        store.put_file(src, digest_bytes(b"other"))
    assert not store.has(digest_bytes(b"other"))


def test_corrupt_object_is_caught(store_and_tamper: tuple[ObjectStore, Tamper], tmp_path: Path) -> None:
    store, tamper = store_and_tamper
    d = digest_bytes(b"good")
    store.put_file(_file(tmp_path / "good", b"good"), d)
    tamper(d, b"evil")
    dest = tmp_path / "restored"
    with pytest.raises(ArtifactError, match=f"object {d} is corrupt"):
        store.get_file(d, dest)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if "restored" in p.name]  # no temp files left


def test_missing_object_and_bad_digest(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=f"object {'0' * 64} is missing"):
        store.get_file("0" * 64, tmp_path / "x")
    with pytest.raises(ArtifactError, match="invalid object digest '../../etc/passwd'"):
        store.has("../../etc/passwd")


def test_manifests_are_never_overwritten(store: ObjectStore) -> None:
    m1 = Manifest(entries=[ManifestEntry(path="a", size=1, mode=0o100644, digest="1" * 64)])
    m2 = Manifest(entries=[ManifestEntry(path="a", size=1, mode=0o100644, digest="2" * 64)])
    store.put_manifest("runs/r1/train", m1)
    store.put_manifest("runs/r1/train", m1)  # the same again: fine
    with pytest.raises(ArtifactError, match="manifest 'runs/r1/train' already exists with different content"):
        store.put_manifest("runs/r1/train", m2)
    assert store.get_manifest("runs/r1/train") == m1
    assert store.has_manifest("runs/r1/train")
    with pytest.raises(NotFoundError, match="no manifest 'nope'"):
        store.get_manifest("nope")
    with pytest.raises(UsageError, match="invalid manifest name '../x'"):
        store.put_manifest("../x", m1)


def test_meta_records(store: ObjectStore) -> None:
    assert store.get_meta("tags/best") is None
    store.put_meta("tags/best", b"run-1")
    store.put_meta("tags/best", b"run-2")
    store.put_meta("tags/base", b"run-0")
    store.put_meta("other", b"x")
    assert store.get_meta("tags/best") == b"run-2"
    assert store.list_meta("tags/") == ["tags/base", "tags/best"]
    store.delete_meta("tags/best")
    store.delete_meta("tags/best")
    assert store.list_meta("tags/") == ["tags/base"]
    with pytest.raises(UsageError, match="invalid meta key"):
        store.get_meta("../../x")


def test_manifest_digest_is_canonical() -> None:
    a = ManifestEntry(path="a", size=1, mode=0o100644, digest="1" * 64)
    b = ManifestEntry(path="b", size=2, mode=0o100755, digest="2" * 64)
    assert Manifest(entries=[a, b]).digest() == Manifest(entries=[b, a]).digest()
    assert Manifest(entries=[a]).digest() != Manifest(entries=[b]).digest()


def test_local_store_layout(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "artifacts")
    d = digest_bytes(b"x")
    store.put_file(_file(tmp_path / "x", b"x"), d)
    obj = tmp_path / "artifacts" / "objects" / d[:2] / d[2:]
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444
    assert store.url == (tmp_path / "artifacts").as_uri()
    assert isinstance(open_store(store.url), LocalObjectStore)
    assert open_store(str(tmp_path / "artifacts")).url == store.url
    with pytest.raises(UsageError, match="unsupported artifact store URL 'gs://b'"):
        open_store("gs://b")


# -- saving and restoring artifacts --------------------------------------------------------------


def _workdir(tmp_path: Path) -> Path:
    w = tmp_path / "job"
    _file(w / "model" / "weights.bin", os.urandom(3000))
    _file(w / "model" / "copy.bin", b"same content")
    _file(w / "model" / "sub" / "same.bin", b"same content")
    _file(w / "model" / "run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    _file(w / "model" / "empty", b"")
    (w / "model" / "latest").symlink_to("weights.bin")
    _file(w / "metrics.json", '{"acc": 0.9}')
    return w


def test_save_and_restore_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    w = _workdir(tmp_path)
    events: list[Progress] = []
    with DigestCache(tmp_path / "digests.sqlite") as cache:
        result = save_artifacts(w, ["model", "./metrics.json", "missing/dir"], store, cache, events.append)
    assert result.missing == ["missing/dir"]
    paths = [e.path for e in result.manifest.entries]
    model = ["copy.bin", "empty", "latest", "run.sh", "sub/same.bin", "weights.bin"]
    assert paths == ["metrics.json", *(f"model/{name}" for name in model)]
    assert result.new_objects == 6  # the two identical files are stored once
    assert events and events[-1].done_files == events[-1].total_files == 6

    target = tmp_path / "restored"
    restored = restore_artifacts(result.manifest, store, target)
    assert len(restored) == 7
    for rel in paths:
        src, dst = w / rel, target / rel
        if src.is_symlink():
            assert dst.is_symlink() and os.readlink(dst) == "weights.bin"
        else:
            assert dst.read_bytes() == src.read_bytes()
            assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE(src.stat().st_mode)
    assert os.access(target / "model" / "run.sh", os.X_OK)


def test_saving_again_stores_nothing_new(store: ObjectStore, tmp_path: Path) -> None:
    w = _workdir(tmp_path)
    first = save_artifacts(w, ["model"], store)
    again = save_artifacts(w, ["model"], store)
    assert again.new_objects == 0
    assert again.manifest.digest() == first.manifest.digest()


def test_absolute_artifact_paths_lose_their_leading_slash(store: ObjectStore, tmp_path: Path) -> None:
    outside = _file(tmp_path / "data" / "out.txt", "outside")
    result = save_artifacts(tmp_path / "job", [str(outside.parent)], store)
    assert [e.path for e in result.manifest.entries] == [str(outside).lstrip("/")]


def test_relative_path_above_workdir_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact path '../x' is outside the working directory"):
        save_artifacts(tmp_path, ["../x"], store)


def test_restore_a_subpath(store: ObjectStore, tmp_path: Path) -> None:
    result = save_artifacts(_workdir(tmp_path), ["model", "metrics.json"], store)
    restored = restore_artifacts(result.manifest, store, tmp_path / "t", subpath="model/sub")
    assert restored == [tmp_path / "t" / "model" / "sub" / "same.bin"]
    with pytest.raises(NotFoundError, match="no artifact file at 'nothing'"):
        restore_artifacts(result.manifest, store, tmp_path / "t", subpath="nothing")


def test_restore_resumes(store: ObjectStore, tmp_path: Path) -> None:
    result = save_artifacts(_workdir(tmp_path), ["model"], store)
    target = tmp_path / "t"
    restore_artifacts(result.manifest, store, target)
    (target / "model" / "weights.bin").unlink()
    (target / "model" / "copy.bin").write_bytes(b"damaged!")
    events: list[Progress] = []
    restore_artifacts(result.manifest, store, target, on_progress=events.append)
    assert (target / "model" / "copy.bin").read_bytes() == b"same content"
    assert (target / "model" / "weights.bin").exists()
    assert events[-1].done_files == 6


@pytest.mark.parametrize(
    "bad",
    ["../escape.txt", "/etc/escape.txt", "a/../../escape.txt", "a//b", "", ".", "a\\..\\b"],
)
def test_manifest_paths_that_escape_are_refused(store: ObjectStore, tmp_path: Path, bad: str) -> None:
    d = digest_bytes(b"x")
    store.put_bytes(b"x", d)
    manifest = Manifest(entries=[ManifestEntry(path=bad, size=1, mode=0o100644, digest=d)])
    with pytest.raises(ArtifactError, match="would escape the target directory") as info:
        restore_artifacts(manifest, store, tmp_path / "t")
    assert repr(bad) in str(info.value)
    assert not (tmp_path / "escape.txt").exists()


def test_writing_through_a_symlink_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    d = digest_bytes(b"x")
    store.put_bytes(b"x", d)
    link_target = str(outside).encode()
    store.put_bytes(link_target, digest_bytes(link_target))
    manifest = Manifest(
        entries=[
            ManifestEntry(
                path="link", size=len(link_target), mode=0o120000, digest=digest_bytes(link_target)
            ),
            ManifestEntry(path="link/pwned", size=1, mode=0o100644, digest=d),
        ]
    )
    with pytest.raises(ArtifactError, match="'link/pwned' would be written through a symlink"):
        restore_artifacts(manifest, store, tmp_path / "t")
    # a symlink already in the target is not followed either
    target = tmp_path / "t2"
    target.mkdir()
    (target / "link").symlink_to(outside)
    only_file = Manifest(entries=[manifest.entries[1]])
    with pytest.raises(ArtifactError, match="'link/pwned' would be written through the symlink"):
        restore_artifacts(only_file, store, target)
    assert list(outside.iterdir()) == []


def test_manifest_from_path(store: ObjectStore, tmp_path: Path) -> None:
    w = _workdir(tmp_path)
    m = manifest_from_path(w / "model", store)
    assert "weights.bin" in [e.path for e in m.entries]
    single = manifest_from_path(w / "metrics.json", store)
    assert [e.path for e in single.entries] == ["metrics.json"]
    with pytest.raises(NotFoundError, match="does not exist"):
        manifest_from_path(tmp_path / "nope", store)


def test_many_files_in_parallel(store: ObjectStore, tmp_path: Path) -> None:
    w = tmp_path / "job"
    for i in range(300):
        _file(w / "out" / f"{i % 10}" / f"{i}.txt", f"file {i % 150}")
    result = save_artifacts(w, ["out"], store)
    assert len(result.manifest.entries) == 300 and result.new_objects == 150
    restore_artifacts(result.manifest, store, tmp_path / "t")
    assert (tmp_path / "t" / "out" / "7" / "157.txt").read_text() == "file 7"


def test_links_stay_links_and_restores_drop_setuid(store: ObjectStore, tmp_path: Path) -> None:
    w = tmp_path / "job"
    _file(w / "out" / "tool", "#!/bin/sh\n", mode=0o6777)
    (w / "out" / "etc").symlink_to("/etc")
    (w / "out" / "up").symlink_to("../../secret")
    (w / "out" / "near").symlink_to("tool")
    (w / "etcdir").symlink_to("/etc")
    os.mkfifo(w / "out" / "pipe")
    result = save_artifacts(w, ["out", "etcdir"], store)
    assert [e.path for e in result.manifest.entries] == [
        "etcdir",
        "out/etc",
        "out/near",
        "out/tool",
        "out/up",
    ]
    assert result.skipped == ["FIFO out/pipe"]
    skipped: list[str] = []
    target = tmp_path / "t"
    restore_artifacts(result.manifest, store, target, on_skip=skipped.append)
    assert [s.split(":")[0] for s in skipped] == ["symlink etcdir -> /etc", "symlink out/etc -> /etc",
                                                   "symlink out/up -> ../../secret"]  # fmt: skip
    assert os.readlink(target / "out" / "near") == "tool"
    assert stat.S_IMODE((target / "out" / "tool").stat().st_mode) == 0o755
    with pytest.raises(ArtifactError, match="'etcdir/passwd' goes through a symlink out of the working"):
        save_artifacts(w, ["etcdir/passwd"], store)


def test_a_corrupt_object_names_the_artifact_file(
    store_and_tamper: tuple[ObjectStore, Tamper], tmp_path: Path
) -> None:
    store, tamper = store_and_tamper
    result = save_artifacts(_workdir(tmp_path), ["metrics.json"], store)
    tamper(result.manifest.entries[0].digest, b"evil")
    with pytest.raises(ArtifactError, match="artifact file 'metrics.json': object [0-9a-f]{64} is corrupt"):
        restore_artifacts(result.manifest, store, tmp_path / "t")
