"""Hosts that talk to the S3 bucket themselves: the CLI's machine signs URLs, the bytes go host <-> S3.

Inputs: the CLI sends the host (digest, size, pre-signed GET URL) for each object its cache lacks; the host
fetches them in parallel into `<root>/objects/`, checking each file's size, and its BLAKE3 digest when it
has a BLAKE3 hasher (the `blake3` Python module or a `b3sum` binary, on PATH or at `<root>/bin/b3sum`).
Without one only the size is checked on the host; the CLI machine checks digests when it downloads.

Outputs: the host copies each artifact file into its object cache, hashes the copy (BLAKE3 for the key, and
SHA-256 in the same pass), and reports the list; the CLI asks the bucket which objects it lacks and sends
pre-signed PUT URLs that carry the SHA-256 and `If-None-Match: *`. S3 refuses a body whose SHA-256 differs
and never overwrites an object, so what lands under `objects/<blake3>` is the file the host hashed — the
host's BLAKE3 is trusted as much as the job's output itself. Without a hasher the host can't name objects
and the caller falls back to shipping over SSH. URLs live `URL_TTL_S` seconds; no AWS credential reaches
the host. Python 3 on the host is needed for all of it (else the SSH path is used).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.errors import ArtifactError

if TYPE_CHECKING:
    from dstack.ssh.connection import Connection
    from dstack.store.objects import ObjectStore
    from dstack.store.s3 import S3ObjectStore

log = logging.getLogger("dstack.ssh.direct")

URL_TTL_S = 3600
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT: bigger objects go multipart, part by pre-signed part
PART_BYTES = 256 * 1024**2  # a multipart part from a host (S3: 5 MiB to 5 GiB, at most 10,000 parts)
NO_HASHER = 3  # the host script's exit code when it has no BLAKE3 hasher
_COMMAND_TIMEOUT = URL_TTL_S  # the URLs are dead after that anyway

# Runs on the host: `python3 -c SCRIPT MODE OBJECTS_DIR`, a JSON request on stdin, a JSON answer on stdout.
_HOST_PY = r"""
import base64, hashlib, io, json, os, shutil, stat, subprocess, sys, tempfile, threading, time
import urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

mode, objects = sys.argv[1], sys.argv[2]
req = json.load(sys.stdin)
os.makedirs(objects, exist_ok=True)
CHUNK = 1 << 20

def find_hasher():
    try:
        import blake3
        return "python-blake3", blake3.blake3
    except ImportError:
        pass
    for b3sum in (os.path.join(req.get("root", ""), "bin", "b3sum"), shutil.which("b3sum")):
        if b3sum and os.access(b3sum, os.X_OK):
            return "b3sum", b3sum
    return None, None

hasher_name, hasher = find_hasher()

def hash_file(path):
    sha = hashlib.sha256()
    b3 = hasher() if hasher_name == "python-blake3" else None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
            if b3 is not None:
                b3.update(chunk)
    if b3 is not None:
        digest = b3.hexdigest()
    elif hasher_name == "b3sum":
        out = subprocess.run([hasher, "--", path], capture_output=True, check=True).stdout
        digest = out.split()[0].decode().lstrip("\\")
    else:
        digest = None
    return digest, base64.b64encode(sha.digest()).decode()

down = []  # the first connection error: the endpoint is unreachable, the rest fail fast

def request(url, method, body=None, headers=None):
    last = None
    for attempt in range(3):
        if down:
            raise OSError(down[0])
        try:
            if body is not None:
                body.seek(0)
            r = urllib.request.Request(url, data=body, method=method, headers=headers or {})
            return urllib.request.urlopen(r, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
            if attempt == 2 or isinstance(getattr(e, "reason", None), ConnectionRefusedError):
                down.append("can't reach the bucket: %s" % (getattr(e, "reason", None) or e))
                raise OSError(down[0])
        time.sleep(0.5 * 2 ** attempt)
    raise last

def why(e):
    if isinstance(e, urllib.error.HTTPError):
        return "HTTP %d %s" % (e.code, e.reason)
    return str(getattr(e, "reason", None) or e)

def fetch(item):
    digest, size, url = item
    final = os.path.join(objects, digest)
    if os.path.exists(final):
        return 0
    fd, tmp = tempfile.mkstemp(dir=objects, prefix=".in.")
    try:
        with os.fdopen(fd, "wb") as out, request(url, "GET") as r:
            for chunk in iter(lambda: r.read(CHUNK), b""):
                out.write(chunk)
        got = os.path.getsize(tmp)
        if got != size:
            raise ValueError("got %d bytes, expected %d" % (got, size))
        if hasher_name:
            actual = hash_file(tmp)[0]
            if actual != digest:
                raise ValueError("content hashes to %s" % actual[:12])
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        return size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def ingest(source, is_link):
    # a private copy in the cache: the key is the digest of exactly the bytes that will be uploaded
    fd, tmp = tempfile.mkstemp(dir=objects, prefix=".out.")
    try:
        with os.fdopen(fd, "wb") as out:
            if is_link:
                out.write(os.fsencode(os.readlink(source)))
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)
        size = os.path.getsize(tmp)
        digest, sha = hash_file(tmp)
        final = os.path.join(objects, digest)
        if not os.path.exists(final):
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        return size, digest, sha
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

