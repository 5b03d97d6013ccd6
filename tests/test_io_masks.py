"""sp.save / sp.load of models that still carry sparseprune's masks: a pattern-pruned training checkpoint,
and the layers convert() leaves as they are (tied weights, skip=...). The file loads back into a fresh
instance with the masks in force; a malformed mask record is refused."""
import pytest
import torch
from torch import nn

import sparseprune as sp
from sparseprune.prune import masks
import hostile


def _net():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_masked_checkpoint_round_trips_and_keeps_masking(tmp_path):
    torch.manual_seed(0)
    m = _net()
    sp.prune_blocks(m, 0.5, block_size=(8, 8))
    names = [n for n, _ in masks.masked_modules(m)]
    assert names
    sp.save(m, tmp_path / "ckpt.sp")
    fresh = _net()
    back = sp.load(tmp_path / "ckpt.sp", fresh)
    assert [n for n, _ in masks.masked_modules(back)] == names
    for (n, a), b in zip(m.named_parameters(), back.parameters()):
        assert torch.equal(a, b), n
    for n in names:
        assert torch.equal(back.get_submodule(n).weight_mask, m.get_submodule(n).weight_mask)
    x = torch.randn(5, 32)
    torch.testing.assert_close(back(x), m(x))
    # training goes on with the masks in force (a step that would revive pruned weights does not)
    opt = torch.optim.SGD(back.parameters(), lr=1.0)
    with torch.no_grad():
        back[2].weight.add_(1.0)  # revive every pruned entry by hand
    back(x).square().sum().backward()
    opt.step()
    mk = back[2].weight_mask
    assert bool((back[2].weight[~mk] == 0).all())


def test_unmasked_file_has_no_mask_record(tmp_path):
    sp.save(_net(), tmp_path / "plain.sp")
    _, meta = hostile.read(tmp_path / "plain.sp")
    assert "masks" not in hostile.structure(meta)  # older readers refuse unknown keys: none is written here


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) + x @ self.b.weight.t()


@pytest.mark.parametrize("case", ["tied", "skip"])
def test_converted_model_with_masked_layers_left_as_they_are_loads(tmp_path, case):
    torch.manual_seed(0)
    src = Tied().eval()
    sp.prune_blocks(src, 0.8, block_size=(8, 8), dense_first_last=False)
    x = torch.randn(4, 64)
    fast = sp.convert(src, x, time_budget=1.0, skip=["c"] if case == "skip" else ())
    left = [n for n, _ in masks.masked_modules(fast)]
    assert left  # b (its weight is read outside its forward) or c (skipped) keeps its mask
    sp.save(fast, tmp_path / "m.sp")
    back = sp.load(tmp_path / "m.sp", Tied().eval())
    assert [n for n, _ in masks.masked_modules(back)] == left
    with torch.no_grad():
        torch.testing.assert_close(back(x), fast(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["not_bool", "missing_module", "no_weight", "not_a_list", "wrong_shape"])
def test_malformed_mask_records_are_refused(tmp_path, bad):
    torch.manual_seed(0)
    m = _net()
    sp.prune_blocks(m, 0.5, block_size=(8, 8), dense_first_last=False)
    sp.save(m, tmp_path / "ok.sp")

    def edit(tensors, st, meta):
        if bad == "not_bool":
            tensors["2.weight_mask"] = tensors["2.weight_mask"].float()
        elif bad == "missing_module":
            st["masks"] = st["masks"] + ["9"]
        elif bad == "no_weight":
            st["masks"] = st["masks"] + ["1"]  # the ReLU
        elif bad == "not_a_list":
            st["masks"] = "2"
        elif bad == "wrong_shape":
            tensors["2.weight_mask"] = torch.ones(64, 63, dtype=torch.bool)
    hostile.rewrite(tmp_path / "ok.sp", tmp_path / "bad.sp", edit)
    fresh = _net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError):
        sp.load(tmp_path / "bad.sp", fresh)
    if bad in ("not_a_list",):  # refused before anything was applied
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_save_keeps_permissions_as_open_would(tmp_path):
    """A new file gets 0666 less the umask, an overwritten one keeps its mode (mkstemp alone gives 0600)."""
    import os
    old = os.umask(0o027)
    try:
        sp.save(_net(), tmp_path / "new.sp")
        assert os.stat(tmp_path / "new.sp").st_mode & 0o777 == 0o640
        p = tmp_path / "old.sp"
        p.write_bytes(b"old")
        os.chmod(p, 0o604)
        sp.save(_net(), p)
        assert os.stat(p).st_mode & 0o777 == 0o604
        sp.load(p, _net())
    finally:
        os.umask(old)
