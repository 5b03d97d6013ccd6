"""Channel pruning side by side with Torch-Pruning: ResNet-50, MobileNetV2, ViT-base, BERT-base,
ConvNeXt-tiny and Swin-tiny (transformers implementations, random init, batch 1; 224x224 images, 128
tokens), both libraries at the same settings: 50% of the channels of every group, L1 importance, the
classifier's outputs kept. Reported per library: parameters, MACs, latency and speedup against the
dense model timed in the same process with the same thread count (round-robin in random order), and the time pruning took.

Each library keeps its own default for attention: sparseprune removes whole heads, Torch-Pruning
shrinks every head (``prune_head_dims=True``); both remove half of the attention width.

    pytest bench/bench_channels_tp.py                 # pytest-benchmark entries (each variant timed on its own)
    pytest bench/bench_channels_tp.py --quick         # smoke run: MobileNetV2 only
    python bench/bench_channels_tp.py [--quick] [--out FILE] [--models resnet50,vit-base]
        # variants timed round-robin; a full run writes bench/results/channels_tp.md
    python bench/bench_channels_tp.py --compile --models resnet50   # torch.compile(fullgraph) first-call time

Torch-Pruning is the optional extra ``torch-pruning``; its rows are skipped when it is absent.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparseprune as sp  # noqa: E402
from sparseprune._inputs import call_model  # noqa: E402
from sparseprune.prune import graph  # noqa: E402

RATIO = 0.5
NAMES = ["resnet50", "mobilenetv2", "vit-base", "bert-base", "convnext-tiny", "swin-tiny"]
QUICK_NAMES = ["mobilenetv2"]
IMPLS = ["dense", "sparseprune", "torch-pruning"]
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "channels_tp.md")


# ------------------------------------------------------------------------------------------ models
def build(name):
    """(model in eval mode, example_inputs of one call), same weights for every call."""
    import transformers as T
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    img = torch.randn(1, 3, 224, 224)
    if name == "resnet50":
        return T.ResNetForImageClassification(T.ResNetConfig()).eval(), img
    if name == "mobilenetv2":
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config()).eval(), img
    if name == "vit-base":
        return T.ViTForImageClassification(T.ViTConfig()).eval(), img
    if name == "convnext-tiny":
        return T.ConvNextForImageClassification(T.ConvNextConfig()).eval(), img
    if name == "swin-tiny":
        return T.SwinForImageClassification(T.SwinConfig()).eval(), img
    if name == "bert-base":
        cfg = T.BertConfig()
        ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        return T.BertForSequenceClassification(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    raise ValueError(name)


def classifier(model):
    return model.classifier


def _qkv(m):
    """q, k, v projections of a Hugging Face attention module (BERT: query/key/value, ViT/Swin: q_proj...)."""
    if hasattr(m, "query"):
        return m.query, m.key, m.value
    return m.q_proj, m.k_proj, m.v_proj


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "num_attention_heads", None), int)
            and (hasattr(m, "query") or hasattr(m, "q_proj"))]


def head_shapes(model):
    """{(heads, head dim)} over the model's attention modules."""
    return sorted({(m.num_attention_heads, _qkv(m)[0].out_features // m.num_attention_heads)
                   for m in _attention_modules(model)})


# ------------------------------------------------------------------------------------------ pruning
def prune_sparseprune(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sp.prune_channels(model, x, RATIO, importance="l1", keep_outputs=[classifier(model)])


def prune_torch_pruning(model, x):
    import torch_pruning as tp
    attn = _attention_modules(model)
    heads = {lin: m.num_attention_heads for m in attn for lin in _qkv(m)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=RATIO,
            ignored_layers=[classifier(model)], num_heads=heads, output_transform=lambda out: out.logits)
        pruner.step()
    for m in attn:  # Torch-Pruning leaves the modules' own head bookkeeping to the user
        q = _qkv(m)[0]
        m.num_attention_heads = pruner.num_heads[q]
        for attr in ("attention_head_size", "head_dim"):
            if hasattr(m, attr):
                setattr(m, attr, q.out_features // m.num_attention_heads)
        if hasattr(m, "all_head_size"):
            m.all_head_size = q.out_features
    return model


PRUNERS = {"sparseprune": prune_sparseprune, "torch-pruning": prune_torch_pruning}


def have_torch_pruning():
    try:
        import torch_pruning  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------ measures
def count_macs(model, x):
    return sum(graph.module_macs(model, x)[0].values())


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def run_once(model, x):
    with torch.no_grad():
        return call_model(model, x)


def latency(model, x, budget=2.0, min_reps=5):
    """Median seconds of one forward pass (no grad), after warm-up."""
    run_once(model, x)
    times = []
    end = time.perf_counter() + budget
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        run_once(model, x)
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def interleaved_latency(models, budget=6.0, min_rounds=5, seed=0):
    """Median seconds of one forward pass of each (model, inputs). Rounds visit the models in a random
    order, and each timed call follows an untimed call of the same model: no variant pays for the cache
    state its predecessor left (the dense model would otherwise always slow down the one after it)."""
    import random
    rng = random.Random(seed)
    for m, x in models:
        run_once(m, x)
    times = [[] for _ in models]
    order = list(range(len(models)))
    end = time.perf_counter() + budget
    while len(times[0]) < min_rounds or (time.perf_counter() < end and len(times[0]) < 200):
        rng.shuffle(order)
        for i in order:
            m, x = models[i]
            run_once(m, x)
            t0 = time.perf_counter()
            run_once(m, x)
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(ts), min(ts)) for ts in times]


def prepare(name, impl):
    """Build, prune (timed) and check the model. Returns (model, x, row)."""
    model, x = build(name)
    row = dict(model=name, impl=impl, prune_s=0.0)
    if impl != "dense":
        t0 = time.perf_counter()
        PRUNERS[impl](model, x)
        row["prune_s"] = time.perf_counter() - t0
        model.eval()
    out = run_once(model, x)
    row.update(params=count_params(model), macs=count_macs(model, x),
               out_shape=tuple(getattr(out, "logits", out).shape), heads=head_shapes(model))
    return model, x, row


# ------------------------------------------------------------------------------------------ table
from sparseprune.convert.cache import cpu_model  # noqa: E402  (one definition of the CPU model string)


def table(rows, threads=None):
    """Markdown: one line per model and library, dense first."""
    threads = threads or torch.get_num_threads()
    lines = [f"Channel pruning, sparseprune vs Torch-Pruning: ratio {RATIO}, L1 importance, classifier outputs "
             f"kept, batch 1, {threads} threads, {cpu_model()}, torch {torch.__version__}.", "",
             "| model | library | params (M) | MACs (G) | MACs kept | heads x dim | latency (ms) | min (ms) | speedup | "
             "prune time (s) |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = {r["impl"]: r for r in rows if r["model"] == name}
        dense = rs.get("dense")
        for impl in IMPLS:
            r = rs.get(impl)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {impl} | fails: {r['error'][:90]} | | | | | | | |")
                continue
            kept = f"{r['macs'] / dense['macs']:.3f}" if dense else ""
            sp_ = f"{dense['latency_s'] / r['latency_s']:.2f}x" if dense else ""
            pt = "" if impl == "dense" else f"{r['prune_s']:.2f}"
            hd = ", ".join(f"{h}x{d}" for h, d in r.get("heads", []))
            same = " (same weights)" if r.get("identical") else ""
            mn = f"{r['latency_min_s'] * 1e3:.1f}" if "latency_min_s" in r else ""
            lines.append(f"| {name} | {impl}{same} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | {kept} | {hd} | "
                         f"{r['latency_s'] * 1e3:.1f} | {mn} | {sp_} | {pt} |")
    return "\n".join(lines) + "\n"


def write_table(rows, path=RESULTS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("# Channel pruning: sparseprune vs Torch-Pruning\n\nProduced by `bench/bench_channels_tp.py`.\n\n")
        f.write(table(rows))
        f.write("\nMACs: conv / linear / matmul / attention multiply-accumulates of one call, counted the same way for "
                "both (`sparseprune.prune.graph.module_macs`). Latency: median (and min) of one forward pass (no grad), the "
                "variants of a model timed round-robin in one process. Speedup: dense latency / pruned latency. "
                "\"(same weights)\": the two libraries' pruned models have equal state_dicts (same architecture, "
                "bit-identical weights), so any latency difference between them is timing noise. "
                "Prune time: wall time of the pruning call (tracing, scoring, surgery, checks). Attention: "
                "sparseprune removes whole heads by default (`prune_head_dims=True` shrinks every head instead), "
                "Torch-Pruning shrinks every head by default; both remove half of the attention width.\n")


# ------------------------------------------------------------------------------------------ pytest
try:
    if __name__ == "__main__":
        raise ImportError("run as a script")
    import pytest
    from conftest import measure
except ImportError:  # plain script use
    pytest = None

if pytest is not None:
    pytest.importorskip("transformers")
    _ROWS = []  # the table file comes from the script (round-robin timing); pytest records its entries

    @pytest.mark.parametrize("name,impl", [(n, i) for n in NAMES for i in IMPLS], ids=lambda v: v)
    def test_channels_vs_torch_pruning(benchmark, quick, name, impl):
        if quick and name not in QUICK_NAMES:
            pytest.skip("--quick: one small model only")
        if impl == "torch-pruning" and not have_torch_pruning():
            pytest.skip("torch-pruning not installed (optional extra 'torch-pruning')")
        try:
            model, x, row = prepare(name, impl)
        except Exception as e:
            if impl != "torch-pruning":
                raise
            _ROWS.append(dict(model=name, impl=impl, error=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            pytest.skip(f"Torch-Pruning fails on {name}: {type(e).__name__}")
        with torch.no_grad():
            med = measure(benchmark, lambda: call_model(model, x), group=f"channels-tp {name}", impl=impl,
                          dense_flops=2 * row["macs"], quick=quick, budget=4.0, model=name, params=row["params"],
                          macs=row["macs"], prune_s=row["prune_s"])
        row["latency_s"] = med
        _ROWS.append(row)
        if impl != "dense":
            assert row["params"] < count_params(build(name)[0])


# ------------------------------------------------------------------------------------------ compile time
def _compile_child(name, impl, threads):
    """In a fresh process with an empty inductor cache: prune, then time the first call of
    ``torch.compile(model, fullgraph=True)`` (tracing + code generation + the run) and a second call."""
    if threads:
        torch.set_num_threads(threads)
    model, x, row = prepare(name, impl)
    fn = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        call_model(fn, x)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        call_model(fn, x)
        second = time.perf_counter() - t0
    print("RESULT", {"model": name, "impl": impl, "first_call_s": first, "second_call_s": second,
                     "params": row["params"], "macs": row["macs"]}, flush=True)


def compile_times(names, impls, threads=None):
    """torch.compile(fullgraph=True) first-call time of each pruned model, each in its own process with
    its own empty ``TORCHINDUCTOR_CACHE_DIR`` (a warm cache from an earlier model of the same
    architecture would otherwise make the second one look several times faster)."""
    import ast
    import subprocess
    import sys
    import tempfile
    out = []
    for name in names:
        for impl in impls:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache)
                code = (f"import sys; sys.path.insert(0, {HERE!r}); import bench_channels_tp as b; "
                        f"b._compile_child({name!r}, {impl!r}, {threads!r})")
                p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not lines:
                tail = (p.stderr.strip().splitlines() or ["?"])[-1]
                out.append({"model": name, "impl": impl, "error": tail})
            else:
                out.append(ast.literal_eval(lines[-1][len("RESULT "):]))
            print(out[-1], flush=True)
    return out


# ------------------------------------------------------------------------------------------ script
def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MobileNetV2 only, short timings, nothing written")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(NAMES))
    ap.add_argument("--out", default=None, help=f"markdown file to write (default {RESULTS} for a full run)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SPARSEPRUNE_BENCH_THREADS", "0")) or None)
    ap.add_argument("--compile", action="store_true",
                    help="time torch.compile(fullgraph=True) first calls (fresh inductor cache per model) instead")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.models.split(",") if a.models else (QUICK_NAMES if a.quick else NAMES)
    impls = IMPLS if have_torch_pruning() else IMPLS[:2]
    if a.compile:
        rows = compile_times(names, impls[1:], a.threads)
        print("| model | library | first call (s) | second call (ms) |\n|---|---|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['impl']} | " + (f"{r['first_call_s']:.1f} | {r['second_call_s'] * 1e3:.1f} |"
                                                       if "error" not in r else f"fails: {r['error']} | |"))
        return
    rows = []
    for name in names:
        ready = []
        for impl in impls:
            try:
                model, x, row = prepare(name, impl)
            except Exception as e:
                if impl != "torch-pruning":
                    raise
                rows.append(dict(model=name, impl=impl, error=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
                print(rows[-1], flush=True)
                continue
            ready.append((model, x, row))
        # time the variants of one model in alternation, so that load changes hit them alike
        lat = interleaved_latency([(m, x) for m, x, _ in ready], budget=1.0 if a.quick else 5.0 * len(ready))
        by = {row["impl"]: m for m, _, row in ready}
        if "sparseprune" in by and "torch-pruning" in by:
            sa, sb = by["sparseprune"].state_dict(), by["torch-pruning"].state_dict()
            same = sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
            for _, _, row in ready:
                row["identical"] = same and row["impl"] != "dense"
        for (_, _, row), (t, tmin) in zip(ready, lat):
            row["latency_s"], row["latency_min_s"] = t, tmin
            rows.append(row)
            print(row, flush=True)
        del ready
    print(table(rows))
    out = a.out or (RESULTS if not a.quick and names == NAMES else None)
    if out:
        write_table(rows, out)
        print("wrote", out)


if __name__ == "__main__":
    main()
