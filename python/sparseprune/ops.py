"""Custom ops (``torch.library``) where torch meets the kernels.

Every op has a schema, a fake kernel (so meta tensors, ``torch.compile`` and ``torch.export`` see
shapes), device implementations that hand raw pointers to the compiled kernels, and autograd for
the dense input. Python allocates outputs; C++ fills them.
"""
from __future__ import annotations

import os
import warnings
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _ext
from ._ext import _C

__all__ = ["spmm", "spmm_t", "spmm_eager", "SpmmFunction", "call_route", "set_isa", "active_isa", "isa_paths",
           "resolve_threads", "sparse_conv2d", "sparse_conv2d_input_grad", "conv_output_memory_format",
           "conv_output_size", "ACTIVATIONS", "activation_code", "apply_activation"]

# fp32 spmm kernel variants a layer may pin (convert() times them per layer): name -> (split, pack) of
# BsrView: split 1 = rows of X between threads, 2 = block rows; pack 1 = X panels, 2 = X read in place.
KERNELS = {"auto": (0, 0), "rows/panels": (1, 1), "rows/direct": (1, 2), "blocks/panels": (2, 1),
           "blocks/direct": (2, 2)}

# Activations a kernel can apply in its store (fused epilogue), by code: csrc/include/sparseprune/epilogue.h.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def activation_code(name: str) -> int:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return ACTIVATIONS.index(name)


def apply_activation(y: Tensor, name: str) -> Tensor:
    """The activation with PyTorch's own functions (unfused paths, autograd, other devices)."""
    if name == "none":
        return y
    if name == "relu":
        return torch.relu(y)
    if name == "gelu":
        return torch.nn.functional.gelu(y)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def kernel_variant(name: str) -> Tuple[int, int]:
    """The ``(split, pack)`` arguments of fp32 spmm kernel variant ``name`` (:data:`KERNELS`)."""
    variant = KERNELS.get(name) if isinstance(name, str) else None
    if variant is None:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {name!r}")
    return variant


def _isa_levels() -> List[str]:
    """The ISA level names the kernels' tables know, lowest first."""
    return list(dict.fromkeys(p["isa"] for p in list(_C.paths()) + list(_C.qpaths())))


def set_isa(isa: str) -> None:
    """Force a CPU kernel path ("scalar", "avx2", "avx512", ... or "best"; any case, as SPARSEPRUNE_ISA).
    Process-wide. A name that is no ISA level, or a level this CPU cannot run, is a ValueError naming the
    ones it can."""
    if not isinstance(isa, str):
        raise TypeError(f"set_isa: the ISA path must be a string, got {type(isa).__name__}")
    name = isa.lower()
    try:
        _C.set_isa(name)
    except ValueError:
        runs = list(dict.fromkeys(p["isa"] for p in list(_C.paths()) + list(_C.qpaths()) if p["supported"]))
        runs.append("best")
        if name not in _isa_levels():
            raise ValueError(f"set_isa: {isa!r} is not an ISA path (any case: {', '.join(_isa_levels())}, best; "
                             f"this CPU runs {', '.join(runs)})") from None
        raise ValueError(f"set_isa: this CPU cannot run the {name!r} path (it runs: {', '.join(runs)})") from None


def active_isa() -> str:
    return _C.active_isa()


def isa_paths(supported_only: bool = True):
    return [p for p in _C.paths() if p["supported"] or not supported_only]


def _check_isa_env() -> None:
    """Warn when SPARSEPRUNE_ISA names no ISA level, or one this CPU cannot run (dispatch.cpp then runs
    the best level, or the best one below it). A warning, not an error: a variable must not break import."""
    env = os.environ.get("SPARSEPRUNE_ISA", "")
    if not env:
        return
    active = active_isa()  # dispatch reads the variable now, while it is the one checked here
    rows = list(_C.paths()) + list(_C.qpaths())
    levels = _isa_levels()
    isa = env.lower()
    if isa == "best":
        return
    if isa not in levels:
        msg = (f"SPARSEPRUNE_ISA={env!r} is not an ISA level (valid, any case: {', '.join(levels)}, best); "
               f"running the best path for this CPU, {active!r}")
    elif not any(p["supported"] for p in rows if p["isa"] == isa):
        msg = (f"SPARSEPRUNE_ISA={env!r}: this CPU cannot run the {isa!r} path; running the best level "
               f"below it (fp32 path {active!r})")
    else:
        return
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


def resolve_threads(num_threads: int) -> int:
    return torch.get_num_threads() if num_threads is None or num_threads <= 0 else int(num_threads)


