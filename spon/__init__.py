"""spon: TEAL activation sparsity with spontaneous-neuron bias correction (arXiv 2512.12744).

The method as verbs on a model in memory (spon.oneshot), each taking one config:

    cal = spon.calibrate(model, tokenizer, spon.CalibrationConfig(...))
    spon.sparsify_(model, spon.SparsityConfig(sparsity=0.5), cal)
    spon.distill_(model, cal, spon.DistillConfig())
    spon.save_pretrained(model, tokenizer, "out/fused")

`spon.oneshot(model, tokenizer, spon.Recipe(...))` does all of it; `spon.load_sparse_model(dir)`
loads a fused checkpoint back. The pipeline (spon.tasks, spon.flows, spon.runtime), the evaluation
(spon.evaluation) and the kernels (spon.kernels) are subpackages, imported only when used.
"""

import sys as _sys
import types as _types

from spon.errors import SponError

# The verbs and classes below are imported on first use (PEP 562): `import spon` -- and so every
# `spon` command -- starts without torch and transformers, and a command refused by its checks
# or by another writer's lock (spon.lock) answers in well under a second of imports.
_LAZY = {"CalibrationConfig": "spon.config", "DistillConfig": "spon.config", "Recipe": "spon.config",
         "SparsityConfig": "spon.config", "load_sparse_model": "spon.fuse", "save_pretrained": "spon.fuse",
         "Calibration": "spon.oneshot", "calibrate": "spon.oneshot", "distill_": "spon.oneshot", "fuse_": "spon.oneshot",
         "oneshot": "spon.oneshot", "sparsify_": "spon.oneshot", "SparseLinear": "spon.sparse", "mode": "spon.sparse",
         "set_mode": "spon.sparse"}


class _Package(_types.ModuleType):
    """The package object. A verb named like its submodule (`spon.oneshot`) stays the verb when the
    submodule is first imported (the import system sets the submodule as an attribute afterwards)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, _types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'spon' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

def load_model(name_or_path: str | None = None, device: str = "cpu", dtype: str = "fp32", device_map: str | None = None):
    """(model, tokenizer) from a hub id, local directory, `.gguf` file or named model (`spon models`)."""
    from spon.sources import load_model as load

    return load(name_or_path, device, dtype, device_map)


def use_kernels(model, enabled: bool = True, **options):
    """Route the sparse model's decode through the sparse kernels (spon.kernel_backend.use_kernels:
    options such as weights="int8" | "int4")."""
    from spon.kernel_backend import use_kernels as use

    return use(model, enabled, **options)


def compile_decode(model, enabled: bool = True):
    """Decode through a static KV cache and a torch.compile'd step inside transformers' `generate`
    (spon.kernel_backend.compile_decode: the first generate compiles)."""
    from spon.kernel_backend import compile_decode as compile_

    return compile_(model, enabled)


__all__ = [
    "CalibrationConfig", "SparsityConfig", "DistillConfig", "Recipe",
    "calibrate", "sparsify_", "distill_", "fuse_", "save_pretrained", "oneshot", "Calibration",
    "load_model", "load_sparse_model", "use_kernels", "compile_decode",
    "SparseLinear", "mode", "set_mode", "SponError",
]
__version__ = "0.1.0"
