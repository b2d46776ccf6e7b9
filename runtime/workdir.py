"""The work dir: one directory per finished stage, named by a hash of what the stage depends on.

A stage writes into a temporary sibling and renames it into place when complete, so a killed run
never leaves a directory that looks finished. Distillation checkpoints live at a location that
depends only on the stage inputs, so a rerun after SIGKILL resumes where the last one stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


from spon.digest import digest_dir, sha256_file  # noqa: F401 - re-exported for the tasks
from spon.runtime.refs import TextFile
from spon.stages import read_json, write_json  # noqa: F401 - re-exported for the tasks


def text_files(paths: list[str]) -> list[TextFile]:
    from spon import corpora
    from spon.errors import SponError

    for p in paths:
        if not corpora.is_corpus(p) and not Path(p).is_file():
            raise SponError(f"text file does not exist: {p}")
    return [TextFile(path=p, sha256=corpora.sha256(p)) if corpora.is_corpus(p)
            else TextFile(path=str(Path(p).resolve()), sha256=sha256_file(p)) for p in paths]


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    return Path(work_dir) / stage / key


def checkpoint_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    return Path(work_dir) / "checkpoints" / f"{stage}-{key}"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only on success.

    A stage computes inside its temporary directory, so a SIGKILL mid-stage leaves one behind:
    the next attempt removes those of dead processes on this host (never another host's: a work
    dir shared by Dask workers may hold a live one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    _remove_dead_tmp(final, host)
    tmp = final.parent / f".{final.name}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # an earlier run finished the same stage: same inputs, same content
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_tmp(final: Path, host: str) -> None:
    for stale in final.parent.glob(f".{final.name}.tmp-{host}-*"):
        try:
            pid = int(stale.name[len(f".{final.name}.tmp-{host}-"):].split("-")[0])
            os.kill(pid, 0)  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def link_tree(src: Path, dst: Path) -> Path:
    """Mirror a finished stage dir into the run's out dir; hard links, so large models cost nothing."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return dst
