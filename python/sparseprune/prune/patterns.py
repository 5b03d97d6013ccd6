"""Pattern pruning (unstructured, r x c blocks, N:M) with masks that survive training.

Patterns, for a weight of shape (out, in, *kernel). A Hugging Face ``Conv1D`` (GPT-2's Linear, weight stored
transposed as (in, out)) is pruned as the Linear whose weight is ``conv1d.weight.T``: scores, blocks and N:M groups
are taken on that (out, in) view and the mask is stored transposed, shaped like the stored weight.

* unstructured: any element.
* blocks (r, c): r output rows x c input columns; for Conv2d r output channels x c input channels x
  *all* kernel positions (an r x c x kh x kw slab), which is what the sparse conv kernels execute.
  Block grids start at (0, 0); edge blocks are clipped when a size is not a multiple of the block.
  Grouped convs are blocked over the stored weight (out x in-per-group).
* N:M: in every group of m consecutive input weights at most n are kept. Linear: along the input
  features. Conv2d: by default along the input channels at each kernel position (``nm_axis="cin"``,
  the K order of a channels-last GEMM, as NVIDIA's 2:4 tooling does); ``nm_axis="flat"`` groups the
  flattened (Cin, kh, kw) axis instead (the im2col K order). A trailing partial group keeps
  min(n, its size) weights.

All three functions prune in place, attach masks (see ``masks.py``) and return the model. Common
keyword arguments:

``importance``      "magnitude" (= "l2": block L2 norm) | "l1" | "wanda" | "sparsegpt" | "taylor" | "random", a
                    ``criteria.GradientScores`` (taylor / movement), a dict {layer name: score} or a
                    callable(name, module) -> score. Block scores are the mean element score.
``calibration``     calibration batches for wanda / sparsegpt: an iterable of model inputs (each a
                    Tensor, a tuple of positional args or a mapping of keyword args); ``forward`` feeds
                    a batch of another form. ``example_inputs`` (one call of the model, as everywhere
                    in sparseprune) is accepted as a single calibration batch.
``layers``          which layers (None = every Linear, Conv2d and Conv1D): names, glob patterns, module types,
                    module objects, or a callable(name, module) -> bool. ``exclude``: same forms.
                    A name or glob that matches no Linear / Conv2d raises ``ValueError``. A layer whose
                    weight cannot take a mask (parametrized, weight_norm, under torch.nn.utils.prune)
                    raises ``ValueError`` when named exactly (or given as a module); picked by a rule
                    (None, a glob, a type, a callable), it is left dense with a warning.
``dense_first_last`` keep the first layer (when it is a Conv2d) and the last Linear / Conv2d (the
                    classifier) dense. Default: True when ``layers`` is None, else False. A layer named
                    exactly in a sparsity dict or ``overrides`` (with a sparsity) is pruned all the same.
``scope``           "layer" (every layer at the target sparsity) or "global" (one ranking over all
                    layers; the overall sparsity hits the target).
``overrides``       {name or glob: sparsity | None (leave dense) | dict of kwargs such as
                    {"sparsity": .5, "block_size": (4, 4)} or {"n": 1, "m": 4}}, applied per layer.
``misfit``          what to do with a layer smaller than a block in some dimension: "skip" (default,
                    warn), "shrink" (clip the block to the layer) or "error".
``per_row``         (unstructured) rank within each output row instead of the whole layer; the
                    default is True for wanda / sparsegpt (as in their papers), else False.
``keep_pruned``     (default True) weights already masked stay pruned (masks only shrink).
``sequential``      (wanda / sparsegpt) calibrate each layer on the outputs of the already pruned
                    earlier layers; default True for sparsegpt, False for wanda.
``damp``            (sparsegpt) Hessian dampening as a fraction of its mean diagonal (0.01).
``seed``            for importance="random".
``sparsity`` may also be a dict {name or glob: sparsity}; layers it does not name stay dense.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from torch.nn.utils.weight_norm import WeightNorm

from . import criteria as C
from .masks import apply_mask, get_mask

__all__ = ["prune_unstructured", "prune_blocks", "prune_nm", "select_layers", "pattern_mask",
           "check_sparsity", "check_block_size", "check_nm", "PRUNABLE", "is_conv1d", "is_prunable"]

PRUNABLE = (nn.Linear, nn.Conv2d)  # and Hugging Face Conv1D, recognised by is_conv1d (transformers is not imported)
_COMMON_KW = {"importance", "example_inputs", "calibration", "forward", "layers", "exclude", "dense_first_last", "scope",
              "overrides", "misfit", "per_row", "keep_pruned", "sequential", "damp", "seed", "nm_axis"}


# -- argument checks ---------------------------------------------------------------------------------
def _calibration_batches(kw) -> list:
    from .._inputs import iter_calls, split_call
    cal, ex = kw.get("calibration"), kw.get("example_inputs")
    if cal is not None and ex is not None:
        raise ValueError("pass calibration batches as calibration=... or one call as example_inputs=..., not both")
    if cal is not None:
        return iter_calls(cal)
    if ex is None:
        raise ValueError("importance='wanda' / 'sparsegpt' needs calibration=[batches] (or one call as "
                         "example_inputs=...)")
    if kw.get("forward") is None:
        split_call(ex)  # one call of the model: a Tensor, a tuple of positional args or a mapping
    return [ex]


def check_sparsity(s, what: str = "sparsity") -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real) and not (isinstance(s, Tensor) and s.numel() == 1):
        raise TypeError(f"{what} must be a number in [0, 1], got {type(s).__name__}")
    s = float(s)
    if math.isnan(s) or not 0.0 <= s <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {s}")
    return s


def check_block_size(block_size) -> Tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if isinstance(block_size, (str, bytes)) or not hasattr(block_size, "__len__") or len(block_size) != 2:
        raise TypeError(f"block_size must be a pair of positive ints (r, c), got {block_size!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in block_size):
        raise TypeError(f"block_size must be a pair of positive ints (r, c), got {block_size!r}")
    r, c = int(block_size[0]), int(block_size[1])
    if r < 1 or c < 1:
        raise ValueError(f"block_size must be positive, got {(r, c)}")
    return r, c


def check_nm(n, m) -> Tuple[int, int]:
    for v, nm in ((n, "n"), (m, "m")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{nm} must be an int, got {type(v).__name__}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not 0 <= n <= m:
        raise ValueError(f"N:M needs 0 <= n <= m, got n={n}, m={m}")
    return n, m


# -- which layers ----------------------------------------------------------------------------------
def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is a Hugging Face ``Conv1D`` (``transformers.pytorch_utils``; GPT-2, GPT, ...): ``y = x @ W + b``
    with W stored as (in, out) and ``nf`` output features. Known by class name, without importing transformers."""
    t = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
    if t.__name__ != "Conv1D":
        return False
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        return False
    # only transformers' own class: a lookalike elsewhere may take other constructor arguments or compute more
    # (a scale), which the converter's rebuilt layer would drop; it is left alone like any unknown layer
    nf = getattr(m, "nf", None)
    return t.__module__.startswith("transformers.") and isinstance(nf, int) and w.shape[1] == nf