SPECIAL = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
           stat.S_IFBLK: "block device"}

def shown(path):
    return os.fsencode(path).decode("utf-8", "backslashreplace")

def special(st, entry):
    return "%s %s" % (SPECIAL.get(stat.S_IFMT(st.st_mode), "special file"), shown(entry))

def collect(source, base, found, skipped):
    # symlinks are kept as links (the declared path too), never followed
    st = os.lstat(source)
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        if not base:
            raise ValueError("can't save %s as an artifact without a name" % source)
        found.append((base, source, st, stat.S_ISLNK(st.st_mode)))
        return
    if not stat.S_ISDIR(st.st_mode):
        skipped.append(special(st, base))
        return
    def error(e):
        raise e
    for dirpath, dirnames, filenames in os.walk(source, onerror=error):
        rel = os.path.relpath(dirpath, source)
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            lst = os.lstat(path)
            entry = name if rel == "." else rel + "/" + name
            entry = entry if not base else base + "/" + entry
            if stat.S_ISLNK(lst.st_mode):
                found.append((entry, path, lst, True))
            elif stat.S_ISREG(lst.st_mode):
                found.append((entry, path, lst, False))
            elif not stat.S_ISDIR(lst.st_mode):
                skipped.append(special(lst, entry))
        dirnames.sort()

def check_source(declared, source, top):
    if os.path.isabs(declared) or not top:
        return
    parent, top = os.path.realpath(os.path.dirname(source)), os.path.realpath(top)
    if parent != top and not parent.startswith(top + os.sep):
        out = "artifact path '%s' goes through a symlink out of the working directory\n"
        sys.stderr.write(out % declared)
        sys.exit(2)

def check_names(found):
    for entry, _, _, _ in found:
        try:
            entry.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("can't save '%s': its name is not valid UTF-8 (rename the file)" % shown(entry))

answer = {"hasher": hasher_name}
pool = ThreadPoolExecutor(max_workers=8)
if mode == "fetch":
    def one(item):
        try:
            return item[0], fetch(item), None
        except Exception as e:
            return item[0], 0, why(e)
    done = list(pool.map(one, req["objects"]))
    answer["bytes"] = sum(n for _, n, err in done if err is None)
    answer["failed"] = {d: err for d, _, err in done if err is not None}
elif mode == "save":
    if hasher is None:
        sys.stderr.write("no BLAKE3 hasher (python3 -m pip install blake3, or b3sum)\n")
        sys.exit(3)
    found, missing, skipped = [], [], []
    try:
        for declared, source, base in req["paths"]:
            if not os.path.lexists(source):
                missing.append(declared)
                continue
            check_source(declared, source, req.get("top"))
            collect(source, base, found, skipped)
    except (OSError, ValueError) as e:
        sys.stderr.write("can't read artifact %s: %s\n" % (declared, getattr(e, "strerror", None) or e))
        sys.exit(2)
    try:
        check_names(found)
    except ValueError as e:
        sys.stderr.write("%s\n" % e)
        sys.exit(2)
    def one(f):
        entry, source, st, is_link = f
        size, digest, sha = ingest(source, is_link)
        mode = 0o120000 if is_link else stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode)
        return [entry, size, mode, digest, sha]
    try:
        answer["entries"] = list(pool.map(one, found))
    except OSError as e:
        sys.stderr.write("can't read %s: %s\n" % (e.filename, e.strerror or e))
        sys.exit(2)
    answer["missing"] = missing
    answer["skipped"] = skipped
