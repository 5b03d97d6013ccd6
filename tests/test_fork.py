"""A forked child (a DataLoader worker) runs a converted model even when its layers are pinned to several
threads: libgomp's pool does not survive fork(), and a team of more than one thread in the child waited forever.
The child gets at most omp_get_max_threads() threads (DataLoader workers set torch.set_num_threads(1))."""
import subprocess
import sys

import pytest

_CHILD = r"""
import torch, sparseprune as sp
from torch import nn
torch.set_num_threads(2)
torch.manual_seed(0)
m = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(),
                  nn.Linear(32 * 12 * 12, 64)).eval()
sp.prune_blocks(m, sparsity=0.8, block_size=(16, 16), dense_first_last=False)
xs = [torch.randn(4, 16, 12, 12) for _ in range(6)]
with torch.no_grad():
    c = sp.convert(m, xs[0], formats=("bsr",), num_threads=2, end_to_end=False, time_budget=2.0)
    want = [c(x) for x in xs]  # the parent's OpenMP pool is up with two threads
assert isinstance(c[0], sp.SparseConv2d) and isinstance(c[2], sp.SparseConv2d) and c[2].num_threads == 2

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return len(xs)
    def __getitem__(self, i):
        with torch.no_grad():
            return c(xs[i])

got = list(torch.utils.data.DataLoader(Data(), batch_size=None, num_workers=2))
assert all(torch.equal(g, w) for g, w in zip(got, want))
from sparseprune import _C
assert not _C.forked_child()
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_dataloader_workers_run_a_model_pinned_to_two_threads():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
