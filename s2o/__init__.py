"""s2o: early-stopping sparse prefill attention via online permutation (S2O), as PyTorch ops.

``s2o.attention`` is a drop-in for ``torch.nn.functional.scaled_dot_product_attention``;
``torch.ops.s2o.{estimate_importance, permute_indices, sparse_attention}`` are the pipeline's ops.
"""

import torch  # noqa: F401  (first: loads the libraries s2o._C links against)

from . import _extension  # noqa: F401  (loads s2o._C: registers the ops and their kernels)
from .attention import S2OErrorBudgetError, S2OFallbackError, S2OStats, attention, patch_sdpa
from .config import S2OConfig
from .integrations import patch_llama  # imports transformers only when called
from .ops import estimate_importance, permute_indices, sparse_attention  # (and fake kernels)
from .varlen import varlen_attention

__all__ = [
    "S2OConfig",
    "S2OErrorBudgetError",
    "S2OFallbackError",
    "S2OStats",
    "attention",
    "estimate_importance",
    "patch_llama",
    "patch_sdpa",
    "permute_indices",
    "sparse_attention",
    "varlen_attention",
]
__version__ = "0.1.0"
