"""Fusion b' = b + W alpha, the fused checkpoint, its sidecar, and the loader.

The checkpoint is a standard transformers directory (safetensors + config.json with
`attention_bias`/`mlp_bias` turned on where alpha lives) that vanilla
`AutoModelForCausalLM.from_pretrained` loads. Projections whose architecture has no bias slot
(Mistral everywhere; Qwen2 o/gate/up/down; Qwen3 gate/up/down) cannot carry b' in a vanilla
checkpoint: their alpha is kept in the sidecar and the spon loader fuses it on load. The directory
also carries its own modeling code (spon.remote_code: `trust_remote_code=True` gives the sparse
model without spon) and a model card.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spon.errors import SponError
from spon.model import bias_slot, load_model
from spon.remote_code import install as install_remote_code, write_model_card
from spon.sparse import SparseLinear, SparsifyConfig, channel_norms, sparse_linears, sparsify_

log = logging.getLogger(__name__)
SIDECAR = "spon.json"
ALPHA_FILE = "spon_alpha.safetensors"
CHANNEL_NORMS_FILE = "spon_channel_norms.safetensors"  # the weighted criterion's c = ||W[:, i]||_2
# spon/1: TEAL's magnitude criterion. spon/2 adds `criterion` (and, for "weighted", the channel
# norms file): a reader that knows only spon/1 must refuse it rather than apply tau to |x|.
FORMAT = "spon/1"
FORMATS = ("spon/1", "spon/2")


@torch.no_grad()
def fuse_alpha(model, already_fused: set[str] = frozenset()) -> None:
    """In memory: bias <- b + W alpha for every sparse linear, so spon mode costs what teal costs.
    Names in `already_fused` come from a fused checkpoint whose bias holds b + W alpha already:
    only W alpha is recorded, so dense and teal modes can undo it."""
    for m in sparse_linears(model):
        if m.fused:
            continue
        delta = weight_times_alpha(m)
        if m.name in already_fused:
            m.fused_delta = delta
            continue
        w = m.linear.weight
        if m.linear.bias is None:
            m.linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
        m.linear.bias.copy_((m.linear.bias.double() + delta.double()).to(w.dtype))
        m.fused_delta = delta


def weight_times_alpha(m: SparseLinear) -> torch.Tensor:
    """W alpha in float64, rounded once to the weight dtype (keeps fused == unfused to ~1 ulp)."""
    w = m.linear.weight
    return (w.double() @ m.alpha.double()).to(w.dtype)


def fusable(model, kind: str) -> bool:
    return bias_slot(model, kind) is not None


@contextmanager
def _vanilla_view(model):
    """Temporarily swap each SparseLinear for a plain nn.Linear sharing its weight, carrying b'
    where the architecture has a bias slot and the original bias elsewhere; set config flags."""
    mods = sparse_linears(model)
    flags = {bias_slot(model, m.kind) for m in mods if bias_slot(model, m.kind) not in (None, "always")}
    old_flags = {f: getattr(model.config, f) for f in flags}
    swapped = []
    for f in flags:
        setattr(model.config, f, True)
    # Every projection that the flags give a bias to needs one, zero where no alpha was trained.
    from spon.model import find_projections

    for p in find_projections(model):
        mod = p.module
        slot = bias_slot(model, p.kind)
        inner = mod.linear if isinstance(mod, SparseLinear) else mod
        w = inner.weight
        if isinstance(mod, SparseLinear):
            bias = mod.linear.bias if slot is not None else mod._original_bias()
        else:
            bias = inner.bias
        if slot in flags and bias is None:
            bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        plain = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        plain.weight = w
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach(), requires_grad=False)
        setattr(p.parent, p.attr, plain)
        swapped.append((p, mod))
    try:
        yield
    finally:
        for p, mod in swapped:
            setattr(p.parent, p.attr, mod)
        for f, v in old_flags.items():
            setattr(model.config, f, v)


def save_fused(model, tokenizer, out_dir: str | Path, metadata: dict) -> Path:
    """Write the fused checkpoint + sidecar. `model` must be sparsified with alpha trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fuse_alpha(model)
    mods = sparse_linears(model)
    unfusable = sorted({m.kind for m in mods if not fusable(model, m.kind)})
    if unfusable:
        log.warning(
            "%s has no bias parameter for projection(s) %s: their alpha cannot be fused into a vanilla "
            "checkpoint; it is stored in %s and fused by spon.load_sparse_model",
            model.config.model_type, ", ".join(unfusable), ALPHA_FILE,
        )
    with _vanilla_view(model):
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_file({m.name: m.alpha.detach().float().cpu().contiguous() for m in mods}, str(out / ALPHA_FILE))
    norms = channel_norms(model)
    if norms:
        save_file(norms, str(out / CHANNEL_NORMS_FILE))
    sidecar = {
        "format": "spon/2" if norms else FORMAT,
        "criterion": "weighted" if norms else "magnitude",
        "thresholds": {m.name: float(m.threshold) for m in mods},
        "targets": sorted({m.kind for m in mods}, key="q k v o gate up down".split().index),
        "fused_in_checkpoint": {m.name: fusable(model, m.kind) for m in mods},
        "unfusable_projections": unfusable,
        **metadata,
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    install_remote_code(out)
    write_model_card(out)
    return out


def read_sidecar(model_dir: str | Path) -> dict:
    path = Path(model_dir) / SIDECAR
    if not path.is_file():
        raise SponError(f"{model_dir} is not a spon model: no {SIDECAR}")
    meta = json.loads(path.read_text())
    if meta.get("format") not in FORMATS:
        raise SponError(f"{path}: unknown format {meta.get('format')!r}, expected one of {', '.join(FORMATS)}")
    return meta


def load_sparse_model(model_dir: str | Path, device: str = "cpu", dtype: str = "fp32", device_map: str | None = None):
    """Load a fused spon checkpoint as a sparse model in spon mode, ready to generate.

    Returns (model, tokenizer, sidecar metadata).
    """
    meta = read_sidecar(model_dir)
    model, tokenizer = load_model(str(model_dir), device=device, dtype=dtype, device_map=device_map)
    sparsify_(model, SparsifyConfig.from_sidecar(meta, read_alpha(Path(model_dir) / ALPHA_FILE),
                                                 read_channel_norms(model_dir, meta)))
    return model, tokenizer, meta


def read_channel_norms(model_dir: str | Path, meta: dict) -> dict[str, torch.Tensor] | None:
    """The weighted criterion's channel norms of a checkpoint (None for the magnitude criterion)."""
    if meta.get("criterion", "magnitude") != "weighted":
        return None
    path = Path(model_dir) / CHANNEL_NORMS_FILE
    try:
        return load_file(str(path))
    except Exception as e:
        raise SponError(f"cannot read channel norms {path} (criterion 'weighted'): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def read_alpha(path: str | Path) -> dict[str, torch.Tensor]:
    """An alpha safetensors file (a checkpoint's sidecar or a distill stage's output)."""
    try:
        return load_file(str(path))
    except Exception as e:  # missing, truncated, not safetensors
        raise SponError(f"cannot read alpha file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
