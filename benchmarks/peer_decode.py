"""Decode speed against a CPU peer, llama.cpp, on the same weights at the same precision.

    .venv/bin/python benchmarks/peer_decode.py --model smollm2-135m --threads 2        # one command: table + JSON
    .venv/bin/python benchmarks/peer_decode.py --shape llama-3.2-1b-49k --threads 2    # Llama-3.2-1B shape, random weights
    .venv/bin/python benchmarks/peer_decode.py --model smollm2-135m --precisions bf16 --sparsities 0,0.5 \\
        --new-tokens 32 --reps 3 --ppl-tokens 0                                        # a quick look

Peer: llama.cpp through `xllamacpp` (prebuilt CPU wheel; `pip install 'spon[bench]'`) in a process of
its own (in spon's process it slows torch's GEMMs: see LlamaCpp),
`handle_completions` with temperature 0 and ignore_eos, its own `predicted_per_second` (decode only,
the prompt excluded). spon is timed the same way: transformers' generate with EOS ignored, tokens/s
from its first generated token to its last (JSON `tok_s`; with the prompt's prefill and generate's
setup included: `tok_s_end_to_end`). Same weights: for SmolLM2-135M the shipped GGUF (Q4_1) is dequantized once and
written again at each precision with the `gguf` package (F32, BF16, Q8_0, Q4_0; norms stay F32);
spon loads the same dequantized tensors (the checkpoint `spon models --fetch` converts from that
file). For the Llama-3.2-1B shape (49,152-token vocabulary: the SmolLM2 tokenizer, so llama.cpp has
one) a seeded random `LlamaForCausalLM` is written as a GGUF (q/k rows permuted to ggml's rotary
layout, as llama.cpp's converter does), so both sides run the same model.

Variants per precision (all timed interleaved: every round runs every variant once; the median of
`--reps` rounds; one warm-up generation each first):

  llama.cpp       dense, GGUF at that precision (fp32: F32, bf16: BF16, q8: Q8_0, q4: Q4_0)
  spon dense      transformers' generate with plain nn.Linear (fp32 and bf16 only: spon has no
                  dense 8/4-bit path of its own; its kernels at 0 % play that part below)
  spon @s         transformers' generate with `spon.use_kernels` (TEAL thresholds for sparsity s,
                  calibrated on wikitext-2 validation text; s = 0: the kernels keeping everything).
                  q8 / q4: bf16 model, every projection's kernels reading int8 (per output channel)
                  or int4 (group-wise, --int4-group inputs per fp32 scale) weights, and so does
                  the LM head (as llama.cpp's Q8_0/Q4_0 files quantize the tied embedding that
                  is their output matrix; --head float keeps it bf16); norms and the embedding
                  lookups stay bf16.
  spon compiled   (--compile) the same through `spon.compile_decode`: static KV cache, one
                  torch.compile'd decode step, on the torch path and on the kernels path at fp32 /
                  bf16, on the kernels path at q8 / q4 (a model copy per variant; the warm-up
                  generation compiles it)

Quality beside speed: perplexity of each spon variant on the first --ppl-tokens tokens of the
wikitext-2 test split (blocks of 512, no overlap); llama.cpp's is not measured (its fp32/bf16 files
hold the same weights as spon dense).

ggml's worker threads spin while they wait, so llama.cpp's figures collapse on a busy machine; the
load average is recorded at the start and end of each round, and the share of CPU time the
hypervisor gave to other guests during it (`loadavg` in the JSON, `steal`) — rerun on an idle
machine for figures to quote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "q8", "q4")
PROMPT = "The history of the city begins"
SHAPES = {  # Llama-3.2-1B, with SmolLM2's 49,152-token vocabulary (its tokenizer goes in the GGUF)
    "llama-3.2-1b-49k": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                             rope_theta=500000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_ticks() -> list[int]:
    """The machine's CPU time by kind (/proc/stat: user nice system idle iowait irq softirq steal ...);
    [] where there is none."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def stolen(before: list[int], after: list[int]) -> float | None:
    """The share of CPU time a hypervisor gave to other guests between two cpu_ticks()."""
    d = [b - a for a, b in zip(before, after)]
    return round(d[7] / sum(d), 3) if len(d) > 7 and sum(d) > 0 else None


