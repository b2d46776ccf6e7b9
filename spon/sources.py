"""Model sources: what a `--model` string (config `model`) names, decided in one place.

    None                      the embedded default (stories260K beside the repo, or $SPON_DEFAULT_MODEL)
    smollm2-135m              a named model (spon.models): a GGUF from PyPI, dequantized once
    path/to/file.gguf         a local GGUF file, dequantized once (spon.gguf)
    ORG/REPO:FILE.gguf        a GGUF file on the hub, downloaded and dequantized once
    path/to/dir               a local model directory (fused or not)
    path/to/dir + manifest    a model-store copy (pulled and checksum-verified by the pipeline)
    s3://BUCKET/PREFIX/...    a model-store URI (the pipeline's)
    models:/NAME@ALIAS        a registry reference (the pipeline's)
    ORG/NAME                  a hub id

Anything else is a one-line SponError. `classify` says which; `resolve` turns the method's kinds
into what transformers opens (a directory or hub id); `load_model` loads it; the checks here
(check_model_source, check_model, ...) check a source before anything runs. The pipeline
(spon.tasks.fetch) asks `classify` too, and fetches store and registry references itself.

Layer: model sources, above the method core (spon.model loads what this resolves), below the
chain, the pipeline and the command lines.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from spon import gguf, models
from spon.checks import check_context, check_model_dir, first_line
from spon.errors import SponError
from spon.format import MANIFEST_FILE

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
REGISTRY, STORE_URI = "models:/", "s3://"

# Every kind classify returns. LOCAL_KINDS: a path on this machine; PIPELINE_KINDS: what only the
# pipeline (which owns the model store and the registry) can open.
KINDS = ("named", "gguf", "hub_gguf", "dir", "store", "s3", "registry", "hub")
LOCAL_KINDS = ("gguf", "dir", "store")
PIPELINE_KINDS = ("store", "s3", "registry")


def default_model_path() -> str:
    """The embedded default: the real trained stories260K Llama shipped beside the repo."""
    env = os.environ.get("SPON_DEFAULT_MODEL")
    if env:
        return env
    from spon.assets import assets_root

    return str(assets_root() / "models" / "stories260K")


@dataclass(frozen=True)
class Source:
    """A classified model string. `text`: the string (the default's path when none was given);
    `path`: the local path for the local kinds, else None; `default`: the embedded default."""

    kind: str
    text: str
    path: Path | None = None
    default: bool = False

    @property
    def remote(self) -> bool:
        """A store URI or registry reference: opened by the pipeline only."""
        return self.kind in ("s3", "registry")


def classify(model: str | None) -> Source:
    """What `model` names (see the module docstring). None: the embedded default; '' (or blank)
    and a string that is none of the kinds: a SponError."""
    default = model is None
    if model is not None and not model.strip():
        raise SponError("empty model name (--model ''): pass a model directory or hub id, "
                        "or leave --model out for the embedded default")
    src = default_model_path() if default else model
    if src.startswith(REGISTRY):
        return Source("registry", src, default=default)
    if src.startswith(STORE_URI):
        return Source("s3", src, default=default)
    p = Path(src).expanduser()
    if src in models.MODELS and not p.exists():
        return Source("named", src, default=default)
    if src.lower().endswith(".gguf"):
        if p.is_file():
            return Source("gguf", src, p, default)
        if gguf.HUB_GGUF.fullmatch(src) and not p.exists():
            return Source("hub_gguf", src, default=default)
        if p.is_dir():
            raise SponError(f"{src} is a directory, not a GGUF file (a .gguf model is one file)")
        raise SponError(f"GGUF file does not exist: {src} (a hub GGUF is ORG/REPO:FILE.gguf)")
    if p.exists():
        if p.is_dir() and (p / MANIFEST_FILE).is_file():
            return Source("store", src, p, default)
        return Source("dir", src, p, default)
    if HUB_ID.fullmatch(src) and not src.startswith("."):
        return Source("hub", src, default=default)
    raise SponError(f"model path does not exist: {src}")


def resolve(model: str | Source | None) -> str:
    """What transformers opens for `model`: a named model or a GGUF file (local or on the hub) ->
    its dequantized checkpoint directory (converted the first time); a directory or hub id as it
    is. A store URI or registry reference is the pipeline's (spon.tasks.fetch): refused here."""
    s = model if isinstance(model, Source) else classify(model)
    if s.kind == "named":
        return models.resolve(s.text)
    if s.kind == "gguf":
        return str(gguf.dequantize(s.path))
    if s.kind == "hub_gguf":
        m = gguf.HUB_GGUF.fullmatch(s.text)
        return str(gguf.dequantize(gguf.hub_download(m["repo"], m["file"])))
    if s.remote:
        raise _pipeline_only(s)
    return s.text


def _pipeline_only(s: Source) -> SponError:
    return SponError(f"model {s.text}: registry and store references need the pipeline "
                     f"(`spon run` without --in-process), or `spon pull` it to a directory first")


def weights_digest(loaded_from: str | Path) -> str | None:
    """sha256 (16 hex digits) of the weight files of what transformers loaded (`config._name_or_path`:
    a local directory, or a hub id found in the local hub cache): their names and bytes, so two
    models with the same config and tokenizer and other weights differ (a stage refuses the other's
    files: spon.stages.check_made_by). The files, not the tensors: the same for every --dtype and
    device. None when there are no files to read (nothing to compare)."""
    from spon.digest import sha256_file
    from spon.format import ALPHA_FILE, CHANNEL_NORMS_FILE, WEIGHT_SUFFIXES

    d = Path(loaded_from).expanduser()
    if not d.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(loaded_from), "config.json")
        except Exception:  # not a hub id either: nothing to fingerprint
            return None
        if not isinstance(found, str):
            return None
        d = Path(found).parent
    files = sorted(f for f in d.iterdir() if f.name.endswith(WEIGHT_SUFFIXES) and f.is_file()
                   and f.name not in (ALPHA_FILE, CHANNEL_NORMS_FILE))
    if not files:
        return None
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()[:16]


