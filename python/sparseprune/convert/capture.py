"""One forward pass of ``example_inputs`` that records what each layer receives, and which layers'
weights are also read outside their own forward (tied weights, ``F.linear(x, self.lin.weight)``):
those must stay the dense module they are."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Set, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .._inputs import call_model

__all__ = ["capture", "static_weight_reads", "tied_weights", "flat_tensors", "max_error", "relative", "l2_relative"]

_MAX_SHAPES_SEEN = 8


class _WeightReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.watch: Dict[int, str] = {}
        self.held: List[Tensor] = []  # watched tensors stay alive: a freed one's id could be reused
        self.active: List[str] = []
        self.outside: Set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch:
            for a in tree_leaves((args, kwargs)):
                name = self.watch.get(id(a)) if isinstance(a, Tensor) else None
                if name is not None and name not in self.active:
                    self.outside.add(name)
        return func(*args, **kwargs)


def _weight_of(m: nn.Module):
    from ..nn import SparseModule
    if isinstance(m, SparseModule):
        return m._buffers.get("weight")  # a packed layer's .weight is rebuilt per access: not watched
    return getattr(m, "weight", None)


def capture(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]], example_inputs
            ) -> Tuple[Dict[str, Dict[Tuple, List]], Set[str]]:
    """``(inputs, read_outside)``: for each layer the input tensors it received, one copy per distinct
    shape (at most 8) with call counts; and the layers whose weight something else also computed with."""
    captured: Dict[str, Dict[Tuple, List]] = {}
    reads = _WeightReads()
    hooks = []
    for name, m in layers:
        def pre(mod, args, _name=name):
            reads.active.append(_name)  # first of the pre-hooks: a mask's own hook counts as inside
            if args and isinstance(args[0], Tensor):
                seen = captured.setdefault(_name, {})
                key = tuple(args[0].shape)
                if key in seen:
                    seen[key][1] += 1
                elif len(seen) < _MAX_SHAPES_SEEN:
                    seen[key] = [args[0].detach().clone(), 1]

        def watch(mod, args, _name=name):
            w = _weight_of(mod)
            if isinstance(w, Tensor):
                reads.watch[id(w)] = _name  # after masks / parametrizations computed it
                reads.held.append(w)

        def post(mod, args, out, _name=name):
            if reads.active and reads.active[-1] == _name:
                reads.active.pop()
        w = _weight_of(m)
        if isinstance(w, Tensor):
            reads.watch[id(w)] = name
            reads.held.append(w)
        hooks.append(m.register_forward_pre_hook(pre, prepend=True))
        hooks.append(m.register_forward_pre_hook(watch))
        hooks.append(m.register_forward_hook(post))
    try:
        with reads:
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured, reads.outside


def static_weight_reads(model: nn.Module, names: Sequence[str]) -> Set[str]:
    """Without example inputs: the layers among ``names`` whose ``.weight`` the traced forward reads
    directly (a ``get_attr`` node). Models that do not trace report nothing (a converted layer still
    answers ``.weight``, slowly, see ``SparseModule.weight``)."""
    from ..fold import trace_graph
    graph, _ = trace_graph(model)  # the modules as they were after (no Proxy left in a stored attribute)
    if graph is None:  # untraceable forward: nothing known
        return set()
    wanted = {f"{n}.weight": n for n in names}
    return {wanted[node.target] for node in graph.nodes if node.op == "get_attr" and node.target in wanted}


def tied_weights(model: nn.Module, names: Sequence[str]) -> Set[str]:
    """Without example inputs: the layers among ``names`` whose weight Parameter another module of ``model`` also
    holds (tied weights: a language model's embedding and head). A packed copy would untie them: the head no longer
    follows the embedding, and Hugging Face's ``tie_weights()`` (run by ``resize_token_embeddings``,
    ``post_init``...) fails on the packed layer's ``weight``."""
    holders: Dict[int, int] = {}
    for m in model.modules():  # each module once, under however many names it has
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    out = set()
    for n in names:
        w = model.get_submodule(n)._parameters.get("weight")
        if w is not None and holders.get(id(w), 0) > 1:
            out.add(n)
    return out


def flat_tensors(out) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flat_tensors(out.to_tuple())
    return []


def max_error(actual, expected) -> Tuple[float, float]:
    """(max abs error, largest reference magnitude) over every output tensor; NaN/inf must agree."""
    a, e = flat_tensors(actual), flat_tensors(expected)
    if len(a) != len(e):
        return math.inf, 0.0
    err, scale = 0.0, 0.0
    for x, y in zip(a, e):
        if x.shape != y.shape:
            return math.inf, 0.0
        if x.device.type == "meta" or y.device.type == "meta":
            continue
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return math.inf, 0.0
            continue
        x, y = x.detach(), y.detach()
        fy, fx = torch.isfinite(y), torch.isfinite(x)
        finite = bool(fy.all())
        if not torch.equal(fx, fy) or (not finite and not torch.equal(x[~fy].nan_to_num(0.0), y[~fy].nan_to_num(0.0))):
            return math.inf, 0.0
        if y.numel() and (finite or fy.any()):
            if not finite:  # compare the finite entries (boolean indexing copies: only when needed)
                x, y = x[fy], y[fy]
            x, y = x.double(), y.double()
            err = max(err, float((x - y).abs().max()))
            scale = max(scale, float(y.abs().max()))
    return err, scale


def l2_relative(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over every floating output (finite entries): the error
    measure for quantized layers, whose max-abs error on a few outlier activations says little."""
    a, e = flat_tensors(actual), flat_tensors(expected)
    if len(a) != len(e):
        return math.inf
    num = den = 0.0
    for x, y in zip(a, e):
        if x.shape != y.shape:
            return math.inf
        if not (x.is_floating_point() and y.is_floating_point()) or x.device.type == "meta":
            continue
        x, y = x.detach().double(), y.detach().double()
        fin = torch.isfinite(y) & torch.isfinite(x)
        num += float(((x - y)[fin] ** 2).sum())
        den += float((y[fin] ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def relative(err: float, scale: float) -> float:
    return err / scale if scale > 0 else err


def first_calls(model: nn.Module, modules: Sequence[Tuple[str, nn.Module]], example_inputs) -> Dict[str, tuple]:
    """``(args, kwargs)`` of each module's first call in one call of ``model`` on ``example_inputs`` (modules
    that did not run are absent)."""
    seen: Dict[str, tuple] = {}

    def hook(name):
        def fn(mod, args, kwargs):
            if name not in seen:
                seen[name] = (tuple(args), dict(kwargs))
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules]
    try:
        call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def first_inputs(model: nn.Module, modules: Sequence[Tuple[str, nn.Module]], example_inputs) -> Dict[str, Tensor]:
    """The tensor each module received as its first positional argument the first time it ran in one call
    of ``model`` on ``example_inputs`` (modules that did not run, or got something else, are absent)."""
    return {n: args[0] for n, (args, _) in first_calls(model, modules, example_inputs).items()
            if args and type(args[0]) is Tensor}
