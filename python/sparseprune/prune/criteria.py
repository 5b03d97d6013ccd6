"""Importance criteria: one non-negative (or signed, for movement) score per weight element.

Higher score = more important = kept. Pattern code (``patterns.py``) aggregates element scores over
blocks / N:M groups; criteria know nothing about patterns.

* ``"magnitude"`` (= ``"l2"``): ``W**2`` (a block's score is its mean square, i.e. a per-block L2
  norm); ``"l1"``: ``|W|`` (a block's score is its mean ``|W|``, a per-block L1 norm). Element-wise
  (unstructured, N:M) both rank alike.
* ``"wanda"``: ``|W_ij| * ||X_j||_2`` with ``X_j`` the j-th input feature over all calibration tokens
  (Sun et al., 2023). For Conv2d, ``X`` is the unfolded (im2col) input, so each (in-channel, kernel
  position) column gets its own norm, exactly as the convolution's GEMM sees it. A Hugging Face Conv1D's
  weight is stored (in, out): its scores are ``|W_ji| * ||X_j||``, shaped like that stored weight.
* ``"taylor"``: first-order Taylor ``|W * dL/dW|`` from the gradients now in ``.grad`` (or
  accumulated over many steps with :class:`GradientScores`).
* ``"movement"``: ``-sum_t W * dL/dW`` accumulated during training (Sanh et al., 2020), via
  :class:`GradientScores`.
* ``"random"``: a control.

Calibration inputs (``example_inputs``): a Tensor (``model(x)``), a tuple (``model(*args)``), a
mapping (``model(**kwargs)``, e.g. a tokenizer's output), or a list / any other iterable of such
batches. Pass ``forward=lambda model, batch: ...`` for anything else (e.g. a DataLoader of (x, y)).

Padding is not activation: when a batch carries an ``attention_mask`` (a mapping batch, or a tuple
whose first item is a mapping, as a SentenceTransformer's features), a Linear layer whose input is
shaped ``(*mask.shape, features)`` contributes only the real tokens' rows to the statistics, so
calibration can run on padded batches of many sentences at once.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CRITERIA", "iter_batches", "run_batch", "ActivationStats", "collect_activation_stats",
           "element_scores", "GradientScores", "batch_token_mask", "layer_inputs"]

CRITERIA = ("magnitude", "l1", "l2", "wanda", "taylor", "movement", "random", "sparsegpt")


def iter_batches(calibration) -> Iterable:
    """Calibration batches as a list (one call — a Tensor, tuple or mapping — is one batch)."""
    from .._inputs import iter_calls
    return iter_calls(calibration)


def run_batch(model: nn.Module, batch, forward: Optional[Callable] = None):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass forward=")


def batch_token_mask(batch) -> Optional[Tensor]:
    """The ``attention_mask`` of a calibration batch (a mapping, or a tuple/list whose first item is a
    mapping), as a bool tensor; None when there is none."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        batch = batch[0]
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, Tensor) and m.dim() >= 1:
            return m.detach().bool()
    return None


