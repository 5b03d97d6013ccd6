"""Find register spills in the kernels' hot loops: for every function of the given object files, the innermost
loops (a backward jump, fewer than ``--max-len`` instructions, at least ``--min-fma`` FMA / ``vpdpbusd`` /
``vdpbf16ps``) that read or write vector registers through the stack. A spilled accumulator costs a load, an
FMA and a store per iteration and a store-to-load latency chain; GCC does it silently when something else
(an inlined epilogue's calls or constants) competes for the registers.

    python bench/spills.py build/editable/CMakeFiles/sparseprune_cpu.dir/csrc/cpu/conv_avx512.cpp.o [...]
    python bench/spills.py --show 'q_rows<8' <object>     # print the offending loops of matching functions

Needs binutils (``nm``, ``objdump``, ``c++filt``). Epilogue loops (GELU / erf polynomials with constants on the
stack) show up too when they are short; read the loop before acting on a line.
"""
import argparse
import re
import subprocess

FMA = re.compile(r"\b(vfn?m(add|sub)\d+[ps][sd]|vpdpbusds?|vdpbf16ps)\b")
STACK = re.compile(r"\(%r[bs]p\)")
JUMP = re.compile(r"\tj\w+\s+([0-9a-f]+) <")
ADDR = re.compile(r"\s*([0-9a-f]+):")


def functions(obj):
    out = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if re.search(r" [tTW] ", line)]


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def hot_loops(obj, sym, min_fma, max_len):
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "--disassemble=" + sym, obj],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    index = {}
    for i, line in enumerate(text):
        m = ADDR.match(line)
        if m:
            index[int(m.group(1), 16)] = i
    back = []  # (first line, jump line) of every backward jump: a loop
    for i, line in enumerate(text):
        j, a = JUMP.search(line), ADDR.match(line)
        if j and a:
            target = int(j.group(1), 16)
            if target < int(a.group(1), 16) and target in index:
                back.append((index[target], i))
    for first, last in back:
        if any(first <= f and l < last for f, l in back if (f, l) != (first, last)):
            continue  # not innermost (an outer loop also holds the tile's stores to its stack buffer)
        body = text[first:last + 1]
        if len(body) > max_len or sum(bool(FMA.search(b)) for b in body) < min_fma:
            continue
        spills = [b for b in body if STACK.search(b) and "mm" in b]
        yield body, spills


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("objects", nargs="+")
    ap.add_argument("--min-fma", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=150)
    ap.add_argument("--show", default=None, help="print the spilling loops of functions whose name contains this")
    a = ap.parse_args(argv)
    total = 0
    for obj in a.objects:
        syms = functions(obj)
        for sym, name in zip(syms, demangle(syms)):
            loops = list(hot_loops(obj, sym, a.min_fma, a.max_len))
            bad = [(body, sp) for body, sp in loops if len(sp) > 2]
            if not bad:
                continue
            total += len(bad)
            worst = max(len(sp) for _, sp in bad)
            print(f"{len(bad):3d} of {len(loops):3d} hot loops spill (up to {worst} stack operands): {name[:160]}")
            if a.show and a.show in name:
                for body, _ in bad:
                    print("\n".join(body) + "\n")
    print(f"{total} spilling hot loops")


if __name__ == "__main__":
    main()