def is_prunable(m: nn.Module) -> bool:
    """A layer the pattern pruners (and ``select_layers``) take: Linear, Conv2d or Hugging Face Conv1D."""
    return isinstance(m, PRUNABLE) or is_conv1d(m)


def _as_out_in(mod: nn.Module, t: Tensor) -> Tensor:
    """A weight-shaped tensor as the pattern code sees it, (out, in, *kernel), and back: a Conv1D's is the
    transpose of its stored (in, out) layout (the transpose is its own inverse), anything else's unchanged."""
    return t.t() if is_conv1d(mod) else t


def _weight_shape(mod: nn.Module) -> Tuple[int, ...]:
    """``mod``'s weight shape as (out, in, *kernel)."""
    return tuple(_as_out_in(mod, mod.weight).shape)


def _matches(name: str, module: nn.Module, spec) -> bool:
    if isinstance(spec, str):
        return name == spec or fnmatch.fnmatchcase(name, spec)
    if isinstance(spec, type):
        return isinstance(module, spec)
    if isinstance(spec, nn.Module):
        return module is spec
    if callable(spec):
        return bool(spec(name, module))
    raise TypeError(f"cannot select layers with a {type(spec).__name__} (use names, globs, types, modules "
                    "or a callable)")


def _names(name: str, module: nn.Module, spec) -> bool:
    """``spec`` names this very layer (its exact name or the module object), not a rule matching it."""
    return spec == name if isinstance(spec, str) else spec is module


def _as_specs(x):
    if x is None:
        return []
    if isinstance(x, (str, type, nn.Module)) or callable(x) and not isinstance(x, (list, tuple, set)):
        return [x]
    return list(x)


