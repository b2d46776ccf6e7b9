"""The sparse model of a spon checkpoint, for transformers' `trust_remote_code`.

`spon.fuse.save_fused` copies this file verbatim into every fused checkpoint and points
`config.json`'s `auto_map` at it, so that on a machine with only torch and transformers

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

returns the sparse model spon ships (what `spon.load_sparse_model(dir)` returns), while plain
`from_pretrained(dir)` still gives the vanilla dense model with the fused biases b' = b + W alpha.
It depends on torch and transformers only (safetensors comes with transformers): no spon import.

At the input of every sparsified linear it applies TEAL's S(x) = x * 1{|x| > tau}, with tau from
the sidecar `spon.json` keyed "layer.kind", compared in fp32 exactly as spon does, so the logits
are spon's. A checkpoint of the weighted criterion (WINA: drop x_i when |x_i| * ||W[:, i]||_2 <=
tau) compares |x_i| with tau / c_i, c from `spon_channel_norms.safetensors`. The spontaneous neurons alpha are already in the biases where the architecture has a
bias slot; elsewhere (the sidecar's `unfusable_projections`) this code adds W alpha from
`spon_alpha.safetensors` at load time, as spon's loader does.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM,
                          Qwen2ForCausalLM, Qwen3ForCausalLM)
from transformers.utils import cached_file

SIDECAR = "spon.json"
ALPHA_FILE = "spon_alpha.safetensors"
CHANNEL_NORMS_FILE = "spon_channel_norms.safetensors"
FORMATS = ("spon/1", "spon/2")
CRITERIA = ("magnitude", "weighted")
ATTENTION = ("q", "k", "v", "o")
PROTOCOLS = ("all", "last_half")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FORMAT_BY_CRITERION = {"magnitude": "spon/1", "weighted": "spon/2"}
DIGEST_KEY = "digest"
ALPHA_DTYPES = ("F32", "torch.float32")
# from_pretrained arguments that say where the checkpoint's files are; the sidecar is read from
# the same place (a local directory or a hub repository at the same revision).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class SponSparseLinear(nn.Linear):
    """y = W S(x) + b', with S(x) = x * 1{|x| > tau}; b' = b + W alpha (alpha fused).

    Shares the weight and bias of the nn.Linear it replaces, so the state dict keeps the vanilla
    names; tau and W alpha are non-persistent buffers (they come from the sidecar, not the
    weights)."""

    def __init__(self, linear: nn.Linear, threshold: float, protocol: str, alpha_delta: torch.Tensor | None,
                 channel_norm: torch.Tensor | None = None):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.protocol = protocol
        tau = torch.tensor(float(threshold), dtype=torch.float32, device=linear.weight.device)
        if channel_norm is not None:  # weighted criterion: tau_i = tau / c_i in fp32, as spon computes it
            tau = tau / channel_norm.to(device=tau.device, dtype=torch.float32)
        self.register_buffer("threshold", tau, persistent=False)
        # W alpha, needed only where the first half of a sequence runs dense (protocol last_half):
        # the dense model's bias there is b = b' - W alpha.
        self.register_buffer("alpha_delta", alpha_delta, persistent=False)

    def extra_repr(self) -> str:
        tau = f"{self.threshold.item():.4g}" if self.threshold.dim() == 0 else "per-channel"
        return f"{super().extra_repr()}, tau={tau}, protocol={self.protocol}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TEAL's published prefill protocol: the first half of each sequence stays dense.
        if self.protocol == "last_half" and x.dim() == 3 and x.shape[1] > 1:
            h = x.shape[1] // 2
            dense_bias = self.bias - self.alpha_delta
            return torch.cat([F.linear(x[:, :h], self.weight, dense_bias), self._sparse(x[:, h:])], dim=1)
        return self._sparse(x)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        # |x| compared in fp32 on every path (spon.kernels.reference.keep_mask): in bf16/fp16 a
        # comparison in x's dtype would round tau first and drop different boundary elements.
        keep = x.abs().float() > self.threshold
        return F.linear(x * keep, self.weight, self.bias)


# ---- vendored verbatim from spon/format.py (a test checks the sources equal): the same checks as spon's loader
def sidecar_digest(meta, alpha_sha256, norms_sha256=None):
    """sha256 over what decides the sparse model's output: thresholds, targets, criterion, protocol,
    where alpha is fused, and the sha256 of the alpha (and channel norms) file."""
    import hashlib
    import json

    covered = {k: meta.get(k) for k in ("thresholds", "targets", "criterion", "protocol", "fused_in_checkpoint")}
    covered["alpha_sha256"] = alpha_sha256
    covered["channel_norms_sha256"] = norms_sha256
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode("utf-8")).hexdigest()


def validate_sidecar(meta, num_layers=None, projections=None, alpha=None, channel_norms=None,
                     alpha_sha256=None, norms_sha256=None):
    """Refuse (ValueError, one line) a sidecar that is not what save_pretrained writes.

    meta: the parsed sidecar. num_layers: the model's layer count (config num_hidden_layers).
    projections: {"layer.kind": (in_features, has_bias)} of the loaded model. alpha / channel_norms:
    {"layer.kind": (shape tuple, dtype name, all finite or None)} of the files. alpha_sha256 /
    norms_sha256: the files' sha256, checked against the sidecar's digest when it has one."""
    import math

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(meta, dict):
        raise ValueError(f"the sidecar must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") not in FORMATS:
        raise ValueError(f"unknown format {meta.get('format')!r}, expected one of {', '.join(FORMATS)}")
    criterion = meta.get("criterion", "magnitude")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}, expected one of {', '.join(CRITERIA)}")
    if FORMAT_BY_CRITERION[criterion] != meta["format"]:
        raise ValueError(f"format {meta['format']!r} does not fit criterion {criterion!r} "
                         f"(written as {FORMAT_BY_CRITERION[criterion]!r})")
    if meta.get("protocol", "all") not in PROTOCOLS:
        raise ValueError(f"unknown protocol {meta.get('protocol')!r}, expected one of {', '.join(PROTOCOLS)}")
    for key in ("thresholds", "targets", "fused_in_checkpoint"):
        if key not in meta:
            raise ValueError(f"it has no {key!r}")
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or any(t not in PROJECTIONS for t in targets):
        raise ValueError(f"targets must be a non-empty list of {', '.join(PROJECTIONS)}; got {targets!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets {targets!r} name a projection twice")
    thresholds, fused = meta["thresholds"], meta["fused_in_checkpoint"]
    for key, value in (("thresholds", thresholds), ("fused_in_checkpoint", fused)):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be an object mapping \"layer.kind\" to a value, got {type(value).__name__}")
    for name, tau in thresholds.items():
        if not number(tau):
            raise ValueError(f"threshold {name} is {tau!r}, not a number")
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"threshold {name} is {tau!r}: a threshold is a finite number >= 0")
    for name, v in fused.items():
        if not isinstance(v, bool):
            raise ValueError(f"fused_in_checkpoint {name} is {v!r}, not true or false")
    if num_layers is None and projections is not None:
        num_layers = 1 + max((int(n.split(".")[0]) for n in projections), default=-1)
    if num_layers is not None:
        names = [f"{i}.{k}" for i in range(num_layers) for k in targets]
    else:  # no model to compare with: every layer named in either map has all the targets
        layers = sorted({n.split(".")[0] for n in [*thresholds, *fused] if n.split(".")[0].isdigit()}, key=int)
        names = [f"{i}.{k}" for i in layers for k in targets]
    expected, layer_count = set(names), len(names) // len(targets)
    for key, value in (("thresholds", thresholds), ("fused_in_checkpoint", fused)):
        missing = [n for n in names if n not in value]
        extra = sorted(set(value) - expected)
        if missing:
            raise ValueError(f"{key} has no entry for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"({len(missing)} of the {len(names)} that targets {','.join(targets)} name)")
        if extra:
            raise ValueError(f"{key} has entries outside targets {','.join(targets)} x {layer_count} "
                             f"layers: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for what, tensors in (("alpha", alpha), ("channel norms", channel_norms)):
        if tensors is None:
            continue
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"the {what} file has no tensor {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"({len(missing)} of {len(names)})")
        for n in names:
            shape, dtype, finite = tensors[n]
            want = projections[n][0] if projections is not None and n in projections else None
            if len(shape) != 1 or (want is not None and shape[0] != want):
                raise ValueError(f"{what} {n} has shape {list(shape)}, expected "
                                 f"[{want if want is not None else 'in_features'}]")
            if str(dtype) not in ALPHA_DTYPES:
                raise ValueError(f"{what} {n} is {dtype}, expected float32")
            if finite is False:
                raise ValueError(f"{what} {n} holds NaN or inf")
    if criterion == "weighted" and channel_norms is None and projections is not None:
        raise ValueError("criterion 'weighted' needs the channel norms file")
    if projections is not None:
        for n in names:
            has_bias = projections[n][1]
            if fused[n] and not has_bias:
                raise ValueError(f"fused_in_checkpoint says {n}'s alpha is in its bias, but the model's projection "
                                 f"has no bias (config.json attention_bias/mlp_bias turned off?)")
            if not fused[n] and has_bias:
                raise ValueError(f"fused_in_checkpoint says {n}'s alpha is not in its bias, but the checkpoint "
                                 f"gives it one (alpha would be added twice)")
    record = meta.get(DIGEST_KEY)
    if record is not None and alpha_sha256 is not None:
        if not isinstance(record, str):
            raise ValueError(f"{DIGEST_KEY} must be a sha256 hex string, got {record!r}")
        if criterion != "weighted" or norms_sha256 is not None:
            actual = sidecar_digest(meta, alpha_sha256, norms_sha256 if criterion == "weighted" else None)
            if actual != record:
                raise ValueError(f"its thresholds or alpha changed after fusion ({DIGEST_KEY} {record[:12]}..., "
                                 f"the files give {actual[:12]}...)")


def _sha256(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(pretrained_model_name_or_path, **hub_kwargs):
    """The checkpoint's spon.json, alpha vectors and (weighted criterion) channel norms, from where
    its weights came from; the sidecar checked against the format (validate_sidecar)."""
    path = cached_file(pretrained_model_name_or_path, SIDECAR, **hub_kwargs)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # not UTF-8, not JSON
        raise ValueError(f"sidecar {path} is not valid JSON: {str(e).splitlines()[0]}") from None
    try:
        validate_sidecar(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    alpha_path = cached_file(pretrained_model_name_or_path, ALPHA_FILE, **hub_kwargs)
    alpha = _load_tensors(alpha_path, "alpha")
    norms, norms_path = None, None
    if meta.get("criterion", "magnitude") == "weighted":
        norms_path = cached_file(pretrained_model_name_or_path, CHANNEL_NORMS_FILE, **hub_kwargs)
        norms = _load_tensors(norms_path, "channel norms")
    # the files' digests, for validate_sidecar's check against the sidecar's (sparsify_loaded)
    meta = {**meta, "_files_sha256": (_sha256(alpha_path), _sha256(norms_path) if norms_path else None),
            "_where": path}
    return meta, alpha, norms


def _load_tensors(path, what):
    try:
        return load_file(path)
    except Exception as e:  # truncated, empty, not safetensors
        raise ValueError(f"cannot read {what} file {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def _tensor_info(tensors):
    if tensors is None:
        return None
    return {n: (tuple(t.shape), str(t.dtype), bool(torch.isfinite(t).all()) if t.is_floating_point() else None)
            for n, t in tensors.items()}


def check_loaded(model, meta, alpha, channel_norms):
    """The sidecar, alpha and channel norms against the loaded model and the sidecar's digest."""
    projections = {}
    for i, layer in enumerate(model.model.layers):
        for kind in PROJECTIONS:
            parent = layer.self_attn if kind in ATTENTION else layer.mlp
            linear = getattr(parent, f"{kind}_proj", None)
            if linear is not None:
                projections[f"{i}.{kind}"] = (linear.in_features, linear.bias is not None)
    alpha_sha, norms_sha = meta.get("_files_sha256", (None, None))
    clean = {k: v for k, v in meta.items() if k not in ("_files_sha256", "_where")}
    try:
        validate_sidecar(clean, num_layers=len(model.model.layers), projections=projections, alpha=_tensor_info(alpha),
                         channel_norms=_tensor_info(channel_norms), alpha_sha256=alpha_sha, norms_sha256=norms_sha)
    except ValueError as e:
        raise ValueError(f"{meta.get('_where', SIDECAR)}: {e}") from None


