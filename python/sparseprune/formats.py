"""Packed sparse formats: CSR and BSR containers that the kernels execute.

Both are *block* compressed-row formats over a logical ``rows x cols`` matrix: CSR is the 1x1 block
case. Blocks are stored column-major (``values[b, j, i] = W[m0 + i, k0 + j]``), so that one block
column is ``r`` contiguous output features. Matrices whose shape is not a multiple of the block are
padded with zeros inside the edge blocks; the kernels never read or write outside the real shape.

Column indices are 16-bit when every block column fits (half the index bytes: the memory-bound
small-batch case is limited by bytes of values + indices), 32-bit otherwise.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["BlockRows", "BSRMatrix", "CSRMatrix", "index_dtype_for", "block_mask"]

_INT16_MAX = 32767


def index_dtype_for(block_cols: int) -> torch.dtype:
    return torch.int16 if block_cols <= _INT16_MAX + 1 else torch.int32


def _check_block(block_size) -> Tuple[int, int]:
    try:
        if isinstance(block_size, (str, bytes)) or len(block_size) != 2:
            raise TypeError
        r, c = (int(block_size[0]), int(block_size[1]))
    except (TypeError, ValueError, IndexError):
        raise TypeError(f"block_size must be a pair of positive ints (r, c), got {block_size!r}") from None
    if r < 1 or c < 1:
        raise ValueError(f"block_size must be positive, got {(r, c)}")
    if r > 4096 or c > 4096:
        raise ValueError(f"block_size {(r, c)} is too large (at most 4096 per side)")
    return r, c


def _blocks(dense: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """(Mb, Kb, c, r) view of the zero-padded matrix: one column-major block per (block row, block col)."""
    m, k = dense.shape
    mb, kb = math.ceil(m / r), math.ceil(k / c)
    if (mb * r, kb * c) != (m, k):
        padded = dense.new_zeros(mb * r, kb * c)
        padded[:m, :k] = dense
        dense = padded
    return dense.reshape(mb, r, kb, c).permute(0, 2, 3, 1)


def block_mask(dense: torch.Tensor, block_size) -> torch.Tensor:
    """Boolean (Mb, Kb) mask of the blocks holding at least one non-zero (NaN counts as non-zero)."""
    r, c = _check_block(block_size)
    return (_blocks(dense, r, c) != 0).any(dim=3).any(dim=2)


class BlockRows:
    """What every block compressed-row container shares: ``shape``, ``block_size``, ``row_ptr``,
    ``col_idx``, ``values`` and ``tensors()``; the sizes derived from them; the index checks."""

    @property
    def block_shape(self) -> Tuple[int, int]:
        r, c = self.block_size
        return math.ceil(self.shape[0] / r), math.ceil(self.shape[1] / c)

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_idx.numel())

    @property
    def nnz(self) -> int:
        """Stored values (a stored block counts r*c, zeros inside it included)."""
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Fraction of the matrix that is stored (and computed)."""
        numel = self.shape[0] * self.shape[1]
        return self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _check_index(self) -> int:
        """Check ``row_ptr`` / ``col_idx`` against the block grid (dtypes, sizes, monotone row pointers,
        in-range, sorted, unique columns); return the number of stored blocks."""
        mb, kb = self.block_shape
        rp, ci = self.row_ptr, self.col_idx
        for name, t in (("row_ptr", rp), ("col_idx", ci)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if rp.dtype != torch.int32:
            raise TypeError(f"row_ptr must be int32, got {rp.dtype}")
        if ci.dtype not in (torch.int16, torch.int32):
            raise TypeError(f"col_idx must be int16 or int32, got {ci.dtype}")
        if ci.dtype == torch.int16 and kb > _INT16_MAX + 1:
            raise ValueError(f"int16 column indices cannot address {kb} block columns")
        if rp.dim() != 1 or rp.numel() != mb + 1:
            raise ValueError(f"row_ptr must have {mb + 1} entries for {mb} block rows, got shape {tuple(rp.shape)}")
        if ci.dim() != 1:
            raise ValueError(f"col_idx must be 1-D, got shape {tuple(ci.shape)}")
        nnzb = ci.numel()
        if rp.device.type == "meta" or ci.device.type == "meta":
            return nnzb  # no values to inspect; meta tensors never reach a kernel
        rpl = rp.long()
        if int(rpl[0]) != 0:
            raise ValueError(f"row_ptr[0] must be 0, got {int(rpl[0])}")
        if int(rpl[-1]) != nnzb:
            raise ValueError(f"row_ptr[-1] = {int(rpl[-1])} does not match {nnzb} column indices")
        if mb and bool((rpl[1:] < rpl[:-1]).any()):
            raise ValueError("row_ptr must be non-decreasing")
        if nnzb:
            cil = ci.long()
            if ci.dtype == torch.int16:
                cil = cil & 0xFFFF  # the kernels read 16-bit indices as unsigned
            if int(cil.min()) < 0 or int(cil.max()) >= kb:
                raise ValueError(f"column indices must lie in [0, {kb}), got [{int(cil.min())}, {int(cil.max())}]")
            # strictly increasing inside each row: a decrease is allowed only where a new row starts
            starts = torch.zeros(nnzb, dtype=torch.bool, device=ci.device)
            starts[rpl[:-1][rpl[:-1] < rpl[1:]]] = True
            if bool(((cil[1:] <= cil[:-1]) & ~starts[1:]).any()):
                raise ValueError("column indices must be sorted and unique within each row")
        return nnzb


class BSRMatrix(BlockRows):
    """Block-sparse row matrix of float32 values with blocks of ``block_size = (r, c)``.

    Attributes: ``shape`` (rows, cols), ``block_size``, ``row_ptr`` (int32, block_rows + 1),
    ``col_idx`` (int16 or int32, one per non-zero block), ``values`` (float32, nnzb x c x r).
    """

    format = "bsr"

    def __init__(self, shape, block_size, row_ptr, col_idx, values, *, check: bool = True):
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = _check_block(block_size)
        self.row_ptr = row_ptr
        self.col_idx = col_idx
        self.values = values
        if check:
            self.validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_size=(16, 16)) -> "BSRMatrix":
        """Pack every block that holds a non-zero. Exact: ``from_dense(W).to_dense() == W``."""
        r, c = _check_block(block_size)
        dense = _as_matrix(dense)
        m, k = dense.shape
        blocks = _blocks(dense, r, c)
        nz = (blocks != 0).any(dim=3).any(dim=2)  # (Mb, Kb)
        counts = nz.sum(dim=1, dtype=torch.int64)
        row_ptr = torch.zeros(nz.shape[0] + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        if row_ptr[-1] > torch.iinfo(torch.int32).max:
            raise ValueError("too many non-zero blocks for 32-bit row pointers")
        col_idx = nz.nonzero()[:, 1].to(index_dtype_for(nz.shape[1]))
        values = blocks[nz].contiguous()  # (nnzb, c, r)
        return cls._make((m, k), (r, c), row_ptr.to(torch.int32), col_idx, values)

    @classmethod
    def _make(cls, shape, block, row_ptr, col_idx, values):
        return cls(shape, block, row_ptr, col_idx, values, check=False)

    def to_dense(self) -> torch.Tensor:
        m, k = self.shape
        r, c = self.block_size
        mb, kb = self.block_shape
        # written straight into the row-major layout (block (i, j) at rows i*r.., columns j*c..): a scatter
        # into (mb, kb, c, r) and a permuted copy took 26 ms for one BERT FFN matrix
        out = torch.zeros(mb, r, kb, c, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(
            torch.arange(mb, device=self.row_ptr.device), self.row_ptr[1:].long() - self.row_ptr[:-1].long()
        )
        out[rows, :, self.col_idx.long(), :] = self.values.reshape(-1, c, r).transpose(1, 2)
        out = out.reshape(mb * r, kb * c)
        return out if (mb * r, kb * c) == (m, k) else out[:m, :k].contiguous()

    def tensors(self):
        return self.row_ptr, self.col_idx, self.values

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> "BSRMatrix":
        """Check every invariant the kernels rely on; raise ValueError/TypeError naming the problem."""
        m, k = self.shape
        r, c = self.block_size
        if m < 0 or k < 0:
            raise ValueError(f"negative shape {self.shape}")
        v = self.values
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(v).__name__}")
        if v.dtype != torch.float32:
            raise TypeError(f"values must be float32, got {v.dtype}")
        tensors = self.tensors()
        nnzb = self._check_index()
        if v.numel() != nnzb * r * c:
            raise ValueError(f"values hold {v.numel()} elements, expected {nnzb} blocks x {r}x{c} = {nnzb * r * c}")
        if not all(t.is_contiguous() for t in tensors):
            raise ValueError("row_ptr, col_idx and values must be contiguous")
        if len({t.device for t in tensors}) != 1:
            raise ValueError("row_ptr, col_idx and values must be on one device")
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, block_size={self.block_size}, "
                f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, index={self.col_idx.dtype})")


