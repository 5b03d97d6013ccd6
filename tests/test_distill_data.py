"""sp.distill and its data and modules: a one-shot iterator feeds calibration and training without
losing batches (and says so when it runs out); any failure hands the student back exactly as it was
(weights, buffers, masks and hooks, modes, requires_grad, .grad); a teacher passed in gets its modes
and requires_grad flags back."""
import pytest
import torch
from torch import nn

from sparseprune.distill import distill
from sparseprune.prune import masks

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 8))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def batches(k, shape=(8, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(k)]


def snapshot(model):
    """Everything a failed distill must leave alone, in comparable form."""
    mods = dict(model.named_modules())
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "masked": sorted(n for n, _ in masks.masked_modules(model)),
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks), hasattr(m, "_sparseprune_mask_hooks"))
                  for n, m in mods.items()},
        "grad_hooks": {n: len(p._backward_hooks or {}) for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in mods.items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
        "params": {n: p for n, p in model.named_parameters()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for key in ("masked", "hooks", "grad_hooks", "training", "requires_grad"):
        assert after[key] == before[key], key
    for n, g in before["grad"].items():
        assert after["grad"][n] is g, n  # the same .grad tensor (or None), not a new one
    for n, p in before["params"].items():
        assert after["params"][n] is p, n  # the same Parameter objects (optimizers built on them keep working)


# -- a one-shot iterator --------------------------------------------------------------------------------
def test_one_shot_iterator_calibrates_and_trains_like_a_list():
    data = batches(20)
    kw = dict(sparsity=0.5, pattern="unstructured", steps=15, progress=False, lr=1e-2)  # init: sparsegpt
    from_list, from_gen = mlp(), mlp()
    distill(from_list, data, **kw)
    distill(from_gen, (b for b in data), **kw)  # the 8 calibration batches are the first 8 trained on
    assert from_gen._sparseprune_distill["steps"] == 15
    for (k, a), (_, b) in zip(from_list.state_dict().items(), from_gen.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("init", ["sparsegpt", "wanda"])
def test_one_shot_iterator_shorter_than_the_calibration(init):
    model = mlp()
    distill(model, iter(batches(5)), sparsity=0.5, pattern="unstructured", steps=3, init=init, progress=False)
    assert model._sparseprune_distill["steps"] == 3
    assert masks.sparsity(model, only_masked=True) == pytest.approx(0.5, abs=0.01)


def test_one_shot_iterator_running_out_says_so_and_leaves_the_model():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ran out after 4 batches.*re-iterable.*steps <= 4"):
        distill(model, (b for b in batches(4)), sparsity=0.5, pattern="unstructured", steps=6, progress=False)
    assert_unchanged(model, before)


def test_reiterable_unsized_data_calibrates_on_its_first_batches_without_an_extra_pass():
    class Stream:  # re-iterable, no length (like a DataLoader over an IterableDataset)
        passes = 0

        def __iter__(self):
            Stream.passes += 1
            return iter(batches(3))
    model = mlp()
    distill(model, Stream(), sparsity=0.5, pattern="unstructured", steps=7, init="wanda", progress=False)
    assert model._sparseprune_distill["steps"] == 7
    assert Stream.passes == 3  # 7 batches from passes of 3; the calibration batches are the first trained on


# -- failures leave the student as it was ---------------------------------------------------------------
@pytest.mark.parametrize("init", ["magnitude", "random"])  # (pruning without data)
def test_empty_one_shot_iterator_leaves_the_model(init):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="empty"):
        distill(model, iter([]), sparsity=0.5, pattern="unstructured", steps=3, init=init, progress=False)
    assert_unchanged(model, before)


def test_dtype_mismatch_leaves_the_model():
    model = mlp().double()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        distill(model, batches(3), sparsity=0.5, pattern="unstructured", steps=3, init="magnitude", progress=False)
    assert_unchanged(model, before)


class _Stop(Exception):
    pass


def _fail_at(step, exc):
    seen = [0]

    def ev(m):
        seen[0] += 1
        if seen[0] == step:
            raise exc
        return 0.0
    return ev


@pytest.mark.parametrize("exc", [_Stop, KeyboardInterrupt])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_failure_mid_run_restores_everything(arch, exc):
    model = mlp() if arch == "mlp" else cnn()
    data = batches(4) if arch == "mlp" else batches(4, shape=(4, 3, 6, 6))
    first = model[0]
    masks.apply_mask(first, torch.rand(first.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.3)
    model[1].eval()                        # a submodule in its own mode
    model[3].bias.requires_grad_(False)    # a frozen parameter
    model(data[0]).sum().backward()        # .grad left by the caller
    before = snapshot(model)
    with pytest.raises(exc):
        distill(model, data, sparsity=0.75, pattern="unstructured", steps=8, init="magnitude", init_sparsity=0.4,
                importance="taylor", prune_end=0.5, progress=False, lr=1e-2, eval_fn=_fail_at(4, exc),
                eval_every=1)
    assert_unchanged(model, before)
    # the caller's own mask still works: it is enforced, and a later run keeps it
    with torch.no_grad():
        first.weight.fill_(1.0)
    model(data[0])
    assert torch.equal(first.weight != 0, masks.get_mask(first))
    distill(model, data, sparsity=0.75, pattern="unstructured", steps=2, init="magnitude", progress=False)
    assert not (first.weight[~before["state"]["0.weight_mask"]] != 0).any()


# -- a teacher passed in --------------------------------------------------------------------------------
def teacher_flags(t):
    return ({n: m.training for n, m in t.named_modules()}, {n: p.requires_grad for n, p in t.named_parameters()})


@pytest.mark.parametrize("fail", [False, True])
def test_teacher_modes_and_requires_grad_come_back(fail):
    teacher = mlp().train()
    teacher[1].eval()
    teacher[5].bias.requires_grad_(False)
    want = teacher_flags(teacher)
    tstate = {k: v.clone() for k, v in teacher.state_dict().items()}
    kw = dict(sparsity=0.5, pattern="unstructured", steps=3, teacher=teacher, progress=False)
    if fail:
        kw.update(eval_fn=_fail_at(2, _Stop), eval_every=1)
        with pytest.raises(_Stop):
            distill(mlp(), batches(3), **kw)
    else:
        distill(mlp(), batches(3), **kw)
    assert teacher_flags(teacher) == want
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in tstate.items())  # running stats untouched


def test_a_teacher_sharing_the_students_parameters_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(4, 8) for _ in range(3)]
    for teacher in (model, torch.nn.Sequential(model[0])):
        with pytest.raises(ValueError, match="shares parameters"):
            distill(model, data, sparsity=0.5, teacher=teacher, steps=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
