"""Weight-only quantization of a (fused) sparse model: int8, int4, nf4.

Only the weights of the sparsified projections are quantized: the inner `nn.Linear` that each
SparseLinear wraps. Everything the method adds stays in floating point: the thresholds, alpha,
the fused bias b' = b + W alpha and fused_delta (so dense/teal modes of the same quantized
weights remain available). Embeddings, norms and the (tied) lm_head are left untouched.

Backends, imported lazily so the method itself never needs them:
  int8  torchao Int8WeightOnlyConfig (CPU and CUDA)
  int4  CPU: torchao IntxWeightOnlyConfig(int4, PerGroup(g)); CUDA: Int4WeightOnlyConfig(group_size=g)
  nf4   bitsandbytes NF4 (the paper's setting; CUDA, and CPU with bitsandbytes >= 0.46)

Saving: torchao's tensor subclasses are flattened to plain tensors + JSON metadata with
torchao.prototype.safetensors and written with safetensors -- no pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from spon.errors import SponError
from spon.format import ALPHA_FILE, CHANNEL_NORMS_FILE, SIDECAR
from spon.sparse import SparseLinear, set_thresholds, sparse_linears, thresholds_of

log = logging.getLogger(__name__)
SCHEMES = ("int8", "int4", "nf4")
QUANT_FILE = "quantized.safetensors"
QUANT_META = "quantization.json"
# What a quantized directory keeps from its fused source (no fp weights).
_COPY = ("config.json", "generation_config.json", SIDECAR, ALPHA_FILE, CHANNEL_NORMS_FILE)


def _torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError as e:
        raise SponError("int8/int4 quantization needs torchao: pip install 'spon[eval]'") from e
    return quantize_


def _inner_linear_filter(wanted: set[int] | None = None):
    """quantize_ filter: exactly the nn.Linear inside a SparseLinear (its fqn ends in '.linear')."""

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn.endswith(".linear") and (wanted is None or id(module) in wanted)

    return keep


def _int4_config(device: torch.device, group_size: int, in_features: int):
    import torchao.quantization as q
    from torchao.quantization.granularity import PerAxis, PerGroup

    if device.type == "cuda":  # tinygemm / preshuffled int4 kernels, GPU only
        return q.Int4WeightOnlyConfig(group_size=group_size)
    # Groups must tile the input dimension (stories260K's down_proj has 172 inputs): fall back to
    # one scale per output row there rather than padding the weight.
    gran = PerGroup(group_size) if in_features % group_size == 0 else PerAxis(0)
    return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=gran)


@torch.no_grad()
def quantize_model(model, scheme: str, group_size: int = 32) -> dict:
    """Quantize the inner linear weights of every SparseLinear in place. Returns a description."""
    if scheme not in SCHEMES:
        raise SponError(f"unknown quantization {scheme!r}; choose one of {SCHEMES}")
    mods = sparse_linears(model)
    if not mods:
        raise SponError("quantize_model expects a sparsified model (spon.sparse.sparsify / load_sparse_model)")
    for m in mods:
        if m.linear.bias is not None and m.linear.bias.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SponError(f"{m.name}: bias must stay floating point")
    if scheme == "nf4":
        _quantize_nf4(mods)
        return {"scheme": scheme, "backend": "bitsandbytes", "config": "Params4bit(nf4, blocksize 64)"}
    quantize_ = _torchao()
    device = mods[0].linear.weight.device
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_inner_linear_filter())
        return {"scheme": scheme, "backend": "torchao", "config": "Int8WeightOnlyConfig"}
    # int4: the config depends on each layer's input width, so group layers by it.
    per_row = []
    for width in sorted({m.linear.in_features for m in mods}):
        group = {id(m.linear) for m in mods if m.linear.in_features == width}
        quantize_(model, _int4_config(device, group_size, width), filter_fn=_inner_linear_filter(group))
        if device.type != "cuda" and width % group_size:
            per_row.append(width)
    if per_row:
        log.info("int4: in_features %s not divisible by group %d: per-row scales there", per_row, group_size)
    return {
        "scheme": scheme, "backend": "torchao",
        "config": "Int4WeightOnlyConfig" if device.type == "cuda" else "IntxWeightOnlyConfig(int4)",
        "group_size": group_size, "per_row_in_features": per_row,
    }


def _quantize_nf4(mods: list[SparseLinear]) -> None:
    """NF4 (bitsandbytes) weights behind the plain F.linear call SparseLinear makes.

    SparseLinear calls F.linear(x, linear.weight, bias) itself (it needs to pick the bias per
    mode), so swapping in bnb's Linear4bit module would not be enough: its packed Params4bit is
    not an F.linear operand. NF4Weight wraps it and routes F.linear to bnb.matmul_4bit.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        where = "" if torch.cuda.is_available() else " (bitsandbytes >= 0.46 also runs NF4 on CPU)"
        raise SponError(f"nf4 needs bitsandbytes: pip install bitsandbytes{where}; or use int8/int4") from e
    for m in mods:
        w = m.linear.weight
        packed = bnb.nn.Params4bit(w.data.cpu(), requires_grad=False, quant_type="nf4")
        packed = packed.to(w.device)  # the move is what quantizes a Params4bit
        m.linear = NF4Linear(NF4Weight(packed, tuple(w.shape), w.dtype), m.linear.bias)


