"""convert(residual=True): the ends of residual blocks as one call.

ResNet blocks: the last convolution, the shortcut added to that output, the activation after the sum — as
one kernel call, the sum and the activation in the convolution's store
(:meth:`sparseprune.nn.SparseConv2d.forward_residual`).

Transformer layers (Hugging Face ``BertLayer`` — BERT, MiniLM and the sentence-transformers built on them — and
its copies ``RobertaLayer``, ``XLMRobertaLayer``, ``ElectraLayer``, ``CamembertLayer``):
both sublayer ends — output projection, + residual, LayerNorm — with the sum and the LayerNorm as one pass
(:func:`sparseprune.ops.add_layer_norm`), and the layer's forward as one flat function: the same
projections, attention function (the config's own) and MLP, without the four nested modules' Python
around them (about 0.2 ms a layer, as much as a 90%-sparse int8 projection at 128 tokens). It runs
in eval mode for self-attention without cache or hooks on the modules it steps over (transformers' own
output-recording hooks count only while an ``output_attentions`` request runs), and hands every other call to
the class's forward.

A block's forward is Python we do not own, so only known classes are taken: Hugging Face's
``ResNetBottleNeckLayer`` and ``ResNetBasicLayer`` (``layer``: a Sequential of conv layers, ``shortcut``,
``activation``; forward = ``activation(layer(x) + shortcut(x))``), and only in the shape convert leaves
them: the last conv layer a sparse SparseConv2d (float32, or int8 / bf16: their 1x1 convs on channels_last
inputs add the residual in the kernel's store too) whose BatchNorm was folded away and with no activation of
its own. Each block is then checked on the example inputs (the same output as its own
forward) and timed; it is replaced by a copy (same children, so the same state_dict) whose forward
makes the one call, where that is faster.
"""
from __future__ import annotations

import inspect
import math
import sys
import time
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .capture import first_calls, l2_relative, max_error, relative
from .fuse import activation_kind
from .timing import time_calls

_BLOCKS = {("transformers.models.resnet.modeling_resnet", "ResNetBottleNeckLayer"),
           ("transformers.models.resnet.modeling_resnet", "ResNetBasicLayer")}
# Hugging Face encoder layers with BertLayer's code (transformers 5's modular copies: the same source but for
# the class names): module -> class name prefix
_LAYERS = {"transformers.models.bert.modeling_bert": "Bert", "transformers.models.roberta.modeling_roberta": "Roberta",
           "transformers.models.xlm_roberta.modeling_xlm_roberta": "XLMRoberta",
           "transformers.models.electra.modeling_electra": "Electra",
           "transformers.models.camembert.modeling_camembert": "Camembert"}
KIND_ATTR = "_sparseprune_residual"  # the activation kind (ResNet) or LAYERNORM (transformer layer), on a fused block
LAYERNORM = "layernorm"
_BYPASSED = "_sparseprune_bypassed"  # the modules a fused transformer layer's forward does not call
_ATTN = "_sparseprune_attention"  # True: the fused transformer layer runs sparseprune's attention kernel


def _end(mod: nn.Module) -> bool:
    """A Hugging Face sublayer end: ``LayerNorm(dropout(dense(x)) + input)``."""
    return (isinstance(mod, nn.Module) and set(mod._modules) == {"dense", "LayerNorm", "dropout"}
            and type(mod._modules["LayerNorm"]) is nn.LayerNorm and type(mod._modules["dropout"]) is nn.Dropout)


def _layer_fusable(layer: nn.Module, prefix: str) -> bool:
    att, inter, out = (layer._modules.get(k) for k in ("attention", "intermediate", "output"))
    sa = att._modules.get("self") if att is not None else None
    return (sa is not None and inter is not None and _end(out) and _end(att._modules.get("output"))
            and not getattr(layer, "add_cross_attention", True) and getattr(layer, "chunk_size_feed_forward", 1) == 0
            and type(sa).__name__ == prefix + "SelfAttention" and not getattr(sa, "is_cross_attention", False)
            and getattr(sa, "is_causal", True) is False
            and all(isinstance(getattr(sa, k, None), nn.Module) for k in ("query", "key", "value"))
            and all(type(getattr(sa, k, None)) is int for k in ("num_attention_heads", "attention_head_size"))
            and isinstance(getattr(sa, "scaling", None), float) and hasattr(getattr(sa, "config", None), "_attn_implementation")
            and callable(getattr(sys.modules.get(type(sa).__module__), "eager_attention_forward", None)))


