"""Decode speed of the sparse model on the path users run, side by side in one run.

    .venv/bin/python benchmarks/decode.py out/real/uniform-50/fused --threads 2     # a fused spon checkpoint
    .venv/bin/python benchmarks/decode.py --shape llama-3.2-1b --threads 2 \\
        --dtypes bf16,fp32 --sparsities 0,0.25,0.4,0.5,0.6,0.7                      # random weights, that shape
    .venv/bin/python benchmarks/decode.py --model smollm2-135m --threads 2 \\
        --dtypes bf16,fp32 --sparsities 0,0.25,0.4,0.5,0.6,0.7                      # a real model, TEAL levels

What is timed is transformers' own `model.generate` (batch 1, greedy, `--new-tokens` new tokens after a
short prompt, KV cache), never a re-implementation of the decoder. Variants, timed interleaved
(`--reps` rounds, the median per variant, after one warm-up generation each):

  dense        plain nn.Linear / F.linear: what the user runs without spon. For a checkpoint, its
               source model (sidecar provenance) loaded by transformers; for a shape or a model, the
               same model with every projection unwrapped back to its contiguous nn.Linear.
  sparse       `spon.use_kernels`: every sparsified projection through the sparse kernels, q/k/v and
               gate/up fused (what `spon generate` runs). A checkpoint at its own thresholds; a shape or
               a model at each `--sparsities` level (TEAL, uniform), thresholds calibrated on random
               tokens (shape) or wikitext-2 validation text (model); `sparse@0%` keeps every
               activation: the kernels' own speed, apart from what skipping rows buys.
  torch        (checkpoint only) the same sparse model on the torch path (`--no-kernels`).
  kernels@0%   (checkpoint only) the kernels with every threshold at 0.

Also per run: the ideal ratio (weight bytes a decode step reads, dense / sparse, at the realized
per-projection sparsity of the timed generation; the LM head and embeddings stay dense), and for a
checkpoint how many greedy tokens the kernel path and the torch path share before they part, and
the fraction of the kernel path's tokens that the torch path picks given the same history. JSON -> --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from spon.assets import portable
from spon.config import SparsityConfig
from spon.fuse import load_sparse_model, read_sidecar
from spon.kernel_backend import use_kernels
from spon.model import find_projections
from spon.sources import load_model
from spon.sparse import SparseLinear, SparseState, apply_sparse_state_, counting_zeros, set_thresholds, sparse_linears
from spon.model import host
from spon.thresholds import compute_thresholds

PROMPT = "The history of the city begins"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Shapes of real models, random weights (what a kernel sees does not depend on the values).
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=4096),
}


def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out[0, ids.shape[1]:], time.perf_counter() - t0


def ideal_ratio(model, per_projection: dict[str, float]) -> dict:
    """Weight bytes a decode step reads, dense vs sparse: a projection at realized sparsity s reads
    (1 - s) of its rows; everything else (LM head, norms) is read whole. Embedding rows are a lookup."""
    sparse = {m.name: m.linear.weight for m in sparse_linears(model)}
    emb = model.get_input_embeddings().weight
    others = [p for n, p in model.named_parameters() if p.dim() == 2 and p.data_ptr() != emb.data_ptr()
              and not any(p.data_ptr() == w.data_ptr() for w in sparse.values())]
    head = model.get_output_embeddings().weight
    head_bytes = head.numel() * head.element_size()
    other_bytes = sum(p.numel() * p.element_size() for p in others if p.data_ptr() != head.data_ptr())
    proj_bytes = {n: w.numel() * w.element_size() for n, w in sparse.items()}
    dense_bytes = head_bytes + other_bytes + sum(proj_bytes.values())
    sparse_bytes = head_bytes + other_bytes + sum(b * (1 - per_projection.get(n, 0.0)) for n, b in proj_bytes.items())
    return {"dense_bytes_per_token": dense_bytes, "sparse_bytes_per_token": round(sparse_bytes),
            "lm_head_share": head_bytes / dense_bytes, "ideal_ratio": dense_bytes / sparse_bytes}


@contextmanager
def unwrapped(model):
    """The model as transformers built it: each SparseLinear replaced by its own nn.Linear with a
    contiguous weight (the kernels' Wᵀ views are given back first), restored afterwards."""
    use_kernels(model, False)
    swapped = [(p, p.module) for p in find_projections(model) if isinstance(p.module, SparseLinear)]
    for p, m in swapped:
        setattr(p.parent, p.attr, m.linear)
    try:
        yield model
    finally:
        for p, m in swapped:
            setattr(p.parent, p.attr, m)
        use_kernels(model)


@contextmanager
def thresholds_at(model, taus: dict[str, float]):
    """`model` with these thresholds for the duration (the kernels pick changes up by version)."""
    before = {m.name: float(m.threshold) for m in sparse_linears(model)}
    set_thresholds(model, taus)
    try:
        yield model
    finally:
        set_thresholds(model, before)


@contextmanager
def torch_path(model):
    use_kernels(model, False)
    try:
        yield model
    finally:
        use_kernels(model)


def time_variants(variants: dict, ids: torch.Tensor, new_tokens: int, reps: int) -> tuple[dict, dict, dict]:
    """Warm up each variant once (recording its tokens and realized sparsity), then `reps` rounds of
    every variant in turn. Returns (times per variant, tokens per variant, per-projection zeros)."""
    tokens, zeros = {}, {}
    for name, ctx in variants.items():
        with ctx() as model:
            counting = counting_zeros(model) if sparse_linears(model) else nullcontext({})
            with counting as z:
                tokens[name], _ = generate(model, ids, new_tokens)
            zeros[name] = dict(z)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, ctx in variants.items():
            with ctx() as model:
                times[name].append(generate(model, ids, new_tokens)[1])
    return times, tokens, zeros


@torch.no_grad()
def teacher_forced_agreement(model, ids: torch.Tensor, tokens: torch.Tensor) -> float:
    """The fraction of the tokens one path generated that `model` picks too, given the same
    history: once two greedy generations part (a mask flips near tau at one position), comparing
    them position by position says nothing about the positions after."""
    seq = torch.cat([ids[0], tokens]).unsqueeze(0)
    picks = model(seq, use_cache=False).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
    return (picks == tokens).float().mean().item()


def checkpoint_run(args, dtype: str) -> dict:
    meta = read_sidecar(args.model_dir)
    source = args.dense or meta["provenance"]["source_model"]
    dense, tok = load_model(source, device=args.device, dtype=dtype)
    sparse, _, _ = load_sparse_model(args.model_dir, device=args.device, dtype=dtype)
    use_kernels(sparse)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)
    zero = {m.name: 0.0 for m in sparse_linears(sparse)}
    variants = {"dense": lambda: nullcontext(dense), "sparse": lambda: nullcontext(sparse),
                "torch": lambda: torch_path(sparse), "kernels@0%": lambda: thresholds_at(sparse, zero)}
    times, tokens, zeros = time_variants(variants, ids, args.new_tokens, args.reps)
    k, t = tokens["sparse"].tolist(), tokens["torch"].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(k, t)) if a != b), args.new_tokens)
    with torch_path(sparse):
        forced = teacher_forced_agreement(sparse, ids, tokens["sparse"])
    return {"source": str(args.model_dir), "dense_model": source, "sparsity": meta["sparsity"],
            "realized_sparsity_weighted": zeros["sparse"]["weighted"], "prompt_tokens": ids.shape[1],
            **summarize(times, args.new_tokens, "dense"), **ideal_ratio(sparse, zeros["sparse"]["per_projection"]),
            "greedy_tokens_equal_kernels_vs_torch": agree, "greedy_token_agreement_teacher_forced": forced}


