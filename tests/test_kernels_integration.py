"""The method's sparse model on the kernels path (spon.kernel_backend) gives the torch path's numbers."""

from __future__ import annotations

import math

import pytest
import torch

from spon.calibration import sample_blocks
from spon.config import SparsityConfig
from spon.sparse import fuse_alpha
from spon.kernel_backend import KernelGroup, KernelSingle, use_kernels
from spon.sources import load_model
from spon.sparse import by_name, load_alphas, set_mode, sparse_linears, wrap_projections
from spon.thresholds import compute_thresholds


def sparse_stories(stories_path, dtype="fp32"):
    model, tok = load_model(str(stories_path), dtype=dtype)
    wrap_projections(model)
    blocks = sample_blocks(model, tok, num_blocks=16, block_len=64, seed=0)
    compute_thresholds(model, blocks, SparsityConfig(sparsity=0.5))
    g = torch.Generator().manual_seed(0)
    load_alphas(model, {m.name: torch.randn(m.linear.in_features, generator=g) * 0.05 for m in by_name(model).values()})
    fuse_alpha(model)
    set_mode(model, "spon")
    return model, tok, blocks


@torch.no_grad()
def decode_nll(model, ids: torch.Tensor) -> float:
    """Mean next-token NLL scored one token at a time through the KV cache: every step is a
    decode-shaped (1-row) call, so with kernels on every sparse linear runs the kernel."""
    past, nll = None, 0.0
    for t in range(ids.shape[1] - 1):
        out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        nll -= torch.log_softmax(out.logits[0, -1].float(), -1)[ids[0, t + 1]].item()
    return nll / (ids.shape[1] - 1)


@torch.no_grad()
def test_groups_share_one_weight_copy_and_restore(stories_path):
    model, _, _ = sparse_stories(stories_path)
    before = {m.name: m.linear.weight.detach().clone() for m in sparse_linears(model)}
    use_kernels(model)
    mods = by_name(model)
    layer0 = {k: mods[f"0.{k}"] for k in ("q", "k", "v", "o", "gate", "up", "down")}
    assert isinstance(layer0["q"].kernel, KernelGroup) and layer0["q"].kernel is layer0["v"].kernel
    assert layer0["gate"].kernel is layer0["up"].kernel and isinstance(layer0["down"].kernel, KernelSingle)
    for m in sparse_linears(model):  # W is a view of the kernel's W^T: one copy of the weights
        assert m.linear.weight.untyped_storage().data_ptr() == m.kernel.weight_t.untyped_storage().data_ptr()
        assert torch.equal(m.linear.weight, before[m.name])
    use_kernels(model, False)
    for m in sparse_linears(model):
        assert m.kernel is None and m.linear.weight.is_contiguous() and torch.equal(m.linear.weight, before[m.name])


def test_the_lm_head_decodes_on_the_native_op_one_tied_copy_restored(stories_path, monkeypatch):
    import spon.kernel_backend as kb

    model, _, _ = sparse_stories(stories_path)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight  # stories260K ties them
    w0, keys = head.weight.detach().clone(), set(model.state_dict())
    ids = torch.tensor([[1, 45, 97, 300, 12]])
    with torch.no_grad():
        ref = model(ids).logits
    use_kernels(model)
    assert head.weight is embed.weight and torch.equal(head.weight, w0)  # still tied, same numbers
    assert head.weight.untyped_storage().data_ptr() == head.kernel_head.weight_t.untyped_storage().data_ptr()
    assert set(model.state_dict()) == keys and "dense LM head on the native op" in kb.describe(model)
    calls = []
    op = kb._native_op()
    monkeypatch.setattr(kb, "_native_op", lambda: (lambda *a: calls.append(a[3]) or op(*a)))
    with torch.no_grad():
        prefill = model(ids).logits  # 5 rows: F.linear; the embedding reads W^T's columns
        x = torch.randn(1, 1, head.in_features)
        decode = head(x)
    assert [float("-inf")] in calls and calls[-1] == [float("-inf")]  # the decode row went through the op
    torch.testing.assert_close(prefill, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode, torch.nn.functional.linear(x, w0), rtol=1e-5, atol=1e-5)
    use_kernels(model, False)
    assert head.weight is embed.weight and head.weight.is_contiguous() and torch.equal(head.weight, w0)
    assert "forward" not in vars(head) and head.kernel_head is None


