"""The Quick start's promises about `make`, checked on the commands make would run (`make -n`)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def planned(target: str, tmp_path: Path, *variables: str) -> str:
    """What `make TARGET` would run in a fresh environment folder (nothing is run)."""
    out = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}", *variables], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_lab_installs_the_notebook_set_only(tmp_path):
    plan = planned("lab", tmp_path)
    assert '".[notebooks]"' in plan and "jupyter lab" in plan
    assert ".[test]" not in plan and "stable-diffusion-sdkit" not in plan


def test_test_installs_the_references(tmp_path):
    plan = planned("test", tmp_path)
    assert '".[test]"' in plan and "stable-diffusion-sdkit" in plan and "pytest" in plan


def test_torch_is_installed_first_and_torch_index_reaches_pip(tmp_path):
    plan = planned("test", tmp_path, "TORCH_INDEX=https://download.pytorch.org/whl/cpu", "TORCH=torch==2.13.0")
    lines = [l for l in plan.splitlines() if "pip install" in l and "--upgrade pip" not in l]
    assert lines[0].endswith('--index-url "https://download.pytorch.org/whl/cpu" "torch==2.13.0"')
    assert "--index-url" not in "\n".join(lines[1:])       # only torch comes from that index
    assert "--index-url" not in planned("test", tmp_path)   # and none without TORCH_INDEX


def test_ci_installs_the_local_cpu_torch_then_runs_the_readme_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0"' in ci and "make test" in ci
    assert "make test" in (REPO / "README.md").read_text()
