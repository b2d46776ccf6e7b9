"""TEAL's magnitude criterion against WINA's weighted one, each without and with spontaneous
neurons, on a real LLM: one table per sparsity level, then zero-shot accuracy for the best two.

    .venv/bin/python benchmarks/criteria.py --out out/real
    .venv/bin/python benchmarks/criteria.py --out out/real --reuse benchmarks/results/real_model_smollm2.json

Four methods per level, from two runs of the whole chain (benchmarks/real_model.py's rows, the
model's preset recipe under both, the same calibration text and the same evaluation text):

    TEAL        uniform-L in teal mode   drop x_i when |x_i| <= tau
    TEAL+SPON   uniform-L in spon mode   + alpha distilled on TEAL's masks, fused
    WINA        wina-L in teal mode      drop x_i when |x_i| * ||W[:, i]||_2 <= tau (arXiv 2505.19427)
    WINA+SPON   wina-L in spon mode      + alpha distilled on WINA's masks, fused

Perplexity on the first --eval-tokens tokens of wikitext-2-raw test (never seen by calibration,
which reads wikitext-2 validation) and the TinyStories sample; "gap closed" is the fraction of
TEAL's perplexity gap to dense that a method closes (TEAL 0 %, dense 100 %). Then lm-eval
zero-shot (the project's YAML tasks, first --zeroshot-limit items of each) for dense and the two
methods with the lowest wikitext-2 perplexity at each of --zeroshot-levels (default 50 %). JSON ->
OUT/criteria.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # real_model.py beside this file

import real_model  # noqa: E402
from real_model import TINYSTORIES, WIKITEXT_TEST, ZEROSHOT, gap, pick, reuse_files, run_row  # noqa: E402

from spon.assets import portable  # noqa: E402
from spon.console import configure  # noqa: E402

LEVELS = {"50": ("uniform-50", "wina-50"), "60": ("uniform-60", "wina-60")}
METHODS = (("TEAL", 0, "teal"), ("TEAL+SPON", 0, "spon"), ("WINA", 1, "teal"), ("WINA+SPON", 1, "spon"))


def level_table(level: str, rows: dict) -> list[dict]:
    """The four methods of one level: (name, row, mode) -> perplexities and gap closed."""
    wt, ts = portable(str(WIKITEXT_TEST)), portable(str(TINYSTORIES))
    teal_row = rows[LEVELS[level][0]]
    base_wt, base_ts = teal_row["perplexity_by_file"][wt], teal_row["perplexity_by_file"][ts]
    out = []
    for name, which, mode in METHODS:
        r = rows[LEVELS[level][which]]
        p_wt, p_ts = r["perplexity_by_file"][wt], r["perplexity_by_file"][ts]
        out.append({
            "method": name, "row": r["row"], "mode": mode, "criterion": r["config"]["sparsity"].get("criterion", "magnitude"),
            "wikitext2": p_wt[mode], "dense_wikitext2": p_wt["dense"],
            "gap_closed_wikitext2": gap(base_wt["teal"], p_wt[mode], base_wt["dense"]),
            # what alpha closes of its own sparsifier's gap (TEAL+SPON vs TEAL, WINA+SPON vs WINA)
            "own_gap_closed_wikitext2": gap(p_wt["teal"], p_wt["spon"], p_wt["dense"]) if mode == "spon" else None,
            "tinystories": p_ts[mode], "dense_tinystories": p_ts["dense"],
            "gap_closed_tinystories": gap(base_ts["teal"], p_ts[mode], base_ts["dense"]),
            "realized_sparsity_wikitext2": r["realized_sparsity_by_file"][wt],
            "heldout_kl": r["heldout_kl"]["teal" if mode == "teal" else "spon"],
            "quality_warnings": r["quality_warnings"] if mode == "spon" else [],
            "method_code": r.get("method_code"), "host": (r.get("host") or {}).get("cpu"),
        })
    return out


def print_level(level: str, methods: list[dict]) -> None:
    print(f"\n{level} % target sparsity, wikitext-2 test (dense {methods[0]['dense_wikitext2']:.2f}) and TinyStories "
          f"(dense {methods[0]['dense_tinystories']:.2f})\n")
    print("| method | realized | wikitext-2 ppl | gap closed (vs TEAL) | α closes of its sparsifier's gap "
          "| TinyStories ppl | gap closed | held-out KL |")
    print("|---|---|---|---|---|---|---|---|")
    best = min(m["wikitext2"] for m in methods)
    for m in methods:
        mark = "**" if m["wikitext2"] == best else ""
        own = "-" if m["own_gap_closed_wikitext2"] is None else f"{100 * m['own_gap_closed_wikitext2']:.1f}%"
        print(f"| {m['method']} | {m['realized_sparsity_wikitext2']:.3f} | {mark}{m['wikitext2']:.2f}{mark} "
              f"| {100 * m['gap_closed_wikitext2']:.1f}% "
              f"| {own} "
              f"| {m['tinystories']:.2f} | {100 * m['gap_closed_tinystories']:.1f}% "
              f"| {m['heldout_kl']:.4f} |")


def zeroshot(level: str, methods: list[dict], rows: dict, args) -> dict:
    """Dense and the two methods with the lowest wikitext-2 perplexity, on the same items."""
    from spon.evaluation.suite import run_suite
    from spon.evaluation.variants import parse_variants

    best = sorted(methods, key=lambda m: m["wikitext2"])[:2]
    result = {"limit": args.zeroshot_limit, "methods": {}}
    for i, m in enumerate(best):
        if not Path(rows[m["row"]]["fused"]).is_dir():  # only its numbers were reused: make its model
            rows[m["row"]] = run_row(m["row"], args, {}, {})
        fused = rows[m["row"]]["fused"]
        variants = ("dense," if i == 0 else "") + m["mode"]
        doc = run_suite(fused, parse_variants(variants), list(ZEROSHOT), Path(args.out) / "criteria-zeroshot" / m["row"],
                        args.zeroshot_limit, resume=True)
        for v, e in doc["variants"].items():
            name = "dense" if v == "dense" else m["method"]
            accs = {t: r["metrics"].get("acc,none") for t, r in e["tasks"].items()}
            result["methods"][name] = {"accuracy": accs, "average": sum(accs.values()) / len(accs),
                                       "realized_sparsity": {t: r.get("realized_sparsity") for t, r in e["tasks"].items()}}
    names = list(result["methods"])
    print(f"\nzero-shot accuracy at {level} % (first {args.zeroshot_limit} items per task)\n")
    print("| task | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for t in ZEROSHOT:
        print(f"| {t} | " + " | ".join(f"{result['methods'][n]['accuracy'][t]:.3f}" for n in names) + " |")
    print("| **average** | " + " | ".join(f"{result['methods'][n]['average']:.3f}" for n in names) + " |")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--levels", default=",".join(LEVELS), help="comma list of target sparsities in %%: "
                    + ", ".join(LEVELS))
    ap.add_argument("--config", default=None, help="RunConfig JSON/YAML under every row")
    ap.add_argument("--eval-tokens", type=int, default=25600)
    ap.add_argument("--zeroshot-limit", type=int, default=100, help="items per task (0: no zero-shot)")
    ap.add_argument("--zeroshot-levels", default="50", help="levels whose best two get zero-shot (comma list)")
    ap.add_argument("--reuse", default=None, help="earlier real_model.json / criteria.json files, comma separated: "
                    "their rows with the same config are taken instead of rerun")
    ap.add_argument("--out", default="out/real")
    args = ap.parse_args()
    levels = pick(args.levels, LEVELS, "level")
    reuse = reuse_files(args.reuse)
    configure(quiet=True)
    real_model.method_code()  # digest the method's code as imported (cached), not as edited later
    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    prior = {r["row"]: r for f in reuse for r in json.loads(f.read_text()).get("rows", [])}
    result: dict = {"model": args.model, "eval_tokens": args.eval_tokens, "levels": {}, "rows": []}
    path = Path(args.out) / "criteria.json"
    dump = lambda: path.write_text(json.dumps(portable(result), indent=2))  # noqa: E731
    calibrations: dict = {}
    rows: dict[str, dict] = {}
    for level in levels:
        for name in LEVELS[level]:
            rows[name] = run_row(name, args, calibrations, prior)
            result["rows"] = list(rows.values())
            dump()
        methods = level_table(level, rows)
        result["levels"][level] = {"methods": methods}
        print_level(level, methods)
        dump()
    for level in [lv for lv in args.zeroshot_levels.split(",") if lv in levels]:
        if args.zeroshot_limit:
            result["levels"][level]["zeroshot"] = zeroshot(level, result["levels"][level]["methods"], rows, args)
            dump()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    dump()
    print(f"\n{result['wall_s']:.0f}s -> {path}")


if __name__ == "__main__":
    main()