@torch.no_grad()
@pytest.mark.parametrize("head_weights", ["int8", "int4"])
def test_a_quantized_lm_head_computes_with_its_quantized_weights_at_decode_and_prefill(stories_path, head_weights):
    import spon.kernel_backend as kb
    from spon.kernels.reference import dequantize_weight_int4_t, dequantize_weight_t

    model, _, _ = sparse_stories(stories_path)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    w0 = head.weight.detach().clone()
    use_kernels(model, head_weights=head_weights)
    kh = head.kernel_head
    assert kh.weights == head_weights and f"dense LM head on the native op ({head_weights})" in kb.describe(model)
    wq = (dequantize_weight_t if head_weights == "int8" else dequantize_weight_int4_t)(kh.qweight_t, kh.scales)
    step = (w0.abs().amax(1) / (127 if head_weights == "int8" else 7)).max()
    assert 0 < (wq.t() - w0).abs().max() <= step  # really quantized, within a step
    g = torch.Generator().manual_seed(0)
    for rows in (1, 12):  # a decode row (the native op) and a prefill (the reference) alike
        x = torch.randn(1, rows, head.in_features, generator=g)
        torch.testing.assert_close(head(x), x @ wq, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[1, 45, 97, 300]])
    assert torch.equal(embed(ids)[0], w0[ids[0]])  # the tied embedding still reads the float weights
    use_kernels(model, False)
    assert head.kernel_head is None and torch.equal(head.weight, w0)


def test_an_int4_head_the_groups_do_not_divide_stays_float_and_bad_names_are_refused(stories_path):
    model, _, _ = sparse_stories(stories_path)
    use_kernels(model, head_weights="int4", int4_group=48, weights="float")  # width 64: no group of 48 divides it
    assert model.get_output_embeddings().kernel_head.weights == "float"
    with pytest.raises(ValueError, match="head_weights='int2'"):
        use_kernels(model, head_weights="int2")


@torch.no_grad()
@pytest.mark.parametrize("mode", ["teal", "spon"])
def test_each_kernel_module_equals_the_torch_path_on_its_input(stories_path, mode):
    model, tok, blocks = sparse_stories(stories_path)
    set_mode(model, mode)
    use_kernels(model)
    seen: list = []
    hooks = [m.register_forward_hook(lambda m, a, y: seen.append((m, a[0], y))) for m in sparse_linears(model)]
    prompt = tok("Once upon a time there was", return_tensors="pt").input_ids
    model.generate(prompt, max_new_tokens=8, do_sample=False)  # prefill, then 1-row decode steps
    for h in hooks:
        h.remove()
    decode_calls = 0
    for m, x, y in seen:
        kernel, m.kernel = m.kernel, None
        ref = m(x)  # the torch path: F.linear(x * 1{|x| > tau}, W) + b
        m.kernel = kernel
        decode_calls += x.shape[:-1].numel() == 1
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, msg=lambda s: f"{m.name}: {s}")
    assert decode_calls >= 7 * 7 * len(model.model.layers)  # the kernel (not the reference) ran


@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [("fp32", 0.005), ("bf16", 0.01)])
def test_decode_perplexity_with_kernels_equals_torch(stories_path, sample_txt, dtype, tol):
    model, tok, _ = sparse_stories(stories_path, dtype)
    ids = tok(sample_txt.read_text()[:1500], return_tensors="pt").input_ids[:, :256]
    torch_ppl = math.exp(decode_nll(model, ids))
    use_kernels(model)
    kernel_ppl = math.exp(decode_nll(model, ids))
    assert kernel_ppl == pytest.approx(torch_ppl, rel=tol)


