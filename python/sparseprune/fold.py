"""Fold eval-mode BatchNorm into the convolution that feeds it.

``bn(conv(x)) == conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta`` per output channel,
``s = gamma / sqrt(var + eps)``. Scaling a whole output channel keeps the zero pattern, so folding
before packing costs sparse layers nothing; a conv that is already sparse is unpacked, folded and
packed again in the same format and weight dtype.

Pairs are found on the ``torch.fx`` graph (a conv whose only user is a BatchNorm, each module called
once, the conv's output not stored on a module, the BatchNorm's attributes not read by hand) and, with
example inputs, proven by one run of them (which also sees a conv output kept anywhere else); models
that do not trace and come without example inputs fall back to ``nn.Sequential`` neighbours, where the
conv's output can only reach the next module.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._modules import set_module

__all__ = ["fold_batchnorm", "fold_conv_bn", "find_conv_bn_pairs"]

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _is_conv(m: nn.Module) -> bool:
    from .nn import SparseConv2d
    return type(m) in _CONV_BN or type(m) is SparseConv2d


def _bn_matches(conv: nn.Module, bn: nn.Module) -> bool:
    want = _CONV_BN.get(type(conv), nn.BatchNorm2d)
    if type(bn) is not want or bn.training or not bn.track_running_stats:
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    out = getattr(conv, "out_channels", None)
    return out == bn.num_features


def _plain_copy(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A fresh conv of ``conv``'s configuration holding ``weight`` / ``bias``: no masks, hooks or
    parametrizations come along (the masks are baked into ``weight``)."""
    new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                     padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    new.bias.requires_grad_(conv.weight.requires_grad)
    new.train(conv.training)
    return new


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv module computing ``bn(conv(x))`` for eval-mode ``bn`` (the inputs are not changed).
    A masked conv's mask is baked into the folded weight (scaling an output channel keeps its zeros)."""
    from .nn import SparseConv2d
    from .prune.masks import get_mask

    if not _is_conv(conv):
        raise TypeError(f"fold_conv_bn: expected a convolution, got {type(conv).__name__}")
    if not _bn_matches(conv, bn):
        raise ValueError("fold_conv_bn: the BatchNorm must be in eval mode, track running stats and match "
                         "the conv's output channels")
    sparse = isinstance(conv, SparseConv2d)
    if sparse and conv.activation != "none":
        raise ValueError(f"fold_conv_bn: the conv applies a fused {conv.activation} before the BatchNorm; "
                         "fold before fusing activations")
    dense = conv.to_dense_module() if sparse else conv
    w = dense.weight.detach()
    mask = get_mask(dense)
    if mask is not None:
        w = w.masked_fill(~mask.to(w.device), 0)
    scale = bn.running_var.to(torch.float64).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    bias = dense.bias.detach().to(torch.float64) if dense.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.to(torch.float64)) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().to(torch.float64)
    shape = (-1,) + (1,) * (w.dim() - 1)
    folded = _plain_copy(dense, (w.to(torch.float64) * scale.reshape(shape)).to(w.dtype),
                         bias.to(w.dtype).to(w.device))
    if sparse:
        return SparseConv2d.from_dense(folded, format=conv.format, block_size=conv.block_size,
                                       num_threads=conv.num_threads, weight_dtype=conv.weight_dtype)
    return folded


class _LeafTracer(torch.fx.Tracer):
    """Treat every torch.nn and sparseprune module as a leaf (their forwards need not trace)."""

    def is_leaf_module(self, m, qualname):
        mod = type(m).__module__
        return super().is_leaf_module(m, qualname) or mod.startswith("sparseprune.")


@contextlib.contextmanager
def restoring_state(model: nn.Module):
    """Around an fx trace of ``model``: yields a set that receives the graph nodes the forward stored on a
    module (``self.feat = c``, ``self.stats.append(c)``, ``self.cache[k] = c``, a registered buffer rebound:
    invisible in the graph), and puts every module's plain attributes, and the contents of the lists and dicts
    they hold (``_buffers`` among them), back as they were: no ``Proxy`` stays behind."""
    before = [(m, dict(vars(m))) for m in model.modules()]
    held = [(v, list(v) if type(v) is list else dict(v)) for _, attrs in before
            for v in attrs.values() if type(v) in (list, dict, OrderedDict)]
    escaped: set = set()
    try:
        yield escaped
    finally:
        for m, attrs in before:
            now = vars(m)
            for k in [k for k in now if k not in attrs or now[k] is not attrs[k]]:
                escaped.update(p.node for p in tree_leaves(now[k]) if isinstance(p, torch.fx.Proxy))
                if k in attrs:
                    now[k] = attrs[k]
                else:
                    del now[k]
            for k in attrs:
                now.setdefault(k, attrs[k])
        for box, was in held:
            if type(box) is list:
                changed = len(box) != len(was) or any(a is not b for a, b in zip(box, was))
            else:
                changed = box.keys() != was.keys() or any(box[k] is not was[k] for k in was)
            if changed:
                escaped.update(p.node for p in tree_leaves(list(box) if type(box) is list else dict(box))
                               if isinstance(p, torch.fx.Proxy))
                if type(box) is list:
                    box[:] = was
                else:
                    box.clear()
                    box.update(was)


