"""GGUF files as a model source: dequantized once to a plain transformers checkpoint.

A `.gguf` path (or a hub repo + file, `ORG/REPO:FILE.gguf`, or a named model from spon.models;
spon.sources decides which a model string is) is turned into a directory holding config.json, fp32 safetensors weights and the tokenizer,
cached under <root>/gguf/<sha256[:16]>/ (root: $SPON_CACHE, default ~/.cache/spon). The
directory is written under a temporary name and renamed into place when complete, so a killed
conversion leaves nothing that looks finished; later loads open the directory directly.
Once written it has no trace of GGUF or its quantization config: plain
`AutoModelForCausalLM.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import uuid
from pathlib import Path

from spon.assets import cache_root
from spon.digest import sha256_file
from spon.errors import SponError

MAGIC = b"GGUF"
MARKER = "spon-gguf.json"  # written last inside the temporary directory: what it came from
# GGUF general.architecture values whose models the adapter handles (Mistral GGUFs usually say
# "llama"; transformers then picks mistral from the model name; "gemma3" loads as gemma3_text).
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
HUB_GGUF = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+):(?P<file>[\w./-]+\.gguf)")


def dequantized_dir(sha256: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "gguf" / sha256[:16]


def source_digest(path: str | Path) -> str | None:
    """'gguf:<sha256>' for a directory this module wrote, else None."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return f"gguf:{json.loads(marker.read_text())['sha256']}"


