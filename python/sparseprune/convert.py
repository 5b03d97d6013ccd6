"""convert(): measured per-layer choice of dense / CSR / BSR, and summary() of the choices.

For every layer a converter is registered for (``nn.Linear``; ``nn.Conv2d`` once
``sparseprune.nn.SparseConv2d`` exists) convert() reads the weight's zero pattern, builds the
candidates (dense, CSR, BSR with the detected block and other blocks that fit), times each one on
the inputs that layer really received during a forward pass of ``example_inputs``, and keeps the
fastest. A sparse format must beat dense by ``margin`` to be chosen, so a layer is never made
slower by more than timing noise. The converted model is then checked against the source model on
``example_inputs``; a mismatch beyond ``tolerance`` is refused.

Without ``example_inputs`` nothing can be timed: each layer takes
:func:`sparseprune.nn.choose_format` (blocks when the zeros come in blocks of >= 16 elements and at
least half the weight is gone, CSR at >= 70% unstructured sparsity, dense otherwise), and the
summary says that the choice was not measured.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import nn as spnn
from .formats import block_mask

__all__ = ["convert", "summary", "measure", "densify", "Summary", "ConversionError", "Converter",
           "register_converter", "CONVERTERS", "REPORT_ATTR", "layer_report"]

REPORT_ATTR = "_sparseprune_report"
# BSR shapes tried besides the detected one (only those whose stored fraction fits, see _candidate_formats)
BSR_TRY = ((16, 16), (8, 8), (4, 4), (1, 16))
_MAX_SHAPES = 3  # distinct input shapes timed per layer (the most frequent ones)
# parents that read their children's .weight instead of calling them (torch's fused attention paths)
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class ConversionError(ValueError):
    """convert() refused: the converted model does not reproduce the source model's outputs."""


# -- per-type converters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Converter:
    """How convert() handles one module type.

    ``pattern(m)``: 2-D tensor whose zeros decide the blocks (rows = outputs, cols = inputs);
    ``weight(m)``: the effective weight (masks applied); ``dense(m)``: a plain dense module computing
    the same thing (what "dense" means for this layer); ``build(m, format, block, num_threads)``: the
    sparse module.
    """
    pattern: Callable[[nn.Module], Tensor]
    weight: Callable[[nn.Module], Tensor]
    dense: Callable[[nn.Module], nn.Module]
    build: Callable[[nn.Module, str, Optional[Tuple[int, int]], Optional[int]], nn.Module]


CONVERTERS: Dict[type, Converter] = {}


def register_converter(module_type: type, converter: Converter) -> None:
    """Teach convert() a module type (exact type match; subclasses may compute differently)."""
    CONVERTERS[module_type] = converter


def _copy_params(dst: nn.Module, src: nn.Module) -> nn.Module:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst


def _plain_linear(m: nn.Linear) -> nn.Linear:
    return _copy_params(nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                  device=m.weight.device, dtype=m.weight.dtype), m)


def _build_linear(m, fmt, block, num_threads):
    return spnn.SparseLinear.from_dense(m, format=fmt, block_size=block if fmt == "bsr" else None,
                                        num_threads=num_threads)


register_converter(nn.Linear, Converter(
    pattern=lambda m: m.weight.detach(), weight=lambda m: m.weight.detach(),
    dense=_plain_linear, build=_build_linear))


def _plain_conv2d(m: nn.Conv2d) -> nn.Conv2d:
    return _copy_params(nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                  padding=m.padding, dilation=m.dilation, groups=m.groups,
                                  bias=m.bias is not None, padding_mode=m.padding_mode,
                                  device=m.weight.device, dtype=m.weight.dtype), m)


def _build_conv2d(m, fmt, block, num_threads):
    return spnn.SparseConv2d.from_dense(m, format=fmt, block_size=block if fmt == "bsr" else None,
                                        num_threads=num_threads)


