"""Quantized block-sparse weights (int8, bf16) and the one op that runs them (issue #14).

Two pieces, for the modules to build on:

* :class:`QuantBSRMatrix` — a packed container: ``from_dense(weight, block_size, dtype)``,
  ``to_dense()`` (dequantized), ``validate()`` (the only gate between arrays and kernels),
  ``tensors()`` / ``tensor_names``, ``nbytes``.
* :func:`qspmm` — ``y = x @ W.T + bias`` for such a W: quantizes / rounds ``x`` once per call inside
  the kernel, runs the int8 (VNNI / AVX2) or bf16 (AVX512-BF16 / widening) BSR micro-kernel, applies
  scales, compensation and bias at the store. Inference only.

Numerics (identical in every kernel path and in :func:`reference_qspmm`):

* int8 — weights symmetric per output channel (``scale[m] = max|W[m]| / 127``, values in
  [-127, 127]); activations asymmetric per row of ``x`` (per token), computed at run time, on 7 bits
  as torch's dynamic quantization does on x86 (fbgemm's ``reduce_range``):
  ``lo = min(0, min x)``, ``hi = max(0, max x)``, ``s = (hi - lo) / 127`` (``hi / 127 - lo / 127`` where
  ``hi - lo`` overflows), ``zp = round(-lo / s)``,
  ``q = clamp(round(x * (1 / s)) + zp, 0, 127)`` (round half to even). int32 accumulation;
  ``y = float(Σ q·w - zp · comp[m]) * (s * scale[m]) + bias[m]`` with ``comp[m] = Σ_k w[m, k]``
  precomputed at pack time. The integer part is exact, so every path agrees bit for bit.
* bf16 — weights bf16; ``x`` rounded to bf16 (nearest even) unless it already is; exact products,
  fp32 accumulation, fp32 bias.

Packed layout (what the kernels read): a block of ``r x c`` weights is ``c / G`` groups of ``G``
consecutive k (G = 4 for int8, 2 for bf16), each group ``r`` 32-bit words, one per output feature:
``values[b, g, i, j] = W[m0 + i, k0 + g * G + j]`` — one vpdpbusd / vdpbf16ps lane per word.
Block widths must be multiples of G (int8: 4, 8, 16, ...; bf16: even).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import formats, ops, reference
from ._ext import _C

__all__ = ["QuantBSRMatrix", "qspmm", "qspmm_eager", "reference_qspmm", "quantize_rows", "qisa_paths",
           "active_qisa", "QUANT_DTYPES"]

QUANT_DTYPES = (torch.int8, torch.bfloat16)
_GROUP = {torch.int8: 4, torch.bfloat16: 2}
_KIND = {torch.int8: "int8", torch.bfloat16: "bf16"}
_INT8_MAX_K = 65536  # int32 accumulation: 127 * 127 * K (and 255 * 127 * K) stay below 2**31
_ACT_QMAX = 127.0  # activations on 7 bits (torch / fbgemm reduce_range): u8 x s8 pair sums fit in int16


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in _GROUP:
        raise TypeError(f"quantized weight dtype must be torch.int8 or torch.bfloat16, got {dtype!r}")
    return dtype


def _check_block(block_size, dtype) -> Tuple[int, int]:
    r, c = formats._check_block(block_size)
    g = _GROUP[dtype]
    if c % g:
        raise ValueError(f"{_KIND[dtype]} BSR needs block widths that are multiples of {g} (k is grouped by {g} "
                         f"per 32-bit lane), got block_size {(r, c)}; use e.g. (16, 16), (16, 4), (4, 4), (1, 4)")
    return r, c


def qisa_paths(supported_only: bool = True):
    """The quantized kernel paths (``dtype``, ``isa``, ``kernels``, ``supported``) from csrc/cpu/ukernels.inc."""
    return [p for p in _C.qpaths() if p["supported"] or not supported_only]


def active_qisa(dtype) -> str:
    """The ISA path :func:`qspmm` uses now for ``dtype`` (follows SPARSEPRUNE_ISA / ``ops.set_isa``)."""
    return _C.active_qisa(_KIND[_check_dtype(dtype)])


class QuantBSRMatrix(formats.BlockRows):
    """Block-sparse weight quantized to int8 or bf16, packed for the quantized kernels.

    Attributes: ``shape`` (rows M, cols K), ``block_size`` (r, c), ``dtype`` (torch.int8 or torch.bfloat16),
    ``row_ptr`` (int32, block_rows + 1), ``col_idx`` (int16 or int32, one per stored block), ``values``
    (``dtype``, shape (nnzb, c / G, r, G)), and for int8 ``scales`` (float32, M: per-output-channel
    weight scale) and ``compensation`` (int32, M: sum of the quantized weights of each output).
    """

    format = "bsr"

    def __init__(self, shape, block_size, dtype, row_ptr, col_idx, values, scales=None, compensation=None, *,
                 check: bool = True):
        self.dtype = _check_dtype(dtype)
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = _check_block(block_size, self.dtype)
        self.row_ptr = row_ptr
        self.col_idx = col_idx
        self.values = values
        self.scales = scales
        self.compensation = compensation
        if check:
            self.validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: Tensor, block_size=(16, 16), dtype=torch.int8) -> "QuantBSRMatrix":
        """Pack every block of ``weight`` (M x K) holding a non-zero, quantized to ``dtype``."""
        dtype = _check_dtype(dtype)
        r, c = _check_block(block_size, dtype)
        dense = formats._as_matrix(weight)
        m, k = dense.shape
        if dtype == torch.int8 and k > _INT8_MAX_K:
            raise ValueError(f"int8 BSR supports at most {_INT8_MAX_K} input features (int32 accumulation), got {k}")
        nz = formats.block_mask(dense, (r, c))  # (Mb, Kb)
        counts = nz.sum(dim=1, dtype=torch.int64)
        row_ptr = torch.zeros(nz.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        if row_ptr[-1] > torch.iinfo(torch.int32).max:
            raise ValueError("too many non-zero blocks for 32-bit row pointers")
        col_idx = nz.nonzero()[:, 1].to(formats.index_dtype_for(nz.shape[1]))
        g = _GROUP[dtype]
        scales = comp = None
        if dtype == torch.int8:
            if k and not bool(torch.isfinite(dense).all()):  # int8 has no NaN / inf to hold them
                bad = (~torch.isfinite(dense)).any(dim=1).nonzero()[:, 0].tolist()
                raise ValueError(f"int8 weights must be finite: output row(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} "
                                 "hold NaN or an infinity")
            amax = dense.abs().amax(dim=1).float() if k else dense.new_zeros(m, dtype=torch.float32)
            # a row too small for a normal float32 scale (|w| < ~1.5e-36) is stored as zeros
            scales = torch.where(amax / 127.0 >= torch.finfo(torch.float32).tiny, amax / 127.0,
                                 torch.ones_like(amax)).contiguous()
            wq = torch.round(dense / scales[:, None]).clamp_(-127, 127).to(torch.int8)
            comp = wq.sum(dim=1, dtype=torch.int32).contiguous()
        else:
            wq = dense.to(torch.bfloat16)
        blocks = formats._blocks(wq, r, c)[nz]  # (nnzb, c, r), column-major blocks
        values = blocks.reshape(-1, c // g, g, r).permute(0, 1, 3, 2).contiguous()
        return cls((m, k), (r, c), dtype, row_ptr.to(torch.int32), col_idx, values, scales, comp, check=False)

    @classmethod
    def from_tensors(cls, shape, block_size, dtype, tensors: dict) -> "QuantBSRMatrix":
        """Rebuild from :meth:`tensors` (e.g. a loaded file): validated before anything runs on it."""
        return cls(shape, block_size, dtype, tensors.get("row_ptr"), tensors.get("col_idx"), tensors.get("values"),
                   tensors.get("scales"), tensors.get("compensation"), check=True)

    def _column_major_blocks(self) -> Tensor:
        """values as (nnzb, c, r) column-major blocks (the fp32 BSR layout)."""
        r, c = self.block_size
        return self.values.permute(0, 1, 3, 2).reshape(-1, c, r)

    def int_repr(self) -> Tensor:
        """The stored weights as a dense M x K matrix of ``dtype`` (int8 values before scaling)."""
        m, k = self.shape
        r, c = self.block_size
        mb, kb = self.block_shape
        out = torch.zeros(mb, r, kb, c, dtype=self.dtype, device=self.values.device)  # row-major, as BSRMatrix
        rows = torch.repeat_interleave(torch.arange(mb, device=self.row_ptr.device),
                                       self.row_ptr[1:].long() - self.row_ptr[:-1].long())
        cols = self.col_idx.long() & 0xFFFF if self.col_idx.dtype == torch.int16 else self.col_idx.long()
        out[rows, :, cols, :] = self._column_major_blocks().transpose(1, 2)
        return out.reshape(mb * r, kb * c)[:m, :k].contiguous()

    def to_dense(self) -> Tensor:
        """The dequantized weight, float32 M x K."""
        w = self.int_repr().float()
        if self.dtype == torch.int8:
            w = w * self.scales[:, None]
        return w

    # -- properties ---------------------------------------------------------------------------
    @property
    def tensor_names(self) -> Tuple[str, ...]:
        base = ("row_ptr", "col_idx", "values")
        return base + ("scales", "compensation") if self.dtype == torch.int8 else base

    def tensors(self) -> Tuple[Tensor, ...]:
        """The arrays the kernels read, in the order of :attr:`tensor_names`."""
        return tuple(getattr(self, n) for n in self.tensor_names)

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> "QuantBSRMatrix":
        """Check every invariant the kernels rely on; raise ValueError / TypeError naming the problem."""
        m, k = self.shape
        if m < 0 or k < 0:
            raise ValueError(f"negative shape {self.shape}")
        dtype = _check_dtype(self.dtype)
        r, c = _check_block(self.block_size, dtype)
        g = _GROUP[dtype]
        if dtype == torch.int8 and k > _INT8_MAX_K:
            raise ValueError(f"int8 BSR supports at most {_INT8_MAX_K} input features, got {k}")
        for name in self.tensor_names:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if dtype == torch.bfloat16 and (self.scales is not None or self.compensation is not None):
            raise ValueError("bf16 BSR has no scales / compensation")
        v = self.values
        if v.dtype != dtype:
            raise TypeError(f"values must be {dtype}, got {v.dtype}")
        nnzb = self._check_index()
        if tuple(v.shape) != (nnzb, c // g, r, g):
            raise ValueError(f"values must have shape {(nnzb, c // g, r, g)} for {nnzb} blocks of {r}x{c}, "
                             f"got {tuple(v.shape)}")
        tensors = self.tensors()
        if not all(t.is_contiguous() for t in tensors):
            raise ValueError(f"{', '.join(self.tensor_names)} must be contiguous")
        if len({t.device for t in tensors}) != 1:
            raise ValueError(f"{', '.join(self.tensor_names)} must be on one device")
        if dtype == torch.int8:
            s, cp = self.scales, self.compensation
            if s.dtype != torch.float32 or s.dim() != 1 or s.numel() != m:
                raise ValueError(f"scales must be float32 of shape ({m},), got {s.dtype} {tuple(s.shape)}")
            if cp.dtype != torch.int32 or cp.dim() != 1 or cp.numel() != m:
                raise ValueError(f"compensation must be int32 of shape ({m},), got {cp.dtype} {tuple(cp.shape)}")
            if m and not bool((torch.isfinite(s) & (s > 0)).all()):
                raise ValueError("scales must be finite and positive")
            if m and not torch.equal(self.int_repr().sum(dim=1, dtype=torch.int32), cp):
                raise ValueError("compensation does not match the row sums of the quantized weights")
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, block_size={self.block_size}, dtype={self.dtype}, "
                f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, index={self.col_idx.dtype})")


# -- the op ---------------------------------------------------------------------------------------
def _check_operands(x: Tensor, values: Tensor, bias: Optional[Tensor], rows: int, cols: int, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D input, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{name}: expected a float32 or bfloat16 input, got {x.dtype}")
    if x.shape[1] != cols:
        raise ValueError(f"{name}: input has {x.shape[1]} features, the sparse weight expects {cols}")
    if x.device.type != "cpu" or values.device.type != "cpu":
        raise NotImplementedError(f"{name}: quantized kernels are CPU-only")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.numel() != rows):
        raise ValueError(f"{name}: bias must be float32 of shape ({rows},), got {bias.dtype} {tuple(bias.shape)}")


def _check_packed_args(row_ptr, col_idx, values, scales, compensation, rows: int, cols: int, r: int, c: int,
                       op: str) -> None:
    """A quantized packed weight given to the public op or :func:`qspmm`, checked in full (as
    :meth:`QuantBSRMatrix.validate`) before a kernel reads it; once per unchanged set of arrays."""
    ops._check_block_geometry(rows, cols, r, c, op)
    if not isinstance(values, Tensor):
        raise TypeError(f"{op}: values must be a Tensor, got {type(values).__name__}")
    ops.checked_once((row_ptr, col_idx, values, scales, compensation), (rows, cols, r, c), op,
                     lambda: QuantBSRMatrix((rows, cols), (r, c), values.dtype, row_ptr, col_idx, values, scales,
                                            compensation, check=True))


def qspmm_eager(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Optional[Tensor],
                compensation: Optional[Tensor], bias: Optional[Tensor], rows: int, cols: int, r: int, c: int,
                num_threads: int, act: int = 0, out_shape: Optional[tuple] = None,
                residual: Optional[Tensor] = None) -> Tensor:
    """The body of the ``sparseprune::qspmm`` op without the dispatcher, for validated operands.
    ``act``: activation code (``ops.ACTIVATIONS``) fused into the kernel's store.
    ``out_shape``: the modules' direct call passes a contiguous float32 ``x`` of any rank (last dimension
    ``cols > 0``) and the shape of ``y``, which saves two reshapes (~3 us a call); otherwise ``x`` is 2-D.
    ``residual`` (2-D ``x`` only): a float32 CPU ``(n, rows)`` tensor added in the store after the bias,
    before the activation (copied first unless its rows are contiguous)."""
    if residual is not None:
        if (out_shape is not None or x.dim() != 2 or residual.shape != (x.shape[0], rows)
                or residual.dtype != torch.float32 or not residual.is_cpu):
            raise ValueError(f"qspmm: the residual must be a float32 CPU (rows of x, {rows}) tensor for a 2-D x, "
                             f"got {residual.dtype} {tuple(residual.shape)}")
        if residual.stride(1) != 1 or residual.stride(0) != rows:
            residual = residual.contiguous()
    s8 = values.dtype == torch.int8
    out_dtype = x.dtype
    if out_shape is not None:
        n, ldx = x.numel() // cols, cols
        y = torch.empty(out_shape, dtype=torch.float32)
    else:
        if s8 and x.dtype != torch.float32:
            x = x.float()
        if x.stride(1) != 1 or x.stride(0) < max(cols, 1):
            x = x.contiguous()
        n, ldx = x.shape[0], max(x.stride(0), cols)
        y = torch.empty(n, rows, dtype=torch.float32, device=x.device)
    if n == 0 or rows == 0:
        return y.to(out_dtype)
    if cols == 0:  # nothing to multiply (and x may have no storage)
        y.zero_()
        if bias is not None:
            y += bias
        if residual is not None:
            y += residual
        return ops.apply_activation(y, ops.ACTIVATIONS[act]).to(out_dtype)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    args = ("int8" if s8 else "bf16", rows, cols, r, c, row_ptr.data_ptr(), col_idx.data_ptr(),
            col_idx.dtype == torch.int16, values.data_ptr(), scales.data_ptr() if s8 else 0,
            compensation.data_ptr() if s8 else 0, x.data_ptr(), x.dtype == torch.bfloat16, n,
            ldx, bias.data_ptr() if bias is not None else 0, y.data_ptr(), rows, ops.resolve_threads(num_threads), act)
    if residual is not None:
        _C.qspmm_res(*args, residual.data_ptr())
    else:
        _C.qspmm(*args)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def qconv_im2col_eager(xh: Tensor, kernel_size, stride, dilation, pad4, row_ptr: Tensor, col_idx: Tensor,
                       values: Tensor, scales: Optional[Tensor], compensation: Optional[Tensor],
                       bias: Optional[Tensor], rows: int, r: int, c: int, num_threads: int, act: int = 0,
                       residual: Optional[Tensor] = None) -> Tensor:
    """A convolution through the int8 / bf16 BSR kernel over its implicit im2col matrix: ``xh`` is the
    input as a contiguous NHWC CPU tensor ``(N, H, W, C)`` (float32; bfloat16 too for bfloat16 weights),
    zero padding ``pad4`` = (top, bottom, left, right) implied; each row of patches (columns in
    ``(kh, kw, C)`` order) is gathered inside the kernel instead of materialised (a 3x3 im2col matrix is
    9x the image, and the padded copy goes too). Returns ``(N * Ho * Wo, rows)`` float32: the rows of an
    NHWC output. ``residual``: a float32 CPU ``(N * Ho * Wo, rows)`` tensor added in the store after the bias,
    before the activation (copied first unless its rows are contiguous)."""
    s8 = values.dtype == torch.int8
    if (xh.dtype not in ((torch.float32,) if s8 else (torch.float32, torch.bfloat16)) or xh.dim() != 4
            or not xh.is_contiguous() or not xh.is_cpu):
        raise ValueError("qconv_im2col_eager needs a contiguous (N, H, W, C) CPU tensor, float32 (or bfloat16 with "
                         "bfloat16 weights)")
    n, h, w, ch = xh.shape
    (kh, kw), (sh, sw), (dh, dw), (pt, pb, pl, pr) = kernel_size, stride, dilation, pad4
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    y = torch.empty(n * ho * wo, rows, dtype=torch.float32)
    if residual is not None:
        if residual.shape != y.shape or residual.dtype != torch.float32 or not residual.is_cpu:
            raise ValueError(f"qconv_im2col_eager: the residual must be a float32 CPU {tuple(y.shape)} tensor, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        if residual.stride(1) != 1 or residual.stride(0) != rows:
            residual = residual.contiguous()
    if y.numel() == 0:
        return y
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    args = ("int8" if s8 else "bf16", rows, kh * kw * ch, r, c, row_ptr.data_ptr(), col_idx.data_ptr(),
            col_idx.dtype == torch.int16, values.data_ptr(), scales.data_ptr() if s8 else 0,
            compensation.data_ptr() if s8 else 0, xh.data_ptr(), xh.dtype == torch.bfloat16,
            n, h, w, ch, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr,
            bias.data_ptr() if bias is not None else 0, y.data_ptr(), rows, ops.resolve_threads(num_threads), act)
    if residual is not None:
        _C.qspmm_im2col_res(*args, residual.data_ptr())
    else:
        _C.qspmm_im2col(*args)
    return y


def qconv_planes_eager(x: Tensor, kernel_size, stride, dilation, pad_tl, row_ptr: Tensor, col_idx: Tensor,
                       values: Tensor, scales: Optional[Tensor], compensation: Optional[Tensor], bias: Optional[Tensor],
                       rows: int, r: int, c: int, num_threads: int, act: int = 0,
                       residual: Optional[Tensor] = None) -> Tensor:
    """A convolution whose output is the input's size divided by the stride (1x1; 3x3 with padding 1; 3x3 /
    2 with padding 1 on an even size; ...) through the int8 / bf16 BSR kernel on NCHW planes: ``x`` a
    contiguous float32 CPU ``(N, C, H, W)`` tensor (H, W multiples of the stride), W the packed
    ``(rows, kh * kw * C)`` matrix (columns in (kh, kw, C) order), ``pad_tl`` the zero padding (top, left).
    Returns the contiguous ``(N, rows, H / sh, W / sw)`` output: pixel (oh, ow) is the patch from input row
    ``sh * oh - pt``, column ``sw * ow - pl`` (the bottom / right padding is whatever that output needs). Rows
    of the product are pixels, read from the channel planes (a tap: the planes of its stride phase at a
    shift; strided inputs are split into their phases first, one copy) and written to the output planes by
    the kernel itself (paths without a planes kernel, or blocks of other than 16 rows: through NHWC, the
    implicit im2col rows and transposes in C++), with the numerics of :func:`qconv_im2col_eager`.
    ``residual``: a float32 CPU tensor of the output's shape, added in the store after the bias, before the
    activation (copied first unless contiguous)."""
    s8 = values.dtype == torch.int8
    if x.dtype != torch.float32 or x.dim() != 4 or not x.is_contiguous() or not x.is_cpu:
        raise ValueError("qconv_planes_eager needs a contiguous (N, C, H, W) float32 CPU tensor")
    n, ch, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (pt, pl) = kernel_size, stride, dilation, pad_tl
    if sh < 1 or sw < 1 or h % sh or w % sw:
        raise ValueError(f"qconv_planes_eager: the image size {(h, w)} must be a multiple of the stride {(sh, sw)}")
    ho, wo = h // sh, w // sw
    y = torch.empty(n, rows, ho, wo, dtype=torch.float32)
    if residual is not None:
        if residual.shape != y.shape or residual.dtype != torch.float32 or not residual.is_cpu:
            raise ValueError(f"qconv_planes_eager: the residual must be a float32 CPU {tuple(y.shape)} tensor, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        residual = residual.contiguous()
    if y.numel() == 0:
        return y
    if ch == 0:  # nothing to multiply
        y.copy_((bias if bias is not None else torch.zeros(rows)).view(1, -1, 1, 1).expand_as(y))
        if residual is not None:
            y += residual
        return ops.apply_activation(y, ops.ACTIVATIONS[act])
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if (sh, sw) != (1, 1):
        if (kh, kw, pt, pl) == (1, 1, 0, 0):  # only phase (0, 0) is read: the kept pixels, a stride-1 1x1 conv
            x, sh, sw = x[:, :, ::sh, ::sw].contiguous(), 1, 1
        else:  # (N, sh, sw, C, H / sh, W / sw): the phases, each C planes
            x = x.view(n, ch, ho, sh, wo, sw).permute(0, 3, 5, 1, 2, 4).contiguous()
    _C.qspmm_planes_res("int8" if s8 else "bf16", rows, kh * kw * ch, r, c, row_ptr.data_ptr(), col_idx.data_ptr(),
                        col_idx.dtype == torch.int16, values.data_ptr(), scales.data_ptr() if s8 else 0,
                        compensation.data_ptr() if s8 else 0, x.data_ptr(), n, ho, wo, kh, kw, dh, dw, pt, pl, sh, sw,
                        bias.data_ptr() if bias is not None else 0, y.data_ptr(), ops.resolve_threads(num_threads),
                        act, residual.data_ptr() if residual is not None else 0)
    return y


@torch.library.custom_op("sparseprune::qspmm", mutates_args=())
def _qspmm_op(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Optional[Tensor],
              compensation: Optional[Tensor], bias: Optional[Tensor], rows: int, cols: int, r: int, c: int,
              num_threads: int) -> Tensor:
    """``x @ W.T + bias`` for an int8 / bf16 block-sparse W packed by :class:`QuantBSRMatrix`."""
    _check_operands(x, values, bias, rows, cols, "qspmm")
    if values.dtype == torch.int8 and (scales is None or compensation is None):
        raise ValueError("qspmm: int8 weights need scales and compensation")
    _check_packed_args(row_ptr, col_idx, values, scales, compensation, rows, cols, r, c, "qspmm")
    return qspmm_eager(x, row_ptr, col_idx, values, scales, compensation, bias, rows, cols, r, c, num_threads)


@_qspmm_op.register_fake
def _(x, row_ptr, col_idx, values, scales, compensation, bias, rows, cols, r, c, num_threads):
    torch._check(x.dim() == 2, lambda: "qspmm: expected a 2-D input")
    torch._check(x.shape[1] == cols, lambda: f"qspmm: input features must be {cols}")
    return x.new_empty(x.shape[0], rows)


def _qspmm_backward(ctx, grad):
    raise RuntimeError("sparseprune::qspmm is inference-only (quantized weights have no gradient); "
                       "train the float model and quantize afterwards")


def _qspmm_setup(ctx, inputs, output):
    pass


torch.library.register_autograd("sparseprune::qspmm", _qspmm_backward, setup_context=_qspmm_setup)


def qspmm(x: Tensor, packed: QuantBSRMatrix, bias: Optional[Tensor] = None, num_threads: int = 0) -> Tensor:
    """``x @ W.T + bias`` for a quantized block-sparse ``W``; ``x`` is (..., K), float32 or bfloat16.

    The output has x's dtype (computation in int32 / fp32). ``num_threads <= 0`` means
    ``torch.get_num_threads()``. Inference only: raises if a gradient would be needed."""
    if not isinstance(packed, QuantBSRMatrix):
        raise TypeError(f"qspmm: expected a QuantBSRMatrix, got {type(packed).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"qspmm: expected a tensor input, got {type(x).__name__}")
    m, k = packed.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"qspmm: input of shape {tuple(x.shape)} does not end in {k} features")
    route = ops.call_route(x, bias)
    if route == "autograd":
        raise RuntimeError("qspmm is inference-only: call it under torch.no_grad() / inference_mode, or on "
                           "inputs that do not require grad")
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k)
    r, c = packed.block_size
    args = (packed.row_ptr, packed.col_idx, packed.values, packed.scales, packed.compensation, bias, m, k, r, c,
            int(num_threads))
    if route == "eager":
        _check_operands(x2, packed.values, bias, m, k, "qspmm")
        _check_packed_args(*args[:5], m, k, r, c, "qspmm")  # its arrays may have been replaced since it was built
        y = qspmm_eager(x2, *args)
    else:
        y = torch.ops.sparseprune.qspmm(x2, *args)
    return y.reshape(*lead, m)


# -- pure-torch reference -------------------------------------------------------------------------
def quantize_rows(x: Tensor):
    """Per-row asymmetric uint8 quantization of a float32 (N, K) x, exactly as the kernels do it.

    Returns (q as float32 integers in [0, 127], scale (N,), zero_point (N,) as float32 integers)."""
    x = x.float()
    n = x.shape[0]
    if x.shape[1] == 0:
        lo = hi = torch.zeros(n)
    else:  # the range skips NaN; a row holding NaN or an infinity gets a NaN scale (its output row is NaN)
        nan = torch.isnan(x)
        lo = torch.where(nan, torch.inf, x).amin(dim=1).clamp(max=0.0)
        hi = torch.where(nan, -torch.inf, x).amax(dim=1).clamp(min=0.0)
    s = (hi - lo) / _ACT_QMAX
    # a finite range wider than float32 (hi - lo overflows) scaled part by part, as the kernels do
    s = torch.where(torch.isinf(s) & torch.isfinite(hi) & torch.isfinite(lo), hi / _ACT_QMAX - lo / _ACT_QMAX, s)
    s = torch.where((s >= 1e-30) & torch.isfinite(s), s, torch.ones_like(s))
    inv = torch.div(torch.ones_like(s), s)
    zp = torch.round(torch.div(-lo, s)).clamp(0.0, _ACT_QMAX)
    q = torch.nan_to_num(torch.round(x * inv[:, None]) + zp[:, None], nan=0.0).clamp(0.0, _ACT_QMAX)
    s = torch.where(torch.isfinite(x).all(dim=1), s, torch.nan)  # all() of an empty row: True
    return q, s, zp


def reference_qspmm(x: Tensor, packed: QuantBSRMatrix, bias: Optional[Tensor] = None) -> Tensor:
    """Slow, obviously-correct twin of :func:`qspmm` (fp32 output). int8 agrees bit for bit."""
    m, k = packed.shape
    r, c = packed.block_size
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    blocks = packed._column_major_blocks()
    if packed.dtype == torch.int8:
        w = reference.bsr_to_dense(packed.row_ptr, packed.col_idx, blocks.to(torch.int32), m, k, r, c)  # float64
        q, s, zp = quantize_rows(x2)
        acc = (q.double() @ w.T).long()  # exact: |acc| < 2**31
        acc = acc - zp.long()[:, None] * packed.compensation.long()[None, :]
        y = acc.float() * (s[:, None] * packed.scales[None, :])
    else:
        w = reference.bsr_to_dense(packed.row_ptr, packed.col_idx, blocks.float(), m, k, r, c)
        y = (x2.to(torch.bfloat16).double() @ w.T).float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], m)
