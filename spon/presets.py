"""Per-model recipes: what `spon run --model NAME` does unless the config or a flag says otherwise.

The defaults in spon.config are the recipe of the embedded stories260K (512 self-sampled blocks of
128 tokens, 600 steps of 16 blocks, lr 1e-2: a few minutes on a CPU). A 30-layer model with a
49K vocabulary is another regime: a step costs ~4000x more, so the recipe trades steps for
longer blocks and a smaller lr. Layering, lowest first: spon.config defaults < the model's
preset < the config file < flags. `preset: none` switches it off; the summary records which
preset applied.
"""

from __future__ import annotations

import copy

WIKITEXT2_VALIDATION = "wikitext-2:validation"  # in a preset's files: the local copy, else the hub's split
# Calibration of a general-purpose model: prose and code as two domains (spon.calibration.domain_blocks),
# each with its own held-out blocks, so alpha is selected only where it helps both.
TWO_DOMAINS = [WIKITEXT2_VALIDATION, "corpus:python-stdlib"]

PRESETS: dict[str, dict] = {
    # SmolLM2-135M-Instruct on a 2-core CPU: one sparsity level, evaluation included, in under
    # 30 minutes (benchmarks/real_model.py measures it; README "Results").
    # Measured choices (2-core AMD EPYC, fp32 model): 2 blocks of 256 tokens per step (3.9 s fp32,
    # 2.6 s with the student in bf16 autocast, same held-out KL at step 50: 0.358 / 0.359); the
    # teacher's log-probs cached (72 x 256 x 49152 fp32 = 3.6 GB); closed-form init (held-out KL
    # worse than TEAL at init, 0.57 vs 0.51, but a better start: 0.36 after 25 steps). Text, not
    # the model's own samples: with samples (72 x 256, fp64) SPON closed 0.8 % of TEAL's wikitext-2
    # test gap at 50 %. Two domains, 200 steps, SPON at its own tau (benchmarks/transfer_probe.py,
    # 50 %, 4,096 tokens each of wikitext-2 test / TinyStories / held-out Python / C headers):
    # wikitext-2 validation alone and 200 steps put SPON above TEAL on both code domains at equal
    # sparsity; with the standard library as a second domain SPON is below its TEAL on the first
    # three (41.10 / 15.28 / 14.89 vs 48.69 / 16.89 / 16.74) and 2 % above it on C (8.89 vs 8.72).
    # lr 3e-4, 100 steps, a checkpoint (and SPON's tau re-taken) every 25: at lr 1e-3 for 200 steps
    # the product's training KL climbed 0.44 -> 0.68 over steps 20-60 at full lr (SPON's own tau)
    # and no checkpoint beat TEAL. 60 steps, a checkpoint every 20, 72 blocks, SPON's own tau
    # (benchmarks/own_tau_short.py product --steps 60 --every 20 --blocks 72 --lr L): held-out KL
    # at steps 20/40/60 0.462/0.411/0.402 (lr 1e-3) and 0.426/0.389/0.387 (lr 3e-4); TEAL 0.521.
    # 400 steps, a checkpoint every 50 (issue #23, benchmarks/recipes/): wikitext-2 test gap closed at
    # equal sparsity 39.8 -> 42.5 % (50 %) and 54.7 -> 61.4 % (60 %), SPON below TEAL on all three
    # evaluation texts at 40-60 % (at 25 % the NLL guard took a checkpoint on noise, worse than TEAL:
    # README); distillation 14-17 min a level instead of ~9. 200 blocks on top reach 46.6 /
    # 62.5 % but cost 26-36 min and a 10 GB teacher cache (recipes/smollm2_200blocks_400steps.yaml).
    # 16 held-out blocks a domain, not 8 (the same 56 training blocks: 88 = 2 x (28 + 16)): the NLL
    # guard's 95 % bound over 8 blocks refused every checkpoint at 40 % (code: mean -0.03 nats,
    # bound +0.008 at the best step); over 16 it takes some (benchmarks/guard_replay.py).
    "smollm2-135m": {
        "calibration": {"source": "text", "files": TWO_DOMAINS, "num_blocks": 88, "block_len": 256,
                        "heldout_blocks": 32},
        "distill": {"steps": 400, "lr": 3e-4, "batch_size": 2, "init": "closed_form", "warmup": 10,
                    "checkpoint_every": 50, "compute_dtype": "bf16", "teacher_cache_gb": 4.0},
        "eval": {"window": 512, "stride": 512, "max_tokens": 25600},
    },
    # Gemma-3-270M (base) on a 2-core CPU: one level in 20 minutes, evaluation included (uniform
    # 50 %, idle 2-core Xeon, fp32, 2 threads: calibrate 58 s, thresholds 16 s, distill 618 s, fuse
    # 25 s, evaluate 484 s for three 25,600-token domains; peak RSS 7.1 GB; benchmarks/real_model.py
    # --model gemma3-270m, README "Both families"). A step (2 blocks x 256 tokens, the teacher's
    # final hidden states cached, the 262,144-entry LM head's KL in 128-token chunks, the student
    # in bf16 autocast) costs ~6 s. lr and steps as SmolLM2's: the training KL (means of 10 steps)
    # falls 1.01 -> 0.76 by step 40 and holds; held-out KL TEAL 1.181, checkpoints 0.934 / 0.878 /
    # 0.869 / 0.873 at steps 25-100. Calibration as for SmolLM2 (two domains):
    # sampling the model's own text at this vocabulary costs more than it is worth. Blocks of 256
    # tokens stay inside the 512-token sliding window; the evaluation window is the sliding window.
    "gemma3-270m": {
        "calibration": {"source": "text", "files": TWO_DOMAINS, "num_blocks": 40, "block_len": 256,
                        "heldout_blocks": 8},
        # guard_confidence 0.5 (the means): 4 held-out blocks a domain are too few for the 95 % bound,
        # and this recipe has not yet been measured with more (its README rows are the means' choice)
        "distill": {"steps": 100, "lr": 3e-4, "batch_size": 2, "init": "closed_form", "warmup": 10,
                    "checkpoint_every": 25, "compute_dtype": "bf16", "teacher_cache_gb": 2.0,
                    "guard_confidence": 0.5},
        "eval": {"window": 512, "stride": 512, "max_tokens": 25600},
    },
}


