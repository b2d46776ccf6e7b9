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
import time
from pathlib import Path

from prefect import task

from tasks.policies import STAGE
from tasks.types import ModelRef, StageRef, TextFile
from tasks.workdir import atomic_dir, read_json, stage_dir, stage_key, write_json

QUANT_FILE = "quantize.json"


@task(name="quantize", **STAGE)
def quantize_fused(model: ModelRef, schemes: list[str], files: list[TextFile], window: int, stride: int,
                   device: str, work_dir: str) -> StageRef:
    from spon.fuse import load_sparse_model
    from spon.perplexity import perplexities
    from spon.quantize import quantize_model, quantized_weight_bytes, save_quantized

    t0 = time.perf_counter()
    final = stage_dir(work_dir, "quantize", stage_key(model.digest, sorted(schemes), files, window, stride, device))
    with atomic_dir(final) as tmp:
        out = {}
        for scheme in schemes:
            m, tok, _ = load_sparse_model(model.path, device)
            before = quantized_weight_bytes(m)
            info = quantize_model(m, scheme)
            info["weight_bytes"] = {"before": before, "after": quantized_weight_bytes(m)}
            if scheme != "nf4":  # nf4 is quantized on load, never saved (spon/quantize.py)
                save_quantized(m, tok, tmp / scheme, model.path, info)
            # perplexities: {file: {mode: {...}}}; the first eval file is the headline (as in spon.run)
            ppl = perplexities(m, tok, [files[0].path], ("spon",), window, stride)[files[0].path] if files else {}
            out[scheme] = {"info": info, "perplexity": {k: v["perplexity"] for k, v in ppl.items()}}
        write_json(tmp / QUANT_FILE, out)
    return StageRef(stage="quantize", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))


@task(name="lm_eval", **STAGE)
def lm_eval_suite(model: ModelRef, task_names: list[str], limit: float | None, quant: list[str],
                  fidelity: TextFile | None, device: str, work_dir: str) -> StageRef:
    from evaluation.suite import run_suite
    from evaluation.variants import parse_variants

    t0 = time.perf_counter()
    lim = None if limit is None else (int(limit) if limit >= 1 else limit)
    variants = parse_variants(",".join(["dense", "teal", "spon"] + [f"spon-{q}" for q in quant]))
    final = stage_dir(work_dir, "lm_eval", stage_key(model.digest, task_names, lim, quant, fidelity, device))
    with atomic_dir(final) as tmp:
        run_suite(model.path, variants, task_names, tmp, lim, device=device, bootstrap_iters=0,
                  fidelity_text=fidelity.path if fidelity else tmp / "no-fidelity-text")
        doc = read_json(tmp / "results.json")
        doc["outputs"] = {k: str(final / Path(p).name) for k, p in doc.get("outputs", {}).items()}
        write_json(tmp / "results.json", doc)
    return StageRef(stage="lm_eval", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))


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