def _check_operands(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
                    bias: Optional[Tensor], feat: int, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D input, got shape {tuple(x.shape)}")
    if x.shape[1] != feat:
        raise ValueError(f"{name}: input has {x.shape[1]} features, the sparse weight expects {feat}")
    _check_placement(x, row_ptr, col_idx, values, bias, name)


def _check_placement(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
                     name: str) -> None:
    """float32 input, and every operand on the sparse weight's device."""
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32 input, got {x.dtype}")
    dev = values.device
    for t, what in ((x, "input"), (row_ptr, "row_ptr"), (col_idx, "col_idx")):
        if t.device != dev:
            raise ValueError(f"{name}: {what} is on {t.device} but the sparse weight is on {dev}")
    if bias is not None and (bias.device != dev or bias.dtype != torch.float32):
        raise ValueError(f"{name}: bias must be float32 on {dev}, got {bias.dtype} on {bias.device}")


# Packed arrays the public ops have checked in full (formats.BSRMatrix's checks): {key: (weak references to
# the arrays, their addresses and version counters, the geometry)}; a repeat call with the same unchanged
# arrays costs a lookup, not an O(nnz) pass. Bounded: the oldest entries go first.
_CHECKED: "dict" = {}
_CHECKED_MAX = 256


def _int_arg(v, name: str, op: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < 2 ** 31:
        raise ValueError(f"{op}: {name} must be an int in [{lo}, 2^31), got {v!r}")
    return v


def _check_block_geometry(rows, cols, r, c, op: str) -> None:
    for name, v, lo in (("rows", rows, 0), ("cols", cols, 0), ("r", r, 1), ("c", c, 1)):
        _int_arg(v, name, op, lo)


def _check_packed_args(row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor], rows: int,
                       cols: int, r: int, c: int, op: str) -> None:
    """What the kernels read of a packed weight, checked before they read it: a (rows x cols) matrix of
    (r x c) blocks (int32 row pointers, int16 / int32 column indices in range and sorted, float32 values of
    the right count, all contiguous on one device) and a float32 bias of ``rows`` elements, or None.
    The public ops take these arrays from anyone: a wrong one must be a ValueError / TypeError, never a
    read out of bounds."""
    from .formats import BSRMatrix
    _check_block_geometry(rows, cols, r, c, op)
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("values", values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dtype != torch.float32 or bias.shape != (rows,):
            raise ValueError(f"{op}: bias must be a float32 tensor of shape ({rows},), got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    checked_once((row_ptr, col_idx, values), (rows, cols, r, c), op,
                 lambda: BSRMatrix((rows, cols), (r, c), row_ptr, col_idx, values, check=True))


def checked_once(arrays: tuple, geometry: tuple, op: str, full_check) -> None:
    """Run ``full_check()`` (raising TypeError / ValueError) unless these very ``arrays`` (tensors, or None)
    passed it for this ``geometry`` and are unchanged since: the same objects at the same addresses with the
    same version counters. Inference tensors (no version counter) are checked on every call."""
    present = tuple(t for t in arrays if t is not None)
    try:
        versions = tuple(-1 if t.is_inference() else t._version for t in present)
        key = tuple(id(t) for t in arrays)
        now = (tuple(t.data_ptr() for t in present), versions, tuple(geometry))
    except (RuntimeError, AttributeError):  # not plain tensors with storage: the full check says what is wrong
        key, versions = None, (-1,)
    hit = _CHECKED.get(key) if key is not None else None
    if hit is not None and hit[1] == now and all(w() is t for w, t in zip(hit[0], present)):
        return
    try:
        full_check()
    except (TypeError, ValueError) as e:
        raise type(e)(f"{op}: the packed weight is invalid: {e}") from None
    if key is not None and -1 not in versions:
        while len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.pop(next(iter(_CHECKED)))
        _CHECKED[key] = (tuple(weakref.ref(t) for t in present), now)


def empty_rows(x: Tensor, rows: int) -> Tensor:
    """An uninitialised float32 CPU tensor of shape ``x.shape[:-1] + (rows,)``, in ~0.7 us where building
    that torch.Size took ~1.8 us (a tenth of a 90%-sparse 768x768 int8 product)."""
    sh = x.shape
    if len(sh) == 2:
        return torch.empty(sh[0], rows, dtype=torch.float32)
    return torch.empty(*sh[:-1], rows, dtype=torch.float32)


_functorch_stack = torch._C._functorch.peek_interpreter_stack  # None: no torch.func transform is running
# not None while torch.jit.trace records: a raw kernel call would be invisible to it (the trace would replay
# only the output's allocation), the registered op is recorded
_tracing = torch._C._get_tracing_state


def call_route(x: Tensor, *params: Optional[Tensor]) -> str:
    """How a call reaches the kernels — the one place this is decided: ``"eager"`` (call the kernel
    directly: plain tensors on cpu/cuda, no gradient needed, not traced), ``"autograd"`` (a gradient
    is needed: the eager autograd twin), or ``"op"`` (the registered custom op: torch.compile, export,
    fake / meta tensors, torch function or dispatch modes, torch.func transforms such as vmap, whose
    wrapped tensors have no data pointer)."""
    if (type(x) is not torch.Tensor or not (x.is_cpu or x.is_cuda) or torch.compiler.is_compiling()
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() != 0
            or _functorch_stack() is not None or _tracing() is not None):
        return "op"
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return "autograd"
    return "eager"


def _cuda_stream_ptr(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


# -- spmm: Y = X W^T + b ------------------------------------------------------------------------
@torch.library.custom_op("sparseprune::spmm", mutates_args=())
def spmm(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
         rows: int, cols: int, r: int, c: int, num_threads: int) -> Tensor:
    """``x @ W.T + bias`` for the block-sparse W (rows x cols, blocks r x c; CSR is r = c = 1)."""
    _check_operands(x, row_ptr, col_idx, values, bias, cols, "spmm")
    _check_packed_args(row_ptr, col_idx, values, bias, rows, cols, r, c, "spmm")
    return spmm_eager(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads)


def spmm_eager(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
               rows: int, cols: int, r: int, c: int, num_threads: int, act: int = 0,
               kernel: str = "auto", residual: Optional[Tensor] = None) -> Tensor:
    """The body of :func:`spmm` without the dispatcher (a few microseconds instead of tens).

    For callers that have already validated operands (SparseLinear in eager inference). ``act``: an
    activation code (:data:`ACTIVATIONS`) applied in the kernel's store, after the bias (CPU); on other
    devices it is applied afterwards by PyTorch. ``residual``: a float32 ``(n, rows)`` tensor on x's device
    added before the activation (in the store on the CPU); any strides (a copy unless rows are contiguous)."""
    if x.stride(1) != 1 or x.stride(0) < max(cols, 1):
        x = x.contiguous()
    n = x.shape[0]
    if residual is not None:
        if residual.shape != (n, rows) or residual.dtype != torch.float32 or residual.device != x.device:
            raise ValueError(f"spmm: the residual must be a float32 ({n}, {rows}) tensor on {x.device}, got "
                             f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
        if n == 0 or rows == 0 or cols == 0 or x.device.type != "cpu":
            y = spmm_eager(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads, 0, kernel)
            return apply_activation(y + residual, ACTIVATIONS[act])
        if residual.stride(1) != 1 or residual.stride(0) != rows:
            residual = residual.contiguous()  # the kernel reads it with y's strides
    if n == 0 or rows == 0 or cols == 0:  # nothing to multiply (zero-size layers are legal)
        y = torch.zeros(n, rows, dtype=torch.float32, device=x.device)
        return apply_activation(y + bias if bias is not None and n else y, ACTIVATIONS[act])
    y = torch.empty(n, rows, dtype=torch.float32, device=x.device)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    args = (rows, cols, r, c, row_ptr.data_ptr(), col_idx.data_ptr(), col_idx.dtype == torch.int16,
            values.data_ptr(), x.data_ptr(), n, max(x.stride(0), cols), bias.data_ptr() if bias is not None else 0,
            y.data_ptr(), rows)
    if x.device.type == "cpu" and residual is not None:
        _C.spmm_res(*args, resolve_threads(num_threads), act, *kernel_variant(kernel), residual.data_ptr())
    elif x.device.type == "cpu":
        _C.spmm(*args, resolve_threads(num_threads), act, *kernel_variant(kernel))
    elif x.device.type == "cuda":
        if _ext._cuda is None:
            raise RuntimeError(f"sparseprune was built without CUDA kernels: {_ext.CUDA_STATUS}")
        with torch.cuda.device(x.device):
            _ext._cuda.spmm(*args, _cuda_stream_ptr(x))
        y = apply_activation(y, ACTIVATIONS[act])
    else:
        raise ValueError(f"spmm: no kernels for device type {x.device.type!r}")
    return y


def spmm_t_eager(dy: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
                 rows: int, cols: int, r: int, c: int, num_threads: int) -> Tensor:
    dy = dy.contiguous()
    n = dy.shape[0]
    if n == 0 or rows == 0 or cols == 0:
        return torch.zeros(n, cols, dtype=torch.float32, device=dy.device)
    dx = torch.empty(n, cols, dtype=torch.float32, device=dy.device)
    if dy.device.type != "cpu":
        raise NotImplementedError("spmm_t (training through sparse layers) is CPU-only for now")
    _C.spmm_t(rows, cols, r, c, row_ptr.data_ptr(), col_idx.data_ptr(), col_idx.dtype == torch.int16,
              values.data_ptr(), dy.data_ptr(), n, rows, dx.data_ptr(), cols, resolve_threads(num_threads))
    return dx


class SpmmFunction(torch.autograd.Function):
    """Eager autograd twin of the registered op (same kernels, without the dispatcher's cost)."""

    @staticmethod
    def forward(ctx, x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads):
        ctx.save_for_backward(row_ptr, col_idx, values)
        ctx.meta = (rows, cols, r, c, num_threads)
        ctx.has_bias = bias is not None
        return spmm_eager(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads)

    @staticmethod
    def backward(ctx, grad):
        row_ptr, col_idx, values = ctx.saved_tensors
        gx = spmm_t_eager(grad, row_ptr, col_idx, values, *ctx.meta) if ctx.needs_input_grad[0] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return gx, None, None, None, gb, None, None, None, None, None


class SpmmFuncTransform(torch.autograd.Function):
    """:func:`spmm` differentiable under ``torch.func`` transforms (grad, jacrev, vjp; vmap through the
    generated rule): the op's own autograd (``register_autograd``) is refused by them in this torch."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads):
        return torch.ops.sparseprune.spmm(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads = inputs
        ctx.save_for_backward(row_ptr, col_idx, values)
        ctx.save_for_forward(row_ptr, col_idx, values)
        ctx.meta = (rows, cols, r, c, num_threads)
        ctx.has_bias = bias is not None
        ctx.n = x.shape[0]

    @staticmethod
    def jvp(ctx, x_t, row_ptr_t, col_idx_t, values_t, bias_t, *rest):
        row_ptr, col_idx, values = ctx.saved_tensors
        out = SpmmFuncTransform.apply(x_t, row_ptr, col_idx, values, None, *ctx.meta) if x_t is not None else None
        if bias_t is not None:
            out = bias_t.expand(ctx.n, -1).clone() if out is None else out + bias_t
        return out

    @staticmethod
    def backward(ctx, grad):
        row_ptr, col_idx, values = ctx.saved_tensors
        gx = _SpmmTFuncTransform.apply(grad, row_ptr, col_idx, values, *ctx.meta) if ctx.needs_input_grad[0] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return gx, None, None, None, gb, None, None, None, None, None


class _SpmmTFuncTransform(torch.autograd.Function):
    """:func:`spmm_t` (``dy @ W``) under ``torch.func`` transforms, differentiable in ``dy`` (its gradient is
    ``spmm``): the backward of :class:`SpmmFuncTransform` when the transform tracks that gradient too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, row_ptr, col_idx, values, rows, cols, r, c, num_threads):
        return torch.ops.sparseprune.spmm_t(dy, row_ptr, col_idx, values, rows, cols, r, c, num_threads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, row_ptr, col_idx, values, rows, cols, r, c, num_threads = inputs
        ctx.save_for_backward(row_ptr, col_idx, values)
        ctx.save_for_forward(row_ptr, col_idx, values)
        ctx.meta = (rows, cols, r, c, num_threads)

    @staticmethod
    def jvp(ctx, dy_t, *rest):
        row_ptr, col_idx, values = ctx.saved_tensors
        return _SpmmTFuncTransform.apply(dy_t, row_ptr, col_idx, values, *ctx.meta)

    @staticmethod
    def backward(ctx, gg):
        row_ptr, col_idx, values = ctx.saved_tensors
        gdy = SpmmFuncTransform.apply(gg, row_ptr, col_idx, values, None, *ctx.meta) if ctx.needs_input_grad[0] else None
        return gdy, None, None, None, None, None, None, None, None


def differentiating_transform() -> bool:
    """Whether a ``torch.func`` transform that differentiates (grad, jacrev, vjp, jvp) is running."""
    if torch.compiler.is_compiling():  # (dynamo cannot trace the interpreter stack; compiled graphs take the op)
        return False
    from torch._C._functorch import TransformType
    if _functorch_stack() is None:
        return False
    return any(lvl.key() in (TransformType.Grad, TransformType.Jvp)
               for lvl in torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters())


@spmm.register_fake
def _(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads):
    torch._check(x.dim() == 2, lambda: "spmm: expected a 2-D input")
    torch._check(x.shape[1] == cols, lambda: f"spmm: input features must be {cols}")
    return x.new_empty(x.shape[0], rows)


# -- spmm_t: dX = dY W ----------------------------------------------------------------------------
@torch.library.custom_op("sparseprune::spmm_t", mutates_args=())
def spmm_t(dy: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
           rows: int, cols: int, r: int, c: int, num_threads: int) -> Tensor:
    """``dy @ W`` for the block-sparse W: the gradient of :func:`spmm` with respect to its input."""
    _check_operands(dy, row_ptr, col_idx, values, None, rows, "spmm_t")
    _check_packed_args(row_ptr, col_idx, values, None, rows, cols, r, c, "spmm_t")
    return spmm_t_eager(dy, row_ptr, col_idx, values, rows, cols, r, c, num_threads)


@spmm_t.register_fake
def _(dy, row_ptr, col_idx, values, rows, cols, r, c, num_threads):
    return dy.new_empty(dy.shape[0], cols)


def _spmm_setup(ctx, inputs, output):
    x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads = inputs
    ctx.save_for_backward(row_ptr, col_idx, values)
    ctx.meta = (rows, cols, r, c, num_threads, bias is not None)


def _spmm_backward(ctx, grad):
    row_ptr, col_idx, values = ctx.saved_tensors
    rows, cols, r, c, num_threads, has_bias = ctx.meta
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.sparseprune.spmm_t(grad, row_ptr, col_idx, values, rows, cols, r, c, num_threads)
    gb = grad.sum(0) if has_bias and ctx.needs_input_grad[4] else None
    return gx, None, None, None, gb, None, None, None, None, None


torch.library.register_autograd("sparseprune::spmm", _spmm_backward, setup_context=_spmm_setup)


# -- sparse_conv2d ---------------------------------------------------------------------------------
# sparse_conv2d: y = conv2d(x, W) + b, with W (Cout, Cin/groups, kh, kw) packed as a BSR matrix of
# (r x 1) blocks over its (Cout, Cin/groups*kh*kw) view (see csrc/include/sparseprune/conv.h).
# padding is (top, bottom, left, right): PyTorch's 'same' pads asymmetrically for even extents.
def conv_output_size(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _strides_like_channels_last(sizes, strides) -> bool:
    # PyTorch's rule for an NCHW tensor's implied memory format (ambiguous cases fall back to NCHW)
    if strides[1] == 0:
        return False
    lo = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lo:
            return False
        if d == 0 and lo == strides[1]:
            return False
        lo = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def conv_output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format dense PyTorch gives a conv output for this input (its suggested format)."""
    if x.dim() == 4 and _strides_like_channels_last(x.shape, x.stride()):
        return torch.channels_last
    return torch.contiguous_format


def _conv_shapes(x: Tensor, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, name):
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(f"{name}: input has {c} channels, the sparse weight expects {in_channels}")
    kh, kw = kernel_size
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    ho = conv_output_size(h, kh, sh, pt, pb, dh)
    wo = conv_output_size(w, kw, sw, pl, pr, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"{name}: input of spatial size {(h, w)} is smaller than the (dilated, padded) kernel")
    return n, c, h, w, ho, wo


def _conv_geom(x_shape, x_strides, out_channels, ho, wo, kernel_size, stride, padding, dilation, groups, y_strides):
    n, c, h, w = x_shape
    pt, _, pl, _ = padding
    return [n, c, h, w, out_channels, ho, wo, kernel_size[0], kernel_size[1], stride[0], stride[1], pt, pl,
            dilation[0], dilation[1], groups, *x_strides, *y_strides]


def _check_conv_args(row_ptr, col_idx, values, bias, in_channels, out_channels, kernel_size, stride, padding,
                     dilation, groups, r, op: str) -> None:
    """The public conv ops' geometry and packed weight (an (out_channels x in_channels / groups * kh * kw)
    matrix of (r x 1) blocks), checked before a kernel reads them."""
    for name, v, n, lo in (("kernel_size", kernel_size, 2, 1), ("stride", stride, 2, 1), ("padding", padding, 4, 0),
                           ("dilation", dilation, 2, 1)):
        if not isinstance(v, (list, tuple)) or len(v) != n:
            raise ValueError(f"{op}: {name} must be a list of {n} ints, got {v!r}")
        for e in v:
            _int_arg(e, name, op, lo)
    _int_arg(in_channels, "in_channels", op, 0)
    _int_arg(out_channels, "out_channels", op, 0)
    _int_arg(groups, "groups", op, 1)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"{op}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
    _check_packed_args(row_ptr, col_idx, values, bias, out_channels,
                       in_channels // groups * kernel_size[0] * kernel_size[1], r, 1, op)


def sparse_conv2d_cpu(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
                  in_channels: int, out_channels: int, kernel_size: List[int], stride: List[int],
                  padding: List[int], dilation: List[int], groups: int, r: int, num_threads: int) -> Tensor:
    """``conv2d(x, W, bias)`` with W packed as (r x 1)-block BSR over (Cout, Cin/groups * kh * kw)."""
    _check_conv_args(row_ptr, col_idx, values, bias, in_channels, out_channels, kernel_size, stride, padding,
                     dilation, groups, r, "sparse_conv2d")
    return sparse_conv2d_eager(x, row_ptr, col_idx, values, bias, in_channels, out_channels, kernel_size, stride,
                               padding, dilation, groups, r, num_threads)


def sparse_conv2d_eager(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
                        in_channels: int, out_channels: int, kernel_size: List[int], stride: List[int],
                        padding: List[int], dilation: List[int], groups: int, r: int, num_threads: int,
                        act: int = 0) -> Tensor:
    """:func:`sparse_conv2d_cpu` with an optional fused activation (code of :data:`ACTIVATIONS`)."""
    _check_placement(x, row_ptr, col_idx, values, bias, "sparse_conv2d")
    if values.device.type != "cpu":
        raise NotImplementedError("sparse_conv2d has CPU kernels only for now")
    plan = conv2d_plan(x, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
    return sparse_conv2d_planned(x, plan, row_ptr, col_idx, values, bias, r, num_threads, act)


def conv2d_plan(x: Tensor, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                groups: int) -> tuple:
    """What a sparse conv call derives from its input's shape and strides alone: ``(output shape, output
    memory format, kernel geometry, workspace floats)``. Valid for every input of the same shape and
    strides (SparseConv2d keeps the last one)."""
    n, c, h, w, ho, wo = _conv_shapes(x, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                      groups, "sparse_conv2d")
    fmt = conv_output_memory_format(x)
    y_strides = torch.empty((n, out_channels, ho, wo), device="meta", memory_format=fmt).stride()
    geom = _conv_geom(x.shape, x.stride(), out_channels, ho, wo, kernel_size, stride, padding, dilation, groups,
                      y_strides)
    return (n, out_channels, ho, wo), fmt, geom, _C.conv2d_workspace(geom)


def sparse_conv2d_planned(x: Tensor, plan: tuple, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
                          bias: Optional[Tensor], r: int, num_threads: int, act: int = 0,
                          residual: Optional[Tensor] = None) -> Tensor:
    """The kernel call of :func:`sparse_conv2d_eager` for validated CPU operands and ``plan`` =
    :func:`conv2d_plan` of an input shaped and strided like ``x``. ``residual``: ``act(conv + bias +
    residual)``, the residual added in the kernel's store when it has the output's shape and strides
    (float32, CPU), by PyTorch after the kernel otherwise."""
    shape, fmt, geom, ws_floats = plan
    y = torch.empty(shape, dtype=torch.float32, memory_format=fmt)
    res = 0
    if residual is not None:
        if (type(residual) is Tensor and residual.dtype is torch.float32 and residual.is_cpu
                and tuple(residual.shape) == tuple(shape) and (residual.stride() == y.stride() or y.numel() <= 1)):
            res = residual.data_ptr()
        else:
            out = sparse_conv2d_planned(x, plan, row_ptr, col_idx, values, bias, r, num_threads)
            return apply_activation(out + residual, ACTIVATIONS[act])
    if shape[0] == 0:
        return y
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    ws = torch.empty(ws_floats, dtype=torch.float32) if ws_floats else None
    _C.conv2d(geom, r, row_ptr.data_ptr(), col_idx.data_ptr(), col_idx.dtype == torch.int16, values.data_ptr(),
              x.data_ptr(), bias.data_ptr() if bias is not None else 0, y.data_ptr(),
              ws.data_ptr() if ws is not None else 0, ws_floats, resolve_threads(num_threads), act, res)
    return y


sparse_conv2d = torch.library.custom_op("sparseprune::sparse_conv2d", sparse_conv2d_cpu, mutates_args=())


@sparse_conv2d.register_fake
def _(x, row_ptr, col_idx, values, bias, in_channels, out_channels, kernel_size, stride, padding, dilation,
      groups, r, num_threads):
    n, c, h, w, ho, wo = _conv_shapes(x, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                      groups, "sparse_conv2d")
    return torch.empty((n, out_channels, ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=conv_output_memory_format(x))


@torch.library.custom_op("sparseprune::sparse_conv2d_input_grad", mutates_args=())
def sparse_conv2d_input_grad(dy: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, in_channels: int,
                             height: int, width: int, kernel_size: List[int], stride: List[int],
                             padding: List[int], dilation: List[int], groups: int, r: int,
                             num_threads: int) -> Tensor:
    """The gradient of :func:`sparse_conv2d` with respect to its input (contiguous NCHW)."""
    if dy.dim() != 4 or dy.dtype != torch.float32:
        raise ValueError(f"sparse_conv2d_input_grad: expected a 4-D float32 gradient, got {tuple(dy.shape)} {dy.dtype}")
    n, out_channels, ho, wo = dy.shape
    op = "sparse_conv2d_input_grad"
    _check_conv_args(row_ptr, col_idx, values, None, in_channels, out_channels, kernel_size, stride, padding,
                     dilation, groups, r, op)
    _int_arg(height, "height", op, 0)
    _int_arg(width, "width", op, 0)
    _check_placement(dy, row_ptr, col_idx, values, None, op)
    if (conv_output_size(height, kernel_size[0], stride[0], padding[0], padding[1], dilation[0]) != ho
            or conv_output_size(width, kernel_size[1], stride[1], padding[2], padding[3], dilation[1]) != wo):
        raise ValueError(f"{op}: a {height}x{width} input does not give the gradient's {ho}x{wo} output with this "
                         "kernel, stride, padding and dilation")
    dx = torch.empty((n, in_channels, height, width), dtype=torch.float32, device=dy.device)
    if n == 0:
        return dx
    if dy.device.type != "cpu":
        raise NotImplementedError("sparse_conv2d_input_grad is CPU-only for now")
    geom = _conv_geom(dx.shape, dx.stride(), out_channels, ho, wo, kernel_size, stride, padding, dilation, groups,
                      dy.stride())
    _C.conv2d_input_grad(geom, r, row_ptr.data_ptr(), col_idx.data_ptr(), col_idx.dtype == torch.int16,
                         values.data_ptr(), dy.data_ptr(), dx.data_ptr(), resolve_threads(num_threads))
    return dx


@sparse_conv2d_input_grad.register_fake
def _(dy, row_ptr, col_idx, values, in_channels, height, width, kernel_size, stride, padding, dilation, groups,
      r, num_threads):
    return dy.new_empty((dy.shape[0], in_channels, height, width))


def _conv_setup(ctx, inputs, output):
    x, row_ptr, col_idx, values, bias, in_channels, out_channels, ks, st, pad, dil, groups, r, nt = inputs
    ctx.save_for_backward(row_ptr, col_idx, values)
    ctx.meta = (in_channels, x.shape[2], x.shape[3], ks, st, pad, dil, groups, r, nt, bias is not None)


def _conv_backward(ctx, grad):
    row_ptr, col_idx, values = ctx.saved_tensors
    in_channels, h, w, ks, st, pad, dil, groups, r, nt, has_bias = ctx.meta
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.sparseprune.sparse_conv2d_input_grad(grad, row_ptr, col_idx, values, in_channels, h, w, ks,
                                                            st, pad, dil, groups, r, nt)
    gb = grad.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[4] else None
    return (gx,) + (None,) * 3 + (gb,) + (None,) * 9


torch.library.register_autograd("sparseprune::sparse_conv2d", _conv_backward, setup_context=_conv_setup)


# -- max pooling (NCHW float32, CPU) ---------------------------------------------------------------
def _pool_pair(v) -> Tuple[int, int]:
    """An int or a 1- / 2-sequence of ints, as PyTorch's pooling takes them."""
    if isinstance(v, int):
        return v, v
    v = tuple(int(e) for e in v)
    return (v[0], v[0]) if len(v) == 1 else v if len(v) == 2 else (-1, -1)


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (a window must start inside the input or its left padding)."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _negated(t: Tensor) -> bool:
    """A lazily negated view (``torch._neg_view``, ``z.conj().imag``): its memory holds -t, and the kernels read
    memory (not asked while torch.compile traces: dynamo cannot trace ``is_neg``)."""
    return not torch.compiler.is_compiling() and t.is_neg()


def maxpool2d_eager(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool,
                    num_threads: Optional[int] = None) -> Optional[Tensor]:
    """``F.max_pool2d(x, ...)`` for a contiguous float32 CPU tensor (N, C, H, W) or (C, H, W) by our kernel,
    the same values; ``None`` where the call is not one it takes (geometry PyTorch refuses, so that the
    caller's fallback raises PyTorch's own error)."""
    (kh, kw), (ph, pw), (dh, dw) = _pool_pair(kernel_size), _pool_pair(padding), _pool_pair(dilation)
    sh, sw = _pool_pair(stride if stride is not None and stride != () and stride != [] else kernel_size)
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0 or ph > kh // 2 or pw > kw // 2:
        return None
    if (x.dim() not in (3, 4) or x.numel() == 0 or not x.is_contiguous() or x.dtype != torch.float32 or not x.is_cpu
            or _negated(x)):  # (a lazily negated view: its memory holds -x)
        return None
    h, w = x.shape[-2:]
    ho, wo = pool_output_size(h, kh, sh, ph, dh, ceil_mode), pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if ho < 1 or wo < 1:
        return None
    y = torch.empty(*x.shape[:-2], ho, wo, dtype=torch.float32)
    planes = x.numel() // (h * w)
    _C.maxpool2d(x.data_ptr(), y.data_ptr(), planes, h, w, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw,
                 resolve_threads(num_threads))
    return y


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: Optional[float] = None,
              num_threads: Optional[int] = None, *, masked_rows: str = "zeros") -> Optional[Tensor]:
    """``softmax(scale * q k^T + mask) v`` per batch and head by our kernel, for inference: ``q`` (B, Lq, H, D),
    ``k`` and ``v`` (B, Lk, H, D) — a transformer's projections viewed per head, read in place — float32 CPU
    tensors whose last dimension is contiguous; the result is (B, Lq, H * D), contiguous: the layout the
    output projection reads. ``mask`` is None, bool (True = attend) or float32 (added to the scores),
    (B or 1, H or 1, Lq or 1, Lk) with a contiguous last dimension; ``scale`` defaults to D ** -0.5. A query row
    with every key masked gives zeros, as ``F.scaled_dot_product_attention`` does, or, for a float mask with
    ``masked_rows="nan"``, NaN, as softmax over scores plus an all ``-inf`` float mask does (Hugging Face's "eager"
    attention; a bool mask still gives zeros). Returns None where the
    call is not one the kernel takes (other dtypes, devices, layouts, a gradient needed, tracing): the
    caller then runs its own attention."""
    if masked_rows not in ("zeros", "nan"):
        raise ValueError(f"masked_rows must be 'zeros' or 'nan', got {masked_rows!r}")
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and q.dim() == 4 and k.dim() == 4
            and v.dim() == 4):
        return None
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if (k.shape != (b, lk, h, d) or v.shape != k.shape or d < 1 or lk < 1
            or not all(t.dtype is torch.float32 and t.is_cpu and t.stride(-1) == 1 and not _negated(t) for t in (q, k, v))
            or call_route(q, k, v) != "eager"):
        return None
    mkind, mstr = 0, (0, 0, 0)
    if mask is not None:
        if (type(mask) is not Tensor or mask.dim() != 4 or mask.dtype not in (torch.bool, torch.float32)
                or not mask.is_cpu or mask.shape[-1] != lk or (mask.stride(-1) != 1 and lk > 1)
                or any(m not in (1, t) for m, t in zip(mask.shape[:3], (b, h, lq))) or mask.requires_grad
                or _negated(mask)):
            return None
        mkind = 2 if mask.dtype is torch.bool else (3 if masked_rows == "nan" else 1)
        mstr = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(3))
    out = torch.empty(b, lq, h * d, dtype=torch.float32)
    if out.numel() == 0:
        return out
    strides = [q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
               v.stride(0), v.stride(2), v.stride(1), lq * h * d, d, h * d, *mstr]
    _C.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0 if mask is None else mask.data_ptr(),
                 mkind, b, h, lq, lk, d, strides, float(d ** -0.5 if scale is None else scale),
                 resolve_threads(num_threads))
    return out