def preset_name(model: str | None, requested: str | None) -> str:
    """The preset that applies: `requested` if given ('none' for none), else the model's own."""
    if requested not in (None, "auto"):
        return requested
    return model if isinstance(model, str) and model in PRESETS else "none"  # a wrong type: validate() says so


def preset(name: str) -> dict:
    from spon.errors import SponError

    if name == "none":
        return {}
    if not isinstance(name, str):
        raise SponError(f"invalid config: preset: must be a name, got {name!r}")
    if name not in PRESETS:
        raise SponError(f"unknown preset {name!r}; known: none, {', '.join(sorted(PRESETS))}")
    out = copy.deepcopy(PRESETS[name])
    cal = out.get("calibration", {})
    if cal.get("source") == "text" and WIKITEXT2_VALIDATION in cal.get("files", []):
        spec = wikitext2_validation()
        if spec["source"] == "text":
            cal["files"] = [spec["files"][0] if f == WIKITEXT2_VALIDATION else f for f in cal["files"]]
        else:  # no local copy: the hub's split alone (a dataset source takes no other files)
            cal.pop("files")
            cal.update(spec)
    return out


def wikitext2_validation() -> dict:
    """Calibration text for a general-domain model: wikitext-2 validation (disjoint from the test
    split that evaluation scores). The local copy beside the repository when it is there
    ($SPON_ASSETS/data/wikitext-2/valid.txt), else the hub's wikitext-2-raw-v1 validation split."""
    from spon.assets import assets_root

    local = assets_root() / "data" / "wikitext-2" / "valid.txt"
    if local.is_file():
        return {"source": "text", "files": [str(local)]}
    return {"source": "dataset", "dataset": "wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "validation"}


def layered(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a section in `over` replaces only its keys)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = layered(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
