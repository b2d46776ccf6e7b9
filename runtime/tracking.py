"""MLflow through an explicit MlflowClient and run ids (no fluent active-run state), so concurrent
sweep levels in threads cannot log into each other's runs. One lock serialises calls: a sqlite
backend does not like concurrent writers.

The fused model is logged as a directory of safetensors/JSON artifacts and registered as a model
version whose source is that directory: nothing in the registry needs pickle to load.
"""

from __future__ import annotations

import threading
from pathlib import Path

from spon.runtime.settings import PipelineSettings

_LOCK = threading.RLock()
FUSED_ARTIFACT = "fused_model"


def client(settings: PipelineSettings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.resolved_tracking_uri(), registry_uri=settings.resolved_tracking_uri())


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return out


def run_params(summary: dict) -> dict:
    """A pipeline run's params: its config, and how many processes distilled its alpha
    (`world_size`, spon.distributed): not part of the config, since any number trains the same alpha
    (to float noise) and resumes the other's checkpoints, but the run's numbers depend on it."""
    return {**summary["config"], "world_size": summary.get("world_size", 1)}


def experiment_id(c, settings: PipelineSettings) -> str:
    exp = c.get_experiment_by_name(settings.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(settings.experiment, artifact_location=settings.resolved_artifact_root())


def start_run(settings: PipelineSettings, params: dict, run_name: str, parent_run_id: str | None, tags: dict | None = None) -> str:
    with _LOCK:
        c = client(settings)
        all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        run = c.create_run(experiment_id(c, settings), run_name=run_name, tags=all_tags)
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            c.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id


def log_metrics(settings: PipelineSettings, run_id: str, metrics: dict[str, float], step_series: dict[str, list[float]] | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    for name, series in (step_series or {}).items():
        items += [Metric(name, float(v), now, i) for i, v in enumerate(series)]
    with _LOCK:
        c = client(settings)
        for i in range(0, len(items), 500):
            c.log_batch(run_id, metrics=items[i : i + 500])


def log_artifacts(settings: PipelineSettings, run_id: str, files: dict[str, str | Path]) -> None:
    """files: {artifact_subdir: local file or directory}."""
    with _LOCK:
        c = client(settings)
        for sub, path in files.items():
            p = Path(path)
            if p.is_dir():
                c.log_artifacts(run_id, str(p), sub)
            elif p.is_file():
                c.log_artifact(run_id, str(p), sub or None)


def set_tags(settings: PipelineSettings, run_id: str, tags: dict[str, str]) -> None:
    with _LOCK:
        c = client(settings)
        for k, v in tags.items():
            c.set_tag(run_id, k, v)


def end_run(settings: PipelineSettings, run_id: str, status: str = "FINISHED") -> None:
    with _LOCK:
        client(settings).set_terminated(run_id, status)


def run_finished(settings: PipelineSettings, run_id: str) -> bool:
    """The run exists on this server and was closed normally (everything was logged)."""
    with _LOCK:
        try:
            return client(settings).get_run(run_id).info.status == "FINISHED"
        except Exception:  # deleted, another server, not found: not reusable
            return False


def artifact_uri(settings: PipelineSettings, run_id: str, sub: str) -> str:
    with _LOCK:
        return client(settings).get_run(run_id).info.artifact_uri.rstrip("/") + "/" + sub


def register(settings: PipelineSettings, name: str, run_id: str, source: str, tags: dict[str, str]):
    """The run's model version (created on first call); returns its version number as a string."""
    from mlflow.exceptions import MlflowException

    with _LOCK:
        c = client(settings)
        try:
            c.create_registered_model(name, description="TEAL + SPON fused checkpoints (safetensors; see spon.json)")
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        # One version per run: a publish retried or rerun after a kill that came after the
        # registration (but before it was recorded) finds its version instead of adding one.
        same_run = [v for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'") if v.source == source]
        mv = same_run[0] if same_run else c.create_model_version(name, source, run_id=run_id,
                                                                  tags={k: str(v) for k, v in tags.items()})
        c.set_registered_model_alias(name, "candidate", mv.version)
        return str(mv.version)


def promote_if_better(settings: PipelineSettings, name: str, version: str, value: float | None) -> tuple[bool, float | None]:
    """Move alias `champion` to `version` if it beats the current champion on the gate metric.
    Returns (promoted, champion's value before)."""
    from mlflow.exceptions import MlflowException

    with _LOCK:
        c = client(settings)
        try:
            champ = c.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champ = None
        before = float(champ.tags[settings.gate_metric]) if champ is not None and settings.gate_metric in champ.tags else None
        if value is None:
            return False, before
        better = before is None or (value < before if settings.gate_mode == "min" else value > before)
        if better:
            c.set_registered_model_alias(name, "champion", version)
        return better, before


def resolve_alias(settings: PipelineSettings, models_uri: str):
    """models:/NAME@ALIAS (or models:/NAME/VERSION) -> the model version entity."""
    from spon.errors import SponError

    rest = models_uri[len("models:/"):]
    with _LOCK:
        c = client(settings)
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                return c.get_model_version_by_alias(name, alias)
            name, _, version = rest.partition("/")
            return c.get_model_version(name, version)
        except Exception as e:
            raise SponError(f"cannot resolve {models_uri} in {settings.resolved_tracking_uri()}: {str(e).splitlines()[0]}") from e
