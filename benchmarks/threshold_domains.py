"""Realized sparsity per evaluation domain: how far static thresholds land from their target on
text of another domain, and whether the calibration text moves it. Side by side in one run.

    .venv/bin/python benchmarks/threshold_domains.py --model gemma3-270m \
        --out benchmarks/results/threshold_domains_gemma3-270m.json

For each target sparsity and each calibration (the model's preset: wikitext-2 validation + the
calibration half of the standard library; the preset's blocks plus the model's own samples at
temperature 1; the samples alone), spon's thresholds (uniform, everything upstream sparse) are
taken on the calibration's training blocks and the realized sparsity (weight-size weighted, every
projection sparse, TEAL mode) is measured on 12 blocks x 256 tokens of wikitext-2 test and of the
held-out standard-library modules, and on the whole TinyStories sample (3 blocks). The last table:
per projection kind, the mean over layers of TinyStories' realized sparsity minus wikitext-2's,
under the preset's thresholds at each target: where the domains part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_model import PYTHON_CODE, TINYSTORIES, WIKITEXT_TEST  # noqa: E402 -- the evaluation texts as real_model.py spells them

import spon  # noqa: E402
from spon.calibration import text_blocks  # noqa: E402
from spon.presets import preset  # noqa: E402
from spon.sources import load_model  # noqa: E402
from spon.sparse import counting_zeros, mode, wrap_projections  # noqa: E402
from spon.thresholds import compute_thresholds  # noqa: E402


@torch.no_grad()
def realized(model, blocks: torch.Tensor) -> dict:
    with mode(model, "teal"), counting_zeros(model) as z:
        for i in range(0, len(blocks), 4):
            model(blocks[i : i + 4], use_cache=False)
    return z


def by_kind(per_projection: dict[str, float]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, v in per_projection.items():  # "layer.kind"
        out.setdefault(name.split(".", 1)[1], []).append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--sparsities", default="0.4,0.5,0.6")
    ap.add_argument("--samples", type=int, default=16, help="blocks of the model's own text (256 tokens each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    cal_cfg = preset(args.model).get("calibration")
    if not cal_cfg:
        raise SystemExit(f"error: model {args.model!r} has no preset calibration to compare against")
    two = spon.calibrate(model, tok, spon.CalibrationConfig(**cal_cfg)).train
    samples = spon.calibrate(model, tok, spon.CalibrationConfig(
        source="samples", num_blocks=args.samples, block_len=256, heldout_blocks=0)).train
    wrap_projections(model)
    evals = {"wikitext-2 test": text_blocks(tok, [str(WIKITEXT_TEST)], 256, 12),
             "TinyStories": text_blocks(tok, [str(TINYSTORIES)], 256, 12),
             "Python (held out)": text_blocks(tok, [PYTHON_CODE], 256, 12)}
    calibrations = {"preset": two, "preset + own samples": torch.cat([two, samples]), "own samples": samples}
    rows, kinds = [], {}
    names = list(evals)
    print(f"| target | calibration (blocks) | {' | '.join(names)} | spread |\n|---|---|{'---|' * len(names)}---|")
    for s in (float(x) for x in args.sparsities.split(",")):
        for cal_name, blocks in calibrations.items():
            compute_thresholds(model, blocks, spon.SparsityConfig(sparsity=s))
            z = {k: realized(model, v) for k, v in evals.items()}
            got = {k: v["weighted"] for k, v in z.items()}
            spread = max(got.values()) - min(got.values())
            rows.append({"target": s, "calibration": cal_name, "calibration_blocks": len(blocks),
                         "realized": got, "spread": spread})
            print(f"| {s:.2f} | {cal_name} ({len(blocks)}) | {' | '.join(f'{got[k]:.4f}' for k in names)} "
                  f"| {100 * spread:.1f} pts |", flush=True)
            if cal_name == "preset":
                tiny, wiki = by_kind(z["TinyStories"]["per_projection"]), by_kind(z["wikitext-2 test"]["per_projection"])
                kinds[f"{s:.2f}"] = {k: sum(a - b for a, b in zip(tiny[k], wiki[k])) / len(tiny[k]) for k in tiny}
    print("\nTinyStories minus wikitext-2 test, mean over layers, by projection (preset thresholds):")
    order = list(next(iter(kinds.values())))
    print(f"| target | {' | '.join(order)} |\n|---|{'---|' * len(order)}")
    for s, d in kinds.items():
        print(f"| {s} | {' | '.join(f'{100 * d[k]:+.1f}' for k in order)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "eval_blocks": {k: len(v) for k, v in evals.items()},
                                              "rows": rows, "tinystories_minus_wikitext_by_kind": kinds}, indent=2))


if __name__ == "__main__":
    main()