elif mode == "put":
    def one(item):
        digest, size, url, sha = item
        headers = {"Content-Length": str(size), "If-None-Match": "*", "x-amz-checksum-sha256": sha}
        try:
            with open(os.path.join(objects, digest), "rb") as f:
                with request(url, "PUT", f, headers):
                    return digest, size, None
        except urllib.error.HTTPError as e:
            if e.code == 412:
                return digest, 0, None  # someone stored it meanwhile
            return digest, 0, why(e)
        except Exception as e:
            return digest, 0, why(e)
    def part(task):
        digest, number, offset, length, url = task
        try:
            with open(os.path.join(objects, digest), "rb") as f:
                f.seek(offset)
                body = io.BytesIO(f.read(length))
            with request(url, "PUT", body, {"Content-Length": str(length)}) as r:
                return digest, number, r.headers.get("ETag"), length, None
        except Exception as e:
            return digest, number, None, 0, why(e)
    done = list(pool.map(one, req["objects"]))
    parts = list(pool.map(part, req.get("parts", [])))
    answer["bytes"] = sum(n for _, n, err in done if err is None) + sum(p[3] for p in parts)
    answer["failed"] = {d: err for d, _, err in done if err is not None}
    answer["failed"].update({p[0]: p[4] for p in parts if p[4] is not None})
    answer["etags"] = [[p[0], p[1], p[2]] for p in parts if p[4] is None]
