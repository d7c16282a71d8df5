"""Artifacts: saving a job's declared output paths into the object store, and restoring them safely."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dstack.errors import ArtifactError, NotFoundError, StorageError
from dstack.hashing import digest_bytes, digest_file
from dstack.store.digests import DigestCache
from dstack.store.objects import S_IFLNK, Manifest, ManifestEntry, ObjectStore, check_digest, safe_relpath

_WORKERS = 8
SAFE_MODE = 0o755  # what a restored file may keep of its mode: no setuid/setgid/sticky, no group/other write


@dataclass
class Progress:
    """How far a save or restore is: reported after each file."""

    path: str
    done_files: int
    total_files: int
    done_bytes: int
    total_bytes: int


OnProgress = Callable[[Progress], None]


@dataclass
class SaveResult:
    """What `save_artifacts` stored: the manifest, declared paths that didn't exist, new objects and bytes."""

    manifest: Manifest
    missing: list[str] = field(default_factory=list)
    new_objects: int = 0
    new_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # what was not stored, e.g. "FIFO out/pipe"


class BadObjectError(ArtifactError):
    """An artifact file whose object is corrupt or missing: the message names the file, then the object."""

    def __init__(self, path: str, error: ArtifactError, where: str = "") -> None:
        self.path, self.error = path, error
        super().__init__(f"{where}artifact file {path!r}: {error.message}", hint=error.hint)


@dataclass
class SourceFile:
    """A file found on disk, to be stored under `entry_path`."""

    entry_path: str
    source: str  # a plain string: pathlib is slow on 10,000 files
    st: os.stat_result
    link_target: bytes | None = None  # a symlink, kept as one


def _entry_base(declared: str) -> str:
    """The manifest path of a declared artifact path: as declared, relative; absolute ones lose their '/'."""
    norm = os.path.normpath(declared).replace(os.sep, "/")
    if norm.startswith("/"):
        norm = norm.lstrip("/") or "."
    if norm == ".." or norm.startswith("../"):
        raise ArtifactError(
            f"artifact path {declared!r} is outside the working directory",
            hint="declare it as an absolute path",
        )
    return "" if norm == "." else norm


def _join(base: str, rel: str) -> str:
    return rel if not base else (base if rel in ("", ".") else f"{base}/{rel}")


_SPECIAL = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def shown(path: str) -> str:
    """A file name as people can read it: bytes that aren't UTF-8 written as `\\xff`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _collect(
    root: Path, base: str, found: dict[str, SourceFile], skipped: list[str], follow: bool = False
) -> None:
    """Every regular file and symlink under `root` (a file or a directory), keyed by its manifest path.

    Symlinks are kept as links, `root` included unless `follow`; FIFOs, sockets and devices go to `skipped`.
    """
    st = os.stat(root) if follow else os.lstat(root)
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        if not base:
            raise ArtifactError(f"can't save {root} as an artifact without a name")
        link = os.fsencode(os.readlink(root)) if stat.S_ISLNK(st.st_mode) else None
        found[base] = SourceFile(base, os.fspath(root), st, link)
        return
    if not stat.S_ISDIR(st.st_mode):
        skipped.append(f"{_SPECIAL.get(stat.S_IFMT(st.st_mode), 'special file')} {shown(base)}")
        return

    def walk_error(e: OSError) -> None:
        raise ArtifactError(f"can't read {e.filename}: {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in [*filenames, *dirnames]:
            path = os.path.join(dirpath, name)
            lst = os.lstat(path)
            entry_path = _join(base, name if rel_dir == "." else f"{rel_dir}/{name}")
            if stat.S_ISLNK(lst.st_mode):
                found[entry_path] = SourceFile(entry_path, path, lst, os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(lst.st_mode):
                found[entry_path] = SourceFile(entry_path, path, lst)
            elif not stat.S_ISDIR(lst.st_mode):
                kind = _SPECIAL.get(stat.S_IFMT(lst.st_mode), "special file")
                skipped.append(f"{kind} {shown(entry_path)}")
        dirnames.sort()


def _check_names(files: list[SourceFile]) -> None:
    """Refuse a file whose name isn't UTF-8 (manifests, state and S3 keys are text), naming it."""
    for f in files:
        try:
            f.entry_path.encode()
        except UnicodeEncodeError:
            raise ArtifactError(
                f"can't save '{shown(f.entry_path)}': its name is not valid UTF-8",
                hint="rename the file (dstack keeps file names as UTF-8)",
            ) from None


