"""Built-in text corpora every machine has, named `corpus:NAME` wherever a text file is accepted
(calibration files, evaluation files): source code for calibrating and checking α on a domain
besides prose, with no hub.

- corpus:python-stdlib        the Python standard library's top-level modules, minus the held-out ones
- corpus:python-stdlib-heldout the held-out modules (about a fifth, chosen by a hash of the module
                              name, so the split does not move when a module is added): never used
                              for calibration, the code evaluation set
- corpus:c-headers            CPython's C headers (the `include` dir): a second code language,
                              never used for calibration

Each module or header is one document. The text depends on the interpreter's version; a stage
cache keys on its content (sha256).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

PREFIX = "corpus:"
HELDOUT_EVERY = 5  # crc32(module name) % 5 == 0: held out


def _stdlib_modules() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _heldout(path: Path) -> bool:
    return zlib.crc32(path.stem.encode()) % HELDOUT_EVERY == 0


def _files(name: str) -> list[Path]:
    if name == "python-stdlib":
        return [p for p in _stdlib_modules() if not _heldout(p)]
    if name == "python-stdlib-heldout":
        return [p for p in _stdlib_modules() if _heldout(p)]
    if name == "c-headers":
        return sorted(Path(sysconfig.get_paths()["include"]).rglob("*.h"))
    raise KeyError(name)


NAMES = ("python-stdlib", "python-stdlib-heldout", "c-headers")


def is_corpus(path: str | Path) -> bool:
    return str(path).startswith(PREFIX)


def documents(path: str) -> list[str]:
    """The corpus `corpus:NAME`'s documents (one per source file, in name order)."""
    from spon.errors import SponError

    name = str(path)[len(PREFIX):]
    try:
        files = _files(name)
    except KeyError:
        raise SponError(f"unknown corpus {path!r}; known: {', '.join(PREFIX + n for n in NAMES)}") from None
    if not files:
        raise SponError(f"corpus {path!r} is empty on this machine (no files under "
                        f"{sysconfig.get_paths()['stdlib' if name.startswith('python') else 'include']})")
    docs = [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
    return [d for d in docs if d]


def sha256(path: str) -> str:
    """The digest of a corpus's text (what a cache keyed on its content keys on)."""
    import hashlib

    h = hashlib.sha256()
    for d in documents(path):
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
