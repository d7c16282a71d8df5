"""Content digests: BLAKE3, hex, 64 characters; multithreaded and memory-mapped for big files."""

from __future__ import annotations

from pathlib import Path

from blake3 import blake3

DIGEST_LENGTH = 64
# below this a thread pool and mmap cost more than they save
_BIG_FILE = 4 * 1024 * 1024


def digest_bytes(data: bytes) -> str:
    """The hex BLAKE3 digest of `data`."""
    return blake3(data).hexdigest()


def digest_file(path: Path) -> str:
    """The hex BLAKE3 digest of the file's content (follows symlinks)."""
    size = path.stat().st_size
    if size >= _BIG_FILE:
        hasher = blake3(max_threads=blake3.AUTO)
        hasher.update_mmap(path)
        return hasher.hexdigest()
    return blake3(path.read_bytes()).hexdigest()


def new_hasher() -> blake3:
    """An incremental hasher, for data that arrives in chunks (downloads)."""
    return blake3()


def is_digest(value: str) -> bool:
    """Whether `value` looks like a digest this module makes (64 lowercase hex characters)."""
    return len(value) == DIGEST_LENGTH and all(c in "0123456789abcdef" for c in value)
