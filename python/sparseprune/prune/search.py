"""Choosing a plan from measurements: plan search (accuracy vs *measured* latency) and per-layer
sensitivity analysis (metric vs sparsity per layer, used to allocate per-layer sparsities).

    result = search_plans(model, evaluate, example_inputs)       # evaluate(model) -> float
    print(result.table()); result.plot("pareto.png"); best = result.pareto()[0]

    sens = sensitivity(model, evaluate, sparsities=(0.5, 0.75, 0.9))
    alloc = sens.allocate(0.8)                                    # {layer: sparsity}, overall 80%
    prune_unstructured(model, alloc)

Each plan is applied to a copy of the model, optionally fine-tuned (``finetune(model)``), converted
to sparse modules and timed on ``example_inputs`` against the dense model in the same process and
thread count; ``evaluate`` runs on the converted model (what the user would deploy).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


from .masks import apply_mask, get_mask, remove_masks
from .patterns import (check_block_size, check_nm, check_sparsity, prune_blocks, prune_nm, prune_unstructured,
                       select_layers)

__all__ = ["Plan", "PlanResult", "SearchResult", "default_plans", "search_plans",
           "measure_latency", "Sensitivity", "sensitivity"]


@dataclass
class Plan:
    """One pruning plan: ``pattern`` in dense | unstructured | blocks | nm, its parameters and any extra
    prune keyword arguments (importance, overrides, scope, a per-layer sparsity dict, ...)."""
    pattern: str
    sparsity: object = 0.0
    block_size: Tuple[int, int] = (16, 16)
    n: int = 2
    m: int = 4
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.pattern not in ("dense", "unstructured", "blocks", "nm"):
            raise ValueError(f"Plan.pattern must be dense | unstructured | blocks | nm, got {self.pattern!r}")
        if self.pattern == "blocks":
            self.block_size = check_block_size(self.block_size)
        if self.pattern == "nm":
            self.n, self.m = check_nm(self.n, self.m)
        if self.pattern in ("unstructured", "blocks") and not isinstance(self.sparsity, dict):
            self.sparsity = check_sparsity(self.sparsity)

    @property
    def name(self) -> str:
        s = "per-layer" if isinstance(self.sparsity, dict) else f"{self.sparsity:.0%}"
        if self.pattern == "dense":
            return "dense"
        if self.pattern == "nm":
            return f"{self.n}:{self.m}"
        if self.pattern == "blocks":
            return f"blocks {self.block_size[0]}x{self.block_size[1]} {s}"
        return f"unstructured {s}"

    def apply(self, model: nn.Module) -> nn.Module:
        if self.pattern == "unstructured":
            return prune_unstructured(model, self.sparsity, **self.kwargs)
        if self.pattern == "blocks":
            return prune_blocks(model, self.sparsity, self.block_size, **self.kwargs)
        if self.pattern == "nm":
            return prune_nm(model, self.n, self.m, **self.kwargs)
        return model


def default_plans(**prune_kw) -> List[Plan]:
    plans = [Plan("dense")]
    for s in (0.5, 0.8, 0.9):
        plans += [Plan("blocks", s, (16, 16), kwargs=dict(prune_kw)), Plan("blocks", s, (8, 8), kwargs=dict(prune_kw)),
                  Plan("unstructured", s, kwargs=dict(prune_kw))]
    plans.append(Plan("nm", kwargs=dict(prune_kw)))
    return plans


def _default_converter(model, example_inputs, plan):
    from ..convert import convert
    return convert(model, example_inputs)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs, forward: Optional[Callable] = None, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time (ms) of one call of ``model`` on ``example_inputs`` (``forward(model, inputs)``
    if given), eval mode, timed by the library's one timing helper."""
    from .._inputs import call_model
    from ..convert.timing import time_calls

    was = model.training
    model.eval()
    run = (lambda: forward(model, example_inputs)) if forward is not None else (lambda: call_model(model, example_inputs))
    try:
        t = time_calls({"model": run}, 0.0, min_reps=repeats, max_reps=repeats, warmup=warmup)["model"]
    finally:
        model.train(was)
    return t * 1e3


@dataclass
class PlanResult:
    plan: Plan
    metric: float
    latency_ms: float
    dense_latency_ms: float
    sparsity: float

    @property
    def speedup(self) -> float:
        return self.dense_latency_ms / self.latency_ms if self.latency_ms > 0 else math.inf