@torch.no_grad()
def sparsify_loaded(model, meta: dict, alpha: dict[str, torch.Tensor],
                    channel_norms: dict[str, torch.Tensor] | None = None) -> None:
    """Replace every sparsified projection ("layer.kind" in the sidecar) with SponSparseLinear."""
    check_loaded(model, meta, alpha, channel_norms)  # nothing is changed before the checkpoint passed
    protocol = meta.get("protocol", "all")
    thresholds, in_checkpoint = meta["thresholds"], meta["fused_in_checkpoint"]
    for i, layer in enumerate(model.model.layers):
        for kind in meta["targets"]:
            name = f"{i}.{kind}"
            parent = layer.self_attn if kind in ATTENTION else layer.mlp
            linear = getattr(parent, f"{kind}_proj")
            w = linear.weight
            delta = None
            if protocol == "last_half" or not in_checkpoint[name]:
                # W alpha in float64, rounded once to the weight dtype: spon.fuse.weight_times_alpha.
                delta = (w.double() @ alpha[name].to(w.device).double()).to(w.dtype)
            if not in_checkpoint[name]:
                # No bias slot in the vanilla architecture: b' = 0 + W alpha, fused here.
                linear.bias = nn.Parameter(delta.clone(), requires_grad=False)
            norm = None if channel_norms is None else channel_norms[name]
            setattr(parent, f"{kind}_proj", SponSparseLinear(linear, thresholds[name], protocol, delta, norm))


