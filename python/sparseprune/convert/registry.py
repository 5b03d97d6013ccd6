"""Which module types convert() knows, and how each maps to a sparse module and back.

``nn.Linear`` -> :class:`~sparseprune.nn.SparseLinear`, ``nn.Conv2d`` -> :class:`~sparseprune.nn.SparseConv2d`, and
Hugging Face's ``Conv1D`` (GPT-2's Linear, weight stored as (in, out); recognised by name, transformers is never
imported here) -> ``SparseLinear`` of ``weight.T``; kept dense, a Conv1D stays a Conv1D."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .. import nn as spnn
from .._modules import set_module
from ..prune import masks

__all__ = ["Converter", "CONVERTERS", "register_converter", "base_type", "has_hooks", "user_hooks", "carry_hooks",
           "densify", "dense_twin", "converter_for", "weight_density"]


@dataclass(frozen=True)
class Converter:
    """How convert() handles one dense module type.

    ``pattern(m)``: 2-D tensor whose zeros decide the blocks (rows = outputs, cols = inputs);
    ``weight(m)``: the effective weight (masks applied); ``dense(m)``: a plain dense module computing
    the same thing (no hooks or masks); ``build(m, format, block, num_threads[, weight_dtype])``: the
    sparse module (``weight_dtype`` is passed only when it is not float32).
    ``sparse_type``: the :class:`~sparseprune.nn.SparseModule` class ``build`` returns (densify and
    summary rows find their way back through it).
    """
    pattern: Callable[[nn.Module], Tensor]
    weight: Callable[[nn.Module], Tensor]
    dense: Callable[[nn.Module], nn.Module]
    build: Callable[[nn.Module, str, Optional[Tuple[int, int]], Optional[int]], nn.Module]
    sparse_type: Optional[type] = None


def _conv1d_class(t) -> bool:
    """A Hugging Face ``Conv1D`` class (``transformers.pytorch_utils``), known by name and module."""
    return isinstance(t, type) and t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


class _Converters(dict):
    """{module type: Converter}, exact types; a Hugging Face ``Conv1D`` class, which cannot be registered at import
    (transformers is not imported), maps to the Conv1D converter unless one was registered for it."""

    def __missing__(self, t):
        if _conv1d_class(t):
            return self.setdefault(t, _CONV1D)
        raise KeyError(t)

    def __contains__(self, t) -> bool:
        return dict.__contains__(self, t) or _conv1d_class(t)

    def get(self, t, default=None):
        return self[t] if t in self else default


CONVERTERS: Dict[type, Converter] = _Converters()


def register_converter(module_type: type, converter: Converter) -> None:
    """Teach convert() a module type (exact type match; subclasses may compute differently)."""
    CONVERTERS[module_type] = converter


def base_type(m: nn.Module) -> type:
    # torch.nn.utils.parametrize swaps in a generated subclass; the layer is still its base type
    if torch.nn.utils.parametrize.is_parametrized(m):
        return type(m).__bases__[0]
    return type(m)


def converter_for(m: nn.Module) -> Optional[Converter]:
    t = base_type(m)
    return CONVERTERS.get(t)


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks or torch.nn.utils.parametrize.is_parametrized(m))


def _ours(hook) -> bool:
    """A hook that computes the weight (a mask, sparseprune's or ``torch.nn.utils.prune``'s; the hook-based
    ``weight_norm`` / ``spectral_norm``): a replacement holds the weight it computed and needs none."""
    return (hook is masks._forward_pre_hook or hook is masks._restore_lent
            or isinstance(hook, (BasePruningMethod, WeightNorm, SpectralNorm)))


def user_hooks(m: nn.Module) -> bool:
    """Whether ``m`` carries hooks of its user (forward, pre-forward or backward; not sparseprune's masks)."""
    return bool(m._backward_hooks or m._backward_pre_hooks
                or any(not _ours(h) for h in m._forward_pre_hooks.values())
                or any(not _ours(h) for h in m._forward_hooks.values()))


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Put the user's hooks of ``old`` (with their kwargs / always-call flags) on ``new``, which replaces it and
    computes the same function: a feature-capturing or output-changing hook keeps working after convert. The
    handles the user holds still point at ``old``'s hook tables, as for any copy of a module."""
    if new is old or not user_hooks(old):
        return
    tables = (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
              ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
              ("_backward_pre_hooks", ()), ("_backward_hooks", ()))
    for table, flags in tables:
        for k, h in getattr(old, table).items():
            if _ours(h):
                continue
            getattr(new, table)[k] = h
            for f in flags:
                if getattr(old, f).get(k):
                    getattr(new, f)[k] = True
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def weight_density(w: Tensor) -> Optional[float]:
    if w.device.type == "meta":
        return None
    return float((w != 0).sum()) / max(w.numel(), 1)


def _sparse_builder(sparse_type, as_dense: Callable[[nn.Module], nn.Module] = lambda m: m):
    def build(m, fmt, block, num_threads, weight_dtype=torch.float32):
        return sparse_type.from_dense(as_dense(m), format=fmt, block_size=block if fmt == "bsr" else None,
                                      num_threads=num_threads, weight_dtype=weight_dtype)
    return build


def _plain(m: nn.Module) -> nn.Module:
    """A hook-free copy of a Linear / Conv2d holding its effective (masked) weight."""
    # built on the meta device, then given copies of the effective weight and bias: no random
    # initialisation of parameters that are replaced next (as SparseModule._fill_dense)
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    else:
        new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                        device="meta")
    new.weight = nn.Parameter(m.weight.detach().clone())
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone())
    return new


