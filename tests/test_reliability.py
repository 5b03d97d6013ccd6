"""Bad input gives a Python exception with a message -- never a crash, never a silently wrong answer."""
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import given, strategies as st

import sparseprune as sp
from sparseprune.formats import BSRMatrix
from helpers import assert_close, block_sparse_weight


def _layer(m=24, k=20, block=(4, 4), sparsity=0.5, fmt="bsr"):
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, block, sparsity))
    return lin, sp.SparseLinear.from_dense(lin, format=fmt, block_size=block if fmt == "bsr" else None)


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: a segfault there cannot take the test runner down."""
    prog = "import torch, sparseprune as sp\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)


BAD_CALLS = {
    "wrong_features": ("layer(torch.randn(3, 21))", "ValueError", "20"),
    "scalar_input": ("layer(torch.tensor(1.0))", "ValueError", "shape"),
    "int_input": ("layer(torch.ones(3, 20, dtype=torch.int32))", "TypeError", "float32"),
    "complex_input": ("layer(torch.ones(3, 20, dtype=torch.complex64))", "TypeError", "float32"),
    "float64_input": ("layer(torch.ones(3, 20, dtype=torch.float64))", "TypeError", "float32"),
    "meta_device": ("layer(torch.ones(3, 20, device='meta'))", "ValueError", "device|on meta"),
    "not_a_tensor": ("layer([[1.0] * 20])", "TypeError", "Tensor"),
    "bad_format": ("sp.SparseLinear.from_dense(torch.nn.Linear(20, 24), format='coo')", "ValueError", "format"),
    "bad_block": ("sp.SparseLinear.from_dense(torch.nn.Linear(20, 24), format='bsr', block_size=(0, 4))",
                  "ValueError", "block_size"),
    "huge_block": ("sp.SparseLinear.from_dense(torch.nn.Linear(20, 24), format='bsr', block_size=(10**6, 4))",
                   "ValueError", "block_size"),
    "csr_with_block": ("sp.SparseLinear.from_dense(torch.nn.Linear(20, 24), format='csr', block_size=(4, 4))",
                       "ValueError", "block_size"),
    "not_linear": ("sp.SparseLinear.from_dense(torch.nn.Conv2d(2, 2, 1))", "TypeError", "Linear"),
    "corrupt_state_dict": ("sd = layer.state_dict(); sd['col_idx'] = sd['col_idx'] + 1000; layer.load_state_dict(sd)",
                           "ValueError", "column indices"),
    "truncated_values": ("sd = layer.state_dict(); sd['values'] = sd['values'][:1]; layer.load_state_dict(sd)",
                         "ValueError", "values hold"),
    "bad_row_ptr": ("sd = layer.state_dict(); sd['row_ptr'] = sd['row_ptr'] * 5; layer.load_state_dict(sd)",
                    "ValueError", "row_ptr"),
    "bad_isa": ("sp.ops.set_isa('sse9')", "ValueError", "sse9"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_in_subprocess(case):
    call, exc, msg = BAD_CALLS[case]
    code = f"""
    import re
    lin = torch.nn.Linear(20, 24)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(24, 20) > 0.5)
    layer = sp.SparseLinear.from_dense(lin, format='bsr', block_size=(4, 4))
    try:
        {call}
    except Exception as e:
        print(type(e).__name__, '::', e)
    else:
        print('NO EXCEPTION')
    """
    res = run_isolated(code)
    assert res.returncode == 0, f"crashed with {res.returncode}: {res.stderr[-2000:]}"
    out = res.stdout.strip().splitlines()[-1]
    import re
    name, _, message = out.partition(" :: ")
    assert name == exc, out
    assert re.search(msg, message), out


def _stored_mask(layer):
    """Which weights are stored (and so multiply the input), from the packed arrays."""
    packed = layer.packed()
    ones = BSRMatrix(packed.shape, packed.block_size, packed.row_ptr, packed.col_idx, torch.ones_like(packed.values))
    return ones.to_dense() != 0


def _skip_pruned_reference(x, layer):
    w = layer.to_dense().double()
    stored = _stored_mask(layer)
    prod = x.double()[:, None, :] * w[None]
    y = torch.where(stored[None], prod, torch.zeros((), dtype=torch.float64)).sum(-1)
    return (y + layer.bias.double()).float()


@pytest.mark.parametrize("block, fmt", [((1, 1), "csr"), ((4, 4), "bsr"), ((16, 16), "bsr"), ((1, 8), "bsr")])
@pytest.mark.parametrize("n", [1, 2, 40])
def test_nan_inf_propagate_like_dense_on_stored_weights(isa, block, fmt, n):
    lin, layer = _layer(48, 40, block, 0.6, fmt)
    x = torch.randn(n, 40)
    x[0, 3] = float("nan")
    x[-1, 7] = float("inf")
    x[-1, 11] = -float("inf")
    out = layer(x)
    ref = _skip_pruned_reference(x, layer)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert_close(out[fin], ref[fin])
    # and wherever every weight is stored (a dense row), it is exactly dense PyTorch's NaN pattern
    dense_rows = _stored_mask(layer).all(1)
    dense_out = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(torch.isnan(out[:, dense_rows]), torch.isnan(dense_out[:, dense_rows]))


def test_empty_batch_and_empty_weight():
    _, layer = _layer()
    assert layer(torch.randn(0, 20)).shape == (0, 24)
    assert layer(torch.randn(2, 0, 20)).shape == (2, 0, 24)
    zero = torch.nn.Linear(20, 24)
    with torch.no_grad():
        zero.weight.zero_()
    z = sp.SparseLinear.from_dense(zero, format="csr")
    x = torch.randn(5, 20)
    assert torch.equal(z(x), zero.bias.detach().expand(5, 24))


def test_concurrent_inference_four_threads():
    lin, layer = _layer(256, 384, (16, 16), 0.8)
    csr = sp.SparseLinear.from_dense(lin, format="csr")
    xs = [torch.randn(33 + i, 384) for i in range(8)]
    expected = [torch.nn.functional.linear(x, lin.weight, lin.bias) for x in xs]
    errors = []

    def worker(tid):
        try:
            with torch.no_grad():
                for rep in range(20):
                    i = (tid + rep) % len(xs)
                    for mod in (layer, csr):
                        torch.testing.assert_close(mod(xs[i]), expected[i], rtol=1e-4, atol=1e-4)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_honours_torch_set_num_threads():
    _, layer = _layer(512, 512, (16, 16), 0.5)
    x = torch.randn(64, 512)
    ref = layer(x)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_close(layer(x), ref)
    finally:
        torch.set_num_threads(old)


@given(data=st.data())
def test_fuzz_random_shapes_blocks_strides(data):
    m = data.draw(st.integers(1, 64))
    k = data.draw(st.integers(1, 64))
    r = data.draw(st.integers(1, 20))
    c = data.draw(st.integers(1, 20))
    n = data.draw(st.integers(0, 40))
    s = data.draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    stride = data.draw(st.integers(1, 3))
    lin = torch.nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(m, k, (r, c), s))
    layer = sp.SparseLinear.from_dense(lin, format="bsr", block_size=(r, c))
    x = torch.randn(n, k * stride)[:, ::stride]
    assert_close(layer(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_a_float64_default_dtype_does_not_change_float32_results():
    """Outputs are allocated as float32 explicitly: under torch.set_default_dtype(torch.float64) a kernel
    writing float32 into a float64 buffer would give garbage."""
    from sparseprune import ops
    torch.manual_seed(3)
    lin = torch.nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(40, 48, (16, 16), 0.5))
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    mods = [sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16)),
            sp.SparseLinear.from_dense(lin, format="bsr", block_size=(16, 16), weight_dtype=torch.int8),
            sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16)),
            sp.SparseConv2d.from_dense(conv, format="bsr", block_size=(16, 16), weight_dtype=torch.int8)]
    xs = [torch.randn(3, 48), torch.randn(3, 48), torch.randn(1, 16, 6, 6), torch.randn(1, 16, 6, 6)]
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    with torch.no_grad():
        want = [m(x) for m, x in zip(mods, xs)] + [ops.attention(q, k, v)]
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = [m(x) for m, x in zip(mods, xs)] + [ops.attention(q, k, v)]
        finally:
            torch.set_default_dtype(old)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert torch.equal(g, w)
