"""What a flow leaves behind: summary.json (the method's schema plus tracking/store fields), the
fused checkpoint and thresholds under the run's out dir, and a markdown results artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from spon.config import RunConfig
from spon.runtime.refs import ModelRef, StageRef
from spon.runtime.workdir import link_tree
from spon.format import ALPHA_STAGE_FILE, DISTILL_FILE, SUMMARY_FILE, THRESHOLDS_FILE
from spon.stages import summarize
from spon.tasks import evalsuite

PPL_MODES = ("dense", "teal", "spon")


def collect(cfg: RunConfig, model: ModelRef, calib: StageRef, thresholds: StageRef, alpha: StageRef, fused: StageRef,
            ppl: StageRef, bench: StageRef | None, quant: StageRef | None = None,
            lm_eval: StageRef | None = None) -> tuple[dict, dict[str, str]]:
    """summary.json content (spon.stages.summarize) and the files to log as artifacts."""
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fused_dir = link_tree(Path(fused.dir), out / "fused")
    shutil.copyfile(Path(thresholds.dir) / THRESHOLDS_FILE, out / THRESHOLDS_FILE)
    stage_refs = (calib, thresholds, alpha, fused, ppl, bench, quant, lm_eval)
    walls = {r.stage: r.wall_s for r in stage_refs if r is not None}
    summary = summarize(cfg, model.source, calib.dir, thresholds.dir, alpha.dir, fused_dir, ppl.dir, walls)
    summary["model_digest"] = model.digest
    summary["stage_keys"] = {r.stage: r.key for r in stage_refs if r is not None}
    summary["stage_dirs"] = {r.stage: r.dir for r in stage_refs if r is not None}
    if quant is not None or lm_eval is not None:
        summary["eval_metrics"] = evalsuite.extra_metrics(quant, lm_eval)
    if bench is not None:
        summary["bench_dir"] = bench.dir
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    files = {"": str(out / SUMMARY_FILE), "thresholds": str(out / THRESHOLDS_FILE),
             "alpha": str(Path(alpha.dir) / ALPHA_STAGE_FILE), "distill": str(Path(alpha.dir) / DISTILL_FILE),
             "fused_model": str(fused_dir)}
    if bench is not None:
        files["bench"] = bench.dir
    files.update(evalsuite.extra_files(quant, lm_eval))
    return summary, files


def finish(cfg: RunConfig, summary: dict, run_id: str, published: dict, extra_markdown: str = "") -> dict:
    summary = {**summary, "mlflow_run_id": run_id, **published}
    (Path(cfg.out) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    create_markdown_artifact(markdown=results_table([summary]) + extra_markdown, key="spon-results", description="spon pipeline results")
    return summary


def fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def results_table(summaries: list[dict]) -> str:
    rows = ["| model | sparsity | realized | ppl dense | ppl TEAL | ppl SPON | gap closed | KL teal→spon | version | champion |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        p, kl = s.get("perplexity", {}), s.get("heldout_kl", {})
        rows.append(
            f"| {Path(str(s.get('model'))).name} | {s['sparsity']:.2f} | {fmt(s.get('realized_sparsity'))} | "
            + " | ".join(fmt(p.get(m)) for m in PPL_MODES)
            + f" | {fmt(s.get('gap_closed'), '.1%')} | {fmt(kl.get('teal'), '.4f')}→{fmt(kl.get('spon'), '.4f')}"
            + f" | {s.get('registered_model', '–')} v{s.get('version', '–')} | {'yes' if s.get('champion') else 'no'} |"
        )
    store = [f"- `{s['store_uri']}`" for s in summaries if s.get("store_uri")]
    return "## spon results\n\n" + "\n".join(rows) + ("\n\nStored models:\n" + "\n".join(store) if store else "") + "\n"


def sweep_plot(summaries: list[dict], path: Path) -> Path:
    """Perplexity vs sparsity for dense, TEAL and SPON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(summaries, key=lambda s: s["sparsity"])
    xs = [s["sparsity"] for s in pts]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, style in zip(PPL_MODES, ("k--", "o-", "s-")):
        ax.plot(xs, [s["perplexity"].get(m) for s in pts], style, label={"dense": "dense", "teal": "TEAL", "spon": "SPON"}[m])
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("perplexity")
    ax.set_title(Path(str(pts[0]["model"])).name if pts else "")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
