"""Dense / TEAL / SPON perplexity per sparsity level, side by side in one run.

    .venv/bin/python benchmarks/perplexity_table.py --sparsities 0.25,0.4,0.5,0.6 --out out/table

Runs the method in-process (spon.stages.run, no Prefect/MLflow) with the default configuration
(calibration on 512 self-sampled blocks of 128 tokens, 600 alpha steps), evaluates on the
TinyStories sample, and prints a markdown table plus the wall and CPU time of each level.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from spon.assets import assets_root, portable
from spon.config import load_config
from spon.console import configure
from spon.stages import run

SAMPLE = assets_root() / "data" / "tinystories" / "sample.txt"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--criterion", default="magnitude", help="magnitude (TEAL) or weighted (WINA)")
    ap.add_argument("--eval-text", action="append", default=None)
    ap.add_argument("--out", default="out/table")
    ap.add_argument("--config", default=None, help="RunConfig JSON/YAML applied to every level")
    args = ap.parse_args()
    configure(quiet=True)  # the table, not the libraries' progress bars
    files = args.eval_text or [str(SAMPLE)]
    rows = []
    for s in (float(x) for x in args.sparsities.split(",")):
        cfg = load_config(args.config, {"sparsity.sparsity": s, "sparsity.allocation": args.allocation,
                                        "sparsity.criterion": args.criterion,
                                        "eval.files": files, "out": f"{args.out}/s{int(round(s * 100))}"})
        wall, cpu = time.perf_counter(), cpu_seconds()
        summary = run(cfg, progress=False)
        rows.append((s, summary, time.perf_counter() - wall, cpu_seconds() - cpu))
    print(f"\nperplexity on {', '.join(files)} (protocol: all tokens sparse; allocation: {args.allocation}; "
          f"criterion: {args.criterion})\n")
    print("| target | realized | dense | TEAL | SPON | gap closed | held-out KL TEAL -> SPON | alpha selected | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, r, wall, cpu in rows:
        p, kl = r["perplexity"], r["heldout_kl"]
        step = r["alpha_selection"]["selected_step"]
        print(f"| {s:.2f} | {r['realized_sparsity']:.3f} | {p['dense']:.3f} | {p['teal']:.3f} | {p['spon']:.3f} "
              f"| {100 * r['gap_closed']:.1f}% | {kl['teal']:.4f} -> {kl['spon']:.4f} "
              f"| {'zeros' if step is None else f'step {step}'} | {wall:.0f} | {cpu:.0f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.json").write_text(json.dumps(portable([{"sparsity": s, "summary": {k: r[k] for k in (
        "criterion", "host", "realized_sparsity", "perplexity", "gap_closed", "heldout_kl", "alpha_selection", "quality_warnings",
        "wall_time_s")}, "wall_s": w, "cpu_s": c}
        for s, r, w, c in rows]), indent=2))


if __name__ == "__main__":
    main()
