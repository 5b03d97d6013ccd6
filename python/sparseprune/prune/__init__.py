"""Pruning: pattern pruning (masks kept) and structural pruning (channels removed)."""
from .patterns import prune_unstructured, prune_blocks, prune_nm, select_layers, pattern_mask  # noqa: F401
from .masks import apply_masks, remove_masks, sync_masks, get_mask, is_masked, masked_modules  # noqa: F401
from .masks import sparsity, layer_sparsity  # noqa: F401
from . import masks  # noqa: F401
from .criteria import GradientScores  # noqa: F401
from .schedule import GradualPruner, cubic_sparsity, iterative_prune  # noqa: F401
from .regularize import group_lasso, bn_l1, l1_penalty, l2_penalty  # noqa: F401
from .search import Plan, search_plans, sensitivity  # noqa: F401
from .channels import ChannelPruneReport, ChannelPruneWarning  # noqa: F401
from .channels import prune_channels as _prune_channels

import functools as _functools


def _shapes(model):
    out = {}
    for name, m in model.named_modules():
        sig = [(k, tuple(t.shape)) for k, t in list(m._parameters.items()) + list(m._buffers.items())
               if t is not None]
        sig += [(k, v) for k, v in vars(m).items() if type(v) is int and not k.startswith("_")]
        out[name] = sorted(sig)
    return out


@_functools.wraps(_prune_channels)
def prune_channels(model, *args, **kwargs):
    # Record which modules changed size: sparseprune.save lists them, and load lets only those differ
    # from a fresh instance of the architecture (any other size difference means a wrong architecture).
    from ..io import RESHAPED_ATTR
    before = _shapes(model)
    out = _prune_channels(model, *args, **kwargs)
    after = _shapes(model)
    changed = {n for n in after if before.get(n) != after[n]}
    if changed:
        marked = set(getattr(model, RESHAPED_ATTR, ()) or ()) | changed
        object.__setattr__(model, RESHAPED_ATTR, sorted(marked))
    return out
