"""Issue #16: hostile files and the other defects found by the reliability review.

Hostile files are valid sparseprune files rewritten by :mod:`hostile` (the integrity hash recomputed),
so only the loader's validation stands between their contents and the kernels (DESIGN.md
conventions 11 and 12). Every case that could crash the interpreter runs in a separate process
(:func:`hostile.run_cases`, many cases per process): a segfault fails that case, not the test run.
"""
import collections.abc
import os
import random
import re
import stat
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hostile
import sparseprune as sp
from helpers import block_sparse_weight
from test_convert_models import MLP, make_convbn

pytestmark = pytest.mark.usefixtures("one_thread")

# -- code shared by the isolated cases (runs in the child process) -----------------------------------
CHILD = r'''
import tempfile, time
from collections import OrderedDict
from helpers import block_sparse_weight
from test_convert_models import MLP, ConvBN, make_convbn

def sparse_linear(i, o, fmt="csr", block=None, sparsity=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(o, i, block or (1, 1), sparsity, g))
    return sp.SparseLinear.from_dense(lin, format=fmt, block_size=block if fmt == "bsr" else None)

def exact_nnz_conv(cin, cout, nnz, fmt="csr", block=None, seed=0, **kw):
    """A conv whose (Cout, Cin/g*kh*kw) weight has exactly nnz non-zeros."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, **kw)
    n = conv.weight.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[:nnz]] = True
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g).reshape(-1).where(keep, torch.zeros(())).reshape(conv.weight.shape))
    return sp.SparseConv2d.from_dense(conv, format=fmt, block_size=block if fmt == "bsr" else None)

def save(model, name="m.sp"):
    path = os.path.join(CASE_DIR, name)
    sp.save(model, path)
    return path

def evil(path, edit, name="evil.sp"):
    dst = os.path.join(CASE_DIR, name)
    hostile.rewrite(path, dst, edit)
    return dst

def check_valid(model):
    """Every sparse module's arrays pass the validation gate (after a load that returned)."""
    for name, m in model.named_modules():
        v = getattr(m, "validate", None)
        if callable(v):
            v()
        elif isinstance(m, sp.SparseLinear) and m.format != "dense":
            m.packed().validate()

def check_meaning(model, x):
    """A loaded model computes what its own (validated) arrays mean: the densified model's output."""
    check_valid(model)
    ref = sp.densify(model)(x)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4, equal_nan=True)

def refuse_or_correct(path, arch, x):
    """Defect class 'ValueError at load, or a correct model'."""
    try:
        m = sp.load(path, arch())
    except (ValueError, TypeError) as e:
        return "refused: %s: %s" % (type(e).__name__, e)
    check_meaning(m, x)
    return "loaded and correct"

def must_refuse(path, arch):
    """load must raise (the test checks for ValueError / TypeError); returning is the defect."""
    sp.load(path, arch())
    return "LOADED WITHOUT ERROR (expected ValueError/TypeError at load)"

def cli(*argv):
    """The sparseprune command in this process: (exit code, stdout, stderr). An exception escaping
    main() is what the user would see as a traceback: it propagates (and fails the case)."""
    import contextlib, io
    from sparseprune.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.write(e.code + "\n")
    return rc, out.getvalue(), err.getvalue()

def seq_linear_arch():
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 64))

def seq_linear_model():
    return nn.Sequential(sparse_linear(32, 48, "csr", seed=1), nn.ReLU(), sparse_linear(48, 64, "csr", sparsity=0.5, seed=2))

def seq_conv_arch():
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))

def seq_conv_model(fmt="csr", block=None):
    return nn.Sequential(exact_nnz_conv(4, 8, 100, fmt, block, seed=1), exact_nnz_conv(8, 8, 100, fmt, block, seed=2))
'''

CASES = {}


def case(name, code):
    CASES[name] = code
    return name


# -- 1. aliases can overwrite a validated tensor -----------------------------------------------------
ALIAS_CASES = [
    case("alias_linear_col_idx", """
        p = save(seq_linear_model())
        bad = evil(p, lambda t, s, m: s.setdefault("aliases", {}).update({"0.col_idx": "2.col_idx"}))
        result = refuse_or_correct(bad, seq_linear_arch, torch.randn(5, 32))
    """),
    case("alias_linear_row_ptr_values", """
        p = save(seq_linear_model())
        def edit(t, s, m):
            s.setdefault("aliases", {}).update({"0.row_ptr": "2.row_ptr", "0.values": "2.values"})
        result = refuse_or_correct(evil(p, edit), seq_linear_arch, torch.randn(5, 32))
    """),
    case("alias_conv_col_idx_same_nnz", """
        # same nnz, so a same-shape copy is possible: layer 1's column indices (up to 71) in layer 0 (36 columns)
        p = save(seq_conv_model())
        bad = evil(p, lambda t, s, m: s.setdefault("aliases", {}).update({"0.col_idx": "1.col_idx"}))
        result = refuse_or_correct(bad, seq_conv_arch, torch.randn(2, 4, 6, 6))
    """),
    case("alias_conv_row_ptr", """
        p = save(seq_conv_model())
        bad = evil(p, lambda t, s, m: s.setdefault("aliases", {}).update({"1.row_ptr": "0.row_ptr", "1.col_idx": "0.col_idx"}))
        result = refuse_or_correct(bad, seq_conv_arch, torch.randn(2, 4, 6, 6))
    """),
    case("alias_to_missing_key", """
        p = save(seq_linear_model())
        bad = evil(p, lambda t, s, m: s.setdefault("aliases", {}).update({"0.col_idx": "nowhere.col_idx"}))
        result = refuse_or_correct(bad, seq_linear_arch, torch.randn(5, 32))
    """),
    case("alias_replaces_stored_tensor_key", """
        # an alias whose name is also a stored tensor: which one wins must not bypass validation
        p = save(seq_conv_model())
        bad = evil(p, lambda t, s, m: s.setdefault("aliases", {}).update({"0.values": "1.values", "0.col_idx": "1.col_idx"}))
        result = refuse_or_correct(bad, seq_conv_arch, torch.randn(2, 4, 6, 6))
    """),
]


