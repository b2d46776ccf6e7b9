"""Issue #26's table in one command: both models, every precision, llama.cpp beside spon.

    .venv/bin/python benchmarks/peer_table.py                    # 34 min on the 2-core EPYC; JSON + table
    .venv/bin/python benchmarks/peer_table.py --from-runs        # the table again from the runs' JSONs

Each run is `benchmarks/peer_decode.py` in a process of its own, one after another, so that no run
holds another's models (the Llama-3.2-1B shape's copies at several precisions do not fit in 24 GiB
together, and a process that held them would time its own allocator, not the model):

  SmolLM2-135M       fp32, bf16, q8, q4 in one run (interleaved rounds), perplexity of each spon
                     variant on the first --ppl-tokens wikitext-2 test tokens
  Llama-3.2-1B shape one run per precision (random weights: no perplexity); fp32 at the sparse level
                     only (its compiled copy at 0 % does not fit beside the others)

Every run: --threads, --new-tokens, the compiled kernels path (`spon.compile_decode`; `spon generate
--compile`) at 0 % and at each --sparsities level, the eager kernels path
beside it, llama.cpp's dense GGUF at the same precision. Each run's own JSON (every round, the
load, the CPU and its flags) goes under --runs; the combined table and the ratios go to --out.
Timings move with the machine (on the 2-core EPYC a compiled step drifts by up to 25 % within
minutes, its process on both cores and no CPU stolen): compare ratios within a run, not across.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from peer_decode import cpu_text, write_report  # noqa: E402  (the runs' own report format)
PRECISIONS = ("fp32", "bf16", "q8", "q4")
LABEL = {"fp32": "fp32", "bf16": "bf16", "q8": "8-bit (Q8_0 / int8)", "q4": "4-bit (Q4_0 / int4, groups of 32)"}


def runs(args) -> list[tuple[str, list[str]]]:
    """(run name, peer_decode arguments) for every run of the table."""
    common = ["--threads", str(args.threads), "--compile", "--compile-paths", "kernels", "--reps", str(args.reps)]
    out = [("smollm2-135m", ["--model", "smollm2-135m", "--precisions", ",".join(PRECISIONS),
                             "--sparsities", "0," + args.sparsities, "--new-tokens", str(args.new_tokens),
                             "--ppl-tokens", str(args.ppl_tokens)] + common)]
    for prec in PRECISIONS:
        levels = args.sparsities if prec == "fp32" else "0," + args.sparsities
        out.append((f"llama-3.2-1b-49k-{prec}", ["--shape", "llama-3.2-1b-49k", "--precisions", prec, "--sparsities", levels,
                                                 "--new-tokens", str(args.shape_new_tokens), "--ppl-tokens", "0"] + common))
    return out


def table(results: dict[str, dict], sparsities: list[float]) -> str:
    """One markdown table: per model and precision, llama.cpp dense and spon's compiled kernels path
    at 0 % and each level (tokens/s, the ratio over llama.cpp, perplexity where measured)."""
    head = "| model | precision | llama.cpp dense | spon @0% | " + " | ".join(f"spon @{s:.0%}" for s in sparsities) + " |"
    rows = [head, "|---|---|---|---|" + "---|" * len(sparsities)]
    for name, r in results.items():
        model = "SmolLM2-135M" if name.startswith("smollm2") else "Llama-3.2-1B shape"
        for prec in r["precisions"]:
            ref = r["tok_s"].get(f"llama.cpp {prec}")

            def cell(s: float) -> str:
                v = r["tok_s"].get(f"spon compiled kernels {prec} @{s:.0%}")
                if v is None:
                    return "-"
                text = f"{v:.2f} ({v / ref:.2f}x)" if ref else f"{v:.2f}"
                ppl = r.get("perplexity", {}).get(f"spon {prec} @{s:.0%}")
                return (f"**{text}**" if s else text) + (f", ppl {ppl:.2f}" if ppl else "")

            rows.append(f"| {model} | {LABEL[prec]} | {ref:.2f} | " if ref else f"| {model} | {LABEL[prec]} | - | ")
            rows[-1] += cell(0.0) + " | " + " | ".join(cell(s) for s in sparsities) + " |"
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.5", help="comma list of levels besides 0 (each adds a compiled copy per precision)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128, help="SmolLM2-135M")
    ap.add_argument("--shape-new-tokens", type=int, default=64, help="the Llama-3.2-1B shape")
    ap.add_argument("--ppl-tokens", type=int, default=25600, help="SmolLM2-135M: wikitext-2 test tokens for perplexity (0: skip)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/peer_table", help="each run's own JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peer_table.json")
    ap.add_argument("--from-runs", action="store_true", help="no timing: the table from the JSONs already under --runs")
    args = ap.parse_args(argv)
    try:
        sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sparsities {args.sparsities!r}: a comma list of numbers, e.g. 0.4,0.5,0.6")
    if not sparsities or any(not 0 < s < 1 for s in sparsities):
        ap.error("--sparsities: levels between 0 and 1 (0 is always run)")
    args.runs.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.strftime("%Y-%m-%dT%H:%M:%S")
    for name, run_args in runs(args):
        path = args.runs / f"{name}.json"
        if not args.from_runs:
            t0 = time.perf_counter()
            print(f"== {name}: benchmarks/peer_decode.py {' '.join(run_args)}", flush=True)
            # from the repository root, the JSON's path relative to it where it lies inside: each run
            # records its command line, which then names no machine's directories
            where = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path.resolve()
            done = subprocess.run([sys.executable, "benchmarks/peer_decode.py", *run_args, "--out", str(where)], cwd=ROOT)
            if done.returncode != 0:
                print(f"peer_table: the {name} run failed (exit {done.returncode}); the runs before it are in {args.runs}",
                      file=sys.stderr)
                return done.returncode
            print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        elif not path.is_file():
            ap.error(f"--from-runs: {path} not found (run without --from-runs first)")
        results[name] = json.loads(path.read_text())
    text = table(results, sparsities)
    first = next(iter(results.values()))
    out = {"started": first["time"] if args.from_runs else started,
           "commits": {k: r.get("commit") for k, r in results.items()}, "cpu": first["cpu"], "torch": first["torch"],
           "xllamacpp": first.get("xllamacpp"), "threads": args.threads, "sparsities": sparsities, "runs": results,
           "table": text, "command": "benchmarks/peer_table.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_report(args.out, out, text, f"{cpu_text(first['cpu'])}, {args.threads} threads; spon: compiled kernels path; "
                 f"median of {first['reps']} interleaved rounds a run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
