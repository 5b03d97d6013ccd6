"""Issue #16: fuzzing saved files. Each case rewrites a valid sparseprune file (random keys, shapes,
dtypes, index values, attributes and records in the structure JSON; the integrity hash recomputed, so
only validation protects the kernels) and loads it. Every case must either raise ValueError /
TypeError at load, or load into a model that computes what the file means: the output of its
densified twin (``sp.densify``), or exactly the original output when the rewrite changed nothing (a
forward that refuses with ValueError / TypeError is tolerated: it is not a wrong answer). A crash, a
hang or another exception fails the case, reported with its seed.

All cases run in one separate process (restarted after a crash, see :func:`hostile.run_cases`).
``SPARSEPRUNE_FUZZ_CASES=N`` sets the number of cases (default 600; 3000 with HYPOTHESIS_PROFILE=fuzz),
``SPARSEPRUNE_FUZZ_SEED=S`` shifts the seeds; re-run one case with ``fuzz_case(seed)`` from FUZZ_CHILD.
"""
import os

import hostile

DEFAULT_CASES = 3000 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 600
N_CASES = int(os.environ.get("SPARSEPRUNE_FUZZ_CASES", DEFAULT_CASES))
SEED0 = int(os.environ.get("SPARSEPRUNE_FUZZ_SEED", 0))

