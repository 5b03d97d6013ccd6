"""Sparsity-inducing penalties to add to the training loss, so that whole blocks / channels drift
towards zero *before* they are pruned (and pruning them then costs little accuracy).

    loss = task_loss + 1e-4 * group_lasso(model, block_size=(8, 8)) + 1e-5 * bn_l1(model)

* :func:`group_lasso`: sum over groups of the group's L2 norm (the L2,1 norm; Yuan & Lin), groups
  being the same r x c blocks ``prune_blocks`` removes (Conv2d: r x c channels x all kernel
  positions), or output channels (``groups="channels"``), or input channels (``"in_channels"``).
  Each group norm is scaled by sqrt(group size) so that edge blocks are not favoured.
  A Hugging Face ``Conv1D`` (weight stored (in, out)) is grouped on its (out, in) view ``weight.T``, as the
  pattern pruners see it: its penalty is the equivalent nn.Linear's.
* :func:`l1_penalty` / :func:`l2_penalty`: element-wise.
* :func:`bn_l1`: L1 of BatchNorm scales (network slimming; Liu et al., 2017) for channel pruning.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patterns import check_block_size, is_conv1d, select_layers

__all__ = ["group_lasso", "group_norms", "l1_penalty", "l2_penalty", "bn_l1"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def group_norms(weight: Tensor, groups="blocks", block_size=(16, 16)) -> Tensor:
    """L2 norm of every group of ``weight`` (differentiable): (Mb, Kb) for blocks, (out,) / (in,)
    for channels. ``weight`` is (out, in, *kernel): pass a Conv1D's ``weight.T``."""
    o, i = weight.shape[:2]
    sq = weight.pow(2).reshape(o, i, -1).sum(2)
    if groups == "channels":
        return _safe_sqrt(sq.sum(1))
    if groups == "in_channels":
        return _safe_sqrt(sq.sum(0))
    if groups != "blocks":
        raise ValueError(f"groups must be 'blocks', 'channels' or 'in_channels', got {groups!r}")
    r, c = check_block_size(block_size)
    mb, kb = math.ceil(o / r), math.ceil(i / c)
    sq = F.pad(sq, (0, kb * c - i, 0, mb * r - o))
    return _safe_sqrt(sq.reshape(mb, r, kb, c).sum((1, 3)))


def _safe_sqrt(sq: Tensor) -> Tensor:
    """sqrt of non-negative ``sq`` with value 0 and gradient 0 where ``sq`` is 0: an all-zero (pruned, masked)
    group would otherwise give 0 * inf = NaN, which a mask's gradient hook cannot undo (NaN * 0 = NaN)."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def group_lasso(model: nn.Module, block_size=(16, 16), groups: str = "blocks", layers=None, exclude=None,
                dense_first_last=None, normalize: bool = True) -> Tensor:
    """Sum over the selected layers' groups of ||group||_2 (x sqrt(group size) when ``normalize``)."""
    total = None
    for _, mod in select_layers(model, layers, exclude, dense_first_last).items():
        w = mod.weight.t() if is_conv1d(mod) else mod.weight  # (out, in, *kernel), as prune_blocks groups it
        norms = group_norms(w, groups, block_size)
        if normalize:
            o, i = w.shape[:2]
            p = w[0, 0].numel()
            if groups == "blocks":
                r, c = check_block_size(block_size)
                size = float(min(r, o) * min(c, i) * p)
            else:
                size = float((i if groups == "channels" else o) * p)
            norms = norms * math.sqrt(size)
        v = norms.sum()
        total = v if total is None else total + v
    return total if total is not None else torch.zeros(())


def l1_penalty(model: nn.Module, layers=None, exclude=None, dense_first_last=None) -> Tensor:
    return sum((m.weight.abs().sum() for m in select_layers(model, layers, exclude, dense_first_last).values()),
               torch.zeros(()))


def l2_penalty(model: nn.Module, layers=None, exclude=None, dense_first_last=None) -> Tensor:
    return sum((m.weight.pow(2).sum() for m in select_layers(model, layers, exclude, dense_first_last).values()),
               torch.zeros(()))


def bn_l1(model: nn.Module) -> Tensor:
    """Sum of |gamma| over BatchNorm (and affine Group/LayerNorm) layers."""
    return sum((m.weight.abs().sum() for m in model.modules()
                if isinstance(m, _BN) and isinstance(getattr(m, "weight", None), nn.Parameter)), torch.zeros(()))
