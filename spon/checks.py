"""Checks of files and values, generic to any entry point: UTF-8 text files, JSON objects,
safetensors headers, model and fused checkpoint directories, device, dtype, ints, window/stride
and sequence lengths against a model's context. Each failure is one line (a SponError) naming
the value or file that is wrong.

Core layer: pure functions over paths and values. Nothing here loads a model or reads tensor
data (text files, config.json and safetensors headers are read); torch is imported only by the
device and dtype checks, transformers not at all.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterable

from spon import corpora
from spon.errors import SponError
from spon.format import ALPHA_FILE, CHANNEL_NORMS_FILE, SIDECAR, validate_sidecar


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------- files

def check_text_file(path: str | Path, role: str = "text", allow_empty: bool = False) -> Path:
    """A file that exists, is UTF-8 text (no NUL bytes) and, unless allow_empty, holds some text.
    `role` names it in messages: "eval text", "calibration data", "config"."""
    kind = "config file" if role == "config" else "text file"
    if path is None or not str(path).strip():
        raise SponError(f"empty {role} file name")
    if role != "config" and corpora.is_corpus(path):
        corpora.documents(str(path))  # an unknown or empty corpus: its one line
        return path
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
        raise SponError(f"cannot read {role} file {path}: {e.strerror or first_line(e)}") from e
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
        raise SponError(f"{what} {p} is not valid JSON: {first_line(e)}") from e
    except OSError as e:
        raise SponError(f"cannot read {what} {p}: {e.strerror or first_line(e)}") from e
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
        raise SponError(f"{bad}: {e.strerror or first_line(e)}") from e
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
    and alpha file, the sidecar checked against the format (spon.format.validate_sidecar: fields,
    types, finite thresholds >= 0, one per layer and target of config.json's num_hidden_layers)
    and the alpha / channel norms headers against it (names, 1-D, fp32). Returns the sidecar."""
    config = check_model_dir(path, "fused model")
    p = Path(path)
    if not (p / SIDECAR).is_file():
        raise SponError(f"{path} is not a spon model: no {SIDECAR}")
    meta = check_json_file(p / SIDECAR, "sidecar")
    n = config.get("num_hidden_layers")
    num_layers = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    try:
        validate_sidecar(meta, num_layers=num_layers)
    except ValueError as e:
        raise SponError(f"{p / SIDECAR}: {e}") from None
    headers = {"alpha": check_safetensors(p / ALPHA_FILE, "alpha file")}
    if meta.get("criterion", "magnitude") == "weighted":
        headers["norms"] = check_safetensors(p / CHANNEL_NORMS_FILE, "channel norms file")
    info = {k: {n: (tuple(v.get("shape") or ()), v.get("dtype"), None) for n, v in h.items()
                if n != "__metadata__" and isinstance(v, dict)} for k, h in headers.items()}
    try:
        validate_sidecar(meta, num_layers=num_layers, alpha=info["alpha"], channel_norms=info.get("norms"))
    except ValueError as e:
        raise SponError(f"{p}: {e}") from None
    return meta


def max_context(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


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
    d = (device or "").strip()
    if d == "cpu":  # always there; no torch import (1.5 s) before the other input checks
        return d
    import torch

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