# a conv block (r, c) is r output channels x c input channels x every kernel position
register_converter(nn.Conv2d, Converter(
    pattern=lambda m: (m.weight.detach() != 0).flatten(2).any(2).float(),
    weight=lambda m: m.weight.detach(), dense=_plain_conv2d, build=_build_conv2d))


def _base_type(m: nn.Module) -> type:
    # torch.nn.utils.parametrize swaps in a generated subclass; the layer is still its base type
    if torch.nn.utils.parametrize.is_parametrized(m):
        return type(m).__bases__[0]
    return type(m)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks or torch.nn.utils.parametrize.is_parametrized(m))


def _density(w: Tensor) -> float:
    return float((w != 0).sum()) / max(w.numel(), 1)


# -- inputs and outputs -----------------------------------------------------------------------------
def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _flat_tensors(out) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_tensors(v)]
    return []


def _max_error(actual, expected) -> Tuple[float, float]:
    """(max abs error, largest reference magnitude) over every output tensor; NaN/inf must agree."""
    a, e = _flat_tensors(actual), _flat_tensors(expected)
    if len(a) != len(e):
        return math.inf, 0.0
    err, scale = 0.0, 0.0
    for x, y in zip(a, e):
        if x.shape != y.shape:
            return math.inf, 0.0
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return math.inf, 0.0
            continue
        x, y = x.detach().double(), y.detach().double()
        fy, fx = torch.isfinite(y), torch.isfinite(x)
        if not torch.equal(fx, fy) or not torch.equal(x[~fy].nan_to_num(0.0), y[~fy].nan_to_num(0.0)):
            return math.inf, 0.0
        if y.numel():
            err = max(err, float((x[fy] - y[fy]).abs().max()) if fy.any() else 0.0)
            scale = max(scale, float(y[fy].abs().max()) if fy.any() else 0.0)
    return err, scale


def _rel(err: float, scale: float) -> float:
    return err / scale if scale > 0 else err


# -- timing -----------------------------------------------------------------------------------------
def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _time_candidates(cands: Dict[str, nn.Module], inputs: List[Tuple[Tensor, int]], budget_s: float,
                     min_reps: int = 3, max_reps: int = 50) -> Dict[str, float]:
    """Median seconds per call of each candidate, weighted by how often each input shape was seen.
    Candidates are timed round-robin so that noise from other processes hits them alike."""
    total = {k: 0.0 for k in cands}
    per_shape = budget_s / max(len(inputs), 1)
    for x, count in inputs:
        samples = {k: [] for k in cands}
        for m in cands.values():  # warm-up (first-call allocations, lazy init)
            m(x)
        _sync(x)
        start = time.perf_counter()
        for rep in range(max_reps):
            for k, m in cands.items():
                t0 = time.perf_counter()
                m(x)
                _sync(x)
                samples[k].append(time.perf_counter() - t0)
            if rep + 1 >= min_reps and time.perf_counter() - start > per_shape:
                break
        for k in cands:
            total[k] += count * statistics.median(samples[k])
    return total


# -- candidates -------------------------------------------------------------------------------------
def _capture(model: nn.Module, layers, example_inputs) -> Dict[str, Dict[Tuple, List]]:
    """One forward pass of ``example_inputs`` with pre-hooks on ``layers``: for each layer, the input
    tensors it received, one copy per distinct shape (at most 8), with call counts."""
    captured: Dict[str, Dict[Tuple, List]] = {}
    hooks = []
    for name, m in layers:
        def hook(mod, args, _name=name):
            if args and isinstance(args[0], Tensor):
                seen = captured.setdefault(_name, {})
                key = tuple(args[0].shape)
                if key in seen:
                    seen[key][1] += 1
                elif len(seen) < 8:
                    seen[key] = [args[0].detach().clone(), 1]
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        _call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _stored_fraction(pattern: Tensor, block) -> float:
    r, c = block
    return float(block_mask(pattern, block).sum()) * r * c / max(pattern.numel(), 1)


