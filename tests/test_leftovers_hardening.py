"""Hardening of leftovers found by probes: zero-size quantized layers, clear errors for bad setting strings,
copy.copy of a fused block, a bias under torch.nn.utils.prune, lazily negated biases / packed arrays, and a
converted language model's head.

References: dense PyTorch on the layer's own dense weight (``to_dense()``) and bias; quantized layers against
the same layer holding a plain copy of the same bias (the same kernel) and, loosely, against dense PyTorch."""
import copy
import importlib
import io
import pickle
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as tprune

import sparseprune as sp
from sparseprune import ops
from sparseprune.nn import SparseConv2d, SparseLinear, dtype_name

pytestmark = pytest.mark.usefixtures("one_thread")
residual_mod = importlib.import_module("sparseprune.convert.residual")

DTYPES = [torch.float32, torch.int8, torch.bfloat16]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-12))


def _close_dense(y, ref, wdt):
    if wdt == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    else:  # int8 / bf16 weights: the quantization error, far below a wrong bias or a wrong sign
        assert y.shape == ref.shape and _rel(y, ref) < 0.05


def _sparse_linear(i, o, wdt, fmt="bsr", block=(4, 4), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        keep = torch.rand(lin.weight.shape, generator=g) > 0.5
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * keep)
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g))
    return lin, SparseLinear.from_dense(lin, format=fmt, block_size=block if fmt == "bsr" else None, weight_dtype=wdt)


def _sparse_conv(cin, cout, k, wdt, fmt="bsr", block=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    with torch.no_grad():
        keep = torch.rand(cout, cin, 1, 1, generator=g) > 0.5
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * keep)
        conv.bias.copy_(torch.randn(cout, generator=g))
    return conv, SparseConv2d.from_dense(conv, format=fmt, block_size=block if fmt == "bsr" else None, weight_dtype=wdt)


# -- 1. zero-size layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("wdt", DTYPES)
@pytest.mark.parametrize("shape", [(48, 0), (0, 16), (0, 0)])
@pytest.mark.parametrize("fmt", ["auto", "bsr"])
def test_zero_size_linear_behaves_as_dense_in_every_dtype(wdt, shape, fmt):
    """nn.Linear(48, 0) (or 0 inputs) as an int8 / bf16 SparseLinear: the (N, 0) output (or the bias) dense PyTorch
    gives, as float32 does (int8 / bf16 raised a reshape error while packing)."""
    i, o = shape
    lin = nn.Linear(i, o)
    m = SparseLinear.from_dense(lin, format=fmt, block_size=(1, 4) if fmt == "bsr" else None, weight_dtype=wdt)
    for n in (3, 0):
        x = torch.randn(n, i)
        with torch.no_grad():
            y, ref = m(x), lin(x)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref)  # no products: only the bias (or nothing) in every dtype
    twin = SparseLinear.from_dense(nn.Linear(i, o), format=fmt, block_size=(1, 4) if fmt == "bsr" else None,
                                   weight_dtype=wdt)
    twin.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(torch.randn(2, i)), lin(torch.randn(2, i)))


@pytest.mark.parametrize("wdt", DTYPES)
def test_zero_channel_conv_is_a_clear_error_in_every_dtype(wdt):
    """nn.Conv2d(8, 0) / (0, 8): a ValueError at construction in every dtype (int8 raised a reshape error)."""
    for cin, cout in ((8, 0), (0, 8)):
        with pytest.raises(ValueError, match="channels must be an int"):
            SparseConv2d.from_dense(nn.Conv2d(cin, cout, 3), format="bsr", block_size=(1, 4), weight_dtype=wdt)


@pytest.mark.parametrize("wdt", DTYPES)
@pytest.mark.parametrize("cl", [False, True])
def test_zero_rows_conv_matches_dense(wdt, cl):
    conv, m = _sparse_conv(8, 16, 3, wdt, block=(1, 4))
    x = torch.randn(0, 8, 5, 5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert m(x).shape == conv(x).shape == (0, 16, 5, 5)


# -- 2. clear errors for bad setting strings ---------------------------------------------------------------------
def _layers():
    yield "linear f32", torch.randn(3, 32), _sparse_linear(32, 16, torch.float32, "csr")[1]
    yield "linear int8", torch.randn(3, 32), _sparse_linear(32, 16, torch.int8)[1]
    yield "linear dense", torch.randn(3, 32), _sparse_linear(32, 16, torch.float32, "dense")[1]
    yield "conv f32", torch.randn(1, 8, 6, 6), _sparse_conv(8, 16, 3, torch.float32, "csr")[1]
    yield "conv 1x1 cl", torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last), \
        _sparse_conv(8, 16, 1, torch.float32, block=(4, 1))[1]
    yield "conv int8", torch.randn(1, 8, 6, 6), _sparse_conv(8, 16, 3, torch.int8)[1]


