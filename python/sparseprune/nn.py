"""Sparse modules: drop-in replacements for ``nn.Linear`` that hold only the packed weight."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.sparseprune.*)
from .formats import BSRMatrix, CSRMatrix, block_mask

__all__ = ["SparseLinear", "FORMATS", "detect_block_size", "choose_format"]

FORMATS = ("auto", "dense", "csr", "bsr")
# Candidate block shapes for detection, largest first (a 16x16 pattern is also an 8x8 pattern).
BLOCK_CANDIDATES = ((32, 32), (16, 16), (8, 8), (4, 4), (1, 16), (16, 1), (1, 8), (8, 1), (2, 2), (1, 4), (4, 1))


def _density(w: Tensor) -> float:
    return float((w != 0).sum()) / max(w.numel(), 1)


def detect_block_size(weight: Tensor, tolerance: float = 0.02) -> Optional[Tuple[int, int]]:
    """The largest candidate block shape whose stored fraction is within ``tolerance`` of the true
    density (the zeros come in whole blocks of that shape), or None."""
    d = _density(weight)
    if d == 0.0 or d == 1.0:
        return None
    for bs in BLOCK_CANDIDATES:
        if weight.shape[0] < bs[0] or weight.shape[1] < bs[1]:
            continue
        stored = float(block_mask(weight, bs).sum()) * bs[0] * bs[1] / weight.numel()
        if stored <= d * (1 + tolerance) + 1e-12:
            return bs
    return None


def choose_format(weight: Tensor) -> Tuple[str, Optional[Tuple[int, int]]]:
    """Heuristic choice without timing (convert() measures instead): blocks when the zeros come in
    blocks and at least half the weight is gone, CSR at >= 70% unstructured sparsity, else dense."""
    d = _density(weight)
    bs = detect_block_size(weight)
    if bs is not None and bs[0] * bs[1] >= 16 and d <= 0.5:
        return "bsr", bs
    if d <= 0.3:
        return "csr", None
    return "dense", None


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W packed as CSR or BSR and executed by sparseprune's kernels.

    Build with :meth:`from_dense`. ``format="dense"`` keeps a dense weight (what convert() picks when
    sparse would be slower); it is reported as such, never passed off as sparse.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "csr",
                 block_size: Optional[Tuple[int, int]] = None, num_threads: Optional[int] = None):
        super().__init__()
        if format not in ("dense", "csr", "bsr"):
            raise ValueError(f"format must be one of 'dense', 'csr', 'bsr' for a constructed layer, got {format!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format = format
        self.block_size = (1, 1) if format == "csr" else (tuple(block_size) if block_size else None)
        if format == "bsr" and self.block_size is None:
            raise ValueError("format='bsr' needs a block_size")
        self.num_threads = num_threads
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if format == "dense":
            self.register_buffer("weight", torch.zeros(out_features, in_features))
        else:
            empty = BSRMatrix.from_dense(torch.zeros(out_features, in_features), self.block_size)
            self._set_packed(empty)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "auto", block_size=None,
                   num_threads: Optional[int] = None) -> "SparseLinear":
        """Pack ``linear``'s (masked) weight once. ``format``: auto | dense | csr | bsr."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        weight = linear.weight.detach()
        if weight.device.type != "cpu" and weight.device.type != "cuda":
            raise ValueError(f"unsupported device {weight.device}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        weight = weight.float()
        if format == "auto":
            format, detected = choose_format(weight)
            block_size = block_size or detected
        if format == "csr" and block_size not in (None, (1, 1), [1, 1]):
            raise ValueError("format='csr' has no block_size (use format='bsr')")
        if format == "bsr":
            block_size = tuple(block_size) if block_size is not None else (detect_block_size(weight) or (16, 16))
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features = linear.in_features, linear.out_features
        mod.format = format
        mod.block_size = (1, 1) if format == "csr" else (tuple(block_size) if block_size else None)
        mod.num_threads = num_threads
        b = linear.bias
        mod.bias = nn.Parameter(b.detach().float().clone(), requires_grad=b.requires_grad) if b is not None else None
        if format == "dense":
            mod.register_buffer("weight", weight.clone())
        else:
            packer = CSRMatrix if format == "csr" else BSRMatrix
            mod._set_packed(packer.from_dense(weight, mod.block_size))
        return mod

    def _set_packed(self, m: BSRMatrix) -> None:
        for name, t in zip(("row_ptr", "col_idx", "values"), m.tensors()):
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The packed arrays change size with the sparsity pattern: adopt the incoming tensors (instead of
        # copying into same-shaped buffers), then validate them so the kernels can trust every index.
        if self.format != "dense":
            for name in ("row_ptr", "col_idx", "values"):
                key = prefix + name
                if key in state_dict:
                    t = state_dict[key]
                    if not isinstance(t, Tensor):
                        raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
                    self._buffers[name] = t.detach().clone().contiguous()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.format != "dense":
            try:
                self.packed().validate()
            except (TypeError, ValueError) as e:
                raise ValueError(f"{prefix or 'SparseLinear'}: invalid packed weight in state_dict: {e}") from None

    # -- views --------------------------------------------------------------------------------
    def packed(self) -> BSRMatrix:
        if self.format == "dense":
            raise ValueError("a dense-format SparseLinear has no packed weight")
        if self.format == "csr":
            return CSRMatrix((self.out_features, self.in_features), self.row_ptr, self.col_idx, self.values, check=False)
        return BSRMatrix((self.out_features, self.in_features), self.block_size, self.row_ptr, self.col_idx,
                         self.values, check=False)

    def to_dense(self) -> Tensor:
        """The dense weight this layer computes with (zeros where pruned)."""
        return self.weight.clone() if self.format == "dense" else self.packed().to_dense()

    @property
    def density(self) -> float:
        if self.format == "dense":
            return _density(self.weight)
        return self.packed().density

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format={self.format}"
        if self.format == "bsr":
            s += f", block_size={self.block_size}"
        return s + f", density={self.density:.3f}"

    # -- compute ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseLinear expects a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        if self.format == "dense":
            return F.linear(x, self.weight, self.bias)
        if x.dtype != torch.float32:
            raise TypeError(f"SparseLinear computes in float32; got a {x.dtype} input (cast it with .float())")
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {self.values.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        r, c = self.block_size
        nt = -1 if self.num_threads is None else int(self.num_threads)
        args = (x2, self.row_ptr, self.col_idx, self.values, self.bias, self.out_features, self.in_features, r, c, nt)
        if not ops.can_run_eager(x2):
            y = torch.ops.sparseprune.spmm(*args)  # traced / compiled / exported: the registered op
        elif ops.needs_grad(x2, self.bias):
            y = ops.SpmmFunction.apply(*args)
        else:
            y = ops.spmm_eager(*args)  # same kernel, without the dispatcher's per-call cost
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # Packed indices must stay integers and values float32: refuse dtype casts clearly.
        probe = fn(torch.zeros(1))
        if self.format != "dense" and probe.dtype != torch.float32:
            raise TypeError(f"SparseLinear ({self.format}) runs in float32 only; cannot convert to {probe.dtype}")
        return super()._apply(fn, recurse)


# --- conv ---------------------------------------------------------------------------------------
__all__ += ["SparseConv2d"]


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _conv_padding(padding, kernel_size, stride, dilation):
    """(top, bottom, left, right) for an nn.Conv2d padding (ints, pair, 'valid' or 'same')."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]  # PyTorch puts the odd extra pixel at the end
        return tuple(out)
    ph, pw = _pair(padding, "padding")
    return (ph, ph, pw, pw)


def _plain_inference_call(x: Tensor, bias: Optional[Tensor]) -> bool:
    if type(x) is not torch.Tensor or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` with the weight packed once and executed by sparseprune's kernels.

    Block semantics: a block ``(r, c)`` covers r output channels x c input channels at every kernel
    position (an r x c x kh x kw slab); ``format="csr"`` is unstructured over the
    ``(Cout, Cin/groups * kh * kw)`` view. Either way the packed weight is a BSR of ``(rk x 1)``
    column blocks over that view (rk = r, or 1 for CSR): the kernels read one (input channel, tap)
    column of rk output channels at a time. Grouped convolutions use group-local weights.
    Depthwise convolutions run (correctly but slowly) through the same kernel; ``format="auto"``
    keeps them dense. ``format="dense"`` keeps a dense weight and calls ``F.conv2d``.
    Inputs may be NCHW or channels_last; the output has the memory format dense PyTorch gives.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("build a SparseConv2d with SparseConv2d.from_dense(conv, ...)")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, format: str = "auto", block_size=None,
                   num_threads: Optional[int] = None) -> "SparseConv2d":
        """Pack ``conv``'s (masked) weight once. ``format``: auto | dense | csr | bsr."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        weight = conv.weight.detach()
        if weight.device.type != "cpu":
            raise ValueError(f"SparseConv2d has CPU kernels only; the weight is on {weight.device}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        weight = weight.float().contiguous()
        cout, cin_g, kh, kw = weight.shape
        groups = conv.groups
        mat = weight.reshape(cout, cin_g * kh * kw)
        chan = (weight != 0).any(dim=3).any(dim=2).float()  # (Cout, Cin/groups): block semantics live here
        if format == "auto":
            d = _density(weight)
            detected = detect_block_size(chan) if 0.0 < d < 1.0 else None
            if cin_g == 1 and groups > 1:
                format = "dense"  # depthwise: nothing to share between taps, PyTorch's kernel wins
            elif detected is not None and detected[0] * detected[1] >= 16 and d <= 0.5:
                format, block_size = "bsr", block_size or detected
            elif d <= 0.3:
                format = "csr"
            else:
                format = "dense"
        if format == "csr" and block_size not in (None, (1, 1), [1, 1]):
            raise ValueError("format='csr' has no block_size (use format='bsr')")
        if format == "bsr":
            block_size = tuple(block_size) if block_size is not None else (detect_block_size(chan) or (16, 16))
            if len(block_size) != 2 or min(block_size) < 1:
                raise ValueError(f"block_size must be a pair of positive ints, got {block_size}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_channels, mod.out_channels = conv.in_channels, conv.out_channels
        mod.kernel_size = (kh, kw)
        mod.stride = _pair(conv.stride, "stride")
        mod.dilation = _pair(conv.dilation, "dilation")
        mod.groups = groups
        mod.padding = conv.padding
        mod.padding_mode = conv.padding_mode
        mod._pad4 = _conv_padding(conv.padding, mod.kernel_size, mod.stride, mod.dilation)
        mod.format = format
        mod.block_size = (1, 1) if format == "csr" else (tuple(int(v) for v in block_size) if format == "bsr" else None)
        mod.num_threads = num_threads
        b = conv.bias
        mod.bias = nn.Parameter(b.detach().float().clone(), requires_grad=b.requires_grad) if b is not None else None
        if format == "dense":
            mod.register_buffer("weight", weight.clone())
            mod.rk = 0
        else:
            rk = 1 if format == "csr" else int(mod.block_size[0])
            if groups > 1:
                rk = math.gcd(rk, cout // groups)  # a block row must not straddle two groups
            mod.rk = rk
            packed = BSRMatrix.from_dense(mat, (rk, 1))
            for name, t in zip(("row_ptr", "col_idx", "values"), packed.tensors()):
                mod.register_buffer(name, t)
        return mod

    # -- views --------------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The dense (Cout, Cin/groups, kh, kw) weight this layer computes with (zeros where pruned)."""
        if self.format == "dense":
            return self.weight.clone()
        cols = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        m = BSRMatrix((self.out_channels, cols), (self.rk, 1), self.row_ptr, self.col_idx, self.values, check=False)
        return m.to_dense().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def density(self) -> float:
        if self.format == "dense":
            return _density(self.weight)
        return self.values.numel() / max(1, self.out_channels * (self.in_channels // self.groups)
                                         * self.kernel_size[0] * self.kernel_size[1])

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
             f"bias={self.bias is not None}, format={self.format}")
        if self.format == "bsr":
            s += f", block_size={self.block_size}"
        return s + f", density={self.density:.3f}"

    # -- compute ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseConv2d expects a Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d expects (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W) "
                             f"inputs, got {tuple(x.shape)}")
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        pad4 = self._pad4
        if self.padding_mode != "zeros" and any(pad4):
            x = F.pad(x, (pad4[2], pad4[3], pad4[0], pad4[1]), mode=self.padding_mode)
            pad4 = (0, 0, 0, 0)
        if self.format == "dense":
            pt, pb, pl, pr = pad4
            if pt != pb or pl != pr:  # asymmetric ('same' with an even extent)
                x, pad = F.pad(x, (pl, pr, pt, pb)), (0, 0)
            else:
                pad = (pt, pl)
            return F.conv2d(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)
        if x.dtype != torch.float32:
            raise TypeError(f"SparseConv2d computes in float32; got a {x.dtype} input (cast it with .float())")
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {self.values.device}")
        args = (x, self.row_ptr, self.col_idx, self.values, self.bias, self.in_channels, self.out_channels,
                list(self.kernel_size), list(self.stride), list(pad4), list(self.dilation), self.groups, self.rk,
                -1 if self.num_threads is None else int(self.num_threads))
        if _plain_inference_call(x, self.bias):
            # eager inference on plain CPU tensors: the same implementation without the dispatcher
            # round trip (~35 us a call, a sizeable share of a sparse layer's time at batch 1)
            return ops.sparse_conv2d_cpu(*args)
        return torch.ops.sparseprune.sparse_conv2d(*args)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))
        if self.format != "dense" and probe.dtype != torch.float32:
            raise TypeError(f"SparseConv2d ({self.format}) runs in float32 only; cannot convert to {probe.dtype}")
        return super()._apply(fn, recurse)
