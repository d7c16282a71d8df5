"""Shipping files to and from a host over its SSH connection.

The host keeps a content-addressed cache, `<root>/objects/<digest>`. Shipping a manifest asks the host in
one command which objects it lacks, sends only those as one tar stream, then lays the files out from the
cache with one command. A second run of the same repo sends no file content at all.
"""

from __future__ import annotations

import shlex
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from dstack.errors import ArtifactError

if TYPE_CHECKING:
    from dstack.ssh.connection import Connection
    from dstack.store.objects import ManifestEntry, ObjectStore

# Lays out files from the object cache: stdin holds NUL-separated "<digest> <octal mode> <path>" records.
_MATERIALIZE_PY = r"""
import os, shutil, sys
objects, base = sys.argv[1], os.path.realpath(sys.argv[2])
made = set()
for rec in sys.stdin.buffer.read().split(b"\0"):
    if not rec:
        continue
    digest, mode, path = rec.decode("utf-8", "surrogateescape").split(" ", 2)
    mode = int(mode, 8)
    dest = os.path.join(base, path)
    parent = os.path.dirname(dest)
    if parent not in made:
        os.makedirs(parent, exist_ok=True)
        real = os.path.realpath(parent)
        if real != base and not real.startswith(base + os.sep):
            sys.exit("dstack: %s would be written outside %s" % (path, base))
        made.add(parent)
    src = os.path.join(objects, digest)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        os.unlink(dest)
    if mode & 0o170000 == 0o120000:
        with open(src, "rb") as f:
            os.symlink(f.read(), dest)
    else:
        shutil.copyfile(src, dest)
        os.chmod(dest, mode & 0o755)  # no setuid/setgid/sticky, no group/other write
"""

_MATERIALIZE_SH = r"""
objects=$1; base=$2
while IFS=' ' read -r -d '' digest mode path; do
  dest="$base/$path"
  mkdir -p "$(dirname "$dest")"
  rm -f "$dest"
  if [ "$(( 0$mode & 0170000 ))" -eq "$(( 0120000 ))" ]; then
    ln -s "$(cat "$objects/$digest")" "$dest"
  else
    cp "$objects/$digest" "$dest" && chmod "$(printf %o $(( 0$mode & 0755 )))" "$dest"
  fi
done
"""


@dataclass
class ShipResult:
    """What shipping cost: objects and bytes sent over SSH, and those the host fetched from the bucket."""

    files: int = 0
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_fetched: int = 0
    bytes_fetched: int = 0


@dataclass
class CollectResult:
    """How a job's artifacts reached the store: uploaded by the host itself ("s3") or over SSH ("ssh")."""

    path: str
    files: int = 0
    objects_put: int = 0
    bytes_put: int = 0
    objects_over_ssh: int = 0
    reason: str = ""  # why (some) objects went over SSH
    hasher: str = ""  # what computed BLAKE3 on the host: "python-blake3" or "b3sum"


def missing_objects(conn: Connection, root: str, digests: Iterable[str]) -> set[str]:
    """The digests among `digests` that the host's object cache lacks (one remote command)."""
    wanted = sorted(set(digests))
    if not wanted:
        return set()
    objects = shlex.quote(f"{root}/objects")
    result = conn.run(
        f'mkdir -p {objects} && cd {objects} && while read -r d; do [ -e "$d" ] || echo "$d"; done',
        input="\n".join(wanted) + "\n",
    )
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


