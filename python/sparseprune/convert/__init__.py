"""convert(): measured per-layer choice of dense / CSR / BSR, and summary() of the choices.

For every layer a converter is registered for (``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D``: GPT-2's
Linear, weight stored (in, out), converted to a ``SparseLinear`` of ``weight.T``) convert() reads the
weight's zero pattern, builds the candidates (dense, CSR, BSR with the detected block and other
blocks that fit), times each one on the inputs that layer really received during a forward pass of
``example_inputs``, and keeps the fastest. A sparse format must beat dense by ``margin`` to be
chosen, so a layer is never made slower by more than timing noise. The converted model is then
checked against the source model on ``example_inputs``; a mismatch beyond ``tolerance`` is refused.

Without ``example_inputs`` nothing can be timed: each layer takes
:func:`sparseprune.nn.choose_format` and the summary says that the choice was not measured.

The package is split by concern: ``registry`` (module types and their dense twins), ``capture``
(what each layer receives), ``timing`` (the one timing helper), ``decide`` (one layer's choice),
``report`` (summary / measure).
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import numbers
import time
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._inputs import call_model
from .._modules import module_names, set_module
from ..prune.patterns import is_conv1d
from .capture import capture, l2_relative, max_error, relative, static_weight_reads, tied_weights
from .decide import LayerRow, Settings, decide, label
from .registry import (CONVERTERS, Converter, base_type, carry_hooks, converter_for, dense_twin, densify, has_hooks,
                       register_converter, weight_density)
from .report import REPORT_ATTR, Summary, check_report, layer_report, measure, summary
from .timing import Threads, time_calls

__all__ = ["convert", "summary", "measure", "densify", "Summary", "ConversionError", "Converter",
           "register_converter", "CONVERTERS", "REPORT_ATTR", "layer_report", "time_calls", "LayerRow"]

# parents that read their children's .weight instead of calling them (torch's fused attention paths,
# which a capture pass under a TorchFunctionMode does not take)
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_E2E_SHARE = 0.2
_E2E_CLEAR = 1.5  # the end-to-end check stops after 3 rounds when converted is this much faster than dense


class ConversionError(ValueError):
    """convert() refused: the converted model does not reproduce the source model's outputs.

    ``quantized``: the failed check was the end-to-end one of a model with int8 / bf16 layers (its relative
    L2 error above ``quant_tolerance``)."""

    def __init__(self, message: str, quantized: bool = False):
        super().__init__(message)
        self.quantized = quantized


def _skipped(name: str, module: nn.Module, skip) -> bool:
    for s in skip:
        if isinstance(s, type) and isinstance(module, s):
            return True
        if isinstance(s, str) and (name == s or fnmatch.fnmatchcase(name, s) or name.startswith(s + ".")):
            return True
    return False


def _copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that also copes with torch.nn.utils.prune / weight_norm, which keep a computed
    (non-leaf) weight tensor as a plain attribute: those are copied detached (the hooks recompute them)."""
    memo = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(model, memo)


