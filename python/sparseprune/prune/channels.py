"""Structural (channel) pruning with dependency groups.

``prune_channels`` traces the model once (``graph.trace``), turns the channel atoms into dependency
groups (every parameter slice that must go together), scores each unit, removes the lowest-scoring
units physically, and checks by running the model again that every output keeps its shape. A group
whose removal breaks the model is put back and reported; the model is never left broken.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import graph
from .graph import FIXED
from .importance import IMPORTANCES, unit_scores

__all__ = ["prune_channels", "ChannelPruneReport", "ChannelPruneWarning"]


class ChannelPruneWarning(UserWarning):
    """A group of channels was left alone because it could not be pruned safely."""


@dataclass
class Group:
    units: list                 # root atom per unit
    slots: list                 # indices into trace.slots
    members: dict = field(default_factory=dict)   # root -> [(slot index, LongTensor positions)]
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
def _check_args(model, example_inputs, ratio, importance, global_ranking, round_to, ignore):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError("example_inputs must be a tensor, a tuple of positional arguments or a dict of "
                        f"keyword arguments, got {type(example_inputs).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise TypeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of channels removed; at least one channel "
                         f"always stays), got {ratio}")
    if not (callable(importance) or importance in IMPORTANCES):
        raise ValueError(f"importance must be one of {sorted(IMPORTANCES)} or a callable, got {importance!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    if not isinstance(global_ranking, bool):
        raise TypeError("global_ranking must be a bool")
    for x in ignore:
        if not isinstance(x, (nn.Module, str, type)):
            raise TypeError(f"ignore entries must be modules, qualified names or module classes, got {x!r}")


def _resolve_ignore(model, ignore):
    names = dict(model.named_modules())
    out = set()
    for x in ignore:
        if isinstance(x, str):
            if x not in names:
                raise ValueError(f"ignore: no submodule named {x!r}")
            out.update(id(m) for m in names[x].modules())
        elif isinstance(x, type):
            out.update(id(m) for m in model.modules() if isinstance(m, x))
        else:
            if not any(m is x for m in model.modules()):
                raise ValueError("ignore: module is not part of the model")
            out.update(id(m) for m in x.modules())
    return out


# ------------------------------------------------------------------------------------------- groups
def _build_groups(tr, ignored):
    uf = tr.uf
    # two slots over the same tensor dim (tied weights) share their atoms index by index
    by_key = {}
    for s in tr.slots:
        by_key.setdefault((s.key, s.dim), []).append(s)
    for ss in by_key.values():
        for s in ss[1:]:
            n = min(len(s.atoms), len(ss[0].atoms))
            for a, b in zip(ss[0].atoms[:n].tolist(), s.atoms[:n].tolist()):
                uf.union(a, b)
    for s in tr.slots:
        owners = tr.owners.get(s.key, [])
        if any(id(o[0]) in ignored for o in owners):
            for a in s.atoms.tolist():
                uf.union(FIXED, a)
    fixed_root = uf.find(FIXED)
    roots = [uf.roots(s.atoms) for s in tr.slots]
    # connected components of slots through shared roots
    comp = graph.UnionFind()
    slot_node = comp.new(len(tr.slots)).tolist()
    first = {}
    for i, r in enumerate(roots):
        for a in torch.unique(r).tolist():
            if a < 0 or a == fixed_root:
                continue
            if a in first:
                comp.union(slot_node[i], slot_node[first[a]])
            else:
                first[a] = i
    groups = {}
    for a, i in first.items():
        g = groups.setdefault(comp.find(slot_node[i]), Group([], []))
        g.units.append(a)
    for i, r in enumerate(roots):
        uniq, inv = torch.unique(r, return_inverse=True)
        ul = uniq.tolist()
        if not any(a >= 0 and a != fixed_root for a in ul):
            continue
        g = groups[comp.find(slot_node[i])]
        g.slots.append(i)
        g.slot_roots[i] = (ul, inv)
        order = torch.argsort(inv, stable=True)
        for a, pos in zip(ul, torch.split(order, torch.bincount(inv, minlength=len(ul)).tolist())):
            if a >= 0 and a != fixed_root:
                g.members.setdefault(a, []).append((i, pos))
    out = []
    for g in groups.values():
        producers = [i for i in g.slots if tr.slots[i].kind == "out"]
        if not producers:
            continue
        # a unit that no producer emits has nothing to remove (e.g. an input channel): not prunable
        g.units = [a for a in g.units if any(tr.slots[i].kind == "out" for i, _ in g.members[a])]
        if g.units:
            g.units.sort()
            out.append(g)
    return out, roots


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
        outs = [len(p) for i, p in g.members[a] if tr.slots[i].kind == "out"]
        per.append(min(outs) if outs else 1)
    cpu = max(1, min(per))
    return round_to // math.gcd(round_to, cpu)


def _select(groups, scores, ratio, round_to, global_ranking, tr, roots):
    """Units to remove, per group (list of roots)."""
    plan = []
    rounds = [_unit_round(g, tr, round_to) for g in groups]
    if global_ranking:
        allu = []
        for gi, g in enumerate(groups):
            allu += [(float(scores[gi][j]), gi, j) for j in range(len(g.units))]
        allu.sort()
        n_total = len(allu)
        k = int(math.floor(n_total * ratio + 1e-9))
        chosen = {}
        for _, gi, j in allu[:k]:
            chosen.setdefault(gi, []).append(j)
        for gi, g in enumerate(groups):
            n = len(g.units)
            want = len(chosen.get(gi, []))
            keep = _n_keep(n, want / n if n else 0, rounds[gi]) if want else n
            order = torch.argsort(scores[gi], stable=True).tolist()
            plan.append([g.units[j] for j in order[: n - keep]])
    else:
        for gi, g in enumerate(groups):
            n = len(g.units)
            keep = _n_keep(n, ratio, rounds[gi])
            order = torch.argsort(scores[gi], stable=True).tolist()
            plan.append([g.units[j] for j in order[: n - keep]])
    # never empty a layer: every slot keeps at least one of its channels
    for gi, g in enumerate(groups):
        pr = set(plan[gi])
        changed = True
        while changed:
            changed = False
            for i in g.slots:
                r = roots[i]
                live = [a for a in torch.unique(r).tolist() if a >= 0]
                if live and all(a in pr for a in live):  # a fixed root is never in pr
                    best = max((a for a in live if a in pr), key=lambda a: float(scores[gi][g.units.index(a)]))
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


def _apply(model, tr, groups, plan_sets, roots, undo):
    """Remove the planned units from every tensor they touch; fix module attributes."""
    pruned = set()
    for s in plan_sets:
        pruned |= s
    if not pruned:
        return
    keep = {}   # (key, dim) -> bool mask
    for i, s in enumerate(tr.slots):
        r = roots[i]
        rm = torch.tensor([int(a) in pruned for a in r.tolist()], dtype=torch.bool)
        if not bool(rm.any()):
            continue
        m = keep.setdefault((s.key, s.dim), torch.ones(len(r), dtype=torch.bool))
        m &= ~rm
    changed = {}
    for (key, dim), m in keep.items():
        changed.setdefault(key, []).append((dim, m.nonzero().view(-1)))
    old_shapes = {}
    for key, dims in changed.items():
        t = tr.tensors[key]
        old_shapes[key] = tuple(t.shape)
        new = t.detach()
        for dim, idx in dims:
            new = new.index_select(dim, idx.to(new.device))
        new = new.clone()
        if isinstance(t, nn.Parameter):  # one object for every owner: tied weights stay tied
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for mod, attr, is_buf, _ in tr.owners[key]:
            undo.setattr(mod, attr, new, "buffer" if is_buf else "param")
    mods = {}
    for key in changed:
        for mod, attr, _, _ in tr.owners[key]:
            mods[id(mod)] = mod
    for mod in mods.values():
        _fix_module_attrs(mod, tr, undo)
    # attributes tied to channel counts (LayerNorm without weight, GroupNorm groups)
    for mod, attr, atoms in tr.attr_slots:
        r = tr.uf.roots(atoms)
        n = int(sum(1 for a in r.tolist() if a not in pruned))
        if attr == "normalized_shape":
            undo.setattr(mod, attr, (n,))
        elif attr == "num_groups":
            undo.setattr(mod, attr, n)
        elif attr == "num_channels":
            undo.setattr(mod, attr, n)
    for site in tr.split_sites:
        _fix_split_site(site, tr, pruned, undo)


def _fix_module_attrs(mod, tr, undo):
    w = getattr(mod, "weight", None)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
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
    if site.dim == last:  # innermost shrinks: the outer counts (groups, heads) stay as they are
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
        if v == size and "head" in low:                    # num_heads, n_heads, num_attention_heads
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
            return graph._call(model, example_inputs)
    finally:
        model.train(was)


def _validate(model, example_inputs, ref_shapes):
    try:
        out = _run(model, example_inputs)
    except Exception as e:  # the model may raise anything when a reshape no longer fits
        return f"the pruned model fails to run ({type(e).__name__}: {str(e)[:160]})"
    if _shapes(out) != ref_shapes:
        return "the pruned model's output shapes would change"
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
def prune_channels(model, example_inputs, ratio=0.5, *, importance="l1", global_ranking=False,
                   ignore=(), round_to=1, prune_heads=True, loss_fn=None, seed=0, dry_run=False,
                   return_report=False, verbose=False, **kwargs):
    """Remove whole channels (filters, features, attention heads) and everything coupled to them.

    Args:
        model: the ``nn.Module`` to prune in place (it is returned).
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments; one
            forward pass on it finds the dependencies, and a second one checks the result.
        ratio: fraction of the channels of every dependency group to remove, in [0, 1). At least one
            channel of every layer always stays.
        importance: ``"l1"``, ``"l2"`` (norms of every coupled weight slice), ``"bn_scale"`` (|gamma| of
            the group's BatchNorm), ``"taylor"`` (|w * dL/dw|, needs ``loss_fn`` or gradients already
            in ``.grad``), ``"random"``, or a callable ``f(tensor, dim) -> scores per index``.
        global_ranking: rank every unit of the model together instead of removing ``ratio`` of every
            group (norms and Taylor scores are then taken per weight, so wide layers are not favoured).
        ignore: modules, qualified names or module classes whose channels must not change.
        round_to: keep channel counts multiples of this (groups smaller than it stay whole).
        prune_heads: attention written as Linear + reshape loses whole heads; False keeps it whole.
        loss_fn: ``loss_fn(output) -> scalar`` for ``"taylor"``.
        seed: for ``"random"``.
        dry_run: report what would be removed and leave ``model`` untouched (returns the report).
        return_report: return ``(model, report)``.

    Groups that cannot be pruned safely are left alone with a ``ChannelPruneWarning`` and an entry in
    the report's ``skipped`` list. Model outputs keep their shapes.
    """
    if kwargs:
        raise TypeError(f"prune_channels got unexpected keyword arguments: {sorted(kwargs)}")
    ignore = (ignore,) if isinstance(ignore, (nn.Module, str, type)) else tuple(ignore)
    _check_args(model, example_inputs, ratio, importance, global_ranking, round_to, ignore)
    if importance == "taylor" and loss_fn is None and not any(p.grad is not None for p in model.parameters()):
        raise ValueError('importance="taylor" needs loss_fn=callable(output) -> scalar, or gradients in .grad')
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    if dry_run:
        clone = copy.deepcopy(model)
        _, rep = prune_channels(clone, example_inputs, ratio, importance=importance,
                                global_ranking=global_ranking,
                                ignore=[n for n in _ignore_names(model, ignore)], round_to=round_to,
                                prune_heads=prune_heads, loss_fn=loss_fn, seed=seed, return_report=True)
        rep.dry_run = True
        return rep
    ignored = _resolve_ignore(model, ignore)

    macs_b, ref_out = graph.module_macs(model, example_inputs)
    ref_shapes = _shapes(ref_out)
    before = _layer_table(model)
    pb = sum(p.numel() for p in model.parameters())

    tr = graph.trace(model, example_inputs, prune_heads=prune_heads)
    groups, roots = _build_groups(tr, ignored)
    grads = None
    if importance == "taylor":
        grads = _taylor_grads(model, example_inputs, loss_fn)
    gen = torch.Generator().manual_seed(seed)
    scores = [unit_scores(g, tr, roots, importance, grads, gen, model, global_ranking) for g in groups]
    plan = _select(groups, scores, ratio, round_to, global_ranking, tr, roots)

    skipped = []
    undo = _Undo()
    _apply(model, tr, groups, [set(p) for p in plan], roots, undo)
    why = _validate(model, example_inputs, ref_shapes)
    if why is not None:
        # put everything back, then add groups one at a time and keep the ones that are safe
        undo.undo()
        accepted = []
        for gi, g in enumerate(groups):
            if not plan[gi]:
                continue
            trial = _Undo()
            _apply(model, tr, groups, [set(plan[j]) for j in accepted] + [set(plan[gi])], roots, trial)
            w = _validate(model, example_inputs, ref_shapes)
            trial.undo()
            if w is None:
                accepted.append(gi)
            else:
                skipped.append(dict(layers=g.describe(tr), reason=w))
        undo = _Undo()
        _apply(model, tr, groups, [set(plan[j]) for j in accepted], roots, undo)
        final = _validate(model, example_inputs, ref_shapes)
        if final is not None:  # combinations can still interact: give up rather than break the model
            undo.undo()
            skipped.append(dict(layers="all groups", reason=final))
            accepted = []
        plan = [plan[j] if j in accepted else [] for j in range(len(plan))]
    for s in skipped:
        warnings.warn(f"prune_channels left alone {s['layers']}: {s['reason']}", ChannelPruneWarning, stacklevel=2)
    for p in model.parameters():
        p.grad = None

    after = _layer_table(model)
    macs_a, _ = graph.module_macs(model, example_inputs)
    pa = sum(p.numel() for p in model.parameters())
    rep = _report(before, after, macs_b, macs_a, pb, pa)
    rep.skipped = skipped
    rep.notes = list(dict.fromkeys(tr.notes))
    for gi, g in enumerate(groups):
        rep.groups.append(dict(layers=g.describe(tr), units=len(g.units), pruned=len(plan[gi]),
                               unit_size=max(sum(len(p) for _, p in g.members[a]) for a in g.units)))
    if verbose:
        print(rep)
    return (model, rep) if return_report else model


def _ignore_names(model, ignore):
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for x in ignore:
        if isinstance(x, nn.Module):
            if id(x) not in names:
                raise ValueError("ignore: module is not part of the model")
            out.append(names[id(x)])
        elif isinstance(x, type):
            out += [n for n, m in model.named_modules() if isinstance(m, x)]
        else:
            out.append(x)
    return out


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
            loss = loss_fn(graph._call(model, example_inputs))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            loss.backward()
    finally:
        model.train(was)
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = saved[id(p)]
    return grads
