"""Where the shipped assets (stories260K, eval data) live: $SPON_ASSETS, else ../shared/assets
beside the repo; and where spon keeps what it makes once per machine (dequantized GGUF models,
the decode path it measured): $SPON_CACHE, else ~/.cache/spon. One place each, so a checkout
elsewhere points everything at them with one variable."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def assets_root() -> Path:
    return Path(os.environ.get("SPON_ASSETS") or REPO.parent / "shared" / "assets")


def cache_root() -> Path:
    return Path(os.environ.get("SPON_CACHE") or Path.home() / ".cache" / "spon").expanduser()


def portable(obj):
    """`obj` (JSON data) with every path under the assets root written as $SPON_ASSETS/...: what a
    committed result file names, whichever machine measured it."""
    root = str(assets_root().resolve())
    if isinstance(obj, str):
        return obj.replace(root, "$SPON_ASSETS")
    if isinstance(obj, dict):
        return {portable(k): portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(x) for x in obj]
    return obj