@pytest.mark.parametrize("attr, value, message", [
    ("activation", "tanh", "activation must be one of"),
    ("activation", None, "activation must be one of"),
    ("kernel", "fastest", "kernel must be one of"),
    ("weight_dtype", "int4", "weight_dtype 'int4' is not one"),
    ("weight_dtype", torch.int8, "weight_dtype torch.int8 is not one"),
])
def test_bad_setting_set_after_a_call_is_a_clear_error(attr, value, message):
    """A setting changed on a built layer, after kept kernel plans exist: the next call raises a ValueError naming
    the accepted values (it raised tuple.index / KeyError messages). A kept int8 call on the very arrays it was
    built for may still run (the same answer: the weight dtype string is not read there); validate() refuses."""
    for name, x, m in _layers():
        if attr == "kernel" and name in ("linear int8", "linear dense", "conv f32", "conv int8"):
            continue  # the fp32 Linear kernel variant: read by the Linear kernels only
        if attr == "weight_dtype" and "dense" in name:
            continue  # a dense-format layer computes with its dense weight (validate() still refuses it)
        calls = [lambda m=m, x=x: m(x)]
        if isinstance(m, SparseConv2d):
            with torch.no_grad():
                shape = m(x).shape
            r = torch.randn(shape).contiguous(memory_format=torch.channels_last if "cl" in name
                                                   else torch.contiguous_format)
            calls.append(lambda m=m, x=x, r=r: m.forward_residual(x, r))
        with torch.no_grad():
            wants = [f() for f in calls] + [f() for f in calls]
            setattr(m, attr, value)
            for f, want in zip(calls, wants):
                try:
                    got = f()
                except ValueError as e:
                    assert re.search(message, str(e)), e
                else:
                    assert attr == "weight_dtype" and "int8" in name and torch.equal(got, want)
        with pytest.raises(ValueError, match=message):
            m.validate()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_packed_format_set_on_a_dense_layer_is_a_clear_error(kind):
    if kind == "linear":
        x, m = torch.randn(3, 32), _sparse_linear(32, 16, torch.float32, "dense")[1]
    else:
        x, m = torch.randn(1, 8, 6, 6), _sparse_conv(8, 16, 3, torch.float32, "dense")[1]
    with torch.no_grad():
        m(x)
        for fmt, message in (("coo", "format must be"), ("csr", "CSR layer has 1x1 blocks|packed array|dense weight")):
            m.format = fmt
            with pytest.raises(ValueError, match=message):
                m(x)
            if kind == "conv":
                with pytest.raises(ValueError, match=message):
                    m.forward_residual(x, torch.zeros(1, 16, 6, 6))
        m.format = "dense"
        torch.testing.assert_close(m(x), m.to_dense_module()(x))


def test_weight_dtype_arguments_are_named():
    lin = nn.Linear(8, 8)
    for bad in ([torch.int8], {"int8": 1}, torch.float16, "int4"):
        with pytest.raises(TypeError, match="weight_dtype must be torch.float32, torch.bfloat16 or torch.int8"):
            SparseLinear.from_dense(lin, weight_dtype=bad)
        with pytest.raises(TypeError, match="weight_dtype must be"):
            sp.convert(nn.Sequential(lin), None, weight_dtypes=[bad])
    assert dtype_name(torch.int8) == "int8" and dtype_name("bfloat16") == "bfloat16"


def test_apply_activation_and_kernel_names():
    with pytest.raises(ValueError, match="activation must be one of .*'relu'"):
        ops.apply_activation(torch.zeros(2), "tanh")
    with pytest.raises(ValueError, match="kernel must be one of .*'rows/panels'"):
        ops.kernel_variant("fast")
    assert ops.kernel_variant("auto") == ops.KERNELS["auto"]


