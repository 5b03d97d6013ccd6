"""Safe save / load of converted models: one safetensors file, no pickle, integrity-checked, streamed.

File layout: a standard safetensors file. Tensors are the model's ``state_dict()`` (tensors that
share storage are stored once and listed as aliases). The safetensors metadata holds

- ``sparseprune.format`` = ``"sparseprune"`` and ``sparseprune.format_version`` (an integer);
- ``sparseprune.structure``: JSON describing what a fresh instance of the architecture needs to
  become the saved model: sparse modules (class from a fixed allow-list, their known attributes),
  modules replaced by ``nn.Identity`` (folded BatchNorm), modules registered under several names,
  the modules whose shapes may differ from a fresh instance (channel-pruned by
  ``sparseprune.prune_channels``, BN-folded convs gaining a bias) with their integer attributes and
  tensor shapes, training flags, and convert()'s per-layer report;
- ``sparseprune.sha256``: SHA-256 of the whole file with these 64 hex digits replaced by zeros.

The hash catches accidents (a flipped byte, a truncated copy); it is not a security boundary — anyone
can recompute it. So loading treats every file as hostile: sizes are checked against the file's real
size before anything is allocated, tensors are read (and hashed) one at a time into buffers of their
declared size, the JSON is schema-checked, aliases are resolved before anything is validated, and
every sparse module passes ``SparseModule.validate()`` — the one gate before a kernel — after all of
that. No code from the file is imported or executed.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from typing import Dict, List, Tuple

import torch
from torch import nn

from ._modules import module_names, set_module
from .prune.masks import MASK_NAME, apply_mask, apply_masks, masked_modules
from .prune.patterns import is_conv1d

__all__ = ["save", "load", "read_file", "FORMAT_VERSION", "RESHAPED_ATTR"]

FORMAT_VERSION = 2  # 2: module aliases + an explicit list of reshaped modules (1 is still read)
RESHAPED_ATTR = "_sparseprune_reshaped"  # set by prune_channels on the model: names of reshaped modules
_MAGIC = "sparseprune"
_HASH_KEY = "sparseprune.sha256"
_ZERO_HASH = "0" * 64
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1 << 24
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}
_TORCH_INTERNAL = {"training", "call_super_init", "dump_patches"}
_MODULE_INTERNAL = set(vars(nn.Module())) | _TORCH_INTERNAL
_STRUCTURE_KEYS = {"modules", "int_attrs", "tensors", "training", "report", "aliases", "module_aliases",
                   "reshaped", "masks", "int_tuples"}
# int-tuple attributes channel pruning never changes (conv geometry): not recorded, so that a channel-pruned CNN's
# file stays readable by versions without "int_tuples"
_FIXED_TUPLES = frozenset({"kernel_size", "stride", "padding", "dilation", "output_padding"})


def _sparse_classes() -> Dict[str, type]:
    """The only classes load() will instantiate for a replaced module."""
    from .nn import SparseConv2d, SparseLinear
    return {"Identity": nn.Identity, "SparseLinear": SparseLinear, "SparseConv2d": SparseConv2d}


# -- writing --------------------------------------------------------------------------------------------
def _jsonable(v, depth: int = 0) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (tuple, list)) and depth < 2:
        return all(_jsonable(x, depth + 1) for x in v)
    return False


def _own_attrs(m: nn.Module, name: str) -> dict:
    """The attributes a sparse module's class set (private ones included), all JSON-able."""
    attrs = {}
    for k, v in vars(m).items():
        if k in _MODULE_INTERNAL or k.startswith(("_warned", "_cache", "_shared_input")):
            continue
        if not _jsonable(v):
            raise ValueError(f"save: attribute {k!r} of {name} ({type(m).__name__}) is a {type(v).__name__}, "
                             "which the safe format cannot store")
        attrs[k] = v
    return attrs


def _int_attrs(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and type(v) is int and k not in _TORCH_INTERNAL}


def _int_tuple(v) -> bool:
    return type(v) is tuple and all(type(x) is int for x in v)


