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


def read_sidecar(pretrained_model_name_or_path, **hub_kwargs):
    """The checkpoint's spon.json, alpha vectors and (weighted criterion) channel norms, from where
    its weights came from."""
    path = cached_file(pretrained_model_name_or_path, SIDECAR, **hub_kwargs)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") not in FORMATS:
        raise ValueError(f"{path}: unknown spon format {meta.get('format')!r}, expected one of {FORMATS}")
    if meta.get("protocol", "all") not in PROTOCOLS:
        raise ValueError(f"{path}: unknown protocol {meta.get('protocol')!r}; expected one of {PROTOCOLS}")
    if meta.get("criterion", "magnitude") not in CRITERIA:
        raise ValueError(f"{path}: unknown criterion {meta.get('criterion')!r}; expected one of {CRITERIA}")
    alpha = load_file(cached_file(pretrained_model_name_or_path, ALPHA_FILE, **hub_kwargs))
    norms = None
    if meta.get("criterion", "magnitude") == "weighted":
        norms = load_file(cached_file(pretrained_model_name_or_path, CHANNEL_NORMS_FILE, **hub_kwargs))
    return meta, alpha, norms


@torch.no_grad()
def sparsify_loaded(model, meta: dict, alpha: dict[str, torch.Tensor],
                    channel_norms: dict[str, torch.Tensor] | None = None) -> None:
    """Replace every sparsified projection ("layer.kind" in the sidecar) with SponSparseLinear."""
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
