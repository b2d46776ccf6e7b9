"""Issue #22, item 4 (GGUF): a file that lacks tensors the architecture needs, whose block_count
promises more layers than it holds, that holds NaN, or that has no tokenizer is refused in one line
before anything is cached (transformers would fill what is missing with random weights); its
context length is checked like a directory model's; a cache entry that does not check out is
rebuilt, never trusted; a directory named x.gguf is called a directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from spon import gguf as sg  # noqa: E402
from spon.errors import SponError  # noqa: E402


def _alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_gguf(path: Path, *, block_count: int = 2, layers: int = 2, skip: str | None = None, context: int = 128,
               tokenizer: bool = True, nan: str | None = None) -> Path:
    """The tiny 2-layer Llama GGUF of tests/test_gguf.py, with one thing wrong."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    hidden, heads, kv, head_dim, ffn = 32, 4, 2, 8, 64
    tokens = _alphabet() + ["Ġt", "<|endoftext|>"]
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(block_count)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 1) + [3])
        w.add_token_merges(["Ġ t"])
        w.add_bos_token_id(len(tokens) - 1)
        w.add_eos_token_id(len(tokens) - 1)

    def tensor(name, shape):
        if name == skip:
            return
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if name == nan:
            a[0] = np.nan
        w.add_tensor(name, a)

    tensor("token_embd.weight", (len(tokens), hidden))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,))
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
        tensor(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv * head_dim, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    tensor("output_norm.weight", (hidden,))
    tensor("output.weight", (len(tokens), hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPON_CACHE", str(root))
    return root


def _entries(cache: Path) -> list[str]:
    d = cache / "gguf"
    return sorted(p.name for p in d.iterdir() if p.name != "hashes") if d.is_dir() else []


@pytest.mark.parametrize("kw,expected", [
    ({"skip": "blk.1.attn_k.weight"}, "lacks 1 tensor(s) the architecture needs (model.layers.1.self_attn.k_proj.weight)"),
    ({"block_count": 3}, "lacks 9 tensor(s) the architecture needs (model.layers.2."),
    ({"nan": "blk.0.ffn_up.weight"}, "tensor model.layers.0.mlp.up_proj.weight holds NaN or inf"),
    ({"tokenizer": False}, "has no tokenizer metadata (tokenizer.ggml.tokens)"),
], ids=["missing-tensor", "block-count-3-of-2", "nan", "no-tokenizer"])
def test_an_incomplete_gguf_is_refused_and_nothing_is_cached(tmp_path, cache, kw, expected):
    src = write_gguf(tmp_path / "bad.gguf", **kw)
    with pytest.raises(SponError) as e:
        sg.dequantize(src)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert _entries(cache) == []


def test_a_cache_entry_that_does_not_check_out_is_rebuilt(tmp_path, cache, capsys):
    src = write_gguf(tmp_path / "ok.gguf")
    dest = sg.dequantize(src)
    good = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(good[: len(good) // 2])  # a cache entry cut short
    assert sg.dequantize(src) == dest
    assert "is unusable" in capsys.readouterr().err and (dest / "model.safetensors").read_bytes() == good
    marker = json.loads((dest / sg.MARKER).read_text())
    (dest / sg.MARKER).write_text(json.dumps({**marker, "sha256": "0" * 64}))  # an entry of another file
    assert sg.dequantize(src) == dest and json.loads((dest / sg.MARKER).read_text())["sha256"] == marker["sha256"]


def test_a_gguf_context_length_is_checked_like_a_directory_models(tmp_path, cache, capsys):
    from spon.config import RunConfig
    from spon.sources import check_model

    src = write_gguf(tmp_path / "short.gguf", context=8)
    cfg = RunConfig(model=str(src))
    check_model(cfg, calib_len=cfg.calibration.block_len)  # a default adapts ...
    assert cfg.calibration.block_len == 8 and "using 8" in capsys.readouterr().err
    typed = RunConfig.model_validate({"model": str(src), "calibration": {"block_len": 64}})
    with pytest.raises(SponError, match="--calib-len \\(calibration.block_len\\) 64 exceeds the model's max_position_embeddings 8"):
        check_model(typed, calib_len=64)  # ... a typed value is refused


def test_a_directory_named_gguf_is_called_a_directory(tmp_path):
    from spon.sources import classify

    (tmp_path / "x.gguf").mkdir()
    with pytest.raises(SponError, match="is a directory, not a GGUF file"):
        classify(str(tmp_path / "x.gguf"))
