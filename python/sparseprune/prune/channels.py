"""Structural (channel) pruning with dependency groups.

``prune_channels`` traces the model once (``graph.trace``), turns the channel atoms into dependency
groups (every parameter slice that must go together), scores each unit, removes the lowest-scoring
units physically, and checks by running the model again that every output keeps its shape. A group
whose removal breaks the model is put back and reported; the model is never left broken, and a call
that raises leaves it exactly as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._inputs import call_model
from . import graph
from .graph import FIXED
from .importance import IMPORTANCES, unit_scores
from .masks import MASK_NAME

__all__ = ["prune_channels", "ChannelPruner", "register_channel_rule", "unregister_channel_rule",
           "ChannelPruneReport", "ChannelPruneWarning"]


class ChannelPruneWarning(UserWarning):
    """A group of channels was left alone because it could not be pruned safely."""


@dataclass
class Group:
    units: list                 # root atom per unit
    slots: list                 # indices into trace.slots
    members: dict = field(default_factory=dict)   # root -> [(slot index, number of positions)], see _members
    unit_size: int = 0                              # most positions one unit spans
    slot_roots: dict = field(default_factory=dict)  # slot index -> (unique roots, inverse index)

    def describe(self, tr):
        mods = []
        for i in self.slots:
            m = tr.slots[i].module
            if m not in mods:
                mods.append(m)
        s = ", ".join(mods[:4])
        return s + (f", ... ({len(mods)} layers)" if len(mods) > 4 else "")


@dataclass
class ChannelPruneReport:
    layers: list = field(default_factory=list)   # dicts: name, type, in/out before/after, params, macs
    groups: list = field(default_factory=list)   # dicts: layers, units, pruned, unit_size
    skipped: list = field(default_factory=list)  # dicts: layers, reason
    notes: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    dry_run: bool = False

    def as_dict(self):
        return {k: getattr(self, k) for k in ("layers", "groups", "skipped", "notes", "params_before",
                                              "params_after", "macs_before", "macs_after", "dry_run")}

    def __str__(self):
        head = "channel pruning" + (" (dry run: nothing was changed)" if self.dry_run else "")
        rows = [("layer", "type", "in", "out", "params", "MACs")]
        for l in self.layers:
            if (l["in_before"], l["out_before"], l["params_before"]) == (l["in_after"], l["out_after"], l["params_after"]):
                continue
            rows.append((l["name"], l["type"], f'{l["in_before"]}->{l["in_after"]}', f'{l["out_before"]}->{l["out_after"]}',
                         f'{l["params_before"]}->{l["params_after"]}', f'{l["macs_before"]}->{l["macs_after"]}'))
        w = [max(len(str(r[i])) for r in rows) for i in range(6)]
        lines = [head] + ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        pb, pa = self.params_before, self.params_after
        mb, ma = self.macs_before, self.macs_after
        lines.append(f"params: {pb} -> {pa} ({100 * (1 - pa / max(pb, 1)):.1f}% removed)")
        lines.append(f"MACs:   {mb} -> {ma} ({100 * (1 - ma / max(mb, 1)):.1f}% removed)")
        for s in self.skipped:
            lines.append(f"left alone: {s['layers']}: {s['reason']}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- checks
def _check_ratio(name, r):
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise TypeError(f"{name} must be a number in [0, 1), got {r!r}")
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of channels removed; at least one channel "
                         f"always stays), got {r}")


def _check_args(model, example_inputs, ratio, importance, global_ranking, round_to, lists, layer_ratios,
                head_ratio, steps):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        more = f", ... ({len(meta)} in all)" if len(meta) > 4 else ""
        raise ValueError(f"weights on the meta device have no values to prune ({', '.join(map(repr, meta[:4]))}"
                         f"{more}); materialise the model first (to_empty + load weights)")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, Mapping)):
        raise TypeError("example_inputs must be a tensor, a tuple of positional arguments or a mapping of "
                        f"keyword arguments, got {type(example_inputs).__name__}")
    _check_ratio("ratio", ratio)
    if head_ratio is not None:
        _check_ratio("head_ratio", head_ratio)
    if not isinstance(layer_ratios, Mapping):
        raise TypeError("layer_ratios must be a mapping {name pattern or module: ratio}")
    for k, v in layer_ratios.items():
        if not isinstance(k, (str, nn.Module)):
            raise TypeError(f"layer_ratios keys must be name patterns (str) or modules, got {k!r}")
        _check_ratio(f"layer_ratios[{k!r}]", v)
    if not (callable(importance) or importance in IMPORTANCES):
        raise ValueError(f"importance must be one of {sorted(IMPORTANCES)} or a callable, got {importance!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(global_ranking, bool):
        raise TypeError("global_ranking must be a bool")
    for arg, xs in lists.items():
        for x in xs:
            if not isinstance(x, (nn.Module, str, type)):
                raise TypeError(f"{arg} entries must be modules, qualified names or module classes, got {x!r}")


def _as_list(x):
    return (x,) if isinstance(x, (nn.Module, str, type)) else tuple(x)


def _resolve_modules(model, xs, arg="ignore"):
    names = dict(model.named_modules())
    out = set()
    for x in xs:
        if isinstance(x, str):
            if x not in names:
                raise ValueError(f"{arg}: no submodule named {x!r}")
            out.update(id(m) for m in names[x].modules())
        elif isinstance(x, type):
            out.update(id(m) for m in model.modules() if isinstance(m, x))
        else:
            if not any(m is x for m in model.modules()):
                raise ValueError(f"{arg}: module is not part of the model")
            out.update(id(m) for m in x.modules())
    return out


# ------------------------------------------------------------------------------------------- groups
def _protect(tr, frozen, kept_outputs):
    """Fix the atoms of protected modules' slots: every slot of a frozen module, every slot but the input
    channels ("in") of a module whose outputs are kept."""
    uf = tr.uf
    for s in tr.slots:
        owners = tr.owners.get(s.key, [])
        if any(id(o[0]) in frozen for o in owners) or (
                s.kind != "in" and any(id(o[0]) in kept_outputs for o in owners)):
            for a in s.atoms.tolist():
                uf.union(FIXED, a)


def _tie_slots(tr):
    """Two slots over the same tensor dim (tied weights) share their atoms index by index."""
    by_key = {}
    for s in tr.slots:
        by_key.setdefault((s.key, s.dim), []).append(s)
    for ss in by_key.values():
        for s in ss[1:]:
            n = min(len(s.atoms), len(ss[0].atoms))
            for a, b in zip(ss[0].atoms[:n].tolist(), s.atoms[:n].tolist()):
                tr.uf.union(a, b)


def _build_groups(tr):
    uf = tr.uf
    table = uf.root_table()
    fixed_root = int(table[FIXED])
    roots, uniq, live = [], [], []
    for s in tr.slots:
        a = s.atoms
        r = torch.where(a >= 0, table[a.clamp_min(0)], a)
        u, inv = torch.unique(r, return_inverse=True)
        roots.append(r)
        uniq.append((u.tolist(), inv, u))
        live.append(u[(u >= 0) & (u != fixed_root)])
    # connected components of slots through shared roots: every slot joins the first slot holding each of
    # its roots (distinct pairs only: a layer's channels mostly share one first slot)
    comp = graph.UnionFind()
    slot_node = comp.new(len(tr.slots)).tolist()
    sid = torch.cat([torch.full((len(u),), i, dtype=torch.int64) for i, u in enumerate(live)]) if live else \
        torch.zeros(0, dtype=torch.int64)
    rts = torch.cat(live) if live else torch.zeros(0, dtype=torch.int64)
    first = {}
    if rts.numel():
        big = len(tr.slots)
        firsts = torch.full((len(uf.parent),), big, dtype=torch.int64).scatter_reduce(0, rts, sid, "amin")
        fs = firsts[rts]
        m = fs != sid
        for i, j in graph._unique_pairs(sid[m], fs[m]):
            comp.union(slot_node[i], slot_node[j])
        ur = torch.unique(rts)
        first = dict(zip(ur.tolist(), firsts[ur].tolist()))
    groups = {}
    for a, i in first.items():
        g = groups.setdefault(comp.find(slot_node[i]), Group([], []))
        g.units.append(a)
    n_atoms = len(uf.parent)
    size = torch.zeros(n_atoms, dtype=torch.int64)     # positions a unit spans over all slots
    emitted = torch.zeros(n_atoms, dtype=torch.bool)   # some producer ("out" slot) emits the unit
    for i, (ul, inv, u) in enumerate(uniq):
        if not live[i].numel():
            continue
        g = groups[comp.find(slot_node[i])]
        g.slots.append(i)
        g.slot_roots[i] = (ul, inv)
        ok = (u >= 0) & (u != fixed_root)
        size.index_add_(0, u[ok], torch.bincount(inv, minlength=len(ul))[ok])
        if tr.slots[i].kind == "out":
            emitted[u[ok]] = True
    out = []
    emitted = emitted.tolist()
    for g in groups.values():
        # a unit that no producer emits has nothing to remove (e.g. an input channel): not prunable
        g.units = [a for a in g.units if emitted[a]]
        if g.units:
            g.units.sort()
            g.unit_size = int(size[torch.tensor(g.units)].max())
            out.append(g)
    return out, roots


def _members(g, tr):
    """root -> [(slot index, positions in that slot)], built on demand."""
    if not g.members:
        for i in g.slots:
            ul, inv = g.slot_roots[i]
            for a, n in zip(ul, torch.bincount(inv, minlength=len(ul)).tolist()):
                if a >= 0:
                    g.members.setdefault(a, []).append((i, n))
    return g.members


def _n_keep(n, ratio, round_to):
    keep = max(1, n - int(math.floor(n * ratio + 1e-9)))
    if round_to > 1:
        if n < round_to:
            return n
        keep = min(n, int(math.ceil(keep / round_to)) * round_to)
    return keep


def _unit_round(g, tr, round_to):
    """round_to counts channels; a unit may be several channels of a layer (a head): round units so that
    the channel count is the multiple."""
    if round_to == 1:
        return 1
    per = []
    for a in g.units:
        outs = [n for i, n in _members(g, tr).get(a, []) if tr.slots[i].kind == "out"]
        per.append(min(outs) if outs else 1)
    cpu = max(1, min(per))
    return round_to // math.gcd(round_to, cpu)


def _select(groups, scores, targets, n0s, global_ranking, tr, global_k, rounds):
    """Units to remove, per group (list of roots). ``targets[gi]``: the fraction of the group's original
    ``n0s[gi]`` units that should be gone after this step, or None for a group ranked globally
    (``global_k`` lowest-scoring units of those groups go)."""
    plan = []
    chosen = {}
    if global_ranking:
        allu = []
        for gi, g in enumerate(groups):
            if targets[gi] is None:
                allu += [(float(scores[gi][j]), gi, j) for j in range(len(g.units))]
        allu.sort()
        for _, gi, j in allu[:max(0, global_k)]:
            chosen.setdefault(gi, []).append(j)
    for gi, g in enumerate(groups):
        n = len(g.units)
        if targets[gi] is None:
            want = len(chosen.get(gi, []))
            keep = _n_keep(n, want / n if n else 0, rounds[gi]) if want else n
        else:
            keep = min(n, _n_keep(n0s[gi], targets[gi], rounds[gi]))
        order = torch.argsort(scores[gi], stable=True).tolist()
        plan.append([g.units[j] for j in order[: n - keep]])
    # never empty a layer: every slot keeps at least one of its channels
    for gi, g in enumerate(groups):
        if not plan[gi]:
            continue
        pr = set(plan[gi])
        index = {a: j for j, a in enumerate(g.units)}
        changed = True
        while changed:
            changed = False
            for i in g.slots:
                live = [a for a in g.slot_roots[i][0] if a >= 0]
                if live and all(a in pr for a in live):  # a fixed root is never in pr
                    best = max((a for a in live if a in pr), key=lambda a: float(scores[gi][index[a]]))
                    pr.discard(best)
                    changed = True
        plan[gi] = [a for a in plan[gi] if a in pr]
    return plan


# ------------------------------------------------------------------------------------------- surgery
class _Undo:
    def __init__(self):
        self.log = []

    def setattr(self, obj, name, value, kind="attr"):
        if kind == "param":
            self.log.append((obj, name, obj._parameters[name], "param"))
            obj._parameters[name] = value
        elif kind == "buffer":
            self.log.append((obj, name, obj._buffers[name], "buffer"))
            obj._buffers[name] = value
        else:
            self.log.append((obj, name, getattr(obj, name), "attr"))
            setattr(obj, name, value)

    def undo(self):
        for obj, name, old, kind in reversed(self.log):
            if kind == "param":
                obj._parameters[name] = old
            elif kind == "buffer":
                obj._buffers[name] = old
            else:
                setattr(obj, name, old)
        self.log.clear()


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _trace_state(tr):
    """What ``_commit`` changes in a trace, to put back when a step fails."""
    return dict(slots=[(s, s.key, s.atoms) for s in tr.slots], owners=dict(tr.owners), tensors=dict(tr.tensors),
                attr_slots=list(tr.attr_slots), conv_info=dict(tr.conv_info),
                sites=[(site, dict(vars(site))) for site in tr.split_sites])


def _restore_trace(tr, state):
    for s, key, atoms in state["slots"]:
        s.key, s.atoms = key, atoms
    tr.owners, tr.tensors = state["owners"], state["tensors"]
    tr.attr_slots, tr.conv_info = state["attr_slots"], state["conv_info"]
    for site, fields in state["sites"]:
        vars(site).update(fields)


def _gone_table(tr, pruned):
    t = torch.zeros(len(tr.uf.parent), dtype=torch.bool)
    t[torch.tensor(sorted(pruned), dtype=torch.int64)] = True
    return t


def _is_gone(r, table):
    return (r >= 0) & table[r.clamp_min(0)]


def _apply(model, tr, groups, plan_sets, roots, undo):
    """Remove the planned units from every tensor they touch; fix module attributes. Returns the kept
    positions per (tensor id, dim) as bool masks."""
    pruned = set()
    for s in plan_sets:
        pruned |= s
    if not pruned:
        return {}
    gone = _gone_table(tr, pruned)
    keep = {}   # (key, dim) -> bool mask
    for i, s in enumerate(tr.slots):
        rm = _is_gone(roots[i], gone)
        if not bool(rm.any()):
            continue
        m = keep.setdefault((s.key, s.dim), torch.ones(len(rm), dtype=torch.bool))
        m &= ~rm
    changed = {}
    for (key, dim), m in keep.items():
        changed.setdefault(key, []).append((dim, m.nonzero().view(-1)))
    for key, dims in changed.items():
        t = tr.tensors[key]
        new = t.detach()
        for dim, idx in dims:
            new = new.index_select(dim, idx.to(new.device))
        # a fresh, contiguous tensor in the original memory format (channels_last stays channels_last)
        fmt = torch.channels_last if t.dim() == 4 and not t.is_contiguous() and \
            t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        new = new.clone(memory_format=fmt)
        if isinstance(t, nn.Parameter):  # one object for every owner: tied weights stay tied
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for mod, attr, is_buf, _ in tr.owners[key]:
            undo.setattr(mod, attr, new, "buffer" if is_buf else "param")
            if attr == "weight" and not is_buf:
                _slice_mask(mod, t, dims, undo)
    mods = {}
    for key in changed:
        for mod, attr, _, _ in tr.owners[key]:
            mods[id(mod)] = mod
    for mod in mods.values():
        _fix_module_attrs(mod, tr, undo)
    # attributes tied to channel counts (LayerNorm without weight, GroupNorm groups)
    for mod, attr, atoms in tr.attr_slots:
        r = tr.uf.roots(atoms)
        n = int((~_is_gone(r, gone)).sum())
        if attr == "normalized_shape":
            undo.setattr(mod, attr, (n,))
        elif attr == "num_groups":
            undo.setattr(mod, attr, n)
        elif attr == "num_channels":
            undo.setattr(mod, attr, n)
    for site in tr.split_sites:
        _fix_split_site(site, tr, pruned, undo)
    return keep


def _slice_mask(mod, old_weight, dims, undo):
    """A pattern-pruned layer's keep-mask (masks.py) loses the same positions as its weight, so the
    kept channels keep their pattern."""
    mask = mod._buffers.get(MASK_NAME)
    if mask is None or mask.shape != old_weight.shape:
        return
    for dim, idx in dims:
        mask = mask.index_select(dim, idx.to(mask.device))
    undo.setattr(mod, MASK_NAME, mask.contiguous(), "buffer")


def _commit(tr, keep, pruned, undo):
    """Make the trace describe the pruned model, so that the next step reuses it: slots lose the removed
    positions and point at the new tensors; split sites, attribute slots and conv shapes follow."""
    if not keep:
        return
    gone = _gone_table(tr, pruned)
    for s in tr.slots:
        m = keep.get((s.key, s.dim))
        if m is not None and len(m) == len(s.atoms):
            s.atoms = s.atoms[m]
    remap = {}
    for key in {k for k, _ in keep}:
        mod, attr, is_buf, _ = tr.owners[key][0]
        new = (mod._buffers if is_buf else mod._parameters)[attr]
        remap[key] = new
    for key, new in remap.items():
        tr.owners[id(new)] = tr.owners.pop(key)
        tr.tensors.pop(key, None)
    for key, new in remap.items():
        tr.tensors[id(new)] = new
    for s in tr.slots:
        if s.key in remap:
            s.key = id(remap[s.key])
    tr.attr_slots = [(mod, attr, atoms[~_is_gone(tr.uf.roots(atoms), gone)]) for mod, attr, atoms in tr.attr_slots]
    for site in tr.split_sites:
        if isinstance(site, graph.SplitSizeSite):
            site.atoms = site.atoms[~_is_gone(tr.uf.roots(site.atoms), gone)]
            site.size = site.atoms.numel()
        else:
            g = site.grid
            heads = [int(tr.uf.find(int(g.select(site.dim, j).reshape(-1)[0]))) for j in range(g.shape[site.dim])]
            idx = torch.tensor([j for j, a in enumerate(heads) if a not in pruned], dtype=torch.int64)
            site.grid = g.index_select(site.dim, idx)
    for mod in {id(o[0]): o[0] for k in remap for o in tr.owners[id(remap[k])]}.values():
        info = tr.conv_info.get(id(mod))
        w = mod._parameters.get("weight") if isinstance(mod, _CONV_MODULES) else None
        if info is not None and w is not None:  # a functional conv's module has no shape attributes to follow
            g0, _, _, transposed, mode = info
            if transposed:
                I, O = w.shape[0], w.shape[1] * mod.groups
            else:
                O, I = w.shape[0], w.shape[1] * mod.groups
            tr.conv_info[id(mod)] = (mod.groups, O, I, transposed, mode)
    undo.log.clear()


def _fix_module_attrs(mod, tr, undo):
    rule = graph.rule_for(mod)
    if rule is not None:  # a registered custom module fixes its own attributes
        if rule.update is not None:
            before = dict(vars(mod))
            try:
                rule.update(mod)
            finally:  # logged even when update raises half-way, so that the step can put them back
                for k, v in list(vars(mod).items()):
                    if k in before and before[k] is not v and not k.startswith("_"):
                        undo.log.append((mod, k, before[k], "attr"))
        return
    w = getattr(mod, "weight", None)
    if isinstance(mod, _CONV_MODULES):
        info = tr.conv_info.get(id(mod))
        groups = mod.groups
        if info is not None and info[4] == "whole":
            g0, O, I, transposed, _ = info
            if transposed:
                groups = g0 * w.shape[0] // I
            else:
                groups = g0 * w.shape[0] // O
            undo.setattr(mod, "groups", groups)
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            undo.setattr(mod, "in_channels", w.shape[0])
            undo.setattr(mod, "out_channels", w.shape[1] * groups)
        else:
            undo.setattr(mod, "out_channels", w.shape[0])
            undo.setattr(mod, "in_channels", w.shape[1] * groups)
    elif isinstance(mod, nn.Linear):
        undo.setattr(mod, "out_features", w.shape[0])
        undo.setattr(mod, "in_features", w.shape[1])
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        n = (w if w is not None else mod.running_mean).shape[0]
        undo.setattr(mod, "num_features", n)
    elif isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) and w is not None:
        undo.setattr(mod, "normalized_shape", (w.shape[0],))
    elif isinstance(mod, nn.GroupNorm) and w is not None:
        undo.setattr(mod, "num_channels", w.shape[0])
        if tr.gn_info.get(id(mod)) == "rows":
            undo.setattr(mod, "num_groups", w.shape[0])
    elif isinstance(mod, nn.Embedding):
        undo.setattr(mod, "embedding_dim", w.shape[1])
    elif isinstance(mod, nn.MultiheadAttention):
        E = mod.in_proj_weight.shape[1]
        for a in ("embed_dim", "kdim", "vdim"):
            undo.setattr(mod, a, E)
        undo.setattr(mod, "head_dim", E // mod.num_heads)
        undo.setattr(mod.out_proj, "in_features", mod.out_proj.weight.shape[1])
        undo.setattr(mod.out_proj, "out_features", mod.out_proj.weight.shape[0])
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and w is not None and w.dim() == 2:
        undo.setattr(mod, "nf", w.shape[1])  # Hugging Face GPT-2 style: weight is (in, out)
        if hasattr(mod, "nx"):
            undo.setattr(mod, "nx", w.shape[0])


def _fix_split_site(site, tr, pruned, undo):
    mod = site.module
    if mod is None:
        return
    if isinstance(site, graph.SplitSizeSite):
        r = tr.uf.roots(site.atoms)
        n = sum(1 for a in r.tolist() if a not in pruned)
        if n != site.size:
            for k, v in list(vars(mod).items()):
                if type(v) is int and v == site.size and "split" in k.lower():
                    undo.setattr(mod, k, n)
        return
    g = site.grid
    last = g.dim() - 1
    if site.dim == last and site.kind != "head_dim":  # innermost shrinks: outer counts (groups, heads) stay
        return
    r = tr.uf.roots(g)
    size = g.shape[site.dim]
    left = sum(1 for j in range(size) if int(r.select(site.dim, j).reshape(-1)[0]) not in pruned)
    if left == size:
        return
    total, rest = g.numel(), g.numel() // size
    for k, v in list(vars(mod).items()):
        if type(v) is not int:
            continue
        low = k.lower()
        if site.kind == "head_dim":
            if v == size and "head" in low and ("dim" in low or "size" in low) and "all" not in low:
                undo.setattr(mod, k, left)                 # head_dim, attention_head_size
            elif v == total and any(w in low for w in ("head", "embed", "inner", "all")):
                undo.setattr(mod, k, left * rest)          # all_head_size, inner_dim
        elif v == size and "head" in low:                  # num_heads, n_heads, num_attention_heads
            undo.setattr(mod, k, left)
        elif v == total and any(w in low for w in ("head", "embed", "inner", "all")):  # all_head_size, embed_dim
            undo.setattr(mod, k, left * rest)


# ------------------------------------------------------------------------------------------- checks
def _shapes(out):
    if isinstance(out, torch.Tensor):
        return ("T", tuple(out.shape))
    if isinstance(out, dict):
        return ("D", tuple((k, _shapes(v)) for k, v in out.items()))
    if isinstance(out, (list, tuple)):
        return ("L", tuple(_shapes(v) for v in out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return ("C", tuple((f.name, _shapes(getattr(out, f.name))) for f in dataclasses.fields(out)))
    return ("O", type(out).__name__)


def _run(model, example_inputs):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    finally:
        model.train(was)


def _validate(model, example_inputs, ref_shapes, macs=None):
    """None when the model runs and keeps its output shapes, else why not. The same pass counts MACs
    into ``macs`` (a dict) when given."""
    try:
        counts, out = graph.module_macs(model, example_inputs)
    except Exception as e:  # the model may raise anything when a reshape no longer fits
        return f"the pruned model fails to run ({type(e).__name__}: {str(e)[:160]})"
    if _shapes(out) != ref_shapes:
        return "the pruned model's output shapes would change"
    if macs is not None:
        macs.clear()
        macs.update(counts)
    return None


# ------------------------------------------------------------------------------------------- report
def _layer_table(model):
    rows = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if isinstance(mod, nn.MultiheadAttention):
            w = mod.in_proj_weight
        if w is None:
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            io = (mod.in_channels, mod.out_channels)
        elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
            io = (mod.in_channels, mod.out_channels)
        elif isinstance(mod, nn.Linear):
            io = (mod.in_features, mod.out_features)
        elif isinstance(mod, nn.Embedding):
            io = (mod.num_embeddings, mod.embedding_dim)
        elif isinstance(mod, nn.MultiheadAttention):
            io = (mod.embed_dim, mod.embed_dim)
        elif type(mod).__name__ == "Conv1D" and w.dim() == 2:
            io = (w.shape[0], w.shape[1])
        else:
            io = (w.shape[0], w.shape[0]) if w.dim() >= 1 else (1, 1)
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        if isinstance(mod, nn.MultiheadAttention):
            params = sum(p.numel() for p in mod.parameters())
        rows[name] = (type(mod).__name__, io[0], io[1], params)
    return rows


def _report(before, after, macs_b, macs_a, pb, pa):
    rep = ChannelPruneReport(params_before=pb, params_after=pa,
                             macs_before=sum(macs_b.values()), macs_after=sum(macs_a.values()))
    for name, (typ, i0, o0, p0) in before.items():
        _, i1, o1, p1 = after.get(name, (typ, i0, o0, p0))
        rep.layers.append(dict(name=name, type=typ, in_before=i0, in_after=i1, out_before=o0, out_after=o1,
                               params_before=p0, params_after=p1, macs_before=macs_b.get(name, 0),
                               macs_after=macs_a.get(name, 0)))
    return rep


# ------------------------------------------------------------------------------------------- API
def register_channel_rule(cls, *, in_params=None, out_params=None, in_dim=-1, out_dim=-1,
                          same_channels=False, update=None):
    """Tell channel pruning how a custom module's own parameters follow its channels.

    The module is then traced as one leaf (its forward is run but not looked into): its input channels
    are dim ``in_dim`` of its first tensor argument, its output channels dim ``out_dim`` of its first
    tensor output.

    Args:
        cls: the module class (subclasses match too).
        in_params: ``{name: dim}``: parameters/buffers whose ``dim`` is indexed by the input channels
            (a linear-like weight: ``{"weight": 1}``).
        out_params: ``{name: dim}``: parameters/buffers whose ``dim`` is indexed by the output channels
            (``{"weight": 0, "bias": 0}``).
        same_channels: the outputs are the inputs, channel for channel (a per-channel scale, a custom
            norm); ``out_params`` then follow the input channels.
        update: ``update(module)`` after the parameters were sliced: fix attributes derived from shapes
            (e.g. ``module.features = module.weight.shape[0]``).

    Returns ``cls`` (usable as a class decorator via ``functools.partial``). Registering again replaces
    the rule; ``unregister_channel_rule(cls)`` removes it.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError("register_channel_rule: cls must be an nn.Module subclass")
    if update is not None and not callable(update):
        raise TypeError("register_channel_rule: update must be callable")

    def norm(d, what):
        d = dict(d or {})
        for k, v in d.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"register_channel_rule: {what} must map parameter names to dims, got {k!r}: {v!r}")
        return tuple(d.items())

    graph._RULES[cls] = graph.ChannelRule(norm(in_params, "in_params"), norm(out_params, "out_params"),
                                          int(in_dim), int(out_dim), bool(same_channels), update)
    return cls


