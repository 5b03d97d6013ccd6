"""convert(residual=True): the end of a ResNet block — its last convolution, the shortcut added to that
output, the activation after the sum — as one kernel call, the sum and the activation in the
convolution's store (:meth:`sparseprune.nn.SparseConv2d.forward_residual`).

A block's forward is Python we do not own, so only known classes are taken: Hugging Face's
``ResNetBottleNeckLayer`` and ``ResNetBasicLayer`` (``layer``: a Sequential of conv layers, ``shortcut``,
``activation``; forward = ``activation(layer(x) + shortcut(x))``), and only in the shape convert leaves
them: the last conv layer a float32 sparse SparseConv2d whose BatchNorm was folded away and with no
activation of its own. Each block is then checked on the example inputs (the same output as its own
forward) and timed; it is replaced by a copy (same children, so the same state_dict) whose forward
makes the one call, where that is faster.
"""
from __future__ import annotations

import time
import types
from typing import Callable, List, Optional

from torch import Tensor, nn

from .capture import first_inputs, max_error, relative
from .fuse import activation_kind
from .timing import time_calls

_BLOCKS = {("transformers.models.resnet.modeling_resnet", "ResNetBottleNeckLayer"),
           ("transformers.models.resnet.modeling_resnet", "ResNetBasicLayer")}
KIND_ATTR = "_sparseprune_residual"  # the activation kind, on a fused block


def fusable(block: nn.Module) -> Optional[str]:
    """The activation after the sum (``ops.ACTIVATIONS``) when ``block`` is a known residual block whose end
    can run as one call, else None."""
    from ..nn import SparseConv2d
    cls = type(block)
    if (cls.__module__, cls.__name__) not in _BLOCKS:
        return None
    seq, act = block._modules.get("layer"), block._modules.get("activation")
    if not isinstance(seq, nn.Sequential) or len(seq) == 0 or block._modules.get("shortcut") is None:
        return None
    last = seq[-1]
    conv = last._modules.get("convolution")
    if (type(conv) is not SparseConv2d or conv.format == "dense" or conv.weight_dtype != "float32"
            or conv.activation != "none" or set(last._modules) != {"convolution", "normalization", "activation"}
            or type(last._modules["normalization"]) is not nn.Identity
            or type(last._modules["activation"]) is not nn.Identity):
        return None
    return "none" if type(act) is nn.Identity else activation_kind(act)


def _fused_forward(self, hidden_state: Tensor) -> Tensor:
    """``activation(layer(x) + shortcut(x))`` with the last conv, the sum and the activation as one call."""
    layers = list(self.layer)
    h = hidden_state
    for m in layers[:-1]:
        h = m(h)
    residual = self.shortcut(hidden_state)
    conv = layers[-1]._modules.get("convolution")
    fused = getattr(conv, "forward_residual", None)
    if fused is not None and fusable(self) is not None:
        return fused(h, residual, self.__dict__[KIND_ATTR])
    return self.activation(layers[-1](h) + residual)  # a layer made dense again (end-to-end check)


# pickle stores a bound method as getattr(obj, name): under this name a pickled block (torch.save) comes
# back with its class's own forward, the unfused computation
_fused_forward.__name__ = "forward"


def fused_copy(block: nn.Module, kind: str) -> nn.Module:
    """A copy of ``block`` sharing its children (the same state_dict), whose forward is the one-call form."""
    new = type(block).__new__(type(block))
    new.__dict__ = dict(block.__dict__)
    for k in ("_modules", "_parameters", "_buffers"):
        new.__dict__[k] = dict(block.__dict__[k])
    new.__dict__[KIND_ATTR] = kind
    new.forward = types.MethodType(_fused_forward, new)
    return new


def fuse_residuals(work: nn.Module, example_inputs, replace: Callable[[nn.Module, nn.Module, str], None],
                   budget_s: float, tolerance: float) -> List[dict]:
    """Replace the known residual blocks whose fused form matches their output and whose end (last conv, sum,
    activation) times faster as one call than as PyTorch runs it; one row per candidate block:
    ``{"block", "kept", "separate_ms", "fused_ms"}`` (the times of that end)."""
    blocks = [(n, m, k) for n, m in work.named_modules() if n for k in [fusable(m)] if k is not None]
    if not blocks or example_inputs is None:
        return []
    seen = first_inputs(work, [(n, m) for n, m, _ in blocks], example_inputs)
    rows, deadline = [], time.perf_counter() + budget_s
    for i, (name, block, kind) in enumerate(blocks):
        x = seen.get(name)
        if x is None:
            continue
        new = fused_copy(block, kind)
        ref, got = block(x), new(x)
        if got.shape != ref.shape or not relative(*max_error(got, ref)) <= tolerance:
            rows.append({"block": name, "kept": False, "separate_ms": None, "fused_ms": None})
            continue
        layers = list(block.layer)
        h = x
        for m in layers[:-1]:
            h = m(h)
        r, last, act = block.shortcut(x), layers[-1], block.activation
        conv = last.convolution
        left = max(0.0, deadline - time.perf_counter()) / (len(blocks) - i)
        # the part that differs; the fused form does strictly less work, the timing guards against surprises
        t = time_calls({"separate": lambda: act(last(h).add_(r)), "fused": lambda: conv.forward_residual(h, r, kind)},
                       left, min_reps=5, max_reps=40)
        keep = t["fused"] < t["separate"]
        if keep:
            replace(block, new, name)
        rows.append({"block": name, "kept": keep, "separate_ms": t["separate"] * 1e3, "fused_ms": t["fused"] * 1e3})
    return rows