@pytest.mark.parametrize("name", ALIAS_CASES)
def test_aliases_cannot_bypass_validation(outcomes, name):
    """Defect 1: ValueError at load, or a model that computes what its (valid) arrays mean."""
    o = outcomes[name]
    assert o.status == "ok", o.describe()


# -- 2. CSR layer with a block size ------------------------------------------------------------------
BLOCK_CASES = [
    case("csr_block_1x2pow30", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"]["attrs"].update(block_size=[1, 2**30])),
                             seq_linear_arch)
    """),
    case("csr_block_4x4", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"]["attrs"].update(block_size=[4, 4])),
                             seq_linear_arch)
    """),
    case("csr_block_null_format_bsr", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["2"]["attrs"].update(format="bsr", block_size=None)),
                             seq_linear_arch)
    """),
    case("bsr_block_changed", """
        lin = nn.Sequential(sparse_linear(32, 48, "bsr", (4, 4), seed=3))
        p = save(lin)
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"]["attrs"].update(block_size=[2, 8])),
                             lambda: nn.Sequential(nn.Linear(32, 48)))
    """),
]


@pytest.mark.parametrize("name", BLOCK_CASES)
def test_block_size_inconsistent_with_format_is_refused(outcomes, name):
    """Defect 2: a CSR layer with a block size other than 1x1 (segfault / 1e17 values before)."""
    o = outcomes[name]
    assert o.raised("ValueError", "TypeError"), o.describe()


# -- 3./4. load_state_dict validates first, adopts after ---------------------------------------------
_STATE_DICT_CASE = """
    layer = {build}
    x = {x}
    y0 = layer(x).clone()
    before = {{k: v.clone() for k, v in layer.state_dict().items()}}
    sd = {{k: v.clone() for k, v in layer.state_dict().items()}}
    {edit}
    try:
        layer.load_state_dict(sd)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("load_state_dict accepted invalid packed arrays")
    after = layer.state_dict()
    assert set(after) == set(before), (sorted(before), sorted(after))
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), \\
            f"{{k}} changed although load_state_dict refused the state_dict"
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=0)
    result = "refused, unchanged: " + msg[:200]
"""
_I16 = "min(30000, torch.iinfo(sd['col_idx'].dtype).max)"
_EDITS = {
    "row_ptr_past_nnz": "sd['row_ptr'][-1] += 100",
    "row_ptr_times_5": "sd['row_ptr'] = sd['row_ptr'] * 5",
    "row_ptr_decreasing": "sd['row_ptr'][1] = sd['row_ptr'][-1]; sd['row_ptr'][2] = 0",
    "col_idx_out_of_range": f"sd['col_idx'][0] = {_I16}",
    "col_idx_negative": "sd['col_idx'][-1] = -5",
    "values_truncated": "sd['values'] = sd['values'][:1].clone()",
    "col_idx_wrong_dtype": "sd['col_idx'] = sd['col_idx'].double()",
}
CONV_SD_CASES, LINEAR_SD_CASES = [], []
for _k in ("row_ptr_past_nnz", "row_ptr_decreasing", "col_idx_out_of_range", "col_idx_negative", "values_truncated"):
    for _fmt, _blk in (("csr", None), ("bsr", (4, 1))):
        CONV_SD_CASES.append(case(f"conv_sd_{_fmt}_{_k}", _STATE_DICT_CASE.format(
            build=f"exact_nnz_conv(4, 8, 120, {_fmt!r}, {_blk!r})", x="torch.randn(2, 4, 7, 7)", edit=_EDITS[_k])))
for _k in _EDITS:
    for _fmt, _blk in (("csr", None), ("bsr", (4, 4))):
        LINEAR_SD_CASES.append(case(f"linear_sd_{_fmt}_{_k}", _STATE_DICT_CASE.format(
            build=f"sparse_linear(20, 24, {_fmt!r}, {_blk!r}, sparsity=0.5)", x="torch.randn(3, 20)",
            edit=_EDITS[_k])))


@pytest.mark.parametrize("name", CONV_SD_CASES)
def test_sparse_conv_load_state_dict_validates(outcomes, name):
    """Defect 3: SparseConv2d.load_state_dict validated nothing. ValueError, module unchanged."""
    o = outcomes[name]
    assert o.status == "ok", o.describe()


@pytest.mark.parametrize("name", LINEAR_SD_CASES)
def test_sparse_linear_load_state_dict_validates_before_adopting(outcomes, name):
    """Defect 4: SparseLinear.load_state_dict adopted the arrays it then refused."""
    o = outcomes[name]
    assert o.status == "ok", o.describe()


# -- 9. hostile structure records: clean errors ------------------------------------------------------
def _conv_attr(attr, value, idx="0"):
    return f"""
        p = save(seq_conv_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["{idx}"]["attrs"].update({{{attr!r}: {value}}})),
                             seq_conv_arch)
    """


STRUCTURE_CASES = [
    case("deep_nested_json_extra_key", """
        p = save(seq_linear_model())
        depth = 200000
        def edit(t, s, m):
            raw = json.dumps(s)
            return raw[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
        result = must_refuse(evil(p, edit), seq_linear_arch)
    """),
    case("deep_nested_json_in_report", """
        p = save(seq_linear_model())
        depth = 200000
        def edit(t, s, m):
            s["report"] = None
            raw = json.dumps(s)
            return raw.replace('"report": null', '"report": ' + "{\\"a\\": " * depth + "1" + "}" * depth)
        result = must_refuse(evil(p, edit), seq_linear_arch)
    """),
    case("deep_nested_json_safetensors_header", """
        # nesting in the safetensors header itself (outside the structure string)
        p = save(seq_linear_model())
        bad = os.path.join(CASE_DIR, "evil.sp")
        hostile.rewrite_header(p, bad, lambda text: '{"nest":' + "[" * 200000 + "]" * 200000 + "," + text[1:])
        result = must_refuse(bad, seq_linear_arch)
    """),
    case("deep_nested_json_in_metadata_value", """
        p = save(seq_linear_model())
        bad = os.path.join(CASE_DIR, "evil.sp")
        hostile.rewrite_header(p, bad, lambda text: text.replace('"__metadata__":{', '"__metadata__":{"nest":' + "{\\"a\\":" * 100000 + "1" + "}" * 100000 + ",", 1))
        result = must_refuse(bad, seq_linear_arch)
    """),
    case("linear_bias_int_dtype", """
        p = save(seq_linear_model())
        def edit(t, s, m):
            t["0.bias"] = t["0.bias"].to(torch.int32)
        result = must_refuse(evil(p, edit), seq_linear_arch)
    """),
    case("conv_bias_float64", """
        p = save(seq_conv_model())
        def edit(t, s, m):
            t["1.bias"] = t["1.bias"].double()
        result = must_refuse(evil(p, edit), seq_conv_arch)
    """),
    case("folded_bn_bias_int_dtype", """
        # convert folds bn1 into conv1 (bias=False before): the file records a new conv1.bias, which load
        # makes room for; an integer dtype there must be refused, not crash nn.Parameter with RuntimeError
        p = save(sp.convert(make_convbn()))
        def edit(t, s, m):
            t["conv1.bias"] = t["conv1.bias"].to(torch.int64)
        result = must_refuse(evil(p, edit), ConvBN)
    """),
    case("modules_attrs_not_a_dict", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"].update(attrs=[1, 2])), seq_linear_arch)
    """),
    case("modules_entry_is_a_string", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"].update({"0": "SparseLinear"})), seq_linear_arch)
    """),
    case("modules_is_a_list", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s.update(modules=[1, 2])), seq_linear_arch)
    """),
    case("conv_groups_0", _conv_attr("groups", 0)),
    case("conv_stride_0", _conv_attr("stride", [0, 1])),
    case("conv_dilation_0", _conv_attr("dilation", [1, 0])),
    case("conv_pad4_inconsistent", _conv_attr("_pad4", [50, 50, 50, 50])),
    case("conv_pad4_negative", _conv_attr("_pad4", [-3, -3, -3, -3])),
    case("conv_num_threads_100000", _conv_attr("num_threads", 100000)),
    case("linear_num_threads_100000", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"]["attrs"].update(num_threads=100000)),
                             seq_linear_arch)
    """),
    case("linear_num_threads_negative", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"]["attrs"].update(num_threads=-7)),
                             seq_linear_arch)
    """),
    case("linear_in_features_float", """
        p = save(seq_linear_model())
        result = must_refuse(evil(p, lambda t, s, m: s["modules"]["0"]["attrs"].update(in_features=32.5)),
                             seq_linear_arch)
    """),
]


