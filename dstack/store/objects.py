"""The content-addressed artifact store: immutable objects keyed by digest, manifests keyed by name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dstack.errors import ArtifactError, NotFoundError, StorageError, UsageError
from dstack.hashing import digest_bytes, digest_file, is_digest
from dstack.store.base import (  # re-exported: callers import the contract from here too
    S_IFLNK,
    Manifest,
    ManifestEntry,
    ObjectStore,
    StoredItem,
    check_digest,
    check_name,
    parse_manifest,
    safe_relpath,
)

__all__ = [
    "S_IFLNK",
    "LocalObjectStore",
    "Manifest",
    "ManifestEntry",
    "ObjectStore",
    "StoredItem",
    "check_digest",
    "check_name",
    "open_store",
    "parse_manifest",
    "safe_relpath",
    "temp_beside",
]

FRESH_COPY_MAX = 4 << 20  # objects up to this size are copied in one read (hashed on the way)
S_IFREG = 0o100000


def temp_beside(dest: Path) -> Path:
    """A new empty temporary file next to `dest` (same file system, so it can be renamed onto it)."""
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name[:100]}.", suffix=".dstack-tmp")
    except OSError as e:
        raise StorageError(f"can't write in {dest.parent}: {e.strerror or e}") from e
    os.close(fd)
    return Path(name)


class LocalObjectStore(ObjectStore):
    """An object store in a local directory: objects/ab/cdef…, manifests/NAME.json, meta/KEY."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.url = self.root.as_uri()
        try:
            for sub in ("objects", "manifests", "meta", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"can't create the artifact store at {self.root}: {e.strerror}") from e

    def object_path(self, digest: str) -> Path:
        """Where object `digest` lives (it may not exist)."""
        check_digest(digest)
        return self.root / "objects" / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.object_path(digest).is_file()

    def put_bytes(self, data: bytes, digest: str) -> bool:
        final = self.object_path(digest)
        if final.is_file():
            _freshen(final)
            return False
        return super().put_bytes(data, digest)

    def put_file(self, path: Path, digest: str) -> bool:
        final = self.object_path(digest)
        if final.is_file():
            _freshen(final)
            return False
        tmp = self._tmp_name()
        try:
            shutil.copyfile(path, tmp)
            actual = digest_file(tmp)
            if actual != digest:
                raise ArtifactError(
                    f"{path} changed while it was being saved (digest {actual[:12]}, expected {digest[:12]})"
                )
            os.chmod(tmp, 0o444)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)  # same content if someone raced us: harmless
        except OSError as e:
            raise StorageError(f"can't store {path} in {self.root}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def get_file(self, digest: str, dest: Path) -> None:
        src = self.object_path(digest)
        if not os.path.lexists(dest) and self._copy_fresh(src, dest, digest):
            return
        tmp = temp_beside(dest)
        try:
            _clone_or_copy(src, tmp)
            actual = digest_file(tmp)
            if actual != digest:
                raise ArtifactError(
                    f"object {digest} is corrupt (its content hashes to {actual[:12]}): {src}",
                    hint="delete it and save the artifact again",
                )
            os.replace(tmp, dest)
        except FileNotFoundError as e:
            if not src.exists():
                raise ArtifactError(f"object {digest} is missing from {self.root}") from e
            raise StorageError(f"can't write {dest}: {e.strerror}") from e
        except OSError as e:
            raise StorageError(f"can't restore object {digest} to {dest}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_fresh(self, src: Path, dest: Path, digest: str) -> bool:
        """Copy a small object straight to a `dest` that doesn't exist yet, hashing on the way: one read,
        one write, no temp file (a job checkout writes thousands). False: use the general path."""
        try:
            if os.stat(src).st_size > FRESH_COPY_MAX:
                return False
            with open(src, "rb") as f:
                data = f.read()
        except OSError:
            return False
        if digest_bytes(data) != digest:
            raise ArtifactError(
                f"object {digest} is corrupt (its content does not hash to its name): {src}",
                hint="delete it and save the artifact again",
            )
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise StorageError(f"can't write {dest}: {e.strerror or e}") from e
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise StorageError(f"can't write {dest}: {e.strerror or e}") from e
        return True

    def has_manifest(self, name: str) -> bool:
        return self._manifest_path(name).is_file()

    def _manifest_path(self, name: str) -> Path:
        return self.root / "manifests" / f"{check_name(name)}.json"

    def put_manifest(self, name: str, manifest: Manifest) -> None:
        final = self._manifest_path(name)
        data = manifest.canonical_json().encode()
        if final.exists():
            if parse_manifest(final.read_bytes(), name).digest() != manifest.digest():
                raise ArtifactError(f"manifest {name!r} already exists with different content")
            return
        tmp = self._tmp_name()
        try:
            tmp.write_bytes(data)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.link(tmp, final)  # fails rather than overwrites if someone wrote it meanwhile
        except FileExistsError:
            if parse_manifest(final.read_bytes(), name).digest() != manifest.digest():
                raise ArtifactError(f"manifest {name!r} already exists with different content") from None
        except OSError as e:
            raise StorageError(f"can't store manifest {name!r} in {self.root}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def get_manifest(self, name: str) -> Manifest:
        try:
            data = self._manifest_path(name).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no manifest {name!r} in {self.url}") from None
        return parse_manifest(data, name)

    def _meta_path(self, key: str) -> Path:
        return self.root / "meta" / check_name(key, "meta key")

    def put_meta(self, key: str, data: bytes) -> None:
        final = self._meta_path(key)
        tmp = self._tmp_name()
        try:
            tmp.write_bytes(data)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except OSError as e:
            raise StorageError(f"can't write {key!r} in {self.root}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def get_meta(self, key: str) -> bytes | None:
        try:
            return self._meta_path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def list_meta(self, prefix: str = "") -> list[str]:
        base = self.root / "meta"
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            for f in files:
                key = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_meta(self, key: str) -> None:
        self._meta_path(key).unlink(missing_ok=True)

    def _tmp_name(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix="put-")
        os.close(fd)
        return Path(name)

    def list_objects(self) -> Iterator[StoredItem]:
        base = self.root / "objects"
        for sub in sorted(os.listdir(base)):
            folder = base / sub
            if len(sub) != 2 or not folder.is_dir():
                continue
            with os.scandir(folder) as it:
                for entry in it:
                    if is_digest(sub + entry.name) and entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        yield StoredItem(sub + entry.name, st.st_size, st.st_mtime)

    def list_manifests(self) -> Iterator[StoredItem]:
        base = self.root / "manifests"
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if f.endswith(".json"):
                    path = os.path.join(dirpath, f)
                    st = os.stat(path)
                    name = os.path.relpath(path, base)[: -len(".json")].replace(os.sep, "/")
                    yield StoredItem(name, st.st_size, st.st_mtime)

    def delete_objects(self, digests: list[str], written_before: float) -> list[str]:
        deleted = []
        for digest in digests:
            path = self.object_path(digest)
            try:
                if os.stat(path).st_mtime >= written_before:
                    continue  # written or freshened (a save found it there) since the sweep began
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(f"can't delete {path}: {e.strerror or e}") from e
            deleted.append(digest)
        return deleted

    def delete_manifests(self, names: list[str]) -> None:
        for name in names:
            try:
                self._manifest_path(name).unlink(missing_ok=True)
            except OSError as e:
                raise StorageError(f"can't delete manifest {name!r} in {self.root}: {e.strerror or e}") from e

    def clean_tmp(self, written_before: float) -> tuple[int, int]:
        count = size = 0
        with os.scandir(self.root / "tmp") as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and st.st_mtime < written_before:
                    os.unlink(entry.path)
                    count, size = count + 1, size + st.st_size
        return count, size


def _freshen(path: Path) -> None:
    """Mark an object as just used (its mtime), as git does, so a collection running now keeps it."""
    try:
        os.utime(path)
    except OSError:
        pass


def _clone_or_copy(src: Path, dest: Path) -> None:
    """Copy `src` to `dest`, as a reflink where the file system can (instant, no shared writes)."""
    try:
        import fcntl

        with open(src, "rb") as s, open(dest, "wb") as d:
            fcntl.ioctl(d.fileno(), 0x40049409, s.fileno())  # FICLONE
        return
    except (OSError, ImportError):
        pass
    shutil.copyfile(src, dest)


def open_store(url: str, **options: Any) -> ObjectStore:
    """The object store at `url`: a local path or file:// URL, or s3://bucket/prefix (options go to S3)."""
    if url.startswith("s3://"):
        from dstack.store.s3 import S3ObjectStore

        return S3ObjectStore(url, **options)
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return LocalObjectStore(Path(unquote(urlparse(url).path)))
    if "://" in url:
        raise UsageError(f"unsupported artifact store URL {url!r}", hint="use a local path, file:// or s3://")
    return LocalObjectStore(Path(url).expanduser())
