"""Sparse Linear layers that read the same input, run as one kernel call (q / k / v projections).

Attention blocks call three projections on one tensor: ``q = self.query(h); k = self.key(h);
v = self.value(h)``. Run separately, each call packs (int8: quantizes) the same X again and pays its own
call and thread start-up costs. A :class:`SharedInputGroup` packs the members' weights side by side
into one layer; the first member called on an input computes every member's output in one call, and the
others, called next on that same tensor, take theirs instead of computing it:

- a member's output is a column slice of the one output buffer (a strided view, as when a fused
  projection's output is split), numerically what the member computes alone (int8: bit for bit);
- an output is handed out only to its member, only for the very tensor object it was computed from
  (``is``, with the same version counter: an in-place change of the input, or any change of a member's
  weights since, makes the member compute on its own), and only once. As for autograd's saved tensors, a
  change that bypasses the version counter (writing through ``x.data``, ``x.numpy()`` or a DLPack copy of
  ``x`` between two members' calls) is not seen: a model that edits its input that way between its
  projections should be converted with ``shared_inputs=False`` (or :func:`ungroup`). Comparing the input's
  bytes instead would cost more than the shared call saves (clone + compare of a 128 x 768 input: ~18 us,
  against 4-12 us saved on BERT-base's three projections);
- only the plain eager inference call is grouped (float32 CPU input, contiguous, no gradient, not being
  traced or compiled, not an inference tensor: ``torch.inference_mode()`` tensors carry no version counter,
  so an in-place change of the input between two members' calls could not be seen); anything else runs
  each member as it is;
- per thread: two threads running the model at once never see each other's outputs;
- the weights are held once: when a group is attached, each member's packed arrays become views of its
  part of the fused ones (a rebuild after the weights change, or in a copy of the model, holds its own
  concatenated copy: replacing a member's arrays during calls could free memory another thread reads).

:func:`group_shared_inputs` (used by :func:`sparseprune.convert`) finds the groups on example inputs
and keeps only those that are faster than their members called one by one.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["SharedInputGroup", "group_shared_inputs", "ungroup", "regroup"]

_ATTR = "_shared_input"  # on each member: (group, position)


def _version_of(t: Tensor) -> int:
    """``t._version``; -1 for an inference tensor (made under ``torch.inference_mode()``), which has none."""
    return -1 if t.is_inference() else t._version


def _state(m) -> tuple:
    """What a member computes with: its arrays (the tensors themselves, held, so that a replaced array is
    never mistaken for a new one at the same address) with their version counters (values first, bias
    last), its fused activation and threads."""
    b = m._buffers
    ts = (b["values"],) + tuple(t for n, t in b.items() if n != "values") + (m._bias(),)
    bias = ts[-1]
    return (ts, tuple(_version_of(t) for t in ts if t is not None), m.activation, m.num_threads,
            (ts[0].data_ptr(), None if bias is None else bias.data_ptr()),
            (m.in_features, m.out_features, tuple(0 if t is None else t.data_ptr() for t in ts[1:-1])))


def _unchanged(m, st: tuple) -> bool:
    """Whether member ``m`` still computes with the state ``st`` recorded by :func:`_state`. Checked per
    call, so cheap: the values array and the bias (object and version), the activation and threads.
    Loading a state dict, ``.to()`` and the other module methods replace every packed array at once (so
    values too); editing arrays in place through ``.data`` (no version counter bump) goes unseen until the
    member's ``validate()``, which drops the group's fused layer."""
    v, b = m._buffers["values"], m._bias()
    ts, vs = st[0], st[1]
    # the sizes and the other packed arrays (index arrays, int8 scales / compensation): replaced ones are seen
    # (objects and addresses; in-place edits through .data stay unseen, as documented above)
    others = tuple(t for n, t in m._buffers.items() if n != "values")
    if (m.in_features, m.out_features) != st[5][:2] or len(others) != len(ts) - 2 \
            or any(t is not o or (t is not None and t.data_ptr() != p) for t, o, p in zip(others, ts[1:-1], st[5][2])):
        return False
    # (addresses too: ``bias.data = other`` keeps the object and its version counter)
    return (v is ts[0] and _version_of(v) == vs[0] and m.activation == st[2] and m.num_threads == st[3]
            and v.data_ptr() == st[4][0]
            and (b is None if ts[-1] is None else b is ts[-1] and _version_of(b) == vs[-1]
                 and b.data_ptr() == st[4][1]))


def _call_key(m) -> tuple:
    """What layers sharing one kernel call must have in common."""
    return m.format, m.weight_dtype, tuple(m.block_size), m.activation, m.num_threads, m.in_features


def _groups(model: nn.Module) -> List["SharedInputGroup"]:
    """The shared-input groups attached to ``model``'s layers, each once."""
    return list({id(g): g for m in model.modules() for g in [m.__dict__.get(_ATTR, (None,))[0]]
                 if g is not None}.values())