def store_files(
    files: Iterable[SourceFile],
    store: ObjectStore,
    cache: DigestCache | None,
    on_progress: OnProgress | None = None,
    under: str | None = None,
) -> SaveResult:
    """Digest the files (in parallel), store each distinct content once, and return their manifest.

    `under`: a directory holding all the files, if known (saves the cache from working it out).
    """
    files = sorted(files, key=lambda f: f.entry_path)
    _check_names(files)
    regular = [f for f in files if f.link_target is None]
    if cache is not None:
        digests = cache.digest_many([f.source for f in regular], [f.st for f in regular], under=under)
    else:
        with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            digests = list(pool.map(lambda f: digest_file(Path(f.source)), regular))
    by_path = {f.entry_path: d for f, d in zip(regular, digests, strict=True)}
    entries: list[dict[str, object]] = []  # validated at once below: much faster than one by one
    unique: dict[str, SourceFile] = {}
    for f in files:
        if f.link_target is not None:
            digest = digest_bytes(f.link_target)
            entries.append(
                {"path": f.entry_path, "size": len(f.link_target), "mode": S_IFLNK, "digest": digest}
            )
        else:
            digest = by_path[f.entry_path]
            mode = stat.S_IFMT(f.st.st_mode) | stat.S_IMODE(f.st.st_mode)
            entries.append({"path": f.entry_path, "size": f.st.st_size, "mode": mode, "digest": digest})
        unique.setdefault(digest, f)

    todo = {d: f for d, f in unique.items() if cache is None or not cache.is_stored(store.url, d)}
    result = SaveResult(manifest=Manifest.model_validate({"entries": entries}))
    total_bytes = sum(
        len(f.link_target) if f.link_target is not None else f.st.st_size for f in todo.values()
    )
    done_bytes = 0

    def put(digest: str, f: SourceFile) -> bool:
        if f.link_target is not None:
            return store.put_bytes(f.link_target, digest)
        return store.put_file(Path(f.source), digest)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = {pool.submit(put, d, f): (d, f) for d, f in todo.items()}
        for n, future in enumerate(as_completed(futures), 1):
            digest, f = futures[future]
            size = len(f.link_target) if f.link_target is not None else f.st.st_size
            if future.result():
                result.new_objects += 1
                result.new_bytes += size
            if cache is not None:
                cache.mark_stored(store.url, digest)
            done_bytes += size
            if on_progress is not None:
                on_progress(Progress(f.entry_path, n, len(todo), done_bytes, total_bytes))
    if cache is not None:
        cache.flush()
    return result


def save_artifacts(
    workdir: Path,
    paths: list[str],
    store: ObjectStore,
    cache: DigestCache | None = None,
    on_progress: OnProgress | None = None,
) -> SaveResult:
    """Store the declared paths (files or dirs, relative to `workdir` or absolute); return their manifest.

    Manifest paths are the paths as declared (absolute ones without their leading '/'); a declared
    path that doesn't exist is listed in `missing`; symlinks, the declared paths included, are kept as
    symlinks (never followed); FIFOs, sockets and devices are listed in `skipped`.
    """
    found: dict[str, SourceFile] = {}
    missing: list[str] = []
    skipped: list[str] = []
    top = os.path.realpath(workdir)
    for declared in paths:
        base = _entry_base(declared)
        source = Path(declared) if os.path.isabs(declared) else workdir / declared
        if not os.path.lexists(source):
            missing.append(declared)
            continue
        if not os.path.isabs(declared):
            parent = os.path.realpath(source.parent)
            if parent != top and not parent.startswith(top + os.sep):
                raise ArtifactError(
                    f"artifact path {declared!r} goes through a symlink out of the working directory",
                    hint="declare the absolute path instead if it is really meant",
                )
        try:
            _collect(source, base, found, skipped)
        except OSError as e:
            raise ArtifactError(f"can't read artifact {declared!r}: {e.strerror or e}") from e
    result = store_files(found.values(), store, cache, on_progress)
    result.missing = missing
    result.skipped = skipped
    return result