def layer_inputs(module: nn.Module, x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """The 2-D matrix (tokens, features) that multiplies the weight's columns: for Conv2d the
    im2col'd input (columns ordered channel-major, then kernel row, kernel column). For a Linear
    input shaped ``(*token_mask.shape, features)``, only the rows of real (unmasked) tokens."""
    x = x.detach()
    if token_mask is not None and not isinstance(module, nn.Conv2d) and x.dim() == token_mask.dim() + 1 \
            and x.shape[:-1] == token_mask.shape:
        return x[token_mask.to(x.device)].float()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if module.padding_mode != "zeros" and any(module._reversed_padding_repeated_twice):
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        if isinstance(padding, str):  # "same" / "valid"
            padding = 0 if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in
                                                          zip(module.dilation, module.kernel_size))
        cols = F.unfold(x.float(), module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.float().reshape(-1, x.shape[-1])


_layer_inputs = layer_inputs


def _is_conv1d(module: nn.Module) -> bool:
    from .patterns import is_conv1d  # (patterns imports this module)
    return is_conv1d(module)


class ActivationStats:
    """Per-layer input statistics: sum of squares per input column, token count, optional Gram matrix."""

    def __init__(self, hessian: bool = False):
        self.sq: Optional[Tensor] = None
        self.gram: Optional[Tensor] = None
        self.count = 0
        self.hessian = hessian

    def update(self, module: nn.Module, x: Tensor, token_mask: Optional[Tensor] = None) -> None:
        cols = layer_inputs(module, x, token_mask)
        s = cols.pow(2).sum(0)
        self.sq = s if self.sq is None else self.sq + s
        if self.hessian:
            g = cols.t() @ cols
            self.gram = g if self.gram is None else self.gram + g
        self.count += cols.shape[0]

    def column_norms(self, module: nn.Module) -> Tensor:
        """||X_j||_2 shaped to broadcast against ``module.weight``."""
        if self.sq is None:
            raise RuntimeError("this layer saw no calibration input (is it used in the forward pass?)")
        norms = self.sq.sqrt()
        w = module.weight
        if _is_conv1d(module):  # weight stored (in, out): input feature j is row j
            return norms.unsqueeze(1).expand_as(w)
        if isinstance(module, nn.Conv2d):
            groups = module.groups
            per_group = norms.reshape(groups, -1)  # (groups, Cin_g*kh*kw)
            rows = per_group.repeat_interleave(w.shape[0] // groups, dim=0)
            return rows.reshape(w.shape)
        return norms.expand_as(w)


class _Stop(Exception):
    pass


def collect_activation_stats(model: nn.Module, modules: Dict[str, nn.Module], example_inputs,
                             forward: Optional[Callable] = None, hessian: bool = False,
                             stop_after: Optional[nn.Module] = None) -> Dict[str, ActivationStats]:
    """Run the calibration batches once (no grad) and gather :class:`ActivationStats` for ``modules``.
    With ``stop_after``, each forward is cut short once that module has seen its input."""
    stats = {name: ActivationStats(hessian) for name in modules}
    handles = []
    current = {"mask": None}
    for name, mod in modules.items():
        def hook(m, args, _name=name):
            stats[_name].update(m, args[0], current["mask"])
            if m is stop_after:
                raise _Stop
        handles.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iter_batches(example_inputs):
                current["mask"] = batch_token_mask(batch)
                try:
                    run_batch(model, batch, forward)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


class GradientScores:
    """Accumulate gradient-based importance during training, for Taylor or movement pruning.

    ``scores = GradientScores(model, kind="taylor")`` hooks the weights of the model's Linear / Conv2d /
    Hugging Face Conv1D layers (or ``modules``); every backward adds ``|W * dL/dW|`` (taylor) or ``-W * dL/dW``
    (movement), shaped like the stored weight (a Conv1D's (in, out), which ``prune_*`` takes on weight.T).
    Pass it as ``importance=scores`` to a ``prune_*`` function; :meth:`reset` starts over,
    :meth:`close` removes the hooks.

    A frozen weight (``requires_grad=False`` when the scores are built) gets no hook and no scores (its
    name is in :attr:`frozen`): pruning such a layer with these scores raises a ValueError; leave it out
    (``exclude=``) or give it another importance (``overrides=``).
    """

    def __init__(self, model: nn.Module, kind: str = "taylor", modules=None):
        if kind not in ("taylor", "movement"):
            raise ValueError(f"kind must be 'taylor' or 'movement', got {kind!r}")
        self.kind = kind
        if modules is None:
            from .patterns import is_prunable  # (patterns imports this module)
            modules = {n: m for n, m in model.named_modules() if is_prunable(m)}
        self.modules = dict(modules)
        self.scores: Dict[str, Tensor] = {}
        self.steps = 0
        self._handles = []
        # torch refuses a hook on a tensor that takes no gradient, and such a weight never gets one anyway
        self.frozen = {name for name, mod in self.modules.items()
                       if not (isinstance(mod.weight, Tensor) and mod.weight.requires_grad)}
        for name, mod in self.modules.items():
            if name in self.frozen:
                continue
            w = mod.weight

            def hook(g, _name=name, _w=w):
                s = (_w.detach() * g.detach())
                s = s.abs() if self.kind == "taylor" else -s
                if _name in self.scores:
                    self.scores[_name] += s
                else:
                    self.scores[_name] = s.clone()
                return None
            self._handles.append(w.register_hook(hook))

    def reset(self) -> None:
        self.scores.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def score(self, name: str, module: nn.Module) -> Tensor:
        if name in self.frozen:
            raise ValueError(f"layer {name!r} has a frozen weight (requires_grad=False when GradientScores was "
                             "built), so it has no gradient scores: leave it out (exclude=[...]) or give it "
                             f"another importance (overrides={{{name!r}: {{'importance': 'magnitude'}}}})")
        if name not in self.scores:
            raise RuntimeError(f"no gradient seen for layer {name!r}: run backward passes before pruning")
        return self.scores[name]


def element_scores(importance, name: str, module: nn.Module, stats: Optional[ActivationStats] = None,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Element-wise importance of ``module.weight`` (same shape, float32)."""
    w = module.weight.detach().float()
    if isinstance(importance, GradientScores):
        return importance.score(name, module).float()
    if isinstance(importance, Mapping):
        if name not in importance:
            raise KeyError(f"importance dict has no score for layer {name!r}")
        s = torch.as_tensor(importance[name]).float()
        if s.shape != w.shape:
            raise ValueError(f"importance for {name!r} has shape {tuple(s.shape)}, weight is {tuple(w.shape)}")
        return s.to(w.device)
    if callable(importance):
        return torch.as_tensor(importance(name, module)).float().to(w.device)
    if importance == "l1":
        return w.abs()
    if importance in ("magnitude", "l2"):
        return w.pow(2)
    if importance in ("wanda", "sparsegpt"):
        if stats is None:
            raise ValueError(f"importance={importance!r} needs example_inputs")
        return w.abs() * stats.column_norms(module).to(w.device)
    if importance == "taylor":
        g = module.weight.grad
        if g is None:
            raise ValueError("importance='taylor' uses the gradients in .grad: run loss.backward() first, or "
                             "accumulate over steps with GradientScores(model) and pass importance=that")
        return (w * g.detach().float()).abs()
    if importance == "movement":
        raise ValueError("importance='movement' needs scores accumulated during training: "
                         "pass importance=GradientScores(model, kind='movement')")
    if importance == "random":
        return torch.rand(w.shape, generator=generator).to(w.device)
    raise ValueError(f"unknown importance {importance!r}; expected one of {CRITERIA}, a GradientScores, "
                     "a dict of per-layer scores or a callable(name, module)")
