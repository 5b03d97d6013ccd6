"""SPARSEPRUNE_ISA is read once, at import: each value runs in its own interpreter (all at once, to stay fast)."""
import json
import os
import subprocess
import sys

import sparseprune as sp
from sparseprune import ops, quant

CHILD = """
import json, warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import sparseprune.ops as o
print(json.dumps([o.active_isa(), [f"{x.category.__name__}: {x.message}" for x in w if "SPARSEPRUNE_ISA" in str(x.message)]]))
"""


def _import_with(*values):
    """{value: [active path, SPARSEPRUNE_ISA warnings]}, from a fresh import per value."""
    base = {k: v for k, v in os.environ.items() if k != "SPARSEPRUNE_ISA"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(sp.__path__[0]), base.get("PYTHONPATH")]))
    procs = {v: subprocess.Popen([sys.executable, "-c", CHILD], env=dict(base, SPARSEPRUNE_ISA=v),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in values}
    out = {}
    for v, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"import with SPARSEPRUNE_ISA={v!r} failed:\n{stderr}"
        out[v] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_isa_env_any_case_and_unknown_or_unsupported_values_warn():
    fp32 = [p["isa"] for p in ops.isa_paths()]
    best, lower = fp32[-1], fp32[-2] if len(fp32) > 1 else fp32[0]  # best: the default (ukernels.inc order)
    rows = ops.isa_paths(supported_only=False) + quant.qisa_paths(supported_only=False)
    levels = list(dict.fromkeys(p["isa"] for p in rows))
    lacking = [lv for lv in levels if not any(p["supported"] for p in rows if p["isa"] == lv)]
    got = _import_with(lower.upper(), "avx-2", *lacking[:1])  # two interpreters here (3 s each), three at most

    assert got[lower.upper()] == [lower, []]  # names match in any case
    active, warns = got["avx-2"]  # unknown: the default path, and a warning naming the valid values
    assert active == best and len(warns) == 1
    assert warns[0].startswith("RuntimeWarning: SPARSEPRUNE_ISA='avx-2' is not an ISA level")
    assert all(lv in warns[0] for lv in levels) and f"running the best path for this CPU, {best!r}" in warns[0]
    for lv in lacking[:1]:  # a level this CPU cannot run: the best one below it, and a warning saying so
        active, warns = got[lv]
        assert active in fp32 and len(warns) == 1
        assert f"cannot run the {lv!r} path" in warns[0] and f"fp32 path {active!r}" in warns[0]
