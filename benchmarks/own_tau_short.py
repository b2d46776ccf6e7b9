"""A short distillation three ways: how much of SPON's held-out gain is the sparsity it gives up?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/own_tau_short.py product
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/own_tau_short.py probe
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/own_tau_short.py same

SmolLM2-135M with its preset (spon/presets.py) at 50 %, but 24 calibration blocks (4 held out) and
30 steps with a checkpoint every 10:
  product  SPON's tau re-taken with alpha in place before the first step and at every checkpoint
           (distill.retake_thresholds, the default)
  probe    the same re-take, but after the first step and before each checkpoint (what
           benchmarks/transfer_probe.py did when it measured SPON at its own tau)
  same     SPON at TEAL's tau (retake_thresholds off): SPON realizes less sparsity than TEAL
Prints the training KL (means of 5 steps) and the held-out KL of TEAL, the init and every checkpoint.
About 5 minutes a variant on one core.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import spon
from spon import presets
from spon.config import CalibrationConfig, DistillConfig, SparsityConfig
from spon.thresholds import retake_thresholds_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=("product", "probe", "same"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="default: the preset's")
    ap.add_argument("--blocks", type=int, default=24, help="calibration blocks (a sixth of them held out)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = spon.load_model("smollm2-135m")
    recipe = presets.preset("smollm2-135m")
    cal = spon.calibrate(model, tok, CalibrationConfig(**{**recipe["calibration"], "num_blocks": args.blocks,
                                                         "heldout_blocks": max(args.blocks // 6, 2)}))
    spon.sparsify_(model, SparsityConfig(sparsity=0.5), cal)
    cfg = {**recipe["distill"], "steps": args.steps, "checkpoint_every": args.every, "teacher_cache_gb": 2.0,
           "retake_thresholds": args.variant == "product",
           **({"lr": args.lr} if args.lr else {})}

    def probe_retake(step: int, loss: float) -> None:
        if step == 0 or (step + 1) % args.every == 0:
            retake_thresholds_(model, cal.train)

    r = spon.distill_(model, cal, DistillConfig(**cfg), on_step=probe_retake if args.variant == "probe" else None)
    k = r.kl_history
    print(args.variant, f"lr {cfg['lr']}", "training KL", [round(statistics.mean(k[i : i + 5]), 3) for i in range(0, len(k), 5)])
    print(args.variant, "held-out KL: TEAL", round(r.heldout_kl_before, 4), "init", round(r.heldout_kl_init, 4),
          "by step", {s: round(v, 4) for s, v in r.heldout_kl_by_step.items()}, "selected", r.selected_step)


if __name__ == "__main__":
    main()
