"""``python -m sparseprune.demo``: prune built-in models, convert them, print measured speedups.

1. A BERT-base-sized encoder feed-forward stack (4 x [768 -> 3072 -> 768], 128 tokens, random
   init): block-pruned to several sparsities, converted, timed against the dense model.
2. A small MLP trained on scikit-learn's bundled digits data set: pruned, fine-tuned with the
   masks kept, converted; test accuracy and speed before and after.
Everything runs locally on the CPU; nothing is downloaded.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import sparseprune as sp
from sparseprune.cli import _positive_int
from sparseprune.convert.timing import time_calls


class FFNStack(nn.Module):
    """The feed-forward half of a transformer encoder: where BERT spends two thirds of its FLOPs."""

    def __init__(self, layers=4, d=768, hidden=3072):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                    for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x):
        for block, norm in zip(self.blocks, self.norms):
            x = norm(x + block(x))
        return x


def timeit(fn, min_time=0.4):
    """Median seconds per call, by the library's one timing helper (the same one convert() uses)."""
    return time_calls({"fn": fn}, min_time, min_reps=3, max_reps=1000)["fn"]


@torch.no_grad()
def ffn_part(sparsities, block, quick):
    print(f"== BERT-base FFN stack (4 layers, 768->3072->768), 128 tokens, {torch.get_num_threads()} threads")
    print(f"   pruned with sp.prune_blocks(block_size={block}), converted with sp.convert\n")
    torch.manual_seed(0)
    x = torch.randn(128, 768)
    rows = []
    dense = FFNStack(layers=2 if quick else 4).eval()
    t_dense = timeit(lambda: dense(x))
    for s in sparsities:
        model = FFNStack(layers=2 if quick else 4).eval()
        model.load_state_dict(dense.state_dict())
        sp.prune_blocks(model, sparsity=s, block_size=block, layers=nn.Linear)
        fast = sp.convert(model, x)
        err = (fast(x) - model(x)).abs().max().item()
        t = timeit(lambda: fast(x))
        rows.append((s, t, err))
    print(f"   {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'ideal':>6} {'max |err|':>10}")
    for s, t, err in rows:
        print(f"   {s:8.2f} {t_dense * 1e3:9.2f} {t * 1e3:9.2f} {t_dense / t:7.2f}x {1 / (1 - s):5.1f}x {err:10.2e}")
    print()
    return rows


SPARSITY, BLOCK = 0.8, (8, 8)


def digits_part(quick):
    from sklearn.datasets import load_digits

    print("== MLP on scikit-learn's digits (8x8 images, 10 classes)")
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X))
    X, y = X[perm], y[perm]
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def train(epochs):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for i in range(0, len(Xtr), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(Xtr[i:i + 64]), ytr[i:i + 64]).backward()
                opt.step()

    def acc(m):
        with torch.no_grad():
            return (m(Xte).argmax(1) == yte).float().mean().item()

    train(4 if quick else 10)
    a_dense = acc(model)
    xb = Xte[:256]
    with torch.no_grad():
        t_dense = timeit(lambda: model(xb))
    # default layer choice: the classifier (last Linear) stays dense
    sp.prune_blocks(model, sparsity=SPARSITY, block_size=BLOCK)
    a_pruned = acc(model)
    train(3 if quick else 6)  # fine-tune: the masks keep pruned blocks at zero
    a_tuned = acc(model)
    model.eval()
    fast = sp.convert(model, xb)
    a_fast = acc(fast)
    with torch.no_grad():
        t_fast = timeit(lambda: fast(xb))
    print(f"   accuracy: dense {a_dense:.3f} | {SPARSITY:.0%} {BLOCK[0]}x{BLOCK[1]} blocks, one-shot {a_pruned:.3f} | "
          f"fine-tuned {a_tuned:.3f} | converted {a_fast:.3f}")
    print(f"   batch 256: dense {t_dense * 1e3:.2f} ms, converted {t_fast * 1e3:.2f} ms, "
          f"speedup {t_dense / t_fast:.2f}x\n")
    print("   per-layer choices (sp.summary):")
    sp.summary(fast)
    return a_dense, a_tuned, a_fast


def main(argv=None):
    ap = argparse.ArgumentParser(description="prune, convert and measure built-in models")
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer epochs")
    ap.add_argument("--threads", type=_positive_int, default=None, help="threads, 1 to 1024 (default: torch's setting)")
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    from .info import info_lines

    print("\n".join(info_lines()[:5]) + "\n")
    ffn_part([0.5, 0.8, 0.9, 0.95] if not a.quick else [0.9], (16, 16), a.quick)
    digits_part(a.quick)


if __name__ == "__main__":
    main()