def compatible(members: Sequence[nn.Module]) -> Optional[str]:
    """None when ``members`` can share one kernel call, else why not."""
    from .nn import SparseLinear
    if len(members) < 2:
        return "fewer than two layers"
    if len({id(m) for m in members}) != len(members):
        return "a layer appears twice"
    first = members[0]
    for m in members:
        if type(m) is not SparseLinear:
            return f"{type(m).__name__} is not a SparseLinear"
        if m.format not in ("csr", "bsr"):
            return "a dense-format layer"
        if _call_key(m) != _call_key(first):
            return "layers differ in format, weight dtype, block size, activation, threads or input size"
        if m.values.device.type != "cpu":
            return "weights not on the CPU"
    r = first.block_size[0]
    if any(m.out_features % r for m in members[:-1]):
        return f"an output size that is not a multiple of the block height {r} (only the last may be)"
    nnz = sum(int(m.row_ptr[-1]) for m in members)
    if nnz > torch.iinfo(torch.int32).max:
        return "too many stored blocks for one layer"
    return None


def fused_layer(members: Sequence[nn.Module]) -> nn.Module:
    """One SparseLinear holding the members' packed weights side by side (outputs concatenated in
    member order): the same blocks, values, scales and biases, so each slice of its output is what that
    member computes."""
    from .nn import SparseLinear
    why = compatible(members)
    if why is not None:
        raise ValueError(f"these layers cannot share one kernel call: {why}")
    first = members[0]
    mod = SparseLinear.__new__(SparseLinear)
    nn.Module.__init__(mod)
    mod.in_features, mod.out_features = first.in_features, sum(m.out_features for m in members)
    mod.format, mod.block_size, mod.num_threads = first.format, tuple(first.block_size), first.num_threads
    if first.weight_dtype != "float32":
        mod.weight_dtype = first.weight_dtype
    if first.activation != "none":
        mod.activation = first.activation
    mod._finish_geometry()
    ptrs, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for m in members:
        rp = m.row_ptr
        ptrs.append(rp[1:] + offset)
        offset += int(rp[-1])
    mod.register_buffer("row_ptr", torch.cat(ptrs).contiguous())
    for name in mod._packed_names():
        if name != "row_ptr":
            mod.register_buffer(name, torch.cat([m._buffers[name] for m in members]).contiguous())
    biases = [m._bias() for m in members]
    if all(b is None for b in biases):
        mod.register_parameter("bias", None)
    else:
        full = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features)
                          for b, m in zip(biases, members)])
        mod.register_parameter("bias", nn.Parameter(full.float().contiguous(), requires_grad=False))
    return mod.validate()


def _share_arrays(fused: nn.Module, members: Sequence[nn.Module]) -> None:
    """Point each member's packed arrays (not its row pointers or bias) at its part of the fused
    layer's: the same values, held once, so a group does not double the weights' memory."""
    blocks, rows = 0, 0
    for m in members:
        nb = int(m.row_ptr[-1])
        for name in m._packed_names():
            if name == "row_ptr":
                continue
            part = fused._buffers[name]
            part = part[blocks:blocks + nb] if name in ("values", "col_idx") else part[rows:rows + m.out_features]
            old = m._buffers[name]
            if part.shape != old.shape or part.dtype != old.dtype:  # never: the fused arrays are their concatenation
                raise RuntimeError(f"shared-input group: {name} does not line up with its member")
            m._buffers[name] = part
        # the bias too, where it is the member's own Parameter: then an edit of it in place, even through
        # ``.data`` (which bumps no version counter: a hand-written SGD or EMA step), is an edit of what the
        # fused call adds
        own = m._parameters.get("bias")
        fb = fused._parameters.get("bias")
        if own is not None and fb is not None and own is m._bias() and own.shape == (m.out_features,):
            with torch.no_grad():
                own.data = fb.data[rows:rows + m.out_features]
        blocks += nb
        rows += m.out_features


