"""The sparse model at decode speed: SparseLinear backed by spon.kernels, shared inputs fused.

`use_kernels(model)` gives every SparseLinear a kernel backend for its sparse modes (teal, and
spon once fused): the Triton sparse GEMV on CUDA, the native gather-reduce op on CPU (<= 8 rows,
i.e. decode), the torch reference otherwise (prefill). Projections that read one input, q/k/v
and gate/up of a layer, become one group: the first member called runs one fused kernel for all
of them (one pass over the rows of the concatenated Wᵀ that survive, one launch, per-projection
thresholds) and the others take their slice. transformers' attention and MLP call them one after
another on the same tensor, so the group recognises its input by identity and version; a
different tensor (another architecture, a hook that rewrites it) falls back to the member's own
slice of the group's weight.

One copy of the weights: each member's W becomes a view of its group's Wᵀ (W = Wᵀ[:, cols].T),
so the dense mode (F.linear on a transposed view: same BLAS call, other flags) and the kernels
read the same memory. `use_kernels(model, False)` gives each linear a contiguous weight back
(what saving a checkpoint needs).

Per call the backend does as little Python as it can (a decode step is ~100 such calls per
30-layer model, and at width 576 the GEMV itself is ~10-50 us): thresholds and biases are read
into Python floats / concatenated once and kept until their tensors change (their `_version`).

`spon.kernels` (the custom-op registration, the triton probe, the native build) is imported inside
the functions that run the kernels, never at `import spon`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from spon.sparse import SparseLinear, sparse_linears

SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))  # projections of one layer that read the same tensor


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A tensor the kernels read, held as a frozen Parameter (same storage): in compile_decode's
    steps after a generate's first, dynamo still checks every plain tensor the step reads, but not
    Parameters. On SmolLM2 the groups' 120 Wᵀ as plain tensors cost 0.4 ms a token (README "Kernels")."""
    return nn.Parameter(t, requires_grad=False)


