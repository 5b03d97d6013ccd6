"""Leftovers (distill, demo): DistillCallback feeds a teacher in another dtype its inputs in that dtype;
sp.distill refuses to resume a checkpoint written with other settings, refuses malformed checkpoints
with a ValueError and never overwrites a file that is not its checkpoint; the demo's --threads is
checked (and `sparseprune demo OPTIONS` reaches the demo); distill gives the caller's RNG states back."""
import copy
import json
import random
import types

import pytest
import torch

from sparseprune.distill import DistillCallback, distill

from helpers import distill_batches, distill_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


mlp = distill_mlp


def tensors(k=4, **kw):
    return distill_batches(k, **kw)


KW = dict(sparsity=0.5, block_size=(4, 4), steps=4, lr=1e-2, init="magnitude", progress=False)


# -- 1. DistillCallback: a teacher in another floating dtype -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
def test_callback_teacher_in_other_dtype_gets_inputs_in_its_dtype(dtype):
    model = mlp()
    teacher = copy.deepcopy(model).to(dtype)
    cb = DistillCallback(sparsity=0.5, pattern="unstructured", init="magnitude", teacher=teacher,
                         dense_first_last=False)
    state = types.SimpleNamespace(global_step=0, max_steps=4)
    cb.on_train_begin(None, state, None, model=model)
    model.train()
    out = model(torch.randn(4, 16))
    assert out.dtype == torch.float32 and out.loss.requires_grad and torch.isfinite(out.loss)
    out.loss.backward()
    assert model[0].weight.grad is not None
    cb.on_train_end(None, state, None)


# -- 2. checkpoints: settings checked, malformed files refused, never overwritten ----------------------
@pytest.mark.parametrize("change", [dict(sparsity=0.75), dict(block_size=(2, 2)), dict(steps=6),
                                    dict(pattern="unstructured"), dict(seed=5)],
                         ids=["sparsity", "block_size", "steps", "pattern", "seed"])
def test_resume_with_other_settings_is_a_value_error_naming_them(tmp_path, change):
    ck = tmp_path / "run.safetensors"
    distill(mlp(), tensors(), checkpoint=ck, **KW)
    before = ck.read_bytes()
    model = mlp()
    ref = copy.deepcopy(model.state_dict())
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"other settings: .*\b{key}\b"):
        distill(model, tensors(), checkpoint=ck, **{**KW, **change})
    assert ck.read_bytes() == before  # the user's checkpoint is left as it was
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    distill(mlp(), tensors(), checkpoint=ck, **KW)  # the same settings still resume (the run is complete)


def test_checkpoint_without_settings_resumes_with_a_warning(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    ck = tmp_path / "run.safetensors"
    distill(mlp(), tensors(), checkpoint=ck, **KW)
    with safe_open(str(ck), "pt") as f:
        md, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(md["meta"])
    del meta["state"]["settings"]  # as written by an older sparseprune
    save_file(ts, str(ck), metadata={**md, "meta": json.dumps(meta)})
    with pytest.warns(UserWarning, match="records no distill settings"):
        distill(mlp(), tensors(), checkpoint=ck, **KW)


def _rewrite(path, tensors=None, meta=None, metadata=None):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        md, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(md["meta"])
    if meta is not None:
        meta(m)
    if tensors is not None:
        tensors(ts)
    md = {**md, "meta": json.dumps(m)}
    if metadata is not None:
        metadata(md)
    save_file(ts, str(path), metadata=md)


def _set(d, key, value):
    d[key] = value


CORRUPT = {
    "garbage": lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:200]),
    "meta-not-json": lambda p: _rewrite(p, metadata=lambda md: _set(md, "meta", "{oops")),
    "meta-missing": lambda p: _rewrite(p, metadata=lambda md: md.pop("meta")),
    "meta-a-list": lambda p: _rewrite(p, metadata=lambda md: _set(md, "meta", "[1, 2]")),
    "version-text": lambda p: _rewrite(p, metadata=lambda md: _set(md, "version", "one")),
    "step-a-string": lambda p: _rewrite(p, meta=lambda m: _set(m["state"], "step", "3")),
    "step-negative": lambda p: _rewrite(p, meta=lambda m: _set(m["state"], "step", -2)),
    "events-bad": lambda p: _rewrite(p, meta=lambda m: _set(m["state"], "events", [["a"]])),
    "settings-a-list": lambda p: _rewrite(p, meta=lambda m: _set(m["state"], "settings", [1])),
    "rng-wrong": lambda p: _rewrite(p, tensors=lambda t: _set(t, "rng/torch", torch.zeros(3))),
    "python-rng-wrong": lambda p: _rewrite(p, meta=lambda m: _set(m, "python_rng", [3, "x", None])),
    "optim-key": lambda p: _rewrite(p, tensors=lambda t: _set(t, "optim/x", torch.zeros(1))),
    "optim-groups": lambda p: _rewrite(p, meta=lambda m: _set(m, "optim_groups", [{"params": "no"}])),
    "mask-shape": lambda p: _rewrite(p, tensors=lambda t: _set(t, "model/0.weight_mask",
                                                                 torch.ones(3, 3, dtype=torch.bool))),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_malformed_checkpoint_is_a_clear_value_error(tmp_path, kind):
    ck = tmp_path / "run.safetensors"
    kw = {**KW, "steps": 8}
    first = mlp()
    first._n = [0]

    def stop(m):  # stop half way: the checkpoint holds an unfinished run (optimizer state, masks)
        first._n[0] += 1
        if first._n[0] == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        distill(first, tensors(), checkpoint=ck, checkpoint_every=0.0, eval_fn=stop, eval_every=1, **kw)
    CORRUPT[kind](ck)
    before = ck.read_bytes()
    model = mlp()
    ref = copy.deepcopy(model.state_dict())
    torch.manual_seed(11)
    want = torch.rand(4)
    torch.manual_seed(11)
    with pytest.raises(ValueError, match="checkpoint"):
        distill(model, tensors(), checkpoint=ck, **kw)
    assert ck.read_bytes() == before
    assert set(model.state_dict()) == set(ref)
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(torch.rand(4), want)