def hub_download(repo: str, file: str) -> Path:
    """One GGUF file from a hub repository (needs the network; not reachable on every machine)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, file))
    except Exception as e:
        raise SponError(f"cannot fetch {file} from {repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise SponError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")


def inspect(path: str | Path) -> dict:
    """Walk a GGUF header (metadata and tensor table, not the data) and check every tensor lies
    inside the file. Returns {"architecture", "name", "tensors", "size"}; a file that is not
    GGUF, is cut short or is garbled is a one-line SponError."""
    path = Path(path)
    check_magic(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            meta, tensors, data_start = _read_header(_Reader(f, size))
    except SponError:
        raise
    except (struct.error, ValueError, KeyError, UnicodeDecodeError, OverflowError) as e:
        raise SponError(f"{path} is not a readable GGUF file (corrupt header: {e})") from e
    arch, name = meta.get("general.architecture"), meta.get("general.name")
    end = max((data_start + off + n for off, n in tensors), default=0)
    if end > size:
        raise SponError(f"{path} is a truncated GGUF file: {size} bytes, its tensors need {end}")
    if not tensors:
        raise SponError(f"{path} is a GGUF file with no tensors")
    if arch not in GGUF_ARCHS:
        from spon.model import SUPPORTED

        raise SponError(f"unsupported architecture: {path.name} is GGUF architecture {arch!r}; "
                        f"supported: {', '.join(SUPPORTED)}")
    if "tokenizer.ggml.tokens" not in meta:  # transformers would fail on the vocabulary's size instead
        raise SponError(f"{path.name} has no tokenizer metadata (tokenizer.ggml.tokens): spon needs the model's "
                        "tokenizer in the GGUF file")
    ctx = meta.get(f"{arch}.context_length")
    context = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None
    return {"architecture": arch, "name": name, "tensors": len(tensors), "size": size, "context_length": context}


# GGUF value types (gguf.GGUFValueType): fixed-size scalars by struct code; 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise SponError(f"{self.f.name} is a truncated GGUF file: its header ends at byte {self.size}")
        return b

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise SponError(f"{self.f.name} is a truncated GGUF file: its header ends at byte {self.size}")
        self.f.seek(n, 1)

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8")

    def value(self, vtype: int, keep: bool = True):
        if vtype in _SCALARS:
            code = _SCALARS[vtype]
            return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]
        if vtype == _STRING:
            if keep:
                return self.string()
            return self.skip(self.u64())
        if vtype == _ARRAY:
            itype, count = self.u32(), self.u64()
            if itype in _SCALARS:  # skipped: only scalars and strings are read
                return self.skip(count * struct.calcsize(_SCALARS[itype]))
            for _ in range(count):
                self.value(itype, keep=False)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def _read_header(r: _Reader) -> tuple[dict, list[tuple[int, int]], int]:
    """(scalar metadata, [(offset, nbytes)] per tensor relative to the data start, data start)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    r.take(4)  # magic, checked already
    version = r.u32()
    if version not in (2, 3):
        raise SponError(f"{r.f.name}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = r.u64(), r.u64()
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.u32())
    tensors = []
    for _ in range(n_tensors):
        r.string()
        dims = [r.u64() for _ in range(r.u32())]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(r.u32())]
        offset = r.u64()
        n = 1
        for d in dims:
            n *= d
        tensors.append((offset, n // block * type_size))
    align = meta.get("general.alignment") or 32
    pos = r.f.tell()
    return meta, tensors, pos + (-pos % align)


def file_sha256(path: Path, root: Path | None = None) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a rerun does not rehash it."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = (root or cache_root()) / "gguf" / "hashes" / key
    if memo.is_file():
        got = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", got):
            return got
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(temp_name(key))
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def dequantize(path: str | Path, sha256: str | None = None, root: Path | None = None) -> Path:
    """The dequantized checkpoint directory of GGUF file `path`, converting it the first time."""
    path = Path(path).expanduser().absolute()  # not resolve(): a hub cache's blob has no .gguf name
    check_magic(path)
    sha = sha256 or file_sha256(path, root)
    dest = dequantized_dir(sha, root)
    if dest.is_dir():
        if _cache_entry_ok(dest, sha):
            return dest
        _set_aside(dest)  # never trusted: rebuilt from the file below
    info = inspect(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent)
    tmp = dest.parent / temp_name(dest.name)
    try:
        t0 = time.perf_counter()
        _convert(path, tmp, info)
        marker = {"sha256": sha, "file": path.name, "size": info["size"], "architecture": info["architecture"],
                  "name": info["name"], "seconds": round(time.perf_counter() - t0, 2), **_versions()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # another process finished the same file first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _cache_entry_ok(dest: Path, sha: str) -> bool:
    """A cache entry is used only when it is what dequantize writes: the marker naming this file's
    sha256, a model directory whose config and weight headers check out."""
    from spon.checks import check_model_dir
    from spon.console import say

    try:
        marker = json.loads((dest / MARKER).read_text())
        if not isinstance(marker, dict) or marker.get("sha256") != sha:
            raise SponError(f"its {MARKER} does not name this file's sha256")
        check_model_dir(dest, "dequantized model")
        if not (dest / "tokenizer_config.json").is_file() and not (dest / "tokenizer.json").is_file():
            raise SponError("it has no tokenizer")
    except (SponError, OSError, ValueError) as e:
        say(f"spon: the cached conversion {dest} is unusable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "converting the GGUF file again")
        return False
    return True


def _set_aside(dest: Path) -> None:
    """Move a bad cache entry out of the way (renamed first, so no reader picks it up), then remove it."""
    aside = dest.parent / temp_name(dest.name + ".bad")
    try:
        os.rename(dest, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def check_complete(model, loading_info: dict | None, name: str) -> None:
    """Every tensor the architecture needs came from the file, and every weight is finite: what a
    GGUF file lacks, transformers would otherwise initialise at random, silently."""
    import torch

    missing = sorted((loading_info or {}).get("missing_keys") or [])
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise SponError(f"{name} lacks {len(missing)} tensor(s) the architecture needs ({', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}): the file is incomplete or its block_count is wrong")
    mismatched = (loading_info or {}).get("mismatched_keys") or []
    if mismatched:
        raise SponError(f"{name}: tensor(s) of the wrong shape for its metadata: {', '.join(map(str, mismatched[:3]))}")
    for n, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SponError(f"{name}: tensor {n} holds NaN or inf")


def _convert(path: Path, out: Path, info: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from spon.model import SUPPORTED, _LOAD_LOCK

    try:
        with _LOAD_LOCK:
            # gguf_file absolute: a bare name is looked up in the working directory first
            model, loading = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=str(path), dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True), output_loading_info=True,
            )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise SponError(f"cannot dequantize {path.name} ({info['architecture']}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    check_complete(model, loading, path.name)
    try:
        with _LOAD_LOCK:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except Exception as e:  # transformers' message for a file without tokenizer metadata is misleading
        raise SponError(f"cannot read the tokenizer of {path.name}: the GGUF file has no usable tokenizer metadata "
                        f"(tokenizer.ggml.*): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if model.config.model_type not in SUPPORTED:
        raise SponError(f"unsupported architecture: {path.name} loads as model_type {model.config.model_type!r}; "
                        f"supported: {', '.join(SUPPORTED)}")
    drop_quantization(model)
    model.config.name_or_path = ""
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    left = [k for k in config if "quantization" in k or "gguf" in k]
    if left:
        raise SponError(f"dequantized {path.name} still carries {left} in config.json")


def drop_quantization(model) -> None:
    """What save_pretrained refuses while it is there: the gguf quantizer and its config."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _versions() -> dict:
    from importlib.metadata import version

    return {"transformers": version("transformers"), "gguf": version("gguf")}


def temp_name(stem: str) -> str:
    """A hidden name for something being written, carrying the writer's pid (see remove_stale)."""
    return f".{stem}.tmp-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(parent: Path) -> None:
    """What a killed writer left in `parent` (temp_name entries whose process is gone)."""
    for p in parent.glob(".*.tmp-pid*"):
        m = re.search(r"\.tmp-pid(\d+)-", p.name)
        if m is None:
            continue
        try:
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except (PermissionError, OSError):  # alive (someone else's), or not ours to judge
            continue
