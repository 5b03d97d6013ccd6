"""bench/report.py keeps one README results section per CPU, and CPUs that share a brand string
(virtual machines show "AMD EPYC" for Zen 3 and Zen 4 alike) get separate sections."""
import importlib.util
import platform
from pathlib import Path

import pytest

from sparseprune.convert import cache as cv_cache

_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[1] / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _run(brand, family, model, row_cpu=None):
    data = {"machine_info": {"cpu": {"brand_raw": brand, "family": family, "model": model}}}
    return data, [{"cpu": row_cpu}] if row_cpu else []


def test_old_runs_get_family_and_model_from_machine_info():
    assert report.machine_cpu(*_run("AMD EPYC", 25, 17, row_cpu="AMD EPYC")) == "AMD EPYC (family 25 model 17)"
    assert report.machine_cpu(*_run("AMD EPYC", 25, 1)) == "AMD EPYC (family 25 model 1)"
    named = "AMD EPYC (family 25 model 1)"  # new runs: the row already carries cpu_model()'s name
    assert report.machine_cpu(*_run("AMD EPYC", 25, 1, row_cpu=named)) == named


def test_same_brand_other_model_gets_its_own_section():
    text = '<!-- RESULTS cpu="AMD EPYC (family 25 model 17)" -->zen4<!-- /RESULTS -->\ntail'
    two = report.replace_machine_section(text, "AMD EPYC (family 25 model 1)", "zen3")
    assert "zen4" in two and "zen3" in two and two.endswith("tail")
    again = report.replace_machine_section(two, "AMD EPYC (family 25 model 1)", "zen3 rerun")
    assert "zen4" in again and "zen3 rerun" in again and again.count("<!-- RESULTS") == 2


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads /proc/cpuinfo on x86 Linux")
def test_cpu_model_names_family_and_model():
    name = cv_cache.cpu_model()
    assert "(family " in name and " model " in name, name
