"""Fusing activations into the sparse layer before them (the kernel applies it in its store).

A pair (sparse layer L, activation module A) is fused only when one forward pass of the example inputs
proves it: L and A each run once, A's input is L's output tensor itself, nothing else computes with
that tensor or keeps it (returned from the forward, stored on a module or any other object), nothing
reads A's attributes outside its own call, and A computes the function its type says on that very tensor
(checked numerically).
That covers ``nn.Sequential`` neighbours, Hugging Face ``*Intermediate`` / MLP modules
(``dense`` then ``intermediate_act_fn``), conv -> BatchNorm (folded away) -> ReLU, and any module that
calls ``self.act(self.fc(x))``. A is then replaced by ``nn.Identity`` and L computes ``act(L(x))``.
Activations applied as functions in a forward (``F.gelu(self.fc(x))``) are not fused.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Dict, FrozenSet, Hashable, Iterable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .._inputs import call_model
from .registry import user_hooks

__all__ = ["activation_kind", "fuse_activations", "watch_reads", "replaced_attrs", "tensor_attrs"]

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
        self.inside = 0  # consumer calls running: what an activation does with its own input is not counted

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch and not self.inside and getattr(func, "__name__", "") not in _META:
            for a in tree_leaves((args, kwargs)):
                name = self.watch.get(id(a)) if isinstance(a, Tensor) else None
                if name is not None:
                    self.uses[name] = self.uses.get(name, 0) + 1
        return func(*args, **kwargs)


# id(module) -> [depth of its own calls running, the attribute names watched, the names read outside them]
_WATCHED: Dict[int, list] = {}
_SPIES: Dict[type, type] = {}
_MODULE_KEYS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (_parameters, hook dicts, ...)


def _spy_class(cls: type) -> type:
    """A subclass of ``cls`` that records reads of watched attributes made outside the module's own call."""
    spy = _SPIES.get(cls)
    if spy is None:
        def __getattribute__(self, attr):
            st = _WATCHED.get(id(self))
            if st is not None and not st[0] and attr in st[1]:
                st[2].add(attr)
            return cls.__getattribute__(self, attr)  # a miss falls back to nn.Module.__getattr__ as usual

        def __call__(self, *args, **kwargs):
            st = _WATCHED.get(id(self))
            if st is not None:
                st[0] += 1
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                if st is not None:
                    st[0] -= 1

        spy = _SPIES[cls] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__call__": __call__,
                                                        "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return spy


def tensor_attrs(m: nn.Module) -> FrozenSet[str]:
    """Names of ``m``'s own parameters and buffers (and ``weight`` / ``bias``, properties on packed layers)."""
    return frozenset(m._parameters) | frozenset(m._buffers) | {"weight", "bias"}


def replaced_attrs(m: nn.Module) -> FrozenSet[str]:
    """The attributes ``m`` has and the ``nn.Identity`` taking its place would not."""
    return frozenset(dir(m)) - frozenset(dir(nn.Identity()))


@contextlib.contextmanager
def watch_reads(watched: Dict[Hashable, Tuple[nn.Module, Iterable[str]]]):
    """Within the block, record the watched attributes of each module read anywhere but in its own call
    (``self.bn.running_mean`` in a parent's forward, ``F.conv2d(x, self.conv.weight)``): yields
    ``{name: set of attributes read}``; a module that cannot be watched counts as read. Each module's
    class is swapped for a recording subclass while the block runs (reads that bypass attribute lookup,
    such as a parent's ``_modules`` walk, are not attributes of the module and are not watched)."""
    reads: Dict[Hashable, Set[str]] = {}
    swapped = []
    try:
        for name, (m, attrs) in watched.items():
            reads[name] = set()
            if id(m) in _WATCHED:
                reads[name].add("<watched twice>")
                continue
            cls = type(m)
            try:
                object.__setattr__(m, "__class__", _spy_class(cls))
            except TypeError:  # a class that cannot be subclassed or swapped (slots, a metaclass's rules)
                reads[name].add("<not watchable>")
                continue
            _WATCHED[id(m)] = [0, frozenset(attrs), reads[name]]
            swapped.append((m, cls))
        yield reads
    finally:
        for m, cls in swapped:
            _WATCHED.pop(id(m), None)
            object.__setattr__(m, "__class__", cls)


