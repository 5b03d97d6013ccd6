"""Safe save / load of converted models: one safetensors file, no pickle, integrity-checked.

File layout: a standard safetensors file. Tensors are the model's ``state_dict()`` (tensors that
share storage are stored once and listed as aliases). The safetensors metadata holds

- ``sparseprune.format`` = ``"sparseprune"`` and ``sparseprune.format_version`` (an integer);
- ``sparseprune.structure``: JSON describing what a fresh instance of the architecture needs to
  become the saved model: sparse modules (class from a fixed allow-list, plain attributes), modules
  replaced by ``nn.Identity`` (folded BatchNorm), integer attributes and tensor shapes (channel-
  pruned layers), training flags, and convert()'s per-layer report;
- ``sparseprune.sha256``: SHA-256 of the whole file with these 64 hex digits replaced by zeros. Any
  changed byte (header, metadata, padding or payload) or a truncation makes it disagree.

Loading reads JSON and raw tensor bytes only: no code from the file is imported or executed, and
packed sparse tensors are re-validated before a kernel can see them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Tuple

import torch
from torch import nn

__all__ = ["save", "load", "read_file", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MAGIC = "sparseprune"
_HASH_KEY = "sparseprune.sha256"
_ZERO_HASH = "0" * 64
_MAX_HEADER = 100 * 1024 * 1024
# integer attributes that size a layer: restored so channel-pruned layers compute with their saved shapes
_TORCH_INTERNAL = {"training", "call_super_init", "dump_patches"}
_MODULE_INTERNAL = set(vars(nn.Module())) | _TORCH_INTERNAL


def _sparse_classes() -> Dict[str, type]:
    """The only classes load() will instantiate for a replaced module."""
    from . import nn as spnn
    out = {"Identity": nn.Identity}
    for name in ("SparseLinear", "SparseConv2d"):
        cls = getattr(spnn, name, None)
        if cls is not None:
            out[name] = cls
    return out


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_jsonable(x) for x in v)
    return False


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _own_attrs(m: nn.Module, name: str) -> dict:
    """The attributes a sparse module's class set (private ones included), all JSON-able."""
    attrs = {}
    for k, v in vars(m).items():
        if k in _MODULE_INTERNAL:
            continue
        if not _jsonable(v):
            raise ValueError(f"save: attribute {k!r} of {name} ({type(m).__name__}) is a {type(v).__name__}, "
                             "which the safe format cannot store")
        attrs[k] = v
    return attrs


def _int_attrs(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and type(v) is int and k not in _TORCH_INTERNAL}


def _structure(model: nn.Module) -> dict:
    safe = _sparse_classes()
    modules, ints, tensors = {}, {}, {}
    for name, m in model.named_modules():
        cls = type(m).__name__
        if name and cls in safe and type(m) is safe[cls]:
            entry = {"class": cls, "attrs": _own_attrs(m, name) if cls != "Identity" else {},
                     "params": {k: p is not None for k, p in m._parameters.items()},
                     "buffers": {k: b is not None for k, b in m._buffers.items()}}
            modules[name] = entry
        ia = _int_attrs(m)
        if ia:
            ints[name] = ia
        for k, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                tensors[f"{name}.{k}" if name else k] = {"shape": list(t.shape),
                                                          "param": k in m._parameters,
                                                          "requires_grad": bool(t.requires_grad)}
    training = [name for name, m in model.named_modules() if m.training]
    from .convert import layer_report
    return {"modules": modules, "int_attrs": ints, "tensors": tensors, "training": training,
            "report": layer_report(model)}


def _state_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """state_dict with shared storages stored once: ({key: contiguous cpu tensor}, {alias: key})."""
    tensors, aliases, seen = {}, {}, {}
    for k, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"save: state_dict entry {k!r} is not a tensor")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = t.to("cpu").contiguous().clone()
    return tensors, aliases