_NOTED: set[tuple[str, str]] = set()  # (job id, what): noted once per process, however often it is saved


def skip_notes(job_id: str, skipped: list[str]) -> bytes:
    """The lines a job's log gets for what `save_artifacts` skipped (`dstack: skipped FIFO out/pipe …`),
    each once: real-time artifacts are saved again and again."""
    lines = []
    for what in skipped:
        if (job_id, what) not in _NOTED:
            _NOTED.add((job_id, what))
            lines.append(f"dstack: skipped {what} (not a file, folder or symlink: not saved)\n")
    return "".join(lines).encode()


def overlay(under: Manifest, over: Manifest) -> Manifest:
    """`over`'s entries plus those of `under` that don't clash with them (same path, or one inside the other):
    a resumed attempt's artifacts are what it restored plus what it wrote, what it wrote winning."""
    taken = {e.path for e in over.entries}
    dirs = {p for path in taken for p in _parents(path)}
    kept = [e for e in under.entries if e.path not in taken and e.path not in dirs]
    kept = [e for e in kept if not any(p in taken for p in _parents(e.path))]
    if not kept:
        return over
    merged: list[ManifestEntry] = sorted([*over.entries, *kept], key=lambda e: e.path)
    return Manifest(entries=merged)


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def manifest_from_path(src: Path, store: ObjectStore) -> Manifest:
    """Store a file or directory as an artifact of its own (`dstack tags add NAME --from PATH`)."""
    if not src.exists():
        raise NotFoundError(f"{src} does not exist")
    found: dict[str, SourceFile] = {}
    if src.is_dir():
        _collect(src, "", found, [], follow=True)
    else:
        _collect(src, src.name, found, [], follow=True)
    return store_files(found.values(), store, None).manifest


def select_entries(manifest: Manifest, subpath: str | None) -> list[ManifestEntry]:
    """The entries at or under `subpath` (all of them if None); NotFoundError if none."""
    if subpath is None or subpath.strip("/") in ("", "."):
        return list(manifest.entries)
    prefix = str(PurePosixPath(os.path.normpath(subpath).replace(os.sep, "/").strip("/")))
    chosen = [e for e in manifest.entries if e.path == prefix or e.path.startswith(prefix + "/")]
    if not chosen:
        raise NotFoundError(f"no artifact file at {subpath!r}")
    return chosen


