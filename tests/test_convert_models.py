"""Models shared by the convert / io / cli / compile tests (no tests here; importable by
``sparseprune bench --arch test_convert_models:mixed_arch`` from the tests folder)."""
import torch
from torch import nn

from helpers import block_sparse_weight


class MLP(nn.Module):
    """fc1 -> relu -> fc2 -> relu -> fc3 -> relu -> fc4: two 768<->3072 pairs (transformer FFN shapes)."""

    def __init__(self, d=768, h=3072):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.fc3, self.fc4 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


def mixed_arch():
    """A fresh (unpruned) instance of the mixed model's architecture (for load / CLI --arch)."""
    return MLP()


def make_mixed(seed=0, d=768, h=3072):
    """The issue's mixed model: fc1, fc2 at 95% 16x16-block sparsity, fc3 at 90% unstructured,
    fc4 at 10% unstructured. Weights are scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    m = MLP(d, h)
    specs = {"fc1": ((16, 16), 0.95), "fc2": ((16, 16), 0.95), "fc3": ((1, 1), 0.90), "fc4": ((1, 1), 0.10)}
    with torch.no_grad():
        for name, (block, sparsity) in specs.items():
            lin = getattr(m, name)
            w = block_sparse_weight(lin.out_features, lin.in_features, block, sparsity, g)
            density = max(1.0 - sparsity, 1e-3)
            lin.weight.copy_(w / (lin.in_features * density) ** 0.5)
    return m.eval()


class ConvBN(nn.Module):
    """conv-bn-relu twice, then a Linear head; the BatchNorms have non-trivial running stats."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        return self.head(x.mean((2, 3)))


def make_convbn(seed=0):
    torch.manual_seed(seed)
    m = ConvBN()
    with torch.no_grad():
        for bn in (m.bn1, m.block[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()
