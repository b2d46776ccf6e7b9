"""One-off, deterministic conversions of shipped data into the jsonl that task YAMLs read.

A task YAML asks for one with a `spon_prepare:` block (converter, source, output, options). The
output goes to the cache dir, never next to the shared source data, and is rebuilt only when
missing or older than its source. Writing to a temp file and renaming keeps a half-written file
from ever being read by a concurrent run.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

from spon.errors import SponError

CONVERTERS: dict[str, Callable[..., Iterable[dict]]] = {}


def converter(name: str):
    def register(fn):
        CONVERTERS[name] = fn
        return fn

    return register


@converter("hellaswag_lines")
def hellaswag_lines(source: Path) -> Iterable[dict]:
    """6 lines per item: context, gold index, 4 endings -> {"query", "choices", "gold"}."""
    with bz2.open(source, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if len(lines) % 6:
        raise SponError(f"{source}: {len(lines)} lines is not a multiple of 6")
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i : i + 6]
        yield {"query": ctx.strip(), "choices": [e.strip() for e in endings], "gold": int(gold)}


@converter("documents")
def documents(source: Path, separator: str | None = None, split_before: str | None = None) -> Iterable[dict]:
    """A text file as {"text"} documents: split on a literal separator or before each line
    matching a regex (e.g. wikitext's top-level headings); empty pieces are dropped."""
    text = Path(source).read_text(encoding="utf-8")
    if separator:
        pieces = text.split(separator)
    elif split_before:
        pieces = re.split(f"(?m)(?={split_before})", text)
    else:
        pieces = [text]
    for p in pieces:
        if p.strip():
            yield {"text": p.strip()}


def prepare(spec: dict) -> Path:
    """Run the converter a YAML asks for if its output is missing or stale; return the output."""
    spec = dict(spec)
    try:
        name, source, output = spec.pop("converter"), Path(spec.pop("source")), Path(spec.pop("output"))
    except KeyError as e:
        raise SponError(f"spon_prepare needs converter, source and output; missing {e}") from e
    if name not in CONVERTERS:
        raise SponError(f"unknown spon_prepare converter {name!r}; known: {sorted(CONVERTERS)}")
    if not source.is_file():
        raise SponError(f"data file does not exist: {source} (set SPON_EVAL_DATA?)")
    if output.is_file() and output.stat().st_mtime >= source.stat().st_mtime:
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in CONVERTERS[name](source, **spec):
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(output)
    return output