@torch.no_grad()
def test_greedy_text_agrees_over_a_long_generation(stories_path):
    """Identical greedy text is not expected on a deep model (masks flip near tau with the
    summation order); on this one nearly every token agrees."""
    model, tok, _ = sparse_stories(stories_path)
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    ref = model.generate(prompt, max_new_tokens=200, do_sample=False)[0, prompt.shape[1]:]
    use_kernels(model)
    got = model.generate(prompt, max_new_tokens=200, do_sample=False)[0, prompt.shape[1]:]
    first_diff = next((i for i, (a, b) in enumerate(zip(ref.tolist(), got.tolist())) if a != b), len(ref))
    assert first_diff >= 100, f"greedy text diverges at token {first_diff}"


def _tiny_llama(seed: int = 0):
    """A random Llama whose every projection width is a multiple of 32 (int4's packing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_kernels_equal_the_torch_path_on_dequantized_weights(weights):
    """use_kernels(weights=int8|int4): every decode step (and the prefill) computes with the
    quantized weights: the same logits as the torch path on a copy whose W is the dequantized one."""
    import copy

    from spon.kernel_backend import describe
    from spon.kernels.reference import (dequantize_weight_int4_t, dequantize_weight_t, quantize_weight_int4,
                                        quantize_weight_int8)
    from spon.sparse import set_thresholds

    model = _tiny_llama()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        wrap_projections(m)
    taus = {m.name: 0.05 for m in sparse_linears(model)}
    for m in (model, ref):
        set_thresholds(m, taus)
        set_mode(m, "teal")
    for m in sparse_linears(ref):  # the dequantized weights, on the torch path
        w = m.linear.weight
        deq = (dequantize_weight_t(*quantize_weight_int8(w)) if weights == "int8"
               else dequantize_weight_int4_t(*quantize_weight_int4(w, 32)))
        m.linear.weight = torch.nn.Parameter(deq.t().contiguous(), requires_grad=False)
    use_kernels(model, weights=weights, int4_group=32)
    assert f"{weights} weights" in describe(model) and "sparse kernels" in describe(model)
    assert "torch path" in describe(ref)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    past_k = past_r = None
    for t in range(ids.shape[1]):  # 1-row decode steps: the native op (or its fallback)
        out_k = model(ids[:, t : t + 1], past_key_values=past_k, use_cache=True)
        out_r = ref(ids[:, t : t + 1], past_key_values=past_r, use_cache=True)
        past_k, past_r = out_k.past_key_values, out_r.past_key_values
        torch.testing.assert_close(out_k.logits, out_r.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)  # prefill: reference
    # and the quantization is really there: the float model's logits differ
    plain = _tiny_llama()
    assert (plain(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_decode_path_is_the_faster_one_and_is_remembered(stories_path, tmp_path, monkeypatch):
    """choose_decode_path times both paths and leaves the model on the faster: a kernel path made
    slow loses, a torch path made slow loses; the choice is remembered per machine and model
    shape (a second call measures nothing) and generate's tokens do not depend on it."""
    import time

    from spon.kernel_backend import choose_decode_path
    from spon.sparse import SparseLinear

    monkeypatch.setenv("SPON_CACHE", str(tmp_path / "cache"))
    model, tok, blocks = sparse_stories(stories_path)
    ids = blocks[:1, :12]
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)

    fast_kernel, slow = KernelGroup.forward, lambda self, m, x: (time.sleep(0.003), fast_kernel(self, m, x))[1]
    monkeypatch.setattr(KernelGroup, "forward", slow)
    c = choose_decode_path(model, ids, new_tokens=3, rounds=1)
    assert c["path"] == "torch" and not c["remembered"], c
    assert c["tokens_per_s"]["torch"] > c["tokens_per_s"]["kernels"]
    assert all(m.kernel is None for m in sparse_linears(model))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), plain)
    monkeypatch.setattr(KernelGroup, "forward", fast_kernel)
    again = choose_decode_path(model, ids, new_tokens=3, rounds=1)
    assert again == {**c, "remembered": True}
    assert (tmp_path / "cache" / "decode_path.json").is_file()

    torch_sparse = SparseLinear._sparse
    monkeypatch.setattr(SparseLinear, "_sparse", lambda self, x: (
        time.sleep(0.003) if self.kernel is None else None, torch_sparse(self, x))[1])
    c = choose_decode_path(model, ids, new_tokens=3, rounds=1, remember=False)
    assert c["path"] == "kernels" and c["tokens_per_s"]["kernels"] > c["tokens_per_s"]["torch"], c
    assert all(m.kernel is not None for m in sparse_linears(model))
    gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert gen.shape == plain.shape and (gen == plain).float().mean() > 0.8  # kernels: same numbers within fp32 rounding


