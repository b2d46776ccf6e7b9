"""Decode speed of a fused spon model on the path users run, side by side in one run.

    .venv/bin/python benchmarks/decode.py out/real/uniform-50/fused --threads 2 --new-tokens 128

What is timed is `model.generate` (batch 1, greedy, `--new-tokens` new tokens after a short prompt)
of transformers models, exactly as `spon generate` loads them:
  dense    the source model the checkpoint was made from (sidecar provenance), plain nn.Linear:
           what the user runs without spon
  sparse   `spon.load_sparse_model(dir)` + `use_kernels` (what `spon generate` runs): every
           sparsified projection through the sparse kernels, q/k/v and gate/up fused
  torch    the same sparse model on the torch path (`--no-kernels`): masking without the kernels
timed interleaved (dense, sparse, torch; `--reps` rounds; the median per variant), after one
warm-up generation each. Also: the ideal ratio for this model, weight bytes read per token dense /
sparse with the realized per-projection sparsity of the timed generation (the LM head and
embeddings stay dense), and how many greedy tokens the kernel path and the torch path share.
JSON -> --out (commit under benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from spon.assets import portable
from spon.fuse import load_sparse_model, read_sidecar
from spon.kernel_backend import use_kernels
from spon.model import load_model
from spon.sparse import counting_zeros, sparse_linears
from spon.stages import host

PROMPT = "The history of the city begins"


def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="a fused spon checkpoint")
    ap.add_argument("--dense", default=None, help="the dense model (default: the sidecar's source model)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_sidecar(args.model_dir)
    source = args.dense or meta["provenance"]["source_model"]
    dense, tok = load_model(source, dtype=args.dtype)
    sparse, _, _ = load_sparse_model(args.model_dir, dtype=args.dtype)
    use_kernels(sparse)
    ids = tok(args.prompt, return_tensors="pt").input_ids

    with counting_zeros(sparse) as zeros:
        kernel_tokens, _ = generate(sparse, ids, args.new_tokens)  # warm-up, and the tokens compared below
    use_kernels(sparse, False)
    torch_tokens, _ = generate(sparse, ids, args.new_tokens)
    use_kernels(sparse)
    generate(dense, ids, args.new_tokens)

    times: dict[str, list[float]] = {"dense": [], "sparse": [], "torch": []}
    for _ in range(args.reps):
        times["dense"].append(generate(dense, ids, args.new_tokens)[1])
        times["sparse"].append(generate(sparse, ids, args.new_tokens)[1])
        use_kernels(sparse, False)
        times["torch"].append(generate(sparse, ids, args.new_tokens)[1])
        use_kernels(sparse)
    tok_s = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    agree = next((i for i, (a, b) in enumerate(zip(kernel_tokens.tolist(), torch_tokens.tolist())) if a != b),
                 args.new_tokens)
    ideal = ideal_ratio(sparse, zeros["per_projection"])
    result = {
        "model_dir": str(args.model_dir), "dense_model": source, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "prompt_tokens": ids.shape[1],
        "reps": args.reps, "sparsity": meta["sparsity"], "realized_sparsity_weighted": zeros["weighted"],
        "tok_s": tok_s, "times_s": times, "speedup": tok_s["sparse"] / tok_s["dense"],
        "speedup_torch_path": tok_s["torch"] / tok_s["dense"], **ideal,
        "greedy_tokens_equal_kernels_vs_torch": agree,
        "greedy_token_agreement": sum(a == b for a, b in zip(kernel_tokens.tolist(), torch_tokens.tolist()))
        / args.new_tokens,
        "host": host(),
    }
    print(f"{Path(args.model_dir).name} ({args.dtype}, {result['threads']} threads, batch 1, {args.new_tokens} new "
          f"tokens, median of {args.reps}): dense {tok_s['dense']:.2f} tok/s, sparse (kernels) {tok_s['sparse']:.2f} "
          f"tok/s = x{result['speedup']:.2f}, sparse (torch path) {tok_s['torch']:.2f} tok/s = "
          f"x{result['speedup_torch_path']:.2f}; ideal x{ideal['ideal_ratio']:.2f} at realized sparsity "
          f"{zeros['weighted']:.3f} (LM head {100 * ideal['lm_head_share']:.0f}% of the weight bytes); greedy tokens: "
          f"first {agree} equal, {100 * result['greedy_token_agreement']:.0f}% agree (kernels vs torch path)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(portable(result), indent=2))


if __name__ == "__main__":
    main()