@pytest.mark.parametrize("name", STRUCTURE_CASES)
def test_hostile_structure_is_a_clean_error_at_load(outcomes, name):
    """Defect 9: RecursionError / ZeroDivisionError / absurd shapes / accepted nonsense before."""
    o = outcomes[name]
    assert o.raised("ValueError", "TypeError"), o.describe()


MALFORMED_REPORT_CASES = [
    case("report_rows_not_dicts", """
        p = save(seq_linear_model())
        bad = evil(p, lambda t, s, m: s.update(report={"layers": [5, "x", None]}))
        try:
            loaded = sp.load(bad, seq_linear_arch())
        except (ValueError, TypeError) as e:
            result = "refused at load: " + str(e)[:100]
        else:
            str(sp.summary(loaded, print_fn=None))  # printable, or refused at load: never a traceback later
            result = "loaded, summary printable"
    """),
    case("report_row_fields_wrong_types", """
        p = save(seq_linear_model())
        row = {"name": "0", "type": "Linear", "shape": "big", "format": 3, "block": 7, "density": "dense",
               "dense_ms": "fast", "sparse_ms": [], "speedup": {}, "candidates": 5, "reason": None}
        bad = evil(p, lambda t, s, m: s.update(report={"layers": [row], "end_to_end_ms": {"dense": "x"}}))
        try:
            loaded = sp.load(bad, seq_linear_arch())
        except (ValueError, TypeError) as e:
            result = "refused at load: " + str(e)[:100]
        else:
            str(sp.summary(loaded, print_fn=None))
            result = "loaded, summary printable"
    """),
    case("report_is_a_list", """
        p = save(seq_linear_model())
        bad = evil(p, lambda t, s, m: s.update(report=[1, 2, 3]))
        try:
            loaded = sp.load(bad, seq_linear_arch())
        except (ValueError, TypeError) as e:
            result = "refused at load: " + str(e)[:100]
        else:
            str(sp.summary(loaded, print_fn=None))
            result = "loaded, summary printable"
    """),
]


@pytest.mark.parametrize("name", MALFORMED_REPORT_CASES)
def test_malformed_report_is_refused_or_harmless(outcomes, name):
    """Defect 9: malformed report rows gave TypeError tracebacks in summary()."""
    o = outcomes[name]
    assert o.status == "ok", o.describe()


def _cli_case(setup, argv):
    return f"""
        {setup}
        rc, out, err = cli(*{argv})
        assert rc != 0, ("exit code 0 for a bad file / argument", out[-500:], err[-500:])
        assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        # one message line (argparse may print its usage lines before its one "error:" line)
        msgs = [ln for ln in lines if not ln.startswith(("usage:", " "))]
        assert len(msgs) == 1, ("expected a one-line message on stderr", err[-2000:])
        result = (rc, lines[0][:200])
    """