def fusable(block: nn.Module) -> Optional[str]:
    """The activation after the sum (``ops.ACTIVATIONS``) when ``block`` is a known residual block whose end
    can run as one call, :data:`LAYERNORM` for a known transformer layer, else None."""
    from ..nn import SparseConv2d
    cls = type(block)
    prefix = _LAYERS.get(cls.__module__)
    if prefix is not None and cls.__name__ == prefix + "Layer":
        return LAYERNORM if _layer_fusable(block, prefix) else None
    if (cls.__module__, cls.__name__) not in _BLOCKS:
        return None
    seq, act = block._modules.get("layer"), block._modules.get("activation")
    if not isinstance(seq, nn.Sequential) or len(seq) == 0 or block._modules.get("shortcut") is None:
        return None
    last = seq[-1]
    conv = last._modules.get("convolution")
    if (type(conv) is not SparseConv2d or conv.format == "dense" or conv.activation != "none"
            or set(last._modules) != {"convolution", "normalization", "activation"}
            or type(last._modules["normalization"]) is not nn.Identity
            or type(last._modules["activation"]) is not nn.Identity):
        return None
    return "none" if type(act) is nn.Identity else activation_kind(act)


def _stepped_over(block: nn.Module) -> tuple:
    """The modules a residual block's one call does not call: its last conv layer and what that holds, and
    the block's activation."""
    last = block._modules["layer"][-1]
    return (last, *last._modules.values(), block._modules.get("activation"))


def _fused_forward(self, hidden_state: Tensor) -> Tensor:
    """``activation(layer(x) + shortcut(x))`` with the last conv, the sum and the activation as one call."""
    layers = list(self.layer)
    h = hidden_state
    for m in layers[:-1]:
        h = m(h)
    residual = self.shortcut(hidden_state)
    conv = layers[-1]._modules.get("convolution")
    fused = getattr(conv, "forward_residual", None)
    kind = fusable(self) if fused is not None else None
    if kind is not None and not _hooked(_stepped_over(self)):
        # (the block's activation as it is now: one replaced since convert is applied, not the one fused then)
        return fused(h, residual, kind)
    return self.activation(layers[-1](h) + residual)  # a layer made dense again (end-to-end check)


def _idle_recorder(hook) -> bool:
    """A transformers output-recording hook (installed for good on the first ``output_attentions`` /
    ``output_hidden_states`` request) while no such request is running: it would record nothing."""
    if getattr(hook, "__name__", "") != "output_capturing_hook" or \
            getattr(hook, "__module__", "") != "transformers.utils.output_capturing":
        return False
    collector = getattr(sys.modules.get("transformers.utils.output_capturing"), "_active_collector", None)
    if collector is None:
        return False
    active = collector.get()  # None outside a model call; inside, the outputs being recorded (often none)
    if active is None:
        return True
    try:  # the output this hook records: its closure's `key` ("attentions", ...)
        key = hook.__closure__[hook.__code__.co_freevars.index("key")].cell_contents
    except (AttributeError, ValueError, IndexError, TypeError):
        return False
    return isinstance(key, str) and key not in active


def _hooked(mods) -> bool:
    """Whether calling around ``mods`` would skip a hook that does something."""
    from torch.nn.modules import module as _m
    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks:
        return True
    return any(m is not None and (m._forward_pre_hooks or m._backward_hooks
                                  or any(not _idle_recorder(h) for h in m._forward_hooks.values())) for m in mods)


def _bypassed(layer: nn.Module) -> Optional[tuple]:
    """The modules a flat transformer layer's forward steps over (their own forward is not called), as the
    layer has them now; None if its structure is no longer the one flattened."""
    try:
        att, out = layer._modules["attention"], layer._modules["output"]
        sa, end = att._modules["self"], att._modules["output"]
        return (att, sa, sa._modules.get("dropout"), end, end._modules["LayerNorm"], end._modules["dropout"], out,
                out._modules["LayerNorm"], out._modules["dropout"])
    except (AttributeError, KeyError, TypeError):
        return None


def _still_flat(layer: nn.Module) -> bool:
    """The stepped-over modules are the ones the layer was flattened with (none replaced since), none is in
    training mode (dropout switched on alone, as Monte Carlo dropout does, must apply) and none has a hook that
    would do something."""
    now, then = _bypassed(layer), layer.__dict__[_BYPASSED]
    return (now is not None and all(a is b for a, b in zip(now, then))
            and not any(m is not None and m.training for m in now) and not _hooked(now))


