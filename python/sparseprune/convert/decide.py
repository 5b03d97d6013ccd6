"""Per-layer decision: candidates (dense, CSR, BSR shapes that fit the zeros), timing, choice."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import nn as spnn
from ..nn import WEIGHT_DTYPES
from ..formats import block_mask
from .capture import l2_relative, max_error, relative
from .registry import Converter, base_type, has_hooks, weight_density
from .timing import time_calls

__all__ = ["LayerRow", "Settings", "decide", "label", "candidate_formats", "BSR_TRY"]

# BSR shapes tried besides the detected one (only those whose stored fraction fits, see candidate_formats)
BSR_TRY = ((16, 16), (8, 8), (4, 4), (1, 16))
MAX_SHAPES = 3  # distinct input shapes timed per layer (the most frequent ones)
# candidates within this factor of the fastest count as tied: the most structured one is kept, so a
# pure 16x16 pattern does not flip to CSR or 8x8 on timing noise
NOISE = 1.08


@dataclass
class LayerRow:
    """One layer's line in convert()'s report (stored in saved files as a plain dict)."""
    name: str
    type: str
    shape: Optional[List[int]]
    format: str = "dense"
    block: Optional[List[int]] = None
    density: Optional[float] = None
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    speedup: Optional[float] = None
    candidates: Dict[str, object] = field(default_factory=dict)
    reason: str = ""
    changed: bool = False
    weight_dtype: str = "float32"
    kernel: str = "auto"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "LayerRow":
        """A row read from a file: every field type-checked (ValueError otherwise)."""
        if not isinstance(d, dict):
            raise ValueError(f"a report row must be an object, got {type(d).__name__}")
        known = cls.__dataclass_fields__
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"report row has unknown fields {sorted(unknown)[:5]}")
        row = cls(**{k: v for k, v in d.items()})
        num = (int, float)
        checks = [("name", str, False), ("type", str, False), ("format", str, False), ("reason", str, False),
                  ("weight_dtype", str, False), ("kernel", str, False),
                  ("density", num, True), ("dense_ms", num, True), ("sparse_ms", num, True), ("speedup", num, True),
                  ("shape", list, True), ("block", list, True), ("candidates", dict, False), ("changed", bool, False)]
        for k, t, opt in checks:
            v = getattr(row, k)
            if (v is None and not opt) or (v is not None and (not isinstance(v, t) or isinstance(v, bool) and t is num)):
                raise ValueError(f"report row field {k!r} has a bad value {v!r}")
        for k in ("shape", "block"):
            v = getattr(row, k)
            if v is not None and not all(type(i) is int for i in v):
                raise ValueError(f"report row field {k!r} must hold ints, got {v!r}")
        if row.format not in ("dense", "csr", "bsr"):
            raise ValueError(f"report row format {row.format!r} is unknown")
        if row.weight_dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"report row weight_dtype {row.weight_dtype!r} is unknown")
        for k, v in row.candidates.items():
            if not isinstance(k, str) or not isinstance(v, (int, float, str)) or isinstance(v, bool):
                raise ValueError("report row candidates must map names to times or notes")
        return row


@dataclass(frozen=True)
class Settings:
    sparse_formats: Tuple[str, ...]
    num_threads: Optional[int]
    margin: float
    tolerance: float
    measured: bool
    weight_dtypes: Tuple[str, ...] = ("float32",)
    quant_tolerance: float = 0.25
    cache: Optional[object] = None  # a cache.TimingCache

    def tolerance_for(self, dtype: str) -> float:
        return self.tolerance if dtype == "float32" else max(self.tolerance, self.quant_tolerance)


def label(fmt: str, block, dtype: str = "float32") -> str:
    base = f"bsr{block[0]}x{block[1]}" if fmt == "bsr" else fmt
    return base if dtype == "float32" else f"{base}-{dtype}"


def _stored_fraction(pattern: Tensor, block) -> float:
    r, c = block
    return float(block_mask(pattern, block).sum()) * r * c / max(pattern.numel(), 1)


def quant_candidates(pattern: Tensor, float_cands, dtypes: Sequence[str], formats: Sequence[str]):
    """Quantized candidates: the float blocks whose width the kernels take (int8: k by 4, bf16: by 2),
    else a narrow block; bf16 also dense (torch's bf16 GEMM). A fully dense weight gets a 16x16 BSR
    holding every block (dense int8 through our kernel)."""
    out = []
    for dt in dtypes:
        if dt == "float32":
            continue
        g = 4 if dt == "int8" else 2
        blocks = [b for f, b in float_cands if f == "bsr" and b[1] % g == 0] if "bsr" in formats else []
        if not blocks and "bsr" in formats:
            full = bool((pattern != 0).all())
            blocks = [(16, 16)] if full and pattern.shape[1] >= 16 else [(1, g) if not full else (1, g)]
        out += [("bsr", b, dt) for b in blocks[:2]]
        if dt == "bfloat16":
            out.append(("dense", None, dt))
    return out


def candidate_formats(pattern: Tensor, density: float, formats: Sequence[str]):
    """Formats worth timing, most structured first: the detected block, other blocks whose stored
    fraction is within 1.5x of the true density (a block storing many zeros only adds work), CSR."""
    out = []
    if "bsr" in formats:
        seen = set()
        det = spnn.detect_block_size(pattern)
        if det is not None and det != (1, 1):
            out.append(("bsr", det))
            seen.add(det)
        for bs in BSR_TRY:
            if bs in seen or pattern.shape[0] < bs[0] or pattern.shape[1] < bs[1]:
                continue
            if len(seen) >= 2:
                break
            if _stored_fraction(pattern, bs) <= min(1.0, 1.5 * density + 1e-9):
                out.append(("bsr", bs))
                seen.add(bs)
    if "csr" in formats:
        out.append(("csr", None))
    return out


def _tune_kernel(mod, row: LayerRow, inputs, counts, budget_s: float, deadline: float, settings, key) -> None:
    """Time the fp32 kernel variants (thread split, X panels: ``ops.KERNELS``) of the chosen layer on its
    real inputs and pin the fastest when it beats the heuristics' choice by more than the noise."""
    from ..ops import KERNELS
    if (not isinstance(mod, (spnn.SparseLinear, spnn.SparseConv2d)) or mod.format == "dense"
            or mod.weight_dtype != "float32"):
        return
    if isinstance(mod, spnn.SparseConv2d):
        # the variants apply to the Linear route of a 1x1 convolution on channels_last inputs only
        if not (mod.kernel_size == (1, 1) and mod.dilation == (1, 1) and mod.groups == 1
                and not any(mod._pad4)
                and all(x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                        for x in inputs)):
            return
        rows = max((x.numel() // max(x.shape[1], 1) for x in inputs), default=0)
    else:
        rows = max((x.numel() // max(x.shape[-1], 1) for x in inputs), default=0)
    if rows < 16:
        return  # too few rows of X for the variants to differ
    names = list(KERNELS) if mod.block_size[0] >= 8 else ["auto", "rows/panels", "blocks/panels"]
    kkey = key + ":kernel" if key is not None else None
    cached = settings.cache.get(kkey) if kkey is not None else None
    if cached is not None and set(cached) == set(names):
        times = dict(cached)
    else:
        times = {k: 0.0 for k in names}
        for x, n in zip(inputs, counts):
            def run(v, x=x):
                mod.kernel = v
                return mod(x)
            per = time_calls({v: (lambda v=v: run(v)) for v in names}, min(budget_s, 0.2) / len(inputs),
                             deadline=deadline)
            for k, t in per.items():
                times[k] += n * t
        if kkey is not None:
            settings.cache.put(kkey, times)
    best = min(times, key=times.get)
    if best != "auto" and times["auto"] <= NOISE * times[best]:
        best = "auto"
    from .cache import timing_machine
    mod.kernel, mod.kernel_cpu = best, (timing_machine() if best != "auto" else "")
    row.kernel = best
    if best != "auto":
        row.reason += f"; kernel {best} {times['auto'] / times[best]:.2f}x the heuristic's"


CACHE_CHECK = 2.0  # a cached dense / best ratio further than this from a fresh one is not trusted


CLOSE_CALL = 1.3  # a runner-up cached within this factor of the best is re-timed with it ...
FLIPPED = 1.25  # ... and the entry is re-measured when the runner-up now beats the best by this factor
RUNNER_MIN_S = 1e-4  # ... for layers slow enough to time that well in a few calls (and to matter)


def _cache_agrees(cached: Dict[str, float], cands: Dict[str, nn.Module], inputs, budget_s: float,
                  deadline: float) -> bool:
    """Cached timings are re-checked cheaply before use: dense, the cached best and (when it was a close
    call) the runner-up, a few calls on the largest input. Timings taken while the machine was busy (or
    on a changed machine) are re-measured: the dense / best ratio must agree within CACHE_CHECK, and a
    runner-up that now beats the best by FLIPPED means the cached order was noise."""
    rest = sorted((k for k in cached if k != "dense"), key=cached.get)
    if not rest or "dense" not in cached:
        return True
    best = rest[0]
    runner = rest[1] if (len(rest) > 1 and cached[rest[1]] <= CLOSE_CALL * cached[best]
                         and cached[best] >= RUNNER_MIN_S) else None
    x = max(inputs, key=lambda t: t.numel())
    fns = {"dense": lambda: cands["dense"](x), best: lambda: cands[best](x)}
    if runner is not None:
        fns[runner] = lambda: cands[runner](x)
    # a few calls each (3 at least): this check looks for a factor CACHE_CHECK or a FLIPPED order, not for 5%
    fresh = time_calls(fns, min(budget_s, 0.02 * len(fns) / 2), min_reps=3, max_reps=5, deadline=deadline)
    if not all(fresh.get(k, 0) > 0 and cached[k] > 0 for k in fns):
        return False
    r_cached, r_fresh = cached["dense"] / cached[best], fresh["dense"] / fresh[best]
    if not 1.0 / CACHE_CHECK <= r_fresh / r_cached <= CACHE_CHECK:
        return False
    return runner is None or fresh[runner] * FLIPPED >= fresh[best]


def _layout(x: Tensor) -> str:
    """The memory layout and dtype of a captured input, for the timing cache's key."""
    if x.is_contiguous():
        lay = "contiguous"
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        lay = "channels_last"
    else:
        lay = "strides" + str(list(x.stride()))
    return f"{lay}:{x.dtype}"


def _choice_candidates(cached: Dict[str, float], labels: List[str]) -> List[str]:
    """The candidates a decision from ``cached`` times can need built, in preference order: the best,
    the runner-up when _cache_agrees re-times it (a close call), and the most structured one when it is
    within NOISE of the best (the choice then falls on it)."""
    best = min(labels, key=cached.get)  # as the choice breaks ties: the first in preference order
    need = {best}
    rest = sorted((k for k in cached if k != "dense"), key=cached.get)  # as _cache_agrees ranks them
    need.add(rest[0])
    if len(rest) > 1 and cached[rest[1]] <= CLOSE_CALL * cached[rest[0]] and cached[rest[0]] >= RUNNER_MIN_S:
        need.add(rest[1])
    if cached[labels[0]] <= NOISE * cached[best]:
        need.add(labels[0])
    return [lab for lab in labels if lab in need]


def decide(name: str, m: nn.Module, cv: Converter, seen: Optional[Dict], settings: Settings, budget_s: float,
           deadline: float, twins: Optional[Dict[str, nn.Module]] = None) -> Tuple[LayerRow, Optional[nn.Module]]:
    """One layer: ``(row, replacement or None)``. ``twins`` (if given) receives the plain dense module the
    layer was timed as (``m`` itself, or its hook-free copy): the end-to-end check's dense model."""
    w = cv.weight(m)
    row = LayerRow(name=name, type=base_type(m).__name__, shape=list(w.shape), density=weight_density(w))
    new: Optional[nn.Module] = None
    # masks / parametrizations cost a multiply per call: the dense choice is a plain module
    dense_mod = m
    if has_hooks(m):
        dense_mod = new = cv.dense(m)
        row.changed = True
    if twins is not None:
        twins[name] = dense_mod
    if row.density is None:
        row.reason = "kept dense: meta tensors have no values to inspect"
        return row, new
    if not w.is_floating_point() or w.dtype != torch.float32 or w.device.type not in ("cpu", "cuda"):
        row.reason = f"kept dense: sparse kernels run float32 on cpu/cuda (weight is {w.dtype} on {w.device})"
        return row, new
    quantize = any(d != "float32" for d in settings.weight_dtypes) and settings.measured
    if w.numel() == 0 or (row.density >= 1.0 and not quantize):
        row.reason = "no zero weights: nothing to skip"
        return row, new
    if not settings.sparse_formats and not quantize:
        row.reason = "sparse formats not allowed"
        return row, new
    pattern = cv.pattern(m).float()
    if not settings.measured:
        fmt, block = spnn.choose_format(pattern)
        if fmt not in settings.sparse_formats:
            fmt, block = "dense", None
        row.reason = "heuristic (no example_inputs): sparseprune.nn.choose_format"
        if fmt != "dense":
            try:
                new = cv.build(m, fmt, block, settings.num_threads)
                row.format, row.block = fmt, list(block) if fmt == "bsr" else None
            except (ValueError, TypeError, NotImplementedError) as e:
                row.reason = f"kept dense: {fmt} not buildable ({e})"
        return row, new
    if seen is None:
        row.reason = "not called by example_inputs: kept dense"
        return row, new
    inputs = [x for x, _ in sorted(seen.values(), key=lambda v: -v[1])[:MAX_SHAPES]]
    counts = [n for _, n in sorted(seen.values(), key=lambda v: -v[1])[:MAX_SHAPES]]
    cands: Dict[str, nn.Module] = {"dense": dense_mod}
    info = {}
    dense_out = [dense_mod(x) for x in inputs]
    floats = candidate_formats(pattern, row.density, settings.sparse_formats) if row.density < 1.0 else []
    allowed = [(f, b, "float32") for f, b in floats] if "float32" in settings.weight_dtypes else []
    if quantize:
        allowed += quant_candidates(pattern, floats, settings.weight_dtypes, settings.sparse_formats + ("dense",))
    def build_checked(fmt, block, dt, lab) -> bool:
        """Build one candidate and keep it (cands / info) if it reproduces the dense layer on the inputs."""
        try:
            mod = cv.build(m, fmt, block, settings.num_threads, *(() if dt == "float32" else (WEIGHT_DTYPES[dt],)))
        except (ValueError, TypeError, NotImplementedError) as e:
            row.candidates[lab] = f"not buildable: {e}"
            return False
        # a candidate that does not reproduce the dense layer on the real inputs is never timed
        tol = settings.tolerance_for(dt)
        outs = [mod(x) for x in inputs]
        err, scale = max_error(outs, dense_out)
        # float candidates: max error relative to the largest output; quantized ones: relative L2 error
        rel = relative(err, scale) if dt == "float32" else l2_relative(outs, dense_out)
        if not (rel <= tol and (dt == "float32" or math.isfinite(err))):
            row.candidates[lab] = f"rejected: relative error {rel:.3g} > tolerance {tol:g}"
            return False
        cands[lab] = mod
        info[lab] = (fmt, block, dt)
        return True

    def cache_key(names):
        # the layout is part of the problem: a convolution's candidates rank differently on NCHW and
        # channels_last inputs of one shape (the int8 ones pay two layout transposes on NCHW); without it an
        # NCHW ResNet-50 reused channels_last timings and got int8 layers 2-3x slower than its float32 ones
        return settings.cache.key(type=row.type, shape=row.shape, inputs=[list(x.shape) for x in inputs],
                                  layouts=[_layout(x) for x in inputs],
                                  counts=counts, density=round(row.density, 3), candidates=sorted(names),
                                  threads=settings.num_threads or torch.get_num_threads())

    labels = [label(f, b, dt) for f, b, dt in allowed]
    by_label = dict(zip(labels, allowed))
    # Cached timings for every allowed candidate (the usual case: each one passed when it was timed):
    # build and check only those the choice can land on (the cached best, a close runner-up, the most
    # structured one within noise of the best); the others' packing and output checks cost a cached
    # BERT-base convert a third of its time. Any of these failing its check: the full path below, which
    # keeps what was built and checked here.
    key = cached = None
    partial = False
    if settings.cache is not None and labels:
        probe = cache_key(["dense"] + labels)
        hit = settings.cache.get(probe)
        if hit is not None and set(hit) == {"dense", *labels}:
            need = _choice_candidates(hit, labels)
            if all(build_checked(*by_label[lab], lab) for lab in need):
                key, cached, partial = probe, hit, True
    if not partial:
        tried_dtypes = set()
        for fmt, block, dt in allowed:
            lab = label(fmt, block, dt)
            if lab in cands or lab in row.candidates:  # built and checked (or rejected) above
                tried_dtypes.add(dt)
                continue
            # past the budget, each allowed weight dtype still gets its first (most structured) candidate:
            # building and checking one is cheap, and a user who allowed int8 should not get float32 only
            # because the budget ran out before the layer's int8 candidates came up
            if dt in tried_dtypes and time.perf_counter() >= deadline:
                row.candidates[lab] = "not tried: time_budget spent"
                continue
            tried_dtypes.add(dt)
            build_checked(fmt, block, dt, lab)
        if settings.cache is not None:
            key = cache_key(cands)
            cached = settings.cache.get(key)
    stale = False
    if cached is not None and (partial or set(cached) == set(cands)):
        stale = not _cache_agrees(cached, cands, inputs, budget_s, deadline)
        if stale:
            cached = None
            if partial:  # re-time every candidate: build the ones skipped above
                for lab in labels:
                    if lab not in cands:
                        build_checked(*by_label[lab], lab)
                key = cache_key(cands)
    if cached is not None and partial:
        times = {k: cached[k] for k in ["dense"] + labels}  # every candidate's cached time, in preference order
    elif cached is not None and set(cached) == set(cands):
        times = {k: cached[k] for k in cands}  # measured on this machine before: not timed again
    else:
        cached = None
        times = {k: 0.0 for k in cands}
        for x, n in zip(inputs, counts):
            per = time_calls({k: (lambda mod=mod, x=x: mod(x)) for k, mod in cands.items()},
                             budget_s / len(inputs), deadline=deadline)
            for k, t in per.items():
                times[k] += n * t
        if key is not None:
            settings.cache.put(key, times)
    for k, t in times.items():
        row.candidates[k] = t * 1e3
    dense_t = times.pop("dense")
    row.dense_ms = dense_t * 1e3
    row.speedup = 1.0
    if not times:
        row.reason = "dense: no sparse candidate"
        return row, new
    best = min(times, key=times.get)
    preferred = next(iter(times))  # the most structured candidate
    if best != preferred and times[preferred] <= NOISE * times[best]:
        best = preferred
    row.sparse_ms = times[best] * 1e3
    if times[best] * (1.0 + settings.margin) <= dense_t:
        fmt, block, row.weight_dtype = info[best]
        row.format, row.block, row.speedup = fmt, list(block) if fmt == "bsr" else None, dense_t / times[best]
        row.reason = f"fastest ({best}), {dense_t / times[best]:.2f}x dense" + (" [cached timings]" if cached else "") \
            + (" [re-timed: the cached timings disagreed with a fresh check]" if stale else "")
        new = cands[best]
        if time.perf_counter() < deadline:
            _tune_kernel(new, row, inputs, counts, budget_s, deadline, settings, key)
    else:
        row.reason = f"dense: best sparse ({best}) only {dense_t / times[best]:.2f}x, margin {1 + settings.margin:.2f}x" \
            + (" [re-timed: the cached timings disagreed with a fresh check]" if stale else "")
    return row, new