def add_layer_norm(x: Tensor, residual: Optional[Tensor], norm: nn.LayerNorm,
                   num_threads: Optional[int] = None) -> Tensor:
    """``norm(x + residual)`` (``norm(x)`` when ``residual`` is None) — a transformer block's end — as one pass of
    our kernel for contiguous float32 CPU tensors of one shape in eager inference with a plain
    ``nn.LayerNorm`` over the last dimension; PyTorch's own ops otherwise. The same values up to the order
    of additions in the mean and variance."""
    cols = x.shape[-1] if x.dim() else 0
    if (type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (cols,) and cols > 0
            and type(x) is Tensor and x.dtype is torch.float32 and x.is_contiguous() and not _negated(x)
            and (residual is None or type(residual) is not Tensor or not _negated(residual))
            and (residual is None or (type(residual) is Tensor and residual.dtype is torch.float32
                                      and residual.shape == x.shape and residual.is_contiguous() and residual.is_cpu))
            and all(p is None or (p.dtype is torch.float32 and p.is_contiguous() and p.device == x.device
                                  and not _negated(p)) for p in (norm.weight, norm.bias))
            and x.is_cpu and call_route(x, residual, norm.weight, norm.bias) == "eager"):
        y = torch.empty_like(x)
        w, b = norm.weight, norm.bias
        _C.add_layernorm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), 0 if w is None else w.data_ptr(),
                         0 if b is None else b.data_ptr(), y.data_ptr(), x.numel() // cols, cols, float(norm.eps),
                         resolve_threads(num_threads))
        return y
    return norm(x if residual is None else x + residual)


_check_isa_env()