def _layer_forward(self, hidden_states, *args, **kwargs):
    """A Hugging Face ``BertLayer``'s (or copy's) forward for self-attention in inference, flat: the same modules and
    attention function, both sublayer ends as ``ops.add_layer_norm``; the class's forward otherwise."""
    from .. import ops
    mask = args[0] if args else kwargs.get("attention_mask")
    rest = list(args[1:]) + [v for k, v in kwargs.items() if k != "attention_mask"]
    if (self.training or any(v is not None and v is not False for v in rest) or type(hidden_states) is not Tensor
            or hidden_states.dim() != 3 or not _still_flat(self)):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    sa = self.attention.self
    b, n, _ = hidden_states.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    q = sa.query(hidden_states).view(b, n, heads, size)
    k = sa.key(hidden_states).view(b, n, heads, size)
    v = sa.value(hidden_states).view(b, n, heads, size)
    impl = sa.config._attn_implementation
    # our kernel where it computes what the config's attention function does, that function otherwise:
    # "sdpa" is torch's scaled_dot_product_attention (a bool mask keeps / drops keys, a float one is added, a
    # query row with every key masked gives zeros); "eager" adds any mask to the scores (a bool one as 0 / 1:
    # left to eager) and a row of -inf gives NaN
    ctx = None
    if self.__dict__[_ATTN]:
        if impl == "sdpa":
            ctx = ops.attention(q, k, v, mask, sa.scaling)
        elif impl == "eager" and (mask is None or (type(mask) is Tensor and mask.dtype is torch.float32)):
            ctx = ops.attention(q, k, v, mask, sa.scaling, masked_rows="nan")
    if ctx is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, sys.modules[type(sa).__module__].eager_attention_forward)
        ctx, _ = attend(sa, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout=0.0,
                        scaling=sa.scaling)
        ctx = ctx.reshape(b, n, -1).contiguous()
    end = self.attention.output
    h = ops.add_layer_norm(end.dense(ctx), hidden_states, end.LayerNorm)
    end = self.output
    return ops.add_layer_norm(end.dense(self.intermediate(h)), h, end.LayerNorm)


class BoundForward:
    """A fused block's one-call forward, bound to the block (what ``types.MethodType(fn, block)`` is), that pickles
    as the function and the block: a bound method pickles as ``getattr(block, name)``, so a converted model saved
    with ``torch.save`` / pickle, or sent to a spawn worker, came back running its blocks' class forwards (the same
    values, unfused: 20-40% slower per BERT layer). ``deepcopy`` copies it with its block."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func, block: nn.Module):
        self.__func__ = func
        self.__self__ = block

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __getattr__(self, name):
        # what a bound method passes through to its function (__code__, __name__, __globals__, __defaults__...):
        # torch.export reads forward.__code__
        if name in ("__func__", "__self__"):
            raise AttributeError(name)
        return getattr(self.__func__, name)

    @property
    def __signature__(self):
        # inspect.signature as of a bound method: the function's, less its first parameter
        sig = inspect.signature(self.__func__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __reduce__(self):
        return BoundForward, (self.__func__, self.__self__)

    def __repr__(self) -> str:
        return f"<fused forward {self.__func__.__name__} of {type(self.__self__).__name__}>"


def _bind(block: nn.Module, func) -> nn.Module:
    """Install the fused forward ``func`` on ``block``, bound to it, with the ``__reduce_ex__`` that keeps it bound to
    whichever block a copy makes (:func:`_reduce_fused`)."""
    block.__dict__["forward"] = BoundForward(func, block)
    block.__dict__["__reduce_ex__"] = BoundForward(_reduce_fused, block)
    return block


def _reduce_fused(block: nn.Module, protocol: int = 2):
    """``__reduce_ex__`` of a fused block, an instance attribute as its ``forward`` (copy and pickle look it up on
    the object): the block's state without the bound callables, and a constructor binding them to the new block.
    ``copy.copy`` passes the state on as it is (it copies no value in it), so a fused forward kept in the state
    stayed bound to the original block: the copy ran the original's modules, training flag and settings. (deepcopy
    and pickle rebind it too, through :class:`BoundForward`'s own ``__reduce__``; this path serves all three.)"""
    state = block.__getstate__()
    func = None
    fwd = state.get("forward")
    if type(fwd) is BoundForward and fwd.__self__ is block:
        func = fwd.__func__
        del state["forward"]
    red = state.get("__reduce_ex__")
    if type(red) is BoundForward and red.__self__ is block:
        del state["__reduce_ex__"]
    return _new_fused, (type(block), func), state


def _new_fused(cls, func) -> nn.Module:
    """An empty block of class ``cls`` (its state comes next: ``__setstate__``) with the fused forward ``func``
    bound to it (None: one the user installed, in the state)."""
    new = cls.__new__(cls)
    return _bind(new, func) if func is not None else new


