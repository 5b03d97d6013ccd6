"""Importance of channel units (one score per unit of a dependency group)."""
from __future__ import annotations

import torch
import torch.nn as nn

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "random")


def _per_index(t, dim, how, grad=None):
    t = t.detach().float()
    other = [d for d in range(t.dim()) if d != dim]
    if how == "l1":
        v = t.abs()
    elif how == "l2":
        v = t.pow(2)
    elif how == "taylor":
        if grad is None:
            return torch.zeros(t.shape[dim])
        v = (t * grad.float()).abs()
    else:
        raise ValueError(how)
    return (v.sum(other) if other else v).cpu()


def unit_scores(group, tr, roots, importance, grads, gen, model, global_scale=False):
    """Score of every unit of ``group`` (same order as ``group.units``): the sum, over every weight slice
    the unit would remove, of the chosen per-index measure. Buffers (running statistics) do not vote."""
    n = len(group.units)
    if importance == "random":
        return torch.rand(n, generator=gen)
    slots = [i for i in group.slots if tr.slots[i].kind != "buffer"]
    how = importance
    if importance == "bn_scale":
        bn = [i for i in slots if _is_bn_weight(tr, tr.slots[i])]
        if bn:
            slots, how = bn, "l1"
        else:
            how = "l1"  # no BatchNorm in this group: fall back to the weight norms
    vec = {}
    for i in slots:
        s = tr.slots[i]
        t = tr.tensors[s.key]
        if callable(how):
            v = torch.as_tensor(how(t.detach(), s.dim), dtype=torch.float32).reshape(-1).cpu()
            if v.numel() != t.shape[s.dim]:
                raise ValueError(f"importance callable returned {v.numel()} scores for a dim of size {t.shape[s.dim]}")
        else:
            v = _per_index(t, s.dim, how, grads.get(s.key) if grads is not None else None)
        vec[i] = v
    # per slot, sum the measure of every root's positions at once; a unit's score adds its slots
    index = {a: j for j, a in enumerate(group.units)}
    out = torch.zeros(n, dtype=torch.float64)
    size = torch.zeros(n, dtype=torch.float64)
    for i, v in vec.items():
        ul, inv = group.slot_roots[i]
        sums = torch.zeros(len(ul), dtype=torch.float64).index_add_(0, inv, v.double())
        cnts = torch.bincount(inv, minlength=len(ul)).double()
        t = tr.tensors[tr.slots[i].key]
        per = t.numel() // max(t.shape[tr.slots[i].dim], 1)
        rows = torch.tensor([index.get(a, -1) for a in ul], dtype=torch.int64)
        sel = rows >= 0
        if bool(sel.any()):
            dst = rows[sel]
            out.index_add_(0, dst, sums[sel])
            size.index_add_(0, dst, cnts[sel] * per)
    size = size.clamp_min(1)
    if global_scale and how in ("l1", "l2", "taylor") and not (importance == "bn_scale"):
        # across groups, compare the mean per weight: a unit with a wider fan-in is not more important
        out = out / size
    return out.float()


def _is_bn_weight(tr, slot):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and attr == "weight"
               for m, attr, _, _ in tr.owners.get(slot.key, []))
