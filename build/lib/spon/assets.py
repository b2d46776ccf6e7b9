"""Where the shipped assets (stories260K, eval data) live: $SPON_ASSETS, else ../shared/assets
beside the repo. One place, so a checkout elsewhere points everything at them with one variable."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def assets_root() -> Path:
    return Path(os.environ.get("SPON_ASSETS") or REPO.parent / "shared" / "assets")
