"""The quantized X^T tiles (csrc/cpu/qspmm_xt.h, blocks of fewer than 8 outputs): one vector over 8 rows of X,
the weight word broadcast, 8 x 8 transposes into the row kernels' epilogue.

SPARSEPRUNE_QXT (read once per process, hence child processes) forces them off ("0") or onto every block
shape ("1"). int8 must agree bit for bit with the pure-torch reference and between the three settings
(the same integer sums, the same epilogue operations), with bias, fused activations and residuals, odd
sizes, empty block rows, thread splits by rows of X and by block rows, 16- and 32-bit column indices;
bf16 within rounding of the reference."""
import os
import subprocess
import sys

import pytest
import torch

from sparseprune import ops, quant
from sparseprune.quant import QuantBSRMatrix, reference_qspmm

from helpers import block_sparse_weight

HERE = os.path.dirname(os.path.abspath(__file__))

# (M, K, N, sparsity): M not a multiple of 8 or of the block (a short last group), K not a multiple of the
# block, N = 1 / 2 / 7 (one partial vector), 13 / 16 (two), 24 / 30 / 53 / 136 (whole and partial 24-row
# panels, several of them), all-empty and dense weights
CASES = [(37, 50, 30, 0.5), (33, 20, 1, 0.3), (19, 12, 2, 0.0), (70, 90, 53, 0.8), (40, 36, 7, 1.0),
         (24, 64, 13, 0.5), (64, 96, 136, 0.7), (9, 8, 16, 0.2), (50, 40, 24, 0.6)]
BLOCKS = {"int8": [(1, 4), (2, 4), (3, 8), (4, 4), (5, 4), (7, 4), (1, 8), (8, 8), (16, 4)],
          "bf16": [(1, 2), (1, 4), (3, 2), (4, 4), (6, 2), (16, 2)]}
ACTS = ["none", "gelu", "relu"]

_CHILD = r"""
import sys, torch
sys.path.insert(0, {here!r})
from helpers import block_sparse_weight
from sparseprune import ops
from sparseprune.quant import QuantBSRMatrix, qspmm_eager
ops.set_isa({isa!r})
out = {{}}
g = torch.Generator().manual_seed(5)
for kind, dtype in (("int8", torch.int8), ("bf16", torch.bfloat16)):
    for block in {blocks!r}[kind]:
        for ci, (m, k, n, s) in enumerate({cases!r}):
            w = block_sparse_weight(m, k, block, s, generator=g)
            p = QuantBSRMatrix.from_dense(w, block, dtype)
            x = torch.randn(n, k, generator=g) * 3
            b = torch.randn(m, generator=g)
            res = torch.randn(n, m, generator=g)
            cols = p.col_idx if ci % 2 else p.col_idx.int()  # 16-bit indices, and 32-bit ones
            for ai, act in enumerate({acts!r}):
                for threads in (1, 2, 3):
                    for use_res in (False, True):
                        y = qspmm_eager(x, p.row_ptr, cols, p.values, p.scales, p.compensation,
                                        b if (ai + threads) % 2 else None, m, k, block[0], block[1], threads,
                                        ops.activation_code(act), residual=res if use_res else None)
                        out[(kind, block, ci, act, threads, use_res)] = y
torch.save(out, sys.argv[1])
"""


def _run_child(tmp_path, setting, isa):
    path = tmp_path / f"qxt-{setting}-{isa}.pt"
    env = dict(os.environ)
    env.pop("SPARSEPRUNE_QXT", None)
    if setting != "default":
        env["SPARSEPRUNE_QXT"] = setting
    code = _CHILD.format(here=HERE, isa=isa, blocks=BLOCKS, cases=CASES, acts=ACTS)
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(path)


def _references():
    g = torch.Generator().manual_seed(5)
    ref = {}
    for kind, dtype in (("int8", torch.int8), ("bf16", torch.bfloat16)):
        for block in BLOCKS[kind]:
            for ci, (m, k, n, s) in enumerate(CASES):
                w = block_sparse_weight(m, k, block, s, generator=g)
                p = QuantBSRMatrix.from_dense(w, block, dtype)
                x = torch.randn(n, k, generator=g) * 3
                b = torch.randn(m, generator=g)
                res = torch.randn(n, m, generator=g)
                for ai, act in enumerate(ACTS):
                    for threads in (1, 2, 3):
                        bias = b if (ai + threads) % 2 else None
                        base = reference_qspmm(x, p, bias)
                        for use_res in (False, True):
                            y = base + res if use_res else base
                            ref[(kind, block, ci, act, threads, use_res)] = ops.apply_activation(y, act)
    return ref


def _isas():
    return sorted({p["isa"] for p in quant.qisa_paths() if p["isa"] != "scalar" and p["dtype"] == "int8"})


@pytest.mark.parametrize("isa", _isas())
def test_xt_tiles_match_the_reference_and_the_row_tiles(tmp_path, isa):
    results = {s: _run_child(tmp_path, s, isa) for s in ("0", "1", "default")}
    ref = _references()
    assert set(results["0"]) == set(ref)
    for key, want in ref.items():
        kind, block, ci, act, threads, use_res = key
        got = {s: results[s][key] for s in results}
        if kind == "int8":
            # one epilogue, the same integer sums: the X^T tiles and the row tiles agree bit for bit
            assert torch.equal(got["0"], got["1"]) and torch.equal(got["1"], got["default"]), key
            if act == "none":
                assert torch.equal(got["1"], want), (key, (got["1"] - want).abs().max())
        for s, y in got.items():
            scale = 1 + (want.abs().max().item() if want.numel() else 0)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, s=s, key=key: f"{s} {key}: {m}")
