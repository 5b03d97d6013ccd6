"""sparseprune: prune PyTorch models and run them measurably faster with real sparse kernels."""
import torch  # noqa: F401  (first: the extension binds to the OpenMP runtime torch loaded)

from ._ext import _C  # noqa: F401
from . import ops  # noqa: F401
from .formats import BSRMatrix, CSRMatrix
from .nn import SparseLinear

__version__ = "0.1.0"

__all__ = ["BSRMatrix", "CSRMatrix", "SparseLinear", "ops", "__version__"]
