"""Every check on what a user passes in, made once where each entry point takes its inputs and
before anything is written: a refused command leaves its out dir absent (or unchanged) and the
inputs untouched, and says in one line which value or file is wrong.

Pure functions over paths and configs: nothing here loads a model or reads tensor data (text
files, config.json and the headers of safetensors and GGUF files are read), and nothing imports
prefect, mlflow or lm_eval.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterable

from spon.errors import SponError

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
REMOTE = ("models:/", "s3://")  # resolved by the pipeline (fetch_model), never a local path
SIDECAR = "spon.json"  # = spon.fuse.SIDECAR
FUSED_ALPHA = "spon_alpha.safetensors"  # = spon.fuse.ALPHA_FILE


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------- files

def check_text_file(path: str | Path, role: str = "text", allow_empty: bool = False) -> Path:
    """A file that exists, is UTF-8 text (no NUL bytes) and, unless allow_empty, holds some text.
    `role` names it in messages: "eval text", "calibration data", "config"."""
    kind = "config file" if role == "config" else "text file"
    if path is None or not str(path).strip():
        raise SponError(f"empty {role} file name")
    p = Path(path).expanduser()
    if not p.exists():
        raise SponError(f"{kind} does not exist: {path}")
    if not p.is_file():
        raise SponError(f"{role} file {path} is not a file")
    has_text, offset = False, 0
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise SponError(f"{role} file {path} is binary, not text (NUL byte at offset {offset + nul})")
                try:
                    has_text = bool(dec.decode(chunk).strip()) or has_text
                except UnicodeDecodeError as e:  # e.object: bytes held back from the last chunk + this one
                    at = offset - (len(e.object) - len(chunk)) + e.start
                    raise SponError(f"{role} file {path} is not UTF-8 text "
                                    f"(invalid byte 0x{e.object[e.start]:02x} at offset {at})") from e
                offset += len(chunk)
            try:
                dec.decode(b"", final=True)
            except UnicodeDecodeError as e:
                raise SponError(f"{role} file {path} is not UTF-8 text (truncated character at its end)") from e
    except OSError as e:
        raise SponError(f"cannot read {role} file {path}: {e.strerror or _first_line(e)}") from e
    if not has_text and not allow_empty:
        raise SponError(f"{role} is empty: {path} has no text")
    return p


def check_json_file(path: str | Path, what: str) -> dict:
    """A JSON object in a file (a sidecar, thresholds.json, distill.json)."""
    p = Path(path)
    if not p.is_file():
        raise SponError(f"{what} does not exist: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SponError(f"{what} {p} is not UTF-8 text (invalid byte at offset {e.start})") from e
    except ValueError as e:
        raise SponError(f"{what} {p} is not valid JSON: {_first_line(e)}") from e
    except OSError as e:
        raise SponError(f"cannot read {what} {p}: {e.strerror or _first_line(e)}") from e
    if not isinstance(data, dict):
        raise SponError(f"{what} {p} must hold a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(path: str | Path, what: str, keys: Iterable[str] = ()) -> dict:
    """The header of a safetensors file, checked against the file's size: an empty, truncated or
    foreign file is refused here without reading (or loading) any tensor data."""
    p = Path(path)
    if not p.exists():
        raise SponError(f"{what} does not exist: {p}")
    if not p.is_file():
        raise SponError(f"{what} {p} is not a file")
    bad = f"cannot read {what} {p}"
    try:
        size = p.stat().st_size
        if size == 0:
            raise SponError(f"{bad}: the file is empty (0 bytes)")
        if size < 8:
            raise SponError(f"{bad}: truncated ({size} bytes), not a safetensors file")
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or 8 + n > size:
                raise SponError(f"{bad}: not a safetensors file, or truncated (header of {n} bytes in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise SponError(f"{bad}: {e.strerror or _first_line(e)}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError is one
        raise SponError(f"{bad}: not a safetensors file (its header is not JSON)") from e
    if not isinstance(header, dict):
        raise SponError(f"{bad}: not a safetensors file (its header is not a mapping)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise SponError(f"{bad}: not a safetensors file (malformed tensor entry)") from e
    if 8 + n + end > size:
        raise SponError(f"{bad}: truncated: its header describes {8 + n + end} bytes, the file has {size}")
    missing = [k for k in keys if k not in header]
    if missing:
        raise SponError(f"{bad}: it has no tensor(s) {', '.join(missing)}")
    return header


# ----------------------------------------------------------------------------- models

def check_model_dir(path: str | Path, what: str = "model") -> dict:
    """A transformers model directory: a config.json that is a JSON object and weights whose
    safetensors headers match their files (sharded: every shard of the index). Returns config.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SponError(f"model path does not exist: {path}")
    if not p.is_dir():
        raise SponError(f"{what} {path} is a file, not a model directory (pass the directory that holds config.json)")
    if not (p / "config.json").is_file():
        raise SponError(f"{path} is not a model directory: it has no config.json")
    config = check_json_file(p / "config.json", "model config")
    st, idx = p / "model.safetensors", p / "model.safetensors.index.json"
    if st.exists():
        check_safetensors(st, "model weights")
    elif idx.is_file():
        index = check_json_file(idx, "model weights index")
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise SponError(f"model weights index {idx} lists no shards")
        for shard in shards:
            check_safetensors(p / shard, "model weights shard")
    elif (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file():
        b = p / "pytorch_model.bin"
        if b.is_file() and b.stat().st_size == 0:
            raise SponError(f"cannot read model weights {b}: the file is empty (0 bytes)")
    else:
        raise SponError(f"{path} has no model weights (model.safetensors)")
    return config


def check_fused_dir(path: str | Path) -> dict:
    """A fused checkpoint written by `spon fuse` / `spon run`: a model directory plus its sidecar
    and alpha file. Returns the sidecar."""
    check_model_dir(path, "fused model")
    p = Path(path)
    if not (p / SIDECAR).is_file():
        raise SponError(f"{path} is not a spon model: no {SIDECAR}")
    meta = check_json_file(p / SIDECAR, "sidecar")
    if meta.get("format") not in ("spon/1", "spon/2"):  # = spon.fuse.FORMATS
        raise SponError(f"{p / SIDECAR}: unknown format {meta.get('format')!r}, expected spon/1 or spon/2")
    check_safetensors(p / FUSED_ALPHA, "alpha file")
    if meta.get("criterion", "magnitude") not in ("magnitude", "weighted"):  # = spon.sparse.CRITERIA
        raise SponError(f"{p / SIDECAR}: unknown criterion {meta.get('criterion')!r}, expected magnitude or weighted")
    if meta.get("criterion", "magnitude") == "weighted":
        check_safetensors(p / "spon_channel_norms.safetensors", "channel norms file")  # = spon.fuse.CHANNEL_NORMS_FILE
    return meta


def check_model_source(model: str | None, pipeline: bool = False) -> Path | None:
    """--model / config `model`: None is the embedded default; '' is refused. Returns the local
    model directory (or `.gguf` file) to check further, or None for what cannot be checked here:
    a hub id, a hub GGUF, a named model not fetched yet, and in the pipeline a models:/ or s3://
    reference or a model-store copy (fetch_model resolves and verifies those)."""
    from spon import gguf
    from spon.model import default_model_path
    from spon.models import MODELS

    if model is not None and not model.strip():
        raise SponError("empty model name (--model ''): pass a model directory or hub id, "
                        "or leave --model out for the embedded default")
    src = model or default_model_path()
    if src.startswith(REMOTE):
        if not pipeline:
            raise SponError(f"model {src}: registry and store references need the pipeline "
                            f"(`spon run` without --in-process), or `spon pull` it to a directory first")
        return None
    p = Path(src).expanduser()
    if src in MODELS and not p.exists():  # a named model: its dequantized checkpoint once fetched
        done = gguf.dequantized_dir(MODELS[src]["sha256"])
        if done.is_dir():
            check_model_dir(done)
            return done
        return None
    if src.lower().endswith(".gguf"):
        if p.is_file():
            gguf.inspect(p)  # header only: magic, truncation, architecture
            return p
        if gguf.HUB_GGUF.fullmatch(src) and not p.exists():
            return None
        raise SponError(f"GGUF file does not exist: {src} (a hub GGUF is ORG/REPO:FILE.gguf)")
    if p.exists():
        if pipeline and p.is_dir() and (p / "manifest.json").is_file():
            return None  # a model-store copy: pulled and checksum-verified by fetch_model
        check_model_dir(p)
        return p
    if not HUB_ID.fullmatch(src) or src.startswith((".", "~", "/")):
        raise SponError(f"model path does not exist: {src}")
    return None  # a hub id: nothing local to check


def model_config(path: str | Path):
    """transformers' config of a local model directory (config.json only, no weights)."""
    from spon.model import _offline_for_local_assets

    _offline_for_local_assets()
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ... for a bad config
        raise SponError(f"{Path(path) / 'config.json'} is not a usable model config: {_first_line(e)}") from e


def max_context(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_architecture(config, source) -> None:
    from spon.model import SUPPORTED

    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        raise SponError(f"unsupported architecture: {source} is model_type {arch!r}; supported: {', '.join(SUPPORTED)}")


def check_context(config, source, window: int | None = None, calib_len: int | None = None,
                  window_flag: str = "--window (eval.window)", calib_flag: str = "--calib-len (calibration.block_len)",
                  new_tokens: int | None = None) -> None:
    """Sequence lengths a command would feed the model, against its max_position_embeddings."""
    n = max_context(config)
    if n is None:
        return
    for flag, value in ((window_flag, window), (calib_flag, calib_len), ("--max-new-tokens", new_tokens)):
        if value is not None and value > n:
            raise SponError(f"{flag} {value} exceeds the model's max_position_embeddings {n} ({source})")


# ----------------------------------------------------------------------------- values

def check_device(device: str | None, flag: str = "--device") -> str:
    """cpu, cuda[:N] or mps, and present in this torch build / on this machine."""
    import torch

    d = (device or "").strip()
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError, TypeError) as e:
        raise SponError(f"unknown device {device!r} ({flag}): use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return d
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise SponError(f"{flag} {device}: this torch {torch.__version__} is a CPU-only build (no CUDA); use --device cpu")
        if not torch.cuda.is_available():
            raise SponError(f"{flag} {device}: no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SponError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return d
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SponError(f"{flag} {device}: MPS is not available on this machine")
        return d
    raise SponError(f"unsupported device {device!r} ({flag}): use cpu, cuda or cuda:N")


def check_dtype(dtype: str, flag: str = "--dtype") -> str:
    from spon.model import DTYPES

    if dtype not in DTYPES:
        raise SponError(f"unknown dtype {dtype!r} ({flag}); choose one of {sorted(DTYPES)}")
    return dtype


def check_int(value: int | None, flag: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise SponError(f"{flag} must be >= {minimum}, got {value}")


def check_window(window: int, stride: int, window_flag: str = "--window", stride_flag: str = "--stride") -> None:
    if window < 2:
        raise SponError(f"{window_flag} must be >= 2 (a window predicts window - 1 tokens), got {window}")
    if not 1 <= stride <= window:
        raise SponError(f"{stride_flag} must be in [1, {window_flag} {window}], got {stride}")


# ----------------------------------------------------------------------------- entry points

def check_model(cfg, pipeline: bool = False, calib_len: int | None = None, window: int | None = None) -> Path | None:
    """cfg.model (a RunConfig's): exists, is a loadable supported model whose context holds the
    sequence lengths given. Returns its local directory (None: hub id or remote reference)."""
    local = check_model_source(cfg.model, pipeline)
    if local is not None and local.is_dir():  # (a .gguf file: its header was checked)
        conf = model_config(local)
        check_architecture(conf, local)
        check_context(conf, local, window=window, calib_len=calib_len)
    elif local is None and cfg.model and HUB_ID.fullmatch(cfg.model) and cfg.model not in _named_models():
        try:  # a hub id: its config, if it is in the local cache
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
        except Exception:
            conf = None
        if conf is not None:
            check_context(conf, cfg.model, window=window, calib_len=calib_len)
    return local


def _named_models():
    from spon.models import MODELS

    return MODELS


def model_label(model: Path | None) -> str:
    return "the model file" if model is not None and model.is_file() else "the model directory"
