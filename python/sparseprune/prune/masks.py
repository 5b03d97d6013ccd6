"""Masks that survive training.

A pruned layer keeps its ``weight`` Parameter (the same object, so optimizers built before pruning
keep working) plus a boolean buffer ``weight_mask`` (True = kept), shaped like the stored weight (a Hugging Face
``Conv1D``'s is (in, out), its weight's layout). Three things keep pruned weights
at zero whatever the training loop does:

1. a gradient hook zeroes the gradient of pruned entries (so gradient clipping, Taylor scores and
   optimizers see no signal there);
2. a forward pre-hook re-applies the mask before every forward (so the model never computes with a
   revived weight, whatever wrote into it); a tensor lent for one call by ``torch.func.functional_call``
   is not written: that call computes with a masked copy of it;
3. one global optimizer step post-hook (installed once) re-applies the mask right after *any*
   ``torch.optim`` optimizer steps a masked parameter, and zeroes that optimizer's per-parameter
   state there (Adam's momentum built up before pruning would otherwise move pruned weights).

:func:`remove_masks` bakes the zeros in and removes all of it: ``module.weight`` is then a plain
Parameter holding the zeros, with no hooks and no buffer.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["apply_mask", "get_mask", "is_masked", "masked_modules", "apply_masks", "remove_masks",
           "sparsity", "layer_sparsity", "sync_masks", "MASK_NAME"]

MASK_NAME = "weight_mask"
_HOOKS_ATTR = "_sparseprune_mask_hooks"
# Parameter -> owning module / gradient-hook handle, kept outside the Parameter so that it pickles.
# (Keyed by identity: a Tensor's == is element-wise.)
_OWNERS = WeakIdKeyDictionary()
_GRAD_HANDLES = WeakIdKeyDictionary()
_step_hook_handle = None


def _enforce(module: nn.Module) -> None:
    mask = module._buffers.get(MASK_NAME)
    if mask is None:
        return
    w = module.weight
    if mask.shape != w.shape:
        # the layer was resized after pruning (resize_token_embeddings on a pruned lm_head tied to its embedding,
        # or a weight replaced by hand): the mask no longer says which entries are pruned
        raise ValueError(f"{type(module).__name__}: its weight is now {tuple(w.shape)} but it was pruned with a mask "
                         f"of shape {tuple(mask.shape)} (resized after pruning?): remove the mask with "
                         "sparseprune.remove_masks(model) (the zeros stay) and prune again if you need the mask")
    if mask.device != w.device:
        mask = mask.to(w.device)
        module._buffers[MASK_NAME] = mask
    with torch.no_grad():
        w.data.masked_fill_(~mask, 0)


class _MaskGrad:
    """Gradient hook zeroing the pruned entries. Pickles as a no-op (a weak reference cannot be
    pickled); a loaded model gets a fresh one from its forward pre-hook."""

    def __init__(self, module: Optional[nn.Module]):
        self.ref = weakref.ref(module) if module is not None else None

    def __call__(self, g):
        m = self.ref() if self.ref is not None else None
        mk = m._buffers.get(MASK_NAME) if m is not None else None
        if mk is None or g.shape != mk.shape:
            return g
        return g * mk.to(g.device)

    def __reduce__(self):
        return (_MaskGrad, (None,))


def _attach_param(module: nn.Module) -> None:
    """Tie the weight Parameter to its module (owner reference + gradient hook), once per Parameter
    object: a deep copy, an unpickled model or ``load_state_dict(assign=True)`` brings a new
    Parameter, tied here on its first forward."""
    w = module.weight
    ref = _OWNERS.get(w)
    if ref is None or ref() is not module:
        _OWNERS[w] = weakref.ref(module)
        old = _GRAD_HANDLES.pop(w, None)
        if old is not None:
            old.remove()
    # a frozen weight takes no gradient hook (torch refuses one); it gets one once it requires grad
    if w.requires_grad and w not in _GRAD_HANDLES:
        _GRAD_HANDLES[w] = w.register_hook(_MaskGrad(module))


def _foreign(module: nn.Module, w) -> bool:
    """Whether ``w``, in ``module``'s weight slot, is a tensor the caller lent for one call
    (``torch.func.functional_call`` / ``stack_module_state`` put plain tensors there) rather than the
    module's own Parameter: not a Parameter, or the masked weight of another live module."""
    if not isinstance(w, nn.Parameter):
        return True
    ref = _OWNERS.get(w)
    owner = ref() if ref is not None else None
    return owner is not None and owner is not module and owner._parameters.get("weight") is w


def _restore_lent(module: nn.Module, args, output):
    lent = module.__dict__.pop("_sparseprune_lent", None)
    if lent is not None:
        module._parameters["weight"] = lent[0]


def _forward_pre_hook(module: nn.Module, args):
    mask = module._buffers.get(MASK_NAME)
    if mask is None:
        return
    w = module._parameters.get("weight")
    if w is not None and _foreign(module, w):
        # A lent tensor is never written: the call computes with a masked copy (differentiable, so its
        # gradient is zero at pruned entries, as the gradient hook makes it for the own weight); the lent
        # tensor is put back in the slot when the forward ends, even by an exception.
        if mask.shape != w.shape:
            raise ValueError(f"{type(module).__name__}: a weight of shape {tuple(w.shape)} was passed for a "
                             f"layer masked with shape {tuple(mask.shape)}")
        if not any(h is _restore_lent for h in module._forward_hooks.values()):
            module.register_forward_hook(_restore_lent, always_call=True)  # kept: removed by remove_masks
        module.__dict__["_sparseprune_lent"] = (w,)
        module._parameters["weight"] = w.masked_fill(~mask.to(w.device), 0)
        return
    _attach_param(module)
    _enforce(module)