def save(model: nn.Module, path) -> None:
    """Write ``model`` (typically ``convert()``'s result) to ``path`` safely.

    The file is written to a temporary file in the same folder, read back and verified, then renamed
    over ``path``: an interrupted or failed save never leaves a half-written file at ``path``.
    """
    import safetensors.torch

    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its model
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    tensors, aliases = _state_tensors(model)
    structure = _structure(model)
    structure["aliases"] = aliases
    meta = {"sparseprune.format": _MAGIC, "sparseprune.format_version": str(FORMAT_VERSION),
            "sparseprune.torch": torch.__version__, "sparseprune.structure": json.dumps(structure),
            _HASH_KEY: _ZERO_HASH}
    blob = bytearray(safetensors.torch.save(tensors, metadata=meta))
    start, end = _hash_span(blob, _ZERO_HASH)
    blob[start:end] = hashlib.sha256(blob).hexdigest().encode()

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sparseprune-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        read_file(tmp)  # what is on disk must verify before it replaces anything
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _hash_span(blob, value: str) -> Tuple[int, int]:
    """Byte range of the hash value inside the safetensors header (exactly one occurrence)."""
    n = int.from_bytes(bytes(blob[:8]), "little")
    needle = f'"{_HASH_KEY}":"{value}"'.encode()
    header = bytes(blob[8:8 + n])
    i = header.find(needle)
    if i < 0 or header.find(needle, i + 1) >= 0:
        raise ValueError("corrupted sparseprune file: the integrity hash field is missing or ambiguous")
    start = 8 + i + len(needle) - len(value) - 1
    return start, start + len(value)


def read_file(path) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """Verify and read a sparseprune file: ``(tensors, structure, metadata)``. Raises ValueError for a
    file that is not a sparseprune file, is corrupted or truncated, or has an unsupported version."""
    import safetensors.torch

    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    where = f"{path!r}"
    if len(blob) < 8:
        raise ValueError(f"{where} is not a sparseprune file (only {len(blob)} bytes: truncated?)")
    n = int.from_bytes(blob[:8], "little")
    if n > min(len(blob) - 8, _MAX_HEADER) or n < 2:
        raise ValueError(f"{where} is corrupted or truncated: header length {n} does not fit a {len(blob)}-byte file")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is corrupted: its header is not valid JSON ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("sparseprune.format") != _MAGIC:
        raise ValueError(f"{where} is not a sparseprune file (or its metadata is corrupted)")
    stored = meta.get(_HASH_KEY)
    if not isinstance(stored, str) or len(stored) != 64 or any(ch not in "0123456789abcdef" for ch in stored):
        raise ValueError(f"{where} is corrupted: the integrity hash is missing or malformed")
    work = bytearray(blob)
    start, end = _hash_span(work, stored)
    work[start:end] = _ZERO_HASH.encode()
    if hashlib.sha256(work).hexdigest() != stored:
        raise ValueError(f"{where} is corrupted or truncated: SHA-256 does not match the stored integrity hash")
    try:
        version = int(meta.get("sparseprune.format_version", ""))
    except ValueError:
        raise ValueError(f"{where}: unreadable format version {meta.get('sparseprune.format_version')!r}") from None
    if version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{where} has format version {version}; this sparseprune reads versions 1..{FORMAT_VERSION}")
    try:
        structure = json.loads(meta["sparseprune.structure"])
        tensors = safetensors.torch.load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"{where} is corrupted: {e}") from None
    return tensors, structure, meta


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _rebuild(cls: type, entry: dict, name: str, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    if cls is nn.Identity:
        return nn.Identity()
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in entry["attrs"].items():
        if not isinstance(k, str) or k.startswith("__") or hasattr(cls, k) or k in _MODULE_INTERNAL:
            raise ValueError(f"load: {name} has attribute {k!r}, which would shadow part of {cls.__name__}")
        setattr(m, k, _tuples(v))
    for k, present in entry["params"].items():
        t = tensors.get(f"{name}.{k}") if present else None
        if present and t is None:
            raise ValueError(f"load: the file lacks tensor {name}.{k}")
        m.register_parameter(k, nn.Parameter(t) if t is not None else None)
    for k, present in entry["buffers"].items():
        t = tensors.get(f"{name}.{k}") if present else None
        if present and t is None:
            raise ValueError(f"load: the file lacks tensor {name}.{k}")
        m.register_buffer(k, t)
    if getattr(m, "format", "dense") != "dense":
        try:
            _packed_view(m).validate()  # never hand a kernel indices that point outside the matrix
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise ValueError(f"load: packed weight of {name} is invalid: {e}") from None
    return m


def _packed_view(m: nn.Module):
    """The packed matrix of a sparse module, as the kernels will read it (to validate)."""
    from .formats import BSRMatrix

    if hasattr(m, "rk") and hasattr(m, "kernel_size"):  # SparseConv2d: (rk x 1) blocks over (Cout, Cin/g*kh*kw)
        cols = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups or m.rk < 1:
            raise ValueError("inconsistent channels, groups or block rows")
        mat = BSRMatrix((m.out_channels, cols), (m.rk, 1), m.row_ptr, m.col_idx, m.values)
    elif hasattr(m, "packed"):
        mat = m.packed()
    else:
        raise ValueError(f"no way to validate a {type(m).__name__}")
    bias = m._parameters.get("bias")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (mat.shape[0],)):
        raise ValueError(f"bias must be float32 of shape ({mat.shape[0]},), got {bias.dtype} {tuple(bias.shape)}")
    return mat