FUZZ_CHILD = r'''
import copy, random, tempfile
from helpers import block_sparse_weight
from test_convert_models import ConvBN, make_convbn

BASE_DIR = tempfile.mkdtemp(prefix="sp-fuzz-base-", dir=CASE_DIR)

def _lin(i, o, fmt, block=None, sparsity=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(block_sparse_weight(o, i, block or (1, 1), sparsity, g) * 0.3)
    return sp.SparseLinear.from_dense(lin, format=fmt, block_size=block if fmt == "bsr" else None)

def _conv(cin, cout, k, fmt, block=None, sparsity=0.6, **kw):
    conv = nn.Conv2d(cin, cout, k, **kw)
    with torch.no_grad():
        conv.weight.mul_((torch.rand(conv.weight.shape) > sparsity).float())
    return sp.SparseConv2d.from_dense(conv, format=fmt, block_size=block if fmt == "bsr" else None)

def lin_arch():
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 12), nn.Linear(12, 8))

def lin_model():
    return nn.Sequential(_lin(24, 40, "csr", seed=1), nn.ReLU(), _lin(40, 16, "bsr", (4, 4), seed=2), nn.ReLU(),
                         _lin(16, 12, "dense", seed=3), nn.Linear(12, 8))

def conv_arch():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                         nn.Conv2d(8, 4, 1))

def conv_model():
    return nn.Sequential(_conv(3, 8, 3, "csr", padding=1), nn.ReLU(),
                         _conv(8, 8, 3, "bsr", (2, 1), stride=2, padding=1, groups=2), _conv(8, 4, 1, "dense"))

class Tied(nn.Module):
    def __init__(self, sparse=False):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.c = _lin(16, 8, "csr", seed=4) if sparse else nn.Linear(16, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

def convbn_model():
    m = make_convbn()
    sp.prune_unstructured(m, sparsity=0.8, dense_first_last=False)
    return sp.convert(m.eval())  # heuristic: BN folded (Identity), csr convs, report stored

BUILDERS = {
    "linear": (lin_model, lin_arch, lambda: torch.randn(5, 24)),
    "conv": (conv_model, conv_arch, lambda: torch.randn(2, 3, 9, 9)),
    "tied": (lambda: Tied(True).eval(), Tied, lambda: torch.randn(3, 16)),
    "convbn": (convbn_model, ConvBN, lambda: torch.randn(2, 3, 8, 8)),
}
BASES = {}

def base(name):
    if name not in BASES:
        torch.manual_seed(sorted(BUILDERS).index(name))  # the same base whatever the order of builds
        build, arch, make_x = BUILDERS[name]
        model = build().eval()
        x = make_x()
        path = os.path.join(BASE_DIR, name + ".sp")
        sp.save(model, path)
        with torch.no_grad():
            y = model(x)
        BASES[name] = (path, arch, x, y, open(path, "rb").read())
    return BASES[name]

ATTR_KEYS = ["format", "block_size", "in_features", "out_features", "num_threads", "rk", "groups", "stride",
             "padding", "dilation", "_pad4", "kernel_size", "padding_mode", "in_channels", "out_channels", "bias"]

def hostile_value(rng, cur=None):
    pool = [0, -1, 1, 2, 3, 4, 7, 16, 2**15, 2**31 - 1, 2**31, 2**62, 2**70, -2**31, 1.5, float("inf"), float("nan"),
            True, False, None, "", "csr", "bsr", "dense", "reflect", "same", "valid", "x" * 50, [], [0], [0, 0],
            [1, 1], [4, 4], [1, 2**30], [2**30, 1], [-1, 4], [4, -1], [1.5, 2], ["a", "b"], [1, 1, 1],
            [0, 0, 0, 0], [1, 1, 1, 1], [9, 9, 9, 9], [[1]], {}, {"a": 1}]
    if cur is not None and rng.random() < 0.4:
        if isinstance(cur, bool):
            return not cur
        if isinstance(cur, int):
            return cur + rng.choice([-2, -1, 1, 2, cur, -cur])
        if isinstance(cur, list) and cur and all(isinstance(v, int) and not isinstance(v, bool) for v in cur):
            out = list(cur)
            i = rng.randrange(len(out))
            out[i] = out[i] + rng.choice([-1, 1, 2, -out[i]])
            return out if rng.random() < 0.8 else out[:-1]
    return copy.deepcopy(rng.choice(pool))

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
ALL_DTYPES = INT_DTYPES + [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool]

def mutate_tensor_values(rng, t):
    t = t.clone()
    if t.numel() == 0:
        return torch.zeros(rng.choice([1, 3]), dtype=t.dtype)
    flat = t.reshape(-1)
    how = rng.choice(["set", "set", "set", "shuffle", "reverse", "add", "fill"])
    if t.dtype.is_floating_point:
        vals = [0.0, -1.0, 1e3, -1e3, float("nan"), 1e-30]
    elif t.dtype == torch.bool:
        vals = [True, False]
    else:
        info = torch.iinfo(t.dtype)
        n = t.numel()
        vals = [v for v in (-1, 0, 1, n - 1, n, n + 1, 35, 36, 71, 72, int(flat.max()) + 1, info.max, info.min, 2**15 - 1)
                if info.min <= v <= info.max]
    if how == "set":
        for _ in range(rng.choice([1, 1, 2, 5])):
            flat[rng.randrange(flat.numel())] = rng.choice(vals)
    elif how == "shuffle":
        flat.copy_(flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(rng.randrange(2**31)))])
    elif how == "reverse":
        flat.copy_(flat.flip(0))
    elif how == "add" and t.dtype != torch.bool:
        flat.add_(rng.choice([1, -1, 2]))
    else:
        flat.fill_(rng.choice(vals))
    return t

def mutate_tensor_shape(rng, t):
    how = rng.choice(["truncate", "extend", "unsqueeze", "flatten", "empty", "scalar", "transpose"])
    if how == "truncate" and t.numel() > 0:
        return t.reshape(-1)[:-rng.choice([1, 1, 2])].clone() if t.dim() <= 1 else t[:-1].clone()
    if how == "extend":
        flat = t.reshape(-1)
        return torch.cat([flat, flat[:rng.choice([1, 4])] if flat.numel() else torch.zeros(1, dtype=t.dtype)]) \
            if t.dim() <= 1 else torch.cat([t, t[:1]])
    if how == "unsqueeze":
        return t.unsqueeze(rng.randrange(t.dim() + 1)).clone()
    if how == "flatten":
        return t.reshape(-1).clone()
    if how == "empty":
        return t.reshape(-1)[:0].clone()
    if how == "scalar":
        return t.reshape(-1)[:1].reshape(()).clone() if t.numel() else torch.zeros((), dtype=t.dtype)
    return t.t().contiguous() if t.dim() == 2 else t.clone()

def mutate(rng, tensors, st, meta):
    """One random hostile edit; returns a description (and may replace the structure by raw JSON)."""
    kind = rng.choice(["attr", "attr", "attr", "int_attr", "tensor_spec", "dtype", "shape", "shape", "values",
                       "values", "values", "keys", "module_entry", "flags", "aliases", "top", "swap"])
    keys = sorted(tensors)
    mods = st.get("modules", {}) if isinstance(st.get("modules"), dict) else {}
    sparse = sorted(n for n, e in mods.items() if isinstance(e, dict) and e.get("class") != "Identity")
    if kind == "attr" and sparse:
        name = rng.choice(sparse)
        attrs = mods[name]["attrs"]
        key = rng.choice(sorted(attrs)) if attrs and rng.random() < 0.8 else rng.choice(ATTR_KEYS)
        attrs[key] = hostile_value(rng, attrs.get(key))
        return f"attr {name}.{key} = {attrs[key]!r}"
    if kind == "int_attr" and st.get("int_attrs"):
        name = rng.choice(sorted(st["int_attrs"]))
        ints = st["int_attrs"][name]
        key = rng.choice(sorted(ints)) if ints else "in_features"
        ints[key] = hostile_value(rng, ints.get(key))
        return f"int_attr {name}.{key} = {ints[key]!r}"
    if kind == "tensor_spec" and st.get("tensors"):
        key = rng.choice(sorted(st["tensors"]))
        spec = st["tensors"][key]
        field = rng.choice(["shape", "param", "requires_grad"])
        spec[field] = hostile_value(rng, spec.get(field)) if field == "shape" else rng.choice([True, False, None, 1])
        return f"tensor_spec {key}.{field} = {spec[field]!r}"
    if kind == "dtype" and keys:
        key = rng.choice(keys)
        dt = rng.choice(ALL_DTYPES)
        tensors[key] = tensors[key].to(dt)
        return f"dtype {key} -> {dt}"
    if kind == "shape" and keys:
        key = rng.choice(keys)
        tensors[key] = mutate_tensor_shape(rng, tensors[key])
        if rng.random() < 0.5 and isinstance(st.get("tensors"), dict) and key in st["tensors"]:
            st["tensors"][key]["shape"] = list(tensors[key].shape)  # a consistent record of the change
        return f"shape {key} -> {tuple(tensors[key].shape)}"
    if kind == "values" and keys:
        idx = [k for k in keys if k.rsplit(".", 1)[-1] in ("row_ptr", "col_idx")]
        key = rng.choice(idx if idx and rng.random() < 0.7 else keys)
        tensors[key] = mutate_tensor_values(rng, tensors[key])
        return f"values {key}"
    if kind == "keys" and keys:
        how = rng.choice(["delete", "rename", "extra"])
        key = rng.choice(keys)
        if how == "delete":
            del tensors[key]
            return f"delete tensor {key}"
        if how == "rename":
            new = rng.choice([k for k in keys if k != key] + [key + "_x", "x." + key, key.rsplit(".", 1)[-1]])
            tensors[new] = tensors.pop(key)
            return f"rename tensor {key} -> {new}"
        tensors[rng.choice([key + "_extra", "extra", "0.weight_mask", "2.extra_buffer"])] = torch.zeros(3)
        return "extra tensor"
    if kind == "module_entry" and mods:
        how = rng.choice(["class", "delete", "rename", "copy", "attrs_type"])
        name = rng.choice(sorted(mods))
        if how == "class":
            mods[name]["class"] = rng.choice(["SparseLinear", "SparseConv2d", "Identity", "Linear", "os.system", 5])
        elif how == "delete":
            del mods[name]
        elif how == "rename":
            mods[rng.choice(["1", "99", "", "a.b", name + ".x", "0.0"])] = mods.pop(name)
        elif how == "copy":
            mods[rng.choice(["1", "3", "5", "bn1", "block.2", "a", "b", "c"])] = copy.deepcopy(mods[name])
        else:
            mods[name][rng.choice(["attrs", "params", "buffers"])] = hostile_value(rng)
        return f"module_entry {how} {name}"
    if kind == "flags" and mods:
        name = rng.choice(sorted(mods))
        which = rng.choice(["params", "buffers"])
        d = mods[name].get(which)
        if isinstance(d, dict):
            k = rng.choice(sorted(d) + ["weight", "values", "row_ptr", "bias", "extra"])
            d[k] = not d.get(k, False)
            return f"flags {name}.{which}.{k} = {d[k]}"
    if kind == "aliases" and keys:
        al = st.setdefault("aliases", {})
        if not isinstance(al, dict):
            st["aliases"] = al = {}
        src = rng.choice(keys + [k + "_x" for k in keys[:2]])
        al[src] = rng.choice(keys + ["missing.key", src])
        if rng.random() < 0.3 and src in tensors:
            del tensors[src]
        return f"alias {src} -> {al[src]}"
    if kind == "top":
        key = rng.choice(["modules", "int_attrs", "tensors", "training", "report", "aliases", "extra"])
        if rng.random() < 0.3:
            st.pop(key, None)
            return f"top delete {key}"
        st[key] = hostile_value(rng)
        return f"top {key} = {st[key]!r}"
    if kind == "swap" and len(keys) > 1:
        a, b = rng.sample(keys, 2)
        tensors[a], tensors[b] = tensors[b], tensors[a]
        return f"swap {a} <-> {b}"
    return "no-op"

def check_valid(model):
    for name, m in model.named_modules():
        v = getattr(m, "validate", None)
        if callable(v):
            v()
        elif isinstance(m, sp.SparseLinear) and m.format != "dense":
            m.packed().validate()

def close(actual, expected, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.isfinite().all():
        assert actual.isfinite().all(), (what, "non-finite outputs where the dense twin has none")
    # a NaN reaching a sparse layer spreads only through stored weights (dense: through every weight),
    # so where the dense twin has NaN / inf only finite positions of both are compared
    fin = expected.isfinite() & actual.isfinite()
    scale = float(expected[fin].abs().max()) if fin.any() else 0.0
    err = float((actual[fin] - expected[fin]).abs().max()) if fin.any() else 0.0
    assert err <= 1e-4 * max(1.0, scale), (what, err, scale)

def check_unchanged(bname):
    """The harness itself: a file rewritten by hostile.write without any change loads and reproduces
    the original output."""
    path, arch, x, y0, blob = base(bname)
    tensors, meta = hostile.read(path)
    dst = os.path.join(CASE_DIR, "same.sp")
    hostile.write(dst, tensors, meta)
    loaded = sp.load(dst, arch()).eval()
    check_valid(loaded)
    with torch.no_grad():
        close(loaded(x), y0, bname + " rewritten unchanged")
        close(sp.densify(loaded)(x), y0, bname + " rewritten unchanged, densified")
    return "ok"

def fuzz_case(seed):
    rng = random.Random(seed)
    bname = rng.choice(sorted(BUILDERS))
    path, arch, x, y0, blob = base(bname)
    tensors, meta = hostile.read(path)
    st = hostile.structure(meta)
    desc = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        try:
            desc.append(mutate(rng, tensors, st, meta))
        except (TypeError, KeyError, AttributeError, IndexError, ValueError, RuntimeError) as e:
            desc.append(f"(edit not applicable after the previous one: {type(e).__name__})")  # harness, not sparseprune
    dst = os.path.join(CASE_DIR, "fuzz.sp")
    hostile.write(dst, tensors, meta, st)
    noop = open(dst, "rb").read() == blob
    what = f"seed {seed} ({bname}: {'; '.join(desc)})"
    try:
        loaded = sp.load(dst, arch())
    except (ValueError, TypeError) as e:
        assert not noop, (what, "an unchanged file was refused", str(e))
        return "refused"
    check_valid(loaded)
    loaded.eval()
    with torch.no_grad():
        if noop:
            close(loaded(x), y0, what + " [unchanged file]")
            return "unchanged"
        try:
            ref = sp.densify(loaded)(x)
        except Exception as e:  # noqa: BLE001 - the file's meaning is not computable densely either
            try:
                loaded(x)
            except Exception:  # noqa: BLE001
                return "loaded; forward refused like the dense twin"
            raise AssertionError(f"{what}: loaded model runs but its densified twin fails ({type(e).__name__}: {e})")
        try:
            y = loaded(x)
        except (ValueError, TypeError):
            return "loaded; forward refused cleanly"  # a clean refusal is not a wrong answer
        close(y, ref, what)
    return "loaded and correct"
'''


def test_fuzz_saved_files():
    """Random hostile rewrites of saved files: refused cleanly, or loaded and computing their meaning."""
    seeds = range(SEED0, SEED0 + N_CASES)
    cases = [("unchanged files load", "result = [check_unchanged(b) for b in sorted(BUILDERS)]")]
    cases += [(f"seed={s}", f"result = fuzz_case({s})") for s in seeds]
    out = hostile.run_cases(cases, preamble=FUZZ_CHILD, case_timeout=30)
    bad = [o for o in out.values() if o.status != "ok"]
    stats = {}
    for o in out.values():
        if o.status == "ok":
            stats[o.value] = stats.get(o.value, 0) + 1
    assert not bad, (f"{len(bad)} of {len(out)} fuzz cases failed (outcomes of the others: {stats}):\n"
                     + "\n".join(o.describe()[-1500:] for o in bad[:8]))
