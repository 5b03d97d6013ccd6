"""The ``sparseprune`` command.

    sparseprune info                      what was built and what this machine runs
    sparseprune demo [ARGS...]            the packaged demo (sparseprune.demo)
    sparseprune report MODEL_FILE         verify a saved model and print its per-layer table (no code run)
    sparseprune bench MODEL_FILE --arch MODULE:CALLABLE --input-shape 128,768
                                          load the model and re-time every layer against dense

``bench`` needs the architecture to rebuild the model: ``--arch`` names an importable callable that
returns a fresh instance of the original (unconverted) architecture, e.g. ``torchvision.models:resnet18``
or ``mypkg.models:build_model``; the current directory is on the import path. That import runs the
named module's code (your code); the model file itself is only read (see :mod:`sparseprune.io`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseprune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("info", help="what was built (ISAs, threads, CUDA) and what this machine runs")
    d = sub.add_parser("demo", help="run the packaged demo")
    d.add_argument("args", nargs=argparse.REMAINDER, help="passed to the demo")
    r = sub.add_parser("report", help="print the per-layer table stored in a saved model")
    r.add_argument("model_file")
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    b = sub.add_parser("bench", help="load a saved model and re-time each layer against dense",
                       description="Load MODEL_FILE into a fresh instance built by --arch (the original, "
                                   "unconverted architecture), run it on a random input of --input-shape and "
                                   "time every sparse layer against the dense layer it replaced, plus the whole "
                                   "model against its dense twin.")
    b.add_argument("model_file")
    b.add_argument("--arch", required=True, metavar="MODULE:CALLABLE",
                   help="callable returning a fresh instance of the original architecture")
    b.add_argument("--input-shape", required=True, metavar="N,...",
                   help="shape of the random float32 input, e.g. 128,768 or 8,3,224,224")
    b.add_argument("--threads", type=_positive_int, default=None, help="threads (default: torch's)")
    b.add_argument("--time-budget", type=_non_negative, default=5.0, help="seconds of timing in total")
    b.add_argument("--json", action="store_true", help="print the rows and totals as JSON")
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= 1024:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 1024], got {text!r}")
    return v


def int_in(lo: int, hi: int):
    """An argparse ``type``: an integer in [lo, hi], or an error naming the range (recipes' counts and sizes)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}")
        return v
    return parse


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds, got {text!r}")
    return v


def _arch(spec: str):
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"sparseprune: --arch must look like MODULE:CALLABLE, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"sparseprune: cannot import {mod_name!r} for --arch: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"sparseprune: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"sparseprune: --arch {spec!r} is not callable")
    return obj


def _shape(text: str):
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 0 for s in shape):
        raise SystemExit(f"sparseprune: --input-shape must be comma-separated sizes, got {text!r}")
    return shape


def _print_summary(s, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"layers": list(s), "totals": s.totals}, indent=1, default=str))
    else:
        print(s.table())


def _report(args) -> int:
    from .convert import REPORT_ATTR, Summary, summary
    from .io import read_file

    try:
        tensors, structure, meta = read_file(args.model_file)
    except (OSError, ValueError) as e:
        print(f"sparseprune: {e}", file=sys.stderr)
        return 1
    holder = type("_Saved", (), {})()  # summary() reads only the stored (schema-checked) report
    setattr(holder, REPORT_ATTR, structure.get("report"))
    size = os.path.getsize(args.model_file)
    if structure.get("report") is None:
        rows = []
        for n, e in structure["modules"].items():
            if e["class"] == "Identity":
                continue
            attrs = e["attrs"]
            fmt = attrs.get("format") if isinstance(attrs.get("format"), str) else "-"
            block = attrs.get("block_size") if fmt == "bsr" and isinstance(attrs.get("block_size"), list) else None
            rows.append({"name": n, "type": e["class"], "shape": None, "format": fmt, "block": block,
                         "density": None, "dense_ms": None, "sparse_ms": None, "speedup": None})
        s = Summary(rows, {"layers": len(rows), "sparse_layers": sum(r["format"] in ("csr", "bsr") for r in rows),
                           "dense_ms": None, "converted_ms": None, "speedup": None})
    else:
        s = summary(holder, print_fn=None)
    if not args.json:
        print(f"{args.model_file}: sparseprune format v{meta['sparseprune.format_version']}, {size / 1e6:.2f} MB, "
              f"{len(tensors)} tensors, integrity OK")
        print("times below were measured when the model was converted; `sparseprune bench` re-measures\n")
    _print_summary(s, args.json)
    return 0


def _bench(args) -> int:
    import torch

    from .convert import measure
    from .io import load

    factory = _arch(args.arch)
    shape = _shape(args.input_shape)
    try:
        fresh = factory()
    except Exception as e:  # the user's callable: e.g. it needs arguments, or fails building the model
        print(f"sparseprune: --arch {args.arch}() failed ({type(e).__name__}: {e}); it must build a fresh instance "
              "of the original architecture without arguments", file=sys.stderr)
        return 1
    if not isinstance(fresh, torch.nn.Module):
        print(f"sparseprune: --arch {args.arch} returned {type(fresh).__name__}, not an nn.Module "
              "(a fresh instance of the original architecture)", file=sys.stderr)
        return 1
    try:
        model = load(args.model_file, fresh)
    except (OSError, ValueError) as e:
        print(f"sparseprune: {e}", file=sys.stderr)
        return 1
    model.eval()
    try:
        x = torch.randn(*shape)
    except (RuntimeError, MemoryError, TypeError, OverflowError) as e:  # too large (TypeError: > int64)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        gib = math.prod(shape) * 4 / 2 ** 30
        print(f"sparseprune: cannot allocate a float32 input of shape {shape} ({gib:.3g} GiB): {why}", file=sys.stderr)
        return 1
    try:
        s = measure(model, x, time_budget=args.time_budget, num_threads=args.threads)
    except (ValueError, TypeError, RuntimeError, MemoryError) as e:
        print(f"sparseprune: the model does not run on an input of shape {shape}: {e}", file=sys.stderr)
        return 1
    _print_summary(s, args.json)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if argv[:1] == ["demo"]:  # everything after it is the demo's (argparse.REMAINDER would reject "--quick")
        args = argparse.Namespace(cmd="demo", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.cmd == "info":
        from .info import main as info_main
        info_main()
        return 0
    if args.cmd == "demo":
        if importlib.util.find_spec("sparseprune.demo") is None:
            print("sparseprune: the demo is not part of this build (module sparseprune.demo is missing)",
                  file=sys.stderr)
            return 1
        import inspect

        from . import demo
        takes_argv = bool(inspect.signature(demo.main).parameters)
        rc = demo.main(args.args) if takes_argv else demo.main()
        return rc if isinstance(rc, int) else 0
    if args.cmd == "report":
        return _report(args)
    if args.cmd == "bench":
        return _bench(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
