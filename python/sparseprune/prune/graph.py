"""Dependency graph for structural pruning, found by tracing one forward pass.

Every activation gets a shadow tensor of *channel labels* (int64, same shape): the id of the atom that
element belongs to. Layers with weights (conv, linear, embedding, attention) create fresh atoms for
their output channels and record which atoms their input channels consume. Data-movement ops
(view, permute, cat, split, getitem, ...) are replayed on the labels, so concatenation slices,
channel shuffles and flatten-into-classifier map channels exactly; element-wise ops (residual adds,
SE gates, biases, position embeddings) unify the atoms they combine. Atoms are merged in a
union-find; every root is one prunable unit, and atom 0 (``FIXED``) marks what must not change
(the model's outputs, unknown ops).
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode, resolve_name

from .._inputs import call_model

NONE = -1   # element carries no channel identity (constants, indices, model inputs)
FIXED = 0   # atom that must never be pruned


class UnionFind:
    def __init__(self):
        self.parent = [0]  # atom 0 = FIXED
        self._snap = None  # (number of atoms, merges so far, root of every atom) or None
        self.merges = 0

    def new(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.int64)

    def find(self, x):
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a, b):
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra < rb:  # smaller id wins: FIXED (0) stays the root of whatever touches it
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb
        self.merges += 1

    def union_all(self, atoms):
        atoms = [a for a in atoms if a >= 0]
        for a in atoms[1:]:
            self.union(atoms[0], a)

    def root_table(self):
        """Root of every atom as one tensor (pointer jumping over the parent array), cached until the next
        merge."""
        n = len(self.parent)
        if self._snap is not None and self._snap[0] == n and self._snap[1] == self.merges:
            return self._snap[2]
        r = torch.tensor(self.parent, dtype=torch.int64)
        while True:
            r2 = r[r]
            if torch.equal(r2, r):
                break
            r = r2
        self._snap = (n, self.merges, r)
        return r

    def roots(self, t):
        """Roots of a label tensor (NONE stays NONE)."""
        flat = t.reshape(-1)
        if flat.numel() > 4096 and (self._snap is not None or flat.numel() > len(self.parent) // 8):
            table = self.root_table()
            return torch.where(flat >= 0, table[flat.clamp_min(0)], flat).view(t.shape)
        uniq, inv = torch.unique(flat, return_inverse=True)
        r = torch.tensor([self.find(a) if a >= 0 else NONE for a in uniq.tolist()], dtype=torch.int64)
        return r[inv].view(t.shape)


@dataclass
class Slot:
    """Entries ``atoms[i]`` of dimension ``dim`` of one parameter/buffer belong to channel atom i."""
    key: int            # id of the tensor
    dim: int
    atoms: torch.Tensor
    kind: str           # "out" (a producer's output channels), "in", "norm", "raw"
    module: str         # qualified name of the owning module (for reports)


@dataclass
class SplitSite:
    """A channel dim reshaped into several: heads x head_dim, groups x channels_per_group, 3 x heads x dim."""
    module: nn.Module | None
    grid: torch.Tensor  # atoms, one dim per split dim
    dim: int            # the split dim whose entries may go (all entries sharing its index go together)
    kind: str = ""      # "heads" (whole heads go), "head_dim" (every head loses the same positions), ""


@dataclass
class SplitSizeSite:
    module: nn.Module | None
    atoms: torch.Tensor  # atoms of the first piece
    size: int


@dataclass
class Trace:
    uf: UnionFind
    slots: list = field(default_factory=list)
    split_sites: list = field(default_factory=list)
    attr_slots: list = field(default_factory=list)   # (module, attr, atoms)
    conv_info: dict = field(default_factory=dict)    # id(module) -> (groups, O, I, transposed)
    gn_info: dict = field(default_factory=dict)      # id(module) -> "cols" | "rows" | "none"
    notes: list = field(default_factory=list)
    owners: dict = field(default_factory=dict)       # id(tensor) -> [(module, attr, is_buffer, qualname)]
    tensors: dict = field(default_factory=dict)      # id(tensor) -> tensor
    output: object = None
    macs: dict = field(default_factory=dict)         # module name -> MACs of the traced call
    mixing: list = field(default_factory=list)       # (label rows, op, module): ops combining entries of a row
    pinned: list = field(default_factory=list)       # dicts: layers, reason (channels kept because an op mixes them)


@dataclass(frozen=True)
class ChannelRule:
    """How a custom module's own parameters follow its channels (see ``register_channel_rule``).

    The module is traced as one leaf: its input channels are dim ``in_dim`` of its first tensor argument,
    its output channels dim ``out_dim`` of its first tensor output. ``in_params`` / ``out_params`` map a
    parameter (or buffer) name to the dim of that tensor indexed by input / output channels. With
    ``same_channels`` the outputs are the inputs (a per-channel scale, a custom norm): ``out_params``
    then follow the input channels and nothing new is created. ``update(module)`` runs after slicing to
    fix attributes derived from shapes."""
    in_params: tuple = ()
    out_params: tuple = ()
    in_dim: int = -1
    out_dim: int = -1
    same_channels: bool = False
    update: object = None


_RULES: dict = {}   # module class -> ChannelRule


def rule_for(mod):
    for cls in type(mod).__mro__:
        r = _RULES.get(cls)
        if r is not None:
            return r
    return None


_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONVT = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}
_MOVE = {
    "view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "flatten", "unflatten", "squeeze",
    "unsqueeze", "narrow", "select", "__getitem__", "expand", "expand_as", "repeat", "flip", "roll",
    "t", "movedim", "moveaxis", "view_as", "reshape_as", "index_select", "repeat_interleave", "unbind",
    "tensor_split", "split", "chunk", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "pixel_shuffle", "pixel_unshuffle", "T", "mT", "gather", "take_along_dim", "tile", "unfold",
    "split_with_sizes", "contiguous", "clone", "detach",
}
# moves that address entries by literal position (``_Tracer.by_position``)
_POSITIONAL = {"__getitem__", "narrow", "select", "index_select", "gather", "take_along_dim", "roll", "unfold"}
_LISTARG = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_VIEWLIKE = {"view", "reshape", "unflatten", "view_as", "reshape_as"}
_BROADCAST = {
    "add", "sub", "mul", "div", "true_divide", "where", "maximum", "minimum", "addcmul", "addcdiv", "lerp",
    "__add__", "__radd__", "__iadd__", "__mul__", "__rmul__", "__imul__", "__sub__", "__rsub__",
    "__isub__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "add_", "mul_", "sub_", "div_",
    "masked_fill", "masked_fill_", "copy_", "pow", "__pow__", "rsub", "fmod", "remainder", "clamp",
    "__and__", "__or__", "eq", "ne", "gt", "lt", "ge", "le", "__eq__", "__ne__", "__gt__", "__lt__",
    "__ge__", "__le__", "mul_", "atan2", "hypot", "xlogy", "logaddexp",
}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
           "nansum", "nanmean", "median", "nanmedian", "all", "any", "argmax", "argmin", "var_mean", "std_mean",
           "count_nonzero", "aminmax"}
# ops whose every output entry depends on all the entries along one dim (the output keeps or shrinks it):
# name -> (position of the dim argument or None, default dim; None: softmax's legacy implicit dim)
# reductions whose keepdim=True result is a normalisation statistic (LayerNorm / RMSNorm written by hand): not a
# channel mix, the same as F.layer_norm's rule (the statistic of a pruned layer runs over the kept channels)
_NORM_STATS = frozenset({"mean", "var", "std", "var_mean", "std_mean", "norm"})
_ALONG = {
    "softmax": (1, None), "log_softmax": (1, None), "softmin": (1, None), "gumbel_softmax": (4, -1),
    "normalize": (2, 1), "local_response_norm": (None, 1), "cumsum": (1, 0), "cumprod": (1, 0),
    "logcumsumexp": (1, 0), "cummax": (1, 0), "cummin": (1, 0), "sort": (1, -1), "argsort": (1, -1),
    "msort": (None, 0), "topk": (2, -1), "kthvalue": (2, -1), "mode": (1, -1),
}
_POOL_EXTRA = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear"}


_SHORT = {}


def _short(func):
    try:
        return _SHORT[func]
    except (KeyError, TypeError):
        pass
    try:
        name = resolve_name(func) or getattr(func, "__name__", "")
    except Exception:
        name = getattr(func, "__name__", "")
    if name.endswith(".__get__"):
        name = name[: -len(".__get__")]
    res = name.rsplit(".", 1)[-1], name
    try:
        _SHORT[func] = res
    except TypeError:  # unhashable callable
        pass
    return res


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors_in(getattr(obj, f.name))]
    return []


def _const_along(t, d):
    if t.shape[d] <= 1 or t.stride(d) == 0:
        return True
    return bool((_compact(t) == _compact(t).narrow(d, 0, 1)).all())


def _compact(t):
    """The same labels with every broadcast (stride-0) dim narrowed to size 1: labels are mostly
    channel vectors expanded over batch and tokens, and every rule works on what varies only."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def _squeeze_const(t):
    t = _compact(t)
    for d in range(t.dim()):
        if t.shape[d] > 1 and _const_along(t, d):
            t = t.narrow(d, 0, 1)
    return t