def _quantized(weight: torch.Tensor, weights: str, int4_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wᵀ quantized, its scales) of an [out, in] weight, as frozen Parameters: int8 per output
    column, or int4 per group of `int4_group` inputs and column."""
    from spon.kernels.reference import quantize_weight_int4, quantize_weight_int8

    q = quantize_weight_int8(weight) if weights == "int8" else quantize_weight_int4(weight, int4_group)
    return tuple(map(_frozen, q))


class KernelGroup:
    """Projections sharing one input, behind one concatenated Wᵀ [in, sum(out)]."""

    def __init__(self, members: list[SparseLinear], weights: str = "float", int4_group: int = 64):
        self.members = members
        self.out_features = [m.linear.out_features for m in members]
        self.weight_t = _frozen(torch.cat([m.linear.weight.detach() for m in members], dim=0).t().contiguous())
        start = 0
        self.cols: list[slice] = []
        for i, m in enumerate(members):
            cols = slice(start, start + self.out_features[i])
            start = cols.stop
            self.cols.append(cols)
            # The weight is frozen at inference; a view keeps one copy for dense and sparse modes.
            m.linear.weight = nn.Parameter(self.weight_t[:, cols].t(), requires_grad=False)
            m.kernel = self
            m.kernel_index = i
        # What the kernels read: Wᵀ itself, or (weights="int8" / "int4") a quantized copy of it with
        # its scales (int8: per output column; int4: per group of `int4_group` inputs and column).
        # The float Wᵀ stays: the members' dense mode reads it.
        self.weights = weights
        self.qweight_t, self.scales = self.weight_t, None
        if weights != "float":
            self.qweight_t, self.scales = _quantized(self.weight_t.t(), weights, int4_group)
        self._input: torch.Tensor | None = None
        self._input_version = 0
        self._outputs: list[torch.Tensor | None] = []
        self._left = 0
        self._consts_key = None
        self._taus: list[float] = []
        self._bias: torch.Tensor | None = None
        self._bias_f32: torch.Tensor | None = None  # what the native op reads (it sums in fp32)
        self._channel_taus: torch.Tensor | None = None  # [members, in] fp32: the weighted criterion's
        self._stash: tuple[torch.Tensor, ...] = ()  # compiled step: the group's outputs for members 2..

    def _constants(self, mode: str):
        """Per-projection thresholds (floats) and the concatenated bias of `mode`, recomputed only
        when a threshold or bias tensor was written since (fusion, set_thresholds)."""
        key = (mode, *((_version(m.threshold), _version(m.teal_threshold), _version(m.channel_norm),
                        _version(m.linear.bias), _version(m.fused_delta)) for m in self.members))
        if key != self._consts_key:
            self._taus = [float(m.tau()) for m in self.members]
            # Weighted criterion: one row of per-input-channel thresholds tau / c per member (a
            # magnitude member in the same group gets its tau in every channel).
            self._channel_taus = None
            if any(m.channel_norm is not None for m in self.members):
                k = self.weight_t.shape[0]
                self._channel_taus = _frozen(torch.stack([m.cutoff().float().expand(k) for m in self.members]).contiguous())
            biases = [m.sparse_bias() for m in self.members]
            if all(b is None for b in biases):
                self._bias = None
            else:
                w = self.weight_t
                self._bias = torch.cat([b.detach() if b is not None else w.new_zeros(n)
                                        for b, n in zip(biases, self.out_features)])
            self._bias_f32 = None if self._bias is None else _frozen(self._bias.float().contiguous())
            self._consts_key = key
        return self._taus, self._bias

    def forward(self, m: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        i = m.kernel_index
        if torch.compiler.is_compiling():
            return self._traced_forward(i, x)
        if self._left and x is self._input and x._version == self._input_version and self._outputs[i] is not None:
            y, self._outputs[i] = self._outputs[i], None
            self._left -= 1
            if not self._left:
                self._input, self._outputs = None, []  # nothing kept past the group's last call
            return y
        taus, bias = self._constants(m.mode)
        ys = self._run(x, taus if self._channel_taus is None else self._channel_taus, bias)
        if any(o.mode != m.mode for o in self.members):  # a group switched piecemeal: nothing to share
            return ys[i]
        self._input, self._input_version = x, x._version
        self._outputs = list(ys)
        self._outputs[i] = None
        self._left = len(ys) - 1
        return ys[i]

    def _traced_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The step torch.compile traces (compile_decode): no identity, version or id() checks
        (each would be a guard, and a recompile per layer). The group's first member runs the
        fused op and keeps the outputs for the others: transformers calls q before k and v, gate
        before up, so inside one graph the stash is always the current input's. The constants are
        the ones the eager prefill just computed (same mode: one generate call)."""
        if i:
            return self._stash[i]
        self._stash = self._run(x, self._taus if self._channel_taus is None else self._channel_taus, self._bias)
        return self._stash[0]

    def _run(self, x: torch.Tensor, taus: list[float] | torch.Tensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """`taus`: one threshold per member, or [members, in] per-channel thresholds (weighted).
        Decode on CPU (<= 4 rows) calls the native op directly: the public API's layers
        (argument normalisation, dispatch, threshold conversion; ~20-30 us of Python a call) cost
        as much as a 576-wide GEMV. Anything else goes through spon.kernels' dispatch."""
        # per-channel thresholds ride after the scales; the scalar ones stand in the op's tau slot
        channel = (taus,) if isinstance(taus, torch.Tensor) else ()
        y = _native_decode(x, self.weight_t.dtype, self.qweight_t, self._bias_f32, self._taus if channel else taus,
                           self.out_features, self.scales, *channel)
        if y is not None:
            return y.split(self.out_features, -1)
        from spon.kernels import sparse_linear_fused

        return sparse_linear_fused(x, self.qweight_t, self.out_features, bias, taus, self.scales)


class KernelSingle(KernelGroup):
    """A projection that shares its input with no other (o, down; any member of an incomplete
    group): a group of one, its own Wᵀ [in, out]."""

    def __init__(self, m: SparseLinear, weights: str = "float", int4_group: int = 64):
        super().__init__([m], weights, int4_group)


class KernelHead:
    """The dense LM head (and a tied input embedding) on the native op at decode: W·x over a
    [hidden, vocab] Wᵀ at the op's bandwidth, τ = -inf (every input kept, NaN too: F.linear's
    numbers). At SmolLM2's width the head is a fifth of a sparse step's bytes, and F.linear reads it
    slower than the op (2 threads: fp32 7.5 vs 3.4 ms, bf16 2.8 vs 1.9 ms on an AMD EPYC).
    One copy: the head's weight, and the embedding's when tied, become views of Wᵀ (an embedding
    lookup reads a strided column, a prefill's F.linear a transposed view). Prefill, GPUs and
    anything the op does not take run F.linear as before."""

    def __init__(self, model, head: nn.Linear, weights: str = "float", int4_group: int = 64):
        embed = model.get_input_embeddings()
        tied = embed is not None and embed.weight is head.weight
        self.weight_t = _frozen(head.weight.detach().t().contiguous())
        self.bias_f32 = None if head.bias is None else _frozen(head.bias.detach().float().contiguous())
        weight = nn.Parameter(self.weight_t.t(), requires_grad=False)
        head.weight = weight
        if tied:
            embed.weight = weight
        self.head, self.embed = head, (embed if tied else None)
        self.vocab = [self.weight_t.shape[1]]
        # weights="int8" / "int4": the head's logits come from a quantized copy of Wᵀ, at decode
        # and prefill alike (as llama.cpp's Q8_0 / Q4_0 files quantize the output matrix); the float
        # Wᵀ stays for a tied embedding's lookups. int4 needs the vocabulary a multiple of 32 and the
        # width of int4_group: a head that is not keeps its float weights (`self.weights` says which).
        hidden, vocab = self.weight_t.shape
        if weights == "int4" and (vocab % 32 or hidden % int4_group):
            weights = "float"
        self.weights, self.qweight_t, self.scales = weights, self.weight_t, None
        if weights != "float":
            self.qweight_t, self.scales = _quantized(weight, weights, int4_group)
        head.forward = self.forward  # an instance attribute: the module, its name and state_dict stay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        every = float("-inf")  # keep every input: a dense GEMV
        y = _native_decode(x, self.weight_t.dtype, self.qweight_t, self.bias_f32, [every], self.vocab, self.scales)
        if y is not None:
            return y
        if self.weights == "float":
            return nn.functional.linear(x, self.head.weight, self.head.bias)
        from spon.kernels import sparse_linear_int4, sparse_linear_int8

        f = sparse_linear_int8 if self.weights == "int8" else sparse_linear_int4
        return f(x, self.qweight_t, self.scales, self.head.bias, every)

    def remove(self) -> None:
        """Plain contiguous weights again (tied ones still one Parameter), F.linear's forward."""
        del self.head.forward
        weight = nn.Parameter(self.head.weight.detach().contiguous(), requires_grad=False)
        self.head.weight = weight
        if self.embed is not None:
            self.embed.weight = weight
        self.head.kernel_head = None


# The native CPU op, looked up once outside any traced code (compile_decode): native_op() builds
# or loads a library, which dynamo cannot trace.
_NATIVE: dict = {"op": None}


def _native_op():
    """The native CPU op, or None. Inside a traced step the one compile_decode looked up."""
    if torch.compiler.is_compiling():
        return _NATIVE["op"]
    from spon.kernels.cpu_native import native_op  # cached in sys.modules after the first call

    return native_op()


def _native_decode(x: torch.Tensor, dtype: torch.dtype, *op_args) -> torch.Tensor | None:
    """The native op on x's rows (`op_args`: the op's arguments after x), shaped like x but for its
    last dimension; None where the op does not apply (more than 4 rows, not CPU, another dtype,
    no native build)."""
    rows = x.numel() // x.shape[-1]
    if rows > 4 or x.device.type != "cpu" or x.dtype != dtype:
        return None
    op = _native_op()
    if op is None:
        return None
    y = op(x.reshape(rows, -1), *op_args)
    return y.view(*x.shape[:-1], y.shape[-1])


def _output_head(model):
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def compile_decode(model, enabled: bool = True) -> None:
    """Decode through a static KV cache and a torch.compile'd step, inside transformers' own
    `generate`: its prefill stays eager, every later step runs one compiled graph (attention,
    norms, RoPE and casts fused by inductor; the sparse kernels, when on, called as custom ops).
    What it removes is the per-token Python and small-op overhead that sparsity does not touch
    (issue #26: about half of a SmolLM2 step). The first `generate` compiles (tens of seconds on
    a CPU), and so does one whose thresholds, kernel state or cache length differ: worth it for a
    server or a notebook that generates many times, not for one short answer.
    `enabled=False` goes back to the dynamic cache and eager steps."""
    from transformers.generation.configuration_utils import CompileConfig

    gc = model.generation_config
    vars(model).pop("get_compiled_call", None)
    attention_before = vars(model).pop("_spon_attention_before", None)
    if attention_before is not None:
        model.set_attn_implementation(attention_before)
    if not enabled:
        gc.cache_implementation, gc.compile_config = None, None
        return
    device = next(model.parameters()).device
    if device.type == "cpu":
        from spon.kernels.cpu_native import native_op

        _NATIVE["op"] = native_op()
        if model.config._attn_implementation == "sdpa":
            _register_decode_attention()
            model.set_attn_implementation(DECODE_ATTENTION)
            vars(model)["_spon_attention_before"] = "sdpa"
    # "reduce-overhead" (CUDA graphs) is transformers' default; a CPU has none.
    config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    # transformers compiles the step only on accelerators unless this flag (its own CPU tests set it)
    # says otherwise; on a CPU the compiled step is the faster one (README "Kernels").
    config._compile_all_devices = True
    gc.cache_implementation, gc.compile_config = "static", config
    model.get_compiled_call = _guarded_once_per_generate(model)


DECODE_ATTENTION = "spon_decode"  # the attention implementation compile_decode gives a CPU model


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except for one query token (a decode step) without extras: there
    the plain softmax(q·kᵀ·scale)·v, which inductor fuses into the compiled step: on a CPU the sdpa
    kernel's cost per call outweighs the work of so small a query (README "Kernels": the numbers)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extras = {k for k, v in kwargs.items() if v is not None} & {"softcap", "sinks", "s_aux", "position_bias"}
    plain_mask = attention_mask is None or attention_mask.dtype == torch.bool
    if query.shape[2] != 1 or dropout or extras or not plain_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale  # [batch, heads, 1, keys]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


@functools.cache
def _register_decode_attention() -> None:
    """Registered once per process, with sdpa's boolean masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def _guarded_once_per_generate(model):
    """transformers' get_compiled_call, whose step checks dynamo's guards on its first call in each
    `generate` only. Those guards (~2,800 on SmolLM2: every threshold, mode and kernel attribute the
    step reads) cost ~2 ms a token; nothing they check changes inside one `generate` (the kernels'
    stash assumes the same), so the later steps skip them (torch's skip_guard_eval_unsafe stance)
    and the first step of every `generate` still recompiles whatever changed since the last."""
    compiled_call = type(model).get_compiled_call

    def get_compiled_call(compile_config):
        step = compiled_call(model, compile_config)
        checked = False

        def call(*args, **kwargs):
            nonlocal checked
            if not checked:
                checked = True
                return step(*args, **kwargs)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return step(*args, **kwargs)

        return call

    return get_compiled_call


def _version(t: torch.Tensor | None) -> tuple[int, int] | None:
    """Which tensor, and how often written in place: fusion replaces or updates biases."""
    return None if t is None else (id(t), t._version)


def use_kernels(model, enabled: bool = True, weights: str = "float", int4_group: int = 64,
                head_weights: str = "float") -> None:
    """Route sparse (teal / fused spon) inference through spon.kernels, q/k/v and gate/up fused;
    one copy of the weights. Same numbers as the torch path within fp32 rounding (masks can flip
    where |x| is within rounding of tau); training and calibration always use torch.
    `enabled=False` restores plain contiguous weights. `weights="int8"` (per output channel) or
    `"int4"` (group-wise, `int4_group` inputs per scale; every projection's width a multiple of 32)
    makes the kernels read a quantized copy of each group's Wᵀ (the sparse modes then compute with
    the quantized weights, at decode and prefill alike; the dense mode keeps the float ones).
    `head_weights` does the same for a CPU model's dense LM head (KernelHead)."""
    for name, value in (("weights", weights), ("head_weights", head_weights)):
        if value not in ("float", "int8", "int4"):
            raise ValueError(f"{name}={value!r}: choose float, int8 or int4")
    mods = sparse_linears(model)
    for m in mods:
        if m.kernel is not None:
            m.linear.weight = nn.Parameter(m.linear.weight.detach().contiguous(), requires_grad=False)
            m.kernel = None
    head = _output_head(model)
    if getattr(head, "kernel_head", None) is not None:
        head.kernel_head.remove()
    if not enabled:
        return
    if isinstance(head, nn.Linear) and head.weight.device.type == "cpu" and mods:
        head.kernel_head = KernelHead(model, head, head_weights, int4_group)
    layers: dict[str, dict[str, SparseLinear]] = {}
    for m in mods:
        layer, _ = m.name.rsplit(".", 1)
        layers.setdefault(layer, {})[m.kind] = m
    for by_kind in layers.values():
        for kinds in SHARED_INPUT:
            if all(k in by_kind for k in kinds):
                KernelGroup([by_kind[k] for k in kinds], weights, int4_group)
        for m in by_kind.values():
            if m.kernel is None:
                KernelSingle(m, weights, int4_group)


def describe(model) -> str:
    """Which path a decode step of `model` takes, in words (what `spon generate` prints): the sparse
    kernels (native CPU op with the instruction set it was built for, its embedding_bag fallback,
    or Triton on CUDA) with how many fused groups and which weight format, or the torch path."""
    groups = {id(m.kernel): m.kernel for m in sparse_linears(model) if m.kernel is not None}
    if not groups:
        return "torch path (spon.sparse, F.linear on the masked input; kernels off)"
    first = next(iter(groups.values()))
    device = first.weight_t.device
    fused = sum(len(g.members) > 1 for g in groups.values())
    what = f"{len(groups)} kernel groups ({fused} fused q/k/v or gate/up), {first.weights} weights"
    kernel_head = getattr(_output_head(model), "kernel_head", None)
    if kernel_head is not None and device.type == "cpu":
        what += ", dense LM head on the native op" + ("" if kernel_head.weights == "float" else f" ({kernel_head.weights})")
    if device.type == "cuda":
        from spon.kernels.triton_sparse_gemv import HAS_TRITON

        return f"sparse kernels: Triton on CUDA, {what}" if HAS_TRITON else f"torch reference on CUDA (no triton), {what}"
    from spon.kernels import cpu_native

    if cpu_native.native_op() is None:
        return f"sparse kernels: embedding_bag fallback (native op unavailable), {what}"
    return f"sparse kernels: native CPU op ({cpu_native.instruction_set()}), {what}"


DECODE_PATH_FILE = "decode_path.json"  # under spon.assets.cache_root(): the measured choices, per machine and model shape


def _decode_path_key(model) -> str:
    """What the faster path depends on: the CPU (or GPU), threads, the model's shape, dtype and
    sparsity, and the kernels' own code. Not the weights' values."""
    from pathlib import Path

    import spon.kernels
    from spon.digest import content_key
    from spon.model import host

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "vocab_size")}
    mods = sparse_linears(model)
    taus = sorted({round(float(m.tau()), 3) for m in mods})  # the sparsity the kernels skip at, coarsely
    device = next(model.parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else host()["cpu"]
    code = Path(spon.kernels.__file__).resolve().parent  # kernels/ (installed as spon.kernels): the sources, not __pycache__
    return content_key({"device": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "shape": shape, "dtype": str(next(model.parameters()).dtype), "modes": sorted({m.mode for m in mods}),
                        "taus": taus[:8] + taus[-8:], "kernels_code": [code / "csrc", code / "cpu_native.py", code / "ops.py"],
                        "backend_code": Path(__file__)})


@torch.no_grad()
def choose_decode_path(model, input_ids: torch.Tensor, new_tokens: int = 8, rounds: int = 3,
                       remember: bool = True) -> dict:
    """Leave `model` on whichever decode path is faster here, the sparse kernels or the torch path,
    and say which: {"path": "kernels" | "torch", "tokens_per_s": {path: median}, "remembered": bool}.

    Measured, not assumed: the kernels skip the weight rows of zeroed inputs, but at a small
    model's width a decode step is mostly not weight streaming, and the native op at 0 % is slower
    than F.linear on some CPUs (issue #26: SmolLM2 and Gemma-3 on an AVX-512 Xeon). Each path runs
    `new_tokens` greedy steps on the first 16 prompt tokens, the two interleaved over `rounds`
    rounds (the median counts). The choice is remembered per device, threads, model shape, dtype,
    sparsity and kernel code in <spon cache>/decode_path.json, so later calls only look it up
    (with the load average it was measured at; delete the file to measure again)."""
    import json
    import statistics
    import time

    from spon.assets import cache_root

    store = cache_root() / DECODE_PATH_FILE
    key = _decode_path_key(model)
    known = {}
    if remember and store.is_file():
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged file is measured again and rewritten
    if key in known and known[key].get("path") in ("kernels", "torch"):
        use_kernels(model, known[key]["path"] == "kernels")
        return {**known[key], "remembered": True}

    ids = input_ids[:, :16]
    mask = torch.ones_like(ids)
    seconds: dict[str, list[float]] = {"kernels": [], "torch": []}
    for r in range(rounds + 1):  # round 0 warms both paths up (first calls build and page in)
        for path in ("kernels", "torch"):
            use_kernels(model, path == "kernels")
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
            if r:
                seconds[path].append(time.perf_counter() - t0)
    rate = {p: round(new_tokens / statistics.median(s), 2) for p, s in seconds.items()}
    path = max(rate, key=rate.get)
    use_kernels(model, path == "kernels")
    import os

    # a choice measured on a busy machine can be wrong: the load says so (delete the file to measure again)
    choice = {"path": path, "tokens_per_s": rate, "load_avg_1min": round(os.getloadavg()[0], 2)}
    if remember:
        known[key] = choice
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=2))
            tmp.replace(store)
        except OSError:
            pass  # a read-only cache only costs the measurement next time
    return {**choice, "remembered": False}
