"""track_run: one MLflow run per pipeline — flattened config as params, perplexities, realized
sparsity, held-out KL, stage wall times and the KL curve as metrics, files as artifacts (all but
the fused model, which publish logs as an MLflow Model), and the calibration and evaluation
texts as the run's dataset inputs (name, digest, source: the lineage of the registered model).

It runs after the method has written everything locally, so a tracking outage loses nothing
that cannot be logged again later (`spon publish OUT_DIR`). The finished run's id is recorded in
the out dir with a digest of what was logged until publish has finished with it: a rerun of the
same result in between (e.g. after a kill between storing and registering the model) reuses that
run, so publish finds the copy already stored under its id instead of storing a second one. Once
published, a rerun is a new run, as every completed invocation is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from prefect import task

from spon.errors import SponError

from spon.runtime import tracking
from spon.tasks.policies import IO_RETRIES, UNCACHED
from spon.runtime.settings import PipelineSettings
from spon.runtime.workdir import write_json

log = logging.getLogger(__name__)
TRACKED_RUN = "tracked_run.json"
# Fields that differ between two runs of the same result, or are added after tracking.
_VOLATILE = ("wall_time_s", "mlflow_run_id", "registered_model", "version", "store_uri", "candidate_uri",
             "champion", "gate", "model_uri", "variants")


def result_digest(summary: dict) -> str:
    stable = {k: v for k, v in summary.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()


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
    record = _record(files)
    key = {"digest": result_digest(summary), "tracking_uri": str(settings.resolved_tracking_uri())}
    if record is not None and record.is_file():
        saved = json.loads(record.read_text())
        if ({k: saved.get(k) for k in key} == key and not saved.get("published")
                and tracking.run_finished(settings, saved["run_id"])):
            log.info("this result is already tracked as MLflow run %s (%s): reusing it", saved["run_id"], record)
            return saved["run_id"]
    try:
        run_id = tracking.start_run(settings, tracking.run_params(summary), run_name, parent_run_id, tags)
        tracking.log_metrics(settings, run_id, summary_metrics(summary), {"kl": summary.get("kl_history", [])})
        tracking.log_datasets(settings, run_id, run_datasets(summary))
        # The fused model is logged once, as an MLflow Model, by publish.
        tracking.log_artifacts(settings, run_id, {k: v for k, v in files.items() if k != tracking.FUSED_ARTIFACT})
        tracking.end_run(settings, run_id)
        if record is not None:
            _write_record(record, {**key, "run_id": run_id})
    except SponError:
        raise
    except Exception as e:  # server down, bad URI: the local result is complete and kept
        out = Path(files.get("", "summary.json")).parent
        raise SponError(f"MLflow tracking at {settings.resolved_tracking_uri()} failed ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); the local result in {out} is kept: "
                        f"re-log and publish it with `spon publish {out}`") from e
    return run_id


def run_datasets(summary: dict) -> list[dict]:
    """The run's inputs for MLflow: the calibration set (the token blocks the calibrate stage
    wrote, with how they were made) and each evaluation text (its sha256). Files no longer on this
    machine (a summary published elsewhere) are left out."""
    from spon.format import CALIBRATION_FILE

    from spon.runtime.workdir import sha256_file

    cfg = summary.get("config", {})
    out = []
    cal = cfg.get("calibration", {})
    cal_dir = summary.get("stage_dirs", {}).get("calibrate")
    if cal_dir and (Path(cal_dir) / CALIBRATION_FILE).is_file():
        path = Path(cal_dir) / CALIBRATION_FILE
        how = {"samples": f"samples of {summary.get('model')} (seed {cal.get('seed')}, temperature {cal.get('temperature')})",
               "text": ", ".join(map(str, cal.get("files", []))),
               "dataset": f"{cal.get('dataset')} {cal.get('dataset_config') or ''} split {cal.get('split')}".replace("  ", " ")}
        out.append({"name": f"calibration-{cal.get('source', 'samples')}", "digest": sha256_file(path), "source": str(path),
                    "context": "calibration",
                    "profile": {"made_from": how.get(cal.get("source", "samples"), str(cal.get("source"))),
                                **{k: cal.get(k) for k in ("num_blocks", "block_len", "heldout_blocks", "seed")},
                                "sha256": sha256_file(path)}})
    ev = cfg.get("eval", {})
    for f in ev.get("files", []):
        p = Path(f)
        if p.is_file():
            digest = sha256_file(p)
            out.append({"name": p.name, "digest": digest, "source": str(p.resolve()), "context": "evaluation",
                        "profile": {"bytes": p.stat().st_size, "sha256": digest, "window": ev.get("window"),
                                    "stride": ev.get("stride"), "max_tokens": ev.get("max_tokens")}})
    return out


def _record(files: dict[str, str]) -> Path | None:
    return Path(files[""]).parent / TRACKED_RUN if "" in files else None


def _write_record(record: Path, data: dict) -> None:
    write_json(record.with_suffix(".tmp"), data).replace(record)  # atomic: a kill leaves no half record


def mark_published(files: dict[str, str], run_id: str) -> None:
    """Close the tracked run's record: from now on a rerun is a new run."""
    record = _record(files)
    if record is not None and record.is_file():
        data = json.loads(record.read_text())
        if data.get("run_id") == run_id:
            _write_record(record, {**data, "published": True})
