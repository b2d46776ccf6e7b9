"""transformers' from_pretrained of a directory or hub id (load_pretrained; what a model string
names, GGUF and named models: spon.sources.load_model) and the architecture adapter that finds
the seven sparsifiable projections.

Llama, Mistral, Qwen2, Qwen3, Gemma-2 and Gemma-3 (text, model_type gemma3_text) share one
layout: `model.layers[i].self_attn.{q,k,v,o}_proj` and `model.layers[i].mlp.{gate,up,down}_proj`.
They differ in which projections can carry a bias, which matters for fusion (b' = b + W alpha
needs a bias slot), and in what sits around the projections (Gemma: norms after attention and
MLP, q/k norms, a scaled embedding, sliding-window layers, logit soft-capping), which the method
does not touch: S and alpha act at the linears' inputs only (README "Gemma").
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spon.errors import SponError
from spon.format import ATTENTION, MLP, PROJECTIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Which config flag turns on the bias of each projection, per architecture. "always" means the
# architecture builds that projection with a bias regardless of config; None means it never has
# one, so alpha cannot be fused into a vanilla checkpoint there (it goes to the sidecar instead).
BIAS_FLAGS: dict[str, dict[str, str | None]] = {
    "llama": {**{p: "attention_bias" for p in ATTENTION}, **{p: "mlp_bias" for p in MLP}},
    "mistral": {p: None for p in PROJECTIONS},
    "qwen2": {"q": "always", "k": "always", "v": "always", "o": None, "gate": None, "up": None, "down": None},
    "qwen3": {**{p: "attention_bias" for p in ATTENTION}, "gate": None, "up": None, "down": None},
    # Gemma-2 and Gemma-3: q/k/v/o follow `attention_bias` (False in every released model); the
    # GeGLU MLP is built with bias=False unconditionally (no config flag), so its alpha stays in
    # the sidecar and is fused at load.
    "gemma2": {**{p: "attention_bias" for p in ATTENTION}, "gate": None, "up": None, "down": None},
    "gemma3_text": {**{p: "attention_bias" for p in ATTENTION}, "gate": None, "up": None, "down": None},
}
SUPPORTED = tuple(BIAS_FLAGS)
# from_pretrained initialises on the meta device through process-global state: two threads loading
# at once (a sweep's fanned-out tasks) can leave one model's parameters on meta. Load one at a time.
_LOAD_LOCK = threading.Lock()


def torch_dtype(dtype: str) -> torch.dtype:
    """fp32 / bf16 / fp16 -> the torch dtype; anything else is a one-line SponError."""
    if dtype not in DTYPES:
        raise SponError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_pretrained(path_or_hub_id: str | Path, device: str = "cpu", dtype: str = "fp32",
                    device_map: str | None = None):
    """transformers' from_pretrained of a local model directory or hub id, in eval mode with no
    gradients. Returns (model, tokenizer). Which string is which, named models and GGUF files:
    spon.sources.load_model, which resolves them to one of these first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": torch_dtype(dtype)}
    name = str(path_or_hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        _offline_for_local_assets()
        name = str(path)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise SponError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    check_tokenizer(model, tokenizer)
    return model, tokenizer


def _offline_for_local_assets() -> None:
    # A local directory never needs the hub; stay offline so no call hangs on a closed network.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def check_tokenizer(model, tokenizer) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise SponError(
            f"tokenizer/model mismatch: tokenizer has {len(tokenizer)} tokens, model embeds {vocab}"
        )


@dataclass(frozen=True)
class Projection:
    """One sparsifiable linear: where it lives and what kind it is."""

    layer: int
    kind: str  # one of PROJECTIONS
    parent: nn.Module
    attr: str  # attribute name on parent, e.g. "q_proj"

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)


def decoder_layers(model) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise SponError(_unsupported(model, "no `model.layers`"))
    return layers


def find_projections(model, kinds=PROJECTIONS) -> list[Projection]:
    """All (layer, projection) linears of a model of one of the SUPPORTED architectures."""
    arch = getattr(model.config, "model_type", "?")
    if arch not in SUPPORTED:
        raise SponError(_unsupported(model, f"model_type {arch!r}"))
    unknown = set(kinds) - set(PROJECTIONS)
    if unknown:
        raise SponError(f"unknown projection(s) {sorted(unknown)}; choose from {list(PROJECTIONS)}")
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        for kind in PROJECTIONS:
            if kind not in kinds:
                continue
            parent = layer.self_attn if kind in ATTENTION else layer.mlp
            attr = f"{kind}_proj"
            if not hasattr(parent, attr):
                raise SponError(_unsupported(model, f"layer {i} has no {attr}"))
            found.append(Projection(i, kind, parent, attr))
    return found


def bias_slot(model, kind: str) -> str | None:
    """The config flag that gives projection `kind` a bias ("always" if built-in), or None."""
    return BIAS_FLAGS[model.config.model_type][kind]


def _unsupported(model, why: str) -> str:
    names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return (
        f"unsupported architecture ({why}); supported: {', '.join(SUPPORTED)}; "
        f"linear modules found: {', '.join(names) or 'none'}"
    )


def host() -> dict:
    """What the numbers depend on beyond the config: float reductions differ between CPU kinds
    and thread counts (the same kind and count reproduce a run bit for bit)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