CLI_CASES = [
    case("cli_report_deep_nested_json", _cli_case("""
        p = save(seq_linear_model())
        def edit(t, s, m):
            raw = json.dumps(s)
            return raw[:-1] + ', "extra": ' + "[" * 200000 + "]" * 200000 + "}"
        bad = evil(p, edit)""", '("report", bad)')),
    case("cli_report_deep_nested_safetensors_header", _cli_case("""
        p = save(seq_linear_model())
        bad = os.path.join(CASE_DIR, "evil.sp")
        hostile.rewrite_header(p, bad, lambda text: '{"nest":' + "[" * 200000 + "]" * 200000 + "," + text[1:])""",
                                                                '("report", bad)')),
    case("cli_report_malformed_rows", _cli_case("""
        p = save(seq_linear_model())
        bad = evil(p, lambda t, s, m: s.update(report={"layers": [5, {"name": 3, "dense_ms": "x"}]}))""",
                                                 '("report", bad)')),
    case("cli_report_malformed_modules", _cli_case("""
        p = save(seq_linear_model())
        bad = evil(p, lambda t, s, m: s.update(report=None, modules={"0": {"class": "SparseLinear", "attrs": 5}}))""",
                                                   '("report", bad)')),
    case("cli_report_dev_zero", """
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        vm = int([ln for ln in open("/proc/self/status") if ln.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))  # reading /dev/zero must not eat the machine
        try:
            rc, out, err = cli("report", "/dev/zero")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (rc, err[-2000:])
        result = (rc, err.strip()[:200])
    """),
    case("cli_bench_threads_0", _cli_case("""
        p = save(seq_linear_model())
        sys.path.insert(0, CASE_DIR)
        open(os.path.join(CASE_DIR, "hostile_arch.py"), "w").write(
            "from torch import nn\\ndef build():\\n    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 64))\\n")
        """, '("bench", p, "--arch", "hostile_arch:build", "--input-shape", "4,32", "--threads", "0", "--time-budget", "0.2")')),
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_bad_input_is_one_line_no_traceback(outcomes, name):
    """Defect 9 (CLI): non-zero exit with a one-line message, no traceback."""
    o = outcomes[name]
    assert o.status == "ok", o.describe()


# -- 9. read_file / load on non-regular files --------------------------------------------------------
_LIMIT_MEMORY = """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int([ln for ln in open("/proc/self/status") if ln.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))  # a read of /dev/zero must not eat the machine
"""
SPECIAL_FILE_CASES = [
    case("load_dev_zero", _LIMIT_MEMORY + """
    t0 = time.perf_counter()
    try:
        sp.load("/dev/zero", seq_linear_arch())
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        assert time.perf_counter() - t0 < 10, "took %.1f s" % (time.perf_counter() - t0)
    """),
    case("read_file_dev_zero", _LIMIT_MEMORY + """
    from sparseprune.io import read_file
    try:
        read_file("/dev/zero")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    """),
    case("load_fifo", """
    fifo = os.path.join(CASE_DIR, "pipe.sp")
    os.mkfifo(fifo)
    sp.load(fifo, seq_linear_arch())  # must not block waiting for a writer
    """),
    case("load_directory", """
    sp.load(CASE_DIR, seq_linear_arch())
    """),
]


@pytest.mark.parametrize("name", SPECIAL_FILE_CASES)
def test_non_regular_file_is_refused_quickly(outcomes, name):
    """Defect 9: read_file read everything before checking sizes (/dev/zero exhausted memory)."""
    o = outcomes[name]
    if name == "load_directory":
        assert o.raised("ValueError", "IsADirectoryError"), o.describe()
    else:
        assert o.raised("ValueError"), o.describe()
    assert o.seconds < 10, o.describe()


# -- 10. save onto links and special files -----------------------------------------------------------
SAVE_TARGET_CASES = [
    case("save_onto_symlink_keeps_link", """
        target = os.path.join(CASE_DIR, "real.sp")
        open(target, "wb").write(b"old")
        link = os.path.join(CASE_DIR, "link.sp")
        os.symlink(target, link)
        model = seq_linear_model()
        sp.save(model, link)
        assert os.path.islink(link), "the symlink was replaced by a regular file"
        assert os.readlink(link) == target
        x = torch.randn(3, 32)
        torch.testing.assert_close(sp.load(target, seq_linear_arch())(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(sp.load(link, seq_linear_arch())(x), model(x), rtol=0, atol=0)
        result = "link kept, target updated"
    """),
    case("save_onto_relative_symlink_chain", """
        os.makedirs(os.path.join(CASE_DIR, "d"), exist_ok=True)
        target = os.path.join(CASE_DIR, "d", "real.sp")
        open(target, "wb").write(b"old")
        os.symlink(os.path.join("d", "real.sp"), os.path.join(CASE_DIR, "l1.sp"))
        os.symlink("l1.sp", os.path.join(CASE_DIR, "l2.sp"))
        model = seq_linear_model()
        sp.save(model, os.path.join(CASE_DIR, "l2.sp"))
        assert os.path.islink(os.path.join(CASE_DIR, "l2.sp")) and os.path.islink(os.path.join(CASE_DIR, "l1.sp"))
        assert stat.S_ISREG(os.lstat(target).st_mode)
        x = torch.randn(3, 32)
        torch.testing.assert_close(sp.load(target, seq_linear_arch())(x), model(x), rtol=0, atol=0)
        result = "links kept"
    """),
    case("save_onto_fifo_refused", """
        fifo = os.path.join(CASE_DIR, "pipe.sp")
        os.mkfifo(fifo)
        try:
            sp.save(seq_linear_model(), fifo)
        finally:
            assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
            assert sorted(os.listdir(CASE_DIR)) == ["pipe.sp"], os.listdir(CASE_DIR)
    """),
    case("save_onto_symlink_to_fifo_refused", """
        fifo = os.path.join(CASE_DIR, "pipe")
        os.mkfifo(fifo)
        os.symlink(fifo, os.path.join(CASE_DIR, "link.sp"))
        try:
            sp.save(seq_linear_model(), os.path.join(CASE_DIR, "link.sp"))
        finally:
            assert os.path.islink(os.path.join(CASE_DIR, "link.sp")) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    """),
    case("save_onto_char_device_refused", """
        # a private copy of /dev/null's device node (never the machine's own /dev files)
        node = os.path.join(CASE_DIR, "null.sp")
        try:
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except (PermissionError, OSError):
            raise ValueError("SKIP: cannot create a device node here")
        try:
            sp.save(seq_linear_model(), node)
        finally:
            assert stat.S_ISCHR(os.lstat(node).st_mode), "the device node was replaced by a regular file"
    """),
    case("save_onto_directory_refused", """
        d = os.path.join(CASE_DIR, "dir.sp")
        os.mkdir(d)
        try:
            sp.save(seq_linear_model(), d)
        finally:
            assert os.path.isdir(d) and os.listdir(d) == []
    """),
]


@pytest.mark.parametrize("name", SAVE_TARGET_CASES)
def test_save_target_kinds(outcomes, name):
    """Defect 10: save replaced a symlink by a regular file; non-regular targets must be refused."""
    o = outcomes[name]
    if name.endswith("_refused"):
        if o.raised("ValueError") and o.message.startswith("SKIP:"):
            pytest.skip(o.message)
        ok = ("ValueError", "IsADirectoryError") if "directory" in name else ("ValueError",)
        assert o.raised(*ok), o.describe()
    else:
        assert o.status == "ok", o.describe()


# -- 11. meta device, zero-size layers, wrong architecture -------------------------------------------
META_CASES = [
    case("sparse_linear_meta_forward", """
        for fmt, blk in (("csr", None), ("bsr", (4, 4)), ("dense", None)):
            layer = sparse_linear(32, 48, fmt, blk).to("meta")
            y = layer(torch.empty(5, 32, device="meta"))
            assert y.device.type == "meta" and tuple(y.shape) == (5, 48), (fmt, y.device, y.shape)
            y = layer(torch.empty(2, 3, 32, device="meta"))
            assert y.device.type == "meta" and tuple(y.shape) == (2, 3, 48), (fmt, y.device, y.shape)
        result = "ok"
    """),
    case("sparse_conv_meta_forward", """
        layer = exact_nnz_conv(4, 8, 100, "csr").to("meta")
        y = layer(torch.empty(2, 4, 6, 6, device="meta"))
        assert y.device.type == "meta" and tuple(y.shape) == (2, 8, 6, 6)
        result = "ok"
    """),
    case("convert_meta_model", """
        with torch.device("meta"):
            model = MLP(32, 64)
        out = sp.convert(model)
        y = out(torch.empty(3, 32, device="meta"))
        assert y.device.type == "meta" and tuple(y.shape) == (3, 32)
        result = "ok"
    """),
    case("zero_size_linear", """
        for i, o in ((0, 5), (5, 0), (0, 0)):
            lin = nn.Linear(i, o)
            for fmt in ("auto", "dense", "csr"):
                layer = sp.SparseLinear.from_dense(lin, format=fmt)
                for shape in ((3, i), (0, i), (2, 3, i)):
                    x = torch.randn(*shape)
                    torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias).detach())
        result = "ok"
    """),
]


@pytest.mark.parametrize("name", META_CASES)
def test_meta_device_and_zero_size_layers(outcomes, name):
    """Defect 11: meta SparseLinear raised, convert(meta model) failed, Linear(0, n) / (n, 0) failed."""
    o = outcomes[name]
    assert o.status == "ok", o.describe()


ARCH_CASES = [
    # same number of packed columns (4 x 3 x 3 = 4 x 1 x 9), so the arrays stay valid: only a comparison
    # with the fresh instance's nn.Conv2d(4, 8, 3) can tell that the file is of another architecture
    case("conv_kernel_size_differs_from_architecture", _conv_attr("kernel_size", [1, 9])),
    case("linear_features_differ_from_architecture", """
        p = save(seq_linear_model())
        result = must_refuse(p, lambda: nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 60)))
    """),
]


@pytest.mark.parametrize("name", ARCH_CASES)
def test_sparse_module_of_another_architecture_is_refused(outcomes, name):
    """Defect 11: a file's sparse module replaced a fresh module of a different shape."""
    o = outcomes[name]
    assert o.raised("ValueError"), o.describe()


# -- the isolated run of every case above (one process, restarted after a crash) ---------------------
@pytest.fixture(scope="module")
def outcomes():
    return hostile.run_cases(list(CASES.items()), preamble=CHILD, case_timeout=30)


# ====================================================================================================
# in-process tests (no crash risk): defects 5-8, 11 (architecture), 13-15
# ====================================================================================================
def _max_rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _finetune(model, x, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model


def _masked_layers(model):
    return {n: m.weight_mask.clone() for n, m in model.named_modules() if getattr(m, "weight_mask", None) is not None}


@pytest.mark.parametrize("prune", ["blocks", "unstructured"])
def test_prune_finetune_convert_conv_bn(prune):
    """Defect 5: folding BN into a masked conv kept the mask + gradient hook on a frozen weight."""
    model = make_convbn()
    x = torch.randn(4, 3, 8, 8)
    if prune == "blocks":
        sp.prune_blocks(model, sparsity=0.5, block_size=(4, 1))
    else:
        sp.prune_unstructured(model, sparsity=0.7)
    masks = _masked_layers(model)
    assert masks, "pruning attached no masks"
    _finetune(model, x)
    model.eval()
    ref = model(x).detach()
    fast = sp.convert(model.eval(), x, time_budget=0.5)
    assert _max_rel(fast(x), ref) < 1e-4
    # masks still respected, in the source model (more training) and in the converted one
    _finetune(model, x, steps=2)
    mods = dict(model.named_modules())
    for n, mask in masks.items():
        assert not mods[n].weight.detach()[~mask].any(), f"{n}: pruned weights revived after convert"
    dense = dict(sp.densify(fast).named_modules())
    for n, mask in masks.items():
        if n in dense and hasattr(dense[n], "weight"):
            assert not dense[n].weight.detach()[~mask].any(), f"{n}: converted layer computes pruned weights"
    model.eval()
    with torch.inference_mode():
        y = model(x)
    assert y.shape == ref.shape


def test_prune_frozen_model_then_convert():
    """Defect 5: pruning a frozen model (requires_grad_(False)) failed like the Conv-BN case."""
    model = make_convbn().requires_grad_(False)
    sp.prune_unstructured(model, sparsity=0.7)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    fast = sp.convert(model, x, time_budget=0.3)
    assert _max_rel(fast(x), ref) < 1e-4
    mlp = MLP(32, 64).requires_grad_(False)
    sp.prune_blocks(mlp, sparsity=0.75, block_size=(4, 4))
    xm = torch.randn(3, 32)
    assert _max_rel(sp.convert(mlp, xm, time_budget=0.3)(xm), mlp(xm)) < 1e-4


def test_masked_forward_under_inference_mode():
    """Defect 5: a forward with masks attached works under torch.inference_mode()."""
    model = make_convbn()
    sp.prune_unstructured(model, sparsity=0.5)
    mlp = MLP(32, 64)
    sp.prune_blocks(mlp, sparsity=0.5, block_size=(4, 4))
    x, xm = torch.randn(2, 3, 8, 8), torch.randn(3, 32)
    with torch.no_grad():
        ref, refm = model(x), mlp(xm)
    with torch.inference_mode():
        y, ym = model(x), mlp(xm)
        y2 = model(x)  # a second call (pre-hooks re-apply masks on inference tensors)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y2, ref)
    torch.testing.assert_close(ym, refm)
    # and masks still work for training afterwards
    _finetune(mlp, xm, steps=1)
    for n, mask in _masked_layers(mlp).items():
        assert not mlp.get_submodule(n).weight.detach()[~mask].any()
    # first forwards in inference mode: of a copy (new Parameters, hooks not yet tied) and of a frozen model
    import copy
    twin = copy.deepcopy(mlp).eval()
    frozen = MLP(32, 64).requires_grad_(False)
    sp.prune_blocks(frozen, sparsity=0.5, block_size=(4, 4))
    with torch.inference_mode():
        torch.testing.assert_close(twin(xm), mlp.eval()(xm))
        yf = frozen(xm)
    with torch.no_grad():
        torch.testing.assert_close(yf, frozen(xm))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.again = self.lin
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(torch.relu(self.again(torch.relu(self.lin(x)))))


def test_module_registered_under_two_names_round_trips(tmp_path):
    """Defect 6: load rebuilt only the first name of a sparse module registered twice."""
    src = _Twice().eval()
    with torch.no_grad():
        src.lin.weight.copy_(block_sparse_weight(64, 64, (16, 16), 0.9) * 0.2)
    fast = sp.convert(src)  # heuristic: 90% 16x16 blocks -> bsr
    assert isinstance(fast.lin, sp.SparseLinear) and fast.again is fast.lin
    x = torch.randn(5, 64)
    sp.save(fast, tmp_path / "twice.sp")
    loaded = sp.load(tmp_path / "twice.sp", _Twice())
    assert loaded.again is loaded.lin, "the two names no longer refer to one module"
    assert isinstance(loaded.lin, sp.SparseLinear)
    torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), src(x), rtol=1e-4, atol=1e-5)


