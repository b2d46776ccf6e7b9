"""Variants: which weights, which mode. `spon-int8` = the fused model, int8 weights, spon mode.

dense, teal and spon are three modes over one set of fused weights (see spon.sparse); each
quantization scheme needs its own copy of the weights, so models are built once per scheme and
shared by the modes that use them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from spon.errors import SponError
from spon.sparse import MODES

log = logging.getLogger(__name__)
QUANTS = ("int8", "int4", "nf4")


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # dense | teal | spon
    quant: str | None  # None | int8 | int4 | nf4

    @property
    def sparse(self) -> bool:
        return self.mode != "dense"


def parse_variants(text: str) -> list[Variant]:
    out = []
    for name in [v.strip() for v in text.split(",") if v.strip()]:
        m, _, q = name.partition("-")
        if m not in MODES or (q and q not in QUANTS):
            raise SponError(
                f"unknown variant {name!r}: use MODE or MODE-QUANT with MODE in {MODES} and QUANT in {QUANTS}"
            )
        out.append(Variant(name, m, q or None))
    if not out:
        raise SponError("no variants given")
    if len({v.name for v in out}) != len(out):
        raise SponError(f"duplicate variants in {text!r}")
    return out


class ModelPool:
    """Loads the fused model once per quantization scheme, on first use, in `dtype` (the
    unquantized weights' and the activations' precision)."""

    def __init__(self, model_dir: str, device: str = "cpu", group_size: int = 32, dtype: str = "fp32"):
        self.model_dir, self.device, self.group_size, self.dtype = model_dir, device, group_size, dtype
        self._models: dict[str | None, tuple] = {}
        self.quant_info: dict[str, dict] = {}

    def get(self, quant: str | None):
        if quant not in self._models:
            from spon.fuse import load_sparse_model

            model, tok, meta = load_sparse_model(self.model_dir, device=self.device, dtype=self.dtype)
            if quant:
                from spon.quantize import quantize_model, quantized_weight_bytes

                before = quantized_weight_bytes(model)
                info = quantize_model(model, quant, self.group_size)
                info["weight_bytes"] = {"before": before, "after": quantized_weight_bytes(model)}
                self.quant_info[quant] = info
                log.info("quantized %s: %s", quant, info)
            self._models[quant] = (model, tok, meta)
        return self._models[quant]
