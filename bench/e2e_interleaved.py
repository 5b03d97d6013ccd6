"""End-to-end models timed interleaved: dense and each converted variant take turns, best single call of
many rounds (the most stable estimate on a shared or drifting machine; pytest-benchmark times each
variant on its own). Variants are built exactly as in ``bench_models.py``.

    python bench/e2e_interleaved.py [--rounds 15] [--models bert_base,resnet50,minilm_l6,gpt2]
    python bench/e2e_interleaved.py --models bert_base --variants bsr16_0.9_int8 --unfuse residual

``--unfuse residual`` adds, after each converted variant, the same converted model (a deep copy) with the
blocks and layers ``convert(residual=True)`` fused put back to their class's own forward: an A/B of that
rewrite in one process. ``--unfuse attention`` keeps the flat transformer layers but has them call the
model's own attention function instead of sparseprune's kernel.
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models as bm  # noqa: E402
from bench_conv import interleaved_min  # noqa: E402
from conftest import steady_malloc  # noqa: E402
from sparseprune.convert.cache import cpu_model  # noqa: E402

VARIANTS = {
    "bert_base": ["bsr16_0.9", "bsr16_0.8", "bsr16_0.9_int8", "dense_int8dyn"],
    "minilm_l6": ["bsr16_0.8", "bsr16_0.9", "bsr16_0.8_int8"],
    "resnet50": ["bsr16_0.8", "bsr16_0.8_int8", "dense_cl", "bsr16_0.8_int8_cl", "channels50"],
    # torch's dynamic quantization leaves GPT-2's Conv1D layers alone: no dense int8 row to compare with
    "gpt2": ["bsr16_0.9", "bsr16_0.8", "bsr16_0.9_int8"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(VARIANTS))
    ap.add_argument("--variants", default=None, help="comma-separated variants (default: each model's list)")
    ap.add_argument("--unfuse", choices=["residual", "attention"], default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    print(f"{cpu_model()}, {a.threads} threads, torch {torch.__version__}; best of {a.rounds} interleaved rounds; "
          f"{steady_malloc()}\n")
    print("| model | variant | ms | ×dense |\n|---|---|---:|---:|")
    for name in a.models.split(","):
        kinds = ["dense"] + (a.variants.split(",") if a.variants else VARIANTS[name])
        built = [bm.variant(name, k) for k in kinds]
        if a.unfuse:
            kinds, built = _with_unfused(kinds, built, a.unfuse)
        fns = [(lambda m=m, args=args: m(*args)) for m, args, _, _ in built]
        with torch.no_grad():
            ts = interleaved_min(fns, rounds=a.rounds, warmup=2, inner=1)
        for k, t in zip(kinds, ts):
            print(f"| {name} | {k} | {t * 1e3:.1f} | {ts[0] / t:.2f}x |", flush=True)


def _with_unfused(kinds, built, what):
    """Each converted variant followed by a deep copy whose fused residual blocks run their class's forward
    (``what="residual"``) or whose flat transformer layers call the model's attention (``"attention"``)."""
    import copy
    from sparseprune.convert.residual import _ATTN, KIND_ATTR
    out_k, out_b = [], []
    for k, b in zip(kinds, built):
        out_k.append(k)
        out_b.append(b)
        m = b[0]
        if any(KIND_ATTR in s.__dict__ for s in m.modules()):
            twin = copy.deepcopy(m)
            for s in twin.modules():
                if KIND_ATTR in s.__dict__:
                    if what == "residual":
                        s.__dict__.pop("forward", None)
                    elif _ATTN in s.__dict__:
                        s.__dict__[_ATTN] = False
            out_k.append(f"{k} without {what}")
            out_b.append((twin,) + tuple(b[1:]))
    return out_k, out_b


if __name__ == "__main__":
    main()