def _candidate_formats(pattern: Tensor, density: float, formats: Sequence[str]):
    """Formats worth timing: CSR, the detected block, and other blocks whose stored fraction is within
    1.5x of the true density (a block storing many zeros only adds work)."""
    out = []
    if "csr" in formats:
        out.append(("csr", None))
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
    return out


def _label(fmt: str, block) -> str:
    return f"bsr{block[0]}x{block[1]}" if fmt == "bsr" else fmt


def _skipped(name: str, module: nn.Module, skip) -> bool:
    for s in skip:
        if isinstance(s, type) and isinstance(module, s):
            return True
        if isinstance(s, str) and (name == s or fnmatch.fnmatchcase(name, s) or name.startswith(s + ".")):
            return True
    return False


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that also copes with torch.nn.utils.prune / weight_norm, which keep a computed
    (non-leaf) weight tensor as a plain attribute: those are copied detached (the hooks recompute them)."""
    memo = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(model, memo)


class _Threads:
    def __init__(self, n):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


# -- convert ----------------------------------------------------------------------------------------
def convert(model: nn.Module, example_inputs=None, *, formats: Iterable[str] = ("dense", "csr", "bsr"),
            skip: Iterable = (), num_threads: Optional[int] = None, time_budget: float = 10.0,
            margin: float = 0.1, tolerance: float = 1e-4, fold_bn: bool = True, end_to_end: bool = True,
            inplace: bool = False, progress: Optional[bool] = None) -> nn.Module:
    """Return a copy of ``model`` in which each Linear (and Conv2d) runs in its fastest format.

    Args:
        model: the (pruned) model. It is not modified unless ``inplace=True``.
        example_inputs: what the model is called with: a tensor, a tuple/list (positional args) or a
            dict (keyword args). Each layer is timed on the inputs it receives in this forward pass,
            so give the batch size you will run. ``None``: no timing, each layer takes
            :func:`sparseprune.nn.choose_format` (documented heuristic) and no output check is done.
        formats: formats allowed, from ``"dense"``, ``"csr"``, ``"bsr"`` (dense is always allowed:
            it is the fallback and the baseline).
        skip: layer names (exact, prefix, or fnmatch pattern such as ``"encoder.*.fc2"``) or module
            types to leave untouched.
        num_threads: threads for the sparse kernels and, while timing, for dense torch too
            (default: ``torch.get_num_threads()`` at run time).
        time_budget: seconds spent timing candidates, in total (split across layers; each candidate
            still gets at least 3 timed runs).
        margin: a sparse format must be at least ``1 + margin`` times faster than dense to be chosen.
        tolerance: largest accepted output difference, relative to the largest reference output
            magnitude: ``max|converted - source| <= tolerance * max|source|``. Checked per layer on
            the captured inputs and end to end on ``example_inputs``; a larger error raises
            :class:`ConversionError`.
        fold_bn: fold eval-mode BatchNorm into the preceding conv first.
        end_to_end: also time the whole converted model against its dense twin on ``example_inputs``
            (a fifth of ``time_budget``); if it is not faster, every layer goes back to dense.
        inplace: convert ``model`` itself instead of a deep copy.
        progress: ``True`` always shows a tqdm bar, ``False`` never, ``None`` shows one on a terminal
            once tuning has run for a second.

    The returned model is in eval mode (convert is for inference); ``sparseprune.summary(result)``
    prints each layer's decision and measured times.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("dense", "csr", "bsr")]
    if bad:
        raise ValueError(f"formats must be chosen from 'dense', 'csr', 'bsr'; got {bad}")
    if not (margin >= 0 and tolerance >= 0 and time_budget >= 0):
        raise ValueError("margin, tolerance and time_budget must be non-negative")
    if num_threads is not None and int(num_threads) < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    skip = (skip,) if isinstance(skip, (str, type)) else tuple(skip)

    work = model if inplace else _copy_model(model)
    work.eval()
    replaced: List[Tuple[str, nn.Module]] = []  # (name, original) for undoing an in-place refusal
    with torch.no_grad(), _Threads(num_threads):
        reference = _call(work, example_inputs) if example_inputs is not None else None
        try:
            _convert_layers(work, example_inputs, reference, formats, skip, num_threads, time_budget,
                                     margin, tolerance, fold_bn, end_to_end, progress, replaced)
        except BaseException:
            if inplace:
                for name, orig in reversed(replaced):
                    _set_module(work, name, orig)
            raise
    return work