def upload_objects(conn: Connection, root: str, digests: Iterable[str], store: ObjectStore) -> int:
    """Send objects from the store into the host's cache as one tar stream; the bytes sent."""
    wanted = sorted(set(digests))
    if not wanted:
        return 0
    objects = shlex.quote(f"{root}/objects")
    command = (
        f"mkdir -p {objects} && tmp=$(mktemp -d {objects}/.in.XXXXXX) && "
        f'tar -x -f - -C "$tmp" && cd "$tmp" && '
        'find . -type f -exec sh -c \'chmod 444 "$@" && mv -f "$@" ..\' _ {} + ; '
        'code=$?; cd .. && rm -rf "$tmp"; exit $code'
    )
    sent = 0

    def write(stdin: IO[bytes]) -> None:
        nonlocal sent
        with (
            tempfile.TemporaryDirectory(prefix="dstack-ship-") as tmp,
            tarfile.open(fileobj=stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for digest in wanted:
                path = _local_object(store, digest, Path(tmp))
                info = tarfile.TarInfo(digest)
                info.size = path.stat().st_size
                info.mode = 0o444
                with open(path, "rb") as f:
                    tar.addfile(info, f)
                sent += info.size
                if path.parent == Path(tmp):
                    path.unlink()

    conn.run_with_writer(command, write)
    return sent


def _local_object(store: ObjectStore, digest: str, tmp: Path) -> Path:
    """A local file holding the object: the store's own file when it is local, else a temporary copy."""
    object_path = getattr(store, "object_path", None)
    if object_path is not None:
        path = object_path(digest)
        if isinstance(path, Path) and path.is_file():
            return path
    dest = tmp / digest
    store.get_file(digest, dest)
    return dest


def materialize(
    conn: Connection, root: str, base: str, placed: list[tuple[str, ManifestEntry]], use_python: bool = True
) -> None:
    """Lay out files under `base` on the host from its object cache: (path under base, entry) pairs."""
    if not placed:
        return
    conn.run(materialize_command(root, base, use_python), input=materialize_records(placed), timeout=600)


def materialize_records(placed: list[tuple[str, ManifestEntry]]) -> bytes:
    """What `materialize_command` reads on stdin: NUL-separated `<digest> <octal mode> <path>` records."""
    records = []
    for path, entry in placed:
        if "\0" in path or "\n" in path or " " in entry.digest:
            raise ArtifactError(f"bad file name {path!r}")
        records.append(f"{entry.digest} {entry.mode:o} {path}\0")
    return "".join(records).encode("utf-8", "surrogateescape")


def materialize_command(root: str, base: str, use_python: bool = True) -> str:
    """A shell command that lays out the records on its stdin under `base` from the object cache."""
    objects, target = shlex.quote(f"{root}/objects"), shlex.quote(base)
    sh = f"bash --norc -c {shlex.quote(_MATERIALIZE_SH)} _ {objects} {target}"
    if use_python:
        py = f"python3 -c {shlex.quote(_MATERIALIZE_PY)} {objects} {target}"
        sh = f"if command -v python3 >/dev/null 2>&1; then {py}; else {sh}; fi"
    return f"mkdir -p {target} && {{ {sh}; }}"


def ship(
    conn: Connection,
    root: str,
    base: str,
    placed: list[tuple[str, ManifestEntry]],
    store: ObjectStore,
    use_python: bool = True,
) -> ShipResult:
    """Make `base` on the host hold the files: send what the cache lacks, then lay them out."""
    missing = missing_objects(conn, root, (e.digest for _, e in placed))
    sent = upload_objects(conn, root, missing, store)
    materialize(conn, root, base, placed, use_python=use_python)
    return ShipResult(files=len(placed), objects_sent=len(missing), bytes_sent=sent)


def place(entries: Iterable[ManifestEntry], under: str = "") -> list[tuple[str, ManifestEntry]]:
    """Pair each entry with its path under `under` (a relative folder), refusing paths that escape it."""
    from dstack.store.objects import safe_relpath

    prefix = PurePosixPath(under) if under not in ("", ".") else None
    placed = []
    for entry in entries:
        rel = safe_relpath(entry.path)
        placed.append((str(prefix / rel if prefix else rel), entry))
    return placed


def download_paths(conn: Connection, base: str, paths: list[str], dest: Path) -> list[str]:
    """Copy `paths` (relative to `base`, or absolute) from the host into `dest` as one tar stream.

    Absolute paths land under `dest` without their leading '/'. Returns the paths that were not there.
    """
    if not paths:
        return []
    checks = " ".join(shlex.quote(p if p.startswith("/") else f"{base}/{p}") for p in paths)
    # 1: there, 0: not there, 2: a relative path whose folder is outside `base` (through a symlink)
    found = conn.run(
        f"top=$(cd {shlex.quote(base)} 2>/dev/null && pwd -P); for p in {checks}; do "
        'if [ -e "$p" ] || [ -L "$p" ]; then d=$(cd "$(dirname "$p")" 2>/dev/null && pwd -P); '
        'case "$d/" in "$top"/*) echo 1;; *) echo 2;; esac; else echo 0; fi; done'
    ).stdout.split()
    for p, ok in zip(paths, found, strict=False):
        if ok == "2" and not p.startswith("/"):
            raise ArtifactError(
                f"artifact path {p!r} goes through a symlink out of the working directory",
                hint="declare the absolute path instead if it is really meant",
            )
    present = [p for p, ok in zip(paths, found, strict=False) if ok in ("1", "2")]
    missing = [p for p, ok in zip(paths, found, strict=False) if ok not in ("1", "2")]
    relative = [p for p in present if not p.startswith("/")]
    absolute = [p.lstrip("/") for p in present if p.startswith("/")]
    dest.mkdir(parents=True, exist_ok=True)
    for where, items in ((base, relative), ("/", absolute)):
        if not items:
            continue
        quoted = " ".join(shlex.quote(p) for p in items)

        def read(stdout: IO[bytes]) -> None:
            with tarfile.open(fileobj=stdout, mode="r|") as tar:
                tar.extractall(dest, filter="tar")

        conn.run_with_reader(f"cd {shlex.quote(where)} && tar -c -f - -- {quoted}", read)
    return missing