def _int_tuples(m: nn.Module) -> dict:
    """A reshaped module's public tuples of ints that channel pruning may change (LayerNorm / RMSNorm's
    ``normalized_shape``), as lists."""
    return {k: list(v) for k, v in vars(m).items()
            if not k.startswith("_") and _int_tuple(v) and k not in _TORCH_INTERNAL and k not in _FIXED_TUPLES}


def _structure(model: nn.Module) -> dict:
    from .convert import layer_report

    safe = _sparse_classes()
    modules, ints, tuples, tensors = {}, {}, {}, {}
    names = module_names(model)
    module_aliases = {}
    reshaped = set(getattr(model, RESHAPED_ATTR, ()) or ())
    report = layer_report(model)
    for f in (report or {}).get("folded", []):
        reshaped.add(f["conv"])  # a folded conv may gain a bias
    for name, m in model.named_modules():
        for other in names[id(m)][1:]:
            module_aliases[other] = name
        cls = type(m).__name__
        if name and cls in safe and type(m) is safe[cls]:
            modules[name] = {"class": cls, "attrs": _own_attrs(m, name) if cls != "Identity" else {},
                             "params": {k: p is not None for k, p in m._parameters.items()},
                             "buffers": {k: b is not None for k, b in m._buffers.items()}}
        if name not in reshaped:
            continue
        ia = _int_attrs(m)
        if ia:
            ints[name] = ia
        it = _int_tuples(m)
        if it:
            tuples[name] = it
        for k, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                tensors[f"{name}.{k}" if name else k] = {"shape": list(t.shape), "param": k in m._parameters,
                                                          "requires_grad": bool(t.requires_grad)}
    training = [name for name, m in model.named_modules() if m.training]
    out = {"modules": modules, "int_attrs": ints, "tensors": tensors, "training": training, "report": report,
           "module_aliases": module_aliases, "reshaped": sorted(reshaped)}
    if tuples:  # only when there are some: files without them stay readable by older versions
        out["int_tuples"] = tuples
    masked = sorted(name for name, _ in masked_modules(model) if name)
    if masked:  # a pattern-pruned model (a training checkpoint); files without masks stay readable by older versions
        out["masks"] = masked
    return out


def _state_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """state_dict with shared storages stored once: ({key: tensor}, {alias: key}). No copies."""
    tensors, aliases, seen = {}, {}, {}
    for k, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"save: state_dict entry {k!r} is not a tensor")
        if t.dtype not in _CODES:
            raise ValueError(f"save: {k!r} has dtype {t.dtype}, which the safe format cannot store")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = t
    return tensors, aliases