def _stored_tensors(work: nn.Module) -> Set[int]:
    """ids of the tensors held in the modules' plain attributes (``self.feat = x``), in containers too."""
    held = set()
    for m in work.modules():
        for k, v in vars(m).items():
            if k not in _MODULE_KEYS and isinstance(v, (Tensor, list, tuple, dict)):
                held.update(id(t) for t in tree_leaves(v) if isinstance(t, Tensor))
    return held


def _escaped(outputs: Dict[str, Tensor], result, work: nn.Module) -> Set[str]:
    """Names of the ``outputs`` that outlived the forward: returned in ``result``, stored on a module, or
    referenced from anywhere else (a list, another object): beyond the one reference ``outputs`` holds,
    CPython's reference count of a tensor local to the forward is back to nothing once it returns."""
    kept = {id(t) for t in tree_leaves(result) if isinstance(t, Tensor)} | _stored_tensors(work)
    probe = {"": torch.empty(0)}
    base = sys.getrefcount(probe[""])
    return {n for n in outputs if id(outputs[n]) in kept or sys.getrefcount(outputs[n]) > base}


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
    no other torch call used that tensor, nothing kept it past the forward (returned, stored on a module
    or elsewhere: the pair would change what it holds), and nothing read the producer's parameters /
    buffers or the consumer's attributes outside their own calls (folded or replaced by ``nn.Identity``,
    those reads would change or fail). Copies of both outputs are returned for checks."""
    from .._modules import module_names
    names = module_names(work)
    producers = {n: m for n, m in producers.items() if len(names.get(id(m), ())) == 1}
    consumers = {n: m for n, m in consumers.items() if len(names.get(id(m), ())) == 1}
    if not producers or not consumers:
        return []
    uses = _Uses()
    calls: Dict[str, int] = {}
    out_of: Dict[int, str] = {}        # id(output tensor) -> producer name
    first: Dict[str, Tensor] = {}      # producer -> its output (the only reference kept: see _escaped)
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
                if _name in first:
                    uses.held.append(out)  # alive, so that its id stays its own
                else:
                    first[_name] = out
        hooks.append(m.register_forward_hook(hook_p))
    for name, m in consumers.items():
        def hook_in(mod, args, _name=name):
            x = args[0] if len(args) == 1 else None
            fed_by.setdefault(_name, []).append(out_of.get(id(x)) if isinstance(x, Tensor) else None)
            uses.inside += 1

        def hook_out(mod, args, out, _name=name):
            uses.inside -= 1
            if isinstance(out, Tensor):
                post[_name] = out.detach().clone()
        hooks.append(m.register_forward_pre_hook(hook_in))
        hooks.append(m.register_forward_hook(hook_out))
    watched = {**{("p", n): (m, tensor_attrs(m)) for n, m in producers.items()},
               **{("c", n): (m, replaced_attrs(m)) for n, m in consumers.items()}}
    try:
        with torch.no_grad(), watch_reads(watched) as reads, uses:
            result = call_model(work, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    escaped = _escaped(first, result, work)
    del result
    out, taken = [], set()
    for c_name in consumers:
        feeds = fed_by.get(c_name, [])
        if len(feeds) != 1 or feeds[0] is None:
            continue
        p_name = feeds[0]
        if p_name in taken or calls.get(p_name) != 1 or uses.uses.get(p_name, 0) != 0:
            continue  # the producer's output is used outside the consumer's call too (or it ran several times)
        if p_name not in pre or c_name not in post:
            continue
        if p_name in escaped:
            continue  # the producer's output is kept (returned, stored): fused or folded, it would hold other values
        if reads[("p", p_name)] or reads[("c", c_name)]:
            continue  # read by hand outside their calls: the folded weight or the Identity would answer differently
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