def test_set_isa_names_the_accepted_paths():
    try:
        with pytest.raises(TypeError, match="must be a string"):
            ops.set_isa(None)
        with pytest.raises(ValueError, match=r"'sse9' is not an ISA path .*avx2.*best"):
            ops.set_isa("sse9")
        ops.set_isa("SCALAR")  # any case, as SPARSEPRUNE_ISA
        assert ops.active_isa() == "scalar"
    finally:
        ops.set_isa("best")


def test_convert_formats_and_constructor_block_size():
    m = nn.Sequential(nn.Linear(32, 32))
    sp.prune_unstructured(m, sparsity=0.9, dense_first_last=False)
    out = sp.convert(m, None, formats="csr")  # one name: not its characters
    assert isinstance(out[0], SparseLinear) and out[0].format == "csr"
    with pytest.raises(TypeError, match="formats must be"):
        sp.convert(m, None, formats=3)
    with pytest.raises(TypeError, match="block_size must be a pair"):
        SparseLinear(4, 4, format="bsr", block_size=3)


# -- 3. copy.copy of a fused block --------------------------------------------------------------------------------
class _Twice(nn.Module):
    def forward(self, x):
        return 2 * x


def _fused_resnet_block():
    T = pytest.importorskip("transformers")
    from transformers.models.resnet.modeling_resnet import ResNetBasicLayer
    del T
    block = ResNetBasicLayer(8, 8).eval()
    last = block.layer[-1]
    conv = last.convolution
    with torch.no_grad():
        conv.weight.mul_((torch.rand(8, 8, 1, 1) > 0.5).float())
    last.convolution = SparseConv2d.from_dense(conv, format="bsr", block_size=(4, 1))
    last.normalization = nn.Identity()
    kind = residual_mod.fusable(block)
    assert kind == "relu"
    return residual_mod.fused_copy(block, kind)


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "torch.save"])
def test_copies_of_a_fused_block_run_their_own_modules(how):
    """copy.copy kept the fused forward bound to the original block: the copy ran the original's modules."""
    fused = _fused_resnet_block()
    x = torch.randn(2, 8, 6, 6)

    def torch_roundtrip(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    c = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
         "torch.save": torch_roundtrip}[how](fused)
    assert type(c.__dict__["forward"]) is residual_mod.BoundForward and c.forward.__self__ is c
    c.__dict__["_modules"] = dict(c._modules)  # (copy.copy shares the children's table, as for any module)
    c.shortcut = _Twice()  # the copy's own shortcut
    with torch.no_grad():
        got, ref = c(x), type(c).forward(c, x)  # reference: the block class's own (unfused) forward of the copy
        orig, orig_ref = fused(x), type(fused).forward(fused, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(orig, orig_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, orig)  # the copy's shortcut really differs
    c2 = copy.copy(c)  # a copy of a copy is bound to itself too
    assert c2.forward.__self__ is c2


# -- 4. a bias pruned with torch.nn.utils.prune ----------------------------------------------------------------
def _pruned_bias_layer(kind, wdt):
    if kind == "linear":
        dense, m = _sparse_linear(32, 16, wdt)
        x = torch.randn(3, 32)
    else:
        dense, m = _sparse_conv(8, 16, 3, wdt)
        x = torch.randn(2, 8, 6, 6)
    torch.manual_seed(1)
    tprune.random_unstructured(m, "bias", amount=0.5)
    return dense, m, x


def _dense_ref(m, x, bias):
    w = m.to_dense()
    return F.linear(x, w, bias) if w.dim() == 2 else F.conv2d(x, w, bias, m.stride, m._pad4[::2], m.dilation)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("wdt", [torch.float32, torch.int8])
def test_pruned_bias_validates_and_round_trips(kind, wdt):
    """validate() and load_state_dict refused torch.nn.utils.prune's bias_mask as an unexpected packed array."""
    _, m, x = _pruned_bias_layer(kind, wdt)
    assert "bias_mask" in m._buffers and "bias_orig" in m._parameters
    m.validate()
    with torch.no_grad():
        effective = m.bias_orig * m.bias_mask
        assert bool((effective == 0).any())
        _close_dense(m(x), _dense_ref(m, x, effective), wdt)
        want = m(x)
    # state_dict round trip: into a layer of the same architecture under the same pruning (as for nn.Linear)
    _, twin, _ = _pruned_bias_layer(kind, wdt)
    tprune.identity(twin, "bias") if "bias_mask" not in twin._buffers else None
    twin.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(twin.bias_mask, m.bias_mask)
        torch.testing.assert_close(twin(x), want)
    # the mask baked in: a plain layer again
    tprune.remove(m, "bias")
    m.validate()
    assert "bias_mask" not in m._buffers
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)


