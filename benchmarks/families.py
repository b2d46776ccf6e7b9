"""Both real model families side by side: SmolLM2-135M (Llama) and Gemma-3-270M at 40, 50 and 60 %.

    .venv/bin/python benchmarks/families.py                # takes the committed rows, runs what is missing
    .venv/bin/python benchmarks/families.py --rerun        # runs every row again (~15-25 min a row on 2 cores)

Each model goes through benchmarks/real_model.py (its preset recipe, uniform sparsity, all tokens
sparse), with `--reuse` of its committed results: a row whose config matches is taken as it is,
any other row is run. Then one table: per level and model, wikitext-2 test perplexity dense /
TEAL / SPON and the share of TEAL's gap SPON closes, TinyStories and held-out Python TEAL -> SPON,
realized sparsity, held-out KL, wall time and peak RSS; and per model the text each domain's
perplexity covers, in that model's tokens and in characters (the first 25,600 tokens of each
tokenizer are different spans of the same text). Then wikitext-2 test once more on the same text
for both models, its first --span-chars characters (>= 25,000 tokens of either tokenizer), dense /
TEAL / SPON of each level's fused checkpoint: a committed entry (benchmarks/results/
families_same_span.json) is taken when its row's config, method code and span match, anything else
is scored from the row's fused model. JSON -> OUT/families.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_model import DOMAINS, WIKITEXT_TEST, gap  # noqa: E402 -- the evaluation texts and the gap, as real_model.py spells them

from spon.assets import portable  # noqa: E402

RESULTS = HERE / "results"
# Each model's committed real_model.py results (what --reuse takes).
MODELS = {"smollm2-135m": RESULTS / "real_model_smollm2_own_tau.json",
          "gemma3-270m": RESULTS / "real_model_gemma3-270m.json"}
LEVELS = ("uniform-40", "uniform-50", "uniform-60")
# The issues' targets for the share of TEAL's wikitext gap that SPON closes, per model and level.
GAP_TARGETS = {"smollm2-135m": {"uniform-50": 0.50, "uniform-60": 0.75},
               "gemma3-270m": {"uniform-50": 0.40, "uniform-60": 0.50}}
# wikitext-2 test's first 110,000 characters: 27,272 SmolLM2 tokens, 26,288 Gemma-3 tokens (the
# issue asks for >= 25,000 of each model's tokens on the same text).
SPAN_CHARS = 110_000
SAME_SPAN = RESULTS / "families_same_span.json"


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
            # the row's high-water mark: a row that measured each stage's own records the last stage's as its peak
            lines.append(
                f"| {level} | {model} | {realized:.3f} | {w['dense']:.2f} / {w['teal']:.2f} / {mark(w)}{w['spon']:.2f}{mark(w)} "
                f"| {100 * closed(w):.1f}%" + (f" ({100 * target:.0f}%{' met' if closed(w) >= target else ' missed'})" if target else "")
                + f" | {t['teal']:.2f} -> {mark(t)}{t['spon']:.2f}{mark(t)} | {c['teal']:.2f} -> {mark(c)}{c['spon']:.2f}{mark(c)} "
                f"| {row['heldout_kl']['teal']:.3f} -> {row['heldout_kl']['spon']:.3f} | {row['wall_s_total']:.0f} "
                f"| {max([row['peak_rss_gb'] or 0, *(row.get('peak_rss_gb_by_stage') or {}).values()]):.1f} |")
    return "\n".join(lines)


def span_key(row: dict, chars: int) -> dict:
    """What a same-span entry depends on: the row as it was made (config and method code) and the span."""
    return portable({"config": row["config"], "method_code": row["method_code"], "characters": chars})


def score_same_span(row: dict, chars: int, threads: int | None) -> dict:
    """dense / TEAL / SPON perplexity of the row's fused model on wikitext-2 test's first `chars` characters."""
    import torch

    from spon.fuse import load_sparse_model
    from spon.perplexity import perplexities

    if threads:
        torch.set_num_threads(threads)
    model, tok, _ = load_sparse_model(row["fused"])
    ev = row["eval"]
    res = perplexities(model, tok, [str(WIKITEXT_TEST)], ("dense", "teal", "spon"), ev["window"], ev["stride"],
                       max_chars=chars)
    return next(iter(res.values()))


def same_span(results: dict[str, dict], args) -> dict:
    """{model: {level: {"key", "perplexity": {mode: {...}}}}}, committed entries reused when their key matches."""
    committed = json.loads(Path(args.span_results).read_text()) if Path(args.span_results).is_file() else {}
    out: dict = {}
    for model, res in results.items():
        for row in (r for r in res["rows"] if r["row"] in LEVELS):
            key = span_key(row, args.span_chars)
            prior = committed.get(model, {}).get(row["row"])
            if prior and prior["key"] == key and not args.rerun:
                out.setdefault(model, {})[row["row"]] = prior
                continue
            if not Path(row["fused"]).is_dir():
                raise SystemExit(f"{model} {row['row']}: no committed same-span entry for this row and no fused model at "
                                 f"{row['fused']}; run with --rerun to make the rows again")
            print(f"  {model} {row['row']}: scoring the first {args.span_chars:,} characters of wikitext-2 test", flush=True)
            out.setdefault(model, {})[row["row"]] = {"key": key, "perplexity": score_same_span(row, args.span_chars,
                                                                                                 args.threads)}
    Path(args.span_results).write_text(json.dumps(portable(out), indent=2))
    return out


def same_span_table(span: dict, chars: int) -> str:
    lines = [f"wikitext-2 test, the same first {chars:,} characters for both models:", "",
             "| level | model | tokens | realized TEAL / SPON | dense / TEAL / SPON | gap closed |", "|---" * 6 + "|"]
    for level in LEVELS:
        for model, per in span.items():
            if level not in per:
                continue
            p = per[level]["perplexity"]
            ppl = {m: v["perplexity"] for m, v in p.items()}
            lines.append(f"| {level} | {model} | {p['dense']['tokens']:,} | {p['teal']['realized_sparsity']:.3f} / "
                         f"{p['spon']['realized_sparsity']:.3f} | {ppl['dense']:.2f} / {ppl['teal']:.2f} / {ppl['spon']:.2f} "
                         f"| {100 * closed(ppl):.1f}% |")
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
    ap.add_argument("--span-chars", type=int, default=SPAN_CHARS,
                    help="wikitext-2 test characters scored for both models (the same text)")
    ap.add_argument("--span-results", default=str(SAME_SPAN), help="same-span entries: read, completed, written back")
    args = ap.parse_args()
    results = {m: run_model(m, args) for m in MODELS}
    print("\nText each perplexity covers (the first 25,600 tokens of each model's tokenizer; TinyStories whole):")
    print(spans(results))
    print("\n" + table(results) + "\n\n** SPON above TEAL on that text")
    span = same_span(results, args)
    print("\n" + same_span_table(span, args.span_chars))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "families.json").write_text(json.dumps(
        {"levels": list(LEVELS), "gap_targets": GAP_TARGETS, "models": results,
         "same_span": {"characters": args.span_chars, "text": portable(str(WIKITEXT_TEST)), "models": span}}, indent=2))
    print(f"-> {Path(args.out) / 'families.json'}")


if __name__ == "__main__":
    main()