class CSRMatrix(BSRMatrix):
    """Compressed sparse row matrix: the 1x1-block case of :class:`BSRMatrix` (values are 1-D)."""

    format = "csr"

    def __init__(self, shape, row_ptr, col_idx, values, *, check: bool = True):
        super().__init__(shape, (1, 1), row_ptr, col_idx, values, check=check)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_size=(1, 1)) -> "CSRMatrix":
        if tuple(block_size) != (1, 1):
            raise ValueError("CSRMatrix has 1x1 blocks; use BSRMatrix for other block sizes")
        b = BSRMatrix.from_dense(dense, (1, 1))
        return cls(b.shape, b.row_ptr, b.col_idx, b.values.reshape(-1), check=False)

    @classmethod
    def _make(cls, shape, block, row_ptr, col_idx, values):
        return cls(shape, row_ptr, col_idx, values.reshape(-1), check=False)

    @property
    def crow_indices(self):
        return self.row_ptr

    @property
    def col_indices(self):
        return self.col_idx


def _as_matrix(dense) -> torch.Tensor:
    if not isinstance(dense, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(dense).__name__}")
    if dense.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(dense.shape)}")
    if dense.dtype != torch.float32:
        if not dense.is_floating_point():
            raise TypeError(f"sparse weights must be floating point, got {dense.dtype}")
        dense = dense.float()
    return dense.detach()