def _conv1d_as_linear(m: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` a Conv1D computes (``x @ W + b`` = ``F.linear(x, W.T, b)``), holding a contiguous copy of its
    effective (masked) weight, transposed, and of its bias."""
    w = m.weight.detach()
    new = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device="meta")
    new.weight = nn.Parameter(w.t().contiguous())
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone())
    return new


def _plain_conv1d(m: nn.Module) -> nn.Module:
    """A hook-free Conv1D of the same class holding its effective (masked) weight and bias: the dense choice."""
    w = m.weight.detach()
    with torch.device("meta"):  # no random initialisation of parameters replaced next
        new = base_type(m)(w.shape[1], w.shape[0])  # Conv1D(nf, nx)
    new.weight = nn.Parameter(w.clone())
    new.bias = nn.Parameter(m.bias.detach().clone()) if m.bias is not None else None
    return new


# rows = outputs: a Conv1D's weight is (in, out), so its pattern and effective weight are the transpose
_CONV1D = Converter(
    pattern=lambda m: m.weight.detach().t(), weight=lambda m: m.weight.detach().t(), dense=_plain_conv1d,
    build=_sparse_builder(spnn.SparseLinear, _conv1d_as_linear), sparse_type=spnn.SparseLinear)

register_converter(nn.Linear, Converter(
    pattern=lambda m: m.weight.detach(), weight=lambda m: m.weight.detach(), dense=_plain,
    build=_sparse_builder(spnn.SparseLinear), sparse_type=spnn.SparseLinear))
# a conv block (r, c) is r output channels x c input channels x every kernel position
register_converter(nn.Conv2d, Converter(
    pattern=lambda m: spnn.SparseConv2d._pattern(m.weight.detach()), weight=lambda m: m.weight.detach(),
    dense=_plain, build=_sparse_builder(spnn.SparseConv2d), sparse_type=spnn.SparseConv2d))


def dense_twin(m: nn.Module) -> Optional[nn.Module]:
    """The plain dense module a sparse one replaced (None if ``m`` is not a sparse module)."""
    if isinstance(m, spnn.SparseModule):
        return m.to_dense_module()
    return None


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every sparse layer replaced by the dense layer it computes."""
    from .report import REPORT_ATTR
    model = copy.deepcopy(getattr(model, "_orig_mod", model))
    model.__dict__.pop(REPORT_ATTR, None)  # a dense model now: what convert reported no longer describes it
    for name, m in list(model.named_modules()):
        d = dense_twin(m) if name else None
        if d is not None:
            carry_hooks(m, d)  # the same hooks run in the dense copy as in the model
            set_module(model, name, d)
    return model
