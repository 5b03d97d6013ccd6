"""Custom ops (``torch.library``) where torch meets the kernels.

Every op has a schema, a fake kernel (so meta tensors, ``torch.compile`` and ``torch.export`` see
shapes), device implementations that hand raw pointers to the compiled kernels, and autograd for
the dense input. Python allocates outputs; C++ fills them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext
from ._ext import _C

__all__ = ["spmm", "spmm_t", "spmm_eager", "can_run_eager", "needs_grad", "SpmmFunction", "set_isa", "active_isa", "isa_paths", "resolve_threads"]


def set_isa(isa: str) -> None:
    """Force a CPU kernel path ("scalar", "avx2", "avx512" or "best"). Process-wide."""
    _C.set_isa(isa)


def active_isa() -> str:
    return _C.active_isa()


def isa_paths(supported_only: bool = True):
    return [p for p in _C.paths() if p["supported"] or not supported_only]


def resolve_threads(num_threads: int) -> int:
    return torch.get_num_threads() if num_threads is None or num_threads <= 0 else int(num_threads)


def _check_operands(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
                    bias: Optional[Tensor], feat: int, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D input, got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32 input, got {x.dtype}")
    if x.shape[1] != feat:
        raise ValueError(f"{name}: input has {x.shape[1]} features, the sparse weight expects {feat}")
    dev = values.device
    for t, what in ((x, "input"), (row_ptr, "row_ptr"), (col_idx, "col_idx")):
        if t.device != dev:
            raise ValueError(f"{name}: {what} is on {t.device} but the sparse weight is on {dev}")
    if bias is not None and (bias.device != dev or bias.dtype != torch.float32):
        raise ValueError(f"{name}: bias must be float32 on {dev}, got {bias.dtype} on {bias.device}")


def _cuda_stream_ptr(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


# -- spmm: Y = X W^T + b ------------------------------------------------------------------------
@torch.library.custom_op("sparseprune::spmm", mutates_args=())
def spmm(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
         rows: int, cols: int, r: int, c: int, num_threads: int) -> Tensor:
    """``x @ W.T + bias`` for the block-sparse W (rows x cols, blocks r x c; CSR is r = c = 1)."""
    _check_operands(x, row_ptr, col_idx, values, bias, cols, "spmm")
    return spmm_eager(x, row_ptr, col_idx, values, bias, rows, cols, r, c, num_threads)


def spmm_eager(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
               rows: int, cols: int, r: int, c: int, num_threads: int) -> Tensor:
    """The body of :func:`spmm` without the dispatcher (a few microseconds instead of tens).

    For callers that have already validated operands (SparseLinear in eager inference)."""
    if x.stride(1) != 1 or x.stride(0) < max(cols, 1):
        x = x.contiguous()
    n = x.shape[0]
    y = torch.empty(n, rows, dtype=torch.float32, device=x.device)
    if n == 0:
        return y
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    args = (rows, cols, r, c, row_ptr.data_ptr(), col_idx.data_ptr(), col_idx.dtype == torch.int16,
            values.data_ptr(), x.data_ptr(), n, max(x.stride(0), cols), bias.data_ptr() if bias is not None else 0,
            y.data_ptr(), rows)
    if x.device.type == "cpu":
        _C.spmm(*args, resolve_threads(num_threads))
    elif x.device.type == "cuda":
        if _ext._cuda is None:
            raise RuntimeError(f"sparseprune was built without CUDA kernels: {_ext.CUDA_STATUS}")
        with torch.cuda.device(x.device):
            _ext._cuda.spmm(*args, _cuda_stream_ptr(x))
    else:
        raise ValueError(f"spmm: no kernels for device type {x.device.type!r}")
    return y


def can_run_eager(x: Tensor) -> bool:
    """True when a call may skip the dispatcher: plain tensors, not being traced or compiled."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def spmm_t_eager(dy: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor,
                 rows: int, cols: int, r: int, c: int, num_threads: int) -> Tensor:
    dy = dy.contiguous()
    n = dy.shape[0]
    dx = torch.empty(n, cols, dtype=torch.float32, device=dy.device)
    if n == 0:
        return dx
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