class SharedInputGroup:
    """Sparse Linear layers called on one input, computed by one kernel call (see the module doc).

    Attach with :meth:`attach`; :func:`ungroup` detaches. The group is not saved by ``sp.save`` (a loaded
    model runs each layer on its own, with the same results)."""

    def __init__(self, members: Sequence[nn.Module], names: Optional[Sequence[str]] = None):
        why = compatible(members)
        if why is not None:
            raise ValueError(f"these layers cannot share one kernel call: {why}")
        self.members = list(members)
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.members))]
        self._reset()

    def _reset(self) -> None:
        self._local = threading.local()
        self._cache: Optional[Tuple[nn.Module, list]] = None
        self.enabled = True  # False: every member computes on its own (timing the alternative)

    # copy.deepcopy / pickle: the members and names travel, the caches are rebuilt
    def __getstate__(self):
        return {"members": self.members, "names": self.names}

    def __setstate__(self, state):
        self.members, self.names = state["members"], state["names"]
        self._reset()

    def attach(self) -> "SharedInputGroup":
        for i, m in enumerate(self.members):
            old = m.__dict__.get(_ATTR)
            if old is not None and old[0] is not self:
                raise ValueError(f"layer {self.names[i]} already belongs to another shared-input group")
            m.__dict__[_ATTR] = (self, i)
        # The members' arrays become views of the fused ones here, in the attaching thread, not in a lazy
        # rebuild inside some call: replacing a member's array while another thread's kernel reads it
        # (an ungrouped call of that member) would free memory in use. Rebuilds after a change of the
        # weights, or in a copy of the model, hold their own concatenated copy instead.
        with torch.inference_mode(False):
            fused = self._current()[0]
            if fused is None:
                self.detach()
                raise ValueError(f"these layers cannot share one kernel call: {compatible(self.members)}")
            _share_arrays(fused, self.members)
        self._cache = (fused, [_state(m) for m in self.members])
        return self

    def detach(self) -> None:
        for m in self.members:
            if m.__dict__.get(_ATTR, (None,))[0] is self:
                del m.__dict__[_ATTR]
        self._reset()

    def forget_copies(self, member: nn.Module) -> None:
        """Drop the fused layer if it holds copies of ``member``'s arrays rather than the very memory (a group
        rebuilt after a change, or in a copy of the model): the member's ``validate()`` calls this, so that an
        in-place edit it follows (through ``.data``: no version counter bump) reaches the next shared call."""
        cache = self._cache
        if cache is None or cache[0] is None:
            return
        fused = cache[0]

        def base(t):
            return None if t is None else t.untyped_storage().data_ptr()
        mb, fb = member._buffers, fused._buffers
        if base(mb.get("values")) != base(fb.get("values")) or (
                member._bias() is not None and base(member._bias()) != base(fused._parameters.get("bias"))):
            self._cache = None
            self._local.pending = None

    def _current(self) -> Tuple[Optional[nn.Module], list]:
        """(fused layer, the member states it was built from); the layer is None while the members can no
        longer share a call (one's threads or activation changed since): each then computes on its own."""
        cache = self._cache  # one attribute, swapped whole
        if cache is None or not all(_unchanged(m, st) for m, st in zip(self.members, cache[1])):
            states = [_state(m) for m in self.members]
            fused = None
            if compatible(self.members) is None:
                with torch.inference_mode(False):  # normal tensors even when first called under inference mode
                    fused = fused_layer(self.members)
            cache = self._cache = (fused, states)
        return cache

    def take(self, i: int, x: Tensor) -> Optional[Tensor]:
        """Member ``i``'s output for input ``x``, or None: the member then computes it itself."""
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None or not self.enabled:
            return None
        p = getattr(self._local, "pending", None)
        if p is not None and p[0] is x and p[1] == x._version:
            outs = p[3]
            y = outs[i]
            if y is not None:
                outs[i] = None
                if not any(o is not None for o in outs):
                    self._local.pending = None  # all handed out: hold neither the input nor the outputs
                if _unchanged(self.members[i], p[2][i]):  # still the weights it was computed with
                    return y
        # an inference tensor (torch.inference_mode()) has no version counter: an in-place change of it between
        # two members' calls could not be seen, so under inference mode each member computes its own output
        if not (type(x) is Tensor and x.dtype is torch.float32 and x.is_cpu and not x.is_inference()
                and x.is_contiguous() and x.dim() >= 1
                and x.numel() and x.shape[-1] == self.members[i].in_features
                and ops.call_route(x, *[m._bias() for m in self.members]) == "eager"):
            return None
        fused, states = self._current()
        if fused is None:
            return None
        outs = list(fused._fast(x).split([m.out_features for m in self.members], -1))
        mine, outs[i] = outs[i], None
        self._local.pending = (x, x._version, states, outs)
        return mine


