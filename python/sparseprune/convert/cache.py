"""On-disk cache of convert()'s timings, keyed by this machine and the layer's real problem.

A second ``convert`` of the same model on the same machine reuses the measured candidate times instead
of timing again; it packs and checks against the dense layer only the candidates the choice can land on
(the cached best, a close runner-up, the most structured one within noise), all of them if one fails. The key is the CPU model, the kernel ISA
path, the thread count, the layer type and weight shape, the input shapes it was timed on, the density
(to 0.1%), the candidate list and the installed kernels (the package version, and the compiled extension's
size and modification time: timings taken with other kernels, before an upgrade or a rebuild, are not
reused). The file lives in ``$SPARSEPRUNE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/sparseprune`` or ``~/.cache/sparseprune``); deleting it is always safe. Its content is
only timings: a malformed or foreign file is ignored, never trusted for anything else. Something other than
a regular file at its path (a folder, a FIFO) is neither read nor replaced (a warning says the timings are
not kept); a symlink is followed and stays a symlink.
"""
from __future__ import annotations

import hashlib
import functools
import json
import os
import stat
import tempfile
import warnings
from typing import Dict, Optional

__all__ = ["TimingCache", "cache_dir", "cpu_model"]

_FILE = "convert-timings-v1.json"
_MAX_ENTRIES = 4096


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's brand string plus its family / model numbers.

    Virtual machines often show only a generic brand ("AMD EPYC" for both Zen 3 and Zen 4, "Intel(R)
    Xeon(R) Processor" for several generations), and timings or kernel choices from one must not be
    taken for the other: the family / model pair tells them apart."""
    name, family, model = "", "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not name:
                    name = value
                elif key == "cpu family" and not family:
                    family = value
                elif key == "model" and not model:
                    model = value
                elif not line.strip() and name:
                    break  # end of the first processor's block
    except OSError:
        pass
    if not name:
        import platform
        name = platform.processor() or platform.machine()
    return f"{name} (family {family} model {model})" if family and model else name


def timing_machine() -> str:
    """What a timed kernel choice holds for: the CPU model and the instruction set the kernels run with. A VM can
    show one CPU model with or without AVX-512 (Zen 4 with it hidden: the AVX2 kernels), or a user may force
    ``SPARSEPRUNE_ISA``; a choice timed under one set is not trusted under another."""
    from .. import ops
    return f"{cpu_model()}; isa {ops.active_isa()}"


@functools.lru_cache(maxsize=None)
def build_id() -> str:
    """The kernels timed: sparseprune's version and its compiled extension's size and modification time.
    A new build can change which candidate is fastest (the NCHW int8 convolutions' planes kernel made
    them 1.4-2.9x faster, yet the cached choices of the build before kept them float32)."""
    from .. import __version__, _C
    try:
        st = os.stat(_C.__file__)
        return f"{__version__}:{st.st_size}:{st.st_mtime_ns}"
    except (OSError, AttributeError, TypeError):
        return __version__


def cache_dir() -> str:
    d = os.environ.get("SPARSEPRUNE_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sparseprune")


class TimingCache:
    """``get(key)`` / ``put(key, times)``; ``flush()`` writes once at the end of a convert."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(cache_dir(), _FILE)
        self.entries: Dict[str, Dict[str, float]] = {}
        self.dirty = False
        if enabled:
            self._read()

    def _read(self) -> None:
        # opened without blocking and read only if it is a regular file: a FIFO or device at the path must not
        # hang convert(), a directory is not a cache
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        try:
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return
                data = json.loads(f.read(64 * 1024 * 1024))
        except (OSError, ValueError, RecursionError):
            return
        if not isinstance(data, dict):
            return
        for k, v in data.items():
            if (isinstance(k, str) and isinstance(v, dict) and v
                    and all(isinstance(n, str) and isinstance(t, (int, float)) and not isinstance(t, bool)
                            and 0 < t < 1e6 for n, t in v.items())):
                self.entries[k] = {n: float(t) for n, t in v.items()}

    @staticmethod
    def key(**parts) -> str:
        from .. import ops
        parts.update(cpu=cpu_model(), isa=ops.active_isa(), build=build_id())
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> Optional[Dict[str, float]]:
        return self.entries.get(key) if self.enabled else None

    def put(self, key: str, times: Dict[str, float]) -> None:
        if self.enabled:
            self.entries[key] = dict(times)
            self.dirty = True

    def flush(self) -> None:
        if not (self.enabled and self.dirty):
            return
        self.dirty = False
        items = list(self.entries.items())[-_MAX_ENTRIES:]
        # written next to the file the path resolves to (a symlinked cache stays a symlink), and only over a
        # regular file: whatever else is at the path (a directory, a FIFO) is somebody's and is left alone
        target = os.path.realpath(self.path)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            pass
        except OSError:
            return
        else:
            if not stat.S_ISREG(st.st_mode):
                warnings.warn(f"sparseprune: {target} is not a regular file; convert() timings are not cached "
                              "(set SPARSEPRUNE_CACHE_DIR to use another folder)", RuntimeWarning, stacklevel=3)
                return
        tmp = None
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".timings-", dir=os.path.dirname(target))
            with os.fdopen(fd, "w") as f:
                json.dump(dict(items), f)
            os.replace(tmp, target)
            tmp = None
        except OSError:
            pass  # a cache that cannot be written only costs time
        finally:
            if tmp is not None:  # never leave a partial temporary file behind
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