class _ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(512, 512)
        self.other = nn.Linear(512, 512)

    def forward(self, x):
        return self.other(self.lin(x)) + F.linear(x, self.lin.weight)


@pytest.mark.parametrize("with_inputs", [True, False])
def test_layer_whose_weight_is_read_directly_stays_dense(with_inputs):
    """Defect 7: convert raised AttributeError when the model also reads self.lin.weight."""
    src = _ReadsWeight().eval()
    with torch.no_grad():
        for m in (src.lin, src.other):
            m.weight.copy_(block_sparse_weight(512, 512, (16, 16), 0.95) * 0.2)
    x = torch.randn(64, 512)  # big enough that sparse wins where it is allowed
    fast = sp.convert(src, x if with_inputs else None, time_budget=0.5)
    assert isinstance(fast.lin, nn.Linear) and not isinstance(fast.lin, sp.SparseLinear), \
        f"lin is read as a weight by the forward but was converted to {fast.lin!r}"
    torch.testing.assert_close(fast(x), src(x), rtol=1e-4, atol=1e-5)
    row = next(r for r in sp.summary(fast, print_fn=None) if r["name"] == "lin")
    assert row["format"] == "dense"
    assert "weight" in row["reason"], f"the summary row should say why lin stays dense: {row['reason']!r}"