@pytest.mark.parametrize("content", [b"my notes, not a checkpoint", None], ids=["text", "other-safetensors"])
def test_resume_false_never_overwrites_a_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.safetensors"
    if content is None:
        from safetensors.torch import save_file
        save_file({"w": torch.ones(2)}, str(path))
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="checkpoint"):
        distill(mlp(), tensors(), checkpoint=path, resume=False, **KW)
    assert path.read_bytes() == before


def test_resume_false_starts_afresh_over_its_own_checkpoint(tmp_path):
    ck = tmp_path / "run.safetensors"
    distill(mlp(), tensors(), checkpoint=ck, **KW)
    model = distill(mlp(), tensors(), checkpoint=ck, resume=False, **{**KW, "sparsity": 0.75})
    assert model._sparseprune_distill["sparsity"] == 0.75


# -- 3. the demo's arguments --------------------------------------------------------------------------
@pytest.fixture
def demo_parts(monkeypatch):
    """The demo with its two parts replaced by recorders (nothing is trained or timed); the thread
    count is put back whatever the demo set."""
    from sparseprune import demo
    calls = []
    monkeypatch.setattr(demo, "ffn_part", lambda *a: calls.append(("ffn", a)))
    monkeypatch.setattr(demo, "digits_part", lambda *a: calls.append(("digits", a)))
    n = torch.get_num_threads()
    yield demo, calls
    torch.set_num_threads(n)


@pytest.mark.parametrize("value", ["-1", "0", "100000000", "two", "1.5"])
def test_demo_threads_out_of_range_is_an_argparse_error(demo_parts, capsys, value):
    demo, calls = demo_parts
    n = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        demo.main(["--threads", value])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err
    assert calls == [] and torch.get_num_threads() == n


def test_demo_threads_in_range_is_used(demo_parts):
    demo, calls = demo_parts
    demo.main(["--quick", "--threads", "1"])
    assert torch.get_num_threads() == 1 and [c[0] for c in calls] == ["ffn", "digits"]


def test_cli_demo_passes_its_options_to_the_demo(demo_parts, capsys):
    from sparseprune.cli import main
    demo, calls = demo_parts
    assert main(["demo", "--quick"]) == 0
    assert calls[-1] == ("digits", (True,))
    with pytest.raises(SystemExit) as e:
        main(["demo", "--threads", "-1"])
    assert e.value.code == 2 and "must be an integer in [1, 1024]" in capsys.readouterr().err


# -- 4. distill gives the caller's RNG states back -----------------------------------------------------
def _streams():
    return torch.rand(6), random.random()


@pytest.mark.parametrize("how", ["fresh", "resumed", "failed"])
def test_distill_leaves_the_global_rng_streams_as_they_were(tmp_path, how):
    ck = tmp_path / "run.safetensors"
    kw = dict(KW, dropout=None, seed=3)  # the model's dropout draws from torch's RNG during the run
    if how == "resumed":
        first = mlp(dropout=0.2)
        first._n = [0]

        def stop(m):
            first._n[0] += 1
            if first._n[0] == 2:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            distill(first, tensors(), checkpoint=ck, checkpoint_every=0.0, eval_fn=stop, eval_every=1, **kw)
    model = mlp(dropout=0.2)
    torch.manual_seed(1234)
    random.seed(99)
    want = _streams()
    torch.manual_seed(1234)
    random.seed(99)
    if how == "failed":
        def bad_loss(s, t, b):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            distill(model, tensors(), loss=bad_loss, **kw)
    else:
        distill(model, tensors(), checkpoint=ck if how == "resumed" else None, **kw)
        assert model._sparseprune_distill["steps"] == 4
    got = _streams()
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_distill_is_still_deterministic_for_a_seed():
    kw = dict(KW, dropout=None, seed=7)
    a, b = mlp(dropout=0.3), mlp(dropout=0.3)
    torch.manual_seed(1)
    distill(a, tensors(), **kw)
    torch.manual_seed(2)
    distill(b, tensors(), **kw)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
