"""The `sparseprune` command: info, demo, report, bench."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import sparseprune as sp
from sparseprune.cli import main
from test_convert_models import make_mixed

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mixed.sp"
    src = make_mixed(d=128, h=512)
    conv = sp.convert(src, torch.randn(16, 128), time_budget=0.3)
    sp.save(conv, path)
    return path, conv


def _run(*args, cwd=HERE):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(sp.__path__[0]), HERE]))
    return subprocess.run([sys.executable, "-m", "sparseprune.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sparseprune {sp.__version__}") and "isa path" in out


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "report" in capsys.readouterr().out


def test_demo_missing_is_a_clear_message(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sparseprune.demo" else real(name, *a))
    assert main(["demo"]) == 1
    assert "demo is not part of this build" in capsys.readouterr().err


def test_report_prints_the_stored_table(saved, capsys):
    path, conv = saved
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "integrity OK" in out
    for r in sp.summary(conv, print_fn=None):
        line = next(ln for ln in out.splitlines() if ln.startswith(r["name"] + " "))
        assert r["format"] in line
    assert main(["report", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in data["layers"]] == [r["format"] for r in sp.summary(conv, print_fn=None)]


def test_report_of_an_unconverted_model(tmp_path, capsys):
    from test_convert_models import MLP
    sp.save(MLP(16, 32), tmp_path / "plain.sp")
    assert main(["report", str(tmp_path / "plain.sp")]) == 0
    assert "0/0 sparse" in capsys.readouterr().out


def test_report_refuses_a_corrupted_file(saved, tmp_path, capsys):
    path, _ = saved
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    bad = tmp_path / "bad.sp"
    bad.write_bytes(blob)
    assert main(["report", str(bad)]) == 1
    assert "corrupted" in capsys.readouterr().err


def test_bench_console_script_end_to_end(saved):
    path, conv = saved
    r = _run("bench", str(path), "--arch", "test_cli:small_arch", "--input-shape", "16,128", "--time-budget", "0.5")
    assert r.returncode == 0, r.stderr
    for name in ("fc1", "fc2", "fc3", "fc4", "end to end"):
        assert name in r.stdout
    r = _run("bench", str(path), "--arch", "nosuchmodule:x", "--input-shape", "16,128")
    assert r.returncode != 0 and "cannot import" in r.stderr
    r = _run("report")
    assert r.returncode == 2 and "model_file" in r.stderr


def test_python_dash_m_sparseprune_runs_the_cli():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(sp.__path__[0]))
    r = subprocess.run([sys.executable, "-m", "sparseprune", "info"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"sparseprune {sp.__version__}") and "isa path" in r.stdout


def test_bench_arch_not_a_module_is_a_clear_error(saved, capsys):
    assert main(["bench", str(saved[0]), "--arch", "test_cli:not_a_module", "--input-shape", "16,128"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("sparseprune: --arch test_cli:not_a_module returned int, not an nn.Module "
                           "(a fresh instance of the original architecture)")


# more than any address space (even with overcommit), more than int64 bytes, more than an int64 size
@pytest.mark.parametrize("shape", ["1000000000,1000000000", "1000000000000,1000000000000", "99999999999999999999999"])
def test_bench_input_too_large_is_a_clear_error(saved, capsys, shape):
    assert main(["bench", str(saved[0]), "--arch", "test_cli:small_arch", "--input-shape", shape]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparseprune: cannot allocate a float32 input of shape (") and err.count("\n") == 1


def not_a_module():
    """--arch target returning something that is not an nn.Module."""
    return 3


def small_arch():
    """--arch target for the bench test: the mixed model's architecture at test width."""
    from test_convert_models import MLP
    return MLP(128, 512)
