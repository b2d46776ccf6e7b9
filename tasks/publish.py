"""publish: store the fused model (manifest last), log it to the run as an MLflow Model (pyfunc
from code: runtime/mlflow_model.py, the checkpoint as its artifact), register that as a model
version whose description is the model card, alias it `candidate`, and move `champion` only when
the quality gate says it is better. Quantized variants the evaluation saved (`--quantize
int8,int4`) are stored, logged and registered the same way as `<name>-int8` / `<name>-int4`.
Every step is idempotent, so a retry after a failure is safe."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from spon.runtime import store, tracking
from spon.tasks.policies import IO_RETRIES, UNCACHED
from spon.runtime.settings import PipelineSettings, registered_name
from spon.tasks.track import summary_metrics

log = logging.getLogger(__name__)
SAVED_SCHEMES = ("int8", "int4")  # what the quantize stage saves (nf4 is quantized on load, never saved)


@task(name="publish", **UNCACHED, **IO_RETRIES)
def publish(fused_dir: str, run_id: str, summary: dict, settings: PipelineSettings) -> dict:
    name = registered_name(settings, summary["model"], summary["sparsity"], summary["protocol"])
    store_uri = store.push(fused_dir, settings.resolved_store(), name, run_id)
    gate_value = summary_metrics(summary).get(settings.gate_metric)
    refused = quality_refusal(summary)
    version, promoted, previous = register_model(settings, name, run_id, fused_dir, summary, store_uri, gate_value, refused)
    tracking.set_tags(settings, run_id, {"store_uri": store_uri, "registered_model": f"models:/{name}/{version}",
                                         **({"champion_refused": refused} if refused else {})})
    variants = {scheme: publish_variant(settings, name, scheme, qdir, run_id, summary, refused)
                for scheme, qdir in quantized_dirs(summary).items()}
    return {"registered_model": name, "version": version, "store_uri": store_uri, "candidate_uri": f"models:/{name}@candidate",
            "model_uri": f"models:/{name}/{version}",
            "champion": promoted, "gate": {"metric": settings.gate_metric, "value": gate_value, "previous_champion": previous,
                                           "refused": refused},
            **({"variants": variants} if variants else {})}


def register_model(settings: PipelineSettings, name: str, run_id: str, checkpoint: str, summary: dict, store_uri: str,
                   gate_value: float | None, refused: str | None, scheme: str | None = None) -> tuple[str, bool, float | None]:
    """Log `checkpoint` as the run's MLflow Model, register it, describe it, gate `champion`."""
    artifact = tracking.model_artifact_path(settings, run_id)
    if scheme:
        artifact = f"{artifact}-{scheme}"
    source = tracking.log_mlflow_model(settings, run_id, checkpoint, artifact, quantized=scheme is not None)
    tags = {"source_model": summary["model"], "sparsity": summary["sparsity"], "protocol": summary["protocol"],
            "store_uri": store_uri, "format": "mlflow-pyfunc(models-from-code)+safetensors+spon.json",
            **({"quantization": scheme} if scheme else {})}
    if gate_value is not None:
        tags[settings.gate_metric] = gate_value
    card = model_card(summary, name, run_id, store_uri, refused, scheme)
    version = tracking.register(settings, name, run_id, source, tags)
    tracking.describe(settings, name, version, card.replace("{version}", version),
                      {"champion_refused": refused} if refused else None)
    if refused:  # a SPON worse than its own TEAL is stored and registered (candidate), never champion
        log.warning("champion refused for %s v%s: %s", name, version, refused)
        return version, False, None
    promoted, previous = tracking.promote_if_better(settings, name, version, gate_value)
    if not promoted:
        warn_if_champion_not_servable(settings, name)
    return version, promoted, previous


def warn_if_champion_not_servable(settings: PipelineSettings, name: str) -> None:
    """The champion this run did not beat may be a version an older spon registered as bare
    artifacts, which `mlflow models serve` cannot serve: say so, with the command that fixes it."""
    from spon.errors import SponError

    try:
        tracking.require_mlflow_model(settings, f"models:/{name}@champion")
    except SponError as e:
        if "older spon" in str(e):
            log.warning("%s", e)


def quantized_dirs(summary: dict) -> dict[str, str]:
    """{scheme: directory} of the quantized checkpoints the quantize stage saved for this run."""
    from spon.quantize import QUANT_META

    qdir = summary.get("stage_dirs", {}).get("quantize")
    if not qdir:
        return {}
    return {s: str(Path(qdir) / s) for s in SAVED_SCHEMES if (Path(qdir) / s / QUANT_META).is_file()}