def test_pruned_bias_converts_with_the_mask_applied():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    sp.prune_blocks(model, sparsity=0.75, block_size=(4, 4), dense_first_last=False)
    tprune.l1_unstructured(model[0], "bias", amount=0.5)
    x = torch.randn(4, 32)
    fast = sp.convert(model, None)
    assert isinstance(fast[0], SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(fast[0].bias, model[0].bias_orig * model[0].bias_mask)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bias", "weight"])
def test_save_refuses_torch_pruned_tensors_up_front(tmp_path, name):
    """sp.save wrote a file that load then refused ("mask is missing or not boolean" / missing keys): now a clear
    error before anything is written, naming torch.nn.utils.prune.remove; the file at the path is untouched."""
    model = nn.Sequential(nn.Linear(16, 16))
    tprune.l1_unstructured(model[0], name, amount=0.5)
    path = tmp_path / "m.sp"
    path.write_bytes(b"previous good file")
    with pytest.raises(ValueError, match=rf"0\.{name} is under torch.nn.utils.prune.*prune.remove\(module, '{name}'\)"):
        sp.save(model, path)
    assert path.read_bytes() == b"previous good file"
    tprune.remove(model[0], name)
    sp.save(model, path)
    back = sp.load(path, nn.Sequential(nn.Linear(16, 16)))
    x = torch.randn(2, 16)
    assert torch.equal(back(x), model(x))


# -- 5. lazily negated bias and packed arrays ---------------------------------------------------------------------
def _negated_copy(t):
    """A lazily negated view whose values are ``t``'s: its memory holds -t."""
    v = torch._neg_view(t.detach().neg().clone())
    assert v.is_neg() and torch.equal(v, t)
    return v


def _conj_imag(values):
    """``z.conj().imag`` holding ``values``: a strided, lazily negated view."""
    z = torch.complex(torch.zeros_like(values), -values.detach())
    v = z.conj().imag
    assert v.is_neg() and torch.equal(v, values)
    return v


LAYERS5 = [("linear", torch.float32, "csr"), ("linear", torch.float32, "bsr"), ("linear", torch.int8, "bsr"),
           ("linear", torch.bfloat16, "bsr"), ("conv", torch.float32, "bsr"), ("conv1x1cl", torch.float32, "bsr"),
           ("conv", torch.int8, "bsr"), ("conv1x1cl", torch.int8, "bsr")]


def _layer5(kind, wdt, fmt):
    if kind == "linear":
        return _sparse_linear(32, 16, wdt, fmt)[1], torch.randn(5, 32)
    k = 1 if kind == "conv1x1cl" else 3
    x = torch.randn(2, 8, 6, 6)
    if kind == "conv1x1cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return _sparse_conv(8, 16, k, wdt, fmt, block=(4, 4) if wdt != torch.float32 else (4, 1))[1], x


@pytest.mark.parametrize("kind, wdt, fmt", LAYERS5)
@pytest.mark.parametrize("how", ["neg_view", "conj_imag", "same_memory"])
def test_negated_bias_is_read_as_its_values(kind, wdt, fmt, how):
    """``m.bias.data = <lazily negated view>``: the kernels read the memory (-b) as the bias (a silent wrong
    answer), on the kept calls and on the general route."""
    m, x = _layer5(kind, wdt, fmt)
    with torch.no_grad():
        m(x), m(x)  # kept kernel plans built for the original bias
        new = torch.randn(m.bias.shape)
        if how == "neg_view":
            m.bias.data = _negated_copy(new)
        elif how == "conj_imag":
            m.bias.data = _conj_imag(new)
        else:  # the plan's own address, now read as negated
            new = -m.bias.detach().clone()
            m.bias.data = torch._neg_view(m.bias.data)
        assert m.bias.is_neg() and torch.equal(m.bias, new)
        twin = copy.deepcopy(m)
        twin.bias.data = new.clone()  # the same layer, the same bias values in plain memory
        for _ in range(3):  # general route, then any kept call
            y = m(x)
            torch.testing.assert_close(y, twin(x), rtol=0, atol=0)
            _close_dense(y, _dense_ref(m, x, new), wdt)
        if kind != "linear":
            r = torch.randn(y.shape).contiguous(memory_format=torch.channels_last if "cl" in kind
                                                else torch.contiguous_format)
            torch.testing.assert_close(m.forward_residual(x, r, "relu"), twin.forward_residual(x, r, "relu"),
                                       rtol=0, atol=0)
    if wdt == torch.float32 and kind == "linear":  # autograd route too
        y = m(x)
        torch.testing.assert_close(y, _dense_ref(m, x, new))
        y.sum().backward()
        assert m.bias.grad is not None and torch.equal(m.bias.grad, torch.full_like(new, x.shape[0]))


@pytest.mark.parametrize("kind, wdt, fmt", LAYERS5)
def test_negated_packed_arrays_are_refused(kind, wdt, fmt):
    """A packed array swapped for a lazily negated view (an index array: its memory holds negative indices) is a
    ValueError before any kernel reads it; the layer computes again once given a plain array."""
    m, x = _layer5(kind, wdt, fmt)
    with torch.no_grad():
        want = m(x)
        m(x)
        for name in ("values", "col_idx", "row_ptr") + (("scales",) if wdt == torch.int8 else ()):
            t = m._buffers[name]
            plain = t.data
            t.data = _negated_copy(plain)
            with pytest.raises(ValueError, match=f"packed array '{name}' is a lazily negated view"):
                m(x)
            with pytest.raises(ValueError, match="lazily negated"):
                m.validate()
            t.data = plain
            m.validate()
            torch.testing.assert_close(m(x), want, rtol=0, atol=0)


def test_negated_packed_array_at_its_own_address_is_refused_on_the_general_route():
    """``values.data = torch._neg_view(values.data)``: the same address, now read as negated. The array check record
    counts the negation (the general route and validate() refuse it; before, the record matched and the kernel read
    the old values as the new ones)."""
    m, x = _layer5("linear", torch.float32, "csr")
    with torch.no_grad():
        m(x)
    m.values.data = torch._neg_view(m.values.data)
    with pytest.raises(ValueError, match="packed array 'values' is a lazily negated view"):
        m(x)  # (the autograd route: x needs no grad, the layer's bias does)
    with pytest.raises(ValueError, match="lazily negated"):
        m.validate()


# -- 6. a converted language model's head -----------------------------------------------------------------------
def _gpt2(tie):
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    cfg = T.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16, tie_word_embeddings=tie,
                       bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(cfg).eval()
    sp.prune_blocks(model, sparsity=0.75, block_size=(4, 4), dense_first_last=False)
    return model


def test_tied_lm_head_stays_dense_without_example_inputs():
    """convert(model, None) packed a tied lm_head (its weight the embedding's): the tie was lost and transformers'
    tie_weights() (resize_token_embeddings, post_init) failed with KeyError "attribute 'weight' already exists"."""
    model = _gpt2(tie=True)
    fast = sp.convert(model, None)
    assert not isinstance(fast.lm_head, SparseLinear)
    assert fast.lm_head.weight is fast.transformer.wte.weight
    assert any(isinstance(m, SparseLinear) for m in fast.modules())  # the rest is converted
    fast.tie_weights()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_untied_lm_head_resize_is_documented_and_the_workaround_works():
    model = _gpt2(tie=False)
    fast = sp.convert(model, None)
    assert isinstance(fast.lm_head, SparseLinear)
    doc = sp.convert.__doc__
    assert "resize_token_embeddings" in doc and "to_dense_module()" in doc
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = fast(ids).logits
    fast.set_output_embeddings(fast.get_output_embeddings().to_dense_module())  # the documented way
    fast.resize_token_embeddings(80, mean_resizing=False)
    assert fast.lm_head.out_features == 80 and fast.transformer.wte.num_embeddings == 80
    with torch.no_grad():
        out = fast(torch.randint(0, 80, (2, 8))).logits
        assert out.shape == (2, 8, 80)
        torch.testing.assert_close(fast(ids).logits[..., :64], want, rtol=1e-4, atol=1e-4)