def unregister_channel_rule(cls):
    graph._RULES.pop(cls, None)


def _names_of(model, xs, arg):
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for x in xs:
        if isinstance(x, nn.Module):
            if id(x) not in names:
                raise ValueError(f"{arg}: module is not part of the model")
            out.append(names[id(x)])
        elif isinstance(x, type):
            out += [n for n, m in model.named_modules() if isinstance(m, x)]
        else:
            out.append(x)
    return out


def _module_sigs(model):
    out = {}
    for name, m in model.named_modules():
        sig = [(k, tuple(t.shape)) for k, t in list(m._parameters.items()) + list(m._buffers.items())
               if t is not None]
        sig += [(k, v) for k, v in vars(m).items() if type(v) is int and not k.startswith("_")]
        out[name] = sorted(sig)
    return out


def _mark_reshaped(model, before):
    """Record on the model which modules changed size: ``sparseprune.save`` lists them, and ``load`` lets
    only those differ from a fresh instance of the architecture."""
    try:
        from ..io import RESHAPED_ATTR
    except ImportError:  # an io without reshaped-module records: nothing to mark
        return
    after = _module_sigs(model)
    changed = {n for n in after if before.get(n) != after[n]}
    if changed:
        marked = set(getattr(model, RESHAPED_ATTR, ()) or ()) | changed
        object.__setattr__(model, RESHAPED_ATTR, sorted(marked))