def load_model(name_or_path: str | None = None, device: str = "cpu", dtype: str = "fp32",
               device_map: str | None = None):
    """Load any causal LM by hub id, local directory, `.gguf` file (or ORG/REPO:FILE.gguf) or
    named model (spon.models); None (or '') is the embedded default. Returns (model, tokenizer)."""
    from spon.model import load_pretrained, torch_dtype

    torch_dtype(dtype)  # before a GGUF is fetched or converted
    return load_pretrained(resolve(name_or_path or None), device, dtype, device_map)


# ----------------------------------------------------------------------------- checks

def check_model_source(model: str | None, pipeline: bool = False) -> Path | None:
    """--model / config `model`: None is the embedded default; '' is refused. Returns the local
    model directory (or `.gguf` file) to check further, or None for what cannot be checked here:
    a hub id, a hub GGUF, a named model not fetched yet, and in the pipeline a models:/ or s3://
    reference or a model-store copy (fetch_model resolves and verifies those)."""
    s = classify(model)
    if s.remote:
        if not pipeline:
            raise _pipeline_only(s)
        return None
    if s.kind == "named":  # its dequantized checkpoint once fetched
        done = gguf.dequantized_dir(models.MODELS[s.text]["sha256"])
        if done.is_dir():
            check_model_dir(done)
            return done
        return None
    if s.kind == "gguf":
        gguf.inspect(s.path)  # header only: magic, truncation, architecture, context length
        return s.path
    if s.kind == "store" and pipeline:
        return None  # a model-store copy: pulled and checksum-verified by fetch_model
    if s.kind in ("dir", "store"):
        check_model_dir(s.path)
        return s.path
    return None  # a hub id or hub GGUF: nothing local to check


def model_config(path: str | Path):
    """transformers' config of a local model directory (config.json only, no weights)."""
    from spon.model import _offline_for_local_assets

    _offline_for_local_assets()
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ... for a bad config
        raise SponError(f"{Path(path) / 'config.json'} is not a usable model config: {first_line(e)}") from e


def check_architecture(config, source) -> None:
    from spon.model import SUPPORTED

    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        raise SponError(f"unsupported architecture: {source} is model_type {arch!r}; supported: {', '.join(SUPPORTED)}")


def check_model(cfg, pipeline: bool = False, calib_len: int | None = None, window: int | None = None) -> Path | None:
    """cfg.model (a RunConfig's): exists, is a loadable supported model whose context holds the
    sequence lengths given. Returns its local directory (None: hub id or remote reference)."""
    local = check_model_source(cfg.model, pipeline)
    if local is not None and local.is_file():  # a .gguf file: its header's context length
        n = gguf.inspect(local).get("context_length")
        if n is not None:
            from types import SimpleNamespace

            conf = SimpleNamespace(max_position_embeddings=n)
            calib_len, window = adapt_to_context(cfg, conf, local, calib_len, window)
            check_context(conf, local, window=window, calib_len=calib_len)
    if local is not None and local.is_dir():  # (a .gguf file: its header was checked)
        conf = model_config(local)
        check_architecture(conf, local)
        calib_len, window = adapt_to_context(cfg, conf, local, calib_len, window)
        check_context(conf, local, window=window, calib_len=calib_len)
    elif local is None and cfg.model and classify(cfg.model).kind == "hub":
        try:  # a hub id: its config, if it is in the local cache
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
        except Exception:
            conf = None
        if conf is not None:
            calib_len, window = adapt_to_context(cfg, conf, cfg.model, calib_len, window)
            check_context(conf, cfg.model, window=window, calib_len=calib_len)
    return local


def adapt_to_context(cfg, conf, source, calib_len: int | None, window: int | None) -> tuple[int | None, int | None]:
    """A default that the model's context cannot hold adapts to it (said in one line): the
    calibration block length and the perplexity window (and its stride) are clamped to the model's
    max_position_embeddings. A value the user gave (a flag or the config file) is left for
    check_context to refuse. Returns the (calib_len, window) to check."""
    from spon.checks import max_context
    from spon.console import say

    n = max_context(conf)
    if n is None:
        return calib_len, window
    if calib_len is not None and calib_len > n and "block_len" not in cfg.calibration.model_fields_set:
        say(f"calibration.block_len: the default {calib_len} exceeds the model's max_position_embeddings {n} "
            f"({source}); using {n}")
        cfg.calibration.block_len = calib_len = n
    if window is not None and window > n and "window" not in cfg.eval.model_fields_set:
        stride = cfg.eval.stride if "stride" in cfg.eval.model_fields_set else min(cfg.eval.stride, max(1, n // 2))
        say(f"eval.window: the default {window} exceeds the model's max_position_embeddings {n} ({source}); "
            f"using {n} (stride {stride})")
        cfg.eval.window = window = n
        cfg.eval.stride = stride
    return calib_len, window


def model_label(model: Path | None) -> str:
    return "the model file" if model is not None and model.is_file() else "the model directory"
