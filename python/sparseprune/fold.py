"""Fold eval-mode BatchNorm into the convolution that feeds it.

``bn(conv(x)) == conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta`` per output channel,
``s = gamma / sqrt(var + eps)``. Scaling a whole output channel keeps the zero pattern, so folding
before packing costs sparse layers nothing; a conv that is already sparse is unpacked, folded and
packed again in the same format.

Pairs are found on the ``torch.fx`` graph (a conv whose only user is a BatchNorm, each module called
once); models that do not trace fall back to ``nn.Sequential`` neighbours, where the conv's output
can only reach the next module.
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["fold_batchnorm", "fold_conv_bn", "find_conv_bn_pairs"]

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _sparse_conv_type():
    from . import nn as spnn
    return getattr(spnn, "SparseConv2d", None)


def _is_conv(m: nn.Module) -> bool:
    sc = _sparse_conv_type()
    return type(m) in _CONV_BN or (sc is not None and type(m) is sc)


def _bn_matches(conv: nn.Module, bn: nn.Module) -> bool:
    want = _CONV_BN.get(type(conv), nn.BatchNorm2d)
    if type(bn) is not want or bn.training or not bn.track_running_stats:
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    out = getattr(conv, "out_channels", None)
    return out == bn.num_features


def _dense_conv_of(conv: nn.Module) -> nn.Conv2d:
    """A plain nn.Conv2d equal to a SparseConv2d (to fold into, then pack again)."""
    for method in ("to_conv", "to_conv2d"):
        if hasattr(conv, method):
            return getattr(conv, method)()
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=getattr(conv, "groups", 1),
                      bias=conv.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(conv.to_dense().reshape(dense.weight.shape))
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv module computing ``bn(conv(x))`` for eval-mode ``bn`` (the inputs are not changed)."""
    if not _is_conv(conv):
        raise TypeError(f"fold_conv_bn: expected a convolution, got {type(conv).__name__}")
    if not _bn_matches(conv, bn):
        raise ValueError("fold_conv_bn: the BatchNorm must be in eval mode, track running stats and match "
                         "the conv's output channels")
    sparse = type(conv) not in _CONV_BN
    dense = _dense_conv_of(conv) if sparse else conv
    w = dense.weight.detach()
    scale = bn.running_var.to(torch.float64).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    bias = dense.bias.detach().to(torch.float64) if dense.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.to(torch.float64)) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().to(torch.float64)
    shape = (-1,) + (1,) * (w.dim() - 1)
    folded = copy.deepcopy(dense) if not sparse else dense
    # a conv created without bias gets one; the parameter keeps the conv's dtype and device
    folded.weight = nn.Parameter((w.to(torch.float64) * scale.reshape(shape)).to(w.dtype),
                                 requires_grad=w.requires_grad)
    folded.bias = nn.Parameter(bias.to(w.dtype).to(w.device), requires_grad=w.requires_grad)
    if sparse:
        kw = {"format": conv.format}
        if conv.format == "bsr":
            kw["block_size"] = conv.block_size
        if getattr(conv, "num_threads", None) is not None:
            kw["num_threads"] = conv.num_threads
        return type(conv).from_dense(folded, **kw)
    return folded


class _LeafTracer(torch.fx.Tracer):
    """Treat every torch.nn and sparseprune module as a leaf (their forwards need not trace)."""

    def is_leaf_module(self, m, qualname):
        mod = type(m).__module__
        return super().is_leaf_module(m, qualname) or mod.startswith("sparseprune.")


def find_conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(conv name, bn name) pairs where the BatchNorm is the only consumer of the conv's output."""
    mods = dict(model.named_modules())
    pairs = []
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models fall back to Sequential neighbours
        graph = None
    if graph is not None:
        calls = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            src = node.args[0]
            if src.op != "call_module" or len(src.users) != 1 or len(node.args) != 1 or node.kwargs:
                continue
            conv, bn = mods.get(src.target), mods.get(node.target)
            if conv is None or bn is None or calls[src.target] != 1 or calls[node.target] != 1:
                continue
            if _is_conv(conv) and _bn_matches(conv, bn):
                pairs.append((src.target, node.target))
    else:
        pairs = _sequential_pairs(model)
    # a module reached from two places could be used twice: fold only uniquely owned pairs
    counts = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return [(a, b) for a, b in pairs if counts[id(mods[a])] == 1 and counts[id(mods[b])] == 1]


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


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


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
        _set_module(model, conv_name, folded)
        _set_module(model, bn_name, nn.Identity())
    return model, pairs