def git_commit() -> str | None:
    """The checkout's commit (`-dirty` when the tree has changes), None outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
            "amx_int8", "amx_tile")
    return {"model": model, "flags": [f for f in keep if f in flags], "cpus": os.cpu_count()}


# ----------------------------------------------------------------------------- GGUF files
def _gguf_type(precision: str):
    from gguf import GGMLQuantizationType as Q

    return {"fp32": Q.F32, "bf16": Q.BF16, "q8": Q.Q8_0, "q4": Q.Q4_0}[precision]


def _file_type(precision: str) -> int:
    from gguf import LlamaFileType as F

    return {"fp32": F.ALL_F32, "bf16": F.MOSTLY_BF16, "q8": F.MOSTLY_Q8_0, "q4": F.MOSTLY_Q4_0}[precision]


def _encode(arr: np.ndarray, precision: str, name: str):
    """A float32 tensor in the GGUF type of `precision` (1-D tensors, the norms, stay F32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if arr.ndim == 1 or precision == "fp32":
        return np.ascontiguousarray(arr, dtype=np.float32), None
    qtype = _gguf_type(precision)
    return quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype), qtype


def _copy_fields(reader, writer, skip=("general.architecture", "general.file_type")) -> None:
    from gguf import GGUFValueType

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def rewrite_gguf(src: Path, precision: str, out: Path) -> Path:
    """`src` with every tensor dequantized to fp32 and written again at `precision`."""
    import gguf

    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_suffix(".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copy_fields(reader, writer)
    writer.add_file_type(_file_type(precision))
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        data, qtype = _encode(arr, precision, t.name)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> ggml's interleaved rotary layout (llama.cpp's converter)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_shape_gguf(model, tokenizer_gguf: Path, precision: str, out: Path) -> Path:
    """A transformers LlamaForCausalLM as a llama.cpp GGUF (tokenizer fields from another GGUF)."""
    import gguf

    if out.is_file():
        return out
    c = model.config
    tok = gguf.GGUFReader(str(tokenizer_gguf))
    tmp = out.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("llama-3.2-1b-shape-random")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    rope = getattr(c, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta there
    w.add_rope_freq_base(float(rope.get("rope_theta") or getattr(c, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(_file_type(precision))
    for field in tok.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def put(name, arr):
        data, qtype = _encode(arr, precision, name)
        w.add_tensor(name, data, raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            arr = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                arr = _permute_rotary(arr, c.num_attention_heads)
            elif hf == "self_attn.k_proj":
                arr = _permute_rotary(arr, c.num_key_value_heads)
            put(f"blk.{i}.{gg}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- llama.cpp
class LlamaCpp:
    """One xllamacpp server per GGUF, kept for the whole run, in a process of its own.

    Not in spon's process: once an xllamacpp Server exists in a process, torch's own GEMMs there
    run 1.4-3x slower (measured on an AMD EPYC, 2 threads: bf16 F.linear 576->960 34-44 us before,
    79-109 us after creating the server, before any generation; spon's native op unchanged), which
    slowed every spon variant that calls torch's matmuls (dense, LM head, attention) by up to 30 %.
    The server process sleeps on its pipe between requests."""

    def __init__(self, path: Path, threads: int, ctx: int):
        import multiprocessing as mp

        spawn = mp.get_context("spawn")
        parent, child = spawn.Pipe()
        self.proc = spawn.Process(target=_llamacpp_server, args=(child, str(path), threads, ctx), daemon=True)
        self.proc.start()
        self.conn = parent
        status, self.version = self.conn.recv()
        if status != "ready":
            raise RuntimeError(f"llama.cpp server for {path} failed: {self.version}")

    def generate(self, prompt: str, new_tokens: int) -> tuple[float, int]:
        self.conn.send((prompt, new_tokens))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"llama.cpp generation failed: {value}")
        return value


def _llamacpp_server(conn, path: str, threads: int, ctx: int) -> None:
    """The llama.cpp process: one Server, completions on request until the pipe closes."""
    try:
        import xllamacpp

        p = xllamacpp.CommonParams()
        p.model.path = path
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.n_ctx = ctx
        p.n_parallel = 1
        p.warmup = False
        server = xllamacpp.Server(p)
    except Exception as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", getattr(xllamacpp, "__version__", None)))
    while True:
        try:
            prompt, new_tokens = conn.recv()
        except EOFError:  # the benchmark ended
            return
        try:
            r = server.handle_completions({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                                           "ignore_eos": True, "cache_prompt": False})
            t = r["timings"]
            conn.send(("ok", (t["predicted_per_second"], t["predicted_n"])))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


# ----------------------------------------------------------------------------- spon
class _TokenClock:
    """A generate streamer that only notes when each token arrived (the prompt is put first)."""

    def __init__(self):
        self.arrivals: list[float] = []

    def put(self, value) -> None:
        self.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass


LAST_END_TO_END: list[float] = []  # the last spon generate's tokens/s with its prompt and setup included


def spon_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s measured as llama.cpp's `predicted_per_second` is: from the first generated
    token to the last (the prompt's prefill and generate's setup excluded), EOS ignored (llama.cpp's
    `ignore_eos`: no end-of-text check, no logits processor keeping it out). The end-to-end rate of
    the same call is kept in LAST_END_TO_END."""
    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, streamer=clock)
    LAST_END_TO_END[:] = [new_tokens / (time.perf_counter() - t0)]
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens or len(clock.arrivals) != new_tokens + 1:
        raise RuntimeError(f"generate made {made} tokens, not {new_tokens}")
    return (new_tokens - 1) / (clock.arrivals[-1] - clock.arrivals[1])


@contextmanager
def unwrapped(model):
    """Plain nn.Linear everywhere (what runs without spon), restored afterwards."""
    from spon.kernel_backend import use_kernels
    from spon.model import find_projections
    from spon.sparse import SparseLinear

    use_kernels(model, False)
    swapped = [(p, p.module) for p in find_projections(model) if isinstance(p.module, SparseLinear)]
    for p, m in swapped:
        setattr(p.parent, p.attr, m.linear)
    try:
        yield model
    finally:
        for p, m in swapped:
            setattr(p.parent, p.attr, m)
        use_kernels(model, **model._peer_kernels)


@contextmanager
def at_thresholds(model, taus: dict[str, float]):
    from spon.sparse import set_thresholds, sparse_linears

    before = {m.name: float(m.threshold) for m in sparse_linears(model)}
    set_thresholds(model, taus)
    try:
        yield model
    finally:
        set_thresholds(model, before)


def realized_sparsity(model, ids: torch.Tensor, new_tokens: int) -> float:
    from spon.sparse import counting_zeros

    with counting_zeros(model) as z:
        spon_generate(model, ids, new_tokens)
    return float(dict(z)["weighted"])


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, block: int = 512) -> float:
    nll, count = 0.0, 0
    for i in range(0, stream.numel() - 1, block):
        chunk = stream[i : i + block + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1], use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def load_spon(args, dtype: str):
    """(model, tokenizer or None, source label): the checkpoint for --model, a seeded random shape."""
    from spon.sources import load_model

    if args.shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(torch.float32).eval()
        return model, None, f"{args.shape} (random weights, seed 0)"
    model, tok = load_model(args.model, dtype="fp32")
    return model, tok, args.model


def calibration(args, tok, vocab: int) -> torch.Tensor:
    if tok is None:
        return torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(1))
    from spon.calibration import text_blocks
    from spon.presets import wikitext2_validation

    spec = wikitext2_validation()
    if "files" not in spec:
        raise SystemExit("peer_decode: wikitext-2 validation text not found beside the repository")
    return text_blocks(tok, spec["files"], 128, 8)


def wikitext_test_stream(tok, tokens: int) -> torch.Tensor | None:
    from spon.assets import assets_root
    from spon.calibration import read_documents, token_stream

    path = assets_root() / "data" / "wikitext-2-raw" / "test.txt"
    if tok is None or not path.is_file() or tokens <= 0:
        return None
    return token_stream(tok, read_documents(path))[:tokens]


# ----------------------------------------------------------------------------- run
def build_variants(args, base_fp32, tok, source_gguf: Path | None, workdir: Path):
    """name -> (kind, precision, level, callable returning tok/s) plus spon models for ppl."""
    from spon.config import SparsityConfig
    from spon.kernel_backend import use_kernels
    from spon.sparse import SparseState, apply_sparse_state_, sparse_linears
    from spon.thresholds import compute_thresholds

    ids = (tok(args.prompt, return_tensors="pt").input_ids if tok is not None
           else torch.randint(0, base_fp32.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2)))
    calib = calibration(args, tok, base_fp32.config.vocab_size)
    variants, models, meta = {}, {}, {}
    levels = None
    pristine = _copy_as(base_fp32, torch.float32) if any(p != "fp32" for p in args.precisions) or args.shape else None
    for prec in args.precisions:
        # llama.cpp: the same weights in a GGUF at this precision
        if args.shape:
            path = write_shape_gguf(pristine, args.tokenizer_gguf, prec, workdir / f"{args.shape}-{prec}.gguf")
        else:
            path = rewrite_gguf(source_gguf, prec, workdir / f"{source_gguf.stem}-{prec}.gguf")
        if not args.no_llamacpp:
            srv = LlamaCpp(path, args.threads, ctx=ids.shape[1] + args.new_tokens + 64)
            meta["xllamacpp"] = srv.version
            variants[f"llama.cpp {prec}"] = ("llama.cpp", prec, None, lambda srv=srv: srv.generate(args.prompt, args.new_tokens)[0])
        # spon: the same tensors, sparse at each level
        model = base_fp32 if prec == "fp32" else _copy_as(pristine, torch.bfloat16)
        apply_sparse_state_(model, SparseState(mode="teal"))
        if levels is None:  # thresholds calibrated once (fp32 model), used at every precision
            levels = {s: (compute_thresholds(model, calib, SparsityConfig(sparsity=s))[0] if s > 0 else
                          {m.name: 0.0 for m in sparse_linears(model)}) for s in args.sparsities}
        weights = {"q8": "int8", "q4": "int4"}.get(prec, "float")
        model._peer_kernels = dict(weights=weights, int4_group=args.int4_group,
                                   head_weights=weights if args.head == "same" else "float")
        use_kernels(model, **model._peer_kernels)
        models[prec] = model
        from spon.kernel_backend import describe

        meta.setdefault("spon_path", {})[prec] = describe(model)
        if prec in ("fp32", "bf16"):
            variants[f"spon dense {prec}"] = ("spon dense", prec, None,
                                              lambda model=model: _timed(unwrapped(model), ids, args.new_tokens))
        for s, taus in levels.items():
            variants[f"spon {prec} @{s:.0%}"] = ("spon sparse", prec, s, lambda model=model, taus=taus:
                                                 _timed(at_thresholds(model, taus), ids, args.new_tokens))
        if args.compile:
            # spon has no int8 / int4 torch path: q8 and q4 compile on the kernels path only
            paths = args.compile_paths if prec in ("fp32", "bf16") else [p for p in args.compile_paths if p == "kernels"]
            for path in paths:
                for s, taus in levels.items():
                    variants[f"spon compiled {path} {prec} @{s:.0%}"] = (
                        f"spon compiled {path}", prec, s, compiled_variant(model, taus, path == "kernels", ids, args.new_tokens))
    return variants, models, levels, ids, meta


def compiled_variant(model, taus: dict[str, float], kernels: bool, ids, new_tokens: int):
    """A copy of `model` at these thresholds on one path, decoding through spon.compile_decode: a
    copy per variant, so the compiled graphs (thresholds are constants in the kernels' graph) are
    never recompiled when the rounds interleave the variants."""
    import copy

    from spon.kernel_backend import compile_decode, use_kernels
    from spon.sparse import set_thresholds

    use_kernels(model, False)  # a contiguous copy, not views of the groups' Wᵀ
    twin = copy.deepcopy(model)
    use_kernels(model, **model._peer_kernels)
    set_thresholds(twin, taus)
    use_kernels(twin, kernels, **model._peer_kernels)
    compile_decode(twin)
    return lambda: spon_generate(twin, ids, new_tokens)


def _copy_as(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)  # before any wrapping: plain nn.Linear weights


def _timed(ctx, ids, new_tokens) -> float:
    with ctx as model:
        return spon_generate(model, ids, new_tokens)


def table(result: dict) -> str:
    """One markdown table: tokens/s per precision, ratio over llama.cpp at the same precision."""
    rows = ["| precision | llama.cpp dense | spon dense | " + " | ".join(f"spon @{s:.0%}" for s in result["sparsities"])
            + " |", "|---|---|---|" + "---|" * len(result["sparsities"])]
    tok_s = result["tok_s"]
    for prec in result["precisions"]:
        ref = tok_s.get(f"llama.cpp {prec}")

        def cell(name):
            v = tok_s.get(name)
            if v is None:
                return "-"
            ppl = result["perplexity"].get(name)
            q = f", ppl {ppl:.2f}" if ppl else ""
            return f"{v:.2f} ({v / ref:.2f}x{q})" if ref else f"{v:.2f}{q}"

        rows.append(f"| {prec} | {ref:.2f} | " if ref else f"| {prec} | - | ")
        rows[-1] += cell(f"spon dense {prec}") + " | " + " | ".join(cell(f"spon {prec} @{s:.0%}") for s in result["sparsities"]) + " |"
        for path in ("torch", "kernels"):  # --compile: the compiled step on each path (its @0 %: nothing skipped)
            if any(k.startswith(f"spon compiled {path} {prec} ") for k in tok_s):
                rows.append(f"| {prec}, compiled, {path} path | {ref:.2f} | - | " if ref else f"| {prec}, compiled, {path} path | - | - | ")
                rows[-1] += " | ".join(cell(f"spon compiled {path} {prec} @{s:.0%}") for s in result["sparsities"]) + " |"
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="spon model name (its GGUF is the llama.cpp side), e.g. smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random weights of this shape instead")
    ap.add_argument("--tokenizer-gguf", type=Path, default=None,
                    help="--shape: the GGUF whose tokenizer the random model's GGUF carries (default: "
                         "SmolLM2-135M's, fetched as `spon models --fetch smollm2-135m` does)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of fp32, bf16, q8, q4")
    ap.add_argument("--sparsities", default="0,0.4,0.5,0.6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--int4-group", type=int, default=32, help="spon int4: inputs per scale (Q4_0 uses 32)")
    ap.add_argument("--head", choices=["same", "float"], default="same",
                    help="q8 / q4: spon's LM head at the projections' precision (as llama.cpp's files) or bf16")
    ap.add_argument("--ppl-tokens", type=int, default=25600, help="wikitext-2 test tokens for perplexity (0: skip)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--workdir", type=Path, default=None, help="where the GGUFs are written (default: spon's cache, peer/)")
    ap.add_argument("--no-llamacpp", action="store_true", help="spon only (no xllamacpp installed)")
    ap.add_argument("--compile", action="store_true", help="also spon.compile_decode (static cache, compiled step) "
                    "on the torch and the kernels path (q8 / q4: the kernels path)")
    ap.add_argument("--compile-paths", default="torch,kernels",
                    help="--compile: which paths (each variant holds its own model copy: at the 1B shape, mind the memory)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peer_decode.json")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.shape):
        ap.error("give one of --model, --shape")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in args.precisions):
        ap.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.compile_paths = [p.strip() for p in args.compile_paths.split(",") if p.strip()]
    if any(p not in ("torch", "kernels") for p in args.compile_paths):
        ap.error("--compile-paths: choose from torch, kernels")
    torch.set_num_threads(args.threads)
    if args.compile:  # one compiled decode step per variant (each its own model copy): more than dynamo's default 8
        from torch import _dynamo

        _dynamo.config.recompile_limit = 256
        _dynamo.config.accumulated_recompile_limit = 4096
    from spon import models as named_models
    from spon.assets import cache_root

    if args.shape and args.tokenizer_gguf is None:
        args.tokenizer_gguf = named_models.fetch("smollm2-135m")
    elif args.shape and not args.tokenizer_gguf.is_file():
        ap.error(f"--tokenizer-gguf {args.tokenizer_gguf}: no such file")
    args.workdir = args.workdir or cache_root() / "peer"
    args.workdir.mkdir(parents=True, exist_ok=True)

    base, tok, source = load_spon(args, "fp32")
    source_gguf = None
    if args.model:
        source_gguf = named_models.cached_file(args.model)
        if not source_gguf.is_file():
            ap.error(f"{source_gguf} not found: run `spon models --fetch {args.model}` first")
    result = {"source": source, "threads": args.threads, "new_tokens": args.new_tokens, "reps": args.reps,
              "precisions": args.precisions, "sparsities": args.sparsities, "int4_group": args.int4_group,
              "head": args.head,
              "cpu": cpu_info(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "commit": git_commit(),
              "loadavg_start": loadavg(), "command": "benchmarks/peer_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    variants, models, levels, ids, meta = build_variants(args, base, tok, source_gguf, args.workdir)
    result.update(meta)
    print(f"{len(variants)} variants; warm-up (load {loadavg()})", flush=True)
    result["warmup_s"] = {}  # the first generation of each variant: for a compiled one, its compile time is in it
    for name, (_, _, _, run) in variants.items():
        t0 = time.perf_counter()
        run()
        result["warmup_s"][name] = round(time.perf_counter() - t0, 1)
    times: dict[str, list[float]] = {k: [] for k in variants}
    end_to_end: dict[str, list[float]] = {k: [] for k, v in variants.items() if v[0] != "llama.cpp"}
    result["loadavg"] = []
    for r in range(args.reps):
        start, ticks = loadavg(), cpu_ticks()
        for name, (side, _, _, run) in variants.items():
            times[name].append(run())
            if side != "llama.cpp":
                end_to_end[name].append(LAST_END_TO_END[0])
        steal = stolen(ticks, cpu_ticks())
        result["loadavg"].append({"round": r, "start": start, "end": loadavg(), "steal": steal})
        print(f"round {r + 1}/{args.reps}: load {start} -> {loadavg()}, CPU time stolen {steal}", flush=True)
    result["tok_s_all"] = times
    result["tok_s"] = {k: statistics.median(v) for k, v in times.items()}
    result["tok_s_end_to_end"] = {k: statistics.median(v) for k, v in end_to_end.items()}
    result["kinds"] = {k: {"side": v[0], "precision": v[1], "sparsity": v[2]} for k, v in variants.items()}
    # realized sparsity (weighted by weight bytes) and perplexity of every spon variant
    result["realized_sparsity"], result["perplexity"] = {}, {}
    stream = wikitext_test_stream(tok, args.ppl_tokens)
    for prec, model in models.items():
        for s, taus in levels.items():
            name = f"spon {prec} @{s:.0%}"
            with at_thresholds(model, taus):
                result["realized_sparsity"][name] = realized_sparsity(model, ids, min(args.new_tokens, 32))
                if stream is not None:
                    result["perplexity"][name] = perplexity(model, stream)
        if stream is not None and prec in ("fp32", "bf16"):
            with unwrapped(model):
                result["perplexity"][f"spon dense {prec}"] = perplexity(model, stream)
    result["ppl_tokens"] = 0 if stream is None else int(stream.numel())
    result["loadavg_end"] = loadavg()
    result["table"] = table(result)
    write_report(args.out, result, result["table"],
                 f"{cpu_text(result['cpu'])}, {args.threads} threads, {args.new_tokens} new tokens, median of "
                 f"{args.reps}; load {result['loadavg_start']} -> {result['loadavg_end']}")
    return 0


def cpu_text(cpu: dict) -> str:
    return f"CPU {cpu['model']} ({', '.join(cpu['flags'])})"


def write_report(path: Path, result: dict, *lines: str) -> None:
    """The JSON at `path`, then `lines` (the table, the conditions) and where the JSON went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    for line in lines:
        print(line)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