def levels_run(args, dtype: str) -> dict:
    """A shape (random weights, random calibration tokens) or a model (its weights, wikitext-2
    validation text), timed dense and at each TEAL level."""
    g = torch.Generator().manual_seed(1)
    if args.shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(DTYPES[dtype]).eval()
        calib = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
        ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
        source = f"{args.shape} (transformers LlamaForCausalLM, random weights)"
    else:
        from spon.calibration import dataset_blocks, text_blocks
        from spon.presets import wikitext2_validation

        model, tok = load_model(args.model, device=args.device, dtype=dtype)
        spec = wikitext2_validation()  # the local copy, else the hub's split
        calib = (text_blocks(tok, spec["files"], 128, 8) if "files" in spec else
                 dataset_blocks(tok, spec["dataset"], 128, 8, config=spec["dataset_config"], split=spec["split"]))
        ids = tok(args.prompt, return_tensors="pt").input_ids
        source = args.model
    calib, ids = calib.to(args.device), ids.to(args.device)
    apply_sparse_state_(model, SparseState(mode="teal"))
    levels = {}
    for s in args.sparsities:
        levels[s] = compute_thresholds(model, calib, SparsityConfig(sparsity=s))[0] if s > 0 else \
            {m.name: 0.0 for m in sparse_linears(model)}
    use_kernels(model)
    variants = {"dense": lambda: unwrapped(model)}
    for s, taus in levels.items():
        variants[f"sparse@{s:.0%}"] = lambda taus=taus: thresholds_at(model, taus)
    times, _, zeros = time_variants(variants, ids, args.new_tokens, args.reps)
    run = {"source": source, "prompt_tokens": ids.shape[1],
           **summarize(times, args.new_tokens, "dense")}
    baseline = "sparse@0%" if 0.0 in levels else None
    run["levels"] = {}
    for s in levels:
        name = f"sparse@{s:.0%}"
        z = zeros[name]
        run["levels"][name] = {"target": s, "realized_sparsity_weighted": z["weighted"],
                               "speedup": run["speedup"][name],
                               "speedup_vs_kernels_at_0": (run["tok_s"][name] / run["tok_s"][baseline]) if baseline else None,
                               **ideal_ratio(model, z["per_projection"])}
    return run


