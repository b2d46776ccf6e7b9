"""Replay a finished run's alpha selection under the held-out NLL guard at several confidences.

Distillation's trajectory does not depend on the guard (it only picks among checkpoints), and
every checkpoint's alpha and SPON tau are kept in `<level>/alpha_checkpoints/`. This scores each
of them again on the run's own held-out blocks, exactly as `spon.distill` does (the same
Teacher, `heldout_pass` and `paired_upper_bound`), and prints for each confidence the step the
guard would select: what a rerun with `distill.guard_confidence` set so would ship, without
training again (step 0, the closed-form initialisation, is computed again as distill does).

    .venv/bin/python benchmarks/guard_replay.py out/real/uniform-25 out/real/calibration-text \
        --confidence 0.5,0.9,0.95 --json benchmarks/results/guard_replay_25.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spon.distill import Teacher, closed_form_alpha, guard_bounds, heldout_pass
from spon.sparse import load_alphas, mode, set_thresholds, thresholds_of
from spon.stages import apply_thresholds, base_model, read_calibration, read_json
from spon.thresholds import realized_by_projection, retake_thresholds_


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("level", type=Path, help="a level's directory: summary.json, thresholds/, alpha_checkpoints/")
    ap.add_argument("calibration", type=Path, help="the calibration stage's directory the level was run on")
    ap.add_argument("--confidence", default="0.5,0.9,0.95")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    confidences = [float(c) for c in a.confidence.split(",")]
    summary = read_json(a.level / "summary.json")
    model, _ = base_model(summary["model"]).get()
    apply_thresholds(model, a.level / "thresholds")
    cfg = summary["config"]["distill"]
    teal_taus = thresholds_of(model, "teal")
    cal = read_calibration(a.calibration)
    domains, names = cal.heldout_domains, sorted(set(cal.heldout_domains))
    heldout = Teacher(model, cal.heldout, budget_gb=4.0)
    with mode(model, "teal"):
        _, teal_nll = heldout_pass(model, heldout, domains, names=names)
    rows = {}
    states = [0] if cfg["init"] == "closed_form" else []
    states += [ckpt for ckpt in sorted((a.level / "alpha_checkpoints").glob("alpha_step*.pt"))]
    for ckpt in states:
        if ckpt == 0:  # what distill scores as step 0: the closed-form alpha, SPON's tau re-taken with it
            load_alphas(model, closed_form_alpha(model, cal.train))
            with mode(model, "spon"):
                retake_thresholds_(model, cal.train, realized_by_projection(model, cal.train, "teal"))
            state = {"step": 0, "heldout_kl_by_step": {"0": summary["heldout_kl"].get("spon_init")}}
        else:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            load_alphas(model, state["alphas"])
            set_thresholds(model, state["thresholds"], teal=teal_taus)
        with mode(model, "spon"):
            means, nll = heldout_pass(model, heldout, domains, names=names)
        at = {c: guard_bounds(nll - teal_nll, domains, names, c) for c in confidences}
        by_domain = {d: {"mean": mean, "bound": {str(c): at[c][d][1] for c in confidences}}
                     for d, (mean, _) in at[confidences[0]].items()}
        step = int(state["step"])
        rows[step] = {"kl": means[""][0], "kl_recorded": state["heldout_kl_by_step"].get(str(step)),
                      "by_domain": by_domain}
        cells = []
        for d, v in by_domain.items():
            bounds = ", ".join(f"{v['bound'][str(c)]:+.4f}" for c in confidences)
            cells.append(f"{d or 'all'} {v['mean']:+.4f} [{bounds}]")
        print(f"step {step:4d}  KL {means[''][0]:.4f} (run: {rows[step]['kl_recorded'] or float('nan'):.4f})  " + "  ".join(cells),
              flush=True)
    selected = {}
    for c in confidences:
        ok = [s for s, r in rows.items() if all(v["bound"][str(c)] <= 0 for v in r["by_domain"].values())]
        selected[str(c)] = min(ok, key=lambda s: (rows[s]["kl"], s)) if ok else None
        print(f"confidence {c}: selects {'step ' + str(selected[str(c)]) if ok else 'none: alpha = 0 (TEAL)'}")
    if a.json:
        a.json.write_text(json.dumps({"level": str(a.level), "run_selected_step": summary["alpha_selection"]["selected_step"],
                                      "steps": rows, "selected": selected}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
