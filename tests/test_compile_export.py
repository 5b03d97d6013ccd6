"""A converted model in the PyTorch toolchain: compile, export, deepcopy, .to(), state_dict, threads."""
import copy
import threading

import pytest
import torch

import sparseprune as sp
from test_convert_models import make_mixed


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    src = make_mixed(d=128, h=512)
    conv = sp.convert(src)  # heuristic: bsr16x16, bsr16x16, csr, dense (deterministic)
    assert [type(getattr(conv, n)).__name__ for n in ("fc1", "fc2", "fc3", "fc4")] == \
           ["SparseLinear", "SparseLinear", "SparseLinear", "Linear"]
    return src, conv


def test_torch_compile_runs_and_matches(models):
    src, conv = models
    x = torch.randn(32, 128)
    compiled = torch.compile(conv, fullgraph=True)  # no graph breaks around the custom op
    with torch.no_grad():
        y = compiled(x)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, src(x), rtol=1e-4, atol=1e-4)
    # summary and save see through the compile wrapper
    assert len(sp.summary(compiled, print_fn=None)) == 4


def test_torch_export_runs_and_matches(models):
    src, conv = models
    x = torch.randn(16, 128)
    ep = torch.export.export(conv, (x,))
    assert any("sparseprune.spmm" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(16, 128)
    torch.testing.assert_close(ep.module()(x2), conv(x2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ep.module()(x2), src(x2), rtol=1e-4, atol=1e-4)


def test_deepcopy_is_independent(models):
    _, conv = models
    x = torch.randn(4, 128)
    dup = copy.deepcopy(conv)
    assert torch.equal(dup(x), conv(x))
    with torch.no_grad():
        dup.fc1.values.mul_(2)
    assert not torch.equal(dup(x), conv(x))
    assert sp.summary(dup, print_fn=None)[0]["format"] == "bsr"


def test_to_dtype_and_device(models):
    _, conv = models
    dup = copy.deepcopy(conv)
    x = torch.randn(4, 128)
    assert torch.equal(dup.to(torch.float32).to("cpu")(x), conv(x))
    with pytest.raises(TypeError, match="float32"):
        copy.deepcopy(conv).fc1.to(torch.float64)  # a sparse layer itself: refused
    with pytest.raises(TypeError, match="float32"):
        copy.deepcopy(conv).fc2.half()


@pytest.mark.parametrize("cast", ["double", "half", "to_float64", "to_bfloat16"])
def test_model_cast_never_stops_half_way(models, cast):
    """A dtype cast of a model holding sparse layers: never an exception half-way through (the modules before the
    first sparse one cast, the rest not); every other module is cast, the sparse layers keep their weights (one
    warning each) and refuse inputs of the other dtype clearly; .float() gives back the same model."""
    _, conv = models
    dup = copy.deepcopy(conv)
    want_dtype = {"double": torch.float64, "half": torch.float16, "to_float64": torch.float64,
                  "to_bfloat16": torch.bfloat16}[cast]
    sparse = [n for n, m in dup.named_modules() if isinstance(m, sp.nn.SparseModule) and m.format != "dense"]
    with pytest.warns(UserWarning, match="keeps its weight dtype") as caught:
        out = getattr(dup, cast)() if cast in ("double", "half") else dup.to(want_dtype)
    assert out is dup and len([w for w in caught if "keeps its weight dtype" in str(w.message)]) == len(sparse)
    for name, p in dup.named_parameters():
        owner = name.rsplit(".", 1)[0]
        assert p.dtype == (torch.float32 if owner in sparse else want_dtype), name
    for name in sparse:
        assert dup.get_submodule(name).values.dtype is torch.float32
    with pytest.raises(TypeError, match="float32"):
        dup(torch.randn(4, 128, dtype=want_dtype))
    if want_dtype is torch.float64:  # float32 -> float64 -> float32 is exact: the same model again
        x = torch.randn(4, 128)
        with torch.no_grad():
            assert torch.equal(dup.float()(x), conv(x))


def test_state_dict_round_trips(models):
    src, conv = models
    sd = conv.state_dict()
    other = sp.convert(src)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, sp.SparseLinear):
                m.values.zero_()
    x = torch.randn(4, 128)
    assert not torch.equal(other(x), conv(x))
    other.load_state_dict(sd)
    assert torch.equal(other(x), conv(x))


def test_concurrent_inference_from_four_threads(models):
    src, conv = models
    inputs = [torch.randn(n, 128) for n in (1, 7, 32, 64)]
    expected = [src(x) for x in inputs]
    errors, results = [], {}

    def worker(i):
        try:
            with torch.no_grad():
                for rep in range(25):
                    results[(i, rep)] = conv(inputs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, rep), y in results.items():
        torch.testing.assert_close(y, expected[i], rtol=1e-4, atol=1e-4)
    assert len(results) == 100
