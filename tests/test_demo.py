"""The README's main command: the demo prunes, converts and prints measured speedups."""
import re
import subprocess
import sys


def test_demo_quick_runs_and_reports_speedups():
    res = subprocess.run([sys.executable, "-m", "sparseprune.demo", "--quick"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "BERT-base FFN stack" in out and "digits" in out
    # a measured speedup line for the FFN stack and the per-layer summary with sparse formats
    assert re.search(r"0\.90\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out), out
    assert "bsr" in out
    acc = re.search(r"converted (0\.\d+)", out)
    assert acc and float(acc.group(1)) > 0.85, out