def trace_graph(model: nn.Module):
    """``(graph or None, stored)``: ``model``'s fx graph with leaf modules kept whole (None if it does not
    trace) and the nodes its forward stored on a module; the modules are left as they were."""
    with restoring_state(model) as stored:
        try:
            graph = _LeafTracer().trace(model)
        except Exception:  # noqa: BLE001 - untraceable forward
            graph = None
    return graph, stored


def _trace(model: nn.Module, convs: Dict[str, nn.Module], bns: Dict[str, nn.Module]):
    """``(graph or None, read, escaped)``: the fx graph of ``model`` (None if it does not trace); the
    candidates whose tensors or attributes the forward reads outside their own calls (found while
    tracing: ``self.bn.running_mean`` becomes a ``_tensor_constant`` of the graph, not a ``get_attr`` of
    the BatchNorm); and the graph nodes whose value the forward stored on a module (``self.feat = c``:
    invisible in the graph; see :func:`restoring_state`)."""
    from .convert.fuse import replaced_attrs, tensor_attrs, watch_reads
    watched = {**{n: (m, tensor_attrs(m)) for n, m in convs.items()},
               **{n: (m, replaced_attrs(m)) for n, m in bns.items()}}
    with watch_reads(watched) as reads:
        graph, escaped = trace_graph(model)
    read = {n for n, r in reads.items() if r}
    if graph is not None:
        owner = {}  # memory of each candidate's parameters and buffers -> its name
        for n, m in {**convs, **bns}.items():
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if _memory(t) is not None:
                    owner[_memory(t)] = n
        for node in graph.nodes:
            if node.op == "get_attr":
                try:
                    name = owner.get(_memory(_fetch(model, str(node.target))))
                except AttributeError:
                    continue
                if name is not None:
                    read.add(name)
    return graph, read, escaped


def _memory(t):
    """The address of the memory a tensor views (None for no tensor, or one without addressable memory)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.layout is not torch.strided:
        return None
    return t.untyped_storage().data_ptr() or None


def _fetch(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def find_conv_bn_pairs(model: nn.Module, example_inputs=None) -> List[Tuple[str, str]]:
    """(conv name, bn name) pairs where the BatchNorm is the only consumer of the conv's output and
    nothing else reads that output or the BatchNorm: read from the fx graph, and with
    ``example_inputs`` also proven by running them once (see ``convert.fuse.prove_pairs``: a conv output
    kept on a module, returned or stored elsewhere, or a BatchNorm's buffers read by hand, stop the
    fold); for a model fx cannot trace, from that run alone, else from ``nn.Sequential`` neighbours."""
    mods = dict(model.named_modules())
    convs = {n: m for n, m in mods.items() if n and _is_conv(m)}
    bns = {n: m for n, m in mods.items() if n and isinstance(m, nn.modules.batchnorm._BatchNorm)}
    graph, read, escaped = _trace(model, convs, bns)
    pairs = []
    if graph is not None:
        calls = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
            elif node.op == "get_attr":
                # modules whose parameters / buffers the forward reads outside their own call
                read.add(str(node.target).rpartition(".")[0])
        for node in graph.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            src = node.args[0]
            if (src.op != "call_module" or len(src.users) != 1 or src in escaped or len(node.args) != 1
                    or node.kwargs):
                continue
            conv, bn = mods.get(src.target), mods.get(node.target)
            if conv is None or bn is None or calls[src.target] != 1 or calls[node.target] != 1:
                continue
            if _is_conv(conv) and _bn_matches(conv, bn):
                pairs.append((src.target, node.target))
        convs = {a: convs[a] for a, _ in pairs}
        bns = {b: bns[b] for _, b in pairs}
    if example_inputs is not None and (graph is None or pairs):
        # the run sees what the graph cannot: a conv output kept in a list or another object
        from .convert.fuse import prove_pairs
        proven = [(a, b) for a, b, _, _ in prove_pairs(model, example_inputs, convs, bns)
                  if _bn_matches(mods[a], mods[b])]
        if graph is not None:
            proven = [p for p in pairs if p in set(proven)]
        pairs = proven
    elif graph is None:
        pairs = _sequential_pairs(model)
    # a module reached from two places could be used twice: fold only uniquely owned pairs
    counts = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    # and only pairs without hooks of the user: folded, a hook on the conv would see the BatchNorm's output
    from .convert.registry import user_hooks
    # and only pairs whose tensors nothing else reads (F.conv2d(x, self.conv.weight), self.bn.running_mean:
    # folded, those reads would see the folded weight or a BatchNorm that is gone)
    return [(a, b) for a, b in pairs if counts[id(mods[a])] == 1 and counts[id(mods[b])] == 1
            and not user_hooks(mods[a]) and not user_hooks(mods[b]) and a not in read and b not in read]


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    pairs = []
    for name, m in model.named_modules():
        if type(m) is not nn.Sequential:
            continue
        children = list(m.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if _is_conv(conv) and _bn_matches(conv, bn):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def fold_batchnorm(model: nn.Module, inplace: bool = False):
    """Fold every eval-mode BatchNorm into the conv before it; the BatchNorm becomes ``nn.Identity``.

    Returns ``(model, pairs)`` where ``pairs`` lists the folded ``(conv, bn)`` names. BatchNorms in
    training mode are left alone (their statistics still change).
    """
    if not inplace:
        model = copy.deepcopy(model)
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        folded = fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        set_module(model, conv_name, folded)
        set_module(model, bn_name, nn.Identity())
    return model, pairs
