"""MLflow through an explicit MlflowClient and run ids (no fluent active-run state), so concurrent
sweep levels in threads cannot log into each other's runs. One lock serialises calls: a sqlite
backend does not like concurrent writers.

The fused model is logged as an MLflow Model (the run's artifact `fused_model`): MLmodel, the
models-from-code file runtime/mlflow_model.py, pinned requirements, signature and input example,
and the checkpoint itself (safetensors + JSON) as its artifact. A model version's source is that
directory, so `mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` load
the sparse model through spon's own loader: nothing in the registry needs pickle to load.
The run's inputs are its datasets (calibration, evaluation texts: name, digest, source).
"""

from __future__ import annotations

import threading
from pathlib import Path

from spon.runtime.settings import PipelineSettings

_LOCK = threading.RLock()
FUSED_ARTIFACT = "fused_model"  # the run's MLflow Model (checkpoint inside it)
# Where a run logged by an older spon keeps a bare checkpoint at FUSED_ARTIFACT, the MLflow Model
# made for it by `spon publish models:/...` goes here instead.
REPUBLISHED_ARTIFACT = "mlflow_model"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MLMODEL = "MLmodel"
# What the pyfunc imports when it loads (the spon wheel brings the rest of its dependencies).
SERVING_PACKAGES = ("spon", "mlflow", "torch", "transformers", "safetensors", "tokenizers", "sentencepiece", "accelerate")


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


def register(settings: PipelineSettings, name: str, run_id: str, source: str, tags: dict[str, str],
             description: str | None = None):
    """The run's model version (created on first call); returns its version number as a string."""
    from mlflow.exceptions import MlflowException

    with _LOCK:
        c = client(settings)
        try:
            c.create_registered_model(name, description="TEAL + SPON sparse models: each version an MLflow Model "
                                      "(pyfunc from code, spon's loader; the fused safetensors checkpoint inside). "
                                      "Serve: mlflow models serve -m models:/" + name + "@champion --env-manager local")
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        # One version per run: a publish retried or rerun after a kill that came after the
        # registration (but before it was recorded) finds its version instead of adding one.
        same_run = [v for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'") if v.source == source]
        mv = same_run[0] if same_run else c.create_model_version(name, source, run_id=run_id,
                                                                  tags={k: str(v) for k, v in tags.items()},
                                                                  description=(description or "")[:5000] or None)
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


# ----------------------------------------------------------------------------- MLflow Models


def pinned_requirements(quantized: bool = False) -> list[str]:
    """`package==version` of what this process runs, for the model's requirements.txt."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in SERVING_PACKAGES + (("torchao",) if quantized else ()):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def save_mlflow_model(checkpoint: str | Path, dest: str | Path, prompt: str = "Once upon a time",
                      quantized: bool = False) -> Path:
    """Write an MLflow Model directory at `dest` (must not exist): the models-from-code file, the
    checkpoint as artifact `fused_model`, signature (list[str] -> list[str] + params), input
    example, pinned requirements. Local only. MLflow runs the code file and, to check the
    signature against predict's type hints, loads the model once and predicts the input example
    (a failure there is only a warning to MLflow, silenced here; the tests load and serve it)."""
    import logging

    import mlflow
    from mlflow.models import infer_signature

    spec = _model_spec()
    params = dict(spec.DEFAULT_PARAMS)
    signature = infer_signature([prompt], [prompt + " ..."], params=params)
    level = logging.getLogger("mlflow").level
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # "Downloading artifacts" bars and env notes for a local copy
    try:
        mlflow.pyfunc.save_model(str(dest), python_model=str(MODEL_CODE), artifacts={spec.CHECKPOINT: str(checkpoint)},
                                 signature=signature, input_example=([prompt], params),
                                 pip_requirements=pinned_requirements(quantized))
    finally:
        logging.getLogger("mlflow").setLevel(level)
    return Path(dest)


def _model_spec():
    """The model file's constants, read without running its set_model() (AST of the literals)."""
    import ast
    import types

    tree = ast.parse(MODEL_CODE.read_text())
    found = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and t.id in ("CHECKPOINT", "DEFAULT_PARAMS")}
    return types.SimpleNamespace(**found)


def _listing(c, run_id: str, path: str) -> set[str]:
    return {Path(f.path).name for f in c.list_artifacts(run_id, path)}