def _convert_layers(work, example_inputs, reference, formats, skip, num_threads, time_budget, margin, tolerance,
                    fold_bn, end_to_end, progress, replaced):
    start = time.perf_counter()
    folded = []
    if fold_bn:
        for conv_name, bn_name in _fold_pairs(work):
            from .fold import fold_conv_bn
            conv, bn = work.get_submodule(conv_name), work.get_submodule(bn_name)
            replaced += [(conv_name, conv), (bn_name, bn)]
            _set_module(work, conv_name, fold_conv_bn(conv, bn))
            _set_module(work, bn_name, nn.Identity())
            folded.append({"conv": conv_name, "bn": bn_name})

    targets, rows = [], []
    for name, m in work.named_modules():
        conv_ = CONVERTERS.get(_base_type(m))
        if conv_ is None or not name:
            continue
        if isinstance(work.get_submodule(name.rpartition(".")[0]) if "." in name else work, _READS_WEIGHTS):
            continue  # the parent reads .weight directly (fused fast paths): the layer must stay nn.Linear
        if _skipped(name, m, skip):
            w = conv_.weight(m)
            rows.append({"name": name, "type": _base_type(m).__name__, "shape": list(w.shape), "format": "dense",
                         "block": None, "density": _density(w), "dense_ms": None, "sparse_ms": None,
                         "speedup": None, "candidates": {}, "reason": "skipped (skip=...)"})
            continue
        targets.append((name, m, conv_))

    captured: Dict[str, Dict[Tuple, List]] = {}
    if example_inputs is not None and targets:
        captured = _capture(work, [(n, m) for n, m, _ in targets], example_inputs)

    sparse_formats = [f for f in formats if f != "dense"]
    timed = [t for t in targets if t[0] in captured]
    per_layer_budget = (0.8 if end_to_end else 1.0) * time_budget / max(len(timed), 1)
    from tqdm.auto import tqdm
    quiet = progress is False or (progress is None and not _stderr_is_tty())
    bar = tqdm(targets, desc="sparseprune.convert", unit="layer", leave=False, disable=quiet or not targets,
               delay=0 if progress else 1.0)
    aliases: Dict[int, List[str]] = {}
    for n, mod in work.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(n)
    try:
        for name, m, cv in bar:
            row = _decide(name, m, cv, captured.get(name), example_inputs is not None, sparse_formats,
                          num_threads, per_layer_budget, margin, tolerance)
            new = row.pop("_module")
            if new is not None:
                for alias in aliases.get(id(m), [name]):  # a module registered twice is replaced everywhere
                    replaced.append((alias, m))
                    _set_module(work, alias, new)
            rows.append(row)
    finally:
        bar.close()

    order = {n: i for i, (n, _) in enumerate(work.named_modules())}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    report = {"layers": rows, "folded": folded, "tolerance": tolerance, "margin": margin,
              "num_threads": num_threads if num_threads is not None else torch.get_num_threads(),
              "measured": example_inputs is not None, "max_abs_error": None, "max_rel_error": None,
              "convert_seconds": None}
    if reference is not None and end_to_end and any(r["format"] != "dense" for r in rows):
        _end_to_end_guard(work, example_inputs, rows, replaced, report, 0.2 * time_budget)
    if reference is not None:
        out = _call(work, example_inputs)
        err, scale = _max_error(out, reference)
        report["max_abs_error"], report["max_rel_error"] = err, _rel(err, scale)
        if not _rel(err, scale) <= tolerance:
            changed = [r["name"] for r in rows if r["format"] != "dense" or r.get("changed")]
            raise ConversionError(
                f"convert: the converted model does not match the source model on example_inputs: max abs "
                f"error {err:.3g} is {_rel(err, scale):.3g} of the largest output {scale:.3g}, above "
                f"tolerance={tolerance:g}. Converted layers: {changed or 'none'}; folded BatchNorms: "
                f"{[f['bn'] for f in folded] or 'none'}. Pass skip=[...] to leave layers dense, or raise "
                f"tolerance if the difference is acceptable.")
    report["convert_seconds"] = time.perf_counter() - start
    setattr(work, REPORT_ATTR, report)
    return rows


