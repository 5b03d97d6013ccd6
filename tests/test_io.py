"""save / load: safe format (safetensors + JSON), integrity check, structure restored into a fresh instance."""
import importlib
import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st
import safetensors.torch
import torch
from torch import nn

import sparseprune as sp
from test_convert_models import MLP, ConvBN, make_convbn, make_mixed

spio = importlib.import_module("sparseprune.io")
HERE = os.path.dirname(os.path.abspath(__file__))


def _small():
    """Mixed model at small width, converted by the (deterministic) heuristic: bsr, bsr, csr, dense."""
    src = make_mixed(d=128, h=512)
    return src, sp.convert(src)


def test_roundtrip_restores_structure_outputs_and_report(tmp_path):
    src, conv = _small()
    x = torch.randn(16, 128)
    conv = sp.convert(src, x, time_budget=0.3)
    path = tmp_path / "m.sp"
    sp.save(conv, path)
    fresh = MLP(128, 512)
    loaded = sp.load(path, fresh)
    assert loaded is fresh
    for name in ("fc1", "fc2", "fc3", "fc4"):
        a, b = getattr(conv, name), getattr(loaded, name)
        assert type(a) is type(b)
        if isinstance(a, sp.SparseLinear):
            assert (a.format, a.block_size, a.num_threads) == (b.format, b.block_size, b.num_threads)
            assert torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(loaded(x), conv(x))
    assert not loaded.training
    assert [r["format"] for r in sp.summary(loaded, print_fn=None)] == \
           [r["format"] for r in sp.summary(conv, print_fn=None)]
    # a standard safetensors reader opens it too (the tensors are ordinary)
    with safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(conv.state_dict()) and f.metadata()["sparseprune.format"] == "sparseprune"


