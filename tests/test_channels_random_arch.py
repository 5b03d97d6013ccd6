"""Property test: random CNNs built from coupled blocks (plain conv, residual add, concat, depthwise,
channel shuffle, chunk + concat, squeeze-and-excite, in any order) stay exactly equivalent to the
original with the removed channels silenced.

Every channel is produced by a BatchNorm with distinct scale values (or a biased 1x1 conv for the SE
bottleneck), so the channels kept can be recovered by value, without the pruner's bookkeeping.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseprune as sp
from sparseprune.prune.channels import ChannelPruneWarning

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from test_prune_channels import _first, _run, _randomize_norms, _silence  # noqa: E402

BLOCKS = ["conv", "res", "cat", "dw", "shuffle", "chunk", "se"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cbr(cin, cout, k=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RandomNet(nn.Module):
    def __init__(self, spec, widths):
        super().__init__()
        self.spec = list(spec)
        c = 8
        self.stem = _cbr(3, c, 3)
        self.blocks = nn.ModuleList()
        for kind, w in zip(self.spec, widths):
            if kind == "conv":
                blk = _cbr(c, w, 3)
                c = w
            elif kind == "res":
                blk = nn.Sequential(_cbr(c, w, 3), _cbr(w, c, 1))
            elif kind == "cat":
                blk = nn.ModuleList([_cbr(c, w, 1), _cbr(c, w + 2, 3)])
                c = 2 * w + 2
            elif kind == "dw":
                blk = _cbr(c, c, 3, groups=c)
            elif kind in ("shuffle", "chunk"):
                if c % 2 or c < 4:
                    # make the width even first; a shuffle of 1 channel per group is a reshape
                    # (b, c, h, w) -> (b, 2, 1, h, w) that cannot be told apart from an unsqueeze
                    blk = _cbr(c, max(c + 1, 4), 1)
                    c = max(c + 1, 4)
                    self.spec[len(self.blocks)] = "conv"
                else:
                    blk = _cbr(c // 2, c // 2, 3) if kind == "chunk" else nn.Identity()
            else:  # se
                blk = nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(w, c, 1)])
            self.blocks.append(blk)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for kind, blk in zip(self.spec, self.blocks):
            if kind == "conv":
                x = F.relu(blk(x))
            elif kind == "res":
                x = F.relu(x + blk[1](F.relu(blk[0](x))))
            elif kind == "cat":
                x = torch.cat([F.relu(blk[0](x)), F.relu(blk[1](x))], dim=1)
            elif kind == "dw":
                x = F.relu(blk(x))
            elif kind == "shuffle":
                b, c, h, w = x.shape
                x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
            elif kind == "chunk":
                a, y = x.chunk(2, dim=1)
                x = torch.cat([a, F.relu(blk(y))], dim=1)
            else:
                s = torch.sigmoid(blk[1](F.relu(blk[0](x.mean((2, 3), keepdim=True)))))
                x = x * s
        return self.head(x.mean((2, 3)))


def _silenced_names(model):
    names = []
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            names.append(n)
        elif isinstance(m, nn.Conv2d) and m.bias is not None and n.endswith(".0"):  # SE bottleneck
            names.append(n)
    return names


@settings(max_examples=25, deadline=None)
@given(spec=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
       widths=st.lists(st.integers(2, 9), min_size=5, max_size=5),
       ratio=st.floats(0.1, 0.9), seed=st.integers(0, 10_000),
       importance=st.sampled_from(["random", "l1", "bn_scale"]), global_ranking=st.booleans())
def test_random_architectures_are_mask_equivalent(spec, widths, ratio, seed, importance, global_ranking):
    torch.manual_seed(seed)
    model = _randomize_norms(RandomNet(spec, widths), seed)
    x = torch.randn(1, 3, 5, 5)
    ref = copy.deepcopy(model)
    p0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelPruneWarning)   # every coupling here is supported
        sp.prune_channels(model, x, ratio, importance=importance, seed=seed, global_ranking=global_ranking)
    out = _first(_run(model, x))
    assert out.shape == (1, 3)
    assert sum(p.numel() for p in model.parameters()) <= p0
    _silence(ref, model, _silenced_names(ref))
    assert (out - _first(_run(ref, x))).abs().max().item() < 1e-5
