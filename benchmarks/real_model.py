"""The method on a real LLM, every table side by side from one command.

    .venv/bin/python benchmarks/real_model.py --out out/real
    .venv/bin/python benchmarks/real_model.py --out out/real --rows uniform-60   # one step
    .venv/bin/python benchmarks/real_model.py --out out/real --reuse benchmarks/results/real_model_smollm2.json
        # takes the committed rows with the same config, runs the rest (a session's worth at a time);
        # --reuse A,B: rows of several earlier runs, a later file's row winning

Model: `--model` (default the named SmolLM2-135M-Instruct, fetched and dequantized by spon itself)
with its preset recipe (spon/presets.py) under every row. Perplexity: the first `--eval-tokens`
tokens of wikitext-2-raw test (window 512, no overlap, BOS first: the same text for every row),
the TinyStories sample and the first `--eval-tokens` tokens of the held-out Python standard-library
modules (corpus:python-stdlib-heldout; spon.corpora): three domains, none of them calibration text.
The per-domain table marks every level where SPON is above TEAL. Rows:

    uniform-25/40/50/60   all seven projections sparse, alpha on all seven
    greedy-50             TEAL's block-wise greedy allocation
    last_half-50          TEAL's prefill protocol (first half of each window dense)
    down-only-50          sparse everywhere, alpha trained on down_proj only (the paper's ablation)
    samples-calib-50      calibration on the model's own samples instead of wikitext-2 validation text
then SPON int8 / int4 of uniform-50 against TEAL fp32, and zero-shot accuracy (lm-eval, the
project's YAML tasks, sparsity active) for dense / TEAL / SPON of uniform-50 on the first
`--zeroshot-limit` items of each task (the same items for every variant), SPON - TEAL and TEAL -
dense with 95 % paired-bootstrap intervals (benchmarks/zeroshot.py). `--rows` names the
steps and their order (default: STEPS, what the targets need soonest first).

Every stage runs through spon.stages (the functions `spon run` runs); the calibration of one
source is made once and shared by the rows that use it. Per row: the stage wall times and the
process's peak RSS so far. JSON -> OUT/real_model.json (commit it under benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from spon import stages
from spon.assets import assets_root, portable
from spon.config import load_config
from spon.model import host
from spon.console import configure
from zeroshot import paired_report, paired_suite  # benchmarks/zeroshot.py, beside this script

DATA = assets_root() / "data"
WIKITEXT_TEST = DATA / "wikitext-2-raw" / "test.txt"
TINYSTORIES = DATA / "tinystories" / "sample.txt"
PYTHON_CODE = "corpus:python-stdlib-heldout"  # standard-library modules no calibration sees (spon.corpora)
DOMAINS = {"wikitext-2 test": str(WIKITEXT_TEST), "TinyStories": str(TINYSTORIES), "Python code (held out)": PYTHON_CODE}
ZEROSHOT = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada")
SAMPLES_CALIBRATION = {"calibration.source": "samples", "calibration.files": []}

ROWS: dict[str, dict] = {
    "uniform-50": {"sparsity.sparsity": 0.50},
    "uniform-60": {"sparsity.sparsity": 0.60},
    "uniform-25": {"sparsity.sparsity": 0.25},
    "uniform-40": {"sparsity.sparsity": 0.40},
    "greedy-50": {"sparsity.sparsity": 0.50, "sparsity.allocation": "greedy"},
    "last_half-50": {"sparsity.sparsity": 0.50, "sparsity.protocol": "last_half"},
    "down-only-50": {"sparsity.sparsity": 0.50, "distill.targets": ["down"]},
    "samples-calib-50": {"sparsity.sparsity": 0.50, **SAMPLES_CALIBRATION},
    # WINA's weighted criterion (|x_i| * ||W[:, i]||_2 against tau): benchmarks/criteria.py
    "wina-50": {"sparsity.sparsity": 0.50, "sparsity.criterion": "weighted"},
    "wina-60": {"sparsity.sparsity": 0.60, "sparsity.criterion": "weighted"},
}
# What runs, in order: the headline row first, then what the targets need soonest. `quantize` and
# `zeroshot` work on uniform-50's fused model. Each step is ~20 min on 2 cores.
STEPS = ["uniform-50", "uniform-60", "zeroshot", "uniform-25", "uniform-40", "quantize", "down-only-50",
         "greedy-50", "last_half-50", "samples-calib-50", "wina-50", "wina-60"]


# The method's code a row ran (calibration, thresholds, alpha and its selection, fusion, scoring):
# rows and steps record its digest so a table that mixes runs says which code made which row.
METHOD_CODE = ("spon.calibration", "spon.thresholds", "spon.distill", "spon.fuse", "spon.perplexity")


def method_code() -> str:
    from spon.runtime.cache import code_digest

    return code_digest(METHOD_CODE)[:16]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def reset_stage_peak() -> bool:
    """Start a stage's own peak RSS: Linux resets the process's high-water mark (VmHWM) on "5"
    written to clear_refs. False where that is not possible (then no per-stage peak is recorded)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def stage_peak_gb() -> float:
    """The high-water mark of RSS since the last reset_stage_peak()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6  # kB
    raise OSError("no VmHWM in /proc/self/status")


def row_config(name: str, args):
    return load_config(args.config, {"model": args.model, "out": str(Path(args.out) / name),
                                     "eval.max_tokens": args.eval_tokens,
                                     "eval.files": list(DOMAINS.values()), **ROWS[name]})


def what_it_is(cfg) -> dict:
    """A row's full config (a RunConfig or its JSON) as committed: where it ran is not what it is,
    and assets paths are portable."""
    if isinstance(cfg, dict):  # a committed row: its fields as this code's config has them (new
        from spon.config import validate  # fields at their defaults: what that row ran)

        cfg = validate({**cfg, "out": "-"})
    return portable({k: v for k, v in cfg.model_dump(mode="json").items() if k != "out"})


def run_row(name: str, args, calibrations: dict, prior: dict) -> dict:
    """One row: the chain of stages, sharing a calibration made with the same config. A row
    finished earlier with the same config (in OUT, or in the --reuse file) is taken as it is."""
    out = Path(args.out) / name
    cfg = row_config(name, args)
    rt = (cfg.device, cfg.dtype)
    base = stages.base_model(cfg.model, *rt)  # loaded once for the row's stages
    dirs = {s: out / s for s in ("thresholds", "distill", "fused", "eval")}
    done = out / "summary.json"
    if done.is_file() and what_it_is(stages.read_json(done)["config"]) == what_it_is(cfg):
        print(f"  {name}: finished earlier with this config, reusing {done}", flush=True)
        s = stages.read_json(done)
        return row_record(name, cfg, s, dirs, s["wall_time_s"])
    if name in prior and what_it_is(prior[name]["config"]) == what_it_is(cfg):
        print(f"  {name}: taken from an earlier result (--reuse, same config)", flush=True)
        return prior[name]
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    stage_rss: dict[str, float] = {}

    def timed(stage, fn, *a, **kw):
        own_peak = reset_stage_peak()
        t0 = time.perf_counter()
        fn(*a, **kw)
        walls[stage] = round(time.perf_counter() - t0, 1)
        if own_peak:
            stage_rss[stage] = round(stage_peak_gb(), 2)
        print(f"  {name}: {stage} {walls[stage]:.0f}s" + (f", peak RSS {stage_rss[stage]:.2f} GB" if own_peak else ""),
              flush=True)

    calib_key = cfg.calibration.model_dump_json()
    calib = Path(args.out) / f"calibration-{cfg.calibration.source}"
    made = calib / "config.json"
    if calib_key not in calibrations and made.is_file() and made.read_text() == calib_key:
        calibrations[calib_key] = (calib, stages.read_json(calib / "wall.json")["calibrate"])
    if calib_key not in calibrations:
        calib.mkdir(parents=True, exist_ok=True)
        timed("calibrate", stages.calibrate, base, cfg.calibration, calib)
        stages.write_json(calib / "wall.json", {"calibrate": walls["calibrate"]})
        made.write_text(calib_key)
        calibrations[calib_key] = (calib, walls["calibrate"])
    calib, walls["calibrate"] = calibrations[calib_key]
    timed("thresholds", stages.thresholds, base, calib, cfg.sparsity, dirs["thresholds"])
    timed("distill", stages.distill, base, calib, dirs["thresholds"], cfg.distill,
          dirs["distill"], checkpoint_dir=out / "alpha_checkpoints")  # a killed run resumes here
    timed("fuse", stages.fuse, base, calib, dirs["thresholds"], dirs["distill"], dirs["fused"], source=cfg.model)
    timed("evaluate", stages.evaluate, dirs["fused"], cfg.eval, *rt, dirs["eval"])
    s = stages.summarize(cfg, cfg.model, calib, dirs["thresholds"], dirs["distill"], dirs["fused"], dirs["eval"], walls)
    s["peak_rss_gb"] = round(peak_rss_gb(), 2)
    s["peak_rss_gb_by_stage"] = stage_rss  # each stage's own (the model loaded once per row is in all)
    s["method_code"] = method_code()
    stages.write_json(done, s)
    return row_record(name, cfg, s, dirs, walls)


def row_record(name: str, cfg, s: dict, dirs: dict, walls: dict) -> dict:
    return portable({
        "row": name, "overrides": ROWS[name], "wall_s": walls, "wall_s_total": round(sum(walls.values()), 1),
        "peak_rss_gb": s.get("peak_rss_gb"), "peak_rss_gb_by_stage": s.get("peak_rss_gb_by_stage"), "fused": str(dirs["fused"]),
        **{k: s.get(k) for k in ("sparsity", "allocation", "protocol", "perplexity_by_file", "realized_sparsity_by_file",
                             "realized_sparsity_spon_by_file", "tokens_by_file",
                             "heldout_kl", "alpha_selection", "gap_closed", "quality_warnings", "preset")},
        "alpha_targets": cfg.distill.targets or cfg.sparsity.targets, "calibration_source": cfg.calibration.source,
        "eval": cfg.eval.model_dump(mode="json"), "config": what_it_is(cfg),
        "method_code": s.get("method_code", method_code()), "host": s.get("host")})


def eval_span(model: str, max_tokens: int) -> dict[str, dict]:
    """The text each domain's perplexity covers, in this model's tokens and in characters (what a
    token count means depends on the tokenizer: two models' first N tokens are different spans).
    The same cut as spon.perplexity: documents in order, each BOS first, N predicted tokens."""
    from transformers import AutoTokenizer

    from spon.calibration import read_documents
    from spon.sources import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model))
    spans = {}
    for name, f in DOMAINS.items():
        tokens = chars = 0
        for doc in read_documents(f):
            enc = tok(doc, add_special_tokens=False, return_offsets_mapping=True)
            predicted = len(enc["input_ids"]) - (tok.bos_token_id is None)  # BOS predicts the first token
            take = min(predicted, max_tokens - tokens)
            if take <= 0:
                break
            last = take - (tok.bos_token_id is not None)  # the last document token scored
            chars += len(doc) if take == predicted else enc["offset_mapping"][last][1]
            tokens += take
        spans[name] = {"tokens": tokens, "characters": chars}
    return spans


def pick(text: str, known, what: str) -> list[str]:
    """A comma list of names, each one of `known` (else a one-line exit naming the choices)."""
    names = text.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}")
    return names


def reuse_files(text: str | None) -> list[Path]:
    """--reuse A,B: earlier results files, each of which must exist (a typo must not mean a rerun)."""
    files = [Path(f) for f in text.split(",")] if text else []
    for f in files:
        if not f.is_file():
            raise SystemExit(f"--reuse {f}: no such file")
    return files


def gap(teal: float, spon: float, dense: float) -> float:
    return (teal - spon) / (teal - dense) if teal != dense else 0.0


def perplexity_table(rows: list[dict]) -> str:
    lines = ["| row | realized (wikitext) | dense | TEAL | SPON | gap closed | TinyStories TEAL -> SPON (gap) "
             "| held-out KL TEAL -> SPON | alpha | wall s | code / CPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wt, ts = portable(str(WIKITEXT_TEST)), portable(str(TINYSTORIES))
        wp, tp = r["perplexity_by_file"][wt], r["perplexity_by_file"][ts]
        sel = r["alpha_selection"]["selected_step"]
        lines.append(
            f"| {r['row']} | {r['realized_sparsity_by_file'][wt]:.3f} | {wp['dense']:.2f} | {wp['teal']:.2f} "
            f"| {wp['spon']:.2f} | {100 * gap(wp['teal'], wp['spon'], wp['dense']):.1f}% "
            f"| {tp['teal']:.2f} -> {tp['spon']:.2f} ({100 * gap(tp['teal'], tp['spon'], tp['dense']):.1f}%) "
            f"| {r['heldout_kl']['teal']:.4f} -> {r['heldout_kl']['spon']:.4f} "
            f"| {'zeros' if sel is None else f'step {sel}'} | {r['wall_s_total']:.0f} "
            f"| {r.get('method_code', 'earlier')[:8]} / {(r.get('host') or {}).get('cpu', '?')} |")
    return "\n".join(lines)


def spon_realized(row: dict, f: str) -> str:
    v = (row.get("realized_sparsity_spon_by_file") or {}).get(portable(f))
    return "-" if v is None else f"{v:.3f}"  # rows measured before SPON's was reported


def domain_table(rows: list[dict]) -> str:
    """Per row and evaluation domain: dense / TEAL / SPON perplexity, realized sparsity, gap closed;
    **worse** where SPON is above TEAL (the transfer target: never, on any domain, at any level)."""
    lines = ["| row | domain | tokens | realized TEAL / SPON | dense | TEAL | SPON | gap closed |", "|---" * 8 + "|"]
    for r in rows:
        for name, f in DOMAINS.items():
            p = r["perplexity_by_file"].get(portable(f))
            if p is None:
                lines.append(f"| {r['row']} | {name} | - | - | - | - | - | not evaluated |")
                continue
            worse = p["spon"] > p["teal"]
            lines.append(f"| {r['row']} | {name} | {(r.get('tokens_by_file') or {}).get(portable(f), '-')} "
                         f"| {r['realized_sparsity_by_file'][portable(f)]:.3f} / {spon_realized(r, f)} "
                         f"| {p['dense']:.2f} | {p['teal']:.2f} | {'**' if worse else ''}{p['spon']:.2f}{'** worse' if worse else ''} "
                         f"| {100 * gap(p['teal'], p['spon'], p['dense']):.1f}% |")
    return "\n".join(lines)


def quantized(row: dict, args) -> dict:
    out = Path(args.out) / "quantize"
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, {"model": args.model, "eval.max_tokens": args.eval_tokens,
                                    "eval.files": [str(WIKITEXT_TEST)]})
    t0 = time.perf_counter()
    stages.quantize(row["fused"], ["int8", "int4"], cfg.eval, cfg.device, out)
    q = stages.read_json(out / stages.QUANT_FILE)
    wp = row["perplexity_by_file"][portable(str(WIKITEXT_TEST))]
    return {"from_row": row["row"], "from_config": row["config"], "from_code": row["method_code"], "teal_fp32": wp["teal"], "spon_fp32": wp["spon"], "dense_fp32": wp["dense"],
            "schemes": {k: {"spon": v["perplexity"]["spon"], "weight_bytes": v["info"]["weight_bytes"]}
                        for k, v in q.items()}, "wall_s": round(time.perf_counter() - t0, 1)}


def zeroshot(row: dict, args) -> dict:
    """dense / TEAL / SPON of the row's fused model on the same first --zeroshot-limit items of
    each task, compared item by item (benchmarks/zeroshot.py): --jobs single-threaded workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker takes the caller's thread count: one per core is fastest here
    try:
        z = paired_suite(row["fused"], "dense,teal,spon", list(ZEROSHOT), args.zeroshot_limit,
                         Path(args.out) / "zeroshot", jobs=args.jobs)
    finally:
        torch.set_num_threads(threads)
    return {"from_row": row["row"], "from_config": row["config"], "from_code": row["method_code"], **z}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(STEPS), help=f"comma list of steps, run in the order given: {', '.join(STEPS)}")
    ap.add_argument("--config", default=None, help="RunConfig JSON/YAML under every row (flags of rows win)")
    ap.add_argument("--eval-tokens", type=int, default=25600, help="wikitext-2 test tokens scored (same text every row)")
    ap.add_argument("--zeroshot-limit", type=int, default=1000, help="items per task (whole set when smaller)")
    ap.add_argument("--jobs", type=int, default=2, help="zero-shot worker processes, one per core")
    ap.add_argument("--reuse", default=None, help="earlier real_model.json files, comma separated (e.g. the committed "
                    "one): their rows (a later file's win)"
                    "with the same config (each records the method code and host that made it), and its quantize "
                    "and zeroshot results with the same config and method code, are taken instead of rerun")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="out/real")
    args = ap.parse_args()
    steps = pick(args.rows, STEPS, "step")
    reuse = reuse_files(args.reuse)
    if args.threads:
        torch.set_num_threads(args.threads)
    configure(quiet=True)
    method_code()  # digest the method's code as this process imported it (cached), not as edited later
    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    earlier = [json.loads(f.read_text()) for f in reuse]
    prior = {r["row"]: r for e in earlier for r in e.get("rows", [])}
    result: dict = {"model": args.model, "eval_text": str(WIKITEXT_TEST.relative_to(DATA)), "eval_tokens": args.eval_tokens,
                    "host": host(), "rows": []}
    dump = lambda: (Path(args.out) / "real_model.json").write_text(json.dumps(portable(result), indent=2))  # noqa: E731
    calibrations: dict = {}
    rows: dict[str, dict] = {}

    def base() -> dict:
        """uniform-50 with its fused model on disk (rerun when only its numbers were reused)."""
        if "uniform-50" not in rows or not Path(rows["uniform-50"]["fused"]).is_dir():
            rows["uniform-50"] = run_row("uniform-50", args, calibrations, {})
        return rows["uniform-50"]

    base_config = what_it_is(row_config("uniform-50", args))  # what quantize and zeroshot start from
    for step in steps:
        if step in ROWS:
            rows[step] = run_row(step, args, calibrations, prior)
            result["rows"] = [rows[n] for n in STEPS if n in rows]
        elif step == "quantize":
            old = next((e["quantized"] for e in reversed(earlier) if "quantized" in e
                        and what_it_is(e["quantized"]["from_config"]) == base_config
                        and e["quantized"].get("from_code") == method_code()), None)
            q = result["quantized"] = old or quantized(base(), args)
            print(f"\nquantized SPON ({q['from_row']}) on wikitext-2 test: TEAL fp32 {q['teal_fp32']:.2f}, SPON fp32 "
                  f"{q['spon_fp32']:.2f}, " + ", ".join(f"SPON {k} {v['spon']:.2f}" for k, v in q["schemes"].items()))
        elif step == "zeroshot":
            old = next((e["zeroshot"] for e in reversed(earlier) if "zeroshot" in e
                        and what_it_is(e["zeroshot"]["from_config"]) == base_config
                        and e["zeroshot"].get("from_code") == method_code()
                        and e["zeroshot"].get("limit") == args.zeroshot_limit), None)
            z = result["zeroshot"] = old or zeroshot(base(), args)
            print(f"\nzero-shot accuracy ({z['from_row']}, first {z['limit']} items per task, paired)\n")
            print(paired_report(z))
        dump()  # a long run that dies keeps every finished step
    if result["rows"]:
        result["eval_span"] = eval_span(args.model, args.eval_tokens)
        print("\n" + "; ".join(f"{d}: {v['tokens']} tokens = {v['characters']} characters"
                                for d, v in result["eval_span"].items()))
        print("\n" + perplexity_table(result["rows"]))
        print("\n" + domain_table(result["rows"]))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    dump()
    print(f"\n{result['wall_s']:.0f}s, peak RSS {result['peak_rss_gb']:.2f} GB -> {Path(args.out) / 'real_model.json'}")


if __name__ == "__main__":
    main()