class SponSparseMixin:
    """from_pretrained loads the vanilla architecture, then applies the sidecar's sparsity."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
        sparsify_loaded(model, *read_sidecar(pretrained_model_name_or_path, **hub))
        return loaded


class SponLlamaForCausalLM(SponSparseMixin, LlamaForCausalLM):
    pass


class SponMistralForCausalLM(SponSparseMixin, MistralForCausalLM):
    pass


class SponQwen2ForCausalLM(SponSparseMixin, Qwen2ForCausalLM):
    pass


class SponQwen3ForCausalLM(SponSparseMixin, Qwen3ForCausalLM):
    pass


class SponGemma2ForCausalLM(SponSparseMixin, Gemma2ForCausalLM):
    pass


class SponGemma3ForCausalLM(SponSparseMixin, Gemma3ForCausalLM):  # text-only Gemma-3 (model_type gemma3_text)
    pass


# config.json model_type -> the class its auto_map names (the architectures spon supports).
SPARSE_CLASSES = {"llama": SponLlamaForCausalLM, "mistral": SponMistralForCausalLM,
                  "qwen2": SponQwen2ForCausalLM, "qwen3": SponQwen3ForCausalLM,
                  "gemma2": SponGemma2ForCausalLM, "gemma3_text": SponGemma3ForCausalLM}