def publish_variant(settings: PipelineSettings, name: str, scheme: str, qdir: str, run_id: str, summary: dict,
                    refused: str | None) -> dict:
    """`<name>-<scheme>`: its own registry entry (its champion is gated on its own quantized SPON
    perplexity, like with like), refused champion whenever the fp model is."""
    qname = f"{name}-{scheme}"
    store_uri = store.push(qdir, settings.resolved_store(), qname, run_id)
    value = summary.get("eval_metrics", {}).get(f"quant_{scheme}_perplexity_spon")
    version, promoted, _ = register_model(settings, qname, run_id, qdir, summary, store_uri, value, refused, scheme)
    return {"registered_model": qname, "version": version, "store_uri": store_uri, "champion": promoted}


def _f(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def model_card(summary: dict, name: str, run_id: str, store_uri: str, refused: str | None, scheme: str | None = None) -> str:
    """The model version's description (markdown): what it is, its numbers, its warnings, its
    lineage and how to load it. `{version}` is filled in once the version number is known."""
    p, kl = summary.get("perplexity", {}), summary.get("heldout_kl", {})
    em = summary.get("eval_metrics", {})
    cfg = summary.get("config", {})
    lines = [f"# {name} v{{version}}", "",
             f"TEAL activation sparsity + spontaneous neurons (SPON) on `{summary.get('model')}`"
             f"{f', weights quantized {scheme} (torchao), still sparse' if scheme else ''}: "
             f"criterion {summary.get('criterion', 'magnitude')}, protocol {summary.get('protocol')}.", "",
             "| | |", "|---|---|",
             f"| target sparsity | {_f(summary.get('sparsity'), '.2f')} |",
             f"| realized sparsity (eval text) | {_f(summary.get('realized_sparsity'))} |",
             f"| perplexity dense / TEAL / SPON | {_f(p.get('dense'))} / {_f(p.get('teal'))} / {_f(p.get('spon'))} |",
             f"| gap closed by SPON | {_f(summary.get('gap_closed'), '.1%')} |",
             f"| held-out KL TEAL → SPON | {_f(kl.get('teal'), '.4f')} → {_f(kl.get('spon'), '.4f')} |"]
    if scheme:
        lines += [f"| perplexity SPON {scheme} | {_f(em.get(f'quant_{scheme}_perplexity_spon'))} |",
                  f"| projection weight bytes {scheme} | {_f(em.get(f'quant_{scheme}_weight_bytes'), '.0f')} |"]
    warnings = summary.get("quality_warnings") or []
    lines += ["", "Quality warnings: " + ("; ".join(warnings) if warnings else "none.")]
    if refused:
        lines += ["", f"**Champion refused**: {refused}. This version is registered (`candidate`) but never becomes `champion`."]
    evals = ", ".join(Path(f).name for f in cfg.get("eval", {}).get("files", [])) or "none"
    lines += ["", f"Lineage: MLflow run `{run_id}` (its dataset inputs: calibration "
              f"{cfg.get('calibration', {}).get('source', '?')}, evaluation {evals}); stored copy `{store_uri}` "
              "(manifest with every file's sha256).", "",
              f"Load: `mlflow.pyfunc.load_model(\"models:/{name}/{{version}}\").predict([\"Once upon a time\"])` "
              "(needs `mlflow` and the spon wheel). Serve: "
              f"`mlflow models serve -m models:/{name}/{{version}} --env-manager local`."]
    return "\n".join(lines)


def republish(settings: PipelineSettings, models_uri: str) -> dict:
    """A version an older spon registered as bare artifacts, made an MLflow Model: its stored copy
    is pulled (checksums verified), logged to its own run as an MLflow Model and registered as a
    new version of the same run; the aliases the old version held move to the new one."""
    import json
    import shutil
    import tempfile

    from mlflow import MlflowClient

    from spon.errors import SponError

    mv = tracking.resolve_alias(settings, models_uri)
    if tracking.is_mlflow_model(settings, mv):
        return {"registered_model": mv.name, "version": str(mv.version), "model_uri": f"models:/{mv.name}/{mv.version}",
                "republished": False}
    store_uri = mv.tags.get("store_uri")
    if not store_uri:
        raise SponError(f"{models_uri} has no store_uri tag: nothing to re-publish it from")
    c = MlflowClient(settings.resolved_tracking_uri(), settings.resolved_tracking_uri())
    tmp = Path(tempfile.mkdtemp(prefix="spon-republish-"))
    try:
        ckpt = store.pull(store_uri, tmp / "fused")
        summary = json.loads(Path(c.download_artifacts(mv.run_id, "summary.json", str(tmp))).read_text())
        refused = quality_refusal(summary)
        gate = summary_metrics(summary).get(settings.gate_metric)
        version, _, _ = register_model(settings, mv.name, mv.run_id, str(ckpt), summary, store_uri, gate, refused)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for alias in mv.aliases:
        c.set_registered_model_alias(mv.name, alias, version)
    c.set_model_version_tag(mv.name, mv.version, "republished_as", version)
    return {"registered_model": mv.name, "version": version, "model_uri": f"models:/{mv.name}/{version}",
            "republished": True, "from_version": str(mv.version), "aliases": list(mv.aliases)}


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
