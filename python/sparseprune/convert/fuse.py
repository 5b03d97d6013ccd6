"""Fusing activations into the sparse layer before them (the kernel applies it in its store).

A pair (sparse layer L, activation module A) is fused only when one forward pass of the example inputs
proves it: L and A each run once, A's input is L's output tensor itself, nothing else computes with
that tensor, and A computes the function its type says on that very tensor (checked numerically).
That covers ``nn.Sequential`` neighbours, Hugging Face ``*Intermediate`` / MLP modules
(``dense`` then ``intermediate_act_fn``), conv -> BatchNorm (folded away) -> ReLU, and any module that
calls ``self.act(self.fc(x))``. A is then replaced by ``nn.Identity`` and L computes ``act(L(x))``.
Activations applied as functions in a forward (``F.gelu(self.fc(x))``) are not fused.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .._inputs import call_model
from .registry import user_hooks

__all__ = ["activation_kind", "fuse_activations"]

# Hugging Face activation classes (transformers.activations) by the function they compute
_HF_KINDS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
             "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "SiLUActivation": "silu",
             "ReLUActivation": "relu"}
# tensor methods that read metadata only: not a use of the values
_META = {"size", "dim", "shape", "stride", "numel", "is_contiguous", "__get__", "__len__", "dtype", "device",
         "storage_offset", "is_floating_point", "requires_grad", "data_ptr", "element_size"}


def activation_kind(m: nn.Module) -> Optional[str]:
    """The fusable activation ``m`` computes (a name of ``ops.ACTIVATIONS``), or None."""
    if type(m) is nn.ReLU:
        return "relu"
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    if type(m) is nn.SiLU:
        return "silu"
    kind = _HF_KINDS.get(type(m).__name__)
    return kind if kind is not None and not list(m.parameters()) else None


class _Uses(TorchFunctionMode):
    """Counts the torch calls that take a watched tensor (a sparse layer's output) as an operand."""

    def __init__(self):
        super().__init__()
        self.watch: Dict[int, str] = {}
        self.held: List[Tensor] = []
        self.uses: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch and getattr(func, "__name__", "") not in _META:
            for a in tree_leaves((args, kwargs)):
                name = self.watch.get(id(a)) if isinstance(a, Tensor) else None
                if name is not None:
                    self.uses[name] = self.uses.get(name, 0) + 1
        return func(*args, **kwargs)


def _candidates(work: nn.Module) -> Tuple[Dict[str, nn.Module], Dict[str, Tuple[nn.Module, str]]]:
    from ..nn import SparseModule
    layers, acts = {}, {}
    for name, m in work.named_modules():
        if user_hooks(m):
            continue  # fused, a hook on the layer would see the activation's output, one on the activation nothing
        if isinstance(m, SparseModule) and m.format != "dense" and m.activation == "none":
            layers[name] = m
        else:
            kind = activation_kind(m)
            if kind is not None and name:
                acts[name] = (m, kind)
    return layers, acts


def prove_pairs(work: nn.Module, example_inputs, producers: Dict[str, nn.Module],
                consumers: Dict[str, nn.Module]) -> List[Tuple[str, str, Tensor, Tensor]]:
    """Run ``example_inputs`` once and return ``(producer, consumer, its output, consumer's output)`` for
    every pair where each module ran once, the consumer's input is the producer's output tensor itself,
    and no other torch call used that tensor (copies of both outputs are returned for checks)."""
    from .._modules import module_names
    names = module_names(work)
    producers = {n: m for n, m in producers.items() if len(names.get(id(m), ())) == 1}
    consumers = {n: m for n, m in consumers.items() if len(names.get(id(m), ())) == 1}
    if not producers or not consumers:
        return []
    uses = _Uses()
    calls: Dict[str, int] = {}
    out_of: Dict[int, str] = {}        # id(output tensor) -> producer name
    pre: Dict[str, Tensor] = {}        # producer -> a copy of its output (the consumer may work in place)
    fed_by: Dict[str, List[Optional[str]]] = {}  # consumer -> the producer whose output it received, per call
    post: Dict[str, Tensor] = {}
    hooks = []
    for name, m in producers.items():
        def hook_p(mod, args, out, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            if isinstance(out, Tensor):
                pre[_name] = out.detach().clone()  # before watching: the copy is not a use
                out_of[id(out)] = _name
                uses.watch[id(out)] = _name
                uses.held.append(out)
        hooks.append(m.register_forward_hook(hook_p))
    for name, m in consumers.items():
        def hook_in(mod, args, _name=name):
            x = args[0] if len(args) == 1 else None
            fed_by.setdefault(_name, []).append(out_of.get(id(x)) if isinstance(x, Tensor) else None)

        def hook_out(mod, args, out, _name=name):
            if isinstance(out, Tensor):
                post[_name] = out.detach().clone()
        hooks.append(m.register_forward_pre_hook(hook_in))
        hooks.append(m.register_forward_hook(hook_out))
    try:
        with torch.no_grad(), uses:
            call_model(work, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    out, taken = [], set()
    for c_name in consumers:
        feeds = fed_by.get(c_name, [])
        if len(feeds) != 1 or feeds[0] is None:
            continue
        p_name = feeds[0]
        if p_name in taken or calls.get(p_name) != 1 or uses.uses.get(p_name) != 1:
            continue  # the producer's output is used elsewhere too (or it ran several times)
        if p_name not in pre or c_name not in post:
            continue
        taken.add(p_name)
        out.append((p_name, c_name, pre[p_name], post[c_name]))
    return out


def fuse_activations(work: nn.Module, example_inputs, swaps) -> List[dict]:
    """Fuse every provable (sparse layer, activation) pair of ``work`` in place (through ``swaps``, so
    that it can be undone); returns ``[{"layer", "activation", "kind"}]``."""
    from .. import ops
    layers, acts = _candidates(work)
    if not layers or not acts:
        return []
    fused = []
    for l_name, a_name, y, got in prove_pairs(work, example_inputs, layers, {n: a for n, (a, _) in acts.items()}):
        a_mod, kind = acts[a_name]
        if got.shape != y.shape or not torch.allclose(got.float(), ops.apply_activation(y, kind), rtol=1e-5, atol=1e-6):
            continue  # its type says one function, it computes another: leave it alone
        layer = layers[l_name]
        layer.activation = kind
        try:
            layer.validate()
        except (TypeError, ValueError):
            layer.activation = "none"
            continue
        swaps.replace(a_mod, nn.Identity(), a_name)
        fused.append({"layer": l_name, "activation": a_name, "kind": kind})
    return fused


def unfuse(fused: List[dict], work: nn.Module) -> None:
    """Take the activations back out of the layers (the Identity swaps are undone by the caller)."""
    for f in fused:
        layer = work.get_submodule(f["layer"])
        if getattr(layer, "activation", "none") == f["kind"]:
            layer.activation = "none"
