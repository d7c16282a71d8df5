"""Digests and the digest cache."""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from pathlib import Path

import pytest
from blake3 import blake3

from dstack.hashing import digest_bytes, digest_file, is_digest
from dstack.store.digests import DigestCache

OLD = 1_600_000_000  # a mtime long past: not "racy"


def test_digest_bytes_is_blake3_hex() -> None:
    assert digest_bytes(b"abc") == blake3(b"abc").hexdigest()
    assert len(digest_bytes(b"")) == 64
    assert is_digest(digest_bytes(b"x"))
    assert not is_digest("../" + "a" * 61)


def test_digest_file_small_empty_and_big(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digest_file(empty) == digest_bytes(b"")
    small = tmp_path / "small"
    small.write_bytes(b"hello")
    assert digest_file(small) == digest_bytes(b"hello")
    big = tmp_path / "big"
    data = os.urandom(1024) * (9 * 1024)  # 9 MiB: the multithreaded mmap path
    big.write_bytes(data)
    assert digest_file(big) == digest_bytes(data)


def _old_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return path


def test_cache_returns_cached_digest_until_the_file_changes(tmp_path: Path) -> None:
    f = _old_file(tmp_path / "a.txt", b"one")
    with DigestCache(tmp_path / "cache.sqlite") as cache:
        assert cache.digest(f) == digest_bytes(b"one")
        cache.flush()
    # same stat, different content behind the cache's back: the cached value proves it was not re-read
    with DigestCache(tmp_path / "cache.sqlite") as cache:
        st = f.stat()
        fd = os.open(f, os.O_WRONLY)
        os.pwrite(fd, b"two", 0)
        os.close(fd)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f.stat().st_ctime_ns != st.st_ctime_ns  # ctime moved: the cache notices
        assert cache.digest(f) == digest_bytes(b"two")
        f.write_bytes(b"three!")
        os.utime(f, (OLD + 5, OLD + 5))
        assert cache.digest(f) == digest_bytes(b"three!")


def test_cache_does_not_keep_racy_entries(tmp_path: Path) -> None:
    f = tmp_path / "fresh.txt"
    f.write_bytes(b"v1")
    with DigestCache(tmp_path / "cache.sqlite") as cache:
        assert cache.digest(f) == digest_bytes(b"v1")
        cache.flush()
        count = cache._db.execute("SELECT count(*) FROM digests").fetchone()[0]
        assert count == 0


def test_cache_digest_many_matches_digest_file(tmp_path: Path) -> None:
    files = [_old_file(tmp_path / "d" / f"f{i}", f"content {i % 7}".encode()) for i in range(50)]
    with DigestCache(tmp_path / "cache.sqlite") as cache:
        cold = cache.digest_many(files)
        warm = cache.digest_many(files)
    assert cold == warm == [digest_file(f) for f in files]
    assert cache.digest_many([]) == []


def test_cache_remembers_stored_objects(tmp_path: Path) -> None:
    with DigestCache(tmp_path / "c.sqlite") as cache:
        assert not cache.is_stored("file:///x", "a" * 64)
        cache.mark_stored("file:///x", "a" * 64)
    with DigestCache(tmp_path / "c.sqlite") as cache:
        assert cache.is_stored("file:///x", "a" * 64)
        assert not cache.is_stored("file:///y", "a" * 64)
        cache.forget_store("file:///x")
        assert not cache.is_stored("file:///x", "a" * 64)


def _digest_in_child(cache_path: str, files: list[str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import faulthandler
    import traceback

    faulthandler.dump_traceback_later(50, exit=True)  # a hang shows where, in the test's captured stderr
    try:
        with DigestCache(Path(cache_path)) as cache:
            out.put(cache.digest_many([Path(f) for f in files]))
    except BaseException:
        out.put(traceback.format_exc())


def test_cache_is_safe_for_two_processes(tmp_path: Path) -> None:
    """Two processes digest the same files into one fresh cache at once: both get the right digests."""
    files = [_old_file(tmp_path / "p" / f"{i}", os.urandom(100)) for i in range(300)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_digest_in_child, args=(str(tmp_path / "c.sqlite"), [str(f) for f in files], out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results: list[object] = []
    deadline = time.monotonic() + 90
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a child died (exit codes {dead}) before it answered"
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    out.close()
    out.join_thread()
    errors = [r for r in results if isinstance(r, str)]
    assert not errors, errors[0]
    assert len(results) == 2, "a child answered nothing within 90 s"
    assert results[0] == results[1] == [digest_file(f) for f in files]


def test_warm_cache_on_10000_files(tmp_path: Path) -> None:
    """Not asserted (machines differ): prints how long 10,000 warm digests take."""
    root = tmp_path / "repo"
    files = [_old_file(root / f"d{i // 100}" / f"f{i}.py", b"x = %d\n" % i) for i in range(10_000)]
    with DigestCache(tmp_path / "c.sqlite") as cache:
        t0 = time.perf_counter()
        cache.digest_many(files)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        digests = cache.digest_many(files)
        warm = time.perf_counter() - t0
    print(f"\n10,000 files: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms (stat + lookup)")
    assert len(set(digests)) == 10_000


def test_cache_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    from dstack.errors import StorageError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="can't open the digest cache"):
        DigestCache(blocker / "cache.sqlite")