def _reshape_groups(si, so):
    """Pair up dims of a reshape: list of (in_dims, out_dims) whose products match."""
    si, so = list(si), list(so)
    groups, i, j = [], 0, 0
    while i < len(si) or j < len(so):
        gi, go = [], []
        pi = po = 1
        if i < len(si):
            gi.append(i); pi = si[i]; i += 1
        if j < len(so):
            go.append(j); po = so[j]; j += 1
        while pi != po:
            if pi < po and i < len(si):
                gi.append(i); pi *= si[i]; i += 1
            elif po < pi and j < len(so):
                go.append(j); po *= so[j]; j += 1
            else:
                return None
        groups.append((gi, go))
    return groups


def _mixed_rows(rows):
    """Rows (of a 2-D label matrix) holding more than one atom; NONE entries (padding, constants) don't count."""
    hi = rows.amax(1)
    lo = torch.where(rows >= 0, rows, torch.full_like(rows, torch.iinfo(torch.int64).max)).amin(1)
    return (hi >= 0) & (lo != hi)


def _unique_pairs(a, b):
    """Distinct (a[i], b[i]) pairs of two non-negative int64 vectors, as a list of tuples. One 1-D unique
    on a combined key: ``torch.unique(dim=...)`` sorts rows lexicographically and is orders of magnitude
    slower on the millions of elements of an activation."""
    if a.numel() == 0:
        return []
    span = int(b.max()) + 1
    key = torch.unique(a * span + b)
    return list(zip((key // span).tolist(), (key % span).tolist()))


class _Tracer(TorchFunctionMode):
    def __init__(self, model, trace: Trace):
        super().__init__()
        self.t = trace
        self.uf = trace.uf
        self.labels = {}    # id -> (weakref, labels)
        self.raw = {}       # id(param/buffer) -> per-element labels
        self.stack = []     # modules being executed
        self.suppress = 0
        self.heads_ok = True
        self.head_dims = False
        self.hd_first = {}  # id(attention module) -> its first head_dim split grid
        self.names = {id(m): n for n, m in model.named_modules()}

    # ---------------------------------------------------------------- labels
    def lab(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        k = id(t)
        if k in self.t.owners:
            if k not in self.raw:
                self.raw[k] = self.uf.new(t.numel()).view(t.shape)
            return self.raw[k]
        e = self.labels.get(k)
        if e is not None and e[0]() is t:
            return e[1]
        return None

    def set_lab(self, t, lab):
        if isinstance(t, torch.Tensor) and lab is not None and id(t) not in self.t.owners:
            self.labels[id(t)] = (weakref.ref(t), lab)

    def none_like(self, t):
        return torch.full(t.shape, NONE, dtype=torch.int64)

    def fix(self, lab):
        if lab is None:
            return
        for a in torch.unique(lab).tolist():
            if a >= 0:
                self.uf.union(FIXED, a)

    def unify_pairs(self, a, b):
        """Couple two broadcastable label tensors element by element. Returns False when one of them is
        broadcast across varying channels (a scalar or mask, not channel-aligned) and was not coupled."""
        nd = max(a.dim(), b.dim())
        a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
        b = b.reshape((1,) * (nd - b.dim()) + tuple(b.shape))
        for d in range(nd):
            if a.shape[d] == 1 and b.shape[d] > 1 and not _const_along(b, d):
                return "a"
            if b.shape[d] == 1 and a.shape[d] > 1 and not _const_along(a, d):
                return "b"
        a, b = _squeeze_const(a), _squeeze_const(b)
        a2, b2 = torch.broadcast_tensors(a, b)
        m = (a2 >= 0) & (b2 >= 0) & (a2 != b2)
        if bool(m.any()):
            for x, y in _unique_pairs(a2[m], b2[m]):
                self.uf.union(x, y)
        return ""

    def chan_reps(self, lab, dim, size):
        """One atom per index of ``dim``: every label in that slice is unified (the consumer treats the
        whole slice alike)."""
        if lab is None:
            return torch.full((size,), NONE, dtype=torch.int64)
        dim = dim % lab.dim()
        c = lab.shape[dim]
        lab = _compact(lab)
        if lab.shape[dim] != c:  # the same labels for every index of dim
            lab = lab.expand(*lab.shape[:dim], c, *lab.shape[dim + 1:])
        x = lab.movedim(dim, 0).reshape(c, -1)
        if x.shape[1] == 0:
            return torch.full((size,), NONE, dtype=torch.int64)
        valid = x >= 0
        hi = x.amax(1)
        lo = torch.where(valid, x, torch.full_like(x, torch.iinfo(torch.int64).max)).amin(1)
        rep = torch.where(hi >= 0, hi, torch.full_like(hi, NONE))
        mixed = (hi >= 0) & (lo != hi)
        if not bool(mixed.any()):  # every slice has one atom (padding borders carry NONE): the common case
            return rep
        # slices with several atoms: unify them, once per distinct (slice, atom) pair
        rows = torch.arange(x.shape[0]).unsqueeze(1).expand_as(x)
        m = valid & mixed.unsqueeze(1)
        for r, a in _unique_pairs(rows[m], x[m]):
            self.uf.union(int(rep[r]), a)
        return rep

    @staticmethod
    def bcast(atoms, shape, dim):
        dim = dim % len(shape)
        view = [1] * len(shape)
        view[dim] = atoms.numel()
        return atoms.view(view).expand(shape)

    def owner(self, t):
        if isinstance(t, torch.Tensor) and id(t) in self.t.owners:
            return self.t.owners[id(t)][0]
        return None

    def slot(self, t, dim, atoms, kind):
        if t is None:
            return
        mod, attr, is_buf, qual = self.t.owners[id(t)][0]
        self.t.slots.append(Slot(id(t), dim % t.dim(), atoms.clone(), kind, qual.rsplit(".", 1)[0]))

    def is_param(self, t):
        return isinstance(t, torch.Tensor) and id(t) in self.t.owners

    def cur_module(self):
        return self.stack[-1] if self.stack else None

    # ---------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name, full = _short(func)
        m = op_macs(name, args, kwargs, out)
        if m:  # the same count as module_macs, so that pruning needs no separate pass for it
            key = self.names.get(id(self.stack[-1]), "") if self.stack else ""
            self.t.macs[key] = self.t.macs.get(key, 0) + m
        if self.suppress:
            return out
        outs = _tensors_in(out)
        if not outs:
            return out
        try:
            self.handle(name, full, args, kwargs, out, outs)
        except Exception as e:  # never let tracing break the user's forward; be conservative instead
            self.fallback(name, args, kwargs, outs, f"{type(e).__name__}: {e}")
        return out

    def fallback(self, name, args, kwargs, outs, why=""):
        labs = [self.lab(t) for t in _tensors_in(args) + _tensors_in(kwargs)]
        labs = [l for l in labs if l is not None]
        if not labs:
            return
        for l in labs:
            self.fix(l)
        self.t.notes.append(f"op '{name}' not understood{(' (' + why + ')') if why else ''}: "
                            "channels flowing through it are kept")
        for o in outs:
            self.set_lab(o, torch.zeros(o.shape, dtype=torch.int64))

    def handle(self, name, full, args, kwargs, out, outs):
        a0 = args[0] if args else None
        if name in _CONV or name in _CONVT:
            return self.conv(args, kwargs, out, transposed=name in _CONVT)
        if name == "linear":
            return self.linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"), out)
        if name == "batch_norm" and "functional" in full:
            return self.norm_c(args[0], [args[3] if len(args) > 3 else kwargs.get("weight"),
                                         args[4] if len(args) > 4 else kwargs.get("bias")],
                               [args[1], args[2]], out)
        if name == "instance_norm" and "functional" in full:
            g = lambda i, k: args[i] if len(args) > i else kwargs.get(k)  # noqa: E731
            return self.norm_c(args[0], [g(3, "weight"), g(4, "bias")], [g(1, "running_mean"), g(2, "running_var")], out)
        if name in ("layer_norm", "rms_norm"):
            return self.layer_norm(args, kwargs, out)
        if name == "group_norm":
            return self.group_norm(args, kwargs, out)
        if name == "prelu":
            w = args[1]
            if w.numel() == 1:
                return self.elementwise(name, [args[0]], out, outs)
            return self.norm_c(args[0], [w], [], out)
        if name == "embedding":
            return self.embedding(args, kwargs, out)
        if name in ("matmul", "__matmul__", "bmm", "mm"):
            return self.matmul(args[0], args[1], None, out)
        if name == "__rmatmul__":
            return self.matmul(args[1], args[0], None, out)
        if name in ("addmm", "baddbmm"):
            return self.matmul(args[1], args[2], args[0], out)
        if name == "scaled_dot_product_attention":
            return self.sdpa(args, kwargs, out)
        if name == "pad":
            return self.pad(args, kwargs, outs)
        if name in _MOVE:
            return self.move(name, args, kwargs, out, outs)
        if name in _REDUCE:
            return self.reduce(name, args, kwargs, outs)
        if name in _ALONG:
            return self.along(name, args, kwargs, outs)
        if "pool" in name or name in _POOL_EXTRA:
            return self.pool(name, args, outs)
        ins = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        if len(outs) == 1 and all(t.shape == outs[0].shape for t in ins if self.lab(t) is not None):
            return self.elementwise(name, ins, out, outs)
        if name in _BROADCAST and len(outs) == 1:
            return self.elementwise(name, ins, out, outs)
        if all(self.lab(t) is None for t in ins):
            return
        self.fallback(name, args, kwargs, outs)

    # ---------------------------------------------------------------- rules
    def elementwise(self, name, ins, out, outs):
        o = outs[0]
        labs = [l for l in (self.lab(t) for t in ins) if l is not None]
        if not labs:
            return
        cur = labs[0]
        for l in labs[1:]:
            r = self.unify_pairs(cur, l)
            if r == "a":
                cur = l
            elif r == "":
                try:  # combine what varies only, then broadcast back (a view: stays cheap downstream)
                    shape = torch.broadcast_shapes(cur.shape, l.shape)
                    c2, l2 = torch.broadcast_tensors(_compact(cur), _compact(l))
                    cur = torch.where(c2 >= 0, c2, l2).expand(shape)
                except RuntimeError:
                    pass
        try:
            self.set_lab(o, cur.expand(o.shape) if tuple(cur.shape) != tuple(o.shape) else cur)
        except RuntimeError:
            self.fallback(name, ins, {}, outs, "broadcast")

    def conv(self, args, kwargs, out, transposed):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        gi = 6
        groups = args[gi] if len(args) > gi else kwargs.get("groups", 1)
        if not self.is_param(w) or (b is not None and not self.is_param(b)):
            return self.fallback("conv", args, kwargs, [out], "weight is not a parameter")
        cdim = 1 if x.dim() == w.dim() else 0
        if transposed:
            I, O = w.shape[0], w.shape[1] * groups
        else:
            O, I = w.shape[0], w.shape[1] * groups
        rin = self.chan_reps(self.lab(x), cdim, I)
        aout = self.uf.new(O)
        ipg, opg = I // groups, O // groups
        mode = "dense" if groups == 1 else ("whole" if ipg == 1 else "within")
        if mode == "whole" and opg == 1 and bool((rin >= 0).all()):
            aout = rin.clone()  # depthwise, one filter per channel: the output channel is the input's atom
        elif mode == "whole":  # depthwise: an input channel and its filters go together, groups shrink
            for g in range(groups):
                self.uf.union_all(rin[g * ipg:(g + 1) * ipg].tolist() + aout[g * opg:(g + 1) * opg].tolist())
        elif mode == "within":  # grouped: groups stay, the same in-group positions go from every group
            for grid in (rin.view(groups, ipg), aout.view(groups, opg)):
                for c in range(grid.shape[1]):
                    self.uf.union_all(grid[:, c].tolist())
        mod, attr = self.owner(w)[:2]
        if attr == "weight":  # a conv module's shape attributes follow; F.conv2d(x, self.w) has none
            self.t.conv_info[id(mod)] = (groups, O, I, transposed, mode)
        if transposed:
            if mode == "whole":  # rows of dim 0 follow the group atoms
                self.slot(w, 0, rin, "out")
            else:
                self.slot(w, 1, aout[:opg], "out")
                self.slot(w, 0, rin, "in")
        else:
            self.slot(w, 0, aout, "out")
            if mode != "whole":
                self.slot(w, 1, rin[:ipg], "in")
        self.slot(b, 0, aout, "out")
        self.set_lab(out, self.bcast(aout, out.shape, cdim))

    def linear(self, x, w, b, out):
        if not self.is_param(w) or (b is not None and not self.is_param(b)):
            return self.fallback("linear", (x, w, b), {}, [out], "weight is not a parameter")
        O, I = w.shape
        rin = self.chan_reps(self.lab(x), -1, I)
        aout = self.uf.new(O)
        self.slot(w, 0, aout, "out")
        self.slot(w, 1, rin, "in")
        self.slot(b, 0, aout, "out")
        self.set_lab(out, self.bcast(aout, out.shape, -1))

    def norm_c(self, x, params, buffers, out, dim=1):
        if any(p is not None and not self.is_param(p) for p in params + buffers):
            return self.fallback("norm", (x,), {}, [out], "weight is not a parameter")
        dim = dim if x.dim() > 1 else 0
        C = x.shape[dim]
        rep = self.chan_reps(self.lab(x), dim, C)
        for p in params:
            self.slot(p, 0, rep, "norm")
        for p in buffers:
            self.slot(p, 0, rep, "buffer")
        self.set_lab(out, self.bcast(rep, out.shape, dim))
        return rep

    def layer_norm(self, args, kwargs, out):
        x, shape = args[0], args[1]
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else kwargs.get("bias")
        if len(shape) != 1:
            return self.fallback("layer_norm", args, kwargs, [out], "normalises over several dims")
        rep = self.norm_c(x, [w, b], [], out, dim=-1)
        mod = self.cur_module()
        if rep is not None and isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            self.t.attr_slots.append((mod, "normalized_shape", rep.clone()))

    def group_norm(self, args, kwargs, out):
        x, G = args[0], args[1]
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        rep = self.norm_c(x, [w, b], [], out)
        if rep is None:
            return
        C = rep.numel()
        cpg = C // G
        mode = "none" if G == 1 else ("rows" if cpg == 1 else "cols")
        if mode == "cols":  # keep num_groups: the same in-group position goes from every group
            grid = rep.view(G, cpg)
            for t in range(cpg):
                self.uf.union_all(grid[:, t].tolist())
        mod = self.cur_module()
        if isinstance(mod, nn.GroupNorm):
            self.t.gn_info[id(mod)] = mode
            if mode == "rows":
                self.t.attr_slots.append((mod, "num_groups", rep.clone()))
            self.t.attr_slots.append((mod, "num_channels", rep.clone()))
        elif mode != "none":
            self.fix(rep.view(1, -1))

    def embedding(self, args, kwargs, out):
        w = args[1]
        if not self.is_param(w):
            return self.fallback("embedding", args, kwargs, [out], "weight is not a parameter")
        aout = self.uf.new(w.shape[1])
        self.slot(w, 1, aout, "out")
        self.set_lab(out, self.bcast(aout, out.shape, -1))

    def matmul(self, a, b, bias, out):
        if self.is_param(b) and b.dim() == 2 and not self.is_param(a):  # x @ W (HF Conv1D, addmm)
            K, N = b.shape
            rin = self.chan_reps(self.lab(a), -1, K)
            aout = self.uf.new(N)
            self.slot(b, 0, rin, "in")
            self.slot(b, 1, aout, "out")
            if bias is not None:
                if not self.is_param(bias) or bias.dim() != 1:
                    self.fix(aout.view(1, -1))
                else:
                    self.slot(bias, 0, aout, "out")
            self.set_lab(out, self.bcast(aout, out.shape, -1))
            return
        if self.is_param(a) or (bias is not None and self.lab(bias) is not None) or a.dim() < 2 or b.dim() < 2:
            return self.fallback("matmul", (a, b, bias), {}, [out], "unsupported operands")
        la, lb = self.lab(a), self.lab(b)
        self.set_lab(out, self.matmul_labels(la, lb, a.shape, b.shape, out.shape))

    def matmul_labels(self, la, lb, sa, sb, so):
        if la is None and lb is None:
            return None
        la = la if la is not None else torch.full(sa, NONE, dtype=torch.int64)
        lb = lb if lb is not None else torch.full(sb, NONE, dtype=torch.int64)
        # labels repeat along tokens / batch: work on one copy (size-1 dims broadcast), never on L x L
        la = self.uf.roots(_squeeze_const(la)).expand(la.shape)  # rows unified by a head split compare equal
        lb = self.uf.roots(_squeeze_const(lb)).expand(lb.shape)
        # contracted index k: a[..., n, k] and b[..., k, m] must stay aligned
        self.unify_pairs(la.unsqueeze(-1), lb.unsqueeze(-3))
        la_c, lb_c = self.uf.roots(_squeeze_const(la)), self.uf.roots(_squeeze_const(lb))
        ca = la_c.narrow(-1, 0, 1)
        ca = torch.where((la_c == ca).all(-1, keepdim=True), ca, torch.full_like(ca, NONE))   # (..., n, 1)
        cb = lb_c.narrow(-2, 0, 1)
        cb = torch.where((lb_c == cb).all(-2, keepdim=True), cb, torch.full_like(cb, NONE))   # (..., 1, m)
        sa_full = tuple(la.shape[:-1]) + (1,)
        sb_full = tuple(lb.shape[:-2]) + (1,) + tuple(lb.shape[-1:])
        if bool((ca >= 0).any()) and bool((cb >= 0).any()):
            self.unify_pairs(ca.expand(sa_full), cb.expand(sb_full))
        ca2, cb2 = torch.broadcast_tensors(ca, cb)
        res = torch.where(ca2 >= 0, ca2, cb2).expand(torch.broadcast_shapes(sa_full, sb_full))
        if so is None:
            return res
        return res.expand(so) if tuple(res.shape) != tuple(so) else res

    def sdpa(self, args, kwargs, out):
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        lq, lk, lv = self.lab(q), self.lab(k), self.lab(v)
        if lq is None and lk is None and lv is None:
            return
        if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
            return self.fallback("sdpa", args, kwargs, [out], "grouped-query attention")
        sshape = tuple(q.shape[:-1]) + (k.shape[-2],)
        s = self.matmul_labels(lq, lk.transpose(-1, -2) if lk is not None else None, q.shape,
                               tuple(k.shape[:-2]) + (k.shape[-1], k.shape[-2]), None)
        if mask is not None and self.lab(mask) is not None and s is not None:
            self.unify_pairs(s.expand(sshape), self.lab(mask))  # a per-head bias joins its head
        self.set_lab(out, self.matmul_labels(s.expand(sshape) if s is not None else None, lv, sshape, v.shape,
                                             out.shape))

    def pad(self, args, kwargs, outs):
        lx = self.lab(args[0])
        if lx is None:
            return
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        padded = range(lx.dim() - len(pad) // 2, lx.dim())
        lc = _compact(lx)
        if all(lc.shape[d] == 1 for d in padded):  # spatial padding of per-channel labels: nothing new
            res = lc.expand(outs[0].shape)
        elif mode == "constant":
            res = torch.nn.functional.pad(lx, pad, value=NONE)
        else:  # reflect / replicate / circular copy existing elements: replay on float labels
            res = torch.nn.functional.pad(lx.double(), pad, mode=mode).round().long()
        self.set_lab(outs[0], res)

    def reduce(self, name, args, kwargs, outs):
        x = args[0]
        lx = self.lab(x)
        if lx is None:
            return
        off = 1 if name == "norm" else 0  # norm(input, p, dim, keepdim)
        dim = args[1 + off] if len(args) > 1 + off and not isinstance(args[1 + off], bool) else kwargs.get("dim", None)
        k = 2 + off
        keep = kwargs.get("keepdim", args[k] if len(args) > k and isinstance(args[k], bool) else False)
        full = dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0)
        if keep and not full and name in _NORM_STATS:
            pass  # a norm's statistic kept for broadcasting back (x.pow(2).mean(-1, keepdim=True), a hand-written
            # LayerNorm / RMSNorm): over the kept channels once pruned, as nn.LayerNorm's rule does
        elif full and lx.dim() and name not in ("all", "any"):  # all / any of a whole tensor: a check, not a value
            self.mixes(name, lx, list(range(lx.dim())))
        elif isinstance(dim, int) and not isinstance(dim, bool) or \
                isinstance(dim, (list, tuple)) and all(type(d) is int for d in dim):
            self.mixes(name, lx, [dim] if isinstance(dim, int) else list(dim))
        if name in ("argmax", "argmin", "all", "any"):
            return
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return
        dims = [dim] if isinstance(dim, int) else list(dim)
        hi, lo = lx, lx
        for d in sorted([d % lx.dim() for d in dims], reverse=True):
            hi = hi.amax(d, keepdim=True)
            lo = lo.amin(d, keepdim=True)
        res = torch.where(hi == lo, hi, torch.full_like(hi, NONE))
        if not keep:
            for d in sorted([d % lx.dim() for d in dims], reverse=True):
                res = res.squeeze(d)
        for i, o in enumerate(outs):  # max(dim) / min(dim) also return indices; var_mean two values
            if tuple(res.shape) == tuple(o.shape) and (i == 0 or o.is_floating_point()):
                self.set_lab(o, res)

    def along(self, name, args, kwargs, outs):
        x = args[0] if args else None
        lx = self.lab(x)
        if lx is None or x.dim() == 0:
            return
        pos, dim = _ALONG[name]
        if pos is not None:
            if len(args) > pos and not isinstance(args[pos], bool):
                dim = args[pos]
            else:
                dim = kwargs.get("dim", dim)
        if dim is None:  # softmax without dim: torch's legacy choice
            dim = 0 if x.dim() in (0, 1, 3) else 1
        if type(dim) is not int:
            return self.fallback(name, args, kwargs, outs, f"dim {dim!r}")
        dim %= x.dim()
        self.mixes(name, lx, [dim])
        rep = _compact(lx).narrow(dim, 0, 1) if _compact(lx).shape[dim] > 1 else _compact(lx)
        for o in outs:
            if not (o.is_floating_point() or o.is_complex()):  # indices: no channel identity
                self.set_lab(o, torch.full(o.shape, NONE, dtype=torch.int64))
            elif tuple(o.shape) == tuple(x.shape):
                self.set_lab(o, lx)
            else:  # topk / kthvalue / mode: entries along dim were one unit (else pinned), keep it
                r = rep if o.dim() == x.dim() else rep.squeeze(dim)
                try:
                    self.set_lab(o, r.expand(o.shape))
                except RuntimeError:
                    self.fallback(name, args, kwargs, [o], "output shape")

    def by_position(self, name, args, kwargs, lx):
        """Dims along which ``name`` picks or moves entries by literal position (a slice ``x[:, 2:6]``,
        ``narrow``, ``select``, ``index_select``, ``gather``, ``roll``, ``unfold``). Once channels are
        removed the same positions address other channels (``y[:, 2:6]`` of 4 kept channels is 2 of
        them, ``roll`` wraps at another channel), so channels that several units share along such a
        dim are kept, as for an op that mixes them (``mixes``). None: the op could not be read (pin all)."""
        nd = lx.dim()
        arg = lambda i, k, d=None: args[i] if len(args) > i else kwargs.get(k, d)  # noqa: E731

        def full_index(ix, size):
            if isinstance(ix, torch.Tensor) and ix.dtype == torch.bool:
                return bool(ix.all())
            ix = torch.as_tensor(ix).reshape(-1) % max(size, 1)
            return ix.numel() == size and bool((ix == torch.arange(size)).all())
        try:
            if name == "roll":
                dims = arg(2, "dims")
                if dims is None or (isinstance(dims, (tuple, list)) and not dims):
                    return list(range(nd))
                return [dims] if isinstance(dims, int) else list(dims)
            if name == "narrow":
                d, start, length = arg(1, "dim"), arg(2, "start"), arg(3, "length")
                return [] if int(start) == 0 and int(length) == lx.shape[d] else [d]
            if name in ("select", "unfold"):
                return [arg(1, "dim" if name == "select" else "dimension")]
            if name in ("index_select", "gather"):
                d = arg(1, "dim")
                return [] if name == "index_select" and full_index(arg(2, "index"), lx.shape[d]) else [d]
            if name == "take_along_dim":
                d = arg(2, "dim")
                return list(range(nd)) if d is None else [d]
            if name != "__getitem__":
                return []
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            used = sum(1 if not (isinstance(i, torch.Tensor) and i.dtype == torch.bool) else i.dim()
                       for i in idx if i is not None and i is not Ellipsis)
            dims, d = [], 0
            for i in idx:
                if i is None:
                    continue
                if i is Ellipsis:
                    d += nd - used
                    continue
                if isinstance(i, slice):
                    if i.indices(lx.shape[d]) != (0, lx.shape[d], 1):
                        dims.append(d)
                    d += 1
                elif isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    if not bool(i.all()):
                        dims.extend(range(d, d + i.dim()))
                    d += i.dim()
                else:  # an int, a list or an index tensor
                    if isinstance(i, int) or not full_index(i, lx.shape[d]):
                        dims.append(d)
                    d += 1
            return dims
        except Exception:
            return None

    def mixes(self, name, lx, dims):
        """An op combines the entries of ``lx`` along ``dims`` (a reduction, softmax, cumsum, argmax, ...).
        Where those entries belong to several channels, removing one changes what the others compute:
        such rows are recorded, and ``_pin_mixing`` keeps their channels once the trace has seen every
        coupling (channels unified later, such as a head's positions, are one unit and may still go)."""
        lc = _compact(lx)
        if lc.dim() == 0 or lc.numel() == 0:
            return
        dims = sorted({d % lc.dim() for d in dims})
        dims = [d for d in dims if lc.shape[d] > 1]
        if not dims:
            return
        rest = [d for d in range(lc.dim()) if d not in dims]
        rows = lc.permute(rest + dims).reshape(math.prod(lc.shape[d] for d in rest), -1)
        m = _mixed_rows(rows)
        if bool(m.any()):  # raw atoms differ; whether their units do is known at the end
            mod = self.cur_module()
            where = self.names.get(id(mod), "") if mod is not None else ""
            self.t.mixing.append((rows[m], f"'{name}' over dim {dims[0] if len(dims) == 1 else tuple(dims)}",
                                  where))

    def pool(self, name, args, outs):
        x = args[0]
        lx = self.lab(x)
        if lx is None:
            return
        o = outs[0]
        if x.dim() < 3 or tuple(o.shape[:2]) != tuple(x.shape[:2]):
            return self.fallback(name, args, {}, outs, "changes the channel dim")
        rep = self.chan_reps(lx, 1, x.shape[1])
        self.set_lab(o, self.bcast(rep, o.shape, 1))
        for extra in outs[1:]:  # max-pool indices
            self.set_lab(extra, torch.full(extra.shape, NONE, dtype=torch.int64))

    def move(self, name, args, kwargs, out, outs):
        if name in _LISTARG:
            seq = args[0]
            labs = [self.lab(t) for t in seq]
            if all(l is None for l in labs):
                return
            labs = [l if l is not None else self.none_like(t) for t, l in zip(seq, labs)]
            largs = (labs,) + tuple(args[1:])
        else:
            l0 = self.lab(args[0])
            if l0 is None:
                return
            largs = (l0,) + tuple(args[1:])
            if name in _POSITIONAL and (args[0].is_floating_point() or args[0].is_complex()):  # (not indices)
                pos = self.by_position(name, args, kwargs, l0)
                self.mixes(f"{name} by position", l0, list(range(l0.dim())) if pos is None else pos)
        if name in ("contiguous", "clone", "detach"):
            res = largs[0]
        else:
            func = getattr(torch.Tensor, name, None) if name not in _LISTARG else getattr(torch, name)
            if name in ("T", "mT"):
                res = getattr(largs[0], name)
            else:
                try:
                    res = func(*largs, **kwargs)
                except Exception:
                    if name in _LISTARG:
                        raise
                    res = func(largs[0].contiguous(), *largs[1:], **kwargs)
        rl = _tensors_in(res)
        if len(rl) != len(outs) or any(tuple(r.shape) != tuple(o.shape) for r, o in zip(rl, outs)):
            return self.fallback(name, args, kwargs, outs, "label replay mismatch")
        if name in _VIEWLIKE:
            self.check_split(name, args, largs[0], rl[0])
        if name in ("split", "chunk", "tensor_split", "split_with_sizes", "unbind"):
            self.check_pieces(name, args, kwargs, largs[0], rl)
        for o, r in zip(outs, rl):
            self.set_lab(o, r)

    def check_pieces(self, name, args, kwargs, lin, pieces):
        """Split/chunk along a channel dim: pieces must keep equal sizes, so the same position goes from
        every piece."""
        if name == "unbind":
            return
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        dim = dim % lin.dim()
        if _const_along(lin, dim) and not bool((lin >= 0).any()):
            return
        if _const_along(lin, dim):
            return
        sizes = [p.shape[dim] for p in pieces]
        if len(pieces) == 1:
            return
        if name == "split" and isinstance(args[1], int) or name == "chunk":
            if len(set(sizes)) != 1:
                self.fix(lin)
                self.t.notes.append(f"{name} into unequal pieces {sizes}: kept")
                return
            reps = [self.chan_reps(p, dim, p.shape[dim]) for p in pieces]
            for t in range(sizes[0]):
                self.uf.union_all([int(r[t]) for r in reps])
            if name == "split":
                self.t.split_sites.append(SplitSizeSite(self.cur_module(), reps[0].clone(), sizes[0]))
        else:
            self.fix(lin)
            self.t.notes.append(f"{name} with explicit sizes {sizes}: kept")

    def check_split(self, name, args, lin, lout):
        """A reshape that splits a channel dim into several (heads x head_dim, groups x per-group,
        3 x heads x head_dim): the entries along one of them may go (the one whose size can change),
        all entries sharing an index along it go together."""
        groups = _reshape_groups(lin.shape, lout.shape)
        if groups is None:
            return self.fix(lin)
        for gi, go in groups:
            if all(_const_along(lin, d) for d in gi):
                continue
            go_big = [d for d in go if lout.shape[d] > 1]
            if len(go_big) <= 1:  # no split, or a merge of dims (flatten): channels stay addressable
                continue
            if len(gi) != 1:
                self.fix(lin)
                self.t.notes.append(f"{name} {tuple(lin.shape)}->{tuple(lout.shape)} reshapes channels in a "
                                    "way not supported: kept")
                continue
            sizes = [lout.shape[d] for d in go_big]
            p, kind = self.split_dim(name, args, go_big, sizes)
            grid = lout.movedim(go_big, list(range(-len(go_big), 0))).reshape(-1, *sizes)
            if _const_along(grid, 0):
                grid = grid[:1]
            if p is None:
                self.fix(grid)
                continue
            for lead in range(grid.shape[0]):
                g = grid[lead]
                for j in range(sizes[p]):
                    self.uf.union_all(g.select(p, j).reshape(-1).tolist())
            if kind == "head_dim":  # q, k and v of one module share head_dim: position j goes from all
                first = self.hd_first.setdefault(id(self.cur_module()), grid[0])
                if first.shape == grid[0].shape:
                    for j in range(sizes[p]):
                        self.uf.union(int(first.select(p, j).reshape(-1)[0]), int(grid[0].select(p, j).reshape(-1)[0]))
            self.t.split_sites.append(SplitSite(self.cur_module(), grid[0].clone(), p, kind))

    def split_dim(self, name, args, go_big, sizes):
        """Which of the split dims may shrink: the one written -1, else one matching a ``*head*``
        attribute of the running module (attention heads), else the innermost (its size is usually
        computed from the input, e.g. ``c // groups`` in a channel shuffle). None: nothing may."""
        last = len(sizes) - 1
        req = None
        if name in ("view", "reshape"):
            req = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else list(args[1:])
        elif name == "unflatten":
            d, sizes_req = args[1], list(args[2])
            req = [None] * d + sizes_req
        p = None
        mod = self.cur_module()
        heads = {} if mod is None else {k.lower(): v for k, v in vars(mod).items() if type(v) is int and "head" in k.lower()}
        if self.head_dims and last > 0 and any(v == sizes[last] and ("dim" in k or "size" in k) for k, v in heads.items()) \
                and any(v in sizes[:last] for v in heads.values()):
            return last, "head_dim"
        if req is not None and -1 in req and req.index(-1) in go_big:
            p = go_big.index(req.index(-1))
        if p is None:
            for v in heads.values():
                if v in sizes[:last]:
                    p = sizes.index(v)
                    break
        if p is None:
            p = last
        kind = "heads" if p != last and sizes[p] in heads.values() else ""
        if p != last and not self.heads_ok:
            return None, ""
        return p, kind

    # ---------------------------------------------------------------- modules handled whole
    def mha_pre(self, mod, args, kwargs):
        self.stack.append(mod)
        self.suppress += 1

    def mha_post(self, mod, args, kwargs, out):
        self.suppress -= 1
        self.stack.pop()
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        v = args[2] if len(args) > 2 else kwargs.get("value")
        outs = _tensors_in(out)
        E, H = mod.embed_dim, mod.num_heads
        ok = mod._qkv_same_embed_dim and mod.bias_k is None and mod.in_proj_weight is not None
        if not ok:
            self.fallback("MultiheadAttention", (q, k, v), {}, outs, "separate q/k/v dims or bias_k")
            return
        atoms = self.uf.new(E)
        for t in (q, k, v):
            self.uf_vec(atoms, self.chan_reps(self.lab(t), -1, E))
        hd = E // H
        grid = atoms.view(H, hd)
        for c in range(hd):  # embed_dim must stay a multiple of num_heads: same position from every head
            self.uf.union_all(grid[:, c].tolist())
        three = torch.cat([atoms, atoms, atoms])
        self.slot(mod.in_proj_weight, 1, atoms, "in")
        self.slot(mod.in_proj_weight, 0, three, "out")
        if mod.in_proj_bias is not None:
            self.slot(mod.in_proj_bias, 0, three, "out")
        self.slot(mod.out_proj.weight, 0, atoms, "out")
        self.slot(mod.out_proj.weight, 1, atoms, "in")
        if mod.out_proj.bias is not None:
            self.slot(mod.out_proj.bias, 0, atoms, "out")
        if outs:
            self.set_lab(outs[0], self.bcast(atoms, outs[0].shape, -1))

    def rule_post(self, mod, args, kwargs, out):
        self.suppress -= 1
        self.stack.pop()
        rule = rule_for(mod)
        ins = _tensors_in(args) + _tensors_in(kwargs)
        outs = _tensors_in(out)
        if not ins or not outs:
            return self.fallback(type(mod).__name__, args, kwargs, outs, "registered rule: no tensor in or out")
        x, o = ins[0], outs[0]
        rin = self.chan_reps(self.lab(x), rule.in_dim, x.shape[rule.in_dim])
        if rule.same_channels:
            if o.shape[rule.out_dim] != rin.numel():
                return self.fallback(type(mod).__name__, args, kwargs, outs, "same_channels but sizes differ")
            aout = rin
        else:
            aout = self.uf.new(o.shape[rule.out_dim])
        for names, atoms, kind in ((rule.in_params, rin, "in"),
                                   (rule.out_params, aout, "norm" if rule.same_channels else "out")):
            for pname, d in names:
                p = getattr(mod, pname, None)
                if p is None:
                    continue
                if not self.is_param(p) or p.shape[d] != atoms.numel():
                    raise ValueError(f"channel rule of {type(mod).__name__}: '{pname}' dim {d} has size "
                                     f"{tuple(p.shape)[d] if self.is_param(p) else '?'}, expected {atoms.numel()}")
                self.slot(p, d, atoms, kind)
        self.set_lab(o, self.bcast(aout, o.shape, rule.out_dim))
        for extra in outs[1:]:  # other outputs: channel identity unknown, keep what they carry
            self.set_lab(extra, torch.zeros(extra.shape, dtype=torch.int64))

    def uf_vec(self, a, b):
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def push(self, mod, args):
        self.stack.append(mod)

    def pop(self, mod, args, out):
        if self.stack and self.stack[-1] is mod:
            self.stack.pop()


def _call(model, example_inputs):  # kept for callers of the old private name
    return call_model(model, example_inputs)


def owners_of(model):
    owners = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, pname, False, f"{mname}.{pname}" if mname else pname))
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None:
                owners.setdefault(id(b), []).append((mod, bname, True, f"{mname}.{bname}" if mname else bname))
    tensors = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            tensors[id(p)] = p
        for b in mod.buffers(recurse=False):
            tensors[id(b)] = b
    return owners, tensors


def trace(model: nn.Module, example_inputs, prune_heads: bool = True, head_dims: bool = False) -> Trace:
    """Run one forward pass and return the channel-atom graph (slots, split sites, notes).

    ``head_dims``: attention heads keep their count and every head loses the same positions (the
    split's innermost dim shrinks) instead of whole heads going."""
    t = Trace(UnionFind())
    t.owners, t.tensors = owners_of(model)
    tr = _Tracer(model, t)
    tr.heads_ok = prune_heads
    tr.head_dims = head_dims
    handles = []
    for mod in model.modules():
        if rule_for(mod) is not None:
            handles.append(mod.register_forward_pre_hook(tr.mha_pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(tr.rule_post, with_kwargs=True))
        elif isinstance(mod, nn.MultiheadAttention):
            handles.append(mod.register_forward_pre_hook(tr.mha_pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(tr.mha_post, with_kwargs=True))
        else:
            handles.append(mod.register_forward_pre_hook(tr.push))
            handles.append(mod.register_forward_hook(tr.pop))
    hidden = _hide_mask_hooks(model, tr)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), tr:
            out = call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for hooks, k, h in hidden:
            hooks[k] = h
        model.train(was_training)
    for o in _tensors_in(_as_plain(out)):
        tr.fix(tr.lab(o))
    t.output = out
    _raw_slots(tr, t)
    _pin_mixing(t)
    return t


def _pin_mixing(t):
    """Keep the channels that an op mixes (``_Tracer.mixes``): a row of entries it combines that still
    holds several units after every coupling of the trace. Reported in ``t.pinned`` with the layers that
    produce them (nothing is reported for channels already kept, such as the model's outputs)."""
    uf = t.uf
    for rows, what, where in t.mixing:
        table = uf.root_table()
        r = torch.where(rows >= 0, table[rows.clamp_min(0)], rows)
        m = _mixed_rows(r)
        if not bool(m.any()):
            continue
        live = torch.unique(r[m])
        live = live[live > FIXED]
        if not live.numel():
            continue
        mods = []
        for kinds in (("out", "raw"), ("norm", "in", "buffer")):
            for s in t.slots:
                if s.kind in kinds and s.module not in mods and s.atoms.numel():
                    sr = torch.where(s.atoms >= 0, table[s.atoms.clamp_min(0)], s.atoms)
                    if bool(torch.isin(sr, live).any()):
                        mods.append(s.module)
            if mods:
                break
        op = what + (f" in '{where}'" if where else "")
        if mods:
            layers = ", ".join(mods[:4]) + (f", ... ({len(mods)} layers)" if len(mods) > 4 else "")
        else:
            layers = f"the channels into {op}"
        t.pinned.append(dict(layers=layers, reason=f"{op} combines these channels: removing one would change "
                                                   "what the others compute"))
        t.notes.append(f"{op} mixes channels: kept")
        for a in live.tolist():
            uf.union(FIXED, a)
    t.mixing = []


def _hide_mask_hooks(model, tr):
    """Run the masks' forward pre-hooks (masks.py) untraced: re-zeroing pruned weights couples no
    channels, but traced, the weight and its mask read as tensors coupling every dim (a spurious "kept"
    note in the report). Returns what to put back: [(hooks dict, key, hook)]."""
    from .masks import _forward_pre_hook as mask_hook

    def quiet(module, args):
        tr.suppress += 1
        try:
            return mask_hook(module, args)
        finally:
            tr.suppress -= 1
    hidden = []
    for mod in model.modules():
        for k, h in list(mod._forward_pre_hooks.items()):
            if h is mask_hook:
                mod._forward_pre_hooks[k] = quiet
                hidden.append((mod._forward_pre_hooks, k, h))
    return hidden


def _as_plain(out):
    if isinstance(out, dict):  # HF ModelOutput is an OrderedDict
        return list(out.values())
    return out


def _raw_slots(tr, t):
    """Parameters used directly (position embeddings, class tokens, layer scales, bias tables): find the
    dim along which their atoms vary; otherwise keep whatever channels they touch."""
    uf = t.uf
    for k, lab in tr.raw.items():
        if lab.numel() == 0:
            continue
        roots = uf.roots(lab)
        found = None
        for d in range(lab.dim()):
            if lab.shape[d] > 1 and all(_const_along(roots, e) for e in range(lab.dim()) if e != d):
                found = d
                break
        if found is None:
            for a in torch.unique(roots).tolist():
                uf.union(FIXED, a)
            if lab.numel() > 1:
                t.notes.append(f"tensor '{t.owners[k][0][3]}' couples channels along several dims: kept")
            continue
        sl = roots
        for e in reversed(range(lab.dim())):
            if e != found:
                sl = sl.select(e, 0)
        t.slots.append(Slot(k, found, sl.clone(), "raw", t.owners[k][0][3].rsplit(".", 1)[0]))


def op_macs(name, args, kwargs, out):
    """Multiply-accumulates of one call of a conv / linear / matmul / attention op (0 for others)."""
    m = 0
    try:
        if name in _CONV:
            w = args[1]
            m = out.numel() * w.shape[1] * math.prod(w.shape[2:])
        elif name in _CONVT:
            w = args[1]
            m = args[0].numel() * w.shape[1] * math.prod(w.shape[2:])
        elif name == "linear":
            m = out.numel() * args[1].shape[1]
        elif name in ("matmul", "__matmul__", "bmm", "mm", "addmm", "baddbmm", "__rmatmul__"):
            a = args[1] if name in ("addmm", "baddbmm") else args[0]
            m = out.numel() * a.shape[-1]
        elif name == "scaled_dot_product_attention":
            q, k = args[0], args[1]
            m = 2 * q.numel() // q.shape[-1] * k.shape[-2] * q.shape[-1]
        elif name == "multi_head_attention_forward":  # args are sequence-first here
            q, k, w_in = args[0], args[1], args[5]
            w_out = args[11] if len(args) > 11 else kwargs.get("out_proj_weight")
            rows = q.numel() // q.shape[-1]            # target length x batch
            e = w_in.shape[0] // 3
            m = rows * q.shape[-1] * w_in.shape[0] + 2 * rows * k.shape[0] * e
            if w_out is not None:
                m += rows * w_out.shape[0] * w_out.shape[1]
    except Exception:
        m = 0
    return int(m)


def module_macs(model, example_inputs):
    """Multiply-accumulates of conv / linear / matmul / attention per module, and the output (one forward
    pass, eval mode, no grad)."""
    counts = {}
    stack = []
    names = {id(m): n for n, m in model.named_modules()}

    class Counter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            m = op_macs(_short(func)[0], args, kwargs, out)
            if m:
                key = names.get(id(stack[-1]), "") if stack else ""
                counts[key] = counts.get(key, 0) + int(m)
            return out

    hs = []
    for mod in model.modules():
        hs.append(mod.register_forward_pre_hook(lambda m, a: stack.append(m)))
        hs.append(mod.register_forward_hook(lambda m, a, o: stack.pop() and None))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), Counter():
            out = call_model(model, example_inputs)
    finally:
        for h in hs:
            h.remove()
        model.train(was)
    return counts, out
