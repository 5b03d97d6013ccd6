"""Accuracy on real data (scikit-learn's bundled digits, no download): dense vs pruned vs fine-tuned.

The fast tests here train a small CNN and MLP (seconds on 2 cores), prune them, fine-tune with a plain
Adam loop and check that test accuracy stays close to dense, that the pattern is intact after
fine-tuning, and that the Linear layers packed by ``SparseLinear.from_dense`` (our kernels) give the
same outputs as the masked model. ``python tests/test_accuracy_digits.py`` prints the full table.
"""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseprune as sp
from sparseprune.prune import masks
from sparseprune.prune.patterns import prune_blocks, prune_nm, prune_unstructured
from sparseprune.prune.schedule import GradualPruner

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def digits(seed=0, n_test=400):
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 2 * 2, 128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2).flatten(1)
        return self.fc(F.relu(self.fc1(x)))


def train(model, x, y, epochs, lr=2e-3, seed=0, batch=64, pruner=None):
    """A plain Adam loop (weight decay on); ``pruner.step()`` after every optimizer step if given."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if pruner is not None:
                pruner.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


_CACHE = {}
FT_EPOCHS, FT_LR = 6, 3e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_model(kind):
    """Train once per process (seeded) and hand out copies."""
    if kind not in _CACHE:
        torch.manual_seed(0)
        xtr, ytr, xte, yte = digits()
        model = MLP() if kind == "mlp" else CNN()
        train(model, xtr, ytr, epochs=30 if kind == "mlp" else 15)
        _CACHE[kind] = (model, accuracy(model, xte, yte))
    model, acc = _CACHE[kind]
    return copy.deepcopy(model), acc


def prune(model, pattern, sparsity=None, block=None, importance="magnitude", calib=None):
    if pattern == "blocks":
        return prune_blocks(model, sparsity, block, importance=importance, calibration=calib, misfit="shrink")
    if pattern == "unstructured":
        return prune_unstructured(model, sparsity, importance=importance, calibration=calib)
    return prune_nm(model, 2, 4, importance=importance, calibration=calib)


def pack_linears(model):
    """Replace every Linear with a SparseLinear packed in the format matching its pattern."""
    out = copy.deepcopy(model)
    masks.remove_masks(out)
    for name, mod in list(out.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                w = child.weight.detach()
                fmt, bs = sp.nn.choose_format(w)
                if fmt == "dense" and float((w == 0).float().mean()) > 0:
                    fmt = "csr"  # force the sparse kernel whenever something was pruned
                setattr(mod, child_name, sp.SparseLinear.from_dense(child, format=fmt, block_size=bs))
    return out


# -- fast checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,sparsity,block", [("blocks", 0.8, (8, 8)), ("unstructured", 0.9, None)])
def test_cnn_keeps_accuracy_after_pruning_and_finetuning(pattern, sparsity, block):
    xtr, ytr, xte, yte = digits()
    model, dense_acc = dense_model("cnn")
    assert dense_acc > 95.0  # the dense model is a real classifier
    prune(model, pattern, sparsity, block)
    keep = {n: masks.get_mask(m).clone() for n, m in masks.masked_modules(model)}
    assert set(keep) == {"conv2", "conv3", "fc1"}  # first conv and classifier stay dense
    train(model, xtr, ytr, epochs=FT_EPOCHS, lr=FT_LR, seed=1)
    acc = accuracy(model, xte, yte)
    assert acc >= dense_acc - 1.5, (pattern, dense_acc, acc)
    for n, m in masks.masked_modules(model):  # pattern intact after fine-tuning
        assert torch.equal(m.weight != 0, keep[n]) or not (m.weight[~keep[n]] != 0).any()
        if pattern == "blocks" and m.weight.dim() == 4:
            slab = (m.weight != 0).reshape(m.weight.shape[0] // 8, 8, m.weight.shape[1] // 8, 8, 9)
            nz = slab.sum((1, 3, 4))
            assert ((nz == 0) | (nz == 8 * 8 * 9)).all()
    assert masks.sparsity(model, only_masked=True) == pytest.approx(sparsity, abs=0.02)
    packed = pack_linears(model)
    with torch.no_grad():
        torch.testing.assert_close(packed(xte), model(xte), rtol=1e-4, atol=1e-4)
        assert torch.equal(packed(xte).argmax(1), model(xte).argmax(1))


def test_mlp_2of4_and_blocks_run_on_our_kernels():
    xtr, ytr, xte, yte = digits()
    for pattern, s, block in [("nm", None, None), ("blocks", 0.8, (16, 16))]:
        model, dense_acc = dense_model("mlp")
        assert dense_acc > 94.0
        prune(model, pattern, s, block, importance="wanda", calib=xtr[:256])
        train(model, xtr, ytr, epochs=FT_EPOCHS, lr=FT_LR, seed=2)
        assert accuracy(model, xte, yte) >= dense_acc - 2.0
        packed = pack_linears(model)
        kinds = {n: (m.format, m.block_size) for n, m in packed.named_modules() if isinstance(m, sp.SparseLinear)}
        if pattern == "blocks":
            assert kinds["fc1"] == ("bsr", (16, 16)) and kinds["fc2"] == ("bsr", (16, 16))
        else:
            w = model.fc2.weight.detach()
            assert ((w != 0).reshape(256, 64, 4).sum(-1) == 2).all()
        with torch.no_grad():
            torch.testing.assert_close(packed(xte), model(xte), rtol=1e-4, atol=1e-4)


def test_gradual_cubic_schedule_keeps_accuracy_at_90pct_blocks():
    xtr, ytr, xte, yte = digits()
    model, dense_acc = dense_model("mlp")
    steps_per_epoch = -(-len(ytr) // 64)
    pruner = GradualPruner(model, 0.9, start_step=0, end_step=8 * steps_per_epoch, frequency=steps_per_epoch,
                           pattern="blocks", block_size=(16, 16))
    train(model, xtr, ytr, epochs=12, lr=FT_LR, seed=1, pruner=pruner)
    assert pruner.history[-1] == (8 * steps_per_epoch, pytest.approx(0.9))
    assert masks.sparsity(model, only_masked=True) == pytest.approx(0.9, abs=256 / (256 * 64 + 256 * 256))
    assert accuracy(model, xte, yte) >= dense_acc - 1.5


def gradual_rows(out=sys.stdout):
    """90% blocks: one-shot + 12 epochs fine-tuning vs cubic schedule over 8 of the same 12 epochs."""
    xtr, ytr, xte, yte = digits()
    spe = -(-len(ytr) // 64)
    for kind in ("mlp", "cnn"):
        for bs in ((8, 8), (16, 16)):
            one, dense_acc = dense_model(kind)
            prune_blocks(one, 0.9, bs)
            train(one, xtr, ytr, epochs=12, lr=FT_LR, seed=1)
            grad, _ = dense_model(kind)
            pr = GradualPruner(grad, 0.9, start_step=0, end_step=8 * spe, frequency=spe, pattern="blocks", block_size=bs)
            train(grad, xtr, ytr, epochs=12, lr=FT_LR, seed=1, pruner=pr)
            print(f"| {kind} | blocks {bs[0]}x{bs[1]} 90% | {dense_acc:.2f} | {accuracy(one, xte, yte):.2f} | "
                  f"{accuracy(grad, xte, yte):.2f} |", file=out, flush=True)


# -- the full table -----------------------------------------------------------------------------------
PLANS = ([("blocks", s, b) for b in ((4, 4), (8, 8), (16, 16)) for s in (0.5, 0.8, 0.9)]
         + [("unstructured", s, None) for s in (0.5, 0.8, 0.9)] + [("nm", None, None)])


def table(kinds=("mlp", "cnn"), importance="magnitude", ft_epochs=FT_EPOCHS, out=sys.stdout):
    xtr, ytr, xte, yte = digits()
    rows = []
    for kind in kinds:
        _, dense_acc = dense_model(kind)
        print(f"| {kind} | dense | - | {dense_acc:.2f} | - |", file=out, flush=True)
        for pattern, s, block in PLANS:
            model, _ = dense_model(kind)
            prune(model, pattern, s, block, importance=importance, calib=xtr[:256])
            a0 = accuracy(model, xte, yte)
            achieved = masks.sparsity(model, only_masked=True)
            train(model, xtr, ytr, epochs=ft_epochs, lr=FT_LR, seed=1)
            a1 = accuracy(model, xte, yte)
            label = f"blocks {block[0]}x{block[1]}" if pattern == "blocks" else {"unstructured": "unstructured",
                                                                                 "nm": "2:4"}[pattern]
            rows.append((kind, label, achieved, a0, a1))
            print(f"| {kind} | {label} | {achieved:.2f} | {a0:.2f} | {a1:.2f} |", file=out, flush=True)
    return rows


@pytest.mark.slow
def test_full_table():
    """Measured (see the report): at 50% every pattern is within 1.5 points of dense after fine-tuning;
    at 80-90% the coarse 16x16 blocks on the small MLP lose up to 7 points with this short one-shot
    fine-tuning (the gradual schedule recovers most of it), so the floor there is 88%."""
    for kind, label, achieved, a0, a1 in table():
        _, dense_acc = dense_model(kind)
        assert a1 >= a0 - 0.5, (kind, label, "fine-tuning made it worse")
        if achieved <= 0.5 + 1e-6:
            assert a1 >= dense_acc - 1.5, (kind, label, a1)
        assert a1 >= 88.0, (kind, label, a1)


if __name__ == "__main__":
    imp = sys.argv[1] if len(sys.argv) > 1 else "magnitude"
    torch.set_num_threads(1)
    print(f"importance={imp}; pruned layers: all but the first conv and the classifier; "
          f"fine-tune: {FT_EPOCHS} epochs Adam lr={FT_LR}")
    print("| model | pattern | achieved sparsity (pruned layers) | acc one-shot | acc fine-tuned |")
    print("|---|---|---|---|---|")
    table(importance=imp)
    print("\n| model | pattern | dense | one-shot + 12 epochs | gradual (cubic, 8 epochs) + 4 epochs |")
    print("|---|---|---|---|---|")
    gradual_rows()
