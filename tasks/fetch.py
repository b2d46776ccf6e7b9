"""fetch_model: any model reference -> a local directory plus what identifies its content."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task

from spon.errors import SponError
from spon.format import is_spon_checkpoint
from spon.gguf import source_digest
from spon.sources import classify, resolve

from spon.runtime import store, tracking
from spon.tasks.policies import IO_RETRIES, UNCACHED
from spon.runtime.settings import PipelineSettings
from spon.runtime.refs import ModelRef
from spon.runtime.workdir import digest_dir


def resolve_store_uri(source: str, settings: PipelineSettings) -> str:
    """models:/NAME@ALIAS -> the stored copy's URI recorded on the version (tag store_uri)."""
    mv = tracking.resolve_alias(settings, source)
    uri = (mv.tags or {}).get("store_uri")
    if not uri:
        raise SponError(f"{source} (version {mv.version}) has no store_uri tag: it was never stored")
    return uri


def pull_cached(uri: str, models_dir: Path) -> tuple[Path, str]:
    """Pull a stored model once per manifest content; later fetches reuse the verified copy."""
    digest = hashlib.sha256(store.open_store(uri).get_bytes(store.MANIFEST) or b"").hexdigest()
    dest = models_dir / digest[:16]
    if not dest.is_dir():
        store.pull(uri, dest)
    return dest, f"sha256:{digest}"


@task(name="fetch_model", **UNCACHED, **IO_RETRIES)
def fetch_model(source: str | None, work_dir: str, settings: PipelineSettings) -> ModelRef:
    """Hub id, local dir, s3:// URI, models:/NAME@ALIAS, a `.gguf` file (or ORG/REPO:FILE.gguf)
    or a named model (spon.models; digest gguf:<sha256 of the file>). Not cached itself: it is what
    establishes the content identity every later cache key is built on."""
    src = classify(source)  # what the string names (spon.sources); the store and registry are ours
    models_dir = Path(work_dir) / "models"
    if src.kind == "registry":
        path, digest = pull_cached(resolve_store_uri(src.text, settings), models_dir)
        return ModelRef(source=src.text, path=str(path), digest=digest, is_spon=True)
    if src.kind in ("s3", "store"):
        path, digest = pull_cached(src.text, models_dir)
        return ModelRef(source=src.text, path=str(path), digest=digest, is_spon=is_spon_checkpoint(path))
    if src.kind != "hub":
        resolved = resolve(src)  # a GGUF file or named model -> its dequantized dir; a directory as it is
        gguf_digest = source_digest(resolved)
        if gguf_digest:
            return ModelRef(source=src.text, path=resolved, digest=gguf_digest)
        p = src.path
        if not p.is_dir():
            raise SponError(f"model {src.text} is a file, not a model directory")
        return ModelRef(source=src.text, path=str(p.resolve()), digest=f"sha256:{digest_dir(p)}",
                        is_spon=is_spon_checkpoint(p))
    try:  # a hub id: the snapshot's commit hash is its revision
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(src.text))
    except Exception as e:
        raise SponError(f"cannot fetch model {src.text!r}: {str(e).splitlines()[0]}") from e
    return ModelRef(source=src.text, path=str(snap), digest=f"hub:{src.text}@{snap.name}")
