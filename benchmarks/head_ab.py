"""The LM head's weight format, side by side in one process: the same compiled sparse step with the
head in the model's dtype and quantized like the projections, alternated round by round.

    .venv/bin/python benchmarks/head_ab.py --shape llama-3.2-1b-49k --weights int4 --rounds 6   # 4 min

Between separate `peer_decode.py` runs spon's figures move by up to 15 %, more than the head
changes them; here both heads decode the same prompt in the same process, in alternating order.
Prints tokens/s per round (decode only, EOS ignored, as peer_decode) and the medians' ratio.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_decode as pd  # noqa: E402  (the same model, thresholds and timing as the peer benchmark)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(pd.SHAPES), default="llama-3.2-1b-49k")
    ap.add_argument("--weights", choices=["int8", "int4"], default="int4", help="the projections' (and the quantized head's) format")
    ap.add_argument("--int4-group", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from torch import _dynamo

    from spon.config import SparsityConfig
    from spon.kernel_backend import compile_decode, describe, use_kernels
    from spon.sparse import SparseState, apply_sparse_state_, set_thresholds
    from spon.thresholds import compute_thresholds

    _dynamo.config.recompile_limit = 64
    torch.set_num_threads(args.threads)
    source = types.SimpleNamespace(shape=args.shape, model=None)
    model, _, _ = pd.load_spon(source, "fp32")
    model = model.to(torch.bfloat16)
    apply_sparse_state_(model, SparseState(mode="teal"))
    calib = pd.calibration(source, None, model.config.vocab_size)
    set_thresholds(model, compute_thresholds(model, calib, SparsityConfig(sparsity=args.sparsity))[0])
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    heads = ("float", args.weights)
    twins = {}
    for head in heads:
        twin = copy.deepcopy(model)
        use_kernels(twin, weights=args.weights, int4_group=args.int4_group, head_weights=head)
        compile_decode(twin)
        pd.spon_generate(twin, ids, args.new_tokens)  # compiles
        twins[head] = twin
        print(f"head {head}: {describe(twin)}", flush=True)
    tok_s: dict[str, list[float]] = {h: [] for h in heads}
    for r in range(args.rounds):
        for head in heads if r % 2 == 0 else heads[::-1]:
            tok_s[head].append(pd.spon_generate(twins[head], ids, args.new_tokens))
        print(f"round {r + 1}: " + ", ".join(f"head {h} {v[-1]:.2f}" for h, v in tok_s.items()), flush=True)
    med = {h: statistics.median(v) for h, v in tok_s.items()}
    print(f"{args.shape}, {args.weights} projections at {args.sparsity:.0%}, compiled, median of {args.rounds}: "
          f"head float {med['float']:.2f} tok/s, head {args.weights} {med[args.weights]:.2f} "
          f"({med[args.weights] / med['float']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
