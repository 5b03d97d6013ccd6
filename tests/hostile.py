"""Test utilities for hostile sparseprune files and crash-isolated test cases.

- :func:`read` / :func:`write`: a sparseprune file is a standard safetensors file whose metadata holds
  ``sparseprune.format``, ``sparseprune.format_version``, ``sparseprune.structure`` (JSON) and
  ``sparseprune.sha256`` (SHA-256 of the whole file with those 64 hex digits replaced by zeros).
  ``write`` recomputes that hash, so a rewritten file passes the integrity check and only the loader's
  validation stands between its contents and the kernels. Built on the ``safetensors`` library only
  (nothing private from ``sparseprune.io``).
- :func:`run_cases`: run snippets of Python in a fresh interpreter (several per process, one result
  line each); a segfault, an abort or a hang fails that case (reported with its name) instead of
  killing pytest, and the remaining cases run in a new process.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import safetensors
import safetensors.torch
import torch

HASH_KEY = "sparseprune.sha256"
STRUCTURE_KEY = "sparseprune.structure"
ZERO_HASH = "0" * 64
HERE = os.path.dirname(os.path.abspath(__file__))


# -- files -------------------------------------------------------------------------------------------
def read(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (no integrity check: this is the attacker's view)."""
    with safetensors.safe_open(os.fspath(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def structure(meta: Dict[str, str]):
    return json.loads(meta[STRUCTURE_KEY])


def seal(blob: bytes) -> bytes:
    """Recompute the sparseprune hash of a safetensors blob whose hash field is all zeros."""
    blob = bytearray(blob)
    n = int.from_bytes(bytes(blob[:8]), "little")
    header = bytes(blob[8:8 + n])
    needle = f'"{HASH_KEY}":"{ZERO_HASH}"'.encode()
    i = header.find(needle)
    if i < 0 or header.find(needle, i + 1) >= 0:
        raise AssertionError("hostile.seal: the zeroed hash field must occur exactly once in the header")
    start = 8 + i + len(needle) - 1 - 64
    blob[start:start + 64] = hashlib.sha256(bytes(blob)).hexdigest().encode()
    return bytes(blob)


def write(path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str], structure=None) -> None:
    """Write a standard safetensors file with ``meta`` (``structure``, if given, replaces the JSON
    structure record) and a valid sparseprune integrity hash."""
    meta = {str(k): str(v) for k, v in meta.items()}
    if structure is not None:
        meta[STRUCTURE_KEY] = structure if isinstance(structure, str) else json.dumps(structure)
    meta[HASH_KEY] = ZERO_HASH
    plain = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    blob = safetensors.torch.save(plain, metadata=meta)
    with open(os.fspath(path), "wb") as f:
        f.write(seal(blob))


def rewrite(src, dst, edit) -> None:
    """Read ``src``, let ``edit(tensors, structure, meta)`` change them in place, write ``dst`` sealed.
    ``edit`` may return a replacement structure (e.g. a raw JSON string)."""
    tensors, meta = read(src)
    st = structure(meta)
    out = edit(tensors, st, meta)
    write(dst, tensors, meta, st if out is None else out)


def rewrite_header(src, dst, edit) -> None:
    """Rewrite the raw safetensors header JSON text of ``src``: ``edit(text) -> text`` (the stored hash
    is zeroed first), re-pad it, keep the tensor bytes, and seal the result with a valid hash."""
    with open(os.fspath(src), "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    text = blob[8:8 + n].decode("utf-8").rstrip(" ")
    stored = json.loads(text)["__metadata__"][HASH_KEY]
    text = edit(text.replace(f'"{HASH_KEY}":"{stored}"', f'"{HASH_KEY}":"{ZERO_HASH}"'))
    header = text.encode("utf-8")
    header += b" " * (-len(header) % 8)
    with open(os.fspath(dst), "wb") as f:
        f.write(seal(len(header).to_bytes(8, "little") + header + blob[8 + n:]))


# -- crash-isolated cases ----------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    status: str  # "ok" | "raised" | "crashed" | "timeout" | "not run"
    exc_type: Optional[str] = None
    exc_mro: List[str] = field(default_factory=list)
    message: str = ""
    traceback: str = ""
    value: str = ""
    returncode: Optional[int] = None
    seconds: float = 0.0
    stderr_tail: str = ""

    def raised(self, *names: str) -> bool:
        return self.status == "raised" and any(n in self.exc_mro for n in names)

    def describe(self) -> str:
        if self.status == "ok":
            return f"{self.name}: completed ({self.value})"
        if self.status == "raised":
            return f"{self.name}: raised {self.exc_type}: {self.message[:500]}\n{self.traceback[-2500:]}"
        if self.status == "crashed":
            return (f"{self.name}: the process CRASHED (return code {self.returncode}); stderr tail:\n"
                    f"{self.stderr_tail[-2500:]}")
        if self.status == "timeout":
            return f"{self.name}: no result after {self.seconds:.0f} s (hang); stderr tail:\n{self.stderr_tail[-1500:]}"
        return f"{self.name}: {self.status}"


_CHILD = r'''
import json, shutil, sys, tempfile, time, traceback
spec = json.load(open(sys.argv[1]))
base = {"__name__": "__case__", "CASE_DIR": spec["root"]}
exec(compile(spec["preamble"], "<preamble>", "exec"), base)
print("@@READY", flush=True)
for name, code in spec["cases"]:
    print("@@START " + json.dumps(name), flush=True)
    base["CASE_DIR"] = tempfile.mkdtemp(prefix="case-", dir=spec["root"])  # a fresh folder per case
    ns = dict(base)
    t0 = time.perf_counter()
    try:
        exec(compile(code, "<case %s>" % name, "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        rec = {"status": "raised", "exc_type": type(e).__name__, "exc_mro": [c.__name__ for c in type(e).__mro__],
               "message": str(e)[:4000], "traceback": traceback.format_exc()[-6000:]}
    else:
        rec = {"status": "ok", "value": repr(ns.get("result"))[:4000]}
    rec["seconds"] = time.perf_counter() - t0
    print("@@END " + json.dumps([name, rec]), flush=True)
    shutil.rmtree(base["CASE_DIR"], ignore_errors=True)
print("@@DONE", flush=True)
'''

PREAMBLE = """
import os, sys, math, json, stat
import torch
import torch.nn.functional as F
from torch import nn
import sparseprune as sp
import hostile
torch.manual_seed(0)
"""


def child_env() -> Dict[str, str]:
    import sparseprune
    paths = [os.path.dirname(sparseprune.__path__[0]), HERE]
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


_LIMIT_AS = """
import resource
_vm = int([ln for ln in open("/proc/self/status") if ln.startswith("VmSize")][0].split()[1]) * 1024
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
_cap = _vm + int({gb} * (1 << 30))
if _soft == resource.RLIM_INFINITY or _soft > _cap:
    resource.setrlimit(resource.RLIMIT_AS, (_cap, _hard))
"""


def run_cases(cases: Sequence[Tuple[str, str]], preamble: str = "", case_timeout: float = 60.0,
              start_timeout: float = 180.0, threads: int = 1, memory_gb: Optional[float] = 4.0) -> Dict[str, Outcome]:
    """Run each ``(name, code)`` in a fresh interpreter, many per process. ``code`` is dedented and
    executed in a namespace that already ran :data:`PREAMBLE` + ``preamble``; it may set ``result``.
    ``CASE_DIR`` (a global there, also seen by functions the preamble defines) is a fresh empty folder
    for each case. ``memory_gb``: address space the cases may add to what the imports took (a hostile
    size must fail an allocation, not fill a shared machine's memory); None for no limit.
    A crash or a hang ends that process: the case gets status "crashed"/"timeout" and the following
    cases continue in a new process."""
    cases = [(n, textwrap.dedent(c)) for n, c in cases]
    out: Dict[str, Outcome] = {}
    pending = list(cases)
    pre = PREAMBLE + f"\ntorch.set_num_threads({int(threads)})\n" + textwrap.dedent(preamble)
    if memory_gb is not None:
        pre += _LIMIT_AS.format(gb=float(memory_gb))
    with tempfile.TemporaryDirectory(prefix="sp-hostile-") as tmp:
        while pending:
            spec_path = os.path.join(tmp, "spec.json")
            with open(spec_path, "w") as f:
                json.dump({"preamble": pre, "cases": pending, "root": tmp}, f)
            err_path = os.path.join(tmp, "stderr.txt")
            with open(err_path, "wb") as err:
                proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", _CHILD, spec_path],
                                        stdout=subprocess.PIPE, stderr=err, env=child_env(), cwd=tmp,
                                        text=True, bufsize=1)
                lines: "queue.Queue[Optional[str]]" = queue.Queue()

                def pump(stream=proc.stdout):
                    for line in stream:
                        lines.put(line)
                    lines.put(None)
                threading.Thread(target=pump, daemon=True).start()
                current, started, ready = None, time.monotonic(), False
                finished = killed = False
                while True:
                    limit = case_timeout if ready else start_timeout
                    try:
                        line = lines.get(timeout=max(0.05, started + limit - time.monotonic()))
                    except queue.Empty:
                        line = "@@TIMEOUT"
                    if line is None or line == "@@TIMEOUT":
                        if line == "@@TIMEOUT" and time.monotonic() < started + limit:
                            continue
                        if proc.poll() is None:
                            killed = line == "@@TIMEOUT"
                            proc.kill()
                        proc.wait()
                        break
                    line = line.rstrip("\n")
                    if line == "@@READY":
                        ready, started = True, time.monotonic()
                    elif line.startswith("@@START "):
                        current, started = json.loads(line[8:]), time.monotonic()
                    elif line.startswith("@@END "):
                        name, rec = json.loads(line[6:])
                        out[name] = Outcome(name=name, **rec)
                        current, started = None, time.monotonic()
                    elif line == "@@DONE":
                        finished = True
                proc.wait()
            with open(err_path, "r", errors="replace") as f:
                tail = f.read()[-6000:]
            if finished and current is None:
                pending = [c for c in pending if c[0] not in out]
                for n, _ in pending:  # should not happen
                    out[n] = Outcome(n, "not run", stderr_tail=tail)
                break
            if not ready and current is None:
                for n, _ in pending:
                    out[n] = Outcome(n, "not run", message="the case runner failed to start",
                                     returncode=proc.returncode, stderr_tail=tail)
                break
            if current is not None:
                out[current] = Outcome(current, "timeout" if killed else "crashed", returncode=proc.returncode,
                                       seconds=time.monotonic() - started, stderr_tail=tail)
            pending = [c for c in pending if c[0] not in out]
    return out


def run_one(code: str, preamble: str = "", case_timeout: float = 60.0, memory_gb: Optional[float] = 4.0) -> Outcome:
    return run_cases([("case", code)], preamble, case_timeout, memory_gb=memory_gb)["case"]
