"""Sparse modules: drop-in replacements for ``nn.Linear`` / ``nn.Conv2d`` that hold only the packed weight.

Every sparse module shares one protocol, :class:`SparseModule`:

- :meth:`~SparseModule.from_dense` (one template: checks, format choice, packing, validation);
- :meth:`~SparseModule.packed` (the matrix exactly as the kernels read it), ``density``, ``nbytes``;
- :meth:`~SparseModule.to_dense_module` (the plain layer computing the same thing);
- :meth:`~SparseModule.validate`, the only gate between arrays and kernels: run by the constructor,
  by ``load_state_dict`` (a candidate set of arrays is validated first and adopted only if valid) and
  by ``sparseprune.load`` after every alias is resolved;
- :meth:`~SparseModule._route`, the one place that decides whether a call may skip the dispatcher.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, quant
from ._ext import _C
from .formats import BSRMatrix, CSRMatrix, block_mask

__all__ = ["SparseModule", "SparseLinear", "SparseConv2d", "MaxPool2d", "FORMATS", "WEIGHT_DTYPES", "detect_block_size",
           "choose_format", "dtype_name"]

# looked up once: SparseLinear.forward's repeat-call test runs them on every call
_F32 = torch.float32
_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_depth = torch._C._len_torch_dispatch_stack
_tracing = torch._C._get_tracing_state  # not None under torch.jit.trace: the registered ops, which it records
_functorch_stack = torch._C._functorch.peek_interpreter_stack  # not None: inside vmap / grad / jvp


_NO_BIAS = object()  # "bias" is not a registered parameter: torch.nn.utils.prune / parametrize took it over


def _qarray_ptrs(bufs, bias) -> tuple:
    """The addresses a quantized layer's kept kernel plan (``_cache_qcall``) was built on, read afresh
    (``bias``: the module's, or _NO_BIAS, which matches no plan)."""
    sc, co = bufs.get("scales"), bufs.get("compensation")
    return (bufs["values"].data_ptr(), bufs["row_ptr"].data_ptr(), bufs["col_idx"].data_ptr(),
            0 if sc is None else sc.data_ptr(), 0 if co is None else co.data_ptr(),
            0 if bias is None else -1 if bias is _NO_BIAS else bias.data_ptr())


def _negated(t: Tensor) -> bool:
    """A lazily negated view (``torch._neg_view``, ``z.conj().imag``): its memory holds -t, and the kernels read
    memory. (Not asked while torch.compile traces: dynamo cannot trace ``is_neg``, and compiled calls go through
    the registered ops.)"""
    return not _compiling() and t.is_neg()


def _plain_eager(x) -> bool:
    """``x`` a plain float32 CPU tensor in an eager inference call: nothing to differentiate (grad mode off),
    compile, trace (torch.jit.trace records the registered ops) or intercept (torch function / dispatch modes, vmap /
    grad / jvp), and not a lazily negated view. The first test of every kept kernel call (SparseLinear's int8 /
    bf16 ``_cache_qcall``, SparseConv2d's ``_planes_fast``, ``_cl_fast``, ``_conv_fast``)."""
    return (type(x) is Tensor and x.dtype is _F32 and x.is_cpu and not _grad_enabled() and not _compiling()
            and _tracing() is None and not _function_mode() and not _dispatch_depth() and _functorch_stack() is None
            and not x.is_neg())


def _bias_fits(bias, out: int) -> bool:
    """A bias a kept kernel call can read as it is: None, or a contiguous float32 vector of ``out`` values, not a
    lazily negated view. A plan compares its bias by address, and ``bias.data = other`` can put a strided, shorter,
    other-dtype or negated tensor at that address (the general route checks it and raises, or copies it contiguous,
    or resolves the negation: ``_bias()``). (Asked on eager routes only: nothing is compiling.)"""
    return bias is None or (bias.dtype is _F32 and bias.is_cpu and bias.is_contiguous() and bias.shape == (out,)
                            and not bias.is_neg())


FORMATS = ("auto", "dense", "csr", "bsr")
# Candidate block shapes for detection, largest first (a 16x16 pattern is also an 8x8 pattern).
BLOCK_CANDIDATES = ((32, 32), (16, 16), (8, 8), (4, 4), (1, 16), (16, 1), (1, 8), (8, 1), (2, 2), (1, 4), (4, 1))
MAX_THREADS = 1024
_MAX_DIM = 2 ** 31 - 1
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# int8 / bf16 convolutions gather their im2col rows inside the kernel (False: materialise the matrix, as
# before; kept for the tests that compare both)
_FUSED_IM2COL = True
# weight dtypes a sparse module may hold, by the name saved files use
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
_DTYPE_NAMES = {v: k for k, v in WEIGHT_DTYPES.items()}


def dtype_name(dtype) -> str:
    """``"float32"`` / ``"bfloat16"`` / ``"int8"`` for a weight dtype (a torch.dtype or its name)."""
    if isinstance(dtype, str) and dtype in WEIGHT_DTYPES:
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise TypeError(f"weight_dtype must be torch.float32, torch.bfloat16 or torch.int8, got {dtype!r}")


def _density(w: Tensor) -> float:
    return float((w != 0).sum()) / max(w.numel(), 1)


def detect_block_size(weight: Tensor, tolerance: float = 0.02) -> Optional[Tuple[int, int]]:
    """The largest candidate block shape whose stored fraction is within ``tolerance`` of the true
    density (the zeros come in whole blocks of that shape), or None."""
    d = _density(weight)
    if d == 0.0 or d == 1.0:
        return None
    for bs in BLOCK_CANDIDATES:
        if weight.shape[0] < bs[0] or weight.shape[1] < bs[1]:
            continue
        stored = float(block_mask(weight, bs).sum()) * bs[0] * bs[1] / weight.numel()
        if stored <= d * (1 + tolerance) + 1e-12:
            return bs
    return None


def choose_format(weight: Tensor) -> Tuple[str, Optional[Tuple[int, int]]]:
    """Heuristic choice without timing (convert() measures instead): blocks when the zeros come in
    blocks and at least half the weight is gone, CSR at >= 70% unstructured sparsity, else dense."""
    if weight.numel() == 0 or weight.device.type == "meta":
        return "dense", None
    d = _density(weight)
    bs = detect_block_size(weight)
    if bs is not None and bs[0] * bs[1] >= 16 and d <= 0.5:
        return "bsr", bs
    if d <= 0.3:
        return "csr", None
    return "dense", None


def _int(v, name: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _pair_of(v, name: str, lo: int = 1) -> Tuple[int, int]:
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise ValueError(f"{name} must be a pair of ints, got {v!r}")
    return _int(v[0], name, lo), _int(v[1], name, lo)


class SparseModule(nn.Module):
    """Base of every sparse module. Subclasses say what dense layer they replace (``dense_type``),
    which geometry attributes they keep, how the weight maps to the packed matrix, and how to run."""

    dense_type: type = nn.Module
    SAVED_ATTRS: Tuple[str, ...] = ()  # plain attributes a saved file holds (and load() accepts)
    OPTIONAL_ATTRS = {"weight_dtype": "float32", "activation": "none", "kernel": "auto",
                      "kernel_cpu": ""}  # absent from older files: these defaults apply
    PACKED = ("row_ptr", "col_idx", "values")
    QUANT_DTYPES: Tuple[str, ...] = ()  # weight dtypes besides float32 this module type runs
    weight_dtype = "float32"
    activation = "none"  # fused into the kernel's store after the bias: one of ops.ACTIVATIONS
    kernel = "auto"  # fp32 spmm variant pinned by convert()'s timing (ops.KERNELS); "auto": heuristics
    kernel_cpu = ""  # the CPU model and ISA that timing ran on (a hint from another is dropped on load)

    # -- subclass hooks -----------------------------------------------------------------------
    @classmethod
    def _geometry(cls, dense: nn.Module) -> dict:
        """The plain attributes (ints, tuples, strings) copied from the dense layer."""
        raise NotImplementedError

    @classmethod
    def _auto_format(cls, weight: Tensor, geometry: dict, block_size):
        """``(format, block_size)`` for ``format="auto"``."""
        raise NotImplementedError

    def _check_geometry(self) -> None:
        """Raise ValueError when the geometry attributes are inconsistent."""
        raise NotImplementedError

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        """Shape of the dense layer's weight."""
        raise NotImplementedError

    def _kernel_block(self) -> Tuple[int, int]:
        """Block shape of the packed matrix as the kernels read it."""
        return tuple(self.block_size)

    def to_dense_module(self) -> nn.Module:
        raise NotImplementedError

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, module: nn.Module, format: str = "auto", block_size=None,
                   num_threads: Optional[int] = None, weight_dtype=torch.float32,
                   activation: str = "none") -> "SparseModule":
        """Pack ``module``'s (masked) weight once. ``format``: auto | dense | csr | bsr.
        ``weight_dtype``: ``torch.float32`` (default), or where the module type supports it
        ``torch.int8`` (per-output-channel weight scales, activations quantized per row at run time)
        or ``torch.bfloat16``; quantized weights run as BSR (or, bf16 only, dense).
        ``activation``: ``"none"`` (default), ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``: the
        layer computes ``act(module(x))``, the activation applied in the kernel's store (fused epilogue)."""
        if not isinstance(module, cls.dense_type):
            raise TypeError(f"expected an {cls.dense_type.__module__.split('.')[0]}.{cls.dense_type.__qualname__}, "
                            f"got {type(module).__name__}")
        own = [n for n in ("forward", "_conv_forward")
               if hasattr(cls.dense_type, n) and getattr(type(module), n) is not getattr(cls.dense_type, n)]
        if own:  # a subclass computing something else (weight standardisation, a scale): the packed layer would not
            raise TypeError(f"{type(module).__name__} overrides {own[0]}() of {cls.dense_type.__name__}: "
                            f"{cls.__name__} computes only {cls.dense_type.__name__}'s function, not that one")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        weight = module.weight.detach()
        if weight.device.type not in ("cpu", "cuda", "meta"):
            raise ValueError(f"unsupported device {weight.device}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        weight = weight.float().contiguous()
        geometry = cls._geometry(module)
        ops.activation_code(activation)
        wdt = dtype_name(weight_dtype)
        if wdt != "float32" and wdt not in cls.QUANT_DTYPES:
            raise ValueError(f"{cls.__name__} has no {wdt} kernels (weight_dtype must be torch.float32"
                             + "".join(f" or torch.{d}" for d in cls.QUANT_DTYPES) + ")")
        if format == "auto":
            format, block_size = cls._auto_format(weight, geometry, block_size)
            # int8 has no dense path (its kernel is the BSR one: a dense weight stores every block); bf16 keeps dense
            if wdt != "float32" and (format != "dense" or wdt == "int8"):
                format, block_size = "bsr", cls._quant_block(weight, wdt, block_size if format == "bsr" else None)
        if wdt == "int8" and format == "dense":
            raise ValueError("int8 weights run through the block-sparse kernel: use format='bsr' (a dense weight "
                             "stores every block)")
        if wdt != "float32" and format == "csr":
            raise ValueError(f"{wdt} weights need blocks whose width is a multiple of "
                             f"{4 if wdt == 'int8' else 2}: use format='bsr' with e.g. block_size=(1, 4)")
        if format == "csr":
            if block_size not in (None, (1, 1), [1, 1]):
                raise ValueError("format='csr' has no block_size (use format='bsr')")
            block_size = (1, 1)
        elif format == "bsr":
            if block_size is None and wdt != "float32" and weight.device.type != "meta":
                block_size = cls._quant_block(weight, wdt, None)
            if block_size is None:
                block_size = detect_block_size(cls._pattern(weight)) if weight.device.type != "meta" else None
                block_size = block_size or (16, 16)
            from .formats import _check_block
            block_size = _check_block(block_size)
        else:
            block_size = None
        if format != "dense" and weight.device.type == "meta":
            raise ValueError("cannot pack a weight on the meta device (it has no values); use format='dense'")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        for k, v in geometry.items():
            setattr(mod, k, v)
        mod.format, mod.block_size, mod.num_threads = format, block_size, num_threads
        if wdt != "float32":
            mod.weight_dtype = wdt
        if activation != "none":
            mod.activation = activation
        b = getattr(module, "bias", None)
        mod.register_parameter("bias", nn.Parameter(b.detach().float().clone(), requires_grad=b.requires_grad)
                               if b is not None else None)
        mod._finish_geometry()
        if format == "dense":
            mod.register_buffer("weight", weight.to(WEIGHT_DTYPES[wdt]).clone())
        else:
            mod._adopt(mod._pack(weight.reshape(weight.shape[0], math.prod(weight.shape[1:])) if wdt == "float32"
                                 else cls._quant_matrix_of(weight)))
        return mod.validate()

    @classmethod
    def _quant_block(cls, weight: Tensor, wdt: str, preferred) -> Tuple[int, int]:
        """A block whose width suits the quantized kernels (k grouped by 4 for int8, by 2 for bf16)."""
        g = 4 if wdt == "int8" else 2
        if preferred is not None and preferred[1] % g == 0:
            return tuple(preferred)
        pattern = cls._quant_matrix_of(weight)  # the matrix the quantized kernel reads
        for bs in BLOCK_CANDIDATES:
            if bs[1] % g == 0 and pattern.shape[0] >= bs[0] and pattern.shape[1] >= bs[1]:
                stored = float(block_mask(pattern, bs).sum()) * bs[0] * bs[1] / max(pattern.numel(), 1)
                if stored <= _density(pattern) * 1.02 + 1e-12:
                    return bs
        return (1, g)

    @classmethod
    def _quant_matrix_of(cls, weight: Tensor) -> Tensor:
        """The 2-D ``(out, k)`` matrix an int8 / bf16 layer packs (columns in the order of its inputs)."""
        return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))  # (-1 is ambiguous for 0 rows)

    def _packed_names(self) -> Tuple[str, ...]:
        if self.weight_dtype == "int8":
            return self.PACKED + ("scales", "compensation")
        return self.PACKED

    def _quant_matrix(self, check: bool = False):
        from .quant import QuantBSRMatrix
        shape = (self.weight_shape[0], math.prod(self.weight_shape[1:]))
        return QuantBSRMatrix(shape, self.block_size, WEIGHT_DTYPES[self.weight_dtype],
                              *[self._buffers.get(n) for n in self._packed_names()], check=check)

    @classmethod
    def _pattern(cls, weight: Tensor) -> Tensor:
        """2-D tensor whose zeros decide the blocks (rows = outputs, cols = inputs)."""
        return weight

    def _finish_geometry(self) -> None:
        """Derived attributes, computed once the format is known."""

    def _pack(self, matrix: Tensor) -> BSRMatrix:
        if self.weight_dtype != "float32":
            from .quant import QuantBSRMatrix
            return QuantBSRMatrix.from_dense(matrix, self._kernel_block(), WEIGHT_DTYPES[self.weight_dtype])
        if self.format == "csr" and self._kernel_block() == (1, 1) and type(self) is SparseLinear:
            return CSRMatrix.from_dense(matrix)
        return BSRMatrix.from_dense(matrix, self._kernel_block())

    def _adopt(self, m: BSRMatrix) -> None:
        for name, t in zip(self._packed_names(), m.tensors()):
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    # -- the gate -----------------------------------------------------------------------------
    def validate(self) -> "SparseModule":
        """Check every attribute and array a kernel will rely on; raise ValueError / TypeError naming
        the problem. Returns ``self``."""
        self.__dict__.pop("_cache_conv_plan", None)  # derived from the geometry checked here
        self.__dict__.pop("_cache_qcall", None)
        self.__dict__.pop("_cache_qplanes", None)
        self.__dict__.pop("_cache_clplan", None)
        self.__dict__.pop("_cache_convcall", None)
        self.__dict__.pop("_cache_col_groups", None)
        self.__dict__.pop("_cache_fcall", None)
        self.__dict__.pop("_cache_arrays_ok", None)
        group = self.__dict__.get("_shared_input")
        if group is not None:  # sparseprune.shared: a fused layer holding copies of this member's arrays
            group[0].forget_copies(self)
        self._check_settings()
        wdt = self.weight_dtype
        if wdt != "float32" and (self.format == "csr" or (wdt == "int8" and self.format == "dense")):
            raise ValueError(f"a {wdt} {type(self).__name__} cannot have format {self.format!r}")
        if not isinstance(self.kernel_cpu, str) or len(self.kernel_cpu) > 256:
            raise ValueError("kernel_cpu must be a short string")
        if self.num_threads is not None:
            _int(self.num_threads, "num_threads", 1, MAX_THREADS)
        if self.format == "csr" and tuple(self.block_size or ()) != (1, 1):
            raise ValueError(f"a CSR layer has 1x1 blocks, got block_size={self.block_size!r}")
        if self.format == "bsr":
            self.block_size = _pair_of(self.block_size, "block_size")
            if max(self.block_size) > 4096:
                raise ValueError(f"block_size {self.block_size} is too large (at most 4096 per side)")
        if self.format == "dense" and self.block_size is not None:
            raise ValueError(f"a dense layer has no block_size, got {self.block_size!r}")
        self._check_geometry()
        self._check_bias(self._bias())
        if self.format == "dense":
            w = self._buffers.get("weight")
            if not isinstance(w, Tensor) or w.dtype != WEIGHT_DTYPES[wdt] or tuple(w.shape) != tuple(self.weight_shape):
                raise ValueError(f"a dense layer needs a {wdt} weight of shape {tuple(self.weight_shape)}")
            extra = [n for n in self.PACKED if self._buffers.get(n) is not None]
            if extra:
                raise ValueError(f"a dense layer has no packed arrays, got {extra}")
        else:
            if self._buffers.get("weight") is not None:
                raise ValueError("a packed layer has no dense weight buffer")
            extra = [n for n in self._buffers if n not in self._packed_names()
                     and not (n == "bias_mask" and self._pruned_bias())]
            if extra:
                raise ValueError(f"unexpected arrays {extra} for a {wdt} {self.format} layer")
            self._check_packed()
            if self.bias is not None and self.bias.device != self.values.device:
                raise ValueError("bias and packed weight must be on one device")
        return self

    def _check_settings(self) -> None:
        """The string settings the forwards branch on — ``format``, ``weight_dtype``, ``kernel``, ``activation`` —
        each one of its accepted values (a ValueError naming them): run by validate() and, for settings changed
        since (``layer.activation = "tanh"``), before the kernels' arguments are built (``_check_kernel_arrays``)."""
        if not isinstance(self.format, str) or self.format not in ("dense", "csr", "bsr"):
            raise ValueError(f"format must be 'dense', 'csr' or 'bsr', got {self.format!r}")
        wdt = self.weight_dtype
        if not isinstance(wdt, str) or wdt not in WEIGHT_DTYPES or (wdt != "float32" and wdt not in self.QUANT_DTYPES):
            raise ValueError(f"weight_dtype {wdt!r} is not one {type(self).__name__} runs (one of "
                             f"{('float32',) + tuple(self.QUANT_DTYPES)})")
        if not isinstance(self.kernel, str) or self.kernel not in ops.KERNELS:
            raise ValueError(f"kernel must be one of {tuple(ops.KERNELS)}, got {self.kernel!r}")
        ops.activation_code(self.activation)

    def _pruned_bias(self) -> bool:
        """Whether ``torch.nn.utils.prune`` holds the bias: a ``bias_orig`` parameter, a ``bias_mask`` buffer and
        its forward pre-hook computing ``bias`` from them (the computed bias is what the kernels add: ``_bias()``).
        The mask is then torch's, not a packed array; it travels in the state_dict as for a dense layer."""
        from torch.nn.utils.prune import BasePruningMethod
        return "bias_orig" in self._parameters and "bias" not in self._parameters and any(
            isinstance(h, BasePruningMethod) and getattr(h, "_tensor_name", None) == "bias"
            for h in self._forward_pre_hooks.values())

    def _bias(self) -> Optional[Tensor]:
        """The bias the kernels add: the registered parameter, or the tensor ``torch.nn.utils.prune`` /
        ``parametrize`` compute for the attribute once they have taken the parameter over; a lazily negated one
        (``bias.data = z.conj().imag``: its memory holds the negated values, and the kernels read memory)
        resolved (a copy per call; ``_bias_fits`` keeps it off the kept calls)."""
        b = self._parameters.get("bias", _NO_BIAS)
        if b is _NO_BIAS:
            b = self.bias
        if b is not None and _negated(b):
            b = b.resolve_neg()
        return b

    def _check_bias(self, bias) -> None:
        out = self.weight_shape[0]
        if bias is not None and not isinstance(bias, Tensor):
            raise TypeError(f"{type(self).__name__}: bias must be a Tensor or None, got {type(bias).__name__}")
        if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (out,)):
            raise ValueError(f"{type(self).__name__}: bias must be float32 of shape ({out},), got {bias.dtype} "
                             f"{tuple(bias.shape)}")

    def _array_ptrs(self) -> tuple:
        """The packed arrays' addresses and what they are read as (weight shape, block size, format, weight
        dtype): an attribute changed without validate() (``groups``, ``kernel_size``, ...) re-checks the arrays
        against it before a kernel reads them. A lazily negated array (``t.data = torch._neg_view(t.data)``: the
        same address) counts as another address."""
        bufs = self._buffers
        return tuple(0 if t is None else -t.data_ptr() if _negated(t) else t.data_ptr()
                     for t in (bufs.get(n) for n in self._packed_names())) + (
            tuple(self.weight_shape), tuple(self.block_size), self.format, self.weight_dtype)

    def _check_packed(self) -> None:
        """Check the packed arrays (present; dtypes, sizes, index ranges: the matrix's validate()) and record
        them as checked: their addresses, and the arrays themselves, held so that no other array can take an
        address on the record while it stands (the kept-argument plans, which hold their bias the same way,
        compare addresses only)."""
        bufs = self._buffers
        for n in self._packed_names():
            if not isinstance(bufs.get(n), Tensor):
                raise ValueError(f"packed array {n!r} is missing")
            if _negated(bufs[n]):  # its memory holds the negated values (an index array: out of range), read as is
                raise ValueError(f"packed array {n!r} is a lazily negated view (torch._neg_view, z.conj().imag): "
                                 "the kernels read its memory, which holds the negated values; assign "
                                 "t.resolve_neg() instead")
        if self.weight_dtype == "float32":
            self.packed().validate()
        elif self.values.device.type != "meta":
            self._quant_matrix(check=True)
        # (the storages too: ``t.data = other`` frees the storage under a held tensor, and a new array could then
        # land at an address on the record unchecked)
        self.__dict__["_cache_arrays_ok"] = (self._array_ptrs(), tuple(bufs.get(n) for n in self._packed_names()),
                                             tuple(bufs[n].untyped_storage() for n in self._packed_names()
                                                   if isinstance(bufs.get(n), Tensor)))

    def _check_kernel_arrays(self, bias) -> None:
        """The part of validate() the kernels' memory safety rests on, for arrays the module holds now: the
        bias's dtype and size on every call through here, and the packed arrays in full (dtypes, sizes, index
        ranges) whenever one of them is not the array validate() or this method last checked (a new tensor
        assigned to the attribute, or given through ``.data``; several of them may be replaced one by one,
        the set is checked when it is used). Arrays edited in place keep their address: run ``validate()``
        after such an edit. Called where the arguments of a kernel call are built; raises ValueError /
        TypeError naming the problem."""
        self._check_settings()  # (one changed since validate(): a ValueError naming the accepted values)
        self._check_bias(bias)
        if self.format == "dense" or _compiling() or type(self._buffers.get("values")) is not Tensor:
            return  # traced (the custom op's eager call at run time reads what validate() checked) or fake
        ok = self.__dict__.get("_cache_arrays_ok")
        if ok is None or ok[0] != self._array_ptrs():
            self._check_packed()
        if bias is not None and bias.device != self._buffers["values"].device:
            raise ValueError("bias and packed weight must be on one device")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Packed arrays change size with the pattern: take the incoming set as a candidate, validate it,
        # and adopt it only if valid (a refused set leaves the module exactly as it was).
        names = self._packed_names() if self.format != "dense" else ()
        incoming = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        if local_metadata.get("assign_to_params_buffers", False) and prefix + "bias" in state_dict:
            b = state_dict[prefix + "bias"]  # assigned as given (not copied into a float32 tensor): checked first
            if isinstance(b, Tensor):
                self._check_bias(b)
        if incoming:
            for n, t in incoming.items():
                if not isinstance(t, Tensor):
                    raise TypeError(f"{prefix}{n}: expected a tensor, got {type(t).__name__}")
            dev = self._buffers["values"].device
            new = dict(self._buffers)
            new.update({n: t.detach().to(dev).clone().contiguous() for n, t in incoming.items()})
            # checked on a stand-in holding the new arrays, then swapped in as one dict: a forward running in
            # another thread reads the old set or the new one (each checked), never a mix of the two
            probe = type(self).__new__(type(self))
            probe.__dict__.update(self.__dict__)
            probe.__dict__["_buffers"] = new
            try:
                probe.validate()
            except (TypeError, ValueError) as e:
                raise ValueError(f"{prefix or type(self).__name__}: invalid packed weight in state_dict: {e}") \
                    from None
            self.__dict__["_buffers"] = new
            self.validate()
            # the base class then copies (or, with assign=True, installs) what it is given: the arrays adopted here
            state_dict = dict(state_dict)
            state_dict.update({prefix + n: new[n] for n in incoming})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- views --------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The dense weight: the buffer of a dense-format layer; for a packed layer, built from the
        packed arrays on every access (correct, but not the fast path: code that reads ``.weight``
        itself computes densely; convert() keeps layers whose weight is read that way dense)."""
        w = self._buffers.get("weight")
        if w is not None or self.__dict__.get("format", "dense") == "dense" or "values" not in self._buffers:
            if w is None:
                raise AttributeError(f"{type(self).__name__} has no weight")
            return w
        if not self.__dict__.get("_warned_weight"):
            self.__dict__["_warned_weight"] = True
            warnings.warn(f"reading .weight of a packed {type(self).__name__} rebuilds the dense weight on every "
                          "access; the sparse kernels are not used by the code that reads it", stacklevel=2)
        return self.to_dense()

    def __getstate__(self):
        # torch.save / pickle / deepcopy: per-input caches (conv plans hold torch.memory_format, which pickle
        # protocol 2 — torch.save's — cannot store) are rebuilt on the next call
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache")}

    def packed(self):
        """The packed weight matrix exactly as the kernels read it (not validated: see validate()):
        a BSRMatrix / CSRMatrix, or for int8 / bf16 weights a ``quant.QuantBSRMatrix``."""
        if self.format == "dense":
            raise ValueError(f"a dense-format {type(self).__name__} has no packed weight")
        if self.weight_dtype != "float32":
            return self._quant_matrix()
        shape = (self.weight_shape[0], math.prod(self.weight_shape[1:]))
        block = self._kernel_block()
        if block == (1, 1) and self.values.dim() == 1:
            return CSRMatrix(shape, self.row_ptr, self.col_idx, self.values, check=False)
        return BSRMatrix(shape, block, self.row_ptr, self.col_idx, self.values, check=False)

    def to_dense(self) -> Tensor:
        """The dense weight this layer computes with (zeros where pruned)."""
        if self.format == "dense":
            return self._buffers["weight"].float()
        return self.packed().to_dense().reshape(self.weight_shape)

    @property
    def density(self) -> float:
        """Fraction of the weight that is stored and computed."""
        if self.format == "dense":
            return _density(self.weight) if self.weight.device.type != "meta" else 1.0
        return self.values.numel() / max(1, math.prod(self.weight_shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as held (packed arrays, or the dense weight) plus the bias."""
        ts = [self.weight] if self.format == "dense" else [self._buffers[n] for n in self._packed_names()]
        if self.bias is not None:
            ts.append(self.bias)
        return sum(t.numel() * t.element_size() for t in ts)

    def _repr_tail(self) -> str:
        s = f", format={self.format}" + (f", weight_dtype={self.weight_dtype}" if self.weight_dtype != "float32" else "")
        if self.format == "bsr":
            s += f", block_size={self.block_size}"
        if self.activation != "none":
            s += f", activation={self.activation}"
        return s + (f", density={self.density:.3f}" if self._values_readable() else "")

    def _values_readable(self) -> bool:
        t = self.weight if self.format == "dense" else self.values
        return t.device.type != "meta"

    def _fill_dense(self, layer: nn.Module, device) -> nn.Module:
        """``layer`` (built on the meta device: no random initialisation of a weight about to be replaced,
        nor a second copy of it) given this layer's dense weight and bias as its parameters."""
        w = self.to_dense().to(device).reshape(self.weight_shape).contiguous()
        if self.format == "dense":  # to_dense() is this layer's own buffer then: the twin gets a copy
            w = w.clone()
        layer.weight = nn.Parameter(w)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().to(device).clone())
        return layer

    # -- running ------------------------------------------------------------------------------
    def _with_activation(self, layer: nn.Module) -> nn.Module:
        """The plain layer, followed by this layer's fused activation when it has one."""
        if ops.activation_code(self.activation) == 0:  # (one set since that is none of them: a ValueError)
            return layer
        act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
               "silu": nn.SiLU()}[self.activation]
        return nn.Sequential(layer, act)

    def _act_code(self) -> int:
        return ops.activation_code(self.activation)  # (a ValueError naming the accepted ones, for one set since)

    def _threads(self) -> int:
        return -1 if self.num_threads is None else int(self.num_threads)

    def _route(self, x: Tensor) -> str:
        """``"eager"`` / ``"autograd"`` / ``"op"``: see :func:`sparseprune.ops.call_route`."""
        return ops.call_route(x, self._bias())

    def _held(self, name: str) -> Tensor:
        """The buffer ``name`` (``values``; a dense-format layer's ``weight``). Missing where a setting was changed
        without validate() (``format`` set on a built layer): validate()'s error then says what is wrong."""
        t = self._buffers.get(name)
        if t is None:
            self.validate()
            raise ValueError(f"{type(self).__name__} ({self.format}) holds no {name!r} array: run validate()")
        return t

    def _check_input(self, x: Tensor) -> None:
        if x.dtype != torch.float32:
            raise TypeError(f"{type(self).__name__} computes in float32; got a {x.dtype} input (cast it with .float())")
        dev = self._held("values").device
        if x.device != dev:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {dev}")

    def _check_dense_input(self, x: Tensor) -> None:
        """format='dense': the same input dtypes as the packed formats (float32 weights: float32 inputs; bf16
        weights: float32 or bfloat16), not whatever torch's dense op would accept or cast."""
        if self.weight_dtype == "float32":
            if x.dtype != torch.float32:
                raise TypeError(f"{type(self).__name__} computes in float32; got a {x.dtype} input (cast it with "
                                ".float())")
        elif x.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{type(self).__name__} ({self.weight_dtype} weights) takes float32 or bfloat16 inputs, "
                            f"got {x.dtype}")
        dev = self._held("weight").device
        if x.device != dev:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {dev}")

    # -- quantized weights (int8 / bf16): one matmul path for every module type ----------------
    def _check_quant_input(self, x: Tensor) -> None:
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{type(self).__name__} ({self.weight_dtype} weights) takes float32 or bfloat16 inputs, "
                            f"got {x.dtype}")
        dev = self._held("values").device
        if x.device != dev:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {dev}")

    def _qmatmul(self, x2: Tensor) -> Tensor:
        """``act(x2 @ W^T + b)`` for a 2-D input through the int8 / bf16 BSR kernel (W: the packed
        ``(out, prod(weight_shape[1:]))`` matrix). For callers that ran ``_check_kernel_arrays``."""
        out, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        r, c = self.block_size
        bias = self._bias()
        args = (x2, self.row_ptr, self.col_idx, self.values, self._buffers.get("scales"),
                self._buffers.get("compensation"), bias, out, k, r, c, self._threads())
        route = self._route(x2)
        if route == "autograd":
            raise RuntimeError(f"{type(self).__name__} with {self.weight_dtype} weights is inference-only: run it "
                               "under torch.no_grad() / torch.inference_mode()")
        if route == "eager":
            return quant.qspmm_eager(*args, self._act_code())
        return ops.apply_activation(torch.ops.sparseprune.qspmm(*args), self.activation)

    def _apply(self, fn, recurse=True):
        # Packed indices must stay integers and values in their dtype. Cast this module itself
        # (``layer.double()``): a TypeError. Cast a model holding it (``model.double()``, which reaches this
        # module after casting the modules before it): this module keeps its dtype (a device move still
        # happens) with a warning, so the call never stops half-way through the model; such a layer then
        # refuses inputs of the other dtype with a clear TypeError.
        held = WEIGHT_DTYPES[self.weight_dtype] if self.weight_dtype != "int8" else torch.float32
        for probe_dtype in {torch.float32, held}:
            probe = fn(torch.zeros(1, dtype=probe_dtype))
            got = probe.dtype
            if got != probe_dtype:  # (a dense-format layer too: validate() and saved files hold it to its dtype)
                why = (f"{type(self).__name__} ({self.format}, {self.weight_dtype} weights) keeps its "
                       f"weight dtype; cannot convert {probe_dtype} to {got}")
                if not _inside_parent_apply(self):
                    raise TypeError(why)
                warnings.warn(f"{why}: left in {probe_dtype} while the rest of the model is cast", stacklevel=4)
                dev = probe.device
                return self._packed_layout(super()._apply(lambda t: t if t.device == dev else t.to(dev), recurse))
        return self._packed_layout(super()._apply(fn, recurse))

    def _packed_layout(self, out):
        """Packed arrays stay contiguous: ``model.to(memory_format=torch.channels_last)`` restrides every 4-D
        tensor, an int8 / bf16 layer's (blocks, r, c / g, g) values included, which the kernels read as laid out."""
        if self.format != "dense":
            for n in self._packed_names():
                t = self._buffers.get(n)
                if isinstance(t, Tensor) and not t.is_contiguous():
                    self._buffers[n] = t.contiguous()
        return out


