"""track_run: one MLflow run per pipeline — flattened config as params, perplexities, realized
sparsity, held-out KL, stage wall times and the KL curve as metrics, files as artifacts.

It runs after the method has written everything locally, so a tracking outage loses nothing
that cannot be logged again later (`spon publish OUT_DIR`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from spon.errors import SponError

from tasks import tracking
from tasks.policies import IO_RETRIES, UNCACHED
from tasks.settings import PipelineSettings


def summary_metrics(summary: dict) -> dict[str, float]:
    m = {f"perplexity_{k}": v for k, v in summary.get("perplexity", {}).items()}
    m.update({f"heldout_kl_{k}": v for k, v in summary.get("heldout_kl", {}).items() if v == v})  # drop NaN
    m.update({f"wall_s_{k}": v for k, v in summary.get("wall_time_s", {}).items()})
    for k in ("realized_sparsity", "realized_sparsity_heldout_calibration", "gap_closed"):
        if summary.get(k) is not None:
            m[k] = summary[k]
    m.update(summary.get("eval_metrics", {}))  # optional quantize / lm-eval stages
    return m


@task(name="track_run", **UNCACHED, **IO_RETRIES)
def track_run(summary: dict, files: dict[str, str], settings: PipelineSettings, run_name: str,
              parent_run_id: str | None = None) -> str:
    """files: {artifact subdir ('' for the root): local file or directory}. Returns the run id."""
    tags = {"source_model": str(summary.get("model")), "sparsity": str(summary.get("sparsity")),
            "protocol": str(summary.get("protocol"))}
    try:
        run_id = tracking.start_run(settings, summary["config"], run_name, parent_run_id, tags)
        tracking.log_metrics(settings, run_id, summary_metrics(summary), {"kl": summary.get("kl_history", [])})
        tracking.log_artifacts(settings, run_id, files)
        tracking.end_run(settings, run_id)
    except SponError:
        raise
    except Exception as e:  # server down, bad URI: the local result is complete and kept
        out = Path(files.get("", "summary.json")).parent
        raise SponError(f"MLflow tracking at {settings.resolved_tracking_uri()} failed ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); the local result in {out} is kept: "
                        f"re-log and publish it with `spon publish {out}`") from e
    return run_id
