"""Loads the compiled modules. torch is imported first: our extension links libgomp by soname and
must bind to the OpenMP runtime torch has already loaded."""
import torch  # noqa: F401

from . import _C  # noqa: E402

try:
    from . import _cuda  # noqa: F401
except ImportError as e:  # built without CUDA, or the module cannot load on this machine
    _cuda = None
    CUDA_IMPORT_ERROR = str(e)
else:
    CUDA_IMPORT_ERROR = None

try:
    from ._build_info import CUDA_STATUS
except ImportError:
    CUDA_STATUS = "not built (no build info)"
