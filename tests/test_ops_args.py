"""The public ops (``sparseprune.ops.spmm`` / ``spmm_t`` / ``sparse_conv2d`` / ``sparse_conv2d_input_grad``,
``sparseprune.quant`` ``qspmm``: ``torch.ops.sparseprune.*``) take packed arrays from anyone. Arrays the kernels
cannot read (torch's own int64 CSR, float64 values, a short bias, a wrong row count, indices out of range, a
geometry that does not fit) raise TypeError / ValueError; valid ones give what dense PyTorch gives."""
import pytest
import torch
import torch.nn.functional as F

import sparseprune as sp
from sparseprune import ops, quant
from helpers import block_sparse_weight


def _csr():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    w[w.abs() < 0.7] = 0
    return w, sp.CSRMatrix.from_dense(w)


SPMM_BAD = {
    "int64_torch_csr": lambda w, m: (w.to_sparse_csr().crow_indices(), w.to_sparse_csr().col_indices(), m.values,
                                     None, 8, 6, 1, 1),
    "float64_values": lambda w, m: (m.row_ptr, m.col_idx, m.values.double(), None, 8, 6, 1, 1),
    "short_bias": lambda w, m: (m.row_ptr, m.col_idx, m.values, torch.zeros(2), 8, 6, 1, 1),
    "float64_bias": lambda w, m: (m.row_ptr, m.col_idx, m.values, torch.zeros(8, dtype=torch.float64), 8, 6, 1, 1),
    "rows_too_many": lambda w, m: (m.row_ptr, m.col_idx, m.values, None, 800, 6, 1, 1),
    "rows_negative": lambda w, m: (m.row_ptr, m.col_idx, m.values, None, -8, 6, 1, 1),
    "block_zero": lambda w, m: (m.row_ptr, m.col_idx, m.values, None, 8, 6, 0, 1),
    "col_out_of_range": lambda w, m: (m.row_ptr, m.col_idx + 100, m.values, None, 8, 6, 1, 1),
    "row_ptr_decreasing": lambda w, m: (m.row_ptr.flip(0).contiguous(), m.col_idx, m.values, None, 8, 6, 1, 1),
    "values_short": lambda w, m: (m.row_ptr, m.col_idx, m.values[:-1], None, 8, 6, 1, 1),
    "non_contiguous": lambda w, m: (m.row_ptr, m.col_idx.repeat_interleave(2)[::2], m.values, None, 8, 6, 1, 1),
}


@pytest.mark.parametrize("bad", list(SPMM_BAD))
def test_spmm_and_spmm_t_refuse_arrays_the_kernels_cannot_read(bad):
    w, m = _csr()
    rp, ci, vals, bias, rows, cols, r, c = SPMM_BAD[bad](w, m)
    with pytest.raises((TypeError, ValueError)):
        ops.spmm(torch.randn(4, 6), rp, ci, vals, bias, rows, cols, r, c, 1)
    if bias is None:
        with pytest.raises((TypeError, ValueError)):
            ops.spmm_t(torch.randn(4, max(rows, 0)), rp, ci, vals, rows, cols, r, c, 1)


def test_checked_arrays_are_checked_again_after_an_in_place_edit():
    w, m = _csr()
    x = torch.randn(4, 6)
    torch.testing.assert_close(ops.spmm(x, m.row_ptr, m.col_idx, m.values, None, 8, 6, 1, 1, 1), x @ w.T)
    ci = m.col_idx.clone()
    ops.spmm(x, m.row_ptr, ci, m.values, None, 8, 6, 1, 1, 1)  # checked, remembered
    ci.add_(100)  # bumps its version counter
    with pytest.raises(ValueError, match="column indices"):
        ops.spmm(x, m.row_ptr, ci, m.values, None, 8, 6, 1, 1, 1)
    with torch.inference_mode():  # no version counter: checked on every call
        ci2 = m.col_idx.clone()
        ops.spmm(x, m.row_ptr, ci2, m.values, None, 8, 6, 1, 1, 1)
        ci2.add_(100)
        with pytest.raises(ValueError, match="column indices"):
            ops.spmm(x, m.row_ptr, ci2, m.values, None, 8, 6, 1, 1, 1)