@pytest.mark.slow
def test_compiled_decode_step_equals_the_eager_one_in_one_graph(stories_path):
    """spon.compile_decode on the kernels path (what `spon generate --compile` takes): the decode
    steps run one compiled graph (no graph break: the native op is traced through its fake, the
    group's sharing without identity checks) and give the eager path's logits within fp32
    rounding; the greedy text is the same. (The torch path compiles too; it is transformers' own
    machinery over spon.sparse, and one compile of each would cost CI another 35 s.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from spon.kernel_backend import compile_decode

    model, tok, _ = sparse_stories(stories_path)
    use_kernels(model)
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        torch._dynamo.reset()
        counters.clear()
        compile_decode(model)
        assert model.config._attn_implementation == "spon_decode"
        got = model.generate(prompt, **kw)
        again = model.generate(prompt, **kw)  # the compiled step reused: no new graph
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert torch.equal(got.sequences, ref.sequences) and torch.equal(again.sequences, ref.sequences)
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # Steps after a generate's first skip dynamo's guards: thresholds changed between two generates
    # must still reach the compiled step (its first step's guards see them and recompile).
    from spon.sparse import set_thresholds

    set_thresholds(model, {m.name: float(m.threshold) * 3 for m in sparse_linears(model)})
    with torch.no_grad():
        changed = model.generate(prompt, **kw)
        compile_decode(model, False)
        ref_changed = model.generate(prompt, **kw)
    assert not torch.equal(ref_changed.sequences, ref.sequences)  # the new thresholds change the text
    assert torch.equal(changed.sequences, ref_changed.sequences)
    for a, b in zip(ref_changed.logits, changed.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert model.generation_config.compile_config is None and model.generation_config.cache_implementation is None
    assert "get_compiled_call" not in vars(model)
    assert model.config._attn_implementation == "sdpa"  # the decode attention went with the compiled step


def test_decode_attention_is_sdpa_for_one_query_token():
    """The attention compile_decode gives a CPU model: one query token over a partly filled static
    cache (boolean mask), grouped-query heads, equals transformers' sdpa attention; longer queries
    are sdpa's own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from spon.kernel_backend import _decode_attention

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 3, False
    key, value = torch.randn(2, 3, 40, 64, generator=g), torch.randn(2, 3, 40, 64, generator=g)
    query = torch.randn(2, 9, 1, 64, generator=g)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., :17], mask[1, ..., :29] = True, True  # each row's filled cache positions
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    got, _ = _decode_attention(module, query, key, value, mask, scaling=0.125)
    assert got.shape == want.shape == (2, 1, 9, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    long_query = torch.randn(2, 9, 5, 64, generator=g)
    long_mask = torch.ones(2, 1, 5, 40, dtype=torch.bool).tril(35)
    assert torch.equal(_decode_attention(module, long_query, key, value, long_mask, scaling=0.125)[0],
                       sdpa_attention_forward(module, long_query, key, value, long_mask, scaling=0.125)[0])