def test_fresh_process_reproduces_outputs(tmp_path):
    src, conv = _small()
    x = torch.randn(8, 128)
    sp.save(conv, tmp_path / "m.sp")
    safetensors.torch.save_file({"x": x, "y": conv(x).detach()}, str(tmp_path / "io.safetensors"))
    script = (
        "import sys, torch, safetensors.torch, sparseprune as sp\n"
        "from test_convert_models import mixed_arch\n"
        "d = safetensors.torch.load_file(sys.argv[2])\n"
        "m = sp.load(sys.argv[1], mixed_arch().__class__(128, 512))\n"
        "safetensors.torch.save_file({'y': m(d['x']).detach()}, sys.argv[3])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(sp.__path__[0]), HERE]))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.sp"), str(tmp_path / "io.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, env=env, timeout=120)
    y = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["y"]
    assert torch.equal(y, conv(x))


def _expect_refused(path, blob):
    with open(path, "wb") as f:
        f.write(blob)
    with pytest.raises(ValueError, match="corrupted|truncated|not a sparseprune file|version"):
        sp.load(path, MLP(128, 512))


def test_every_flipped_byte_and_truncation_is_refused(tmp_path):
    _, conv = _small()
    good = tmp_path / "m.sp"
    sp.save(conv, good)
    blob = good.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    rng = random.Random(0)
    header = list(range(8 + n))
    positions = set(range(8)) | set(rng.sample(header, min(len(header), 250)))
    positions |= set(rng.sample(range(8 + n, len(blob)), 150)) | {len(blob) - 1, 8 + n}
    bad = tmp_path / "bad.sp"
    for pos in sorted(positions):
        b = bytearray(blob)
        b[pos] ^= 1 << rng.randrange(8)
        _expect_refused(bad, bytes(b))
        b[pos] = blob[pos] ^ 0xFF
        _expect_refused(bad, bytes(b))
    for cut in (0, 3, 8, 8 + n // 2, 8 + n, len(blob) // 2, len(blob) - 1):
        _expect_refused(bad, blob[:cut])
    _expect_refused(bad, blob + b"\0")
    # the untouched file still loads: the refusals were about the damage
    x = torch.randn(2, 128)
    assert torch.equal(sp.load(good, MLP(128, 512))(x), conv(x))


def test_header_whitespace_change_is_refused(tmp_path):
    """Semantically equal JSON is still a different file: the hash covers every byte."""
    _, conv = _small()
    sp.save(conv, tmp_path / "m.sp")
    blob = bytearray((tmp_path / "m.sp").read_bytes())
    n = int.from_bytes(blob[:8], "little")
    assert blob[8 + n - 1:8 + n] in (b" ", b"}")
    i = blob.rindex(b"}", 8, 8 + n)
    if i + 1 < 8 + n:  # safetensors pads the header with spaces: turn one into a tab
        blob[i + 1] = ord("\t")
        _expect_refused(tmp_path / "bad.sp", bytes(blob))


def test_foreign_and_future_files_are_refused(tmp_path, monkeypatch):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(MLP(128, 512).state_dict(), str(plain))
    with pytest.raises(ValueError, match="not a sparseprune file"):
        sp.load(plain, MLP(128, 512))
    (tmp_path / "junk").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError):
        sp.load(tmp_path / "junk", MLP(128, 512))
    monkeypatch.setattr(spio, "FORMAT_VERSION", 99)
    _, conv = _small()
    sp.save(conv, tmp_path / "future.sp")
    monkeypatch.setattr(spio, "FORMAT_VERSION", 1)
    with pytest.raises(ValueError, match="version 99"):
        sp.load(tmp_path / "future.sp", MLP(128, 512))


def test_wrong_architecture_is_refused(tmp_path):
    _, conv = _small()
    sp.save(conv, tmp_path / "m.sp")
    with pytest.raises(ValueError, match="architecture|lacks"):
        sp.load(tmp_path / "m.sp", nn.Sequential(nn.Linear(128, 512)))


def test_invalid_packed_indices_are_refused_even_with_a_valid_hash(tmp_path):
    """The hash proves integrity, not good intent: packed tensors are validated before use."""
    _, conv = _small()
    with torch.no_grad():
        conv.fc3.col_idx[0] = 30000  # beyond the 128 columns
    sp.save(conv, tmp_path / "evil.sp")
    with pytest.raises(ValueError, match="fc3.*invalid"):
        sp.load(tmp_path / "evil.sp", MLP(128, 512))


def test_short_bias_is_refused(tmp_path):
    _, conv = _small()
    conv.fc1.bias = nn.Parameter(torch.zeros(3))  # the kernel would read 512 entries
    sp.save(conv, tmp_path / "evil.sp")
    with pytest.raises(ValueError, match="fc1.*bias"):
        sp.load(tmp_path / "evil.sp", MLP(128, 512))


@pytest.mark.parametrize("edit,message", [
    (lambda e: e.update({"class": "os.system"}), "cannot build"),
    (lambda e: e["attrs"].update({"forward": "boom"}), "has attributes"),
    (lambda e: e["attrs"].update({"__class__": "x"}), "has attributes"),
    (lambda e: e.update({"params": 5}), "malformed"),
    (lambda e: e.update({"buffers": {"values": True, "extra": True}}), "must hold buffers"),
])
def test_structure_cannot_name_classes_or_shadow_methods(tmp_path, monkeypatch, edit, message):
    _, conv = _small()
    orig = spio._structure

    def evil(model):
        s = orig(model)
        edit(s["modules"]["fc1"])
        return s
    monkeypatch.setattr(spio, "_structure", evil)
    with pytest.raises(ValueError, match=message):  # refused by save's own verification, or by load
        sp.save(conv, tmp_path / "evil.sp")
        monkeypatch.setattr(spio, "_structure", orig)
        sp.load(tmp_path / "evil.sp", MLP(128, 512))


def test_sparse_file_is_proportionally_smaller(tmp_path):
    src = make_mixed(d=256, h=1024)
    other = make_mixed(seed=1, d=256, h=1024)
    with torch.no_grad():  # all four layers at 95% 16x16 blocks
        src.fc3.weight.copy_(other.fc1.weight)
        src.fc4.weight.copy_(other.fc2.weight)
    conv = sp.convert(src)
    sp.save(src, tmp_path / "dense.sp")
    sp.save(conv, tmp_path / "sparse.sp")
    dense, sparse = os.path.getsize(tmp_path / "dense.sp"), os.path.getsize(tmp_path / "sparse.sp")
    stored = sum(b.numel() * b.element_size() for b in conv.state_dict().values())
    assert sparse <= stored + 64 * 1024  # payload plus a bounded header
    assert sparse < 0.1 * dense, (sparse, dense)


def test_channel_pruned_shapes_are_restored(tmp_path):
    """A Linear pair with half the hidden channels removed (what prune_channels produces) reloads into
    the original architecture; so does a conv/bn chain with fewer channels."""
    src = make_mixed(d=128, h=512)
    keep = torch.arange(0, 512, 2)
    with torch.no_grad():
        fc1 = nn.Linear(128, 256)
        fc1.weight.copy_(src.fc1.weight[keep]); fc1.bias.copy_(src.fc1.bias[keep])
        fc2 = nn.Linear(256, 128)
        fc2.weight.copy_(src.fc2.weight[:, keep]); fc2.bias.copy_(src.fc2.bias)
    src.fc1, src.fc2 = fc1, fc2
    setattr(src, spio.RESHAPED_ATTR, ["fc1", "fc2"])  # what sp.prune_channels records
    x = torch.randn(4, 128)
    conv = sp.convert(src, x, time_budget=0.2)
    sp.save(conv, tmp_path / "m.sp")
    loaded = sp.load(tmp_path / "m.sp", MLP(128, 512))
    assert loaded.fc2.in_features == 256
    assert torch.equal(loaded(x), conv(x))

    cb = make_convbn()
    with torch.no_grad():
        c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False); c1.weight.copy_(cb.conv1.weight[:8])
        bn = nn.BatchNorm2d(8).eval()
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).copy_(getattr(cb.bn1, k)[:8])
        c2 = nn.Conv2d(8, 32, 3, padding=1); c2.weight.copy_(cb.block[0].weight[:, :8]); c2.bias.copy_(cb.block[0].bias)
    cb.conv1, cb.bn1, cb.block[0] = c1, bn, c2
    setattr(cb, spio.RESHAPED_ATTR, ["conv1", "bn1", "block.0"])
    xi = torch.randn(2, 3, 8, 8)
    for model in (cb, sp.convert(cb, xi, time_budget=0.2)):  # unconverted, then BN-folded
        sp.save(model, tmp_path / "c.sp")
        loaded = sp.load(tmp_path / "c.sp", ConvBN())
        assert loaded.conv1.out_channels == 8 and loaded.block[0].in_channels == 8
        assert type(loaded.bn1) is type(model.bn1)
        assert torch.equal(loaded(xi), model(xi))