def _end_to_end_guard(work, example_inputs, rows, replaced, report, budget):
    """Time the whole converted model against its dense twin; if it is not faster, undo the sparse
    layers (per-layer timings can miss interactions: caches, threads, layouts)."""
    base = densify(work).eval()
    t = _time_candidates({"dense": lambda _x: _call(base, example_inputs),
                          "converted": lambda _x: _call(work, example_inputs)},
                         [(torch.empty(0), 1)], max(budget, 0.05), max_reps=25)
    report["end_to_end_ms"] = {k: v * 1e3 for k, v in t.items()}
    if t["converted"] < t["dense"]:
        return
    originals = dict(replaced)
    for r in rows:
        if r["format"] != "dense" and r["name"] in originals:
            orig = originals[r["name"]]
            dense = orig if not _has_hooks(orig) else CONVERTERS[_base_type(orig)].dense(orig)
            for alias in {n for n, o in replaced if o is orig}:
                _set_module(work, alias, dense)
            r.update(format="dense", block=None, speedup=1.0,
                     reason=f"reverted: whole model was not faster converted ({t['dense'] * 1e3:.3f} ms dense, "
                            f"{t['converted'] * 1e3:.3f} ms converted)")
    report["end_to_end_reverted"] = True


def _fold_pairs(work):
    from .fold import find_conv_bn_pairs
    return find_conv_bn_pairs(work)