class ChannelPruner:
    """Channel pruning in ``steps`` steps over one dependency graph: trace once, then ``step()`` removes
    the next share (after step i of k, ``ratio * i / k`` of every group's original channels are gone),
    so the model can be fine-tuned between steps. Arguments are those of :func:`prune_channels`.

    Each step replaces the pruned parameters with new (smaller) tensors: rebuild the optimizer after it.
    With ``importance="taylor"`` over several steps, pass ``loss_fn`` (gradients are cleared by a step).

    Example::

        pruner = ChannelPruner(model, x, ratio=0.5, steps=4, keep_outputs=[model.classifier])
        for _ in range(4):
            pruner.step()
            fine_tune(model, make_optimizer(model))
    """

    def __init__(self, model, example_inputs, ratio=0.5, *, steps=1, importance="l1", global_ranking=False,
                 layer_ratios=None, head_ratio=None, keep_outputs=(), freeze=(), ignore=(), round_to=1,
                 prune_heads=True, prune_head_dims=False, loss_fn=None, seed=0, verbose=False):
        keep_outputs, freeze, ignore = _as_list(keep_outputs), _as_list(freeze), _as_list(ignore)
        layer_ratios = {} if layer_ratios is None else layer_ratios
        _check_args(model, example_inputs, ratio, importance, global_ranking, round_to,
                    dict(keep_outputs=keep_outputs, freeze=freeze, ignore=ignore), layer_ratios, head_ratio, steps)
        if importance == "taylor" and loss_fn is None and not any(p.grad is not None for p in model.parameters()):
            raise ValueError('importance="taylor" needs loss_fn=callable(output) -> scalar, or gradients in .grad')
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        self.model, self.example_inputs = model, example_inputs
        self.ratio, self.steps, self.importance = float(ratio), steps, importance
        self.global_ranking, self.round_to, self.loss_fn, self.verbose = global_ranking, round_to, loss_fn, verbose
        self.head_ratio = head_ratio
        names = {id(m): n for n, m in model.named_modules()}
        self.layer_ratios = []
        for k, v in layer_ratios.items():
            if isinstance(k, nn.Module):
                if id(k) not in names:
                    raise ValueError("layer_ratios: module is not part of the model")
                k = names[id(k)]
            self.layer_ratios.append((k, float(v)))
        frozen = _resolve_modules(model, freeze, "freeze") | _resolve_modules(model, ignore, "ignore")
        kept = _resolve_modules(model, keep_outputs, "keep_outputs")
        self.gen = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.tr = graph.trace(model, example_inputs, prune_heads=prune_heads, head_dims=prune_head_dims)
        self.ref_shapes = _shapes(self.tr.output)
        self.tr.output = None          # frees the traced call's autograd graph
        self.macs_now = dict(self.tr.macs)
        _tie_slots(self.tr)
        _protect(self.tr, frozen, kept)
        self.n0 = {}   # unit root -> units of its group before any step
        self.global_n0 = None

    def _group_targets(self, groups, frac):
        tr = self.tr
        head_roots = set()
        for site in tr.split_sites:
            if isinstance(site, graph.SplitSite) and site.kind in ("heads", "head_dim"):
                head_roots.update(int(a) for a in tr.uf.roots(site.grid).reshape(-1).tolist())
        targets = []
        for g in groups:
            r = None
            if self.layer_ratios:
                mods = {tr.slots[i].module for i in g.slots if tr.slots[i].kind == "out"}
                hits = [v for pat, v in self.layer_ratios for m in mods if fnmatch.fnmatchcase(m, pat)]
                if hits:
                    r = min(hits)  # several patterns on one group: the gentlest wins
            if r is None and self.head_ratio is not None and any(a in head_roots for a in g.units):
                r = self.head_ratio
            if r is None and not self.global_ranking:
                r = self.ratio
            targets.append(None if r is None else r * frac)
        return targets

    def _step(self, undos):
        """Plan, apply, validate and commit one step; every undo log it opens is appended to ``undos``."""
        model, x, tr = self.model, self.example_inputs, self.tr
        frac = self.step_count / self.steps
        macs_b = self.macs_now
        macs_a = dict(macs_b)
        before = _layer_table(model)
        sigs = _module_sigs(model)
        pb = sum(p.numel() for p in model.parameters())

        groups, roots = _build_groups(tr)
        for g in groups:
            for a in g.units:
                self.n0.setdefault(a, len(g.units))
        n0s = [self.n0.get(g.units[0], len(g.units)) for g in groups]
        targets = self._group_targets(groups, frac)
        global_k = 0
        if self.global_ranking:
            pool_now = sum(len(g.units) for g, t in zip(groups, targets) if t is None)
            if self.global_n0 is None:
                self.global_n0 = pool_now
            global_k = int(math.floor(self.global_n0 * self.ratio * frac + 1e-9)) - (self.global_n0 - pool_now)
        grads = _taylor_grads(model, x, self.loss_fn) if self.importance == "taylor" else None
        scores = [unit_scores(g, tr, roots, self.importance, grads, self.gen, model, self.global_ranking)
                  for g in groups]
        rounds = [_unit_round(g, tr, self.round_to) for g in groups]
        plan = _select(groups, scores, targets, n0s, self.global_ranking, tr, global_k, rounds)

        skipped = [dict(d) for d in tr.pinned]   # channels an op mixes (graph._pin_mixing)
        undo = _Undo()
        undos.append(undo)
        keep = _apply(model, tr, groups, [set(p) for p in plan], roots, undo)
        why = _validate(model, x, self.ref_shapes, macs_a) if keep else None
        if why is not None:
            # put everything back, then add groups one at a time and keep the ones that are safe
            undo.undo()
            accepted = []
            for gi, g in enumerate(groups):
                if not plan[gi]:
                    continue
                trial = _Undo()
                undos.append(trial)
                _apply(model, tr, groups, [set(plan[j]) for j in accepted] + [set(plan[gi])], roots, trial)
                w = _validate(model, x, self.ref_shapes)
                trial.undo()
                if w is None:
                    accepted.append(gi)
                else:
                    skipped.append(dict(layers=g.describe(tr), reason=w))
            undo = _Undo()
            undos.append(undo)
            keep = _apply(model, tr, groups, [set(plan[j]) for j in accepted], roots, undo)
            final = _validate(model, x, self.ref_shapes, macs_a) if keep else None
            if final is not None:  # combinations can still interact: give up rather than break the model
                undo.undo()
                keep = {}
                macs_a = dict(macs_b)
                skipped.append(dict(layers="all groups", reason=final))
                accepted = []
            plan = [plan[j] if j in accepted else [] for j in range(len(plan))]
        pruned = set()
        for p in plan:
            pruned.update(p)
        for s in skipped:  # before the commit: a warning turned into an error still puts everything back
            warnings.warn(f"prune_channels left alone {s['layers']}: {s['reason']}", ChannelPruneWarning, stacklevel=3)
        _commit(tr, keep, pruned, undo)
        return groups, plan, keep, skipped, macs_b, macs_a, before, sigs, pb

    def step(self, return_report=False):
        """Prune the next share; returns the model, or ``(model, report)``."""
        if self.step_count >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done")
        model, tr = self.model, self.tr
        self.step_count += 1
        undos = []          # every undo log of this step: a failure anywhere replays them all
        state = _trace_state(tr)
        try:
            groups, plan, keep, skipped, macs_b, macs_a, before, sigs, pb = self._step(undos)
        except BaseException:
            # a call that raises leaves the model (and the trace) as they were
            for u in reversed(undos):
                u.undo()
            _restore_trace(tr, state)
            self.step_count -= 1
            raise
        for p in model.parameters():
            p.grad = None

        after = _layer_table(model)
        _mark_reshaped(model, sigs)
        if not keep:
            macs_a = dict(macs_b)
        self.macs_now = macs_a
        pa = sum(p.numel() for p in model.parameters())
        rep = _report(before, after, macs_b, macs_a, pb, pa)
        rep.skipped = skipped
        rep.notes = list(dict.fromkeys(tr.notes))
        for gi, g in enumerate(groups):
            rep.groups.append(dict(layers=g.describe(tr), units=len(g.units), pruned=len(plan[gi]),
                                   unit_size=g.unit_size))
        if self.verbose:
            print(rep)
        return (model, rep) if return_report else model


