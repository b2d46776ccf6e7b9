"""The method's sparse linear on the kernels path gives the torch path's numbers."""

from __future__ import annotations

import torch

from spon.calibration import sample_blocks
from spon.config import SparsityConfig
from spon.fuse import fuse_alpha
from spon.model import load_model
from spon.sparse import by_name, load_alphas, set_mode, sparsify, use_kernels
from spon.thresholds import compute_thresholds


@torch.no_grad()
def test_cpu_kernel_path_matches_torch_and_generates_the_same_text(stories_path):
    model, tok = load_model(str(stories_path))
    sparsify(model)
    blocks = sample_blocks(model, tok, num_blocks=16, block_len=64, seed=0)
    compute_thresholds(model, blocks, SparsityConfig(sparsity=0.5))
    g = torch.Generator().manual_seed(0)
    load_alphas(model, {m.name: torch.randn(m.linear.in_features, generator=g) * 0.05 for m in by_name(model).values()})
    fuse_alpha(model)
    set_mode(model, "spon")
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    one_row = blocks[:1, :1]  # decode-shaped input: the CPU gather-reduce path
    ref_logits = model(one_row).logits
    ref_text = model.generate(prompt, max_new_tokens=40, do_sample=False)

    use_kernels(model)
    assert all(m.weight_t is not None for m in by_name(model).values())
    torch.testing.assert_close(model(one_row).logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False), ref_text)
    use_kernels(model, False)
    assert all(m.weight_t is None for m in by_name(model).values())