def model_artifact_path(settings: PipelineSettings, run_id: str) -> str:
    """Where this run's MLflow Model is (or goes): FUSED_ARTIFACT, unless an older spon logged a
    bare checkpoint there (then REPUBLISHED_ARTIFACT)."""
    from spon.format import SIDECAR

    with _LOCK:
        names = _listing(client(settings), run_id, FUSED_ARTIFACT)
    return REPUBLISHED_ARTIFACT if SIDECAR in names and MLMODEL not in names else FUSED_ARTIFACT


def log_mlflow_model(settings: PipelineSettings, run_id: str, checkpoint: str | Path, artifact_path: str,
                     quantized: bool = False) -> str:
    """Log the checkpoint as an MLflow Model under the run's `artifact_path`; idempotent: MLmodel
    is logged last, so a path that has it holds a complete model and is left alone (a retry after
    a kill re-logs the rest, same content). Returns the model's artifact URI."""
    import shutil
    import tempfile

    with _LOCK:
        c = client(settings)
        if MLMODEL not in _listing(c, run_id, artifact_path):
            # Built beside the checkpoint (same filesystem), removed once uploaded.
            tmp = Path(tempfile.mkdtemp(prefix=".mlflow-model-", dir=Path(checkpoint).resolve().parent))
            try:
                # The artifact directory is named after its source: stage the checkpoint as
                # `fused_model` (hard links where the filesystem allows, else copies).
                staged = _stage(Path(checkpoint), tmp / _model_spec().CHECKPOINT)
                model_dir = save_mlflow_model(staged, tmp / "model", quantized=quantized)
                mlmodel = tmp / MLMODEL
                (model_dir / MLMODEL).rename(mlmodel)
                c.log_artifacts(run_id, str(model_dir), artifact_path)
                c.log_artifact(run_id, str(mlmodel), artifact_path)  # last: now the model exists
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return c.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path


def _stage(src: Path, dst: Path) -> Path:
    import os
    import shutil

    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f.resolve(), target)
        except OSError:
            shutil.copyfile(f, target)
    return dst


def is_mlflow_model(settings: PipelineSettings, mv) -> bool:
    """The model version's source is an MLflow Model (has MLmodel), not a bare checkpoint."""
    with _LOCK:
        c = client(settings)
        base = c.get_run(mv.run_id).info.artifact_uri.rstrip("/") + "/" if mv.run_id else None
        if base is None or not mv.source.startswith(base):
            return True  # not a run artifact of ours: nothing to say about it
        return MLMODEL in _listing(c, mv.run_id, mv.source[len(base):].strip("/"))


def require_mlflow_model(settings: PipelineSettings, models_uri: str):
    """The model version of models_uri if it is an MLflow Model; a one-line SponError naming the
    command that re-publishes it if an older spon registered it as bare artifacts."""
    from spon.errors import SponError

    mv = resolve_alias(settings, models_uri)
    if not is_mlflow_model(settings, mv):
        raise SponError(f"{models_uri} (version {mv.version} of {mv.name}) was registered by an older spon as bare "
                        f"safetensors artifacts, not an MLflow Model: re-publish it with `spon publish "
                        f"models:/{mv.name}/{mv.version} --tracking-uri {settings.resolved_tracking_uri()}`")
    return mv


def log_datasets(settings: PipelineSettings, run_id: str, datasets: list[dict]) -> None:
    """datasets: {name, digest, source (str), context ('calibration'/'evaluation'), profile (dict)}
    as the run's MLflow dataset inputs. Logging the same dataset twice is a no-op in MLflow."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    items = [DatasetInput(Dataset(name=d["name"], digest=d["digest"][:36], source_type="local",
                                  source=json.dumps({"uri": d["source"]}),
                                  profile=json.dumps(d.get("profile", {}), sort_keys=True)),
                          tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
    if items:
        with _LOCK:
            client(settings).log_inputs(run_id, datasets=items)


def describe(settings: PipelineSettings, name: str, version: str, description: str,
             tags: dict[str, str] | None = None) -> None:
    """Set a model version's description (its model card) and extra tags."""
    with _LOCK:
        c = client(settings)
        c.update_model_version(name, version, description=description[:5000])
        for k, v in (tags or {}).items():
            c.set_model_version_tag(name, version, k, str(v))