def _inside_parent_apply(module: nn.Module) -> bool:
    """Whether ``module._apply`` was called by another module's ``_apply`` (``model.to(...)`` recursing into its
    children) rather than directly (``module.to(...)``)."""
    import sys
    f = sys._getframe(2)  # 0: this function, 1: module._apply, 2: its caller
    while f is not None and f.f_code.co_name == "_apply" and f.f_locals.get("self") is module:
        f = f.f_back  # a subclass's _apply calling super()._apply
    return f is not None and f.f_code.co_name == "_apply" and isinstance(f.f_locals.get("self"), nn.Module)


class SparseLinear(SparseModule):
    """``y = x W^T + b`` with W packed as CSR or BSR and executed by sparseprune's kernels.

    Build with :meth:`from_dense`. ``format="dense"`` keeps a dense weight (what convert() picks when
    sparse would be slower); it is reported as such, never passed off as sparse.
    """

    dense_type = nn.Linear
    SAVED_ATTRS = ("in_features", "out_features", "format", "block_size", "num_threads", "weight_dtype",
                   "activation", "kernel", "kernel_cpu")
    QUANT_DTYPES = ("int8", "bfloat16")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "csr",
                 block_size: Optional[Tuple[int, int]] = None, num_threads: Optional[int] = None):
        super().__init__()
        if format not in ("dense", "csr", "bsr"):
            raise ValueError(f"format must be one of 'dense', 'csr', 'bsr' for a constructed layer, got {format!r}")
        if format == "bsr" and block_size is None:
            raise ValueError("format='bsr' needs a block_size")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format = format
        from .formats import _check_block
        self.block_size = (1, 1) if format == "csr" else (_check_block(block_size) if format == "bsr" else None)
        self.num_threads = num_threads
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features)) if bias else None)
        zeros = torch.zeros(out_features, in_features)
        if format == "dense":
            self.register_buffer("weight", zeros)
        else:
            self._adopt(self._pack(zeros))
        self.validate()

    @classmethod
    def _geometry(cls, dense: nn.Linear) -> dict:
        return {"in_features": dense.in_features, "out_features": dense.out_features}

    @classmethod
    def _auto_format(cls, weight, geometry, block_size):
        fmt, detected = choose_format(weight)
        return fmt, (block_size or detected) if fmt == "bsr" else None

    def _check_geometry(self) -> None:
        _int(self.in_features, "in_features")
        _int(self.out_features, "out_features")

    @property
    def weight_shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    def to_dense_module(self) -> nn.Module:
        """An ``nn.Linear`` computing the same thing (``nn.Sequential(linear, activation)`` when an
        activation is fused)."""
        dev = (self.weight if self.format == "dense" else self.values).device
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return self._with_activation(self._fill_dense(lin, dev))

    to_linear = to_dense_module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + self._repr_tail())

    def forward(self, x: Tensor) -> Tensor:
        d = self.__dict__
        plan = d.get("_cache_qcall")
        # The repeat inference call of an int8 / bf16 layer, in one test: a plain contiguous non-empty float32 CPU
        # tensor of this size, nothing to differentiate, trace or intercept, the plan of the last call still valid
        # (same arrays at the same addresses, activation, thread setting). Everything else takes the path below,
        # which builds the plan. ~2 us less a call than that path: a tenth of a 90%-sparse 768x768 int8 product.
        if (plan is not None and _plain_eager(x)
                and x.is_contiguous() and d.get("_shared_input") is None and x.dim() and x.shape[-1] == plan[4]
                and self.in_features == plan[4] and self.out_features == plan[3] and self.activation == plan[1]
                and self.num_threads == plan[2] and x.numel() and d.get("_cache_arrays_ok") is plan[-1]):
            bias = self._parameters.get("bias", _NO_BIAS)
            if _qarray_ptrs(self._buffers, bias) == plan[0] and _bias_fits(bias, plan[3]):
                y = ops.empty_rows(x, plan[3])
                plan[5](x.data_ptr(), x.numel() // plan[4], y.data_ptr(), ops.resolve_threads(plan[2]))
                return y
        if type(x) is Tensor and _negated(x):  # a lazily negated view (e.g. z.conj().imag): the kernels read memory
            x = x.resolve_neg()
        shared = d.get("_shared_input")  # sparseprune.shared: one call for the layers on this input
        if shared is not None:
            y = shared[0].take(shared[1], x)
            if y is not None:
                return y
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseLinear expects a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        act = self.activation
        if self.format == "dense":
            self._check_dense_input(x)
            if self.weight_dtype == "float32":
                return ops.apply_activation(F.linear(x, self.weight, self.bias), act)
            y = F.linear(x.to(self.weight.dtype), self.weight)  # bf16 weights: torch's bf16 GEMM
            y = ops.apply_activation(y.float() + self.bias if self.bias is not None else y.float(), act)
            return y.to(x.dtype) if x.is_floating_point() else y
        bufs = self._buffers
        if "values" not in bufs:  # format set to a packed one on a dense-format layer, without validate()
            self._held("values")
        bias = self._bias()
        if self.weight_dtype != "float32":
            if (x.dtype is torch.float32 and x.is_cpu and self.in_features and self.out_features and x.numel()
                    and x.is_contiguous() and ops.call_route(x, bias) == "eager"):
                return self._qlinear_fast(x, act, bias)
            return self._forward_quant(x)
        values = bufs["values"]
        if x.dtype is not torch.float32 or not (x.is_cpu and values.is_cpu):
            self._check_input(x)
        if (x.is_cpu and ops.call_route(x, bias) == "eager" and x.is_contiguous() and x.numel()
                and self.out_features and (bias is None or bias.is_contiguous())):
            return self._spmm_fast(x, act, bias)
        self._check_kernel_arrays(bias)
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), self.in_features)
        r, c = self.block_size
        args = (x2, bufs["row_ptr"], bufs["col_idx"], bufs["values"], bias, self.out_features, self.in_features, r, c,
                self._threads())
        route = self._route(x2)
        if route == "eager":  # same kernel, without the dispatcher's per-call cost; activation fused
            y = ops.spmm_eager(*args, self._act_code(), self.kernel)
        elif route == "autograd":
            y = ops.apply_activation(ops.SpmmFunction.apply(*args), act)
        elif ops.differentiating_transform():
            y = ops.apply_activation(ops.SpmmFuncTransform.apply(*args), act)
        else:
            y = ops.apply_activation(torch.ops.sparseprune.spmm(*args), act)
        return y.reshape(*lead, self.out_features)

    def _spmm_fast(self, x: Tensor, act: str, bias: Optional[Tensor]) -> Tensor:
        """The common float32 inference call, straight to the kernel: no reshapes, no dispatcher (a few us
        a call). For callers that checked: x a contiguous non-empty float32 CPU tensor of this layer's
        input size, route "eager", packed weights on the CPU, ``bias`` (``_bias()``; if any) contiguous.
        The kernel's arguments but X, Y and the thread count are kept while the arrays keep their addresses
        (``_cache_fcall``); a new address is checked first (``_check_kernel_arrays``)."""
        bufs = self._buffers
        vals, rp, ci = bufs["values"], bufs["row_ptr"], bufs["col_idx"]
        ptrs = (vals.data_ptr(), rp.data_ptr(), ci.data_ptr(), 0 if bias is None else bias.data_ptr())
        plan = self.__dict__.get("_cache_fcall")
        if (plan is None or plan[0] != ptrs or plan[-1] is not self.__dict__.get("_cache_arrays_ok")
                or plan[1][0] != self.out_features or plan[1][1] != self.in_features
                or not _bias_fits(bias, self.out_features)):
            # (a plan stands while the arrays checked last are its own: an array replaced, checked on another
            # route and put back, edited meanwhile, is checked again)
            self._check_kernel_arrays(bias)
            r, c = self.block_size
            plan = (ptrs, (self.out_features, self.in_features, r, c, ptrs[1], ptrs[2], ci.dtype == torch.int16,
                           ptrs[0]), bias, self.__dict__.get("_cache_arrays_ok"))  # (bias: held)
            self.__dict__["_cache_fcall"] = plan
        try:
            code, variant = ops.ACTIVATIONS.index(act), ops.KERNELS[self.kernel]
        except (ValueError, KeyError, TypeError):  # a setting changed since the plan was built: say which
            self._check_settings()
            raise
        y = ops.empty_rows(x, self.out_features)
        _C.spmm(*plan[1], x.data_ptr(), x.numel() // self.in_features, self.in_features, ptrs[3], y.data_ptr(),
                self.out_features, self.num_threads or torch.get_num_threads(), code, *variant)
        return y

    def _fast(self, x: Tensor) -> Tensor:
        """The plain eager inference call of a packed layer (float32 or quantized weights), for callers
        that checked what :meth:`_spmm_fast` needs."""
        if self.weight_dtype == "float32":
            return self._spmm_fast(x, self.activation, self._bias())
        return self._qlinear_fast(x, self.activation, self._bias())

    def _qlinear_fast(self, x: Tensor, act: str, bias: Optional[Tensor]) -> Tensor:
        """The common int8 / bf16 inference call (float32, contiguous, CPU, nothing to trace or
        differentiate) straight to the kernel call of quant.qspmm_eager, as the float32 path does: the
        general route's checks, module attribute lookups and reshapes cost ~20 us a call, a third of a
        90%-sparse 768x768 int8 product. Arrays at new addresses are checked when the plan is rebuilt."""
        bufs = self._buffers
        vals, rp, ci = bufs["values"], bufs["row_ptr"], bufs["col_idx"]
        sc, co = bufs.get("scales"), bufs.get("compensation")
        # the kernel's arguments apart from X and Y, kept between calls (~5 us of attribute lookups and
        # argument building a call, 5% of a 90%-sparse 768x768 int8 product at 128 tokens); the addresses
        # are read on every call and must match, so a replaced or reallocated array rebuilds the plan
        ptrs = _qarray_ptrs(bufs, bias)
        plan = self.__dict__.get("_cache_qcall")
        if (plan is None or plan[0] != ptrs or plan[1] != act or plan[2] != self.num_threads
                or plan[-1] is not self.__dict__.get("_cache_arrays_ok") or not _bias_fits(bias, self.out_features)
                or plan[3] != self.out_features or plan[4] != self.in_features):
            if not vals.is_cpu:
                self._check_quant_input(x)  # raises: weights elsewhere
            self._check_kernel_arrays(bias)
            r, c = self.block_size
            if bias is not None and not bias.is_contiguous():  # the general path makes a contiguous copy
                return quant.qspmm_eager(x, rp, ci, vals, sc, co, bias, self.out_features, self.in_features, r, c,
                                         self._threads(), ops.ACTIVATIONS.index(act),
                                         x.shape[:-1] + (self.out_features,))
            s8 = vals.dtype == torch.int8
            call = _C.QCall("int8" if s8 else "bf16", self.out_features, self.in_features, r, c, ptrs[1], ptrs[2],
                            ci.dtype == torch.int16, ptrs[0], ptrs[3] if s8 else 0, ptrs[4] if s8 else 0, ptrs[5],
                            ops.ACTIVATIONS.index(act))
            plan = (ptrs, act, self.num_threads, self.out_features, self.in_features, call, bias,
                    self.__dict__.get("_cache_arrays_ok"))  # (bias: held)
            self.__dict__["_cache_qcall"] = plan
        y = ops.empty_rows(x, plan[3])
        plan[5](x.data_ptr(), x.numel() // plan[4], y.data_ptr(), ops.resolve_threads(self.num_threads))
        return y

    def _forward_quant(self, x: Tensor) -> Tensor:
        self._check_quant_input(x)
        self._check_kernel_arrays(self._bias())
        lead = x.shape[:-1]
        return self._qmatmul(x.reshape(math.prod(lead), self.in_features)).reshape(*lead, self.out_features)


def _column_groups(row_ptr: Tensor, col_idx: Tensor, cols: int) -> tuple:
    """``(row_ptr, col_idx, c)``: a BSR matrix of ``(r x 1)`` column blocks (a 1x1 convolution's packed weight)
    seen as ``(r x c)`` blocks, for the largest c of 16, 8, 4 that divides ``cols`` and whose aligned runs of c
    columns every block row keeps whole or drops whole. The values need no change: c consecutive column
    blocks are one ``(r x c)`` block's column-major layout. ``c = 1`` (the arrays as given) when no c fits."""
    nnz = col_idx.numel()
    for c in (16, 8, 4):
        if cols % c or nnz % c or bool((row_ptr % c).any()):
            continue
        g = col_idx.long().view(-1, c)  # sorted within each block row (validate()), runs start at row starts
        if bool((g[:, 0] % c == 0).all()) and bool((g - g[:, :1] == torch.arange(c)).all()):
            return (row_ptr // c).to(row_ptr.dtype), (g[:, 0] // c).to(col_idx.dtype), c
    return row_ptr, col_idx, 1


def _derive_groups(bufs, cols: int) -> tuple:
    """``(row_ptr, col_idx, addresses, copies, grouped row_ptr, grouped col_idx, c)``: :func:`_column_groups` of
    a 1x1 conv's packed index arrays, with what :func:`_groups_current` needs to tell whether they still hold:
    the arrays themselves (held: a new array at a recycled address is not taken for the old one), their
    addresses, and where the grouped arrays are derived copies (c > 1), copies of the source contents."""
    rp, ci = bufs["row_ptr"], bufs["col_idx"]
    g_rp, g_ci, c = _column_groups(rp, ci, cols)
    copies = None
    if c > 1:
        a, b = rp.clone(), ci.clone()
        # (the copies, then the _C.same_bytes arguments: source, copy and bytes for each array)
        copies = (a, b, rp.numel(), ci.numel(), (rp.data_ptr(), a.data_ptr(), a.numel() * a.element_size(),
                                                 ci.data_ptr(), b.data_ptr(), b.numel() * b.element_size()))
    return rp, ci, (rp.data_ptr(), ci.data_ptr()), copies, g_rp, g_ci, c


def _groups_current(g: tuple, bufs) -> bool:
    """Whether the column groups ``g`` (:func:`_derive_groups`) still describe the module's index arrays: the
    same tensors at the same addresses, and for derived groups the same contents byte for byte (an edit in
    place, even through ``.data``, which the version counter does not see; inference tensors have none)."""
    rp, ci = bufs["row_ptr"], bufs["col_idx"]
    if not (rp is g[0] and ci is g[1] and (rp.data_ptr(), ci.data_ptr()) == g[2]):
        return False
    c = g[3]
    return c is None or (rp.numel() == c[2] and ci.numel() == c[3] and _C.same_bytes(*c[4]))


def _pixel_rows(t: Tensor, stride=(1, 1)) -> Tensor:
    """The pixels of an (N, C, H, W) tensor that ``stride`` keeps, as the rows of an (N*Ho*Wo, C) matrix: a view
    of a channels_last tensor at stride 1, a copy of the kept pixels otherwise."""
    if tuple(stride) != (1, 1):
        t = t[:, :, ::stride[0], ::stride[1]]
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _channels_last_rows(t, shape) -> bool:
    """Whether ``t`` is a float32 CPU tensor of ``shape`` laid out channels_last (and not also NCHW-contiguous): its
    pixels are (N*H*W, C) rows a Linear kernel's store can read with the output's strides."""
    return (type(t) is Tensor and t.dtype is _F32 and t.is_cpu and tuple(t.shape) == tuple(shape)
            and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last))


def _from_pixel_rows(y: Tensor, n: int, h: int, w: int) -> Tensor:
    """(N*H*W, C) rows as an (N, C, H, W) view with channels_last strides (as PyTorch's output)."""
    return y.view(n, h, w, y.shape[1]).permute(0, 3, 1, 2)


def _to_nhwc(x: Tensor) -> Tensor:
    """A contiguous NCHW float32 CPU tensor as a contiguous (N, H, W, C) copy (the C++ blocked transpose)."""
    n, c, h, w = x.shape
    out = torch.empty(n, h, w, c, dtype=torch.float32)
    _C.transpose(x.data_ptr(), n, c, h * w, h * w, c * h * w, out.data_ptr(), c, h * w * c, torch.get_num_threads())
    return out


def _to_nchw(y: Tensor, n: int, h: int, w: int, c: int) -> Tensor:
    """Rows of pixels (N*H*W, C), float32 contiguous, as a contiguous NCHW tensor."""
    out = torch.empty(n, c, h, w, dtype=torch.float32)
    _C.transpose(y.data_ptr(), n, h * w, c, c, h * w * c, out.data_ptr(), h * w, c * h * w, torch.get_num_threads())
    return out


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _conv_padding(padding, kernel_size, stride, dilation):
    """(top, bottom, left, right) for an nn.Conv2d padding (ints, pair, 'valid' or 'same')."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
        if tuple(stride) != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]  # PyTorch puts the odd extra pixel at the end
        return tuple(out)
    if type(padding) is int:
        padding = (padding, padding)
    ph, pw = _pair_of(padding, "padding", lo=0)
    return (ph, ph, pw, pw)


class SparseConv2d(SparseModule):
    """``nn.Conv2d`` with the weight packed once and executed by sparseprune's kernels.

    Block semantics: a block ``(r, c)`` covers r output channels x c input channels at every kernel
    position (an r x c x kh x kw slab); ``format="csr"`` is unstructured over the
    ``(Cout, Cin/groups * kh * kw)`` view. Either way the packed weight is a BSR of ``(rk x 1)``
    column blocks over that view (rk = r, or 1 for CSR): the kernels read one (input channel, tap)
    column of rk output channels at a time. Grouped convolutions use group-local weights.
    Depthwise convolutions run (correctly but slowly) through the same kernel; ``format="auto"``
    keeps them dense. ``format="dense"`` keeps a dense weight and calls ``F.conv2d``.
    Inputs may be NCHW or channels_last; the output has the memory format dense PyTorch gives.

    ``weight_dtype=torch.int8`` / ``torch.bfloat16`` (``groups=1``): the weight is packed as the
    ``(Cout, kh * kw * Cin)`` matrix of an im2col convolution (columns in (kh, kw, Cin) order), in
    ``(r, c)`` blocks of that matrix (``c`` a multiple of 4 for int8, of 2 for bf16; a conv pruned in
    16x16 channel blocks with Cin a multiple of 16 is exactly 16x16 blocks there), and runs as
    im2col from an NHWC view + the quantized BSR kernel, with the numerics of the quantized
    SparseLinear (int8: activations quantized per output pixel's patch). The kernel writes NHWC:
    channels_last inputs get a channels_last output without a copy; NCHW inputs pay two blocked
    transposes (input to NHWC, output back), ~0.2 ms for a 56x56x256 map on 2 threads.
    """

    dense_type = nn.Conv2d
    SAVED_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "padding",
                   "padding_mode", "_pad4", "format", "block_size", "num_threads", "rk", "activation",
                   "weight_dtype", "kernel", "kernel_cpu")
    QUANT_DTYPES = ("int8", "bfloat16")

    def __init__(self, *args, **kwargs):
        raise TypeError("build a SparseConv2d with SparseConv2d.from_dense(conv, ...)")

    @classmethod
    def _geometry(cls, conv: nn.Conv2d) -> dict:
        kernel_size = tuple(conv.weight.shape[2:])
        stride, dilation = _pair(conv.stride, "stride"), _pair(conv.dilation, "dilation")
        return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": kernel_size,
                "stride": stride, "dilation": dilation, "groups": conv.groups, "padding": conv.padding,
                "padding_mode": conv.padding_mode,
                "_pad4": _conv_padding(conv.padding, kernel_size, stride, dilation)}

    @classmethod
    def _quant_matrix_of(cls, weight: Tensor) -> Tensor:
        # im2col columns in (kh, kw, Cin) order: a patch of an NHWC input is read with C innermost
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], math.prod(weight.shape[1:]))

    def to_dense(self) -> Tensor:
        if self.format == "dense" or self.weight_dtype == "float32":
            return super().to_dense()
        o, ci, kh, kw = self.weight_shape
        return self.packed().to_dense().reshape(o, kh, kw, ci).permute(0, 3, 1, 2).contiguous()

    @classmethod
    def _pattern(cls, weight: Tensor) -> Tensor:
        # block semantics live on (Cout, Cin/groups): a block covers every kernel position
        return (weight != 0).any(dim=3).any(dim=2).float()

    @classmethod
    def _auto_format(cls, weight, geometry, block_size):
        if weight.numel() == 0 or weight.device.type == "meta":
            return "dense", None
        d = _density(weight)
        if weight.shape[1] == 1 and geometry["groups"] > 1:
            return "dense", None  # depthwise: nothing to share between taps, PyTorch's kernel wins
        detected = detect_block_size(cls._pattern(weight)) if 0.0 < d < 1.0 else None
        if detected is not None and detected[0] * detected[1] >= 16 and d <= 0.5:
            return "bsr", block_size or detected
        return ("csr", None) if d <= 0.3 else ("dense", None)

    def _expected_rk(self) -> int:
        if self.format == "dense" or self.weight_dtype != "float32":
            return 0
        rk = 1 if self.format == "csr" else int(self.block_size[0])
        if self.groups > 1:
            rk = math.gcd(rk, self.out_channels // self.groups)  # a block row must not straddle two groups
        return rk

    def _finish_geometry(self) -> None:
        self.rk = self._expected_rk()

    def _kernel_block(self) -> Tuple[int, int]:
        if self.weight_dtype != "float32":
            return tuple(self.block_size)  # blocks of the im2col matrix
        return (self.rk, 1)

    def _check_geometry(self) -> None:
        cin, cout = _int(self.in_channels, "in_channels", 1), _int(self.out_channels, "out_channels", 1)
        groups = _int(self.groups, "groups", 1)
        if cin % groups or cout % groups:
            raise ValueError(f"in_channels ({cin}) and out_channels ({cout}) must be divisible by groups ({groups})")
        if self.weight_dtype != "float32" and groups != 1:
            raise ValueError(f"a {self.weight_dtype} SparseConv2d runs groups=1 convolutions only (got groups={groups}); "
                             "keep grouped / depthwise convolutions float32")
        self.kernel_size = _pair_of(self.kernel_size, "kernel_size")
        self.stride = _pair_of(self.stride, "stride")
        self.dilation = _pair_of(self.dilation, "dilation")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {self.padding_mode!r}")
        if not isinstance(self.padding, str):
            self.padding = _pair_of((self.padding, self.padding) if type(self.padding) is int else self.padding,
                                    "padding", lo=0)
        want = _conv_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        if not isinstance(self._pad4, (tuple, list)) or tuple(self._pad4) != want:
            raise ValueError(f"_pad4 {self._pad4!r} does not match padding {self.padding!r} (expected {want})")
        self._pad4 = want
        if self.rk != self._expected_rk():
            raise ValueError(f"rk={self.rk!r} does not match format {self.format!r}, block_size {self.block_size!r} "
                             f"and groups {groups} (expected {self._expected_rk()})")

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def to_dense_module(self) -> nn.Module:
        """An ``nn.Conv2d`` computing the same thing (``nn.Sequential(conv, activation)`` when an
        activation is fused)."""
        dev = (self.weight if self.format == "dense" else self.values).device
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        return self._with_activation(self._fill_dense(conv, dev))

    to_conv = to_dense_module

    @staticmethod
    def _sym_pad(x: Tensor, pad4):
        """``(x, (ph, pw))``: asymmetric padding ('same' with an even extent) applied to ``x``."""
        pt, pb, pl, pr = pad4
        if pt != pb or pl != pr:
            return F.pad(x, (pl, pr, pt, pb)), (0, 0)
        return x, (pt, pl)

    def _forward_quant(self, x: Tensor, pad4) -> Tensor:
        """im2col + the int8 / bf16 BSR kernel: rows = output pixels, columns = (kh, kw, Cin) patches
        of an NHWC view or copy of the input; in eager inference the kernel gathers the patches itself
        (padding implied), otherwise the patch matrix is materialised."""
        self._check_quant_input(x)
        pt, pb, pl, pr = pad4
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho, wo = self._out_hw(h, w, pad4)
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input {tuple(x.shape)} is smaller than the (dilated, padded) kernel")
        cl = (x.dim() == 4 and _functorch_stack() is None  # (vmap cannot tell memory formats apart)
              and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        bias = self._bias()
        self._check_kernel_arrays(bias)
        eager = x.is_cpu and ops.call_route(x, bias) == "eager"
        out_dtype = x.dtype
        if eager and self._planes_ok(x, pad4):
            return self._planes_call(x, pad4, self._act_code())
        if eager and _FUSED_IM2COL and (kh, kw, sh, sw) != (1, 1, 1, 1) and x.numel() > 0:
            # the kernel gathers each row of patches itself, padding included (quant.qconv_im2col_eager);
            # int8 quantizes float32 (a bf16 input is widened first, as the matrix path does), bf16 weights
            # read float32 or bf16
            if self.weight_dtype == "int8" and x.dtype is not torch.float32:
                x = x.float()
            xh = x.permute(0, 2, 3, 1)
            if not xh.is_contiguous():
                xh = _to_nhwc(x.contiguous()) if x.dtype is torch.float32 else xh.contiguous()
            r, cb = self.block_size
            y = quant.qconv_im2col_eager(xh, (kh, kw), (sh, sw), (dh, dw), pad4, self.row_ptr, self.col_idx,
                                         self.values, self._buffers.get("scales"), self._buffers.get("compensation"),
                                         bias, self.out_channels, r, cb, self._threads(), self._act_code())
            if not cl:
                y = _to_nchw(y, n, ho, wo, self.out_channels)
                return y if out_dtype is torch.float32 else y.to(out_dtype)
            return y.to(out_dtype).reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        if any(pad4):
            x = F.pad(x, (pl, pr, pt, pb))
        # NCHW float32 in eager mode: our blocked transpose (torch's permute copy of a 56x56x256 map took
        # ~1.6 ms, longer than the int8 convolution itself)
        fast = not cl and x.dtype is torch.float32 and x.is_contiguous() and eager
        xh = _to_nhwc(x) if fast else x.permute(0, 2, 3, 1)
        if (kh, kw) == (1, 1):  # a 1x1 convolution reads pixels directly
            y = self._qmatmul(xh[:, ::sh, ::sw].reshape(n * ho * wo, c).contiguous())
        else:
            xh = xh.contiguous()
            s0, s1, s2, s3 = xh.stride()
            patches = xh.as_strided((n, ho, wo, kh, kw, c), (s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3))
            y = self._qmatmul(patches.reshape(n * ho * wo, kh * kw * c).contiguous())
        # y: (n * ho * wo, cout), the layout of an NHWC tensor
        if fast and y.dtype is torch.float32:
            return _to_nchw(y, n, ho, wo, self.out_channels)
        y = y.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        return y if cl else y.contiguous()

    def _planes_ok(self, x: Tensor, pad4) -> bool:
        """Whether the quantized kernel reads and writes the NCHW planes directly (``_planes_call``): a stride-1
        convolution keeping the image size (1x1; 3x3 with padding 1; ...) or an unpadded strided 1x1 (its kept
        pixels copied out first) on a contiguous, non-empty NCHW float32 CPU input. A strided 3x3 keeps the
        transposing route: through its stride phases (one copy of the input) the planes kernel ran it at
        0.86-1.15x that route in int8 (Zen 5, ResNet-50's 3x3 / 2 shapes)."""
        if not (x.dtype is torch.float32 and x.dim() == 4 and x.is_contiguous() and x.numel() > 0 and x.is_cpu
                and self._buffers["values"].is_cpu):
            return False
        (sh, sw), (h, w) = self.stride, x.shape[2:]
        if (sh, sw) != (1, 1) and (self.kernel_size != (1, 1) or pad4[0] or pad4[2]):
            return False
        return h % sh == 0 and w % sw == 0 and self._out_hw(h, w, pad4) == (h // sh, w // sw)

    def _planes_call(self, x: Tensor, pad4, act: int, residual: Optional[Tensor] = None) -> Tensor:
        """The int8 / bf16 convolution over NCHW planes (quant.qconv_planes_eager), for inputs ``_planes_ok``
        accepts, in eager inference: no NHWC transposes of the input and output (they took ~0.15 ms of a
        56x56 map with 256 output planes, more than the sparse product). ``pad4``: the zero padding (top,
        bottom, left, right) of this call. ``residual``: a contiguous NCHW float32 tensor of the output's
        shape, added in the store before the activation. A stride-1 call on the module's own padding also
        keeps its kernel arguments for the next call of this input shape (``_planes_fast``)."""
        r, c = self.block_size
        bufs = self._buffers
        bias = self._bias()  # (callers ran _check_kernel_arrays)
        if (self.stride == (1, 1) and self.padding_mode == "zeros" and tuple(pad4) == tuple(self._pad4)
                and (bias is None or bias.is_contiguous())):
            s8 = self.weight_dtype == "int8"
            ptrs = _qarray_ptrs(bufs, bias)
            n, ch, h, w = x.shape
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            call = _C.QPlanesCall("int8" if s8 else "bf16", self.out_channels, kh * kw * ch, r, c, ptrs[1], ptrs[2],
                                  bufs["col_idx"].dtype == torch.int16, ptrs[0], ptrs[3] if s8 else 0,
                                  ptrs[4] if s8 else 0, n, h, w, kh, kw, dh, dw, pad4[0], pad4[2], ptrs[5], act)
            self.__dict__["_cache_qplanes"] = (ptrs, x.shape, act, self.num_threads, self._planes_geom(),
                                               (n, self.out_channels, h, w), call, bias,
                                               self.__dict__.get("_cache_arrays_ok"))  # (bias: held)
            y = self._planes_fast(x, act, residual)  # the plan just built (one argument conversion, not two)
            if y is not None:
                return y
        return quant.qconv_planes_eager(x, self.kernel_size, self.stride, self.dilation, (pad4[0], pad4[2]),
                                        bufs["row_ptr"], bufs["col_idx"], bufs["values"], bufs.get("scales"),
                                        bufs.get("compensation"), bias, self.out_channels, r, c,
                                        self._threads(), act, residual)

    def _planes_geom(self) -> tuple:
        return self.kernel_size, self.stride, self.dilation, self._pad4, self.padding, self.padding_mode, self.format

    def _planes_fast(self, x: Tensor, act: int, residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """The repeat eager call of an int8 / bf16 conv on the planes route, straight to its kept kernel
        arguments (``_cache_qplanes``), as SparseLinear's ``_cache_qcall``: a plain contiguous float32 CPU tensor
        of the shape the plan was built for, nothing to differentiate, trace or intercept, the same arrays at
        the same addresses, activation code ``act`` (fused into the store), thread setting and geometry;
        ``residual`` (if given) a plain contiguous float32 CPU tensor of the output's shape. None where any of
        that does not hold: the general route."""
        plan = self.__dict__.get("_cache_qplanes")
        if not (plan is not None and _plain_eager(x) and x.shape == plan[1] and x.is_contiguous() and act == plan[2]
                and self.num_threads == plan[3] and self._planes_geom() == plan[4]
                and self.__dict__.get("_cache_arrays_ok") is plan[-1]
                and _qarray_ptrs(self._buffers, self._parameters.get("bias", _NO_BIAS)) == plan[0]
                and _bias_fits(self._parameters.get("bias"), plan[5][1])):
            return None
        if residual is not None and not (type(residual) is Tensor and residual.dtype is _F32 and residual.is_cpu
                                         and residual.shape == plan[5] and residual.is_contiguous()):
            return None
        y = torch.empty(plan[5], dtype=_F32)
        plan[6](x.data_ptr(), y.data_ptr(), ops.resolve_threads(plan[3]),
                0 if residual is None else residual.data_ptr())
        return y

    def _cl_geom(self) -> tuple:
        return (self.kernel_size, self.stride, self.dilation, self._pad4, self.padding, self.groups, self.padding_mode,
                self.in_channels, self.out_channels, self.rk)

    def _cl_fast(self, x: Tensor, act: int, residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """The repeat eager call of a float32 1x1 conv (stride 1, no padding) on a channels_last input, straight to
        the Linear kernel over its pixels with the arguments kept by the first call of this input shape
        (``_cache_clplan``): a plain float32 CPU tensor of that shape laid out channels_last, nothing to
        differentiate, trace or intercept, the same arrays at the same addresses (the index arrays' column groups
        still those of their contents: ``_groups_current``), thread setting, kernel variant and geometry; activation code ``act`` (fused into the store); ``residual`` (if given) a
        float32 CPU tensor of the output's shape laid out channels_last, added in the store. The general route's
        checks, views and argument building cost ~15 us a call, a quarter of a 90%-sparse 1024->256 @14 conv.
        None where any of that does not hold."""
        plan = self.__dict__.get("_cache_clplan")
        if not (plan is not None and _plain_eager(x) and x.shape == plan[1] and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last) and self.num_threads == plan[2]
                and self.kernel == plan[3] and self.format != "dense" and self.weight_dtype == "float32"
                and self._cl_geom() == plan[7] and self.__dict__.get("_cache_arrays_ok") is plan[-1]):
            return None
        if residual is not None and not _channels_last_rows(residual, plan[4]):
            return None
        bufs, bias = self._buffers, self._parameters.get("bias", _NO_BIAS)
        if ((bufs["values"].data_ptr(), 0 if bias is None else -1 if bias is _NO_BIAS else bias.data_ptr()) != plan[0]
                or not _groups_current(plan[8], bufs) or not _bias_fits(bias, self.out_channels)):
            return None
        y = torch.empty(plan[4], dtype=_F32, memory_format=torch.channels_last)
        a, bias_ptr = plan[5], plan[0][1]
        if residual is None:
            _C.spmm(*a, x.data_ptr(), plan[6], a[1], bias_ptr, y.data_ptr(), a[0], ops.resolve_threads(plan[2]), act,
                    *ops.KERNELS[plan[3]])
        else:
            _C.spmm_res(*a, x.data_ptr(), plan[6], a[1], bias_ptr, y.data_ptr(), a[0], ops.resolve_threads(plan[2]),
                        act, *ops.KERNELS[plan[3]], residual.data_ptr())
        return y

    def _eager_cpu(self, x: Tensor, pad4, act: int, residual: Optional[Tensor] = None) -> Tensor:
        """The float32 sparse kernel on a checked CPU input in eager inference."""
        bufs, bias = self._buffers, self._bias()
        self._check_kernel_arrays(bias)
        if (self.kernel_size == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and not any(pad4) and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)
                and (residual is None or self._cl_residual_ok(x, residual))):
            # a 1x1 conv on a channels_last input is a Linear layer over its pixels, (N*H*W, Cin) row-major: the
            # packed (rk x 1)-block weight is a BSR matrix the Linear kernels read as it is. The conv kernel
            # would pack the input into channel planes and scatter its output pixel by pixel (ResNet-50 80%
            # in channels_last ran at 2.45x dense against 4.05x in NCHW). A channels_last residual is added in
            # the Linear kernel's store (before it went through the conv kernel: ~2x the NCHW time).
            # Where the weight keeps whole aligned runs of 16 (8, 4) input channels, the same arrays are read as
            # (rk x 16)-blocks (_column_groups): the Linear kernel's 16-wide block loop, 1.2-1.4x the
            # one-column blocks on ResNet-50's 1x1 shapes at 80%.
            # With a stride, the pixels it keeps are copied out first (a quarter of the input at stride 2):
            # ResNet-50's stride-2 shortcuts 1.3-2x faster than through the conv kernel's transposes.
            groups = self.__dict__.get("_cache_col_groups")
            if groups is None or not _groups_current(groups, bufs):
                groups = _derive_groups(bufs, self.in_channels)
                self.__dict__["_cache_col_groups"] = groups
            if (self.stride == (1, 1) and not any(self._pad4) and self.in_channels and self.out_channels
                    and x.numel() and (bias is None or bias.is_contiguous())):
                # kept for the next call of this input shape (_cl_fast), as the quantized layers' plans (not for a
                # layer with padding: its input here is the padded copy, and an unpadded input of that size must
                # not find the plan)
                ptrs = (bufs["values"].data_ptr(), 0 if bias is None else bias.data_ptr())
                n, _, h, w = x.shape
                args = (self.out_channels, self.in_channels, self.rk, groups[6], groups[4].data_ptr(),
                        groups[5].data_ptr(), groups[5].dtype == torch.int16, ptrs[0])
                self.__dict__["_cache_clplan"] = (ptrs, x.shape, self.num_threads, self.kernel,
                                                  (n, self.out_channels, h, w), args, n * h * w, self._cl_geom(),
                                                  groups, bias, self.__dict__.get("_cache_arrays_ok"))  # (bias: held)
                y = self._cl_fast(x, act, residual)
                if y is not None:
                    return y
            y = ops.spmm_eager(_pixel_rows(x, self.stride), groups[4], groups[5], bufs["values"],
                               bias, self.out_channels, self.in_channels, self.rk, groups[6],
                               self._threads(), act, self.kernel, None if residual is None else _pixel_rows(residual))
            return _from_pixel_rows(y, x.shape[0], *self._out_hw(x.shape[2], x.shape[3], pad4))
        # shapes, strides and workspace size depend only on the input's shape and strides: kept
        # (and the geometry: stride, dilation, groups... changed on the module are honoured as nn.Conv2d does)
        key = (x.shape, x.stride(), tuple(pad4), self._cl_geom())
        plan = self.__dict__.get("_cache_conv_plan")
        if plan is None or plan[0] != key:
            plan = (key, ops.conv2d_plan(x, self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                         pad4, self.dilation, self.groups))
            self.__dict__["_cache_conv_plan"] = plan
        if (tuple(pad4) == tuple(self._pad4) and (self.padding_mode == "zeros" or not any(pad4)) and x.numel()
                and (bias is None or bias.is_contiguous())):
            # kept for the next call of this input shape and strides (_conv_fast; not for a layer padded by another
            # mode: its input here is the padded copy, and an unpadded input of that size must not find the plan)
            shape, fmt, geom, _ = plan[1]
            ptrs = (bufs["values"].data_ptr(), bufs["row_ptr"].data_ptr(), bufs["col_idx"].data_ptr(),
                    0 if bias is None else bias.data_ptr())
            call = ops._C.ConvCall(geom, self.rk, ptrs[1], ptrs[2], bufs["col_idx"].dtype == torch.int16, ptrs[0],
                               ptrs[3], act)
            y_strides = torch.empty(shape, device="meta", memory_format=fmt).stride()
            self.__dict__["_cache_convcall"] = (ptrs, x.shape, x.stride(), act, self.num_threads, self._cl_geom(),
                                                shape, fmt, y_strides, call, bias,
                                                self.__dict__.get("_cache_arrays_ok"))  # (bias: held)
            y = self._conv_fast(x, act, residual)
            if y is not None:
                return y
        return ops.sparse_conv2d_planned(x, plan[1], bufs["row_ptr"], bufs["col_idx"], bufs["values"],
                                         bias, self.rk, self._threads(), act, residual)

    def _conv_fast(self, x: Tensor, act: int, residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """The repeat eager call of a float32 sparse conv through the conv kernel, straight to its kept arguments
        (``_cache_convcall``, a ``_C.ConvCall``): a float32 CPU tensor of the shape and strides the plan was built
        for, nothing to differentiate, trace or intercept, the same arrays at the same addresses, activation code
        ``act``, thread setting and geometry; ``residual`` (if given) a float32 CPU tensor of the output's shape and
        strides, added in the store. The general route's checks, plan lookups and argument building cost ~13 us a
        call (a 90%-sparse 1x1 64->256 @56 conv takes ~140). None where any of that does not hold."""
        plan = self.__dict__.get("_cache_convcall")
        if not (plan is not None and _plain_eager(x) and x.shape == plan[1] and x.stride() == plan[2]
                and act == plan[3] and self.num_threads == plan[4] and self.format != "dense"
                and self.weight_dtype == "float32" and self._cl_geom() == plan[5]
                and self.__dict__.get("_cache_arrays_ok") is plan[-1]):
            return None
        bufs, bias = self._buffers, self._parameters.get("bias", _NO_BIAS)
        if ((bufs["values"].data_ptr(), bufs["row_ptr"].data_ptr(), bufs["col_idx"].data_ptr(),
                0 if bias is None else -1 if bias is _NO_BIAS else bias.data_ptr()) != plan[0]
                or not _bias_fits(bias, plan[6][1])):
            return None
        if residual is not None and not (type(residual) is Tensor and residual.dtype is _F32 and residual.is_cpu
                                         and residual.shape == plan[6] and residual.stride() == plan[8]):
            return None
        y = torch.empty(plan[6], dtype=_F32, memory_format=plan[7])
        plan[9](x.data_ptr(), y.data_ptr(), ops.resolve_threads(plan[4]), 0 if residual is None else residual.data_ptr())
        return y

    def _sync_pad4(self) -> None:
        """``padding`` (or the stride / dilation a "same" padding depends on) changed since the layer was built:
        the zero padding the kernels apply follows, as nn.Conv2d's does, after validate() has checked the new
        geometry (which also drops every plan kept for the old one)."""
        want = _conv_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        if tuple(self._pad4) != want:
            self._pad4 = want
            self.validate()

    def _out_hw(self, h: int, w: int, pad4) -> Tuple[int, int]:
        """The output height and width for an (h, w) input padded by ``pad4`` (top, bottom, left, right)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        pt, pb, pl, pr = pad4
        return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1

    def _plain_1x1(self) -> bool:
        """A 1x1 kernel without padding or dilation: a Linear layer over the (strided) pixels."""
        return self.kernel_size == (1, 1) and self.dilation == (1, 1) and not any(self._pad4)

    def _cl_residual_ok(self, x: Tensor, residual: Tensor) -> bool:
        """Whether the channels_last 1x1 route can add ``residual`` in its store: a float32 CPU tensor of the
        output's shape laid out channels_last (a view of (N*Ho*Wo, Cout) rows). Anything else goes to the conv
        kernel's path, which checks it and raises for what it cannot add."""
        return _channels_last_rows(residual, (x.shape[0], self.out_channels,
                                              *self._out_hw(x.shape[2], x.shape[3], self._pad4)))

    def forward_residual(self, x: Tensor, residual: Tensor, activation: str = "none") -> Tensor:
        """``activation(self(x) + residual)``: a residual connection and the activation after it (a ResNet
        block's end), applied in the kernel's store where it can be — float32 sparse weights, eager CPU
        inference, no activation of the layer's own, a 4-D input, the residual shaped and laid out as the
        output — and by PyTorch after the layer otherwise; the same values either way."""
        code = ops.activation_code(activation)
        if not isinstance(residual, Tensor):
            raise TypeError(f"forward_residual: the residual must be a Tensor, got {type(residual).__name__}")
        if _negated(residual):  # lazily negated views: the kernels read memory
            residual = residual.resolve_neg()
        if type(x) is Tensor and _negated(x):
            x = x.resolve_neg()
        if "_cache_qplanes" in self.__dict__ and self.activation == "none":
            y = self._planes_fast(x, code, residual)
            if y is not None:
                return y
        if "_cache_convcall" in self.__dict__ and self.activation == "none":
            y = self._conv_fast(x, code, residual)
            if y is not None:
                return y
        if "_cache_clplan" in self.__dict__ and self.activation == "none":
            y = self._cl_fast(x, code, residual)
            if y is not None:
                return y
        self._sync_pad4()  # (after the kept calls: a changed padding changes their geometry key)
        if self.format != "dense" and "values" not in self._buffers:  # format set on a dense-format layer
            self._held("values")
        bias = self._bias()
        if (self.format != "dense" and self.weight_dtype == "float32" and self.activation == "none"
                and type(x) is Tensor and x.dim() == 4 and x.shape[1] == self.in_channels
                and self.padding_mode == "zeros" and x.is_cpu and self._buffers["values"].is_cpu
                and type(residual) is Tensor and ops.call_route(x, bias, residual) == "eager"):
            self._check_input(x)
            return self._eager_cpu(x, self._pad4, code, residual)
        if (self.format != "dense" and self.weight_dtype != "float32" and self.activation == "none"
                and type(x) is Tensor and x.dim() == 4 and x.shape[1] == self.in_channels
                and self.padding_mode == "zeros" and self._planes_ok(x, self._pad4)
                and type(residual) is Tensor and residual.dtype is torch.float32 and residual.is_cpu
                and residual.is_contiguous()
                and tuple(residual.shape) == (x.shape[0], self.out_channels, *self._out_hw(*x.shape[2:], self._pad4))
                and ops.call_route(x, bias, residual) == "eager"):
            # int8 / bf16 conv on NCHW input and residual (stride 1, the size kept): the planes kernel, the residual
            # added in its store
            self._check_quant_input(x)
            self._check_kernel_arrays(bias)
            return self._planes_call(x, self._pad4, code, residual)
        if (self.format != "dense" and self.weight_dtype != "float32" and self.activation == "none"
                and type(x) is Tensor and x.dim() == 4 and x.shape[1] == self.in_channels and x.dtype is torch.float32
                and self.padding_mode == "zeros" and x.numel() and x.is_cpu and self._buffers["values"].is_cpu
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                and self._cl_residual_ok(x, residual) and ops.call_route(x, bias, residual) == "eager"
                and (_FUSED_IM2COL or self._plain_1x1())):
            # int8 / bf16 conv on channels_last input and residual: the quantized kernel (over the pixels for a
            # 1x1 conv, over the implicit im2col rows otherwise) with the residual added in its store
            # (ResNet-50's expand convs: the separate add and activation took about a third of their time)
            self._check_quant_input(x)
            self._check_kernel_arrays(bias)
            r, c = self.block_size
            scales, comp = self._buffers.get("scales"), self._buffers.get("compensation")
            if self._plain_1x1():
                y = quant.qspmm_eager(_pixel_rows(x, self.stride), self.row_ptr, self.col_idx, self.values, scales,
                                      comp, bias, self.out_channels, self.in_channels, r, c, self._threads(), code,
                                      residual=_pixel_rows(residual))
            else:
                y = quant.qconv_im2col_eager(x.permute(0, 2, 3, 1), self.kernel_size, self.stride, self.dilation,
                                             self._pad4, self.row_ptr, self.col_idx, self.values, scales, comp, bias,
                                             self.out_channels, r, c, self._threads(), code,
                                             residual=_pixel_rows(residual))
            n, _, ho, wo = residual.shape
            return _from_pixel_rows(y, n, ho, wo)
        return ops.apply_activation(self(x) + residual, activation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}" + self._repr_tail())

    def forward(self, x: Tensor) -> Tensor:
        if type(x) is Tensor and _negated(x):  # a lazily negated view (e.g. z.conj().imag): the kernels read memory
            x = x.resolve_neg()
        if "_cache_qplanes" in self.__dict__:
            y = self._planes_fast(x, self._act_code())
            if y is not None:
                return y
        if "_cache_convcall" in self.__dict__:
            y = self._conv_fast(x, self._act_code())
            if y is not None:
                return y
        if "_cache_clplan" in self.__dict__:
            y = self._cl_fast(x, self._act_code())
            if y is not None:
                return y
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseConv2d expects a Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d expects (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W) "
                             f"inputs, got {tuple(x.shape)}")
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        self._sync_pad4()
        pad4 = self._pad4
        if self.padding_mode != "zeros" and any(pad4):
            x = F.pad(x, (pad4[2], pad4[3], pad4[0], pad4[1]), mode=self.padding_mode)
            pad4 = (0, 0, 0, 0)
        if self.format == "dense":
            self._check_dense_input(x)
            x, pad = self._sym_pad(x, pad4)
            if self.weight_dtype == "float32":
                return ops.apply_activation(F.conv2d(x, self.weight, self.bias, self.stride, pad, self.dilation,
                                                     self.groups), self.activation)
            # bf16 weights: torch's bf16 convolution, bias and activation in fp32, output in x's dtype
            y = F.conv2d(x.to(self.weight.dtype), self.weight, None, self.stride, pad, self.dilation, self.groups)
            y = y.float() + self.bias.view(1, -1, 1, 1) if self.bias is not None else y.float()
            return ops.apply_activation(y, self.activation).to(x.dtype)
        if self.weight_dtype != "float32":
            return self._forward_quant(x, pad4)
        self._check_input(x)
        bufs, bias = self._buffers, self._bias()
        if x.is_cpu and bufs["values"].is_cpu and ops.call_route(x, bias) == "eager":
            return self._eager_cpu(x, pad4, self._act_code())
        self._check_kernel_arrays(bias)
        args = (x, self.row_ptr, self.col_idx, self.values, bias, self.in_channels, self.out_channels,
                list(self.kernel_size), list(self.stride), list(pad4), list(self.dilation), self.groups, self.rk,
                self._threads())
        if self._route(x) == "eager":
            # the same implementation without the dispatcher round trip (~35 us a call), activation fused
            return ops.sparse_conv2d_eager(*args, self._act_code())
        return ops.apply_activation(torch.ops.sparseprune.sparse_conv2d(*args), self.activation)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that runs contiguous (NCHW) float32 CPU inputs through sparseprune's pooling kernel.

    The same values as PyTorch (NaN propagates; ``-0.0`` and ``0.0`` tie as they compare equal, so
    either may come out where both are the window's maximum). PyTorch 2.13's CPU max pooling is slow
    in NCHW: ResNet-50's 3x3 / 2 stem pool took 4.4 ms there against 0.3 ms in channels_last (2 threads,
    AMD EPYC Zen 3), a tenth of an 80%-sparse converted ResNet-50. Everything else — channels_last and
    other dtypes or devices, ``return_indices``, inputs that need a gradient, ``torch.compile`` / export —
    goes to ``nn.MaxPool2d.forward`` unchanged. :func:`sparseprune.convert` installs it where it times
    faster (``pools=True``)."""

    num_threads: Optional[int] = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.return_indices and type(x) is torch.Tensor and ops.call_route(x) == "eager":
            y = ops.maxpool2d_eager(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                    self.ceil_mode, self.num_threads)
            if y is not None:
                return y
        return super().forward(x)

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        """The same pooling (kernel, stride, padding, dilation, ceil_mode, return_indices) as ``pool``."""
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"from_module expects an nn.MaxPool2d, got {type(pool).__name__}")
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)
        new.train(pool.training)
        return new
