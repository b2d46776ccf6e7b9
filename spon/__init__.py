"""spon: TEAL activation sparsity with spontaneous-neuron bias correction (arXiv 2512.12744).

The package is the method in pure torch + transformers (spon.stages chains it); the pipeline
(spon.tasks, spon.flows, spon.runtime), the evaluation (spon.evaluation) and the kernels
(spon.kernels) are its subpackages.
"""

from spon.errors import SponError
from spon.model import load_model, find_projections, PROJECTIONS
from spon.sparse import SparseLinear, SparsifyConfig, sparsify, sparsify_, set_mode, sparse_linears
from spon.fuse import load_sparse_model, save_fused
from spon.kernel_backend import use_kernels

__all__ = [
    "SponError",
    "load_model",
    "find_projections",
    "PROJECTIONS",
    "SparseLinear",
    "SparsifyConfig",
    "sparsify",
    "sparsify_",
    "set_mode",
    "sparse_linears",
    "load_sparse_model",
    "save_fused",
    "use_kernels",
]
__version__ = "0.1.0"