def ungroup(model: nn.Module) -> int:
    """Detach every shared-input group from ``model``'s layers; returns how many were attached."""
    groups = _groups(model)
    for g in groups:
        g.detach()
    return len(groups)


def regroup(model: nn.Module, report: Optional[dict]) -> int:
    """Attach again the groups a convert() report kept (``sp.load`` does this): each set whose layers
    all exist in ``model`` and can still share a call (no timing). A set that cannot is left out: its
    layers run on their own, with the same results. Returns how many groups were attached."""
    mods = dict(model.named_modules())
    n = 0
    for g in (report or {}).get("shared_inputs", []):
        members = [mods.get(name) for name in g["layers"]]
        if (not g["kept"] or any(m is None or _ATTR in m.__dict__ for m in members)
                or compatible(members) is not None):
            continue
        SharedInputGroup(members, g["layers"]).attach()
        n += 1
    return n


def _callers(model: nn.Module, example_inputs) -> Dict[int, Tuple[Tensor, List[Tuple[str, nn.Module]]]]:
    """Sparse Linear layers by the input tensor they were called on in one forward (layers called more
    than once are left out: they do not read one input)."""
    from ._inputs import call_model
    from .nn import SparseLinear
    seen: Dict[int, Tuple[Tensor, List[Tuple[str, nn.Module]]]] = {}
    calls: Dict[int, int] = {}
    hooks = []

    def pre(name):
        def hook(mod, args):
            calls[id(mod)] = calls.get(id(mod), 0) + 1
            if len(args) == 1 and isinstance(args[0], Tensor):
                seen.setdefault(id(args[0]), (args[0], []))[1].append((name, mod))
        return hook

    names: Dict[int, str] = {}
    for name, m in model.named_modules():
        if type(m) is SparseLinear and m.format in ("csr", "bsr") and id(m) not in names:
            names[id(m)] = name
            hooks.append(m.register_forward_pre_hook(pre(name)))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {k: (x, [(n, m) for n, m in ms if calls[id(m)] == 1]) for k, (x, ms) in seen.items()}


def _split_compatible(members: List[Tuple[str, nn.Module]]) -> List[List[Tuple[str, nn.Module]]]:
    """Largest compatible sub-groups, in call order (one whose output size is not a multiple of the
    block height goes last, so the others stay aligned to block rows)."""
    buckets: Dict[tuple, List[Tuple[str, nn.Module]]] = {}
    for n, m in members:
        buckets.setdefault(_call_key(m), []).append((n, m))
    out = []
    for ms in buckets.values():
        r = ms[0][1].block_size[0]
        aligned = [p for p in ms if p[1].out_features % r == 0]
        ragged = [p for p in ms if p[1].out_features % r]
        ms = aligned + ragged[:1]
        if len(ms) >= 2 and compatible([m for _, m in ms]) is None:
            out.append(ms)
    return out