def _header_bytes(tensors: Dict[str, torch.Tensor], meta: dict) -> bytes:
    header, offset = {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = meta
    hb = json.dumps(header, separators=(",", ":")).encode()
    return hb + b" " * (-len(hb) % 8)


def _bytes_of(t: torch.Tensor):
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def _target(path) -> str:
    """The file a save writes: a symlink is followed (the link stays, its target gets the data); a
    target that exists must be a regular file."""
    real = os.path.realpath(os.fspath(path))
    if os.path.exists(real) and not stat.S_ISREG(os.stat(real).st_mode):
        raise ValueError(f"save: {os.fspath(path)!r} is not a regular file; refusing to replace it")
    if os.path.isdir(real):
        raise ValueError(f"save: {os.fspath(path)!r} is a directory")
    return real


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _refuse_torch_pruned(model: nn.Module) -> None:
    """A tensor under ``torch.nn.utils.prune`` (``<name>_orig`` + ``<name>_mask`` + the forward pre-hook computing
    ``<name>``) is refused before anything is written: :func:`load` fills a fresh instance of the architecture,
    whose parameter is ``<name>``, and a ``weight_mask`` of torch's would be read as sparseprune's (a file that
    then never loaded back)."""
    from torch.nn.utils.prune import BasePruningMethod
    for name, m in model.named_modules():
        for h in m._forward_pre_hooks.values():
            if isinstance(h, BasePruningMethod):
                t = getattr(h, "_tensor_name", "weight")
                raise ValueError(f"save: {(name + '.') if name else ''}{t} is under torch.nn.utils.prune ({t}_orig and "
                                 f"{t}_mask), which load cannot put back into a fresh instance of the architecture: "
                                 f"call torch.nn.utils.prune.remove(module, {t!r}) first (the pruned values stay), or "
                                 "prune with sparseprune's pruners, whose masks save and load")


def save(model: nn.Module, path) -> None:
    """Write ``model`` (typically ``convert()``'s result) to ``path`` safely.

    Tensors are streamed to a temporary file in the same folder (no second copy of the model in
    memory), the file is verified, then renamed over ``path``: an interrupted or failed save never
    leaves a half-written file at ``path``. A symlink at ``path`` is followed, not replaced.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its model
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    real = _target(path)
    _refuse_torch_pruned(model)
    tensors, aliases = _state_tensors(model)
    structure = _structure(model)
    structure["aliases"] = aliases
    meta = {"sparseprune.format": _MAGIC, "sparseprune.format_version": str(FORMAT_VERSION),
            "sparseprune.torch": torch.__version__, "sparseprune.structure": json.dumps(structure),
            _HASH_KEY: _ZERO_HASH}
    hb = _header_bytes(tensors, meta)
    head = len(hb).to_bytes(8, "little") + hb
    start, end = _hash_span(head, _ZERO_HASH)
    fd, tmp = tempfile.mkstemp(prefix=".sparseprune-", suffix=".tmp", dir=os.path.dirname(real))
    try:
        with os.fdopen(fd, "wb") as f:
            # the permissions a plain open() would give (mkstemp makes the file 0600): an existing file's own,
            # or 0666 less the umask for a new one; a model file others could read stays readable after a save
            os.fchmod(f.fileno(), stat.S_IMODE(os.stat(real).st_mode) if os.path.exists(real) else 0o666 & ~_umask())
            h = hashlib.sha256(head)
            f.write(head)
            for t in tensors.values():
                data = _bytes_of(t)
                for i in range(0, len(data), _CHUNK):
                    chunk = data[i:i + _CHUNK]
                    h.update(chunk)
                    f.write(chunk)
            f.seek(start)
            f.write(h.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        _scan(tmp, load=False)  # what is on disk must verify before it replaces anything
        os.replace(tmp, real)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- reading --------------------------------------------------------------------------------------------
def _hash_span(blob: bytes, value: str) -> Tuple[int, int]:
    """Byte range of the hash value inside the safetensors header (exactly one occurrence)."""
    n = int.from_bytes(bytes(blob[:8]), "little")
    needle = f'"{_HASH_KEY}":"{value}"'.encode()
    header = bytes(blob[8:8 + n])
    i = header.find(needle)
    if i < 0 or header.find(needle, i + 1) >= 0:
        raise ValueError("corrupted sparseprune file: the integrity hash field is missing or ambiguous")
    start = 8 + i + len(needle) - len(value) - 1
    return start, start + len(value)


def _json(text, what: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is corrupted: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{what} is corrupted: not valid JSON ({e})") from None


def _entries(header: dict, data_size: int, where: str) -> List[Tuple[str, torch.dtype, List[int], int, int]]:
    out = []
    for k, e in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where} is corrupted: malformed tensor entry {k!r}")
        dtype = _DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        shape, offs = e["shape"], e["data_offsets"]
        if dtype is None:
            raise ValueError(f"{where} is corrupted: tensor {k!r} has unsupported dtype {e['dtype']!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(s) is int and s >= 0 for s in shape):
            raise ValueError(f"{where} is corrupted: tensor {k!r} has a malformed shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise ValueError(f"{where} is corrupted: tensor {k!r} has malformed offsets")
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"{where} is corrupted: tensor {k!r} declares {offs[1] - offs[0]} bytes for shape {shape}")
        out.append((k, dtype, shape, offs[0], offs[1]))
    out.sort(key=lambda e: e[3])
    pos = 0
    for k, _, _, b, e in out:
        if b != pos:
            raise ValueError(f"{where} is corrupted: tensor data is not contiguous at {k!r}")
        pos = e
    if pos != data_size:
        raise ValueError(f"{where} is corrupted or truncated: tensors cover {pos} bytes of {data_size}")
    return out


def _scan(path, load: bool):
    path = os.fspath(path)
    where = f"{path!r}"
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{where} is not a regular file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        if len(first) < 8:
            raise ValueError(f"{where} is not a sparseprune file (only {size} bytes: truncated?)")
        n = int.from_bytes(first, "little")
        if n > min(size - 8, _MAX_HEADER) or n < 2:
            raise ValueError(f"{where} is corrupted or truncated: header length {n} does not fit a {size}-byte file")
        hb = f.read(n)
        if len(hb) != n:
            raise ValueError(f"{where} is truncated")
        header = _json(hb, f"{where}: the header")
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get("sparseprune.format") != _MAGIC:
            raise ValueError(f"{where} is not a sparseprune file (or its metadata is corrupted)")
        if not all(isinstance(v, str) for v in meta.values()):
            raise ValueError(f"{where} is corrupted: metadata values must be strings")
        stored = meta.get(_HASH_KEY)
        if not isinstance(stored, str) or len(stored) != 64 or any(ch not in "0123456789abcdef" for ch in stored):
            raise ValueError(f"{where} is corrupted: the integrity hash is missing or malformed")
        head = bytearray(first + hb)
        s, e = _hash_span(head, stored)
        head[s:e] = _ZERO_HASH.encode()
        h = hashlib.sha256(head)
        entries = _entries(header, size - 8 - n, where)
        tensors = {}
        for k, dtype, shape, b, e in entries:
            buf = torch.empty(e - b, dtype=torch.uint8)
            view = buf.numpy()
            got = f.readinto(view) if e > b else 0
            if got != e - b:
                raise ValueError(f"{where} is truncated (tensor {k!r})")
            h.update(view)
            if load:
                t = buf.ne(0) if dtype is torch.bool else buf.view(dtype)
                tensors[k] = t.reshape(shape)
        if f.read(1):
            raise ValueError(f"{where} has trailing bytes")
    if h.hexdigest() != stored:
        raise ValueError(f"{where} is corrupted or truncated: SHA-256 does not match the stored integrity hash")
    try:
        version = int(meta.get("sparseprune.format_version", ""))
    except ValueError:
        raise ValueError(f"{where}: unreadable format version {meta.get('sparseprune.format_version')!r}") from None
    if version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{where} has format version {version}; this sparseprune reads versions 1..{FORMAT_VERSION}")
    structure = _json(meta.get("sparseprune.structure", ""), f"{where}: the structure record")
    structure = _check_structure(structure, set(k for k, *_ in entries), where)
    structure["_version"] = version
    return tensors, structure, meta


def read_file(path) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """Verify and read a sparseprune file: ``(tensors, structure, metadata)``. Raises ValueError for a
    file that is not a sparseprune file, is corrupted, truncated or malformed, or has an unsupported
    version. Memory is bounded by the file's real size."""
    return _scan(path, load=True)


def _str_map(v, what: str, where: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError(f"{where}: {what} must map names to names")
    return v


def _check_structure(s, stored: set, where: str) -> dict:
    """Schema check of the structure record (types only; meaning is checked when it is applied)."""
    from .convert import check_report

    if not isinstance(s, dict) or set(s) - _STRUCTURE_KEYS or "modules" not in s:
        raise ValueError(f"{where}: malformed structure record")
    mods = s["modules"]
    if not isinstance(mods, dict):
        raise ValueError(f"{where}: structure 'modules' must be an object")
    for name, e in mods.items():
        if not isinstance(name, str) or not name or not isinstance(e, dict) or set(e) != {"class", "attrs", "params",
                                                                                           "buffers"}:
            raise ValueError(f"{where}: malformed module entry {name!r}")
        if not isinstance(e["class"], str) or not isinstance(e["attrs"], dict):
            raise ValueError(f"{where}: malformed module entry {name!r}")
        for k in ("params", "buffers"):
            if not isinstance(e[k], dict) or not all(isinstance(a, str) and type(b) is bool for a, b in e[k].items()):
                raise ValueError(f"{where}: module {name!r} has malformed {k}")
        for k, v in e["attrs"].items():
            if not _jsonable(v):
                raise ValueError(f"{where}: module {name!r} attribute {k!r} has an unsupported value")
    ints = s.get("int_attrs", {})
    if not isinstance(ints, dict) or not all(isinstance(n, str) and isinstance(d, dict)
                                             and all(isinstance(k, str) and type(v) is int and 0 <= v < 2 ** 31
                                                     for k, v in d.items()) for n, d in ints.items()):
        raise ValueError(f"{where}: malformed int_attrs")
    tups = s.get("int_tuples", {})
    if not isinstance(tups, dict) or not all(
            isinstance(n, str) and isinstance(d, dict)
            and all(isinstance(k, str) and type(v) is list and len(v) <= 8
                    and all(type(x) is int and 0 <= x < 2 ** 31 for x in v) for k, v in d.items())
            for n, d in tups.items()):
        raise ValueError(f"{where}: malformed int_tuples")
    tens = s.get("tensors", {})
    if not isinstance(tens, dict):
        raise ValueError(f"{where}: malformed tensors record")
    for k, spec in tens.items():
        if (not isinstance(spec, dict) or set(spec) - {"shape", "param", "requires_grad"} or "shape" not in spec
                or not isinstance(spec["shape"], list) or not all(type(i) is int and i >= 0 for i in spec["shape"])
                or type(spec.get("param", False)) is not bool or type(spec.get("requires_grad", True)) is not bool):
            raise ValueError(f"{where}: malformed tensor record {k!r}")
    training = s.get("training", [])
    if not isinstance(training, list) or not all(isinstance(n, str) for n in training):
        raise ValueError(f"{where}: malformed training list")
    reshaped = s.get("reshaped", [])
    if not isinstance(reshaped, list) or not all(isinstance(n, str) for n in reshaped):
        raise ValueError(f"{where}: malformed reshaped list")
    masked = s.get("masks", [])
    if not isinstance(masked, list) or not all(isinstance(n, str) and n for n in masked):
        raise ValueError(f"{where}: malformed masks list")
    aliases = _str_map(s.get("aliases", {}), "aliases", where)
    for alias, key in aliases.items():
        if alias in stored:
            raise ValueError(f"{where}: alias {alias!r} would overwrite a stored tensor")
        if key not in stored:
            raise ValueError(f"{where}: alias {alias!r} points at {key!r}, which the file does not hold")
    _str_map(s.get("module_aliases", {}), "module_aliases", where)
    if s.get("report") is not None:
        s["report"] = check_report(s["report"])
    return s


# -- restoring ------------------------------------------------------------------------------------------
def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _rebuild(cls: type, entry: dict, name: str, state: Dict[str, torch.Tensor]) -> nn.Module:
    if cls is nn.Identity:
        if entry["attrs"] or entry["params"] or entry["buffers"]:
            raise ValueError(f"load: {name} (Identity) has attributes or tensors")
        return nn.Identity()
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    want = set(cls.SAVED_ATTRS)
    attrs = {k: v for k, v in cls.OPTIONAL_ATTRS.items() if k in want}  # absent from older files
    attrs.update(entry["attrs"])
    if set(attrs) != want:
        raise ValueError(f"load: {name} ({cls.__name__}) has attributes {sorted(entry['attrs'])}, "
                         f"expected {sorted(want)}")
    for k, v in attrs.items():
        setattr(m, k, _tuples(v))
    if getattr(m, "kernel", "auto") != "auto":
        from .convert.cache import timing_machine
        if m.kernel_cpu != timing_machine():  # timed on another CPU or instruction set: back to the heuristics
            m.kernel, m.kernel_cpu = "auto", ""
    if set(entry["params"]) != {"bias"}:
        raise ValueError(f"load: {name} ({cls.__name__}) must have exactly one parameter, 'bias'")
    if entry["params"]["bias"]:
        t = state.get(f"{name}.bias")
        if t is None:
            raise ValueError(f"load: the file lacks tensor {name}.bias")
        if t.dtype != torch.float32:
            raise ValueError(f"load: {name}.bias must be float32, got {t.dtype}")
        m.register_parameter("bias", nn.Parameter(t))
    else:
        m.register_parameter("bias", None)
    names = ("weight",) if m.format == "dense" else m._packed_names()
    if set(entry["buffers"]) != set(names) or not all(entry["buffers"].values()):
        raise ValueError(f"load: {name} ({cls.__name__}, {m.format!r}) must hold buffers {list(names)}")
    for k in names:
        t = state.get(f"{name}.{k}")
        if t is None:
            raise ValueError(f"load: the file lacks tensor {name}.{k}")
        m.register_buffer(k, t)
    try:
        m.validate()
    except (ValueError, TypeError) as e:
        raise ValueError(f"load: {name} is invalid: {e}") from None
    return m


def _fits(fresh: nn.Module, new: nn.Module) -> bool:
    """The rebuilt module replaces a module of the same kind and size in the fresh architecture."""
    from .nn import SparseModule
    if isinstance(new, nn.Identity):
        return isinstance(fresh, (nn.Identity, nn.modules.batchnorm._BatchNorm))
    if isinstance(fresh, SparseModule):
        return type(fresh) is type(new) and tuple(fresh.weight_shape) == tuple(new.weight_shape)
    w = getattr(fresh, "weight", None)
    if is_conv1d(fresh):  # Hugging Face Conv1D (GPT-2) converts to a SparseLinear of its weight (in, out) transposed
        return new.dense_type is nn.Linear and tuple(w.shape[::-1]) == tuple(new.weight_shape)
    if isinstance(w, nn.parameter.UninitializedParameter):  # a lazy module (nn.LazyLinear): its size is the file's
        return isinstance(fresh, new.dense_type) and getattr(fresh, "out_features",
                                                              getattr(fresh, "out_channels", None)) == new.weight_shape[0]
    return (isinstance(fresh, new.dense_type) and isinstance(w, torch.Tensor)
            and tuple(w.shape) == tuple(new.weight_shape))


def _fused_activations(structure: dict) -> Dict[str, str]:
    """{activation module name: kind} for the activations convert() fused into the layer before them,
    kept only where the file's layer really carries that activation."""
    out = {}
    for f in (structure.get("report") or {}).get("fused", []):
        entry = structure["modules"].get(f["layer"])
        if entry is not None and entry["attrs"].get("activation") == f["kind"]:
            out[f["activation"]] = f["kind"]
    return out


def _fused_away(fresh: nn.Module, new: nn.Module, name: str, fused: Dict[str, str]) -> bool:
    """An activation module the file replaced by Identity because its layer applies it."""
    from .convert.fuse import activation_kind
    return isinstance(new, nn.Identity) and name in fused and activation_kind(fresh) == fused[name]


def load(path, model: nn.Module) -> nn.Module:
    """Restore a saved model into ``model``, a fresh instance of the original architecture.

    Sparse layers, folded BatchNorms (``nn.Identity``) and channel-pruned shapes are rebuilt from the
    file, then every tensor is loaded with ``load_state_dict(strict=True)``. Returns ``model``.
    Raises ValueError for a corrupted/truncated/foreign/malformed file or one that does not fit ``model``
    (only modules the file records as reshaped may differ in size from the fresh instance).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load expects a fresh instance of the model's architecture (an nn.Module), "
                        f"got {type(model).__name__}")
    tensors, structure, _ = read_file(path)
    try:
        return _restore(model, tensors, structure)
    except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"load: {os.fspath(path)!r} has a malformed structure record ({type(e).__name__}: {e})") \
            from None


def _install_masks(mods: Dict[str, nn.Module], names: List[str], state: Dict[str, torch.Tensor]) -> None:
    """Put a (placeholder, all-kept) mask on each module the file records as masked (pattern-pruned, not yet
    converted: a training checkpoint), so that ``load_state_dict`` fills it."""
    for name in names:
        m = mods.get(name)
        if m is None:
            raise ValueError(f"load: the file has a mask on {name!r}, which this architecture lacks")
        if not isinstance(getattr(m, "weight", None), nn.Parameter):
            raise ValueError(f"load: the file has a mask on {name!r}, which has no weight Parameter here")
        saved = state.get(f"{name}.{MASK_NAME}")
        if saved is None or saved.dtype != torch.bool:
            raise ValueError(f"load: {name}'s mask is missing from the file or not boolean")
        apply_mask(m, torch.ones(m.weight.shape, dtype=torch.bool, device=m.weight.device))


def _restore(model: nn.Module, tensors: Dict[str, torch.Tensor], structure: dict) -> nn.Module:
    from .convert import REPORT_ATTR
    from .nn import SparseModule

    safe = _sparse_classes()
    # every alias is resolved before anything is validated: what is validated is what runs
    state = dict(tensors)
    for alias, key in structure.get("aliases", {}).items():
        state[alias] = tensors[key]
    legacy = structure["_version"] < 2
    reshaped = set(structure.get("reshaped", []))
    mods = dict(model.named_modules())
    fresh_names = module_names(model)
    module_aliases = structure.get("module_aliases", {})
    rebuilt = set()
    fused = _fused_activations(structure)
    for name, entry in sorted(structure["modules"].items(), key=lambda kv: kv[0].count(".")):
        cls = safe.get(entry["class"])
        if cls is None:
            raise ValueError(f"load: {name} is a {entry['class']!r}, which this sparseprune cannot build "
                             f"(known: {sorted(safe)})")
        if name not in mods:
            raise ValueError(f"load: the file has module {name!r}, which this architecture lacks")
        new = _rebuild(cls, entry, name, state)
        if not legacy and name not in reshaped and not _fits(mods[name], new) and not _fused_away(mods[name], new, name,
                                                                                                 fused):
            raise ValueError(f"load: {name} in the file ({new}) does not fit this architecture's "
                             f"{type(mods[name]).__name__} there: wrong architecture?")
        names = [name] + [a for a, target in module_aliases.items() if target == name]
        for a in names[1:]:
            if a not in fresh_names.get(id(mods[name]), []):
                raise ValueError(f"load: {a!r} is saved as another name of {name!r}, but this architecture "
                                 "does not register one module under both names")
        for a in names:
            set_module(model, a, new)
        rebuilt.update(names)
        mods = dict(model.named_modules())
    mods = dict(model.named_modules())
    masked = structure.get("masks", [])
    _install_masks(mods, masked, state)
    may_change = (lambda n: n not in rebuilt) if legacy else (lambda n: n in reshaped and n not in rebuilt)
    for name, ints in structure.get("int_attrs", {}).items():
        m = mods.get(name)
        if m is None or not may_change(name):
            continue
        for k, v in ints.items():
            if type(vars(m).get(k)) is int and vars(m)[k] != v:
                setattr(m, k, v)
    for name, tuples in structure.get("int_tuples", {}).items():
        m = mods.get(name)
        if m is None or not may_change(name):
            continue
        for k, v in tuples.items():
            cur = vars(m).get(k)
            if not _int_tuple(cur):
                continue
            if len(v) != len(cur):
                raise ValueError(f"load: {name}.{k} is {tuple(v)} in the file and {cur} here: wrong architecture?")
            if tuple(v) != cur:  # a channel-pruned LayerNorm's normalized_shape
                setattr(m, k, tuple(v))
    for key, spec in structure.get("tensors", {}).items():
        mname, _, tname = key.rpartition(".")
        m = mods.get(mname)
        if m is None or not may_change(mname) or key not in state:
            continue
        holder = m._parameters if spec.get("param", False) else m._buffers
        cur = holder.get(tname)
        saved = state[key]
        if list(saved.shape) != spec["shape"]:
            raise ValueError(f"load: {key} has shape {list(saved.shape)}, the structure record says {spec['shape']}")
        if isinstance(cur, torch.Tensor) and cur.shape == saved.shape:
            continue
        if tname in m.__dict__ and not isinstance(m.__dict__[tname], torch.Tensor):
            raise ValueError(f"load: {key} would replace a non-tensor attribute")
        if tname not in m._parameters and tname not in m._buffers:
            raise ValueError(f"load: {key} is not a parameter or buffer of this architecture")
        # a channel-pruned (or BN-folded: new bias) tensor: make room with the saved shape
        if isinstance(cur, torch.Tensor):
            dtype, device = cur.dtype, cur.device  # the architecture's dtype; load_state_dict casts into it
        elif spec.get("param", False) and not saved.is_floating_point():
            raise ValueError(f"load: {key} is a parameter of dtype {saved.dtype}; parameters must be floating point")
        else:
            dtype, device = saved.dtype, saved.device
        new = torch.empty(saved.shape, dtype=dtype, device=device)
        if spec.get("param", False):
            m.register_parameter(tname, nn.Parameter(new, requires_grad=spec.get("requires_grad", True)))
        else:
            m.register_buffer(tname, new)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"load: the file does not fit this architecture: {e}") from None
    for name in structure.get("int_tuples", {}):  # a restored norm shape must be its affine weight's shape
        m = mods.get(name)
        w = m._parameters.get("weight") if m is not None else None
        shape = getattr(m, "normalized_shape", None)
        if isinstance(w, torch.Tensor) and _int_tuple(shape) and tuple(w.shape) != shape:
            raise ValueError(f"load: the file does not fit this architecture: {name}.normalized_shape is {shape} "
                             f"but its weight has shape {tuple(w.shape)}")
    for name in masked:  # the loaded masks in force on the loaded weights
        m = mods[name]
        if m._buffers[MASK_NAME].shape != m.weight.shape:
            raise ValueError(f"load: {name}.{MASK_NAME} has shape {tuple(m._buffers[MASK_NAME].shape)}, its weight "
                             f"{tuple(m.weight.shape)}")
    if masked:
        apply_masks(model)
    for name, m in model.named_modules():
        if isinstance(m, SparseModule):
            try:
                m.validate()  # the one gate, after every alias and shape is settled
            except (ValueError, TypeError) as e:
                raise ValueError(f"load: {name} is invalid: {e}") from None
    training = set(structure.get("training", []))
    for name, m in model.named_modules():
        m.training = name in training
    if structure.get("report") is not None:
        setattr(model, REPORT_ATTR, structure["report"])
        from .shared import regroup
        regroup(model, structure["report"])  # layers convert() ran as one call on a shared input
        _reinstall(model, structure["report"])  # max pools and residual block ends convert() replaced
    return model


def _reinstall(model: nn.Module, report: dict) -> None:
    """The max pools and fused residual block ends convert() recorded as kept, installed again on this
    architecture's own modules: only the names come from the file, and only a module of the kind the
    rewrite takes there (a plain ``nn.MaxPool2d``; a block :func:`~sparseprune.convert.residual.fusable`
    accepts) is replaced, under every name it has."""
    from .convert.residual import _ATTN, KIND_ATTR, fusable, fused_copy
    from .nn import MaxPool2d

    def pool(m, row):
        return MaxPool2d.from_module(m) if type(m) is nn.MaxPool2d else None

    def block(m, row):
        kind = fusable(m)
        if kind is None or KIND_ATTR in m.__dict__:
            return None
        new = fused_copy(m, kind)
        if row.get("attention") == "model":
            new.__dict__[_ATTN] = False
        return new

    names = module_names(model)
    for key, field, rebuild in (("pools", "name", pool), ("residual", "block", block)):
        for row in report.get(key, []):
            if not row["kept"]:
                continue
            try:
                m = model.get_submodule(row[field])
            except AttributeError:
                continue
            new = rebuild(m, row)
            if new is not None:
                for alias in names.get(id(m), [row[field]]):
                    set_module(model, alias, new)
