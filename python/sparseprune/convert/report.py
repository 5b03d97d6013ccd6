"""What convert() decided, as a table: summary(), measure() (re-timing a converted model)."""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import nn

from .. import nn as spnn
from .._inputs import call_model
from .capture import capture, max_error, relative
from .decide import MAX_SHAPES, LayerRow, label
from .registry import CONVERTERS, base_type, dense_twin, densify, weight_density
from .timing import Threads, time_calls

__all__ = ["Summary", "summary", "measure", "layer_report", "REPORT_ATTR", "check_report"]

REPORT_ATTR = "_sparseprune_report"
_REPORT_KEYS = {"layers", "folded", "tolerance", "margin", "num_threads", "measured", "max_abs_error",
                "max_rel_error", "convert_seconds", "end_to_end_ms", "end_to_end_reverted", "l2_rel_error",
                "fused", "shared_inputs", "pools", "residual", "quantized_dropped"}


def layer_report(model: nn.Module) -> Optional[dict]:
    """The decisions convert() recorded on ``model`` (None for a model convert() did not produce)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return getattr(model, REPORT_ATTR, None)


def check_report(report) -> dict:
    """A report read from a file, type-checked field by field (ValueError otherwise)."""
    if not isinstance(report, dict):
        raise ValueError(f"the report must be an object, got {type(report).__name__}")
    unknown = set(report) - _REPORT_KEYS
    if unknown:
        raise ValueError(f"the report has unknown fields {sorted(unknown)[:5]}")
    layers = report.get("layers", [])
    if not isinstance(layers, list):
        raise ValueError("the report's layers must be a list")
    out = dict(report)
    out["layers"] = [LayerRow.from_dict(r).as_dict() for r in layers]
    for k in ("tolerance", "margin", "max_abs_error", "max_rel_error", "convert_seconds", "l2_rel_error"):
        v = out.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ValueError(f"the report's {k} must be a number, got {v!r}")
    nt = out.get("num_threads")
    if nt is not None and type(nt) is not int:
        raise ValueError(f"the report's num_threads must be an int, got {nt!r}")
    qd = out.get("quantized_dropped")
    if qd is not None and not isinstance(qd, str):
        raise ValueError("the report's quantized_dropped must be a string")
    for k in ("measured", "end_to_end_reverted"):
        if out.get(k) is not None and type(out[k]) is not bool:
            raise ValueError(f"the report's {k} must be a boolean")
    e2e = out.get("end_to_end_ms")
    if e2e is not None and (not isinstance(e2e, dict) or set(e2e) - {"dense", "converted"}
                            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in e2e.values())):
        raise ValueError("the report's end_to_end_ms must map 'dense' / 'converted' to times")
    folded = out.get("folded", [])
    if not isinstance(folded, list) or not all(isinstance(f, dict) and set(f) == {"conv", "bn"}
                                               and all(isinstance(v, str) for v in f.values()) for f in folded):
        raise ValueError("the report's folded list is malformed")
    from ..ops import ACTIVATIONS
    fused = out.get("fused", [])
    if not isinstance(fused, list) or not all(
            isinstance(f, dict) and set(f) == {"layer", "activation", "kind"} and all(isinstance(v, str) for v in f.values())
            and f["kind"] in ACTIVATIONS[1:] for f in fused):
        raise ValueError("the report's fused list is malformed")
    shared = out.get("shared_inputs", [])
    if not isinstance(shared, list) or not all(
            isinstance(g, dict) and set(g) == {"layers", "kept", "separate_ms", "fused_ms", "reason"}
            and isinstance(g["layers"], list) and all(isinstance(n, str) for n in g["layers"])
            and type(g["kept"]) is bool and isinstance(g["reason"], str)
            and all(g[k] is None or (isinstance(g[k], (int, float)) and not isinstance(g[k], bool))
                    for k in ("separate_ms", "fused_ms")) for g in shared):
        raise ValueError("the report's shared_inputs list is malformed")
    for key, name, times in (("pools", "name", ("torch_ms", "ms")), ("residual", "block", ("separate_ms", "fused_ms"))):
        rows = out.get(key, [])
        if not isinstance(rows, list) or not all(
                isinstance(p, dict) and set(p) - {"attention"} == {name, "kept", *times} and isinstance(p[name], str)
                and ("attention" not in p or (key == "residual" and p["attention"] in ("sparseprune", "model")))
                and type(p["kept"]) is bool
                and all(p[k] is None or (isinstance(p[k], (int, float)) and not isinstance(p[k], bool)) for k in times)
                for p in rows):
            raise ValueError(f"the report's {key} list is malformed")
    return out


# -- summary ----------------------------------------------------------------------------------------
def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


class Summary(list):
    """Per-layer rows (dicts) with ``.totals``; ``str()`` is the table."""

    def __init__(self, rows, totals):
        super().__init__(rows)
        self.totals = totals

    def table(self) -> str:
        cols = [("layer", "name", ""), ("type", "type", ""), ("shape", "shape", ""), ("format", "format", ""),
                ("block", "block", ""), ("dtype", "weight_dtype", ""), ("density", "density", ".3f"), ("dense ms", "dense_ms", ".3f"),
                ("sparse ms", "sparse_ms", ".3f"), ("speedup", "speedup", ".2f")]
        body = []
        for r in self:
            cells = []
            for _, key, spec in cols:
                v = r.get(key)
                if key == "shape" and v is not None:
                    v = "x".join(str(s) for s in v)
                elif key == "block" and v:
                    v = f"{v[0]}x{v[1]}"
                elif key == "sparse_ms" and r.get("format") == "dense" and v is not None:
                    v = f"({v:.3f})"  # best sparse candidate, not chosen
                elif key == "speedup" and v is not None:
                    v = f"{v:.2f}x"
                elif spec and v is not None:
                    v = format(v, spec)
                elif key == "name" and v is not None:
                    v = _cell_text(str(v))
                cells.append("-" if v is None else str(v))
            body.append(cells)
        t = self.totals
        tot = ["total", "", "", f"{t['sparse_layers']}/{t['layers']} sparse", "", "", "", _num(t["dense_ms"], ".3f"),
               _num(t["converted_ms"], ".3f"), "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"]
        head = [c[0] for c in cols]
        widths = [max(_width(str(x[i])) for x in [head, tot] + body) for i in range(len(cols))]

        def line(cells):
            return "  ".join(str(c) + " " * (w - _width(str(c))) if i < 6 else " " * (w - _width(str(c))) + str(c)
                             for i, (c, w) in enumerate(zip(cells, widths)))
        out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
        out += [line(["-" * w for w in widths]), line(tot)]
        return "\n".join(out + [""] + self.notes())

    def notes(self) -> List[str]:
        t = self.totals
        notes = []
        if t.get("max_abs_error") is not None:
            tol = "" if t.get("tolerance") is None else f", tolerance {t['tolerance']:g}"
            l2 = "" if t.get("l2_rel_error") is None else f", relative L2 {t['l2_rel_error']:.3g} (quantized)"
            notes.append(f"checked on example_inputs: max abs error {t['max_abs_error']:.3g} "
                         f"(relative {_num(t.get('max_rel_error'), '.3g')}{l2}{tol})")
        if t.get("quantized_dropped"):
            notes.append("int8 / bf16 weights were dropped, every layer converted again with float32 weights: "
                         + t["quantized_dropped"])
        if t.get("measured") is False:
            notes.append("formats chosen by heuristic (no example_inputs): not measured")
        e = t.get("end_to_end_ms")
        if e and e.get("dense") is not None and e.get("converted"):
            notes.append(f"end to end: dense {e['dense']:.3f} ms, converted {e['converted']:.3f} ms "
                         f"({e['dense'] / e['converted']:.2f}x)")
            if t.get("end_to_end_reverted"):
                notes.append(f"ALL sparse layers were reverted by the end-to-end check: the converted model took "
                             f"{e['converted']:.3f} ms against {e['dense']:.3f} ms dense, so every layer runs dense")
        if t.get("folded"):
            notes.append(f"BatchNorm folded ({len(t['folded'])}): "
                         + ", ".join(f["bn"] + " -> " + f["conv"] for f in t["folded"][:6])
                         + (", ..." if len(t["folded"]) > 6 else ""))
        kept = [g for g in t.get("shared_inputs") or [] if g["kept"]]
        if kept:
            notes.append(f"layers reading one input run as one kernel call ({len(kept)}): "
                         + ", ".join(" + ".join(n.rpartition(".")[2] for n in g["layers"]) + " in "
                                     + (g["layers"][0].rpartition(".")[0] or "(top)") for g in kept[:3])
                         + (", ..." if len(kept) > 3 else ""))
        if t.get("fused"):
            notes.append(f"activations fused into the layer before them ({len(t['fused'])}): "
                         + ", ".join(f"{f['activation']} ({f['kind']}) -> {f['layer']}" for f in t["fused"][:6])
                         + (", ..." if len(t["fused"]) > 6 else ""))
        kept = [p for p in t.get("pools") or [] if p["kept"]]
        if kept:
            notes.append(f"max pools on sparseprune's kernel ({len(kept)}): "
                         + ", ".join(f"{p['name']} ({p['torch_ms']:.3f} -> {p['ms']:.3f} ms)" for p in kept[:4])
                         + (", ..." if len(kept) > 4 else ""))
        kept = [p for p in t.get("residual") or [] if p["kept"]]
        if kept:
            notes.append(f"residual blocks ending in one call (ResNet: + shortcut, activation in the conv's store; "
                         f"transformer layers: flat forward, + residual and LayerNorm in one pass) ({len(kept)}): "
                         + ", ".join(f"{p['block']} ({p['separate_ms']:.3f} -> {p['fused_ms']:.3f} ms)" for p in kept[:3])
                         + (", ..." if len(kept) > 3 else ""))
        notes.append("sparse ms in parentheses: fastest sparse candidate, slower than dense by the margin")
        if t.get("num_threads") is not None:
            notes.append(f"threads: {t['num_threads']}")
        return notes

    def __str__(self) -> str:
        return self.table()


def _row_of(name: str, m: nn.Module, reason: str) -> LayerRow:
    if isinstance(m, spnn.SparseModule):
        readable = m._values_readable()
        return LayerRow(name=name, type=m.dense_type.__name__, shape=list(m.weight_shape), format=m.format,
                        block=list(m.block_size) if m.format == "bsr" else None, weight_dtype=m.weight_dtype,
                        density=m.density if readable else None, reason=reason)
    w = CONVERTERS[base_type(m)].weight(m)
    return LayerRow(name=name, type=base_type(m).__name__, shape=list(w.shape), density=weight_density(w),
                    reason=reason)


def _cell_text(name: str, limit: int = 60) -> str:
    """A layer name as one table cell: control characters escaped (a newline would split the row), very long
    names shortened in the middle."""
    name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    return name if len(name) <= limit else name[:limit // 2 - 1] + "..." + name[-(limit // 2 - 2):]


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide and full-width characters take two."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _layers(model: nn.Module):
    # (the model itself counts when it is a single layer: sp.summary(SparseLinear.from_dense(...)))
    return [(n, m) for n, m in model.named_modules()
            if (n or not any(True for _ in m.children())) and (isinstance(m, spnn.SparseModule) or base_type(m) in CONVERTERS)]


def summary(model: nn.Module, *, print_fn: Optional[Callable[[str], Any]] = print) -> Summary:
    """Per-layer table of what convert() chose: format, block, density, dense vs sparse time, speedup.

    Prints the table with ``print_fn`` (``None``: do not print) and returns it as a :class:`Summary`:
    a list of dicts (``name, type, shape, format, block, density, dense_ms, sparse_ms, speedup,
    candidates, reason``) with ``.totals`` (``layers, sparse_layers, dense_ms, converted_ms, speedup``
    over the measured layers, ``max_abs_error``, ``max_rel_error``, ``tolerance``, ``end_to_end_ms``,
    ``end_to_end_reverted``, ``folded``, ``fused``, ``shared_inputs``, ``pools``, ``residual``,
    ``quantized_dropped``: why a conversion with int8 / bf16 allowed ended with float32 weights only, or None).
    """
    s = _summarize(model, layer_report(model))
    if print_fn is not None:
        print_fn(s.table())
    return s


def _summarize(model: nn.Module, report: Optional[dict]) -> Summary:
    if report is not None:
        rows = [dict(r) for r in report["layers"]]
    else:
        rows = [_row_of(n, m, "not measured (model not produced by convert)").as_dict()
                for n, m in _layers(getattr(model, "_orig_mod", model))]
        report = {}
    timed = [r for r in rows if r.get("dense_ms") is not None and r.get("speedup")]
    dense_total = sum(r["dense_ms"] for r in timed) if timed else None
    conv_total = sum(r["dense_ms"] / r["speedup"] for r in timed) if timed else None
    totals = {"layers": len(rows), "sparse_layers": sum(r["format"] != "dense" for r in rows),
              "dense_ms": dense_total, "converted_ms": conv_total,
              "speedup": dense_total / conv_total if timed and conv_total else None,
              "max_abs_error": report.get("max_abs_error"), "max_rel_error": report.get("max_rel_error"),
              "tolerance": report.get("tolerance"), "measured": report.get("measured"),
              "folded": report.get("folded", []), "fused": report.get("fused", []), "num_threads": report.get("num_threads"),
              "shared_inputs": report.get("shared_inputs", []), "pools": report.get("pools", []),
              "residual": report.get("residual", []),
              "end_to_end_ms": report.get("end_to_end_ms"), "l2_rel_error": report.get("l2_rel_error"),
              "end_to_end_reverted": bool(report.get("end_to_end_reverted")),
              "quantized_dropped": report.get("quantized_dropped")}
    return Summary(rows, totals)


def measure(model: nn.Module, example_inputs, *, time_budget: float = 5.0, num_threads: Optional[int] = None,
            end_to_end: bool = True) -> Summary:
    """Re-time a model on ``example_inputs``: every sparse layer against the dense layer it replaced, and
    (``end_to_end``) the whole model against :func:`densify`'s copy. Returns the summary. On convert()'s
    result (or a model ``sp.load`` gave its report back) the result also replaces the model's report (what
    :func:`summary` shows); any other model (a dense or pruned baseline, a hand-built sparse model) is
    only timed and left untouched, so that ``convert()`` still takes it."""
    target = getattr(model, "_orig_mod", model)
    layers = _layers(target)
    stamp = layer_report(target) is not None  # the report is also what makes convert() refuse a model
    with torch.no_grad(), Threads(num_threads):
        captured, _ = capture(target, layers, example_inputs)
        budget = time_budget / (max(len(captured), 1) + (2 if end_to_end else 0))
        rows = []
        for name, m in layers:
            row = _row_of(name, m, "re-measured")
            if name not in captured:
                row.reason = "not called by example_inputs"
                rows.append(row.as_dict())
                continue
            inputs = sorted(captured[name].values(), key=lambda v: -v[1])[:MAX_SHAPES]
            dense = dense_twin(m)
            cands = {"dense": dense if dense is not None else m}
            lab = label(m.format, m.block_size, m.weight_dtype) if dense is not None else None
            if dense is not None:
                cands[lab] = m
            times = {k: 0.0 for k in cands}
            for x, n in inputs:
                # forward itself: the user's hooks on the layer (kept by convert) run only in real calls, and
                # the dense twin has none to charge against the sparse layer
                per = time_calls({k: (lambda mod=mod, x=x: mod.forward(x)) for k, mod in cands.items()},
                                 budget / len(inputs))
                for k, t in per.items():
                    times[k] += n * t
            row.candidates = {k: v * 1e3 for k, v in times.items()}
            row.dense_ms = times["dense"] * 1e3
            row.speedup = 1.0
            if dense is not None:
                row.sparse_ms = times[lab] * 1e3
                row.speedup = row.dense_ms / row.sparse_ms
            rows.append(row.as_dict())
        report = dict(getattr(target, REPORT_ATTR, None) or {})
        report.update(layers=rows, measured=True, end_to_end_reverted=False,
                      num_threads=num_threads if num_threads is not None else torch.get_num_threads())
        if end_to_end:
            ref = densify(target).eval()
            e2e = time_calls({"dense": lambda: call_model(ref, example_inputs),
                              "converted": lambda: call_model(target, example_inputs)}, 2 * budget)
            report["end_to_end_ms"] = {k: v * 1e3 for k, v in e2e.items()}
            err, scale = max_error(call_model(target, example_inputs), call_model(ref, example_inputs))
            report["max_abs_error"], report["max_rel_error"] = err, relative(err, scale)
    if stamp:
        setattr(target, REPORT_ATTR, report)
    return _summarize(target, report)
