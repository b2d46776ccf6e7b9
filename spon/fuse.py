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
from spon.format import (ALPHA_FILE, CHANNEL_NORMS_FILE, DIGEST_KEY, PROJECTIONS, SIDECAR, format_for, sidecar_digest,
                         validate_sidecar)
from spon.model import bias_slot, find_projections, load_pretrained
from spon.remote_code import check_installed, install as install_remote_code, write_model_card
from spon.sparse import (SparseLinear, SparseState, apply_sparse_state_, channel_norms, fuse_alpha, fused_bias,
                         invalid_threshold, provenance, set_mode, sparse_linears, thresholds_of,
                         weight_times_alpha)

log = logging.getLogger(__name__)


def fusable(model, kind: str) -> bool:
    return bias_slot(model, kind) is not None


def _fused_bias_of(m: SparseLinear) -> torch.Tensor:
    """b' = b + W alpha of one sparse linear, fused in memory or not (the same rounding either way)."""
    return m.linear.bias if m.fused else fused_bias(m.linear.bias, weight_times_alpha(m))


@contextmanager
def _vanilla_view(model):
    """Temporarily swap each SparseLinear for a plain nn.Linear sharing its weight, carrying b'
    where the architecture has a bias slot and the original bias elsewhere; set config flags.
    The model itself is left as it was (fused or not)."""
    mods = sparse_linears(model)
    flags = {bias_slot(model, m.kind) for m in mods if bias_slot(model, m.kind) not in (None, "always")}
    old_flags = {f: getattr(model.config, f) for f in flags}
    swapped = []
    for f in flags:
        setattr(model.config, f, True)
    # Every projection that the flags give a bias to needs one, zero where no alpha was trained.
    for p in find_projections(model):
        mod = p.module
        slot = bias_slot(model, p.kind)
        inner = mod.linear if isinstance(mod, SparseLinear) else mod
        w = inner.weight
        if isinstance(mod, SparseLinear):
            # no slot: the original bias, or none (not the zeros b' - W alpha leaves after in-memory fusion)
            bias = _fused_bias_of(mod) if slot is not None else mod._original_bias() if mod.had_bias else None
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


def fuse_(model) -> None:
    """b' = b + W alpha into the biases in memory: SPON then costs exactly what TEAL costs, and the
    model computes what its saved checkpoint computes, bit for bit."""
    fuse_alpha(model)
    set_mode(model, "spon")


def save_pretrained(model, tokenizer, out_dir: str | Path, *, source_model: str | None = None,
                    smoke: dict | None = None, card: bool = True) -> Path:
    """Write the sparse model in memory as a self-contained fused checkpoint: vanilla transformers
    weights with b' = b + W alpha in the biases (where the architecture has a slot), the sidecar,
    alpha, channel norms (weighted criterion), its own modeling code and a model card.

    Everything in the sidecar comes from the model: thresholds, targets, criterion and protocol
    from its sparse linears, how it was made from what the verbs recorded (`provenance`). The
    model is not changed (fused in memory or not, the checkpoint is the same). card=False leaves
    the model card to whoever measures the perplexities next (spon.stages.summarize)."""
    mods = sparse_linears(model)
    if not mods:
        raise SponError("the model is not sparse: call spon.sparsify_(model, SparsityConfig(...), calibration) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unfusable = sorted({m.kind for m in mods if not fusable(model, m.kind)}, key=PROJECTIONS.index)
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
    meta = sidecar(model, source_model, smoke)
    # what the thresholds and alpha were when written: a reader refuses files changed afterwards
    meta[DIGEST_KEY] = sidecar_digest(meta, file_sha256(out / ALPHA_FILE),
                                      file_sha256(out / CHANNEL_NORMS_FILE) if norms else None)
    (out / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True))
    install_remote_code(out)
    if card:
        write_model_card(out)
    return out


