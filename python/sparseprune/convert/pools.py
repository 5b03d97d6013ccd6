"""convert(pools=True): each ``nn.MaxPool2d`` that receives a contiguous float32 CPU input (NCHW) in the
example forward pass runs on :class:`sparseprune.nn.MaxPool2d` (sparseprune's pooling kernel, the same
values) where that times faster than PyTorch's. A CNN's pruned layers shrink; its stem pool does not,
and in NCHW PyTorch 2.13 spends 4.4 ms on ResNet-50's (a tenth of the 80%-sparse model)."""
from __future__ import annotations

import time
from typing import Callable, List, Optional

from torch import Tensor, nn

from .capture import first_inputs
from .registry import carry_hooks
from .timing import time_calls


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def fast_pools(work: nn.Module, example_inputs, replace: Callable[[nn.Module, nn.Module, str], None],
               skipped: Callable[[str, nn.Module], bool], budget_s: float, margin: float,
               num_threads: Optional[int]) -> List[dict]:
    """Swap the pools that time faster on our kernel (``replace(old, new, name)``); one report row per pool
    that our kernel can take: ``{"name", "kept", "torch_ms", "ms"}``."""
    from .. import ops
    from ..nn import MaxPool2d

    pools = [(n, m) for n, m in work.named_modules() if n and type(m) is nn.MaxPool2d and not skipped(n, m)]
    if not pools or example_inputs is None:
        return []
    seen = first_inputs(work, pools, example_inputs)
    rows, done = [], set()
    deadline = time.perf_counter() + budget_s
    for i, (name, pool) in enumerate(pools):
        x = seen.get(name)
        if x is None or id(pool) in done or pool.return_indices:
            continue
        done.add(id(pool))
        new = MaxPool2d.from_module(pool)
        new.num_threads = num_threads
        ours = ops.maxpool2d_eager(x, new.kernel_size, new.stride, new.padding, new.dilation, new.ceil_mode,
                                   num_threads)
        if ours is None:
            continue  # channels_last, another dtype or device: PyTorch's kernel either way
        if not _same(ours, pool(x)):  # exact by construction: a mismatch is a bug, never installed
            rows.append({"name": name, "kept": False, "torch_ms": None, "ms": None})
            continue
        left = max(0.0, deadline - time.perf_counter()) / (len(pools) - i)
        t = time_calls({"torch": lambda: pool(x), "ours": lambda: new(x)}, left, min_reps=3, max_reps=30)
        keep = t["ours"] * (1 + margin) < t["torch"]
        if keep:
            carry_hooks(pool, new)
            replace(pool, new, name)
        rows.append({"name": name, "kept": keep, "torch_ms": t["torch"] * 1e3, "ms": t["ours"] * 1e3})
    return rows
