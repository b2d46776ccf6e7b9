"""Where does α help and where does it hurt? One level, four evaluation domains, every checkpoint.

    W=../shared/assets/data/wikitext-2/valid.txt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transfer_probe.py --steps 200 --evals 50,100,150,200 \
        --same-tau --calib-files $W --heldout 8 --out benchmarks/results/transfer_probe_smollm2_wikitext.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transfer_probe.py --steps 200 --evals 50,100,150,200 \
        --same-tau --out benchmarks/results/transfer_probe_smollm2_mixed.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transfer_probe.py --steps 200 --evals 100,200 --no-ablation \
        --skip-baselines --out benchmarks/results/transfer_probe_smollm2_mixed_own_tau.json   # SPON at its own tau
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transfer_probe.py --teal-at 0.47,0.46 --calib-files $W --heldout 8 \
        --out benchmarks/results/transfer_probe_smollm2_teal_matched.json   # TEAL at the sparsity SPON realizes

SmolLM2-135M with its preset recipe (spon/presets.py: wikitext-2 validation and the standard
library's calibration half as two domains) except `--steps`, `--lr`, `--init` and the calibration
files (`--calib-files A,B` replaces them, `+NAME` adds a domain). The JSON files above were made
before the preset took the second domain, with the then equivalent flags. Perplexity
(window 512, no overlap, the first `--tokens` tokens of each) on wikitext-2 test, the TinyStories
sample, the held-out Python standard-library modules and CPython's C headers, none of them
calibration text: dense, TEAL, the closed-form initial α, α after every step in `--evals` (the
same run: the cosine schedule spans `--steps`), the selected α, and the selected α without each
projection kind's α (which projections carry the transfer, which the harm). SPON runs its own tau,
re-taken with α in place at every checkpoint (the product's default) unless `--same-tau`; TEAL
runs its own. Realized sparsity is measured in each mode. JSON -> --out, written after every measurement.

A probe, not the product path: the product's numbers come from benchmarks/real_model.py.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import spon
from spon import presets
from spon.assets import assets_root, portable
from spon.calibration import read_documents
from spon.config import CalibrationConfig, DistillConfig, SparsityConfig
from spon.distill import closed_form_alpha
from spon.perplexity import perplexity
from spon.sparse import alphas, load_alphas, mode
from spon.thresholds import retake_thresholds_

DATA = assets_root() / "data"
DOMAINS = {"wikitext": str(DATA / "wikitext-2-raw" / "test.txt"), "tinystories": str(DATA / "tinystories" / "sample.txt"),
           "python": "corpus:python-stdlib-heldout", "c": "corpus:c-headers"}
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def score_modes(model, tok, docs: dict, args, result: dict, tag: str, run_mode: str) -> None:
    """Perplexity and realized sparsity on every domain in `run_mode` -> result["evals"][tag], saved."""
    t0 = time.time()
    with torch.no_grad(), mode(model, run_mode):
        r = {k: perplexity(model, tok, d, 512, 512, args.tokens) for k, d in docs.items()}
    result["evals"][tag] = r
    print(tag, {k: (round(v["perplexity"], 3), round(v.get("realized_sparsity", 0.0), 3)) for k, v in r.items()},
          f"{time.time() - t0:.0f}s", flush=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None, help="default: the preset's")
    ap.add_argument("--init", default=None, help="zeros | closed_form (default: the preset's)")
    ap.add_argument("--calib-files", default="", help="comma list; +NAME adds to the preset's files")
    ap.add_argument("--heldout", type=int, default=None, help="held-out calibration blocks (default: the preset's)")
    ap.add_argument("--evals", default="50,100,150,200", help="steps after which to score every domain")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens scored per domain")
    ap.add_argument("--skip-baselines", action="store_true", help="no dense / TEAL / init rows (known from a run "
                    "with the same calibration)")
    ap.add_argument("--save-alpha", default=None, help="the selected α as safetensors")
    ap.add_argument("--teal-at", default=None, help="comma list of levels: only TEAL at each (thresholds for that "
                    "target on the same calibration), no α: the baseline at the sparsity SPON realizes")
    ap.add_argument("--same-tau", action="store_true", help="SPON runs TEAL's tau (distill.retake_thresholds "
                    "off: the recipe before SPON's thresholds were re-taken with alpha in place)")
    ap.add_argument("--alpha-targets", default=None, help="comma list of projection kinds that train alpha")
    ap.add_argument("--no-ablation", action="store_true", help="skip the selected-minus-kind rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = spon.load_model(args.model)
    recipe = presets.preset(args.model)
    cal_cfg = dict(recipe["calibration"])
    for f in filter(None, args.calib_files.split(",")):
        cal_cfg["files"] = cal_cfg["files"] + [f[1:]] if f.startswith("+") else [f]
    if args.heldout:
        cal_cfg["heldout_blocks"] = args.heldout
    cal = spon.calibrate(model, tok, CalibrationConfig(**cal_cfg))
    docs = {k: read_documents(v) for k, v in DOMAINS.items()}
    result: dict = {"args": vars(args), "calibration": portable(cal_cfg), "evals": {}}
    if args.teal_at:
        for level in args.teal_at.split(","):
            spon.sparsify_(model, SparsityConfig(sparsity=float(level)), cal)
            score_modes(model, tok, docs, args, result, f"teal@{level}", "teal")
        return
    spon.sparsify_(model, SparsityConfig(sparsity=args.sparsity), cal)

    def score(tag: str, run_mode: str = "spon") -> None:
        score_modes(model, tok, docs, args, result, tag, run_mode)

    if not args.skip_baselines:
        score("dense", "dense")
        score("teal", "teal")
    load_alphas(model, closed_form_alpha(model, cal.train))
    if not args.skip_baselines:
        if not args.same_tau:
            retake_thresholds_(model, cal.train)
        score("init")
    evals = {int(x) for x in args.evals.split(",")}
    overrides = {"steps": args.steps, "checkpoint_every": 50, **({"lr": args.lr} if args.lr else {}),
                 **({"init": args.init} if args.init else {}),
                 **({"targets": args.alpha_targets.split(",")} if args.alpha_targets else {}),
                 "retake_thresholds": not args.same_tau}

    def on_step(step: int, loss: float) -> None:
        if step + 1 in evals:
            if not args.same_tau:  # what distill does next at a checkpoint: SPON's tau for this alpha
                retake_thresholds_(model, cal.train)
            score(f"step{step + 1}")

    r = spon.distill_(model, cal, DistillConfig(**{**recipe["distill"], **overrides}), on_step=on_step)
    result.update({"selection": r.selection, "selected_step": r.selected_step, "heldout_kl_before": r.heldout_kl_before,
                   "heldout_nll_before": r.heldout_nll_before, "heldout_kl_by_step": r.heldout_kl_by_step,
                   "heldout_nll_by_step": r.heldout_nll_by_step, "heldout_by_domain": r.heldout_by_domain,
                   "refused_by_domain": r.refused_by_domain})
    if args.save_alpha:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in alphas(model).items()}, args.save_alpha)
    score("selected")
    selected = alphas(model)
    for kind in () if args.no_ablation else KINDS:  # the selected α without one projection kind's
        load_alphas(model, {n: torch.zeros_like(t) if n.split(".")[-1] == kind else t for n, t in selected.items()})
        score(f"selected_minus_{kind}")
    load_alphas(model, selected)


if __name__ == "__main__":
    main()