def _stderr_is_tty() -> bool:
    """A person is watching: a terminal, or a Jupyter kernel (where tqdm.auto draws a widget)."""
    import sys
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _decide(name, m, cv: Converter, seen, measure: bool, sparse_formats, num_threads, budget, margin, tolerance):
    """One layer: candidates, timing, choice. Returns the summary row (+ '_module': replacement or None)."""
    w = cv.weight(m)
    density = _density(w)
    row = {"name": name, "type": _base_type(m).__name__, "shape": list(w.shape), "format": "dense", "block": None,
           "density": density, "dense_ms": None, "sparse_ms": None, "speedup": 1.0, "candidates": {},
           "reason": "", "_module": None}
    plain = not _has_hooks(m)
    # masks / parametrizations cost a multiply per call: the dense choice is a plain module
    dense_mod = m if plain else cv.dense(m)
    if not plain:
        row["_module"], row["changed"] = dense_mod, True
    if not w.is_floating_point() or w.dtype != torch.float32 or w.device.type not in ("cpu", "cuda"):
        row["reason"] = f"kept dense: sparse kernels run float32 on cpu/cuda (weight is {w.dtype} on {w.device})"
        return row
    if density >= 1.0:
        row["reason"] = "no zero weights: nothing to skip"
        return row
    if not sparse_formats:
        row["reason"] = "sparse formats not allowed"
        return row
    pattern = cv.pattern(m).float()
    if not measure:
        fmt, block = spnn.choose_format(pattern)
        if fmt not in sparse_formats:
            fmt, block = "dense", None
        row["reason"] = "heuristic (no example_inputs): sparseprune.nn.choose_format"
        if fmt != "dense":
            try:
                row["_module"] = cv.build(m, fmt, block, num_threads)
                row["format"], row["block"] = fmt, list(block) if fmt == "bsr" else None
            except (ValueError, TypeError, NotImplementedError) as e:
                row["reason"] = f"kept dense: {fmt} not buildable ({e})"
        return row
    if seen is None:
        row["reason"] = "not called by example_inputs: kept dense"
        return row
    inputs = sorted(seen.values(), key=lambda v: -v[1])[:_MAX_SHAPES]
    inputs = [(x, n) for x, n in inputs]
    cands: Dict[str, nn.Module] = {"dense": dense_mod}
    info = {}
    dense_out = [dense_mod(x) for x, _ in inputs]
    for fmt, block in _candidate_formats(pattern, density, sparse_formats):
        label = _label(fmt, block)
        try:
            mod = cv.build(m, fmt, block, num_threads)
        except (ValueError, TypeError, NotImplementedError) as e:
            row["candidates"][label] = f"not buildable: {e}"
            continue
        # a candidate that does not reproduce the dense layer on the real inputs is never timed
        err, scale = _max_error([mod(x) for x, _ in inputs], dense_out)
        if not _rel(err, scale) <= tolerance:
            row["candidates"][label] = f"rejected: relative error {_rel(err, scale):.3g} > tolerance {tolerance:g}"
            continue
        cands[label] = mod
        info[label] = (fmt, block)
    times = _time_candidates(cands, inputs, budget)
    for k, t in times.items():
        row["candidates"][k] = t * 1e3
    dense_t = times.pop("dense")
    row["dense_ms"] = dense_t * 1e3
    if times:
        best = min(times, key=times.get)
        row["sparse_ms"] = times[best] * 1e3
        if times[best] * (1.0 + margin) <= dense_t:
            fmt, block = info[best]
            row.update(format=fmt, block=list(block) if fmt == "bsr" else None, speedup=dense_t / times[best],
                       _module=cands[best], reason=f"fastest ({best}), {dense_t / times[best]:.2f}x dense")
        else:
            row["reason"] = f"dense: best sparse ({best}) only {dense_t / times[best]:.2f}x, margin {1 + margin:.2f}x"
    else:
        row["reason"] = "dense: no sparse candidate"
    return row


def layer_report(model: nn.Module) -> Optional[dict]:
    """The decisions convert() recorded on ``model`` (None for a model convert() did not produce)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return getattr(model, REPORT_ATTR, None)


def _densify(m: nn.Module) -> Optional[nn.Module]:
    """The plain dense module a sparse one replaced (None if ``m`` is not a sparse module)."""
    if isinstance(m, spnn.SparseLinear):
        return m.to_linear().to(next(m.buffers()).device)
    sc = getattr(spnn, "SparseConv2d", None)
    if sc is not None and isinstance(m, sc):
        from .fold import _dense_conv_of
        return _dense_conv_of(m)
    return None


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every sparse layer replaced by the dense layer it computes."""
    model = copy.deepcopy(getattr(model, "_orig_mod", model))
    for name, m in list(model.named_modules()):
        d = _densify(m) if name else None
        if d is not None:
            _set_module(model, name, d)
    return model


