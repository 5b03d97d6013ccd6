"""Pruning schedules: one-shot, gradual (cubic, Zhu & Gupta 2017) and iterative prune -> fine-tune.

Gradual pruning inside the user's own loop::

    pruner = GradualPruner(model, final_sparsity=0.9, start_step=100, end_step=2000, frequency=100,
                           pattern="blocks", block_size=(8, 8))
    for step, (x, y) in enumerate(loader):
        loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        pruner.step()          # prunes to the scheduled sparsity every `frequency` steps

Masks only ever grow (weights pruned at one step stay pruned), so the pattern is monotone.
"""
from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Sequence

from torch import nn

from .patterns import check_block_size, check_sparsity, prune_blocks, prune_nm, prune_unstructured

__all__ = ["cubic_sparsity", "GradualPruner", "one_shot", "iterative_prune", "geometric_steps"]

PATTERNS = ("unstructured", "blocks", "nm")


def cubic_sparsity(step: int, final_sparsity: float, start_step: int, end_step: int,
                   initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, clamped to [t0, t1]."""
    if end_step <= start_step:
        return final_sparsity if step >= start_step else initial_sparsity
    if step < start_step:
        return initial_sparsity
    frac = min(1.0, (step - start_step) / (end_step - start_step))
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


def _prune_fn(pattern: str, block_size, n, m):
    if pattern == "unstructured":
        return lambda model, s, **kw: prune_unstructured(model, s, **kw)
    if pattern == "blocks":
        bs = check_block_size(block_size)
        return lambda model, s, **kw: prune_blocks(model, s, block_size=bs, **kw)
    if pattern == "nm":
        return lambda model, s, **kw: prune_nm(model, n, m, **kw)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def one_shot(model: nn.Module, sparsity: float, pattern: str = "unstructured", block_size=(16, 16),
             n: int = 2, m: int = 4, **prune_kw) -> nn.Module:
    """Prune once to ``sparsity`` with ``pattern`` (the prune_* functions called by name)."""
    return _prune_fn(pattern, block_size, n, m)(model, sparsity, **prune_kw)


class GradualPruner:
    """Prune gradually to ``final_sparsity`` on the cubic schedule, driven by :meth:`step`.

    ``step()`` advances the step counter and, when ``(t - start_step) % frequency == 0`` within
    [start_step, end_step] (and always at ``end_step``), prunes to :meth:`sparsity_at` (t).
    Extra keyword arguments go to the prune function (importance, layers, scope, ...).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int = 0, end_step: int = 1000,
                 frequency: int = 100, initial_sparsity: float = 0.0, pattern: str = "unstructured",
                 block_size=(16, 16), **prune_kw):
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:  # masks only grow: the end would stay at the start
            raise ValueError(f"initial_sparsity {initial_sparsity} is above final_sparsity {final_sparsity}")
        for v, nm in ((start_step, "start_step"), (end_step, "end_step"), (frequency, "frequency")):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{nm} must be an int, got {type(v).__name__}")
        if start_step < 0 or end_step < start_step:
            raise ValueError(f"need 0 <= start_step <= end_step, got {start_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        if pattern == "nm":
            raise ValueError("N:M has no sparsity to schedule; use prune_nm once (one_shot(pattern='nm'))")
        self._fn = _prune_fn(pattern, block_size, 2, 4)
        self.model, self.start_step, self.end_step, self.frequency = model, start_step, end_step, frequency
        self.prune_kw = prune_kw
        self.step_count = 0
        self.current_sparsity: Optional[float] = None
        self.history: List[tuple] = []

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.final_sparsity, self.start_step, self.end_step, self.initial_sparsity)

    def due(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def step(self) -> Optional[float]:
        """Advance one step; prune if due. Returns the sparsity pruned to, or None."""
        t = self.step_count
        self.step_count += 1
        if not self.due(t):
            return None
        s = self.sparsity_at(t)
        if self.current_sparsity is not None and s <= self.current_sparsity:
            return None
        self._fn(self.model, s, **self.prune_kw)
        self.current_sparsity = s
        self.history.append((t, s))
        return s

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "current_sparsity": self.current_sparsity,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.current_sparsity = state["current_sparsity"]
        self.history = list(state["history"])


def geometric_steps(final_sparsity: float, rounds: int) -> List[float]:
    """Sparsities for ``rounds`` iterative rounds, each removing the same fraction of what is left."""
    final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    keep = 1.0 - final_sparsity
    return [1.0 - keep ** ((i + 1) / rounds) for i in range(rounds)]


def iterative_prune(model: nn.Module, sparsities: Sequence[float] | float, finetune: Callable[[nn.Module, int], object],
                    pattern: str = "unstructured", block_size=(16, 16), rounds: int = 3, **prune_kw) -> nn.Module:
    """Rounds of prune -> ``finetune(model, round_index)``. ``sparsities`` is the list of per-round
    targets, or a final sparsity (any real number or 0-d tensor, as the prune_* functions take; not a
    bool) split into ``rounds`` geometric steps."""
    if not callable(finetune):
        raise TypeError("finetune must be a callable(model, round_index)")
    if isinstance(sparsities, (bool, numbers.Real)) or getattr(sparsities, "ndim", None) == 0:
        # one number (a numpy float, a 0-d tensor, too); check_sparsity refuses a bool as elsewhere
        sparsities = geometric_steps(check_sparsity(sparsities), rounds)
    fn = _prune_fn(pattern, block_size, 2, 4)
    for i, s in enumerate(sparsities):
        fn(model, check_sparsity(s), **prune_kw)
        finetune(model, i)
    return model