def test_tied_weights_and_training_flags(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.drop = nn.Linear(32, 32), nn.Linear(32, 32), nn.Dropout(0.5)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.drop(self.a(x)))

    m = Tied().eval()
    sp.save(m, tmp_path / "t.sp")
    with open(tmp_path / "t.sp", "rb") as f:
        meta = json.loads(f.read(8 + int.from_bytes(open(tmp_path / "t.sp", "rb").read(8), "little"))[8:])
    assert "b.weight" not in meta and "a.weight" in meta  # stored once
    fresh = Tied()
    loaded = sp.load(tmp_path / "t.sp", fresh)
    assert loaded.b.weight is loaded.a.weight and not loaded.training
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), m(x))


def test_save_is_atomic(tmp_path, monkeypatch):
    _, conv = _small()
    path = tmp_path / "m.sp"
    path.write_bytes(b"previous good file")

    def fail(p, load):
        raise ValueError("simulated failure after writing")
    monkeypatch.setattr(spio, "_scan", fail)
    with pytest.raises(ValueError, match="simulated"):
        sp.save(conv, path)
    assert path.read_bytes() == b"previous good file"
    assert sorted(os.listdir(tmp_path)) == ["m.sp"]  # no temp file left behind


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=4),
       fmt=st.sampled_from(["dense", "csr", "bsr"]), block=st.sampled_from([(1, 4), (4, 4), (3, 5), (16, 16)]),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_save_load_round_trip(tmp_path_factory, sizes, fmt, block, sparsity, bias, seed):
    from helpers import block_sparse_weight

    g = torch.Generator().manual_seed(seed)

    def arch():
        return nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b in zip(sizes, sizes[1:])])
    model = arch()
    with torch.no_grad():
        for i, lin in enumerate(model):
            lin.weight.copy_(block_sparse_weight(lin.out_features, lin.in_features, block, sparsity, g))
            model[i] = sp.SparseLinear.from_dense(lin, format=fmt, block_size=block if fmt == "bsr" else None)
    path = tmp_path_factory.mktemp("prop") / "m.sp"
    sp.save(model, path)
    loaded = sp.load(path, arch())
    x = torch.randn(5, sizes[0], generator=g)
    assert torch.equal(loaded(x), model(x))
    for a, b in zip(model, loaded):
        assert (a.format, a.block_size) == (b.format, b.block_size)
        assert torch.equal(a.to_dense(), b.to_dense())