def _stderr_is_tty() -> bool:
    """A person is watching: a terminal, or a Jupyter kernel (where tqdm.auto draws a widget)."""
    import sys
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Swaps:
    """Module replacements made on the working copy, undoable (a module registered under several
    names is replaced under every name)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = module_names(model)
        self.done: List[Tuple[str, nn.Module]] = []  # (name, original)

    def replace(self, old: nn.Module, new: nn.Module, name: str) -> None:
        for alias in self.names.get(id(old), [name]):
            self.done.append((alias, old))
            set_module(self.model, alias, new)

    def undo(self) -> None:
        for name, orig in reversed(self.done):
            set_module(self.model, name, orig)


def convert(model: nn.Module, example_inputs=None, *, formats: Iterable[str] = ("dense", "csr", "bsr"),
            skip: Iterable = (), num_threads: Optional[int] = None, time_budget: float = 10.0,
            margin: float = 0.1, tolerance: float = 1e-4, fold_bn: bool = True, end_to_end: bool = True,
            inplace: bool = False, progress: Optional[bool] = None, weight_dtypes=(torch.float32,),
            quant_tolerance: float = 0.25, cache: bool = True, fuse: bool = True,
            shared_inputs: bool = True, pools: bool = True, residual: bool = True) -> nn.Module:
    """Return a copy of ``model`` in which each Linear (and Conv2d, Hugging Face Conv1D) runs in its fastest format.

    Args:
        model: the (pruned) model. It is not modified unless ``inplace=True``.
        example_inputs: the arguments of one call of the model: a tensor, a tuple/list (positional
            args) or any mapping (keyword args, e.g. a tokenizer's output). Each layer is timed on the
            inputs it receives in this forward pass, so give the batch size you will run. ``None``: no
            timing, each layer takes :func:`sparseprune.nn.choose_format` and no output check is done.
        formats: formats allowed, from ``"dense"``, ``"csr"``, ``"bsr"`` (one name or several; dense is always
            allowed).
        skip: layer names (exact, prefix, or fnmatch pattern such as ``"encoder.*.fc2"``) or module
            types to leave untouched.
        num_threads: threads for the sparse kernels and, while timing, for dense torch too.
        time_budget: wall-clock seconds for the whole conversion (timing, packing, checks), kept to
            within the cost of one forward pass and one candidate per layer and allowed weight dtype
            (its most structured one) when it is very small or spent.
        margin: a sparse format must be at least ``1 + margin`` times faster than dense to be chosen.
        tolerance: largest accepted output difference, relative to the largest reference output
            magnitude, checked per layer and end to end; a larger error raises :class:`ConversionError`.
        fold_bn: fold eval-mode BatchNorm into the preceding conv first (masks are baked in).
        end_to_end: also time the whole converted model against its dense twin (a fifth of the
            budget); if it is not faster, every layer goes back to dense and the summary says so.
        inplace: convert ``model`` itself instead of a deep copy.
        weight_dtypes: weight dtypes allowed, from ``torch.float32``, ``torch.bfloat16`` and ``torch.int8``
            (default: float32 only; nothing is quantized unless asked). With int8 / bf16 the candidates
            of each layer are {dense, CSR, BSR} x the allowed dtypes — dense bf16 and a BSR holding every
            block (dense int8) included, so a layer is never slower than the best dense option allowed.
            Quantized layers run inference only and need ``example_inputs`` (their error is measured).
        quant_tolerance: the relative L2 error (``||y - y_float|| / ||y_float||``) accepted for a quantized
            layer and, when any layer is quantized, end to end. Default 0.25: catches a broken layer
            (~1), accepts normal int8 error across a deep model (all-MiniLM-L6-v2's hidden states: 0.12
            with our int8 BSR, 0.40 with torch's dynamic int8 Linear). When every layer passes its own
            check but the quantized model as a whole does not, and float32 is allowed too, the model is
            converted again with float32 weights only, with a warning (the summary says so; float32 not
            allowed: :class:`ConversionError`).
        cache: reuse candidate timings measured before on this machine for the same layer problem
            (CPU model, ISA path, threads, shapes, density, candidates), kept in
            ``$SPARSEPRUNE_CACHE_DIR`` or ``~/.cache/sparseprune`` (safe to delete); ``False``: always time.
        fuse: fuse each activation module (ReLU, GELU (erf / tanh), SiLU and Hugging Face's classes of
            them) into the sparse layer whose output it alone consumes, so the kernel applies it in its
            store; proven on ``example_inputs`` (not done without them). The activation module becomes
            ``nn.Identity`` and the summary lists the pairs.
        shared_inputs: sparse Linear layers called on one input tensor (an attention block's query, key and
            value projections) run as one kernel call, their weights packed side by side
            (:mod:`sparseprune.shared`): each gets a column slice of the one output, computed as it would
            compute it alone. Found on ``example_inputs`` and kept per set only where timed faster than
            the separate calls; the summary lists the sets.
        pools: run each ``nn.MaxPool2d`` that receives a contiguous (NCHW) float32 CPU input on
            :class:`sparseprune.nn.MaxPool2d` (sparseprune's pooling kernel: the same values) where timed
            faster on ``example_inputs`` (not done without them); the summary lists them.
        residual: run the end of each Hugging Face ResNet block (last conv, + shortcut, activation) as one
            call of a float32 sparse conv with the sum and the activation in its store, and each Hugging Face
            ``BertLayer`` (BERT, MiniLM) as one flat forward with residual + LayerNorm in one pass, where checked
            equal and timed faster on ``example_inputs`` (:mod:`sparseprune.convert.residual`); the summary
            lists them.
        progress: ``True`` always shows a tqdm bar, ``False`` never, ``None`` on a terminal after 1 s.

    A layer whose weight is also read outside its own forward (tied weights, ``F.linear(x,
    self.lin.weight)``) stays the dense module it is. The returned model is in eval mode.

    Hugging Face ``resize_token_embeddings`` (and other transformers code that rebuilds the output embeddings)
    needs an ``nn.Linear`` head. A tied ``lm_head`` stays dense (its weight is the embedding's); an untied one that
    convert made a :class:`~sparseprune.nn.SparseLinear` is refused by transformers with a TypeError, raised
    after it has already resized the input embeddings. Resize the source model and convert it again, keep the
    head dense (``skip=["lm_head"]``), or put a dense head back before resizing:
    ``model.set_output_embeddings(model.get_output_embeddings().to_dense_module())``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    bare = getattr(model, "_orig_mod", model)
    if converter_for(bare) is not None:
        # convert replaces a model's layers; a bare layer has none (it came back dense without a word)
        if is_conv1d(bare):  # SparseLinear.from_dense takes an nn.Linear only
            raise ValueError("convert: the model is a single Hugging Face Conv1D, which convert would return as it is; "
                             "wrap it (nn.Sequential(layer)) and convert that, which makes it a SparseLinear of "
                             "weight.T (SparseLinear.from_dense takes an nn.Linear, not a Conv1D)")
        raise ValueError(f"convert: the model is a single {type(model).__name__}, which convert would return as it "
                         "is; wrap it (nn.Sequential(layer)) or build the sparse layer with "
                         "SparseLinear.from_dense / SparseConv2d.from_dense")
    if getattr(getattr(model, "_orig_mod", model), REPORT_ATTR, None) is not None:
        # a second convert's report would describe only what it changed: the summary would miss the first
        # one's layers and fusions, and sp.load would refuse what sp.save wrote
        raise ValueError("convert: this model is convert()'s result already; convert the source (pruned, dense) "
                         "model again")
    try:
        formats = (formats,) if isinstance(formats, str) else tuple(formats)  # one format, not a string's characters
    except TypeError:
        raise TypeError(f"formats must be a format name or names from 'dense', 'csr', 'bsr'; got {formats!r}") \
            from None
    bad = [f for f in formats if not isinstance(f, str) or f not in ("dense", "csr", "bsr")]
    if bad:
        raise ValueError(f"formats must be chosen from 'dense', 'csr', 'bsr'; got {bad}")
    if not (margin >= 0 and tolerance >= 0 and time_budget >= 0):
        raise ValueError("margin, tolerance and time_budget must be non-negative")
    if num_threads is not None:
        # an int as the sparse modules take it (1.7 or True would pass int() here and fail every sparse candidate)
        if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or not 1 <= num_threads <= 1024:
            raise ValueError(f"num_threads must be an int in [1, 1024] or None, got {num_threads!r}")
        num_threads = int(num_threads)
    skip = (skip,) if isinstance(skip, (str, type)) else tuple(skip)
    from ..nn import dtype_name
    one = isinstance(weight_dtypes, (torch.dtype, str))  # one dtype (or its name), not a string's characters
    dtypes = tuple(dict.fromkeys(dtype_name(d) for d in ((weight_dtypes,) if one else weight_dtypes)))
    if not dtypes:
        raise ValueError("weight_dtypes must name at least one dtype")
    if not quant_tolerance >= 0:
        raise ValueError("quant_tolerance must be non-negative")
    from .cache import TimingCache
    timing_cache = TimingCache(enabled=bool(cache) and example_inputs is not None)
    settings = Settings(tuple(f for f in formats if f != "dense"), num_threads, margin, tolerance,
                        example_inputs is not None, dtypes, quant_tolerance, timing_cache)
    start = time.perf_counter()
    work = model if inplace else _copy_model(model)
    work.eval()
    swaps = _Swaps(work)
    try:
        with torch.no_grad(), Threads(num_threads):
            reference = call_model(work, example_inputs) if example_inputs is not None else None
            try:
                report = _convert(work, example_inputs, reference, settings, skip, start, time_budget, fold_bn,
                                  end_to_end, progress, swaps, fuse, shared_inputs, pools, residual)
            except ConversionError as e:
                # int8 / bf16 were allowed, not required: each layer passed its own check, but their errors
                # added up through the model past quant_tolerance. Start again from the source model with
                # float32 weights only (what is left of the budget; the float timings come from the cache).
                if not (e.quantized and "float32" in dtypes and len(dtypes) > 1):
                    raise
                swaps.undo()
                swaps = _Swaps(work)
                settings = dataclasses.replace(settings, weight_dtypes=("float32",))
                why = e.args[0].split(" Converted layers:")[0]
                warnings.warn(f"{why} Converted again with float32 weights "
                              f"only (weight_dtypes allowed them); raise quant_tolerance to keep the quantized layers.",
                              stacklevel=2)
                report = _convert(work, example_inputs, reference, settings, skip, start, time_budget, fold_bn,
                                  end_to_end, progress, swaps, fuse, shared_inputs, pools, residual)
                report["quantized_dropped"] = why
    except BaseException:
        if inplace:
            swaps.undo()
        raise
    timing_cache.flush()
    report["convert_seconds"] = time.perf_counter() - start
    setattr(work, REPORT_ATTR, report)
    return work


def _fold(work: nn.Module, swaps: _Swaps, example_inputs=None) -> List[dict]:
    from ..fold import find_conv_bn_pairs, fold_conv_bn
    folded = []
    for conv_name, bn_name in find_conv_bn_pairs(work, example_inputs):
        conv, bn = work.get_submodule(conv_name), work.get_submodule(bn_name)
        swaps.replace(conv, fold_conv_bn(conv, bn), conv_name)
        swaps.replace(bn, nn.Identity(), bn_name)
        folded.append({"conv": conv_name, "bn": bn_name})
    return folded


def _warn_unconverted_subclass(name: str, m: nn.Module) -> None:
    """A subclass of nn.Linear / nn.Conv2d (its own forward: Falcon's FalconLinear, nn.MultiheadAttention's
    out_proj...) is left as it is; say so when its weight was pruned, or the speedup is lost without a word."""
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor) or w.numel() == 0 or w.device.type == "meta":
        return
    density = weight_density(w)
    if density is not None and density <= 0.5:
        base = "nn.Linear" if isinstance(m, nn.Linear) else "nn.Conv2d"
        warnings.warn(f"sparseprune: layer {name!r} ({type(m).__name__}, a subclass of {base}) has a pruned weight "
                      f"(density {density:.2f}) but is left dense: convert replaces {base} itself, not subclasses "
                      "(their forward may compute something else); register a converter for the class "
                      "(sparseprune.convert.register_converter) if its forward is the base one's", stacklevel=3)


def _targets(work: nn.Module, skip) -> Tuple[list, List[LayerRow]]:
    targets, rows = [], []
    for name, m in work.named_modules():
        cv = converter_for(m)
        if cv is None and name and isinstance(m, (nn.Linear, nn.Conv2d)):
            _warn_unconverted_subclass(name, m)
        if cv is None or not name:
            continue
        parent = work.get_submodule(name.rpartition(".")[0]) if "." in name else work
        if isinstance(parent, _READS_WEIGHTS):
            continue  # the parent reads .weight directly (fused fast paths): the layer must stay as it is
        if _skipped(name, m, skip):
            w = cv.weight(m)
            rows.append(LayerRow(name=name, type=base_type(m).__name__, shape=list(w.shape),
                                 density=weight_density(w), reason="skipped (skip=...)"))
            continue
        targets.append((name, m, cv))
    return targets, rows


def _convert(work, example_inputs, reference, settings: Settings, skip, start: float, time_budget: float,
             fold_bn: bool, end_to_end: bool, progress, swaps: _Swaps, fuse: bool = True,
             shared_inputs: bool = True, pools: bool = True, residual: bool = True) -> dict:
    deadline = start + time_budget
    folded = _fold(work, swaps, example_inputs) if fold_bn else []
    targets, rows = _targets(work, skip)
    captured: Dict[str, Dict] = {}
    read_outside = set()
    if example_inputs is not None and targets:
        captured, read_outside = capture(work, [(n, m) for n, m, _ in targets], example_inputs)
    elif targets:
        names = [n for n, _, _ in targets]
        read_outside = static_weight_reads(work, names) | tied_weights(work, names)

    from tqdm.auto import tqdm
    quiet = progress is False or (progress is None and not _stderr_is_tty())
    bar = tqdm(targets, desc="sparseprune.convert", unit="layer", leave=False, disable=quiet or not targets,
               delay=0 if progress else 1.0)
    reserve = _E2E_SHARE * time_budget if end_to_end and reference is not None else 0.0
    left = sum(1 for n, _, _ in targets if n in captured)
    twins: Dict[str, nn.Module] = {}  # each layer's plain dense module, as timed: the end-to-end check's baseline
    try:
        for name, m, cv in bar:
            if name in read_outside:
                w = cv.weight(m)
                rows.append(LayerRow(name=name, type=base_type(m).__name__, shape=list(w.shape),
                                     density=weight_density(w),
                                     reason="kept as it is: its weight is also read outside its forward "
                                            "(tied weights or used by hand)"))
                continue
            budget = max(0.0, deadline - reserve - time.perf_counter()) / max(left, 1)
            left -= name in captured
            row, new = decide(name, m, cv, captured.get(name), settings, budget, deadline - reserve, twins)
            if new is not None:
                carry_hooks(m, new)  # after the timing: the user's hooks do not run for it
                if twins.get(name) is not m and twins.get(name) is not None:
                    carry_hooks(m, twins[name])
                swaps.replace(m, new, name)
            rows.append(row)
    finally:
        bar.close()

    fused = []
    if fuse and example_inputs is not None and any(r.format != "dense" for r in rows):
        from .fuse import fuse_activations
        fused = fuse_activations(work, example_inputs, swaps)
    shared = []
    if shared_inputs and example_inputs is not None and any(r.format != "dense" for r in rows):
        from ..shared import group_shared_inputs
        left = max(0.0, deadline - reserve - time.perf_counter())
        shared = group_shared_inputs(work, example_inputs, budget_s=min(left, 0.05 * time_budget),
                                     tolerance=settings.tolerance)
    pooled = []
    if pools and example_inputs is not None:
        from .pools import fast_pools
        left = max(0.0, deadline - reserve - time.perf_counter())
        pooled = fast_pools(work, example_inputs, swaps.replace, lambda n, m: _skipped(n, m, skip),
                            min(left, 0.05 * time_budget), settings.margin, settings.num_threads)
    residuals = []
    if residual and example_inputs is not None and any(r.format != "dense" for r in rows):
        from .residual import fuse_residuals
        left = max(0.0, deadline - reserve - time.perf_counter())
        residuals = fuse_residuals(work, example_inputs, swaps.replace, min(left, 0.1 * time_budget), settings.tolerance,
                                   settings.tolerance_for("int8"))
    order = {n: i for i, (n, _) in enumerate(work.named_modules())}
    rows.sort(key=lambda r: order.get(r.name, len(order)))
    report = {"layers": rows, "folded": folded, "fused": fused, "shared_inputs": shared, "pools": pooled,
              "residual": residuals,
              "tolerance": settings.tolerance, "margin": settings.margin,
              "num_threads": settings.num_threads if settings.num_threads is not None else torch.get_num_threads(),
              "measured": settings.measured, "max_abs_error": None, "max_rel_error": None,
              "convert_seconds": None, "end_to_end_reverted": False}
    if reference is not None and end_to_end and any(r.format != "dense" for r in rows):
        # its fifth of the budget (at least 3 rounds), not whatever the layers left: a convert that found every
        # layer's timings in the cache should end well inside its budget
        _end_to_end_guard(work, example_inputs, rows, swaps, report,
                          min(max(deadline - time.perf_counter(), 0.0), reserve), twins)
    if reference is not None:
        out = call_model(work, example_inputs)
        err, scale = max_error(out, reference)
        report["max_abs_error"], report["max_rel_error"] = err, relative(err, scale)
        quantized = any(r.weight_dtype != "float32" for r in rows)
        report["tolerance"] = tol = settings.tolerance_for("int8" if quantized else "float32")
        # with quantized layers the check is the relative L2 error (int8 error concentrates on outliers)
        measured = relative(err, scale) if not quantized else l2_relative(out, reference)
        if quantized:
            report["l2_rel_error"] = measured
        if not (measured <= tol and math.isfinite(err)):
            changed = [r.name for r in rows if r.format != "dense" or r.changed]
            what = (f"relative L2 error {measured:.3g} (quantized layers)" if quantized else
                    f"max abs error {err:.3g} is {relative(err, scale):.3g} of the largest output {scale:.3g}")
            raise ConversionError(
                f"convert: the converted model does not match the source model on example_inputs: {what}, above "
                f"tolerance={tol:g}. Converted layers: {changed or 'none'}; folded BatchNorms: "
                f"{[f['bn'] for f in folded] or 'none'}"
                + (f"; fused activations: {[f['activation'] for f in fused]}" if fused else "")
                + ". Pass skip=[...] to leave layers dense"
                + (", fuse=False if a fused activation's input is also used where convert cannot see it (e.g. "
                   "TorchScript code)" if fused else "")
                + (", fold_bn=False to keep the BatchNorms" if folded else "")
                + f", or raise {'quant_tolerance' if quantized else 'tolerance'} if the difference is acceptable.",
                quantized=quantized)
    report["layers"] = [r.as_dict() for r in rows]
    return report


def _dense_pairs(rows: List[LayerRow], swaps: _Swaps, report: dict,
                 twins: Dict[str, nn.Module]) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` settings that turn the converted model into its dense twin (what a revert
    installs): each sparse layer's plain dense module under every name it has, and the activation
    modules fused into them."""
    originals = dict(swaps.done)
    pairs = []
    for f in report.get("fused", []):
        act = originals[f["activation"]]
        pairs += [(alias, act) for alias in swaps.names.get(id(act), [f["activation"]])]
    for r in rows:
        if r.format != "dense" and r.name in originals:
            orig = originals[r.name]
            dense = twins.get(r.name)
            if dense is None:
                dense = orig if not has_hooks(orig) else converter_for(orig).dense(orig)
                carry_hooks(orig, dense)
            pairs += [(alias, dense) for alias in swaps.names.get(id(orig), [r.name])]
    return pairs


def _call_swapped(work: nn.Module, pairs: List[Tuple[str, nn.Module]], example_inputs):
    """One call of ``work`` with the ``pairs`` modules in place, put back afterwards."""
    current = [(name, work.get_submodule(name)) for name, _ in pairs]
    try:
        for name, mod in pairs:
            set_module(work, name, mod)
        return call_model(work, example_inputs)
    finally:
        for name, mod in reversed(current):
            set_module(work, name, mod)


def _end_to_end_guard(work, example_inputs, rows: List[LayerRow], swaps: _Swaps, report: dict,
                      budget: float, twins: Optional[Dict[str, nn.Module]] = None) -> None:
    """Time the whole converted model against its dense twin; if it is not faster, undo the sparse
    layers (per-layer timings can miss interactions: caches, threads, layouts). The twin is the model
    itself with the dense modules the layers were timed as swapped in for its calls (no copy of the
    model and no new dense weights: a densify() copy of BERT-base took 2-3 s here)."""
    pairs = _dense_pairs(rows, swaps, report, twins or {})
    calls = {"dense": lambda: _call_swapped(work, pairs, example_inputs),
             "converted": lambda: call_model(work, example_inputs)}
    start = time.perf_counter()
    t = time_calls(calls, budget, min_reps=3 if budget > 0 else 1, max_reps=3, deadline=start + budget)
    if not t["converted"] * _E2E_CLEAR < t["dense"]:  # not clearly decided by 3 rounds: the whole share
        t = time_calls(calls, budget, min_reps=3 if budget > 0 else 1, max_reps=25, deadline=start + budget)
    report["end_to_end_ms"] = {k: v * 1e3 for k, v in t.items()}
    if t["converted"] < t["dense"]:
        return
    for name, mod in pairs:
        set_module(work, name, mod)
    report["fused"] = []
    from ..shared import ungroup
    ungroup(work)
    report["shared_inputs"] = []
    swapped = {name for name, _ in swaps.done}
    for r in rows:
        if r.format != "dense" and r.name in swapped:
            r.format, r.block, r.speedup, r.weight_dtype = "dense", None, 1.0, "float32"
            r.reason = (f"reverted by the end-to-end check: whole model was not faster converted "
                        f"({t['dense'] * 1e3:.3f} ms dense, {t['converted'] * 1e3:.3f} ms converted)")
    report["end_to_end_reverted"] = True
