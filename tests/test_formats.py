import pytest
import torch
from hypothesis import given, strategies as st

from sparseprune.formats import BSRMatrix, CSRMatrix
from sparseprune.reference import bsr_to_dense
from helpers import block_sparse_weight

BLOCKS = [(1, 1), (1, 8), (8, 1), (2, 2), (4, 4), (3, 5), (8, 8), (16, 16), (32, 32), (16, 4)]


@given(m=st.integers(0, 70), k=st.integers(0, 70), r=st.integers(1, 17), c=st.integers(1, 17),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_bsr_round_trip_exact(m, k, r, c, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = block_sparse_weight(m, k, (1, 1), sparsity, g) if m and k else torch.zeros(m, k)
    b = BSRMatrix.from_dense(w, (r, c))
    assert torch.equal(b.to_dense(), w)
    # an independent element-by-element rebuild agrees with to_dense
    ref = bsr_to_dense(b.row_ptr, b.col_idx, b.values, m, k, r, c).float()
    assert torch.equal(ref, w)
    b.validate()


@given(m=st.integers(1, 60), k=st.integers(1, 60), sparsity=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_csr_matches_torch_csr(m, k, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = block_sparse_weight(m, k, (1, 1), sparsity, g)
    ours = CSRMatrix.from_dense(w)
    theirs = w.to_sparse_csr()
    assert torch.equal(ours.row_ptr.long(), theirs.crow_indices())
    assert torch.equal(ours.col_idx.long(), theirs.col_indices())
    assert torch.equal(ours.values, theirs.values())
    assert torch.equal(ours.to_dense(), w)


@pytest.mark.parametrize("block", BLOCKS)
def test_only_nonzero_blocks_are_stored(block):
    w = block_sparse_weight(64, 96, block, 0.9)
    b = BSRMatrix.from_dense(w, block)
    r, c = block
    mask = (w != 0)
    # every stored block holds a non-zero; every non-zero lies in a stored block
    assert b.nnz_blocks == int(torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(mask[None].float(), (0, (-96) % c, 0, (-64) % r)), block, block).sum())
    assert b.density >= float(mask.double().mean()) - 1e-9


def test_index_width():
    small = BSRMatrix.from_dense(torch.eye(8), (1, 1))
    assert small.col_idx.dtype == torch.int16
    wide = CSRMatrix.from_dense(torch.zeros(2, 40000).index_fill_(1, torch.tensor([39999]), 1.0))
    assert wide.col_idx.dtype == torch.int32
    assert torch.equal(wide.to_dense()[:, 39999], torch.ones(2))


def test_nbytes_at_90_percent_block_sparsity():
    w = block_sparse_weight(768, 3072, (16, 16), 0.9)
    b = BSRMatrix.from_dense(w, (16, 16))
    assert b.nbytes < 0.2 * w.numel() * 4


def _valid():
    return BSRMatrix.from_dense(block_sparse_weight(8, 8, (2, 2), 0.5), (2, 2))


@pytest.mark.parametrize("mutate, err, msg", [
    (lambda b: setattr(b, "row_ptr", b.row_ptr.long()), TypeError, "int32"),
    (lambda b: setattr(b, "values", b.values.double()), TypeError, "float32"),
    (lambda b: setattr(b, "row_ptr", b.row_ptr[:-1]), ValueError, "entries"),
    (lambda b: b.row_ptr.__setitem__(0, 1), ValueError, "row_ptr"),
    (lambda b: setattr(b, "col_idx", b.col_idx + 100), ValueError, "column indices must lie"),
    (lambda b: setattr(b, "values", b.values[:-1]), ValueError, "values hold"),
])
def test_validate_rejects(mutate, err, msg):
    b = _valid()
    mutate(b)
    with pytest.raises(err, match=msg):
        b.validate()


def test_validate_rejects_unsorted_columns():
    b = BSRMatrix.from_dense(torch.ones(1, 4), (1, 1))
    b.col_idx = b.col_idx.flip(0).contiguous()
    with pytest.raises(ValueError, match="sorted"):
        b.validate()


def test_validate_rejects_decreasing_row_ptr():
    b = BSRMatrix.from_dense(torch.ones(3, 2), (1, 1))
    b.row_ptr = torch.tensor([0, 2, 1, 6], dtype=torch.int32)
    with pytest.raises(ValueError):
        b.validate()


@pytest.mark.parametrize("bad", [(0, 4), (4, -1), (4,), "16", (5000, 1)])
def test_bad_block_sizes(bad):
    with pytest.raises((ValueError, TypeError), match="block_size"):
        BSRMatrix.from_dense(torch.ones(4, 4), bad)