class SearchResult(list):
    """A list of :class:`PlanResult` with a table, the Pareto front and a plot."""

    def __init__(self, results, higher_is_better=True, threads=None):
        super().__init__(results)
        self.higher_is_better = higher_is_better
        self.threads = threads

    def _better(self, a, b) -> bool:
        return a > b if self.higher_is_better else a < b

    def pareto(self) -> List[PlanResult]:
        """Plans no other plan beats on both metric and latency, fastest first. A plan whose metric or
        latency is NaN (a broken model) is never on the front."""
        front = []
        ok = [r for r in self if not (math.isnan(r.metric) or math.isnan(r.latency_ms))]
        for r in ok:
            dominated = any((self._better(o.metric, r.metric) or o.metric == r.metric) and o.latency_ms <= r.latency_ms
                            and (self._better(o.metric, r.metric) or o.latency_ms < r.latency_ms) for o in ok)
            if not dominated:
                front.append(r)
        return sorted(front, key=lambda r: r.latency_ms)

    def table(self) -> str:
        front = {id(r) for r in self.pareto()}
        lines = [f"| plan | sparsity | metric | latency ms | speedup vs dense | pareto |  (threads={self.threads})",
                 "|---|---|---|---|---|---|"]
        for r in self:
            lines.append(f"| {r.plan.name} | {r.sparsity:.2f} | {r.metric:.4f} | {r.latency_ms:.3f} | "
                         f"{r.speedup:.2f}x | {'*' if id(r) in front else ''} |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Metric vs measured latency, Pareto front highlighted; writes a PNG, returns the path."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([r.latency_ms for r in self], [r.metric for r in self], c="tab:gray")
        for r in self:
            ax.annotate(r.plan.name, (r.latency_ms, r.metric), fontsize=7)
        front = self.pareto()
        ax.plot([r.latency_ms for r in front], [r.metric for r in front], "o-", c="tab:red", label="Pareto front")
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("metric")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def search_plans(model: nn.Module, evaluate: Callable[[nn.Module], float], example_inputs, plans=None,
                 finetune: Optional[Callable[[nn.Module], object]] = None, converter: Optional[Callable] = None,
                 forward: Optional[Callable] = None, repeats: int = 10, higher_is_better: bool = True,
                 num_threads: Optional[int] = None) -> SearchResult:
    """Try each plan on a copy of ``model``: prune, ``finetune(copy)`` if given, convert
    (``converter(model, example_inputs, plan)``; default ``sparseprune.convert``), ``evaluate`` the
    converted model and time it on ``example_inputs`` (one call of the model). The dense model is timed in the same process and thread count."""
    if not callable(evaluate):
        raise TypeError("evaluate must be a callable(model) -> float")
    plans = default_plans() if plans is None else list(plans)
    if not plans or not all(isinstance(p, Plan) for p in plans):
        raise TypeError("plans must be a non-empty list of Plan")
    converter = converter or _default_converter
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        dense_ms = measure_latency(model, example_inputs, forward, repeats)
        results = []
        for plan in plans:
            work = plan.apply(copy.deepcopy(model))
            if finetune is not None and plan.pattern != "dense":
                finetune(work)
            layers = select_layers(work, dense_first_last=False)
            total = sum(m.weight.numel() for m in layers.values())
            zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
            fast = converter(work, example_inputs, plan) if plan.pattern != "dense" else work
            ms = measure_latency(fast, example_inputs, forward, repeats)
            results.append(PlanResult(plan, float(evaluate(fast)), ms, dense_ms, zeros / max(total, 1)))
        return SearchResult(results, higher_is_better, torch.get_num_threads())
    finally:
        torch.set_num_threads(old_threads)


# -- sensitivity ------------------------------------------------------------------------------------
def _check_baseline(baseline: float) -> None:
    if math.isnan(baseline):
        raise ValueError("evaluate returned NaN on the unpruned model: no metric loss can be measured against it")


class Sensitivity:
    """Per-layer metric-vs-sparsity curves (``curves[layer] = [(sparsity, metric), ...]``)."""

    def __init__(self, baseline: float, curves: Dict[str, List[Tuple[float, float]]], sizes: Dict[str, int],
                 higher_is_better: bool = True):
        self.baseline, self.curves, self.sizes, self.higher_is_better = baseline, curves, sizes, higher_is_better

    def drop(self, layer: str) -> List[Tuple[float, float]]:
        """(sparsity, metric loss vs dense) made non-decreasing in sparsity, starting at (0, 0). A NaN
        metric (the pruned model broke) is the worst loss: ``inf`` from that sparsity on."""
        _check_baseline(self.baseline)
        pts, worst = [(0.0, 0.0)], 0.0
        for s, v in sorted(self.curves[layer], key=lambda p: p[0]):
            d = (self.baseline - v) if self.higher_is_better else (v - self.baseline)
            worst = max(worst, math.inf if math.isnan(d) else d)
            pts.append((s, worst))
        return pts

    def _max_sparsity(self, layer: str, tol: float) -> float:
        pts = self.drop(layer)
        best = 0.0
        for (s0, d0), (s1, d1) in zip(pts, pts[1:]):
            if d1 <= tol:
                best = s1
            elif d0 <= tol:
                best = s0 + (s1 - s0) * (tol - d0) / (d1 - d0)
                break
            else:
                break
        return best

    def allocate(self, target: float, iters: int = 60) -> Dict[str, float]:
        """Per-layer sparsities whose parameter-weighted mean is ``target``, giving each layer as much
        sparsity as one common tolerance on its metric loss allows (bisection on the tolerance)."""
        target = check_sparsity(target, "target")
        total = sum(self.sizes.values())

        def overall(tol):
            return sum(self._max_sparsity(n, tol) * self.sizes[n] for n in self.curves) / total
        # infinite losses (NaN metrics) are never tolerated: bisect up to the largest finite one
        hi = max(d for n in self.curves for _, d in self.drop(n) if d < math.inf) + 1e-9
        # (a target equal to the top measured sparsity may sit a rounding error above the weighted mean)
        if overall(hi) < target - 1e-9:
            raise ValueError(f"target {target} exceeds what the measured curves reach ({overall(hi):.3f}); "
                             "measure higher sparsities")
        lo = 0.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if overall(mid) < target else (lo, mid)
        alloc = {n: self._max_sparsity(n, hi) for n in self.curves}
        # bisection overshoots by a hair: scale down so the overall is the target
        got = sum(alloc[n] * self.sizes[n] for n in alloc) / total
        if got > 0:
            alloc = {n: min(max(s * target / got, 0.0), 1.0) for n, s in alloc.items()}
        return alloc

    def table(self) -> str:
        sp = sorted({s for c in self.curves.values() for s, _ in c})
        lines = ["| layer | params | " + " | ".join(f"{s:.0%}" for s in sp) + " |",
                 "|---|---|" + "---|" * len(sp), f"| (dense) | - | {self.baseline:.4f} |"]
        for n, c in self.curves.items():
            d = dict(c)
            lines.append(f"| {n} | {self.sizes[n]} | " + " | ".join(f"{d.get(s, float('nan')):.4f}" for s in sp) + " |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for n, c in self.curves.items():
            c = sorted(c)
            ax.plot([0.0] + [s for s, _ in c], [self.baseline] + [v for _, v in c], "o-", label=n, markersize=3)
        ax.set_xlabel("layer sparsity")
        ax.set_ylabel("metric")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float], sparsities: Sequence[float] = (0.5, 0.75, 0.9),
                pattern: str = "unstructured", block_size=(16, 16), layers=None, exclude=None, dense_first_last=None,
                higher_is_better: bool = True, **prune_kw) -> Sensitivity:
    """Prune one layer at a time to each sparsity (on a copy of ``model``), ``evaluate`` it, restore."""
    if pattern not in ("unstructured", "blocks"):
        raise ValueError(f"pattern must be 'unstructured' or 'blocks', got {pattern!r}")
    sparsities = [check_sparsity(s) for s in sparsities]
    if pattern == "blocks":
        prune_kw.setdefault("misfit", "shrink")  # a layer smaller than the block is measured on smaller blocks
    work = copy.deepcopy(model)
    baseline = float(evaluate(work))
    _check_baseline(baseline)
    chosen = select_layers(work, layers, exclude, dense_first_last)
    curves, sizes = {}, {}
    for name, mod in chosen.items():
        w0, m0 = mod.weight.detach().clone(), get_mask(mod)
        m0 = m0.clone() if m0 is not None else None
        curves[name], sizes[name] = [], mod.weight.numel()
        for s in sparsities:
            if pattern == "blocks":
                prune_blocks(work, s, block_size, layers=[name], **prune_kw)
            else:
                prune_unstructured(work, s, layers=[name], **prune_kw)
            curves[name].append((s, float(evaluate(work))))
            remove_masks(mod)
            with torch.no_grad():
                mod.weight.copy_(w0)
            if m0 is not None:
                apply_mask(mod, m0)
    return Sensitivity(baseline, curves, sizes, higher_is_better)
