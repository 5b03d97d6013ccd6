"""A channel-pruned model whose norms shrank with their channels (LayerNorm / RMSNorm ``normalized_shape``)
saves and loads back exactly; the record of those shapes is checked like every other field of a file."""
import copy

import pytest
import torch
from torch import nn

import sparseprune as sp
from hostile import read, rewrite, structure


def _model(norm):
    torch.manual_seed(0)
    n = nn.LayerNorm(32) if norm == "layer" else nn.RMSNorm(32, eps=1e-6)
    return nn.Sequential(nn.Linear(16, 32), n, nn.ReLU(), nn.Linear(32, 4)).eval()


def _pruned(norm):
    m = _model(norm)
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
    sp.prune_channels(m, torch.randn(5, 16), 0.5)
    assert m[1].normalized_shape == (16,)
    return m


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_channel_pruned_norms_load_back(tmp_path, norm):
    m = _pruned(norm)
    path = tmp_path / "m.sp"
    sp.save(m, path)
    loaded = sp.load(path, _model(norm))
    assert loaded[1].normalized_shape == (16,) and loaded[0].out_features == 16
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert structure(read(path)[1])["int_tuples"] == {"1": {"normalized_shape": [16]}}


def test_a_channel_pruned_cnn_file_has_no_tuple_record(tmp_path):
    # conv geometry never changes with channels: not recorded, the file stays readable by older versions
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    sp.prune_channels(m, torch.randn(2, 3, 9, 9), 0.5)
    sp.save(m, tmp_path / "c.sp")
    assert "int_tuples" not in structure(read(tmp_path / "c.sp")[1])


@pytest.mark.parametrize("bad", [[-1], [2 ** 40], ["16"], [[16]], 16, [16.0], list(range(9))])
def test_malformed_tuple_records_are_refused(tmp_path, bad):
    m = _pruned("layer")
    sp.save(m, tmp_path / "m.sp")

    def edit(tensors, st, meta):
        st["int_tuples"]["1"]["normalized_shape"] = bad
    rewrite(tmp_path / "m.sp", tmp_path / "bad.sp", edit)
    fresh = _model("layer")
    snap = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="malformed int_tuples"):
        sp.load(tmp_path / "bad.sp", fresh)
    assert fresh[1].normalized_shape == (32,) and all(torch.equal(v, snap[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("shape,match", [([16, 1], "wrong architecture"), ([8], "does not fit")])
def test_tuple_records_that_do_not_fit_are_refused(tmp_path, shape, match):
    m = _pruned("layer")
    sp.save(m, tmp_path / "m.sp")

    def edit(tensors, st, meta):
        st["int_tuples"]["1"]["normalized_shape"] = shape
    rewrite(tmp_path / "m.sp", tmp_path / "bad.sp", edit)
    with pytest.raises(ValueError, match=match):
        sp.load(tmp_path / "bad.sp", _model("layer"))
