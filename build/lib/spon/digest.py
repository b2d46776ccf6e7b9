"""Content hashes: of files, of directories, and of the code that computes a result."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_dir(path: str | Path) -> str:
    """Content hash of a directory: relative paths and file hashes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def digest_path(path: str | Path) -> str:
    p = Path(path)
    return digest_dir(p) if p.is_dir() else sha256_file(p)
