"""Render a pytest-benchmark JSON file as Markdown tables (speedup and efficiency against the dense
entry of each group) and PNG plots (speedup vs sparsity per implementation, with the ideal 1/(1-s)).

    pytest bench/ --benchmark-only --benchmark-json=bench/results/run.json
    python bench/report.py bench/results/run.json [--plots bench/results] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import re
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(path):
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data["benchmarks"]:
        ex = dict(b.get("extra_info", {}))
        ex["group"] = b.get("group") or ""
        ex["name"] = b["name"]
        ex["median"] = b["stats"]["median"]
        rows.append(ex)
    # recompute ratios from the JSON itself (the dense entry of the same group, same run)
    dense = {r["group"]: r["median"] for r in rows if _is_dense(r)}
    for r in rows:
        if r["group"] in dense:
            r["speedup"] = dense[r["group"]] / r["median"]
            r["eta"] = r["speedup"] * (r.get("density") or 1.0)
    return data, rows


def _is_dense(r):
    if "impl" in r:
        return r["impl"] == "dense"
    if "format" in r and "which" not in r["name"]:
        return r["format"] == "dense"
    return "dense" in r["name"].split("[")[-1] or r["name"].endswith("_dense")


def _label(r):
    if r.get("impl"):
        return r["impl"]
    name = r["name"]
    if "[" in name:
        return name.split("[", 1)[1].rstrip("]")
    return name.replace("test_", "")


def machine_cpu(data, rows) -> str:
    """The CPU a run was measured on, as ``cpu_model()`` names it (brand, family, model). Runs recorded
    before the family / model were part of the name get them from pytest-benchmark's machine_info."""
    ci = data.get("machine_info", {}).get("cpu", {})
    cpu = (rows[0].get("cpu") if rows else None) or ci.get("brand_raw", "?")
    if "(family" not in cpu and ci.get("family") is not None and ci.get("model") is not None:
        cpu = f"{cpu} (family {ci['family']} model {ci['model']})"
    return cpu


def machine_line(data, rows):
    mi = data.get("machine_info", {})
    cpu = machine_cpu(data, rows)
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    return (f"CPU: {cpu}; threads: {', '.join(map(str, threads))}; "
            f"python {mi.get('python_version', '?')}; {data.get('datetime', '')[:19]}")