def summarize(times: dict[str, list[float]], new_tokens: int, baseline: str) -> dict:
    tok_s = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    return {"tok_s": tok_s, "times_s": times, "speedup": {k: v / tok_s[baseline] for k, v in tok_s.items()}}


def report(run: dict, dtype: str, args) -> str:
    head = (f"{Path(run['source']).name if args.model_dir else run['source']} ({dtype}, {torch.get_num_threads()} "
            f"threads, batch 1, {args.new_tokens} new tokens, median of {args.reps}):")
    cells = [f"{k} {v:.2f} tok/s" + ("" if k == "dense" else f" = x{run['speedup'][k]:.2f}")
             for k, v in run["tok_s"].items()]
    lines = [head, "  " + ", ".join(cells)]
    if args.model_dir:
        lines.append(f"  ideal x{run['ideal_ratio']:.2f} at realized sparsity {run['realized_sparsity_weighted']:.3f} "
                     f"(LM head {100 * run['lm_head_share']:.0f}% of the weight bytes); greedy tokens, kernels vs "
                     f"torch path: the first {run['greedy_tokens_equal_kernels_vs_torch']} equal, "
                     f"{100 * run['greedy_token_agreement_teacher_forced']:.0f}% of the kernels' tokens are the "
                     f"torch path's pick given the same history")
    else:
        for name, lv in run["levels"].items():
            vs0 = lv["speedup_vs_kernels_at_0"]
            lines.append(f"  {name}: realized {lv['realized_sparsity_weighted']:.3f}, x{lv['speedup']:.2f} over dense"
                         + (f", x{vs0:.2f} over the kernels at 0%" if vs0 else "")
                         + f"; ideal x{lv['ideal_ratio']:.2f} (LM head {100 * lv['lm_head_share']:.0f}% of the bytes)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", help="a fused spon checkpoint (or use --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a transformers model of this shape, random weights")
    ap.add_argument("--model", default=None, help="a model (name, directory, .gguf) timed at --sparsities levels")
    ap.add_argument("--dense", default=None, help="checkpoint: the dense model (default: the sidecar's source model)")
    ap.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16")
    ap.add_argument("--sparsities", default="0,0.5", help="shape/model: comma list of target sparsities (0 = kernels at 0%%)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args()
    if sum(map(bool, (args.model_dir, args.shape, args.model))) != 1:
        ap.error("give one of: a fused checkpoint directory, --shape, --model")
    dtypes = args.dtypes.split(",")
    if any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "reps": args.reps,
              "device": args.device, "host": host(), "runs": {}}
    for dtype in dtypes:
        run = checkpoint_run(args, dtype) if args.model_dir else levels_run(args, dtype)
        result["runs"][dtype] = run
        print(report(run, dtype, args), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(portable(result), indent=2))


if __name__ == "__main__":
    main()
