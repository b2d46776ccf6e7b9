"""Both real model families side by side: SmolLM2-135M (Llama) and Gemma-3-270M at 40, 50 and 60 %.

    .venv/bin/python benchmarks/families.py                # takes the committed rows, runs what is missing
    .venv/bin/python benchmarks/families.py --rerun        # runs every row again (~15-25 min a row on 2 cores)

Each model goes through benchmarks/real_model.py (its preset recipe, uniform sparsity, all tokens
sparse), with `--reuse` of its committed results: a row whose config matches is taken as it is,
any other row is run. Then one table: per level and model, wikitext-2 test perplexity dense /
TEAL / SPON and the share of TEAL's gap SPON closes, TinyStories and held-out Python TEAL -> SPON,
realized sparsity, held-out KL, wall time and peak RSS; and per model the text each domain's
perplexity covers, in that model's tokens and in characters (the first 25,600 tokens of each
tokenizer are different spans of the same text). JSON -> OUT/families.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_model import DOMAINS, gap  # noqa: E402 -- the evaluation texts and the gap, as real_model.py spells them

from spon.assets import portable  # noqa: E402

RESULTS = HERE / "results"
# Each model's committed real_model.py results (what --reuse takes).
MODELS = {"smollm2-135m": RESULTS / "real_model_smollm2_own_tau.json",
          "gemma3-270m": RESULTS / "real_model_gemma3-270m.json"}
LEVELS = ("uniform-40", "uniform-50", "uniform-60")
# The issues' targets for the share of TEAL's wikitext gap that SPON closes, per model and level.
GAP_TARGETS = {"smollm2-135m": {"uniform-50": 0.50, "uniform-60": 0.75},
               "gemma3-270m": {"uniform-50": 0.40, "uniform-60": 0.50}}


def run_model(model: str, args) -> dict:
    out = Path(args.out) / model
    cmd = [sys.executable, str(HERE / "real_model.py"), "--model", model, "--rows", ",".join(LEVELS),
           "--out", str(out)]
    if MODELS[model].is_file() and not args.rerun:
        cmd += ["--reuse", str(MODELS[model])]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "real_model.json").read_text())


def closed(p: dict) -> float:
    return gap(p["teal"], p["spon"], p["dense"])


def table(results: dict[str, dict]) -> str:
    head = ("| level | model | realized (wikitext) | wikitext-2 dense / TEAL / SPON | gap closed (target) "
            "| TinyStories TEAL -> SPON | Python TEAL -> SPON | held-out KL TEAL -> SPON | wall s | peak RSS GB |")
    lines = [head, "|---" * 10 + "|"]
    for level in LEVELS:
        for model, res in results.items():
            row = next((r for r in res["rows"] if r["row"] == level), None)
            if row is None:
                lines.append(f"| {level} | {model} | not run |" + " |" * 7)
                continue
            w, t, c = (row["perplexity_by_file"][portable(f)] for f in DOMAINS.values())
            target = GAP_TARGETS[model].get(level)
            realized = row["realized_sparsity_by_file"][portable(DOMAINS["wikitext-2 test"])]
            mark = lambda p: "**" if p["spon"] > p["teal"] else ""  # noqa: E731 -- SPON worse than TEAL
            lines.append(
                f"| {level} | {model} | {realized:.3f} | {w['dense']:.2f} / {w['teal']:.2f} / {mark(w)}{w['spon']:.2f}{mark(w)} "
                f"| {100 * closed(w):.1f}%" + (f" ({100 * target:.0f}%{' met' if closed(w) >= target else ' missed'})" if target else "")
                + f" | {t['teal']:.2f} -> {mark(t)}{t['spon']:.2f}{mark(t)} | {c['teal']:.2f} -> {mark(c)}{c['spon']:.2f}{mark(c)} "
                f"| {row['heldout_kl']['teal']:.3f} -> {row['heldout_kl']['spon']:.3f} | {row['wall_s_total']:.0f} "
                f"| {row['peak_rss_gb'] or 0:.1f} |")
    return "\n".join(lines)


def spans(results: dict[str, dict]) -> str:
    lines = []
    for model, res in results.items():
        span = res.get("eval_span", {})
        lines.append(f"{model}: " + "; ".join(f"{d} {v['tokens']:,} tokens = {v['characters']:,} characters"
                                             for d, v in span.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/families")
    ap.add_argument("--rerun", action="store_true", help="run every row, ignoring the committed results")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    results = {m: run_model(m, args) for m in MODELS}
    print("\nText each perplexity covers (the first 25,600 tokens of each model's tokenizer; TinyStories whole):")
    print(spans(results))
    print("\n" + table(results) + "\n\n** SPON above TEAL on that text")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "families.json").write_text(json.dumps(
        {"levels": list(LEVELS), "gap_targets": GAP_TARGETS, "models": results}, indent=2))
    print(f"-> {Path(args.out) / 'families.json'}")


if __name__ == "__main__":
    main()
