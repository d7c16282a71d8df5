"""The object-store contract and the manifest model, shared by the local and the S3 store."""

from __future__ import annotations

import json
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dstack.errors import ArtifactError, NotFoundError, UsageError
from dstack.hashing import digest_bytes, is_digest

S_IFLNK = 0o120000
_NAME = re.compile(r"^[A-Za-z0-9._@+=:,-]+(/[A-Za-z0-9._@+=:,-]+)*$")


class ManifestEntry:
    """One file of a manifest: a relative posix path, its size, its mode (with type bits) and digest.

    A plain class, not a pydantic model: manifests are read on every job's start and end, and the local
    run path imports no pydantic (~50 ms). `model_validate`/`model_dump` keep pydantic's spelling."""

    __slots__ = ("path", "size", "mode", "digest")

    def __init__(self, *, path: str, size: int, mode: int, digest: str) -> None:
        self.path = _text(path, "path")
        self.size = _integer(size, "size")
        self.mode = _integer(mode, "mode")
        self.digest = _text(digest, "digest")

    @property
    def is_symlink(self) -> bool:
        return self.mode & 0o170000 == S_IFLNK

    @classmethod
    def model_validate(cls, data: object) -> ManifestEntry:
        """An entry from its dict (extra keys ignored); ValueError naming what is wrong."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"manifest entry: expected an object, got {type(data).__name__}")
        try:
            return cls(path=data["path"], size=data["size"], mode=data["mode"], digest=data["digest"])
        except KeyError as e:
            raise ValueError(f"manifest entry: field {e.args[0]!r} is missing") from None

    def model_dump(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": self.mode, "digest": self.digest}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ManifestEntry):
            return NotImplemented
        return (self.path, self.size, self.mode, self.digest) == (
            other.path,
            other.size,
            other.mode,
            other.digest,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the pydantic model it replaced

    def __repr__(self) -> str:
        fields = f"path={self.path!r}, size={self.size}, mode={self.mode:#o}, digest={self.digest!r}"
        return f"ManifestEntry({fields})"


class Manifest:
    """The files of an artifact or a repo snapshot; objects hold the content."""

    __slots__ = ("entries",)

    def __init__(self, *, entries: Iterable[ManifestEntry | dict[str, Any]] = ()) -> None:
        if isinstance(entries, (str, bytes, dict)):
            raise ValueError("manifest: 'entries' must be a list")
        validate = ManifestEntry.model_validate
        self.entries: list[ManifestEntry] = [validate(e) for e in entries]

    @classmethod
    def model_validate(cls, data: object) -> Manifest:
        """A manifest from its dict (`{"entries": [...]}`); ValueError naming what is wrong."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"manifest: expected an object, got {type(data).__name__}")
        entries = data.get("entries", [])
        if not isinstance(entries, list):
            raise ValueError("manifest: 'entries' must be a list")
        return cls(entries=entries)

    @classmethod
    def model_validate_json(cls, data: str | bytes) -> Manifest:
        """A manifest from its JSON; ValueError if it is not one."""
        return cls.model_validate(json.loads(data))

    def model_dump(self) -> dict[str, Any]:
        return {"entries": [e.model_dump() for e in self.entries]}

    def canonical_json(self) -> str:
        """The manifest as JSON with entries sorted by path and no whitespace: what `digest()` hashes."""
        entries = sorted((e.model_dump() for e in self.entries), key=lambda e: e["path"])
        return json.dumps({"entries": entries}, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """The digest of the canonical JSON."""
        return digest_bytes(self.canonical_json().encode())

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Manifest({len(self.entries)} entries)"


def _text(value: object, name: str) -> str:
    if type(value) is str:
        return value
    raise ValueError(f"manifest entry: {name} must be a string, got {type(value).__name__}")


def _integer(value: object, name: str) -> int:
    """An int as pydantic's lax mode takes one: an int, an integral float, or a string of digits."""
    if type(value) is int:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise ValueError(f"manifest entry: {name} must be an integer, got {value!r}"[:200])


def check_digest(digest: str) -> str:
    """`digest` if it is one (64 lowercase hex characters), else ArtifactError."""
    if not is_digest(digest):
        raise ArtifactError(f"invalid object digest {digest[:80]!r}")
    return digest


def check_name(name: str, what: str = "manifest name") -> str:
    """`name` if it is a safe store key (slash-separated segments, no '..'), else UsageError."""
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise UsageError(f"invalid {what} {name!r}", hint="use letters, digits, '.', '-', '_' and '/'")
    return name


def safe_relpath(path: str) -> PurePosixPath:
    """A manifest path as a relative path that stays inside its target, else ArtifactError naming it."""
    p = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\0" in path
        or p.is_absolute()
        or any(part in ("..", "") for part in path.split("/"))
        or p == PurePosixPath(".")
    ):
        raise ArtifactError(f"artifact path {path!r} would escape the target directory")
    return PurePosixPath(*(part for part in p.parts if part != "."))