def restore_artifacts(
    manifest: Manifest,
    store: ObjectStore,
    target: Path,
    subpath: str | None = None,
    on_progress: OnProgress | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the manifest's files (or those under `subpath`) into `target`, byte for byte.

    Modes lose setuid/setgid/sticky and group/other write (at most 0755). Digests are checked; files
    already there with the right content are skipped (so an interrupted restore resumes); a path that
    would escape `target` is an ArtifactError naming it. With `on_skip`, symlinks that point outside
    `target` are not made: `on_skip` hears about each.
    """
    return materialize(select_entries(manifest, subpath), store, target, on_progress, on_skip)


def _check_entries(entries: list[ManifestEntry]) -> list[PurePosixPath]:
    rels = [safe_relpath(e.path) for e in entries]
    links = {rel for rel, e in zip(rels, entries, strict=True) if e.is_symlink}
    for rel, e in zip(rels, entries, strict=True):
        check_digest(e.digest)
        kind = e.mode & 0o170000
        if kind not in (0o100000, S_IFLNK, 0):
            raise ArtifactError(f"artifact path {e.path!r} has an unsupported mode {oct(e.mode)}")
        if any(parent in links for parent in rel.parents):
            raise ArtifactError(f"artifact path {e.path!r} would be written through a symlink")
    return rels


def _ensure_dir(target: Path, rel: PurePosixPath, made: set[PurePosixPath], name: str) -> None:
    """Create the parents of `rel` under `target`, refusing to go through a symlink or a file."""
    for parent in reversed(rel.parents):
        if parent == PurePosixPath(".") or parent in made:
            continue
        path = target / parent
        try:
            st = path.lstat()
        except FileNotFoundError:
            path.mkdir()
        else:
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"artifact path {name!r} would be written through the symlink {path}")
            if not stat.S_ISDIR(st.st_mode):
                raise ArtifactError(f"artifact path {name!r} needs a directory where the file {path} is")
        made.add(parent)


def _is_there(path: Path, entry: ManifestEntry) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise ArtifactError(f"artifact path {entry.path!r} is a directory in {path.parent}")
    return stat.S_ISREG(st.st_mode) and st.st_size == entry.size and digest_file(path) == entry.digest


def materialize(
    entries: list[ManifestEntry],
    store: ObjectStore,
    target: Path,
    on_progress: OnProgress | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write entries under `target` safely and in parallel (copies, never links to the store)."""
    rels = _check_entries(entries)
    try:
        target.mkdir(parents=True, exist_ok=True)
        made: set[PurePosixPath] = set()
        for rel, e in zip(rels, entries, strict=True):
            _ensure_dir(target, rel, made, e.path)
    except OSError as err:
        raise StorageError(f"can't create directories in {target}: {err.strerror or err}") from err

    total_bytes = sum(e.size for e in entries)

    def write(rel: PurePosixPath, e: ManifestEntry) -> Path | None:
        try:
            return _write(rel, e)
        except OSError as err:
            raise StorageError(f"can't write {target / rel}: {err.strerror or err}") from err
        except ArtifactError as err:
            if err.message.startswith("object "):  # a corrupt or missing object: say whose file it is
                raise BadObjectError(e.path, err) from err
            raise

    def _write(rel: PurePosixPath, e: ManifestEntry) -> Path | None:
        dest = target / rel
        if e.is_symlink:
            link = os.fsdecode(store.get_bytes(e.digest))
            if on_skip is not None and _leaves(rel, link):
                on_skip(f"symlink {e.path} -> {link}: it points outside {target}")
                return None
            if os.path.lexists(dest):
                if os.path.isdir(dest) and not os.path.islink(dest):
                    raise ArtifactError(f"artifact path {e.path!r} is a directory in {target}")
                if os.path.islink(dest) and os.readlink(dest) == link:
                    return dest
                dest.unlink()
            os.symlink(link, dest)
            return dest
        if not _is_there(dest, e):
            store.get_file(e.digest, dest)
        os.chmod(dest, stat.S_IMODE(e.mode) & SAFE_MODE if e.mode else 0o644)
        return dest

    files = [(r, e) for r, e in zip(rels, entries, strict=True) if not e.is_symlink]
    links = [(r, e) for r, e in zip(rels, entries, strict=True) if e.is_symlink]
    out: list[Path] = []
    done_bytes = 0
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = {pool.submit(write, r, e): e for r, e in files}
        try:
            for n, future in enumerate(as_completed(futures), 1):
                written = future.result()
                if written is not None:
                    out.append(written)
                e = futures[future]
                done_bytes += e.size
                if on_progress is not None:
                    on_progress(Progress(e.path, n, len(entries), done_bytes, total_bytes))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for n, (r, e) in enumerate(links, len(files) + 1):
        made_link = write(r, e)
        if made_link is not None:
            out.append(made_link)
        done_bytes += e.size
        if on_progress is not None:
            on_progress(Progress(e.path, n, len(entries), done_bytes, total_bytes))
    return sorted(out)


def _leaves(rel: PurePosixPath, link: str) -> bool:
    """Whether a symlink at `rel` pointing at `link` resolves (lexically) outside the folder `rel` is in."""
    if link.startswith("/"):
        return True
    resolved = os.path.normpath(os.path.join(str(rel.parent), link))
    return resolved == ".." or resolved.startswith("../")