def _conv_case():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(conv.weight * (torch.rand(16, 8, 1, 1) > 0.5))
    sc = sp.SparseConv2d.from_dense(conv, format="csr")
    return conv, sc


CONV_BAD = {
    "in_channels_lie": dict(in_channels=16),
    "groups_not_dividing": dict(groups=3),
    "stride_zero": dict(stride=[0, 1]),
    "kernel_list_short": dict(kernel_size=[3]),
    "padding_negative": dict(padding=[-1, 1, 1, 1]),
    "out_channels_lie": dict(out_channels=32),
    "bias_short": dict(bias=torch.zeros(3)),
}


@pytest.mark.parametrize("bad", list(CONV_BAD))
def test_sparse_conv2d_ops_refuse_geometry_that_does_not_fit(bad):
    conv, sc = _conv_case()
    args = dict(row_ptr=sc.row_ptr, col_idx=sc.col_idx, values=sc.values, bias=sc.bias, in_channels=8,
                out_channels=16, kernel_size=[3, 3], stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1,
                r=1, num_threads=1)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ops.sparse_conv2d(x, **args), conv(x), rtol=1e-4, atol=1e-5)
    args.update(CONV_BAD[bad])
    with pytest.raises((TypeError, ValueError)):
        ops.sparse_conv2d(x, **args)  # (in_channels_lie: not the input's 8 channels)
    if bad in ("in_channels_lie", "bias_short"):  # the gradient op has no bias; in_channels is its output's size
        return
    g = dict(args)
    g.pop("bias")
    with pytest.raises((TypeError, ValueError)):
        ops.sparse_conv2d_input_grad(torch.randn(2, g.pop("out_channels"), 9, 9), height=9, width=9, **g)


def test_sparse_conv2d_input_grad_refuses_a_size_that_does_not_give_the_gradient():
    conv, sc = _conv_case()
    g = dict(row_ptr=sc.row_ptr, col_idx=sc.col_idx, values=sc.values, in_channels=8, kernel_size=[3, 3],
             stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1, r=1, num_threads=1)
    dy = torch.randn(2, 16, 9, 9)
    dx = ops.sparse_conv2d_input_grad(dy, height=9, width=9, **g)
    torch.testing.assert_close(dx, torch.nn.grad.conv2d_input((2, 8, 9, 9), conv.weight, dy, padding=1),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not give"):
        ops.sparse_conv2d_input_grad(dy, height=90, width=90, **g)


QSPMM_BAD = {
    "int64_row_ptr": lambda p: dict(row_ptr=p.row_ptr.long()),
    "col_out_of_range": lambda p: dict(col_idx=(p.col_idx.long() + 1000).to(p.col_idx.dtype)),
    "scales_short": lambda p: dict(scales=p.scales[:-1].contiguous()),
    "compensation_float": lambda p: dict(compensation=p.compensation.float()),
    "rows_too_many": lambda p: dict(rows=4096),
    "values_short": lambda p: dict(values=p.values[:-1].contiguous()),
}


@pytest.mark.parametrize("bad", list(QSPMM_BAD))
def test_qspmm_refuses_arrays_the_kernels_cannot_read(bad):
    w = block_sparse_weight(64, 32, (16, 16), 0.5)
    p = quant.QuantBSRMatrix.from_dense(w, (16, 16), torch.int8)
    args = dict(row_ptr=p.row_ptr, col_idx=p.col_idx, values=p.values, scales=p.scales, compensation=p.compensation,
                bias=None, rows=64, cols=32, r=16, c=16, num_threads=1)
    x = torch.randn(5, 32)
    with torch.no_grad():
        ok = torch.ops.sparseprune.qspmm(x, *args.values())
        torch.testing.assert_close(ok, F.linear(x, w), rtol=0.05, atol=0.05 * float(w.abs().max()) * 32 ** 0.5)
        args.update(QSPMM_BAD[bad](p))
        with pytest.raises((TypeError, ValueError)):
            torch.ops.sparseprune.qspmm(x, *args.values())
        if bad in ("col_out_of_range", "scales_short"):  # arrays replaced on a built matrix: qspmm checks them
            setattr(p, *next(iter(QSPMM_BAD[bad](p).items())))
            with pytest.raises((TypeError, ValueError)):
                quant.qspmm(x, p)