def spmm_table(rows):
    """One line per (shape, sparsity): time of dense, then speedup (eta) of every other impl."""
    cases = defaultdict(dict)
    for r in rows:
        if r.get("shape") and r["group"].startswith(r["shape"]):
            cases[(r["shape"], r.get("n"), r.get("k"), r.get("m"), r.get("sparsity"))][r["impl"]] = r
    impls = ["torch_csr", "scipy_csr", "ours_csr", "ours_bsr16"]
    out = ["| shape | N×K→M | sparsity | dense ms | " + " | ".join(f"{i} ×dense (η)" for i in impls) + " |",
           "|---|---|---|---|" + "---|" * len(impls)]
    for (shape, n, k, m, s), d in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][4])):
        if "dense" not in d:
            continue
        cells = []
        for i in impls:
            r = d.get(i)
            cells.append(f"{r['speedup']:.2f}× ({r['eta']:.2f})" if r and "speedup" in r else "–")
        out.append(f"| {shape} | {n}×{k}→{m} | {s:.2f} | {d['dense']['median'] * 1e3:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def generic_table(rows, prefix):
    sel = [r for r in rows if r["group"].startswith(prefix)]
    if not sel:
        return ""
    acc = any("accuracy_cosine" in r for r in sel)
    out = ["| group | case | format | block | density | ms | ×dense | η |" + (" cosine vs dense |" if acc else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if acc else "")]
    for r in sorted(sel, key=lambda r: (r["group"], not _is_dense(r), r["median"])):
        block = r.get("block")
        if isinstance(block, (list, tuple)):
            block = "x".join(map(str, block))
        dens = r.get("density")
        out.append(f"| {r['group']} | {_label(r)} | {r.get('format', '')} | {block or ''} | "
                   f"{'' if dens is None else f'{dens:.3f}'} | {r['median'] * 1e3:.3f} | "
                   f"{r.get('speedup', float('nan')):.2f} | {r.get('eta', float('nan')):.2f} |"
                   + ((f" {r['accuracy_cosine']:.4f} |" if "accuracy_cosine" in r else " – |") if acc else ""))
    return "\n".join(out)


def quant_table(rows):
    """Quantized BSR (bench_quant): each implementation's speedup over every dense alternative."""
    groups = defaultdict(dict)
    for r in rows:
        if r["group"].startswith("quant "):
            groups[r["group"]][r.get("impl")] = r["median"]
    if not groups:
        return ""
    bases = [("dense", "×dense fp32"), ("dense_bf16", "×dense bf16"), ("dense_int8", "×dense int8 (torch dynamic)"),
             ("ours_bsr_fp32", "×our fp32 BSR")]
    out = ["| group | impl | µs | " + " | ".join(b[1] for b in bases) + " |", "|---|---|---|" + "---|" * len(bases)]
    for g in sorted(groups):
        meds = groups[g]
        for impl, med in sorted(meds.items(), key=lambda kv: -kv[1]):
            cells = [f"{meds[b] / med:.2f}" if b in meds else "" for b, _ in bases]
            out.append(f"| {g[6:]} | {impl} | {med * 1e6:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def machine_slug(rows) -> str:
    cpu = (rows[0].get("cpu") if rows else None) or "unknown cpu"
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:60]


def plots(rows, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    by_shape = defaultdict(list)
    for r in rows:
        if r.get("shape") and r.get("impl") != "dense" and "speedup" in r and r["group"].startswith(r["shape"]):
            by_shape[r["shape"]].append(r)
    written = []
    if not by_shape:
        return written
    names = sorted(by_shape)
    cols = min(4, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, names):
        rs = by_shape[shape]
        ss = sorted({r["sparsity"] for r in rs})
        ax.plot(ss, [1 / (1 - s) for s in ss], "k--", lw=1, label="ideal 1/(1-s)")
        for impl in ["ours_bsr16", "ours_csr", "torch_csr", "scipy_csr"]:
            pts = sorted((r["sparsity"], r["speedup"]) for r in rs if r["impl"] == impl)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        r0 = rs[0]
        ax.set_title(f"{shape} {r0.get('n')}×{r0.get('k')}→{r0.get('m')}", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup vs dense")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    p = outdir / f"spmm_speedup-{machine_slug(rows)}.png"
    fig.savefig(p, dpi=110)
    written.append(p)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--plots", default=None, help="folder for PNG plots")
    ap.add_argument("--markdown", default=None, help="write the Markdown here too")
    ap.add_argument("--readme", default=None,
                    help="replace the text between <!-- RESULTS --> and <!-- /RESULTS --> in this file")
    a = ap.parse_args(argv)
    data, rows = load(a.json)
    parts = [f"_{machine_line(data, rows)}_", "", "### Sparse matmul (ratio to dense `F.linear`, same process)", "",
             spmm_table(rows)]
    qt = quant_table(rows)
    if qt:
        parts += ["", "### Sparse x quantized: int8 / bf16 BSR 16x16 (bench_quant)", "", qt]
    for prefix, title in [("blocks ", "Block shapes (BERT FFN up, 128 rows)"),
                          ("conv", "Convolution layers (ResNet-50 shapes, batch 1)"),
                          ("resnet50 batch", "ResNet-50, every conv but the stem at 80% 16x16 blocks (SparseConv2d)"),
                          ("model", "End-to-end models: dense vs channel-pruned vs block-sparse + convert()"),
                          ("mixed", "convert(): mixed model (2 layers 95% blocks, 90% unstructured, 10%)"),
                          ("unpruned", "convert(): unpruned model (must not be slower)"),
                          ("channels-tp", "Channel pruning side by side with Torch-Pruning (bench_channels_tp)")]:
        t = generic_table(rows, prefix)
        if t:
            parts += ["", f"### {title}", "", t]
    md = "\n".join(parts) + "\n"
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)
    pngs = plots(rows, a.plots) if a.plots else []
    for p in pngs:
        print(f"plot: {p}")
    if a.readme:
        readme = Path(a.readme)
        imgs = "".join(f"\n![speedup vs sparsity]({p.relative_to(readme.parent.resolve()) if p.is_absolute() else p})\n"
                       for p in pngs)
        body = (f"\n_Produced by `python bench/report.py {a.json} --readme {a.readme}` from a real run._\n\n"
                + md + imgs)
        readme.write_text(replace_machine_section(readme.read_text(), machine_cpu(data, rows), body))


_SECTION = re.compile(r'<!-- RESULTS(?: cpu="(?P<cpu>[^"]*)")? -->(?P<body>.*?)<!-- /RESULTS -->', re.S)


def replace_machine_section(text: str, cpu: str, body: str) -> str:
    """One results section per CPU model: this machine's is replaced (or added after the others);
    the other machines' sections stay as they were measured."""
    cpu = cpu.replace('"', "'")
    found = list(_SECTION.finditer(text))
    if not found:
        raise SystemExit('README: no <!-- RESULTS --> marker')
    new = f'<!-- RESULTS cpu="{cpu}" -->{body}<!-- /RESULTS -->'
    for m in found:
        owner = m.group("cpu")
        if owner is None:  # a section from before per-machine sections: its CPU line says whose it is
            line = re.search(r"CPU: ([^;]*);", m.group("body"))
            owner = line.group(1).strip() if line else ""
        if owner == cpu:
            return text[:m.start()] + new + text[m.end():]
    last = found[-1]
    return text[:last.end()] + "\n\n" + new + text[last.end():]

if __name__ == "__main__":
    main()
