"""One writer per output directory.

Every command that writes under an output directory (`--out`, `--work-dir`, a `spon pull`
destination, a `spon publish` result) holds that directory's lock while it writes: an flock on
`<parent>/.<name>.spon-lock` (beside the directory, so the directory itself holds only results),
which records the holder's pid, host and command line. A second writer is refused in one line
naming the holder; the kernel drops an flock when its process dies, so a lock left by a killed
command is taken over, with a message naming the pid that left it.

Standard library only (fcntl: POSIX)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spon.errors import SponError
from spon.format import LOCK_SUFFIX

_HELD: dict[Path, int] = {}  # directories this process holds -> lock depth (re-entrant within one process)


def lock_path(out: str | Path) -> Path:
    p = Path(out).expanduser().resolve()
    return p.parent / f".{p.name}{LOCK_SUFFIX}"


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(h: dict) -> str:
    cmd = h.get("command") or "?"
    if len(cmd) > 400:
        cmd = cmd[:397] + "..."
    host = h.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", since {h['started']}" if h.get("started") else ""
    return f"pid {h.get('pid', '?')}{where} (`{cmd}`{since})"


def acquire(out: str | Path, flag: str = "--out") -> tuple[Path, int]:
    """Take `out`'s lock now or raise a SponError naming its holder. Creates `out`'s parent
    directories (the lock lives there). Returns (lock file, fd) for release()."""
    import fcntl

    target = Path(out).expanduser().resolve()
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):  # the file may be unlinked by its releasing holder between our open and flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SponError(f"{flag} {out}: cannot create its lock {path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = _holder(path)
            raise SponError(f"{flag} {out} is being written by another spon command: {_describe(h)}; "
                            f"wait for it to finish, or choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise SponError(f"{flag} {out}: could not take its lock {path}")
    old = _holder(path)
    if old.get("pid") not in (None, os.getpid()) and not (old.get("host") == socket.gethostname() and _alive(old["pid"])):
        print(f"spon: taking over the lock of {target} left by {_describe(old)}, which is no longer running",
              file=sys.stderr)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["spon", *sys.argv[1:]]),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    return path, fd


def release(path: Path, fd: int) -> None:
    try:
        path.unlink()  # before unlocking: a waiter that opened it re-checks the inode (acquire)
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def writer_lock(out: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold `out`'s lock for the block (re-entrant within this process)."""
    key = Path(out).expanduser().resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path, fd = acquire(key, flag)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        release(path, fd)