def test_measure_hand_built_model():
    """Defect 8: measure() on a model not produced by convert raised TypeError when formatting."""
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(32, 64, (4, 4), 0.8))
    model = nn.Sequential(sp.SparseLinear.from_dense(lin, format="bsr", block_size=(4, 4)), nn.ReLU(),
                          sp.SparseLinear.from_dense(nn.Linear(32, 16), format="dense"))
    s = sp.measure(model, torch.randn(16, 64), time_budget=0.3)
    text = str(s)
    assert "0" in text and "bsr" in text
    text2 = str(sp.summary(model, print_fn=None))
    assert "bsr" in text2


def test_cli_bench_hand_built_model(tmp_path):
    """Defect 8 (CLI): `sparseprune bench` on a hand-built sparse model."""
    import subprocess
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(32, 64, (4, 4), 0.8))
    sp.save(nn.Sequential(sp.SparseLinear.from_dense(lin, format="bsr", block_size=(4, 4))), tmp_path / "h.sp")
    (tmp_path / "hand_arch.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(64, 32))\n")
    res = subprocess.run([sys.executable, "-m", "sparseprune.cli", "bench", str(tmp_path / "h.sp"), "--arch",
                          "hand_arch:build", "--input-shape", "8,64", "--time-budget", "0.3", "--threads", "1"],
                         capture_output=True, text=True, cwd=tmp_path, env=hostile.child_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "bsr" in res.stdout


def test_load_into_different_architecture_is_refused(tmp_path):
    """Defect 11: a file of MLP(32, 64) silently reshaped MLP(128, 16)."""
    src = MLP(32, 64).eval()
    sp.save(src, tmp_path / "dense.sp")
    with pytest.raises(ValueError):
        sp.load(tmp_path / "dense.sp", MLP(128, 16))
    with torch.no_grad():
        for lin in (src.fc1, src.fc2, src.fc3, src.fc4):
            lin.weight.mul_(torch.rand_like(lin.weight) > 0.9)
    sp.save(sp.convert(src), tmp_path / "sparse.sp")
    with pytest.raises(ValueError):
        sp.load(tmp_path / "sparse.sp", MLP(128, 16))
    with pytest.raises(ValueError):
        sp.load(tmp_path / "dense.sp", MLP(32, 65))


def test_channel_pruned_file_loads_into_unpruned_instance(tmp_path):
    """Defect 11 (must keep working): shapes recorded by prune_channels may change at load."""
    model = MLP(32, 64).eval()
    x = torch.randn(6, 32)
    sp.prune_channels(model, x, ratio=0.5)
    assert model.fc1.out_features < 64
    ref = model(x)
    sp.save(model, tmp_path / "pruned.sp")
    loaded = sp.load(tmp_path / "pruned.sp", MLP(32, 64))
    assert loaded.fc1.out_features == model.fc1.out_features
    torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    fast = sp.convert(model, x, time_budget=0.2)
    sp.save(fast, tmp_path / "pruned_conv.sp")
    torch.testing.assert_close(sp.load(tmp_path / "pruned_conv.sp", MLP(32, 64))(x), fast(x), rtol=0, atol=0)


# -- 13. any Mapping means keyword arguments ---------------------------------------------------------
class _Batch(collections.abc.Mapping):
    """A Mapping that is not a dict (like transformers' BatchEncoding)."""

    def __init__(self, **kw):
        self._d = dict(kw)

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


class _KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.fc1(input_ids))
        if attention_mask is not None:
            h = h * attention_mask
        return self.fc2(h)