def prune_channels(model, example_inputs, ratio=0.5, *, importance="l1", global_ranking=False,
                   layer_ratios=None, head_ratio=None, keep_outputs=(), freeze=(), ignore=(), round_to=1,
                   prune_heads=True, prune_head_dims=False, loss_fn=None, seed=0, dry_run=False,
                   return_report=False, verbose=False, **kwargs):
    """Remove whole channels (filters, features, attention heads) and everything coupled to them.

    Args:
        model: the ``nn.Module`` to prune in place (it is returned).
        example_inputs: the arguments of one model call: a tensor, a tuple/list of positional arguments
            or any mapping (dict, ``BatchEncoding``) of keyword arguments. One forward pass on it finds
            the dependencies, and a second one checks the result.
        ratio: fraction of the channels of every dependency group to remove, in [0, 1). At least one
            channel of every layer always stays.
        importance: ``"l1"``, ``"l2"`` (norms of every coupled weight slice), ``"bn_scale"`` (|gamma| of
            the group's BatchNorm), ``"taylor"`` (|w * dL/dw|, needs ``loss_fn`` or gradients already
            in ``.grad``), ``"random"``, or a callable ``f(tensor, dim) -> scores per index``.
        global_ranking: rank every unit of the model together instead of removing ``ratio`` of every
            group (norms and Taylor scores are then taken per weight, so wide layers are not favoured).
            Groups with their own ratio (``layer_ratios``, ``head_ratio``) keep it.
        layer_ratios: ``{pattern: ratio}``: groups produced by a module whose qualified name matches the
            ``fnmatch`` pattern (``"encoder.layer.1*.intermediate.*"``; a module object also works) use
            that ratio; when several patterns match one group, the smallest ratio wins. 0 keeps a group.
        head_ratio: fraction of the attention heads removed (of the head dims with
            ``prune_head_dims``); default ``ratio``. ``layer_ratios`` take precedence.
        keep_outputs: modules (objects, qualified names or classes; a module covers its submodules)
            whose output channels must not change; their input channels may still shrink (what
            Torch-Pruning's ``ignored_layers`` means: a classifier listed here still lets the features
            feeding it be pruned).
        freeze: modules left entirely unchanged: input and output channels (so the layers feeding them
            keep their output channels too).
        ignore: same as ``freeze`` (its meaning before ``keep_outputs`` existed; kept for compatibility).
            Whatever is listed, the model's own outputs always keep their shapes.
        round_to: keep channel counts multiples of this (groups smaller than it stay whole).
        prune_heads: attention written as Linear + reshape loses whole heads; False keeps it whole.
        prune_head_dims: attention keeps its head count and every head loses the same positions of
            its head dim (q, k, v together); ``head_dim`` / ``attention_head_size`` / ``all_head_size``
            style attributes are updated. The softmax scale stored by the module is left as it was, so
            removing dead positions changes no output.
        loss_fn: ``loss_fn(output) -> scalar`` for ``"taylor"``.
        seed: for ``"random"``.
        dry_run: report what would be removed and leave ``model`` untouched (returns the report).
        return_report: return ``(model, report)``.

    For several steps with fine-tuning in between over one trace, use :class:`ChannelPruner`. For a
    custom module with its own parameters, see :func:`register_channel_rule`.

    Groups that cannot be pruned safely are left alone with a ``ChannelPruneWarning`` and an entry in
    the report's ``skipped`` list; so are channels that an op combines (softmax, cumsum or normalize
    over the channel dim, a reduction or argmax over it). Model outputs keep their shapes.
    """
    if kwargs:
        raise TypeError(f"prune_channels got unexpected keyword arguments: {sorted(kwargs)}")
    opts = dict(importance=importance, global_ranking=global_ranking, head_ratio=head_ratio,
                round_to=round_to, prune_heads=prune_heads, prune_head_dims=prune_head_dims, loss_fn=loss_fn,
                seed=seed, verbose=verbose)
    if dry_run:
        keep_outputs, freeze, ignore = _as_list(keep_outputs), _as_list(freeze), _as_list(ignore)
        _check_args(model, example_inputs, ratio, importance, global_ranking, round_to,
                    dict(keep_outputs=keep_outputs, freeze=freeze, ignore=ignore), layer_ratios or {},
                    head_ratio, 1)
        lr = {}
        for k, v in (layer_ratios or {}).items():
            lr[_names_of(model, [k], "layer_ratios")[0] if isinstance(k, nn.Module) else k] = v
        clone = copy.deepcopy(model)
        _, rep = ChannelPruner(clone, example_inputs, ratio, layer_ratios=lr,
                               keep_outputs=_names_of(model, keep_outputs, "keep_outputs"),
                               freeze=_names_of(model, freeze + ignore, "freeze"), **opts).step(return_report=True)
        rep.dry_run = True
        return rep
    pruner = ChannelPruner(model, example_inputs, ratio, layer_ratios=layer_ratios, keep_outputs=keep_outputs,
                           freeze=freeze, ignore=ignore, **opts)
    return pruner.step(return_report=return_report)


def _taylor_grads(model, example_inputs, loss_fn):
    if loss_fn is None:
        return {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
    saved = {id(p): p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = loss_fn(call_model(model, example_inputs))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            loss.backward()
    finally:
        model.train(was)
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = saved[id(p)]
    return grads
