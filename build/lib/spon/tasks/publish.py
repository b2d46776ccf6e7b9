"""publish: store the fused model (manifest last), register it as a model version pointing to
the run's logged safetensors directory, alias it `candidate`, and move `champion` only when the
quality gate says it is better. Every step is idempotent, so a retry after a failure is safe."""

from __future__ import annotations

import logging

from prefect import task

from spon.runtime import store, tracking
from spon.tasks.policies import IO_RETRIES, UNCACHED
from spon.runtime.settings import PipelineSettings, registered_name
from spon.tasks.track import summary_metrics

log = logging.getLogger(__name__)


@task(name="publish", **UNCACHED, **IO_RETRIES)
def publish(fused_dir: str, run_id: str, summary: dict, settings: PipelineSettings) -> dict:
    name = registered_name(settings, summary["model"], summary["sparsity"], summary["protocol"])
    store_uri = store.push(fused_dir, settings.resolved_store(), name, run_id)
    gate_value = summary_metrics(summary).get(settings.gate_metric)
    tags = {"source_model": summary["model"], "sparsity": summary["sparsity"], "protocol": summary["protocol"],
            "store_uri": store_uri, "format": "safetensors+spon.json"}
    if gate_value is not None:
        tags[settings.gate_metric] = gate_value
    source = tracking.artifact_uri(settings, run_id, tracking.FUSED_ARTIFACT)
    version = tracking.register(settings, name, run_id, source, tags)
    refused = quality_refusal(summary)
    if refused:  # a SPON worse than its own TEAL is stored and registered (candidate), never champion
        log.warning("champion refused for %s v%s: %s", name, version, refused)
        promoted, previous = False, None
    else:
        promoted, previous = tracking.promote_if_better(settings, name, version, gate_value)
    tracking.set_tags(settings, run_id, {"store_uri": store_uri, "registered_model": f"models:/{name}/{version}",
                                         **({"champion_refused": refused} if refused else {})})
    return {"registered_model": name, "version": version, "store_uri": store_uri, "candidate_uri": f"models:/{name}@candidate",
            "champion": promoted, "gate": {"metric": settings.gate_metric, "value": gate_value, "previous_champion": previous,
                                           "refused": refused}}


def quality_refusal(summary: dict) -> str | None:
    """Why this result may not be champion, whatever the previous champion: SPON's perplexity is
    above its own TEAL's on an evaluation text (summary.quality_warnings), or SPON's held-out KL
    is above TEAL's (alpha selection makes that impossible unless the selection was bypassed)."""
    if summary.get("quality_warnings"):
        return "; ".join(summary["quality_warnings"])
    kl = summary.get("heldout_kl", {})
    if kl.get("spon") is not None and kl.get("teal") is not None and kl["spon"] > kl["teal"]:
        return f"held-out KL of SPON {kl['spon']:.4f} is above TEAL's {kl['teal']:.4f}"
    return None
