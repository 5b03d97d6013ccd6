"""Small module-tree helpers shared by convert, fold, io and prune."""
from __future__ import annotations

from typing import Dict, List

from torch import nn

__all__ = ["set_module", "module_names"]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) with ``new``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def module_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name each module is registered under (a module registered twice has two), by ``id``."""
    names: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names