def fused_copy(block: nn.Module, kind: str) -> nn.Module:
    """A copy of ``block`` sharing its children (the same state_dict), whose forward is the one-call form."""
    new = type(block).__new__(type(block))
    new.__dict__ = dict(block.__dict__)
    for k in ("_modules", "_parameters", "_buffers"):
        new.__dict__[k] = dict(block.__dict__[k])
    new.__dict__[KIND_ATTR] = kind
    if kind == LAYERNORM:
        new.__dict__[_BYPASSED] = _bypassed(block)
        new.__dict__[_ATTN] = True
        _bind(new, _layer_forward)
    else:
        _bind(new, _fused_forward)
    return new


def _matches(got: Tensor, ref: Tensor, block: nn.Module, tolerance: float, quant_tolerance: Optional[float]) -> bool:
    """The fused form's output against the block's own. With quantized layers inside, a last-bit difference in
    an activation can move its int8 rounding by one step, so the check is then the relative L2 error against
    the quantized tolerance, as convert's end-to-end check does for quantized models."""
    quantized = any(getattr(m, "weight_dtype", "float32") != "float32" for m in block.modules())
    if quant_tolerance is not None and quantized:
        return l2_relative(got, ref) <= quant_tolerance
    return relative(*max_error(got, ref)) <= tolerance


def fuse_residuals(work: nn.Module, example_inputs, replace: Callable[[nn.Module, nn.Module, str], None],
                   budget_s: float, tolerance: float, quant_tolerance: Optional[float] = None) -> List[dict]:
    """Replace the known residual blocks and transformer layers whose fused form matches their output and
    whose end (ResNet: last conv, sum, activation) or whole forward (transformer layer) times faster fused;
    one row per candidate: ``{"block", "kept", "separate_ms", "fused_ms"}`` (the times of that part), and for
    a transformer layer ``"attention"``: ``"sparseprune"`` (our kernel) or ``"model"`` (the config's own
    attention function), whichever timed faster inside the flat forward."""
    # (a block whose one call would step over a hook of the user is left as it is)
    blocks = [(n, m, k) for n, m in work.named_modules() if n for k in [fusable(m)]
              if k is not None and not _hooked((_bypassed(m) or ()) if k == LAYERNORM else _stepped_over(m))]
    if not blocks or example_inputs is None:
        return []
    seen = first_calls(work, [(n, m) for n, m, _ in blocks], example_inputs)
    rows, deadline = [], time.perf_counter() + budget_s
    for i, (name, block, kind) in enumerate(blocks):
        call = seen.get(name)
        if call is None or not call[0] or type(call[0][0]) is not Tensor:
            continue
        args, kwargs = call
        new = fused_copy(block, kind)
        ref, got = block(*args, **kwargs), new(*args, **kwargs)
        if type(got) is not Tensor or type(ref) is not Tensor or got.shape != ref.shape \
                or not _matches(got, ref, block, tolerance, quant_tolerance):
            rows.append({"block": name, "kept": False, "separate_ms": None, "fused_ms": None})
            continue
        left = max(0.0, deadline - time.perf_counter()) / (len(blocks) - i)
        alt = None
        if kind == LAYERNORM:
            # the flat forward with sparseprune's attention kernel and with the model's own attention function
            alt = fused_copy(block, kind)
            alt.__dict__[_ATTN] = False
            calls = {"separate": lambda: block(*args, **kwargs), "fused": lambda: new(*args, **kwargs),
                     "fused_model_attention": lambda: alt(*args, **kwargs)}
        else:
            x = args[0]
            layers = list(block.layer)
            h = x
            for m in layers[:-1]:
                h = m(h)
            r, last, act = block.shortcut(x), layers[-1], block.activation
            conv = last.convolution
            # the part that differs; the fused form does strictly less work, the timing guards against surprises
            calls = {"separate": lambda: act(last(h).add_(r)), "fused": lambda: conv.forward_residual(h, r, kind)}
        t = time_calls(calls, left, min_reps=5, max_reps=40)
        row = {"block": name}
        if alt is not None:
            if t.get("fused_model_attention", math.inf) < t["fused"]:
                new, t["fused"] = alt, t["fused_model_attention"]
            row["attention"] = "sparseprune" if new.__dict__[_ATTN] else "model"
        keep = t["fused"] < t["separate"]
        if keep:
            replace(block, new, name)
        rows.append({**row, "kept": keep, "separate_ms": t["separate"] * 1e3, "fused_ms": t["fused"] * 1e3})
    return rows