@dataclass
class StoredItem:
    """An object (by digest) or a manifest (by name) as listed, with its size and last write time."""

    name: str
    size: int
    mtime: float


class ObjectStore(ABC):
    """Where artifacts live: immutable objects by digest, manifests by name, small mutable meta records."""

    url: str

    @abstractmethod
    def has(self, digest: str) -> bool:
        """Whether the object is in the store."""

    @abstractmethod
    def put_file(self, path: Path, digest: str) -> bool:
        """Store the file as object `digest`; False if it was already there; ArtifactError if it differs."""

    def put_bytes(self, data: bytes, digest: str) -> bool:
        """Store `data` as object `digest`; False if it was already there."""
        if self.has(check_digest(digest)):
            return False
        with tempfile.TemporaryDirectory(prefix="dstack-") as tmp:
            path = Path(tmp) / "object"
            path.write_bytes(data)
            return self.put_file(path, digest)

    @abstractmethod
    def get_file(self, digest: str, dest: Path) -> None:
        """Write object `digest` to `dest` (replacing it), digest checked; ArtifactError if it is wrong."""

    def get_bytes(self, digest: str) -> bytes:
        """The content of a (small) object, digest checked."""
        with tempfile.TemporaryDirectory(prefix="dstack-") as tmp:
            path = Path(tmp) / "object"
            self.get_file(digest, path)
            return path.read_bytes()

    @abstractmethod
    def put_manifest(self, name: str, manifest: Manifest) -> None:
        """Store a manifest under `name`; the same again is a no-op, a different one an ArtifactError."""

    @abstractmethod
    def get_manifest(self, name: str) -> Manifest:
        """The manifest stored under `name`; NotFoundError if there is none."""

    def has_manifest(self, name: str) -> bool:
        """Whether a manifest is stored under `name`."""
        try:
            self.get_manifest(name)
        except NotFoundError:
            return False
        return True

    @abstractmethod
    def put_meta(self, key: str, data: bytes) -> None:
        """Write a small mutable record, replacing it atomically."""

    @abstractmethod
    def get_meta(self, key: str) -> bytes | None:
        """A small record, or None if there is none."""

    @abstractmethod
    def list_meta(self, prefix: str = "") -> list[str]:
        """Keys of the records starting with `prefix`, sorted."""

    @abstractmethod
    def delete_meta(self, key: str) -> None:
        """Delete a record; nothing happens if it isn't there."""

    # -- listing and deleting (garbage collection) ---------------------------------------------

    @abstractmethod
    def list_objects(self) -> Iterator[StoredItem]:
        """Every object in the store (name = digest), in pages where the store pages."""

    @abstractmethod
    def list_manifests(self) -> Iterator[StoredItem]:
        """Every manifest in the store (name = manifest name)."""

    @abstractmethod
    def delete_objects(self, digests: list[str], written_before: float) -> list[str]:
        """Delete objects last written before `written_before` (in batches); return those deleted."""

    @abstractmethod
    def delete_manifests(self, names: list[str]) -> None:
        """Delete manifests (in batches); missing ones are skipped."""

    def clean_tmp(self, written_before: float) -> tuple[int, int]:
        """Remove what interrupted saves left, begun before `written_before`: (count, bytes)."""
        return 0, 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def parse_manifest(data: bytes, name: str) -> Manifest:
    """A manifest from its stored JSON; ArtifactError if it is unreadable."""
    try:
        return Manifest.model_validate_json(data)
    except ValueError as e:
        raise ArtifactError(f"manifest {name!r} is corrupt: {str(e).splitlines()[0]}") from e