def load(path, model: nn.Module) -> nn.Module:
    """Restore a saved model into ``model``, a fresh instance of the original architecture.

    Sparse layers, folded BatchNorms (``nn.Identity``) and channel-pruned shapes are rebuilt from the
    file, then every tensor is loaded with ``load_state_dict(strict=True)``. Returns ``model``.
    Raises ValueError for a corrupted/truncated/foreign file or one that does not fit ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load expects a fresh instance of the model's architecture (an nn.Module), "
                        f"got {type(model).__name__}")
    tensors, structure, _ = read_file(path)
    try:
        return _restore(model, tensors, structure)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"load: {os.fspath(path)!r} has a malformed structure record ({type(e).__name__}: {e})") \
            from None


def _restore(model: nn.Module, tensors: Dict[str, torch.Tensor], structure: dict) -> nn.Module:
    safe = _sparse_classes()
    mods = dict(model.named_modules())
    for name, entry in sorted(structure["modules"].items(), key=lambda kv: kv[0].count(".")):
        cls = safe.get(entry.get("class"))
        if cls is None:
            raise ValueError(f"load: {name} is a {entry.get('class')!r}, which this sparseprune cannot build "
                             f"(known: {sorted(safe)})")
        if name not in mods:
            raise ValueError(f"load: the file has module {name!r}, which this architecture lacks")
        _set_module(model, name, _rebuild(cls, entry, name, tensors))
    mods = dict(model.named_modules())
    rebuilt = set(structure["modules"])
    # channel-pruned layers: integer sizes and tensor shapes as saved
    for name, ints in structure.get("int_attrs", {}).items():
        m = mods.get(name)
        if m is None or name in rebuilt:
            continue
        for k, v in ints.items():
            if type(vars(m).get(k)) is int and type(v) is int and vars(m)[k] != v:
                setattr(m, k, v)
    for key, spec in structure.get("tensors", {}).items():
        mname, _, tname = key.rpartition(".")
        m = mods.get(mname)
        if m is None or mname in rebuilt or key not in tensors and key not in structure.get("aliases", {}):
            continue
        holder = m._parameters if spec["param"] else m._buffers
        cur = holder.get(tname)
        saved = tensors[key] if key in tensors else tensors[structure["aliases"][key]]
        if isinstance(cur, torch.Tensor) and cur.shape == saved.shape:
            continue
        # a channel-pruned (or BN-folded: new bias) tensor: make room with the saved shape
        new = torch.empty(saved.shape, dtype=saved.dtype,
                          device=cur.device if isinstance(cur, torch.Tensor) else saved.device)
        if tname in m.__dict__ and not isinstance(m.__dict__[tname], torch.Tensor):
            raise ValueError(f"load: {key} would replace a non-tensor attribute")
        if spec["param"]:
            m.register_parameter(tname, nn.Parameter(new, requires_grad=spec.get("requires_grad", True)))
        else:
            m.register_buffer(tname, new)
    state = dict(tensors)
    for alias, key in structure.get("aliases", {}).items():
        state[alias] = tensors[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"load: the file does not fit this architecture: {e}") from None
    training = set(structure.get("training", []))
    for name, m in model.named_modules():
        m.training = name in training
    if structure.get("report") is not None:
        from .convert import REPORT_ATTR
        setattr(model, REPORT_ATTR, structure["report"])
    return model