def _unprunable(mod: nn.Module) -> Optional[str]:
    """Why ``mod``'s weight cannot take a mask, or None when it can."""
    if parametrize.is_parametrized(mod, "weight"):
        return ("its weight is parametrized (torch.nn.utils.parametrize, e.g. weight_norm); call "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') first")
    for h in mod._forward_pre_hooks.values():
        if isinstance(h, torch_prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == "weight":
            return "its weight is under torch.nn.utils.prune; call torch.nn.utils.prune.remove(module, 'weight') first"
        if isinstance(h, WeightNorm) and h.name == "weight":
            return ("its weight is under torch.nn.utils.weight_norm; call torch.nn.utils.remove_weight_norm(module) "
                    "first")
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter):
        return f"its weight is a {type(w).__name__}, not an nn.Parameter"
    return None


def _check_found(model: nn.Module, cands, specs, what: str = "layers=", globs: bool = True) -> None:
    """Every name or module in ``layers=`` must match some Linear / Conv2d layer (a typo would
    otherwise prune nothing); with ``globs=False`` (``exclude=``, ``overrides=``, sparsity-dict keys, where
    one pattern may serve several models) only exact names are checked."""
    missing, every = [], None
    for s in specs:
        if isinstance(s, str) and not globs and any(c in s for c in "*?["):
            continue
        if isinstance(s, str) and not any(_matches(n, m, s) for n, m in cands):
            every = every or dict(model.named_modules(remove_duplicate=False))
            missing.append((s, repr(s), every.get(s)))
        elif isinstance(s, nn.Module) and not any(m is s for _, m in cands):
            hit = [m for m in model.modules() if m is s]
            missing.append((None, f"a {type(s).__name__} module", hit[0] if hit else None))
    if not missing:
        return
    names = {id(m): n for n, m in cands}
    why = []
    for name, what, mod in missing:
        if mod is None:
            why.append(f"{what} (no such module)" if name is not None else f"{what} (not part of the model)")
        elif id(mod) in names:
            why.append(f"{what} (another name of layer {names[id(mod)]!r}, which layers= must use)")
        else:
            inside = name is not None and any(n.startswith(name + ".") for n in names.values())
            hint = f": {name + '.*'!r} selects the layers inside it" if inside else ""
            why.append(f"{what} (a {type(mod).__name__}, not a Linear / Conv2d{hint})")
    have = [n for n, _ in cands]
    more = f", ... ({len(have)} in all)" if len(have) > 8 else ""
    raise ValueError(f"{what} matches no Linear / Conv2d layer for " + "; ".join(why) + ". Names match exactly "
                     f"or as glob patterns; the model's layers are {', '.join(map(repr, have[:8])) or 'none'}{more}")


def _choose_layers(model: nn.Module, layers=None, exclude=None, dense_first_last=None, named=()):
    """(chosen {name: module}, passed over {name: (module, why)}): the selected Linear / Conv2d layers,
    split by whether their weight can take a mask. A layer named exactly in ``layers`` (or given as a
    module) that cannot is an error; one picked by a rule (None, a glob, a type, a callable) is passed
    over. ``named``: exact layer names a sparsity dict or ``overrides=`` gives a sparsity to, which
    ``dense_first_last`` does not drop (naming a layer is asking for it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cands = [(n, m) for n, m in model.named_modules() if is_prunable(m)]
    if dense_first_last is None:
        dense_first_last = layers is None
    inc, exc = _as_specs(layers), _as_specs(exclude)
    _check_found(model, cands, inc)
    _check_found(model, cands, exc, "exclude=", globs=False)
    if dense_first_last and cands:
        skip = set()
        if isinstance(cands[0][1], nn.Conv2d):
            skip.add(cands[0][0])
        skip.add(cands[-1][0])
        skip -= set(named)
        cands = [(n, m) for n, m in cands if n not in skip]
    if inc:
        cands = [(n, m) for n, m in cands if any(_matches(n, m, s) for s in inc)]
    if exc:
        cands = [(n, m) for n, m in cands if not any(_matches(n, m, s) for s in exc)]
    chosen, passed = {}, {}
    for n, m in cands:
        why = _unprunable(m)
        if why is None:
            chosen[n] = m
        elif any(_names(n, m, s) for s in inc):
            raise ValueError(f"cannot prune layer {n!r}: {why}")
        else:
            passed[n] = (m, why)
    return chosen, passed


def select_layers(model: nn.Module, layers=None, exclude=None, dense_first_last=None) -> Dict[str, nn.Module]:
    """The Linear / Conv2d / Conv1D layers a prune_* call would touch, by name, in registration order. A name in
    ``layers`` that matches no layer, or names one whose weight cannot take a mask (parametrized, under
    torch.nn.utils.prune), raises ``ValueError``; such layers picked by a rule are left out."""
    return _choose_layers(model, layers, exclude, dense_first_last)[0]


# -- pattern masks ---------------------------------------------------------------------------------
def _unit_view(scores: Tensor, kind: str, block=None):
    """(unit scores flat, unit sizes flat, expand(keep_units) -> element mask) for one layer."""
    shape = scores.shape
    if kind == "unstructured":
        return scores.reshape(-1), torch.ones(scores.numel(), device=scores.device), lambda k: k.reshape(shape)
    o, i = shape[0], shape[1]
    p = int(math.prod(shape[2:]))
    r, c = block
    mb, kb = math.ceil(o / r), math.ceil(i / c)
    s2 = scores.reshape(o, i, p)
    valid = torch.isfinite(s2)
    tot = torch.where(valid, s2, torch.zeros((), device=s2.device)).sum(2)
    nvalid = valid.sum(2).float()
    pad = scores.new_zeros(mb * r, kb * c)
    cnt = scores.new_zeros(mb * r, kb * c)
    live = scores.new_zeros(mb * r, kb * c)
    pad[:o, :i] = tot
    cnt[:o, :i] = p
    live[:o, :i] = nvalid
    bsum = pad.reshape(mb, r, kb, c).sum((1, 3))
    bcnt = cnt.reshape(mb, r, kb, c).sum((1, 3))
    blive = live.reshape(mb, r, kb, c).sum((1, 3))
    bscore = torch.where(blive > 0, bsum / blive.clamp_min(1), torch.full_like(bsum, -math.inf))

    def expand(keep):
        k = keep.reshape(mb, kb).repeat_interleave(r, 0).repeat_interleave(c, 1)[:o, :i]
        return k.unsqueeze(-1).expand(o, i, p).reshape(shape)
    return bscore.reshape(-1), bcnt.reshape(-1), expand


def _select(scores: Tensor, sizes: Tensor, target: float) -> Tensor:
    """Keep-mask over units: prune the lowest-scoring units whose total size is closest to ``target``."""
    order = torch.argsort(scores.nan_to_num(nan=-math.inf), stable=True)
    if bool((sizes == 1).all()):
        k = round(target)  # element units: the same rounding as the per-row path
    else:
        cs = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes[order].double(), 0)])
        k = int(torch.argmin((cs - target).abs()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:k]] = False
    return keep


def _nm_mask(scores: Tensor, n: int, m: int, axis: str) -> Tensor:
    if scores.dim() == 4 and axis == "cin":
        s = scores.permute(0, 2, 3, 1)  # (O, kh, kw, Cin): groups along input channels
    elif scores.dim() > 2 and axis == "flat":
        s = scores.reshape(scores.shape[0], -1)
    elif scores.dim() == 2:
        s = scores
    else:
        raise ValueError(f"nm_axis must be 'cin' or 'flat', got {axis!r}")
    lead, k = s.shape[:-1], s.shape[-1]
    g = math.ceil(k / m)
    # real slots rank above pad slots even at -inf, so a partial group keeps min(n, its size) real ones
    real = s.nan_to_num(nan=-math.inf).clamp_min(torch.finfo(torch.float32).min)
    padded = s.new_full((*lead, g * m), -math.inf)
    padded[..., :k] = real
    grp = padded.reshape(*lead, g, m)
    keep = torch.zeros_like(grp, dtype=torch.bool)
    if n > 0:
        keep.scatter_(-1, torch.topk(grp, n, dim=-1).indices, True)
    keep = keep.reshape(*lead, g * m)[..., :k]
    if scores.dim() == 4 and axis == "cin":
        return keep.permute(0, 3, 1, 2).contiguous()
    return keep.reshape(scores.shape)


def pattern_mask(scores: Tensor, kind: str, sparsity: float = 0.0, block_size=None, n: int = 2, m: int = 4,
                 per_row: bool = False, nm_axis: str = "cin") -> Tensor:
    """Keep-mask (bool, shaped like ``scores``) for one layer from element scores (higher = keep)."""
    scores = scores.float()
    if kind == "nm":
        return _nm_mask(scores, n, m, nm_axis)
    if kind == "unstructured" and per_row:
        rows = scores.reshape(scores.shape[0], -1).nan_to_num(nan=-math.inf)
        k = round(sparsity * rows.shape[1])
        order = torch.argsort(rows, dim=1, stable=True)
        keep = torch.ones_like(rows, dtype=torch.bool)
        keep.scatter_(1, order[:, :k], False)
        return keep.reshape(scores.shape)
    u, sz, expand = _unit_view(scores, kind, block_size)
    return expand(_select(u, sz, sparsity * float(sz.sum())))


# -- driver ----------------------------------------------------------------------------------------
def _warn_tied(model: nn.Module, mods: Dict[str, nn.Module]) -> None:
    """Warn for each chosen layer whose weight another module also holds (tied weights: a language model's
    ``lm_head`` and its input embedding): its mask zeroes the other module's weight too."""
    holders: Dict[int, List[str]] = {}
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(name)
    tied = []
    for name, m in mods.items():
        w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m._parameters.get("weight")
        others = [o for o in holders.get(id(w), []) if o != name and o not in mods] if w is not None else []
        if others:
            tied.append(f"{name!r} (with {', '.join(map(repr, others))})")
    if tied:
        warnings.warn(f"sparseprune: pruning {'; '.join(tied)}: the weight is shared (tied), so its mask zeroes the "
                      "other module's weight too; exclude the layer (exclude=[...]) to keep them whole")
def _layer_plans(model, sparsity, kind, kw, base) -> Tuple[Dict[str, nn.Module], Dict[str, dict]]:
    ov = kw.get("overrides") or {}
    exact = [k for k in (list(sparsity) if isinstance(sparsity, Mapping) else [])
             + ([k for k, v in ov.items() if v is not None] if isinstance(ov, Mapping) else [])
             if isinstance(k, str) and not any(c in k for c in "*?[")]
    mods, passed = _choose_layers(model, kw.get("layers"), kw.get("exclude"), kw.get("dense_first_last"), exact)
    meta = [n for n, m in mods.items() if m.weight.is_meta]
    if meta:
        raise ValueError(f"weights on the meta device have no values to prune ({', '.join(map(repr, meta))}); "
                         "materialise the model first (to_empty + load weights)")
    overrides = kw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise TypeError("overrides must be a dict {layer name or glob: sparsity | None | dict}")
    every = [(n, m) for n, m in model.named_modules() if is_prunable(m)]
    _check_found(model, every, list(overrides), "overrides=", globs=False)
    if isinstance(sparsity, Mapping):
        _check_found(model, every, list(sparsity), "a sparsity dict", globs=False)
    if isinstance(sparsity, Mapping):
        per = sparsity
    else:
        per = None
    by_why = {}
    for name, (mod, why) in passed.items():
        if per is not None and any(_names(name, mod, k) for k in per):
            raise ValueError(f"cannot prune layer {name!r}: {why}")
        ov = [v for k, v in overrides.items() if _matches(name, mod, k)]
        if (per is None or any(_matches(name, mod, k) for k in per)) and not (ov and ov[-1] is None):
            by_why.setdefault(why, []).append(repr(name))
    if by_why:
        warnings.warn("sparseprune: " + "; ".join(f"{'layer' if len(ns) == 1 else 'layers'} {', '.join(ns)} left "
                                                  f"dense: {why}" for why, ns in by_why.items()))
    _warn_tied(model, mods)
    plans, chosen = {}, {}
    for name, mod in mods.items():
        plan = dict(base)
        plan["global"] = per is None and kw.get("scope", "layer") == "global"
        if per is not None:
            hit = [v for k, v in per.items() if _matches(name, mod, k)]
            if not hit:
                continue
            plan["sparsity"] = check_sparsity(hit[-1], f"sparsity[{name!r}]")
        ov = [v for k, v in overrides.items() if _matches(name, mod, k)]
        if ov:
            v = ov[-1]
            if v is None:
                continue
            if isinstance(v, Mapping):
                unknown = set(v) - {"sparsity", "block_size", "n", "m", "importance", "per_row", "nm_axis"}
                if unknown:
                    raise ValueError(f"override for {name!r} has unknown keys {sorted(unknown)}")
                plan.update(v)
            else:
                plan["sparsity"] = v
            plan["global"] = False
        if kind == "blocks":
            plan["block_size"] = check_block_size(plan["block_size"])
        if kind == "nm":
            plan["n"], plan["m"] = check_nm(plan["n"], plan["m"])
        else:
            plan["sparsity"] = check_sparsity(plan["sparsity"])
        if kind == "blocks":
            r, c = plan["block_size"]
            shape = _weight_shape(mod)  # (out, in, ...): a Conv1D's stored weight is (in, out)
            o, i = shape[:2]
            if r > o or c > i:
                how = kw.get("misfit", "skip")
                if how == "error":
                    raise ValueError(f"layer {name!r} with weight {shape} is smaller than block {(r, c)}")
                if how == "shrink":
                    plan["block_size"] = (min(r, o), min(c, i))
                elif how == "skip":
                    warnings.warn(f"sparseprune: layer {name!r} (weight {shape}) is smaller "
                                  f"than block {(r, c)}; left dense (misfit='shrink' clips the block)")
                    continue
                else:
                    raise ValueError(f"misfit must be 'skip', 'shrink' or 'error', got {how!r}")
        chosen[name] = mod
        plans[name] = plan
    return chosen, plans


def _prune(model, kind, base, kw):
    unknown = set(kw) - _COMMON_KW
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    scope = kw.get("scope", "layer")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if kind == "nm" and scope == "global":
        raise ValueError("N:M is a per-group pattern: scope='global' does not apply")
    if kw.get("misfit", "skip") not in ("skip", "shrink", "error"):
        raise ValueError(f"misfit must be 'skip', 'shrink' or 'error', got {kw['misfit']!r}")
    if kw.get("nm_axis", "cin") not in ("cin", "flat"):
        raise ValueError(f"nm_axis must be 'cin' or 'flat', got {kw['nm_axis']!r}")
    importance = kw.get("importance", "magnitude")
    if isinstance(importance, str) and importance not in C.CRITERIA:
        raise ValueError(f"unknown importance {importance!r}; expected one of {C.CRITERIA}")
    if not isinstance(base.get("sparsity", 0.0), Mapping) and kind != "nm":
        check_sparsity(base["sparsity"])
    mods, plans = _layer_plans(model, base.get("sparsity"), kind, kw, base)
    if not mods:
        if not any(is_prunable(m) for m in model.modules()):
            _warn_nothing_prunable(model, kind)
        return model
    keep_pruned = kw.get("keep_pruned", True)
    gen = torch.Generator().manual_seed(int(kw.get("seed", 0)))
    calib = {n: p.get("importance", importance) in ("wanda", "sparsegpt") for n, p in plans.items()}
    sequential = kw.get("sequential")
    if sequential is None:
        sequential = any(p.get("importance", importance) == "sparsegpt" for p in plans.values())
    fwd = kw.get("forward")
    ex = None
    if any(calib.values()):
        ex = _calibration_batches(kw)  # a list: a generator would be spent after the first (sequential) pass
    stats = {}
    if any(calib.values()) and not sequential:
        need = {n: m for n, m in mods.items() if calib[n]}
        hess = any(plans[n].get("importance", importance) == "sparsegpt" for n in need)
        stats = C.collect_activation_stats(model, need, ex, fwd, hessian=hess)

    def scores_for(name, mod, imp):
        """Element scores on the (out, in, ...) view of the weight."""
        st = stats.get(name)
        if sequential and calib[name]:
            st = C.collect_activation_stats(model, {name: mod}, ex, fwd, hessian=imp == "sparsegpt",
                                            stop_after=mod)[name]
            stats[name] = st
        if imp == "sparsegpt":
            s = _obs_saliency(mod, st, kw.get("damp", 0.01))
        elif imp == "wanda" and is_conv1d(mod):
            s = _conv1d_wanda(mod, st)
        else:
            s = C.element_scores(imp, name, mod, st, gen)  # in the stored layout, as the weight and .grad are
            if s.shape != mod.weight.shape:
                raise ValueError(f"importance for {name!r} has shape {tuple(s.shape)}, weight is "
                                 f"{tuple(mod.weight.shape)}")
            s = _as_out_in(mod, s)
        if s.shape != _weight_shape(mod):
            raise ValueError(f"importance for {name!r} has shape {tuple(s.shape)}, weight is {_weight_shape(mod)}")
        old = get_mask(mod)
        if keep_pruned and old is not None:
            s = s.masked_fill(~_as_out_in(mod, old).to(s.device), -math.inf)
        return s

    def finish(name, mod, keep):
        """Apply ``keep`` (on the (out, in, ...) view) as the layer's mask."""
        old = get_mask(mod)
        if old is not None:
            old = _as_out_in(mod, old)
        if keep_pruned and old is not None:
            keep = keep & old.to(keep.device)
        p = plans[name]
        if p.get("importance", importance) == "sparsegpt":
            sel = None
            prior = old.reshape(old.shape[0], -1) if keep_pruned and old is not None else None
            flat_nm = kind == "nm" and (mod.weight.dim() == 2 or p.get("nm_axis", kw.get("nm_axis", "cin")) == "flat")
            if kind == "nm" and flat_nm:
                sel = _Select("nm", n=p["n"], m=p["m"], prior=prior)
            elif kind == "unstructured" and not p["global"] and p.get("per_row", kw.get("per_row")) is not False:
                sel = _Select("unstructured", p["sparsity"], prior=prior)
            keep = _obs_reconstruct(mod, stats[name], keep, kw.get("damp", 0.01), select=sel)
        apply_mask(mod, _as_out_in(mod, keep).contiguous())

    glob = [n for n in mods if plans[n]["global"]]
    for name, mod in mods.items():
        if name in glob:
            continue
        p = plans[name]
        imp = p.get("importance", importance)
        per_row = p.get("per_row", kw.get("per_row"))
        if per_row is None:
            per_row = imp in ("wanda", "sparsegpt")
        s = scores_for(name, mod, imp)
        keep = pattern_mask(s, kind, p.get("sparsity", 0.0), p.get("block_size"), p.get("n", 2), p.get("m", 4),
                            per_row=per_row, nm_axis=p.get("nm_axis", kw.get("nm_axis", "cin")))
        finish(name, mod, keep)
    if glob:
        units = []
        for name in glob:
            mod = mods[name]
            s = scores_for(name, mod, plans[name].get("importance", importance))
            units.append(_unit_view(s, "blocks" if kind == "blocks" else "unstructured",
                                    plans[name].get("block_size")))
        allu = torch.cat([u.cpu() for u, _, _ in units])
        alls = torch.cat([z.cpu() for _, z, _ in units])
        keep_all = _select(allu, alls, plans[glob[0]]["sparsity"] * float(alls.sum()))
        off = 0
        for name, (u, _, expand) in zip(glob, units):
            keep = expand(keep_all[off:off + u.numel()].to(u.device))
            off += u.numel()
            finish(name, mods[name], keep)
    return model


def _warn_nothing_prunable(model: nn.Module, kind: str) -> None:
    """prune_* found no layer type it prunes in ``model``: say so, naming the module types that hold weights of
    2 or more dimensions (what the user probably meant to prune), instead of returning the model unchanged."""
    held = list(dict.fromkeys(type(m).__name__ for m in model.modules()
                              if any(p.dim() >= 2 for p in m.parameters(recurse=False))))
    fn = {"unstructured": "prune_unstructured", "blocks": "prune_blocks", "nm": "prune_nm"}[kind]
    what = (f"its weights of 2 or more dimensions are in {', '.join(held)} modules, which pattern pruning does not "
            "support" if held else "it holds no weight of 2 or more dimensions")
    warnings.warn(f"sparseprune: {fn} pruned nothing: the model ({type(model).__name__}) has no nn.Linear, nn.Conv2d "
                  f"or Hugging Face Conv1D layer; {what}", UserWarning, stacklevel=4)


def _conv1d_wanda(mod: nn.Module, st: Optional[C.ActivationStats]) -> Tensor:
    """Wanda's |W_ij| * ||X_j|| on a Conv1D's (out, in) view (criteria's column norms assume the stored weight
    is (out, in))."""
    if st is None:
        raise ValueError("importance='wanda' needs example_inputs")
    if st.sq is None:
        raise RuntimeError("this layer saw no calibration input (is it used in the forward pass?)")
    w = mod.weight.detach().float().t()
    return w.abs() * st.sq.sqrt().to(w.device)


# -- SparseGPT-style reconstruction ------------------------------------------------------------------
def _as_matrix(mod: nn.Module) -> Tensor:
    """The weight as the (out, in * kernel) matrix that multiplies the layer's input columns."""
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        raise ValueError("importance='sparsegpt' supports Conv2d with groups=1 only")
    w = _as_out_in(mod, mod.weight.detach().float())
    return w.reshape(w.shape[0], -1).contiguous()  # a Conv1D's (out, in) view: computed as a Linear's weight is


def _damped_inverse(st: C.ActivationStats, k: int, damp: float):
    if st is None or st.gram is None:
        raise RuntimeError("no calibration Hessian for this layer (is it used in the forward pass?)")
    h = st.gram.double() / max(st.count, 1)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(k, dtype=h.dtype, device=h.device) * (damp * float(torch.diagonal(h).mean()))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return hinv, dead


def _obs_saliency(mod: nn.Module, st: C.ActivationStats, damp: float) -> Tensor:
    """SparseGPT's selection score w^2 / U_jj^2, U the upper Cholesky factor of H^-1 (the error of
    removing w_j once the columns before it are processed)."""
    w = _as_matrix(mod)
    hinv, _ = _damped_inverse(st, w.shape[1], damp)
    d = torch.diagonal(torch.linalg.cholesky(hinv, upper=True))
    return (w.double().pow(2) / d.pow(2)).float().reshape(_weight_shape(mod))


def _obs_reconstruct(mod: nn.Module, st: C.ActivationStats, keep: Tensor, damp: float, block: int = 128,
                     select=None) -> Tensor:
    """Zero the pruned weights and update the kept ones to minimise ||X W^T - X W'^T||^2 over the
    calibration inputs: one OBS update per column, left to right, in lazy batches of ``block``
    columns (SparseGPT). ``select(w_cols, d_cols, start)`` -> keep-mask for those columns lets the
    mask be chosen adaptively on the already-updated weights (unstructured, N:M); otherwise ``keep``
    is used as given. Returns the keep-mask used."""
    w = _as_matrix(mod).double()
    keep2 = keep.reshape(w.shape[0], -1).to(w.device).clone()
    k = w.shape[1]
    hinv, dead = _damped_inverse(st, k, damp)
    w[:, dead] = 0
    u = torch.linalg.cholesky(hinv, upper=True)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if select is not None and select.span is None:
            keep2[:, i1:i2] = select(w1, torch.diagonal(u1), i1)
        for j in range(i2 - i1):
            if select is not None and select.span is not None and (i1 + j) % select.span == 0:
                e_ = min(j + select.span, i2 - i1)
                keep2[:, i1 + j:i1 + e_] = select(w1[:, j:e_], torch.diagonal(u1)[j:e_], i1 + j)
            col = w1[:, j]
            q = col * keep2[:, i1 + j]
            e = (col - q) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    with torch.no_grad():
        mod.weight.copy_(_as_out_in(mod, (w * keep2).reshape(_weight_shape(mod))).to(mod.weight.dtype))
    return keep2.reshape(_weight_shape(mod))


class _Select:
    """Adaptive SparseGPT mask selection on the current (updated) weights: per row, the lowest
    w^2 / U_jj^2 of each lazy batch (unstructured), or the top n of each group of m (N:M)."""

    def __init__(self, kind: str, sparsity: float = 0.0, n: int = 2, m: int = 4, prior: Optional[Tensor] = None):
        self.kind, self.sparsity, self.n, self.m, self.prior = kind, sparsity, n, m, prior
        self.span = m if kind == "nm" else None

    def __call__(self, w_cols: Tensor, d: Tensor, start: int) -> Tensor:
        s = w_cols.pow(2) / d.pow(2).unsqueeze(0)
        if self.prior is not None:
            s = s.masked_fill(~self.prior[:, start:start + w_cols.shape[1]], -math.inf)
        if self.kind == "nm":
            return pattern_mask(s, "nm", n=self.n, m=self.m)
        return pattern_mask(s, "unstructured", self.sparsity, per_row=True)


# -- public API --------------------------------------------------------------------------------------
def prune_unstructured(model: nn.Module, sparsity, **kw) -> nn.Module:
    """Zero the fraction ``sparsity`` of each selected layer's weights (or of all of them together with
    ``scope="global"``), lowest importance first; attach masks. In place; returns ``model``."""
    return _prune(model, "unstructured", {"sparsity": sparsity}, kw)


def prune_blocks(model: nn.Module, sparsity, block_size=(16, 16), **kw) -> nn.Module:
    """Zero whole r x c blocks (Conv2d: r out x c in channels x all kernel positions; Conv1D: r out x c in
    features of ``weight.T``) until the pruned fraction is within one block of ``sparsity``. In place; returns
    ``model``."""
    check_block_size(block_size)
    return _prune(model, "blocks", {"sparsity": sparsity, "block_size": block_size}, kw)


def prune_nm(model: nn.Module, n: int = 2, m: int = 4, **kw) -> nn.Module:
    """Keep at most ``n`` of every ``m`` consecutive input weights (see the module docstring for the
    Conv2d axis). In place; returns ``model``."""
    check_nm(n, m)
    return _prune(model, "nm", {"n": n, "m": m}, kw)