def measure(model: nn.Module, example_inputs, *, time_budget: float = 5.0, num_threads: Optional[int] = None,
            end_to_end: bool = True) -> Summary:
    """Re-time an already converted model on ``example_inputs``: every sparse layer against the dense
    layer it replaced, and (``end_to_end``) the whole model against :func:`densify`'s copy. Stores the
    result as the model's report (what :func:`summary` shows) and returns the summary."""
    target = getattr(model, "_orig_mod", model)
    layers = [(n, m) for n, m in target.named_modules()
              if n and (_densify(m) is not None or _base_type(m) in CONVERTERS)]
    with torch.no_grad(), _Threads(num_threads):
        captured = _capture(target, layers, example_inputs)
        budget = time_budget / (max(len(captured), 1) + (2 if end_to_end else 0))
        rows = []
        for name, m in layers:
            dense = _densify(m)
            sparse = dense is not None
            w = CONVERTERS[_base_type(dense if sparse else m)].weight(dense if sparse else m)
            row = {"name": name, "type": _base_type(dense if sparse else m).__name__, "shape": list(w.shape),
                   "format": m.format if sparse else "dense",
                   "block": list(m.block_size) if sparse and m.format == "bsr" else None,
                   "density": _density(w), "dense_ms": None, "sparse_ms": None, "speedup": None,
                   "candidates": {}, "reason": "re-measured"}
            if name in captured:
                inputs = sorted(captured[name].values(), key=lambda v: -v[1])[:_MAX_SHAPES]
                cands = {"dense": dense if sparse else m}
                if sparse:
                    cands[_label(m.format, m.block_size)] = m
                times = _time_candidates(cands, [(x, n) for x, n in inputs], budget)
                row["candidates"] = {k: v * 1e3 for k, v in times.items()}
                row["dense_ms"] = times["dense"] * 1e3
                if sparse:
                    row["sparse_ms"] = times[_label(m.format, m.block_size)] * 1e3
                    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                else:
                    row["speedup"] = 1.0
            else:
                row["reason"] = "not called by example_inputs"
            rows.append(row)
        report = dict(getattr(target, REPORT_ATTR, None) or {})
        report.update(layers=rows, measured=True,
                      num_threads=num_threads if num_threads is not None else torch.get_num_threads())
        if end_to_end:
            ref = densify(target).eval()
            e2e = _time_candidates({"dense": lambda *a: _call(ref, example_inputs),
                                    "converted": lambda *a: _call(target, example_inputs)},
                                   [(torch.empty(0), 1)], 2 * budget)
            report["end_to_end_ms"] = {k: v * 1e3 for k, v in e2e.items()}
            err, scale = _max_error(_call(target, example_inputs), _call(ref, example_inputs))
            report["max_abs_error"], report["max_rel_error"] = err, _rel(err, scale)
    setattr(target, REPORT_ATTR, report)
    return summary(target, print_fn=None)


# -- summary ----------------------------------------------------------------------------------------
class Summary(list):
    """Per-layer rows (dicts) with ``.totals``; ``str()`` is the table."""

    def __init__(self, rows, totals):
        super().__init__(rows)
        self.totals = totals

    def table(self) -> str:
        cols = [("layer", "name", "{}"), ("type", "type", "{}"), ("shape", "shape", "{}"), ("format", "format", "{}"),
                ("block", "block", "{}"), ("density", "density", "{:.3f}"), ("dense ms", "dense_ms", "{:.3f}"),
                ("sparse ms", "sparse_ms", "{:.3f}"), ("speedup", "speedup", "{:.2f}x")]
        body = []
        for r in self:
            cells = []
            for _, key, fmt in cols:
                v = r.get(key)
                if key == "shape" and v is not None:
                    v = "x".join(str(s) for s in v)
                elif key == "block" and v:
                    v = f"{v[0]}x{v[1]}"
                elif key == "sparse_ms" and r.get("format") == "dense" and v is not None:
                    v = f"({v:.3f})"  # best sparse candidate, not chosen
                    cells.append(v)
                    continue
                cells.append("-" if v is None else fmt.format(v))
            body.append(cells)
        t = self.totals
        tot = ["total", "", "", f"{t['sparse_layers']}/{t['layers']} sparse", "", "",
               "-" if t["dense_ms"] is None else f"{t['dense_ms']:.3f}",
               "-" if t["converted_ms"] is None else f"{t['converted_ms']:.3f}",
               "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"]
        head = [c[0] for c in cols]
        widths = [max(len(str(x[i])) for x in [head, tot] + body) for i in range(len(cols))]
        line = lambda cells: "  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
        out += [line(["-" * w for w in widths]), line(tot)]
        notes = []
        if t.get("max_abs_error") is not None:
            notes.append(f"checked on example_inputs: max abs error {t['max_abs_error']:.3g} "
                         f"(relative {t['max_rel_error']:.3g}, tolerance {t['tolerance']:g})")
        if t.get("measured") is False:
            notes.append("formats chosen by heuristic (no example_inputs): not measured")
        if t.get("end_to_end_ms"):
            e = t["end_to_end_ms"]
            notes.append(f"end to end: dense {e['dense']:.3f} ms, converted {e['converted']:.3f} ms "
                         f"({e['dense'] / e['converted']:.2f}x)")
        if t.get("folded"):
            notes.append(f"BatchNorm folded: {', '.join(f['bn'] + ' -> ' + f['conv'] for f in t['folded'])}")
        notes.append("sparse ms in parentheses: fastest sparse candidate, slower than dense by the margin")
        if t.get("num_threads") is not None:
            notes.append(f"threads: {t['num_threads']}")
        return "\n".join(out + [""] + notes)

    def __str__(self) -> str:
        return self.table()


