"""CUDA path: runs only where a GPU and the CUDA module are present; elsewhere it checks that the
CPU-only situation is reported clearly."""
import pytest
import torch

import sparseprune as sp
from sparseprune import _ext
from helpers import block_sparse_weight

gpu = pytest.mark.skipif(not torch.cuda.is_available() or _ext._cuda is None,
                         reason="needs an NVIDIA GPU and the CUDA module")


def test_info_reports_cuda_line():
    from sparseprune.info import info_lines
    lines = [l for l in info_lines() if l.startswith("cuda:")]
    assert len(lines) == 1
    assert ("built for sm_" in lines[0]) or ("not built" in lines[0]) or ("not loadable" in lines[0])


@gpu
@pytest.mark.parametrize("block", [(1, 1), (16, 16), (32, 32), (3, 5)])
@pytest.mark.parametrize("n", [1, 7, 129])
def test_cuda_spmm_matches_dense(block, n):
    m, k = 200, 300
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, 0.8))
    fmt = "csr" if block == (1, 1) else "bsr"
    layer = sp.SparseLinear.from_dense(lin, format=fmt, block_size=None if fmt == "csr" else block).cuda()
    x = torch.randn(n, k, device="cuda")
    ref = torch.nn.functional.linear(x.double(), lin.weight.double().cuda(), lin.bias.double().cuda()).float()
    out = layer(x)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