def group_shared_inputs(model: nn.Module, example_inputs, *, budget_s: float = 1.0, tolerance: float = 1e-4,
                        min_gain: float = 0.02) -> List[dict]:
    """Find the sparse Linear layers that read one input tensor in a forward of ``example_inputs``, and
    attach a :class:`SharedInputGroup` to each set whose one fused call (timed on that input) is at
    least ``min_gain`` faster than its members called one by one and matches them (max abs difference
    within ``tolerance`` of the largest output). Returns one dict per set considered: ``layers``,
    ``kept``, ``separate_ms``, ``fused_ms``, ``reason``."""
    from .convert import timing  # looked up per call: tests replace timing.time_calls
    ungroup(model)  # a model converted before: its groups are found again
    report = []
    sets = [(x, ms) for x, m0 in _callers(model, example_inputs).values() for ms in _split_compatible(m0)]
    deadline = time.perf_counter() + budget_s
    for x, ms in sets:
        names = [n for n, _ in ms]
        mods = [m for _, m in ms]
        entry = {"layers": names, "kept": False, "separate_ms": None, "fused_ms": None, "reason": ""}
        report.append(entry)
        if not (x.dtype is torch.float32 and x.is_cpu and x.is_contiguous() and x.numel()):
            entry["reason"] = "input is not a contiguous float32 CPU tensor"
            continue
        if x.is_inference():
            entry["reason"] = "input is an inference tensor (torch.inference_mode()): it has no version counter"
            continue
        group = SharedInputGroup(mods, names)
        with torch.no_grad():
            alone = [m(x) for m in mods]
            try:
                fused = group._current()[0]._fast(x)
            except (ValueError, RuntimeError) as e:
                entry["reason"] = f"not fused: {e}"
                continue
            a, worst, scale = 0, 0.0, 0.0
            for m, y in zip(mods, alone):
                part = fused[..., a:a + m.out_features]
                a += m.out_features
                worst = max(worst, float((part - y).abs().max()) if y.numel() else 0.0)
                scale = max(scale, float(y.abs().max()) if y.numel() else 0.0)
            if not (math.isfinite(worst) and worst <= tolerance * max(scale, 1e-30)):
                entry["reason"] = f"fused outputs differ from the layers' own (max abs {worst:.3g})"
                continue
            group.attach()

            def run(on: bool):
                group.enabled = on
                return [m(x) for m in mods]

            left = max(deadline - time.perf_counter(), 0.0) / max(len(sets) - len(report) + 1, 1)
            try:
                t = timing.time_calls({"separate": lambda: run(False), "fused": lambda: run(True)}, left,
                               min_reps=5, max_reps=60, deadline=time.perf_counter() + left)
            finally:
                group.enabled = True
                group._local.pending = None
        entry["separate_ms"], entry["fused_ms"] = t["separate"] * 1e3, t["fused"] * 1e3
        if t["fused"] * (1 + min_gain) < t["separate"]:
            entry["kept"] = True
        else:
            group.detach()
            entry["reason"] = "one call was not faster than separate calls"
    if any(e["kept"] for e in report):
        _check_model(model, example_inputs, report, tolerance)
    return report


def _check_model(model: nn.Module, example_inputs, report: List[dict], tolerance: float) -> None:
    """The whole model with its groups against the same model without: a model that cannot take a
    layer's output as a column slice (e.g. ``.view(-1)`` of it) or differs runs without groups."""
    from ._inputs import call_model
    from .convert.capture import max_error, relative
    groups = _groups(model)
    with torch.no_grad():
        for g in groups:
            g.enabled = False
        try:
            ref = call_model(model, example_inputs)
        finally:
            for g in groups:
                g.enabled = True
        try:
            out, why = call_model(model, example_inputs), None
        except Exception as e:  # noqa: BLE001 - any failure of the grouped model means: no groups
            out, why = None, f"the model failed with the grouped layers' outputs: {type(e).__name__}: {e}"
        if why is None:
            err, scale = max_error(out, ref)
            if not relative(err, scale) <= tolerance:
                why = f"the model's output changed by {relative(err, scale):.3g} (relative) with the groups"
    if why is not None:
        ungroup(model)
        for e in report:
            if e["kept"]:
                e["kept"], e["reason"] = False, why[:300]