def test_non_dict_mapping_means_keyword_arguments():
    """Defect 13: a Mapping that is not a dict (BatchEncoding) failed in convert and friends."""
    model = _KwModel().eval()
    batch = _Batch(input_ids=torch.randn(8, 32), attention_mask=torch.ones(8, 1))
    assert not isinstance(batch, dict)
    sp.prune_unstructured(model, sparsity=0.8, importance="wanda", example_inputs=batch)
    sp.prune_unstructured(model, sparsity=0.8, importance="wanda", calibration=[batch, batch])
    ref = model(**batch)
    fast = sp.convert(model, batch, time_budget=0.3)
    torch.testing.assert_close(fast(**batch), ref, rtol=1e-4, atol=1e-5)
    str(sp.measure(fast, batch, time_budget=0.2))
    small = _KwModel().eval()
    sp.prune_channels(small, batch, ratio=0.5)
    assert small.fc1.out_features < 64
    assert small(**batch).shape == (8, 16)


# -- 14. summary says when the end-to-end check reverted every layer ----------------------------------
def test_summary_reports_end_to_end_revert(monkeypatch):
    """Defect 14: summary showed every layer at 1.00x when the whole-model check reverted them."""
    conv_mod = sys.modules["sparseprune.convert"]
    decide_mod = sys.modules["sparseprune.convert.decide"]
    assert hasattr(conv_mod, "time_calls") and hasattr(decide_mod, "time_calls"), \
        "the timing helper this test patches was renamed"

    def fake(cands, *args, **kwargs):
        if "converted" in cands:  # the whole-model check: converted slower than dense
            return {"dense": 3.25e-3, "converted": 7.5e-3}
        return {k: (1e-3 if k == "dense" else 1e-4) for k in cands}  # every sparse layer "wins"
    monkeypatch.setattr(conv_mod, "time_calls", fake)
    monkeypatch.setattr(decide_mod, "time_calls", fake)
    src = MLP(64, 128).eval()
    with torch.no_grad():
        for lin in (src.fc1, src.fc2, src.fc3, src.fc4):
            lin.weight.copy_(block_sparse_weight(lin.out_features, lin.in_features, (16, 16), 0.9))
    x = torch.randn(8, 64)
    fast = sp.convert(src, x, time_budget=0.2)
    s = sp.summary(fast, print_fn=None)
    assert all(r["format"] == "dense" for r in s), [r["format"] for r in s]
    lines = [ln for ln in str(s).splitlines() if "reverted by the end-to-end check" in ln]
    assert lines, "no line says the end-to-end check reverted the layers:\n" + str(s)
    assert "3.25" in lines[0] and "7.5" in lines[0], lines[0]


