"""Realized sparsity vs target: thresholds from the dense model's activations (TEAL's original)
against thresholds from the sparse model's own (spon's default), side by side in one run.

    .venv/bin/python benchmarks/threshold_transfer.py --sparsities 0.25,0.4,0.5,0.6

Thresholds on 32 blocks x 256 tokens of wikitext-2 validation; realized sparsity (weight-size
weighted, every projection sparse) measured on those calibration blocks and on 8 blocks x 256 of
wikitext-2 test, which calibration never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spon.assets import assets_root
from spon.calibration import text_blocks
from spon.config import SparsityConfig
from spon.sources import load_model
from spon.sparse import counting_zeros, mode, wrap_projections
from spon.thresholds import compute_thresholds

DATA = assets_root() / "data"


@torch.no_grad()
def realized(model, blocks: torch.Tensor) -> float:
    with mode(model, "teal"), counting_zeros(model) as z:
        for i in range(0, len(blocks), 8):
            model(blocks[i : i + 8], use_cache=False)
    return z["weighted"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    wrap_projections(model)
    calib = text_blocks(tok, [str(DATA / "wikitext-2" / "valid.txt")], 256, 32)
    test = text_blocks(tok, [str(DATA / "wikitext-2-raw" / "test.txt")], 256, 8)
    rows = []
    print("| target | calibrate_on | realized on calibration | realized on wikitext-2 test |\n|---|---|---|---|")
    for s in (float(x) for x in args.sparsities.split(",")):
        for on in ("dense", "sparse"):
            compute_thresholds(model, calib, SparsityConfig(sparsity=s, calibrate_on=on))
            row = {"target": s, "calibrate_on": on, "calibration": realized(model, calib), "test": realized(model, test)}
            rows.append(row)
            print(f"| {s:.2f} | {on} | {row['calibration']:.4f} | {row['test']:.4f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