def _optimizer_step_post_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _OWNERS.get(p)
            module = ref() if ref is not None else None
            if module is None or module._buffers.get(MASK_NAME) is None or module.weight is not p:
                continue
            _enforce(module)
            mask = module._buffers[MASK_NAME]
            state = optimizer.state.get(p)
            if state:
                for v in state.values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        v.masked_fill_(~mask, 0)


def _install_step_hook() -> None:
    global _step_hook_handle
    if _step_hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _step_hook_handle = register_optimizer_step_post_hook(_optimizer_step_post_hook)


def _check_module(module: nn.Module) -> Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise TypeError(f"{type(module).__name__} has no weight Parameter to mask")
    return w


def apply_mask(module: nn.Module, mask: Tensor) -> nn.Module:
    """Attach (or replace) ``mask`` (bool, weight-shaped, True = keep) on ``module`` and zero the
    pruned weights now. Calling it again on a masked module replaces the mask (hooks are kept)."""
    w = _check_module(module)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool).clone()
    if MASK_NAME in module._buffers:
        module._buffers[MASK_NAME] = mask
    else:
        module.register_buffer(MASK_NAME, mask)
    if not hasattr(module, _HOOKS_ATTR):
        object.__setattr__(module, _HOOKS_ATTR, (module.register_forward_pre_hook(_forward_pre_hook),))
    _attach_param(module)
    _install_step_hook()
    _enforce(module)
    return module


def is_masked(module: nn.Module) -> bool:
    return module._buffers.get(MASK_NAME) is not None


def get_mask(module: nn.Module) -> Optional[Tensor]:
    """The module's boolean keep-mask, or None when it is not masked."""
    return module._buffers.get(MASK_NAME)


def masked_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if is_masked(mod):
            yield name, mod


def apply_masks(model: nn.Module) -> nn.Module:
    """Re-apply every mask now (e.g. after loading weights into a masked model)."""
    for _, mod in masked_modules(model):
        _enforce(mod)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights and remove buffers and hooks. ``module.weight`` stays the same
    Parameter object, now holding the zeros. Returns ``model``."""
    for _, mod in list(masked_modules(model)):
        w = getattr(mod, "weight", None)
        if not isinstance(w, Tensor) or w.shape == mod._buffers[MASK_NAME].shape:
            _enforce(mod)  # (a weight resized since pruning: the mask no longer fits; dropped as it is)
        for h in getattr(mod, _HOOKS_ATTR, ()):
            h.remove()
        for k in [k for k, h in mod._forward_hooks.items() if h is _restore_lent]:
            del mod._forward_hooks[k]
            mod._forward_hooks_always_called.pop(k, None)
        if hasattr(mod, _HOOKS_ATTR):
            object.__delattr__(mod, _HOOKS_ATTR)
        del mod._buffers[MASK_NAME]
        w = mod.weight
        handle = _GRAD_HANDLES.pop(w, None)
        if handle is not None:
            handle.remove()
        _OWNERS.pop(w, None)
        # hooks that came with a deep copy or unpickling are inert without the buffer; drop them too
        if w._backward_hooks:
            for k, h in list(w._backward_hooks.items()):
                if isinstance(h, _MaskGrad):
                    del w._backward_hooks[k]
    return model


def _layer_test(types):
    """``types`` as a predicate; None: the layers the pattern pruners take (Linear, Conv2d, Hugging Face Conv1D)."""
    if types is None:
        from .patterns import is_prunable  # patterns imports this module
        return is_prunable
    return lambda m: isinstance(m, types)


def _weighted(model: nn.Module, types):
    """(name, module, weight) of the modules ``types`` selects that hold a weight tensor (a LayerNorm built
    with ``elementwise_affine=False`` has ``weight = None``: nothing to count)."""
    test = _layer_test(types)
    for name, m in model.named_modules():
        if test(m):
            w = getattr(m, "weight", None)
            if isinstance(w, Tensor):
                yield name, m, w


def layer_sparsity(model: nn.Module, types=None) -> Dict[str, float]:
    """Fraction of exact zeros in each Linear / Conv2d / Conv1D weight (or each module of ``types``), by name;
    modules without a weight tensor are left out."""
    return {name: float((w == 0).sum()) / max(w.numel(), 1) for name, _, w in _weighted(model, types)}


def sparsity(model: nn.Module, types=None, only_masked: bool = False) -> float:
    """Overall fraction of zeros over the Linear / Conv2d / Conv1D weights (or the modules of ``types``; or only
    the masked ones); modules without a weight tensor are left out."""
    zeros = total = 0
    for _, m, w in _weighted(model, types):
        if not only_masked or is_masked(m):
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def sync_masks(model: nn.Module, src: int = 0, group=None) -> nn.Module:
    """Broadcast every mask from rank ``src`` and re-apply it (torch.distributed must be initialised).
    Needed when ranks computed masks from different data (e.g. Wanda on each rank's own batches);
    masks computed from the same weights (magnitude, DDP-synchronised parameters) already agree.
    DistributedDataParallel with ``broadcast_buffers=True`` also broadcasts the mask buffers on every
    forward; the forward pre-hook then applies them."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_masks needs an initialised torch.distributed process group")
    for _, mod in masked_modules(model):
        mask = mod._buffers[MASK_NAME]
        buf = mask.to(torch.uint8)
        dist.broadcast(buf, src=src, group=group)
        mod._buffers[MASK_NAME] = buf.to(torch.bool)
        _enforce(mod)
    return model