def _rows_from_modules(model: nn.Module) -> List[dict]:
    rows = []
    for name, m in model.named_modules():
        if not name:
            continue
        if isinstance(m, (spnn.SparseLinear, spnn.SparseConv2d)):
            w_shape = [m.out_features, m.in_features] if isinstance(m, spnn.SparseLinear) else None
            rows.append({"name": name, "type": type(m).__name__, "shape": w_shape, "format": m.format,
                         "block": list(m.block_size) if m.format == "bsr" else None, "density": m.density,
                         "dense_ms": None, "sparse_ms": None, "speedup": None, "candidates": {},
                         "reason": "not measured (model not produced by convert)"})
        elif _base_type(m) in CONVERTERS:
            w = CONVERTERS[_base_type(m)].weight(m)
            rows.append({"name": name, "type": _base_type(m).__name__, "shape": list(w.shape), "format": "dense",
                         "block": None, "density": _density(w), "dense_ms": None, "sparse_ms": None,
                         "speedup": None, "candidates": {}, "reason": "not measured (model not produced by convert)"})
    return rows


def summary(model: nn.Module, *, print_fn: Optional[Callable[[str], Any]] = print) -> Summary:
    """Per-layer table of what convert() chose: format, block, density, dense vs sparse time, speedup.

    Prints the table with ``print_fn`` (``None``: do not print) and returns it as a :class:`Summary`:
    a list of dicts (``name, type, shape, format, block, density, dense_ms, sparse_ms, speedup,
    candidates, reason``) with ``.totals`` (``layers, sparse_layers, dense_ms, converted_ms, speedup``
    over the measured layers, ``max_abs_error``, ``max_rel_error``, ``tolerance``).
    """
    report = layer_report(model)
    if report is not None:
        rows = [dict(r) for r in report["layers"]]
    else:
        rows = _rows_from_modules(getattr(model, "_orig_mod", model))
        report = {}
    timed = [r for r in rows if r.get("dense_ms") is not None]
    dense_total = sum(r["dense_ms"] for r in timed) if timed else None
    conv_total = sum(r["dense_ms"] / r["speedup"] for r in timed) if timed else None
    totals = {"layers": len(rows), "sparse_layers": sum(r["format"] != "dense" for r in rows),
              "dense_ms": dense_total, "converted_ms": conv_total,
              "speedup": dense_total / conv_total if timed and conv_total else None,
              "max_abs_error": report.get("max_abs_error"), "max_rel_error": report.get("max_rel_error"),
              "tolerance": report.get("tolerance"), "measured": report.get("measured"),
              "folded": report.get("folded", []), "num_threads": report.get("num_threads"),
              "end_to_end_ms": report.get("end_to_end_ms")}
    s = Summary(rows, totals)
    if print_fn is not None:
        print_fn(s.table())
    return s
