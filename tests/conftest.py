import importlib
import os

import pytest
import torch
from hypothesis import settings

import sparseprune  # noqa: F401
from sparseprune import ops

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("fuzz", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ISAS = [p["isa"] for p in ops.isa_paths()]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU kernel path this machine supports."""
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa("best")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path_factory, monkeypatch):
    """convert()'s on-disk timing cache goes to a fresh folder per test: no test sees another's
    (possibly faked) timings, and nothing is written to the user's cache dir."""
    monkeypatch.setenv("SPARSEPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("sp-cache")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny layers on a shared 2-core machine: one thread avoids OpenMP contention (often 10x faster),
    and no result depends on the thread count. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_timing(monkeypatch):
    """``fake_timing(module, times)``: ``module.time_calls`` runs each call once (so that the calls still
    execute) and returns ``times`` ({label: seconds}): a convert pass's keep-if-faster decision, fixed."""
    def install(module, times):
        def fake(calls, *a, **k):
            for fn in calls.values():
                fn()
            return dict(times)
        monkeypatch.setattr(module, "time_calls", fake)
    return install


@pytest.fixture
def sparse_layers_win(monkeypatch):
    """Every layer's sparse candidates time faster than dense in ``convert``'s per-layer choice. Tests of a later
    pass (fused residual blocks, flat transformer layers) need sparse layers to exist; tiny layers may really time
    slower sparse than dense (under the sanitizer build, or with a fast AVX-512 dense convolution)."""
    def sparse_wins(calls, *a, **k):
        for fn in calls.values():
            fn()
        return {name: 2.0 if name.startswith("dense") else 1.0 for name in calls}
    monkeypatch.setattr(importlib.import_module("sparseprune.convert.decide"), "time_calls", sparse_wins)
