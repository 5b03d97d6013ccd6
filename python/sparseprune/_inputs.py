"""The one meaning of ``example_inputs`` everywhere: the arguments of one call of the model.

- a ``Tensor``: ``model(x)``;
- a ``tuple`` / ``list``: positional arguments, ``model(*args)``;
- any ``Mapping`` (a ``dict``, a tokenizer's ``BatchEncoding``, ...): keyword arguments, ``model(**kw)``.

Calibration data (several batches) is a separate, separately named argument: an iterable of such
call arguments, see :func:`iter_calls`.
"""
from __future__ import annotations

import copy

from collections.abc import Mapping
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["split_call", "call_model", "iter_calls", "describe"]


def split_call(example_inputs) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` of one model call described by ``example_inputs``."""
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"example_inputs as a mapping means keyword arguments; keys must be str, got {bad[:3]}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    raise TypeError("example_inputs must be a Tensor, a tuple/list of positional arguments or a mapping of "
                    f"keyword arguments; got {type(example_inputs).__name__}")


def _stateful(v) -> bool:
    """Whether a call argument holds an object the model may change in place (anything but tensors, plain values
    and containers of them: a transformers KV cache grows on every call)."""
    if v is None or isinstance(v, (Tensor, bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return False
    if isinstance(v, (tuple, list)):
        return any(_stateful(e) for e in v)
    if isinstance(v, Mapping):
        return any(_stateful(e) for e in v.values())
    return True


def call_model(model: nn.Module, example_inputs):
    """Call ``model`` once with ``example_inputs`` (see the module docstring). Arguments holding objects the model
    may change in place (a ``past_key_values`` cache) are deep-copied for the call: every call sees them as the
    user gave them (convert compares outputs of many calls) and the user's objects come back unchanged."""
    args, kwargs = split_call(example_inputs)
    if _stateful(args) or _stateful(kwargs):
        args, kwargs = copy.deepcopy((args, kwargs))
    return model(*args, **kwargs)


def iter_calls(calibration) -> List:
    """Calibration batches as a list of call arguments. A single call (tensor / tuple / mapping) is
    one batch; any other iterable is a sequence of calls."""
    if calibration is None:
        raise ValueError("calibration data is needed here (an iterable of model inputs)")
    if isinstance(calibration, (Tensor, tuple, Mapping)):
        return [calibration]
    try:
        batches = list(calibration)
    except TypeError:
        raise TypeError("calibration must be a Tensor, a tuple of positional args, a mapping of kwargs, or an "
                        f"iterable of those; got {type(calibration).__name__}") from None
    if not batches:
        raise ValueError("calibration is an empty iterable")
    return batches


def describe(example_inputs) -> str:
    if isinstance(example_inputs, Tensor):
        return f"Tensor{tuple(example_inputs.shape)}"
    if isinstance(example_inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in example_inputs.items()) + "}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in example_inputs) + ")"
    return type(example_inputs).__name__
