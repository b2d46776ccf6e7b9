"""evaluate_registered: pull a registered version by alias and re-evaluate it; fails when its
perplexity drifted from the value recorded at registration (a check a schedule can run)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from spon.config import EvalConfig
from spon.errors import SponError

from spon.runtime import tracking

from spon.tasks import evaluate, fetch_model
from spon.format import EVAL_FILE
from spon.runtime.settings import PipelineSettings
from spon.runtime.workdir import read_json, text_files

DEFAULT_TEXT = "../shared/assets/data/tinystories/sample.txt"


@flow(name="evaluate_registered")
def evaluate_registered(model_uri: str = "models:/spon-stories260K-s50-all@champion", eval_config: EvalConfig | None = None,
                        tolerance: float = 0.01, work_dir: str = "out/regression",
                        settings: PipelineSettings | None = None) -> dict:
    """tolerance: allowed relative change of the gate metric (the eval text must be the one the
    version was registered with, as in the default deployment)."""
    settings = settings or PipelineSettings()
    ev = eval_config or EvalConfig(files=[DEFAULT_TEXT])
    work = str(Path(work_dir).resolve())
    model = fetch_model(model_uri, work, settings)
    ppl = read_json(Path(evaluate(model, ev, text_files(ev.files), "cpu", "fp32", work).dir) / EVAL_FILE)
    now = next(iter(ppl.values()))["spon"]["perplexity"] if ppl else None

    version = tracking.resolve_alias(settings, model_uri)
    recorded = float(version.tags[settings.gate_metric]) if settings.gate_metric in (version.tags or {}) else None
    drift = None if (now is None or recorded is None) else (now - recorded) / recorded
    result = {"model_uri": model_uri, "version": version.version, "perplexity_spon": now,
              "recorded": recorded, "relative_change": drift, "tolerance": tolerance}
    create_markdown_artifact(key="spon-regression", markdown=(
        f"## Regression check {model_uri} (v{version.version})\n\n| recorded | now | change | tolerance |\n|---|---|---|---|\n"
        f"| {recorded} | {now} | {drift if drift is None else f'{drift:+.3%}'} | {tolerance:.1%} |\n"))
    if drift is not None and drift > tolerance:
        raise SponError(f"{model_uri}: SPON perplexity {now:.4f} is {drift:+.2%} off the recorded {recorded:.4f}")
    return result