# -- 15. time budget bounds wall time; a 16x16 pattern stays bsr 16x16 --------------------------------
def test_time_budget_bounds_wall_time():
    """Defect 15: convert(time_budget=2) took 26 s. A bound on the budget, not a speed assertion."""
    layers = []
    for i in range(8):
        lin = nn.Linear(256, 256)
        with torch.no_grad():
            block = (16, 16) if i % 2 else (1, 1)
            lin.weight.copy_(block_sparse_weight(256, 256, block, 0.9) * 0.1)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(32, 256)
    t0 = time.perf_counter()
    fast = sp.convert(model, x, time_budget=1.0)
    wall = time.perf_counter() - t0
    assert wall < 1.0 + 6.0, f"convert(time_budget=1.0) took {wall:.1f} s"
    assert _max_rel(fast(x), model(x)) < 1e-4


@pytest.mark.slow
def test_time_budget_bounds_wall_time_with_costly_calls():
    """Defect 15 where it showed: layers whose every call is costly (min repetitions, warm-ups and
    checks outside the budget multiplied them). The allowance beyond the budget scales with one
    dense forward of the model, so a loaded machine does not fail it: 15 forwards + 2 s."""
    layers = []
    for i in range(8):
        lin = nn.Linear(1024, 1024)
        with torch.no_grad():
            lin.weight.copy_(block_sparse_weight(1024, 1024, (16, 16) if i % 2 else (1, 1), 0.9) * 0.05)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(2048, 1024)
    forward = float("inf")
    with torch.no_grad():
        model(x)
        for _ in range(2):
            t0 = time.perf_counter()
            model(x)
            forward = min(forward, time.perf_counter() - t0)
    t0 = time.perf_counter()
    sp.convert(model, x, time_budget=1.0)
    wall = time.perf_counter() - t0
    allowed = 1.0 + 2.0 + 15 * forward
    assert wall < allowed, f"convert(time_budget=1.0) took {wall:.1f} s ({wall / forward:.0f} dense forwards of " \
                           f"{forward * 1e3:.0f} ms); allowed {allowed:.1f} s"


@pytest.mark.parametrize("csr_gain, expect", [(1.06, ("bsr", (16, 16))), (1.25, ("csr", ()))],
                         ids=["csr-within-noise", "csr-clearly-faster"])
def test_pure_16x16_pattern_stays_bsr16(monkeypatch, csr_gain, expect):
    """Defect 15: a pure 16x16 block pattern flipped to CSR / 8x8 on timing noise. Timings are planted
    (a real race between BSR 16x16 and CSR is a property of the machine: after the CSR kernel got two
    accumulator sets, CSR won it on a Zen 3 VM in some runs and lost in others): CSR measures
    ``csr_gain`` faster than every BSR candidate, with 1% jitter, in five converts. Within convert's
    noise band 16x16 is kept every time; clearly faster, the faster format is taken."""
    conv_mod = sys.modules["sparseprune.convert"]
    decide_mod = sys.modules["sparseprune.convert.decide"]
    gen = random.Random(0)

    def fake(cands, *args, **kwargs):
        if "converted" in cands:  # the whole-model check
            return {"dense": 1e-3, "converted": 2e-4}
        out = {}
        for k in cands:
            jitter = 1.0 + 0.01 * gen.random()
            # dense; CSR faster by csr_gain; BSR of any block and the kernel variants of the chosen
            # layer ("auto", "rows/panels", ...) all alike
            out[k] = (1e-3 if k == "dense" else 2e-4 / csr_gain if k == "csr" else 2e-4) * jitter
        return out
    monkeypatch.setattr(conv_mod, "time_calls", fake)
    monkeypatch.setattr(decide_mod, "time_calls", fake)
    torch.manual_seed(1)
    lin = nn.Linear(1024, 1024)
    model = nn.Sequential(lin).eval()
    sp.prune_blocks(model, sparsity=0.9, block_size=(16, 16), dense_first_last=False)
    sp.remove_masks(model)
    assert 0.05 < float((lin.weight != 0).float().mean()) < 0.15
    x = torch.randn(64, 1024)
    chosen, cands = [], None
    for _ in range(5):
        # (a budget the wall time cannot exhaust on a loaded machine: a spent budget keeps the most structured
        # candidate untimed, which is not what this test is about)
        row = next(r for r in sp.summary(sp.convert(model, x, time_budget=30.0, cache=False), print_fn=None)
                   if r["name"] == "0")
        chosen.append((row["format"], tuple(row["block"] or ())))
        cands = [k for k in row["candidates"] if k != "dense"]
    assert cands[0] == "bsr16x16" and "csr" in cands, cands  # 16x16 is the most structured candidate
    assert all(c == expect for c in chosen), chosen


# -- 12. peak memory of save and load ----------------------------------------------------------------
_MEM_PRE = """
import resource, gc
def rss_now():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def build():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(2500, 2500) for _ in range(8)])  # 50M floats, ~200 MB
"""


@pytest.mark.slow
def test_save_and_load_peak_memory(tmp_path):
    """Defect 12: peak memory was ~5x the model during save and ~3x the file during load."""
    path = str(tmp_path / "big.sp")
    save_code = f"""
        model = build()
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        gc.collect()
        base = max(peak(), rss_now())
        sp.save(model, {path!r})
        result = (peak() - base) / nbytes
    """
    load_code = f"""
        model = build()
        nbytes = os.path.getsize({path!r})
        gc.collect()
        base = max(peak(), rss_now())
        sp.load({path!r}, model)
        result = (peak() - base) / nbytes
    """
    o = hostile.run_one(save_code, _MEM_PRE, case_timeout=120)
    assert o.status == "ok", o.describe()
    save_ratio = float(o.value)
    o = hostile.run_one(load_code, _MEM_PRE, case_timeout=120)
    assert o.status == "ok", o.describe()
    load_ratio = float(o.value)
    assert save_ratio < 1.5 and load_ratio < 1.5, \
        f"peak extra memory: save {save_ratio:.2f}x the model, load {load_ratio:.2f}x the file"