def sidecar(model, source_model: str | None = None, smoke: dict | None = None) -> dict:
    """The sidecar of the sparse model in memory (what save_pretrained writes as spon.json)."""
    mods = sparse_linears(model)
    criterion = "weighted" if any(m.channel_norm is not None for m in mods) else "magnitude"
    protocols = {m.protocol for m in mods}
    if len(protocols) != 1:
        raise SponError(f"the sparse linears disagree on the protocol: {sorted(protocols)}")
    prov = provenance(model)
    sparsity_cfg = prov.get("sparsity", {})
    meta = {
        "format": format_for(criterion),
        "criterion": criterion,
        "thresholds": thresholds_of(model, "spon"),
        "targets": sorted({m.kind for m in mods}, key=PROJECTIONS.index),
        "fused_in_checkpoint": {m.name: fusable(model, m.kind) for m in mods},
        "unfusable_projections": sorted({m.kind for m in mods if not fusable(model, m.kind)}, key=PROJECTIONS.index),
        "protocol": protocols.pop(),
        "sparsity": sparsity_cfg.get("sparsity"),
        "allocation": sparsity_cfg.get("allocation"),
        "per_projection_sparsity": prov.get("per_projection_sparsity"),
        "realized_sparsity_heldout": prov.get("realized_sparsity_heldout"),
        "provenance": {
            "source_model": source_model or getattr(model.config, "_name_or_path", None),
            "calibration": prov.get("calibration"),
            "sparsity": sparsity_cfg or None,
            "distill": prov.get("distill"),
            "heldout_kl": prov.get("heldout_kl"),
        },
    }
    if any(m.teal_threshold is not None for m in mods):  # TEAL's own tau: the baseline an evaluation compares with
        meta["teal_thresholds"] = thresholds_of(model, "teal")
    if "alpha_selection" in prov:
        meta["alpha_selection"] = prov["alpha_selection"]
    if smoke is not None:
        meta["smoke"] = smoke
    return meta


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(model_dir: str | Path) -> dict:
    """A checkpoint's sidecar, checked against the format (spon.format.validate_sidecar): an
    unknown format, criterion or protocol, a missing field, a threshold that is not a finite number
    >= 0, or a target without a threshold in some layer is refused in one line."""
    from spon.checks import check_json_file

    path = Path(model_dir) / SIDECAR
    if not path.is_file():
        raise SponError(f"{model_dir} is not a spon model: no {SIDECAR}")
    meta = check_json_file(path, "sidecar")
    try:
        validate_sidecar(meta, num_layers=_num_layers(model_dir))
    except ValueError as e:
        raise SponError(f"{path}: {e}") from None
    return meta


def _num_layers(model_dir) -> int | None:
    try:
        n = json.loads((Path(model_dir) / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def tensor_info(tensors: dict[str, torch.Tensor] | None) -> dict | None:
    """{name: (shape, dtype, all finite)}: what validate_sidecar checks of alpha and channel norms."""
    if tensors is None:
        return None
    return {n: (tuple(t.shape), str(t.dtype), bool(torch.isfinite(t).all()) if t.is_floating_point() else None)
            for n, t in tensors.items()}


def projection_info(model) -> dict[str, tuple[int, bool]]:
    """{"layer.kind": (in_features, has a bias)} of a loaded (not yet sparse) model."""
    out = {}
    for p in find_projections(model):
        m = p.module
        inner = m.linear if isinstance(m, SparseLinear) else m
        out[p.name] = (inner.in_features, inner.bias is not None)
    return out


def check_checkpoint(model_dir: str | Path, meta: dict, model, alpha: dict, norms: dict | None) -> None:
    """The sidecar, alpha and channel norms of a checkpoint against the model loaded from it and
    against the digest it was written with (the checkpoint's own modeling code runs the same check)."""
    d = Path(model_dir)
    try:
        validate_sidecar(meta, projections=projection_info(model), alpha=tensor_info(alpha),
                         channel_norms=tensor_info(norms), alpha_sha256=file_sha256(d / ALPHA_FILE),
                         norms_sha256=file_sha256(d / CHANNEL_NORMS_FILE) if norms is not None else None)
        teal = meta.get("teal_thresholds")  # the baseline's own tau: spon's loader alone reads it
        if teal is not None and (not isinstance(teal, dict) or set(teal) != set(meta["thresholds"])
                                 or invalid_threshold(teal) is not None):
            raise ValueError("teal_thresholds must give a finite number >= 0 for exactly the projections thresholds names")
    except ValueError as e:
        raise SponError(f"{d}: {e}") from None


def load_sparse_model(model_dir: str | Path, device: str = "cpu", dtype: str = "fp32", device_map: str | None = None):
    """Load a fused spon checkpoint as a sparse model in spon mode, ready to generate. The sidecar,
    alpha and channel norms are checked against the format, the loaded model and the sidecar's
    digest first (check_checkpoint), and config.json must still name the checkpoint's own modeling
    code (check_installed): a tampered or mismatched checkpoint is refused in one line.

    Returns (model, tokenizer, sidecar metadata).
    """
    meta = read_sidecar(model_dir)
    model, tokenizer = load_pretrained(str(model_dir), device=device, dtype=dtype, device_map=device_map)
    alpha, norms = read_alpha(Path(model_dir) / ALPHA_FILE), read_channel_norms(model_dir, meta)
    check_checkpoint(model_dir, meta, model, alpha, norms)
    check_installed(model_dir)  # config.json still names the checkpoint's own modeling code
    apply_sparse_state_(model, SparseState.from_sidecar(meta, alpha, norms))
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
