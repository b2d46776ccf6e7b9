"""Optional evaluation stages over evaluation/ and spon/quantize.py, off unless asked for
(PipelineSettings.quantize / lm_eval_tasks; `spon run --quantize int8 --lm-eval-tasks arc_easy`).

- quantize_fused: weight-only quantization of the fused model per scheme, saved (safetensors) and
  scored on the eval text in spon mode -> quantize.json.
- lm_eval_suite: evaluation.suite.run_suite over dense/teal/spon (+ spon-QUANT per scheme) on the
  requested lm-eval tasks -> results.json + report.md + charts.
Both are cached stages like the others: keyed on the fused model's content and their options.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from prefect import task

from spon import stages
from spon.config import EvalConfig
from spon.runtime.refs import ModelRef, StageRef, TextFile
from spon.runtime.workdir import read_json, stage_dir, write_json
from spon.format import QUANT_FILE

from .policies import run_stage, stage


@task(**stage("quantize"))
def quantize_fused(model: ModelRef, schemes: list[str], cfg: EvalConfig, files: list[TextFile], device: str,
                   work_dir: str) -> StageRef:
    return run_stage("quantize", locals(), lambda out, key: stages.quantize(
        model.path, schemes, cfg.model_copy(update={"files": [f.path for f in files]}), device, out))


@task(**stage("lm_eval"))
def lm_eval_suite(model: ModelRef, task_names: list[str], limit: float | None, quant: list[str],
                  fidelity: TextFile | None, device: str, work_dir: str) -> StageRef:
    inputs = dict(locals())  # the parameters only: what the cache key covers
    from spon.evaluation.suite import run_suite
    from spon.evaluation.variants import parse_variants

    lim = None if limit is None else (int(limit) if limit >= 1 else limit)
    variants = parse_variants(",".join(["dense", "teal", "spon"] + [f"spon-{q}" for q in quant]))

    def body(tmp: Path, key: str) -> None:
        run_suite(model.path, variants, task_names, tmp, lim, device=device, bootstrap_iters=0,
                  fidelity_text=fidelity.path if fidelity else tmp / "no-fidelity-text")
        final = stage_dir(work_dir, "lm_eval", key)
        doc = read_json(tmp / "results.json")
        doc["outputs"] = {k: str(final / Path(p).name) for k, p in doc.get("outputs", {}).items()}
        write_json(tmp / "results.json", doc)

    return run_stage("lm_eval", inputs, body)


def _name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def extra_metrics(quant: StageRef | None, lm_eval: StageRef | None) -> dict[str, float]:
    """Flat MLflow metrics: quant_<scheme>_perplexity_spon, quant_<scheme>_weight_bytes,
    lmeval_<variant>_<task>_<metric> (stderr dropped), lmeval_<variant>_fidelity_<key>."""
    m: dict[str, float] = {}
    if quant is not None:
        for scheme, r in read_json(Path(quant.dir) / QUANT_FILE).items():
            if "spon" in r["perplexity"]:
                m[f"quant_{scheme}_perplexity_spon"] = r["perplexity"]["spon"]
            m[f"quant_{scheme}_weight_bytes"] = r["info"]["weight_bytes"]["after"]
    if lm_eval is not None:
        doc = read_json(Path(lm_eval.dir) / "results.json")
        for variant, v in doc["variants"].items():
            for t, r in v["tasks"].items():
                for k, val in r["metrics"].items():
                    if "_stderr" not in k and isinstance(val, (int, float)) and math.isfinite(val):
                        m[_name(f"lmeval_{variant}_{t}_{k.replace(',none', '')}")] = float(val)
            for k, val in (v.get("fidelity") or {}).items():
                if isinstance(val, (int, float)) and math.isfinite(val):
                    m[_name(f"lmeval_{variant}_fidelity_{k}")] = float(val)
    return m


def extra_files(quant: StageRef | None, lm_eval: StageRef | None) -> dict[str, str]:
    files = {}
    if quant is not None:
        files["quantize"] = str(Path(quant.dir) / QUANT_FILE)
    if lm_eval is not None:
        files["lm_eval"] = lm_eval.dir  # results.json, report.md, charts, variants/
    return files


def markdown(quant: StageRef | None, lm_eval: StageRef | None) -> str:
    out = ""
    if quant is not None:
        out += "\n## quantization (spon mode)\n\n| scheme | ppl SPON | weight bytes |\n|---|---|---|\n"
        for scheme, r in read_json(Path(quant.dir) / QUANT_FILE).items():
            p = r["perplexity"].get("spon")
            out += f"| {scheme} | {'–' if p is None else f'{p:.3f}'} | {r['info']['weight_bytes']['after']} |\n"
    if lm_eval is not None:
        out += "\n" + (Path(lm_eval.dir) / "report.md").read_text()
    return out