pool.shutdown()
json.dump(answer, sys.stdout)
"""


@dataclass
class Fetched:
    """What the host fetched from the bucket itself, and what it could not (digest -> why)."""

    objects: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    hasher: str | None = None


@dataclass
class SavedEntry:
    """One artifact file the host put in its object cache: manifest fields plus its SHA-256 (base64)."""

    path: str
    size: int
    mode: int
    digest: str
    sha256: str


@dataclass
class Saved:
    """The artifact files the host hashed into its cache, the declared paths it did not find."""

    entries: list[SavedEntry]
    missing: list[str]
    hasher: str
    skipped: list[str] = field(default_factory=list)  # FIFOs, sockets, devices: "FIFO out/pipe"


@dataclass
class Put:
    """What the host uploaded to the bucket itself, and what it could not (digest -> why)."""

    objects: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def s3_store(store: ObjectStore) -> S3ObjectStore | None:
    """The store if hosts can reach it directly (an S3 bucket), else None."""
    from dstack.store.s3 import S3ObjectStore

    return store if isinstance(store, S3ObjectStore) else None


def _host_command(mode: str, root: str) -> str:
    objects = shlex.quote(f"{root}/objects")
    return f"python3 -c {shlex.quote(_HOST_PY)} {mode} {objects}"


def _answer(conn: Connection, mode: str, root: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run the host script in `mode` and parse its JSON answer (RemoteCommandError if it fails)."""
    from dstack.errors import RemoteCommandError

    result = conn.run(
        _host_command(mode, root),
        input=json.dumps({**request, "root": root}),
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if result.exit_code != 0:
        # the script itself would make an unreadable message: name it instead
        raise RemoteCommandError(
            conn.name, f"python3 <dstack {mode} script>", result.exit_code, result.stderr
        )
    try:
        answer = json.loads(result.stdout)
    except ValueError as e:
        raise ArtifactError(f"{conn.name}: unreadable answer from the host: {result.stdout[-200:]!r}") from e
    if not isinstance(answer, dict):
        raise ArtifactError(f"{conn.name}: unreadable answer from the host: {result.stdout[-200:]!r}")
    return answer


def fetch_objects(
    conn: Connection, root: str, store: S3ObjectStore, sizes: dict[str, int], expires_s: int = URL_TTL_S
) -> Fetched:
    """Have the host download objects (digest -> size) from the bucket into its cache via pre-signed URLs."""
    if not sizes:
        return Fetched()
    with ThreadPoolExecutor(max_workers=8) as pool:
        urls = dict(zip(sizes, pool.map(lambda d: store.presigned_get(d, expires_s), sizes), strict=True))
    objects = [[d, sizes[d], urls[d]] for d in sorted(sizes)]
    answer = _answer(conn, "fetch", root, {"objects": objects})
    failed = {str(d): str(why) for d, why in dict(answer.get("failed") or {}).items()}
    return Fetched(
        objects=len(sizes) - len(failed),
        bytes=int(answer.get("bytes") or 0),
        failed=failed,
        hasher=answer.get("hasher"),
    )


def save_on_host(
    conn: Connection, root: str, paths: list[tuple[str, str, str]], top: str = ""
) -> Saved | None:
    """Hash the artifact files into the host's cache: (declared, absolute source, manifest base) triples.

    `top`: the job's working directory (relative declared paths may not leave it through a symlink).
    None if the host can't compute BLAKE3; ArtifactError if a file can't be read.
    """
    from dstack.errors import RemoteCommandError

    try:
        answer = _answer(conn, "save", root, {"paths": [list(p) for p in paths], "top": top})
    except RemoteCommandError as e:
        if e.returncode == NO_HASHER:
            return None
        if e.returncode == 2:
            raise ArtifactError(f"{conn.name}: {_last_line(e)}") from e
        raise
    entries = []
    for path, size, mode, digest, sha in answer.get("entries") or []:
        entries.append(SavedEntry(str(path), int(size), int(mode), str(digest), str(sha)))
    missing = [str(m) for m in answer.get("missing") or []]
    skipped = [str(m) for m in answer.get("skipped") or []]
    return Saved(entries, missing, str(answer.get("hasher")), skipped)


def _last_line(e: Exception) -> str:
    output = str(getattr(e, "output", "") or "").strip().splitlines()
    return output[-1] if output else str(e)


def put_objects(
    conn: Connection,
    root: str,
    store: S3ObjectStore,
    objects: Iterable[tuple[str, int, str]],
    expires_s: int = URL_TTL_S,
) -> Put:
    """Have the host upload objects (digest, size, sha256) from its cache to the bucket (pre-signed URLs)."""
    todo = sorted(set(objects))
    if not todo:
        return Put()

    def sign(item: tuple[str, int, str]) -> list[Any]:
        digest, size, sha = item
        return [digest, size, _presigned_put(store, digest, sha, expires_s), sha]

    with ThreadPoolExecutor(max_workers=8) as pool:
        signed = list(pool.map(sign, todo))
    answer = _answer(conn, "put", root, {"objects": signed})
    failed = {str(d): str(why) for d, why in dict(answer.get("failed") or {}).items()}
    return Put(objects=len(todo) - len(failed), bytes=int(answer.get("bytes") or 0), failed=failed)


def put_big_objects(
    conn: Connection,
    root: str,
    store: S3ObjectStore,
    objects: Iterable[tuple[str, int]],
    expires_s: int = URL_TTL_S,
) -> Put:
    """Have the host upload objects (digest, size) over S3's one-PUT limit as multipart uploads, each part
    to its own pre-signed URL; this machine starts and completes them (the digest is checked on read)."""
    todo = sorted(set(objects))
    if not todo:
        return Put()
    uploads: dict[str, str] = {}
    tasks: list[list[Any]] = []
    with store._errors("start multipart uploads"):
        for digest, size in todo:
            key = store.object_key(digest)
            upload_id = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
            uploads[digest] = upload_id
            part = max(PART_BYTES, -(-size // 10_000))
            for number, offset in enumerate(range(0, size, part), 1):
                url = store.client.generate_presigned_url(
                    "upload_part",
                    Params={"Bucket": store.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number},
                    ExpiresIn=expires_s,
                )
                tasks.append([digest, number, offset, min(part, size - offset), url])
    try:
        answer = _answer(conn, "put", root, {"objects": [], "parts": tasks})
    except BaseException:
        _abort(store, uploads)
        raise
    failed = {str(d): str(why) for d, why in dict(answer.get("failed") or {}).items()}
    etags: dict[str, dict[int, str]] = {}
    for digest, number, etag in answer.get("etags") or []:
        etags.setdefault(str(digest), {})[int(number)] = str(etag)
    done = 0
    for digest, size in todo:
        key = store.object_key(digest)
        wanted = sum(1 for t in tasks if t[0] == digest)
        got = etags.get(digest, {})
        if digest in failed or len(got) != wanted:
            failed.setdefault(digest, "a part did not upload")
            _abort(store, {digest: uploads[digest]})
            continue
        with store._errors(f"complete the upload of {key}"):
            store.client.complete_multipart_upload(
                Bucket=store.bucket,
                Key=key,
                UploadId=uploads[digest],
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": got[n]} for n in sorted(got)]},
            )
        done += size
    return Put(objects=len(todo) - len(failed), bytes=done, failed=failed)


def _abort(store: S3ObjectStore, uploads: dict[str, str]) -> None:
    for digest, upload_id in uploads.items():
        try:
            store.client.abort_multipart_upload(
                Bucket=store.bucket, Key=store.object_key(digest), UploadId=upload_id
            )
        except Exception:  # best effort: gc aborts what is left after its grace period
            log.warning("could not abort the multipart upload of %s", digest[:12])


def _presigned_put(store: S3ObjectStore, digest: str, sha256: str, expires_s: int) -> str:
    """A PUT URL for object `digest` that S3 honours only with this SHA-256 body and only if it is new."""
    with store._errors("sign a URL"):
        return str(
            store.client.generate_presigned_url(
                "put_object",
                Params={
                    "Bucket": store.bucket,
                    "Key": store.object_key(digest),
                    "ChecksumSHA256": sha256,
                    "IfNoneMatch": "*",
                },
                ExpiresIn=expires_s,
            )
        )


def missing_in_bucket(store: S3ObjectStore, digests: Iterable[str]) -> set[str]:
    """The digests among `digests` whose objects the bucket lacks (HEAD requests, in parallel)."""
    wanted = sorted(set(digests))
    with ThreadPoolExecutor(max_workers=32) as pool:  # the store's client pools 32 connections
        present = list(pool.map(store.has, wanted))
    return {d for d, there in zip(wanted, present, strict=True) if not there}
