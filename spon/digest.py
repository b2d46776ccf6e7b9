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


def content_key(*parts) -> str:
    """The one key of a computed result: sha256 (first 16 hex digits) of its parts as canonical
    JSON. pydantic configs count by their fields, `Path`s by the content of the file or directory
    they name; anything else (names, numbers, dicts and lists of them) as it is. The stage cache,
    the distillation checkpoints and the evaluation's resumable units all key on this."""
    import json

    def plain(x):
        if hasattr(x, "model_dump"):  # a pydantic model (not imported here: this module is stdlib only)
            return x.model_dump(mode="json")
        if isinstance(x, Path):
            return "sha256:" + digest_path(x)
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        return x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
