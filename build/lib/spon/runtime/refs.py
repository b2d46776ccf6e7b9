"""What the stage tasks hand each other: small JSON-serialisable references to files in the work
dir. Tensors never travel through Prefect's result store (no pickle); only these refs do."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextFile(_Ref):
    """A text input named by path and content hash, so an edited file invalidates the cache."""

    path: str
    sha256: str


class ModelRef(_Ref):
    """A local model directory and what identifies its content (hub revision or sha256)."""

    source: str  # what the user asked for: hub id, directory, s3:// URI or models:/NAME@ALIAS
    path: str
    digest: str
    is_spon: bool = False  # a fused spon checkpoint (has spon.json), not a base model


class StageRef(_Ref):
    """A finished stage: its directory in the work dir (named by the stage's cache key)."""

    stage: str
    key: str  # runtime.cache.stage_key: names `dir` and is Prefect's cache key
    dir: str
    wall_s: float  # how long the stage took when it actually ran (not when served from cache)
