"""Sparse modules: drop-in replacements for ``nn.Linear`` that hold only the packed weight."""
from __future__ import annotations

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
