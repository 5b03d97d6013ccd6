"""sparseprune: prune PyTorch models and run them measurably faster with real sparse kernels."""
import torch  # noqa: F401  (first: the extension binds to the OpenMP runtime torch loaded)

from ._ext import _C  # noqa: F401
from . import ops  # noqa: F401
from .formats import BSRMatrix, CSRMatrix
from .nn import SparseConv2d, SparseLinear
from .prune import prune_blocks, prune_channels, prune_nm, prune_unstructured, remove_masks
from . import prune  # noqa: F401
from .convert import ConversionError, Converter, convert, densify, measure, register_converter, summary
from .io import load, save
from .distill import DistillCallback, depth_ramp, distill, set_transformer

__version__ = "0.1.0"

__all__ = [
    "BSRMatrix", "CSRMatrix", "SparseLinear", "SparseConv2d",
    "prune_unstructured", "prune_blocks", "prune_nm", "prune_channels", "remove_masks", "prune",
    "convert", "summary", "measure", "densify", "ConversionError", "Converter", "register_converter", "save", "load", "ops", "__version__",
    "distill", "DistillCallback", "set_transformer", "depth_ramp",
]
