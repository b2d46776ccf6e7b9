"""Pipeline settings: where the work dir, the tracking store, the registry and the model store are.

Kept apart from spon.config.RunConfig (the method): these say where results go, not what is
computed, so they are not part of any stage's cache key. Embedded defaults need no service:
sqlite MLflow (artifacts beside its database) and a local-directory model store under out/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ROOT = "out"


class PipelineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    work_dir: str | None = Field(None, description="stage outputs + Prefect results; default <out>/work")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///out/mlflow.db")
    artifact_root: str | None = Field(None, description="artifact root for a new experiment on a local (sqlite) store; "
                                      "default mlartifacts/ beside the sqlite database; a tracking server keeps its own")
    experiment: str = "spon"
    registered_model: str | None = Field(None, description="registry name; default spon-<model>-s<sparsity>-<protocol>")
    store: str | None = Field(None, description="s3://BUCKET/PREFIX or a directory; default $SPON_STORE or out/store")
    gate_metric: str = Field("perplexity_spon", description="metric the champion alias is gated on")
    gate_mode: Literal["min", "max"] = "min"
    bench: bool = Field(False, description="run the kernel benchmark stage")
    progress: bool = False
    quantize: list[Literal["int8", "int4", "nf4"]] = Field(default_factory=list, description="quantization stage schemes (off when empty)")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval stage tasks (evaluation/tasks; off when empty)")
    lm_eval_limit: float | None = Field(None, gt=0, description="items per lm-eval task (int) or fraction (< 1)")
    dask_address: str | None = Field(None, description="sweep: Dask scheduler to run the levels on; default $SPON_DASK_ADDRESS or a LocalCluster")
    dask_workers: int | None = Field(None, ge=1, description="sweep: worker processes of the LocalCluster; default min(levels, CPUs)")

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{Path(DEFAULT_ROOT).resolve() / 'mlflow.db'}"

    def resolved_artifact_root(self) -> str | None:
        """Where a new experiment's artifacts go: `artifact_root` when given; for a sqlite store,
        `mlartifacts/` beside the database file (wherever the database is, never the current
        directory); None (the store's own default) for a tracking server, which decides where its
        artifacts live (`mlflow server --artifacts-destination`), and for a file store."""
        if self.artifact_root:
            root = self.artifact_root
            return root if "://" in root else Path(root).resolve().as_uri()
        uri = self.resolved_tracking_uri()
        db = sqlite_path(uri)
        return (db.parent / "mlartifacts").as_uri() if db is not None else None

    def resolved_store(self) -> str:
        store = self.store or os.environ.get("SPON_STORE") or str(Path(DEFAULT_ROOT) / "store")
        return store if store.startswith("s3://") else str(Path(store).resolve())

    def resolved_dask_address(self) -> str | None:
        return self.dask_address or os.environ.get("SPON_DASK_ADDRESS") or None

    def resolved_work_dir(self, out: str) -> Path:
        return Path(self.work_dir or Path(out) / "work").resolve()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (None for any other URI or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None  # sqlite:////abs or sqlite:///relative


def registered_name(settings: PipelineSettings, model: str, sparsity: float, protocol: str) -> str:
    """One registry entry per (model, sparsity, protocol): the champion gate compares like with like."""
    if settings.registered_model:
        return settings.registered_model
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name or model).strip("-")
    return f"spon-{base}-s{round(sparsity * 100):02d}-{protocol}"
