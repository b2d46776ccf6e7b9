"""One key per pipeline stage: what the stage's result depends on, hashed.

    key(stage) = sha256(stage name, digest of the code the stage runs, its inputs)

The inputs are the stage's config sections, the model's content digest and the keys of the
upstream stages it reads (so a change upstream changes every key below it). The code digest
covers spon/stages.py (every stage's adapter) and every module of spon (kernels
included) that the stage's method module imports, transitively: editing spon/distill.py changes
the keys of distill and everything downstream of it, and of nothing before it. The same key names
the stage's directory in the work dir and is Prefect's cache key, so there is one key, not two.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

from pydantic import BaseModel

from spon.digest import content_key
from spon.runtime.refs import ModelRef, StageRef, TextFile

# The method module each stage runs; its transitive spon imports are part of the stage's code.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "calibrate": ("spon.calibration",),
    "thresholds": ("spon.thresholds",),
    "distill": ("spon.distill",),
    "fuse": ("spon.fuse",),
    "evaluate": ("spon.perplexity",),
    "quantize": ("spon.quantize", "spon.perplexity"),
    "lm_eval": ("spon.evaluation.suite",),
}
# Inputs that say where or how verbosely a stage runs, not what it computes.
NOT_KEYED = ("work_dir", "progress")


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imports(name: str, source: str, is_package: bool) -> set[str]:
    """spon.* modules named by the import statements of a module (anywhere in it: lazy imports count)."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.startswith("spon.")}


@functools.lru_cache(maxsize=None)
def code_digest(roots: tuple[str, ...]) -> str:
    """sha256 over the sources of `roots` and every spon module they import, transitively
    (parent packages included: importing a module runs its package's __init__)."""
    seen: dict[str, bytes] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name == "spon":  # spon/__init__ only re-exports; it computes nothing
            continue
        path = _module_file(name)
        if path is None:  # `from spon.x import function`: not a module
            continue
        source = path.read_bytes()
        seen[name] = source
        todo.extend(_imports(name, source.decode(), path.name == "__init__.py"))
        parent = name.rpartition(".")[0]
        if parent and parent != "spon":
            todo.append(parent)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + hashlib.sha256(seen[name]).digest())
    return h.hexdigest()


def _plain(x):
    if isinstance(x, StageRef):
        return {"stage": x.stage, "key": x.key}  # the upstream key, not where its files are
    if isinstance(x, ModelRef):
        return {"source": x.source, "digest": x.digest}
    if isinstance(x, TextFile):
        return {"sha256": x.sha256}
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def stage_key(stage: str, inputs: dict) -> str:
    """The key of one stage run: its name, its code, and its inputs (minus NOT_KEYED)."""
    # spon/stages.py holds every stage's adapter: its bytes count whole (not its import closure,
    # which is all of spon), so an edit there recomputes every stage -- conservative, never stale.
    code = {"method": code_digest(STAGE_CODE[stage]),
            "chain": hashlib.sha256(_module_file("spon.stages").read_bytes()).hexdigest()}
    return content_key({"stage": stage, "code": code,
                        "inputs": {k: _plain(v) for k, v in inputs.items() if k not in NOT_KEYED}})