class NF4Linear(nn.Module):
    """Holds an NF4Weight (not an nn.Parameter: it is frozen and packed) and the fp bias."""

    def __init__(self, weight: "NF4Weight", bias: nn.Parameter | None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class NF4Weight(torch.Tensor):
    """A [out, in] weight whose storage is a bitsandbytes NF4 Params4bit; supports F.linear."""

    @staticmethod
    def __new__(cls, packed, shape, dtype):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)
        t.packed = packed
        return t

    def __init__(self, packed, shape, dtype):
        self.packed = packed

    @property
    def tensor_data_names(self):  # storage accounting, as torchao's subclasses report it
        return ["packed"]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            import bitsandbytes as bnb

            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = bnb.matmul_4bit(x, w.packed.t(), bias=None, quant_state=w.packed.quant_state)
            return out if bias is None else out + bias.to(out.dtype)
        if func in (torch.Tensor.numel, torch.Tensor.dim, torch.Tensor.size) or getattr(func, "__name__", "") in (
            "__get__", "shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn",
        ):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise SponError(f"NF4 weights support F.linear only (got {getattr(func, '__name__', func)})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise SponError(f"NF4 weights support F.linear only (aten {func})")


def quantized_weight_bytes(model) -> int:
    """Storage of the sparse projections' weights (what decode streams), after quantization."""
    total = 0
    for m in sparse_linears(model):
        w = m.linear.weight
        parts = [getattr(w, n) for n in getattr(w, "tensor_data_names", [])] or [w]
        total += sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return total


def save_quantized(model, tokenizer, out_dir: str | Path, source_dir: str | Path, info: dict) -> Path:
    """Write a self-contained quantized directory: safetensors (flattened torchao tensors) + sidecars."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    if info.get("scheme") == "nf4":
        raise SponError("saving nf4 models is not supported; save the fused fp checkpoint and quantize on load")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape)) if not hasattr(v, "tensor_data_names") else id(v)
        if key in seen:  # tied lm_head: written once, re-tied on load
            continue
        seen.add(key)
        state[k] = v.detach().contiguous() if type(v) is torch.Tensor else v
    tensors, meta = flatten_tensor_state_dict(state)
    save_file(tensors, str(out / QUANT_FILE), metadata=meta)
    for name in _COPY:
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, out / name)
    tokenizer.save_pretrained(out)
    (out / QUANT_META).write_text(json.dumps({**info, "source": str(source_dir)}, indent=2))
    return out


def load_quantized(model_dir: str | Path, device: str = "cpu"):
    """Load a directory written by save_quantized. Returns (model, tokenizer, sidecar) in spon mode."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spon.fuse import read_channel_norms, read_sidecar
    from spon.sparse import SparseState, apply_sparse_state_

    d = Path(model_dir)
    if not (d / QUANT_META).is_file():
        raise SponError(f"{d} is not a quantized spon model: no {QUANT_META}")
    _torchao()
    meta = read_sidecar(d)
    config = AutoConfig.from_pretrained(d)
    model = AutoModelForCausalLM.from_config(config)  # skeleton; every persistent tensor is replaced below
    # Thresholds, alpha and the fused biases come with the state dict below.
    apply_sparse_state_(model, SparseState(targets=meta["targets"], protocol=meta.get("protocol", "all"), mode="spon",
                                           criterion=meta.get("criterion", "magnitude"),
                                           channel_norms=read_channel_norms(d, meta)))
    for m in sparse_linears(model):  # declare the buffer so the state dict key is accepted
        m.fused_delta = torch.empty(m.linear.out_features)
        if m.linear.bias is None:
            m.linear.bias = nn.Parameter(torch.empty(m.linear.out_features), requires_grad=False)
    with safe_open(str(d / QUANT_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise SponError(f"{d / QUANT_FILE}: unrecognised tensors {sorted(leftover)[:5]}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SponError(f"{d}: state mismatch, missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    if meta.get("teal_thresholds"):  # the state dict holds SPON's tau; TEAL (the baseline) runs its own
        set_thresholds(model, thresholds_of(model), teal=meta["teal_thresholds"])
    model.to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(d), meta
