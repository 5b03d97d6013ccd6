"""``python -m sparseprune.info``: what was built and what this machine will run."""
from __future__ import annotations

import platform

import torch


def info_lines():
    import sparseprune
    from sparseprune import _ext, ops

    lines = [
        f"sparseprune {sparseprune.__version__}",
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}",
        f"cpu features: {_ext._C.cpu_features() or 'none detected'}",
        f"isa path: {ops.active_isa()} (available: {', '.join(p['isa'] for p in ops.isa_paths())}; "
        "force with SPARSEPRUNE_ISA)",
        f"threads: torch {torch.get_num_threads()}, openmp {_ext._C.omp_max_threads()}",
    ]
    for p in ops.isa_paths(supported_only=False):
        mark = "*" if p["isa"] == ops.active_isa() else " "
        lines.append(f" {mark} {p['isa']:<7} spmm: {p['kernels']}{'' if p['supported'] else '  (not supported here)'}")
        if p.get("conv_kernels"):
            lines.append(f"   {'':<7} conv: {p['conv_kernels']}")
    try:  # quantized BSR paths (issue #14): int8 / bf16, selected by the same ISA level
        from . import quant
        levels = sorted({p["isa"] for p in quant.qisa_paths()} - {p["isa"] for p in ops.isa_paths()})
        lines.append(f"quantized BSR paths (SPARSEPRUNE_ISA also takes {', '.join(levels) or 'nothing more'} here):")
        for kind, dt in (("int8", torch.int8), ("bf16", torch.bfloat16)):
            active = quant.active_qisa(dt)
            for p in quant.qisa_paths(supported_only=False):
                if p["dtype"] == kind:
                    mark = "*" if p["isa"] == active else " "
                    note = "" if p["supported"] else "  (not supported here)"
                    lines.append(f" {mark} {p['isa']:<10} {kind}: {p['kernels']}{note}")
    except Exception as e:  # never let info fail on an optional part
        lines.append(f"quantized kernels: unavailable ({e})")
    if _ext._cuda is not None:
        dev = ""
        if torch.cuda.is_available():
            dev = f"; device: {torch.cuda.get_device_name()}"
        lines.append(f"cuda: {_ext.CUDA_STATUS}{dev}")
    else:
        why = _ext.CUDA_STATUS if _ext.CUDA_STATUS.startswith("not built") else f"not loadable ({_ext.CUDA_IMPORT_ERROR})"
        lines.append(f"cuda: {why}")
    return lines


def main() -> None:
    print("\n".join(info_lines()))


if __name__ == "__main__":
    main()
