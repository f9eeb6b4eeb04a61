"""constraints.txt resolves on the Python of the training image's default base.

nvidia/cuda:12.6.3-runtime-ubuntu22.04 has Python 3.10; the venv and CI run 3.11, where a pin
that needs 3.11 (Pillow 13 did) resolves and the default image then fails to build.
"""

import glob
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


def python310() -> str | None:
    """A working Python 3.10: pyenv's, or python3.10 on PATH (a pyenv shim there may not run)."""
    candidates = sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "3.10*" / "bin" / "python")))
    candidates += [found] if (found := shutil.which("python3.10")) else []
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                               capture_output=True, text=True, timeout=60)
        if probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="module")
def venv310(tmp_path_factory):
    interpreter = python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 on this machine (python3.10 or pyenv's 3.10)")
    venv = tmp_path_factory.mktemp("py310") / "venv"
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, timeout=120)
    return venv / "bin" / "python"


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["train", "serve"])
def test_the_pins_resolve_on_python_3_10(extra, venv310):
    out = subprocess.run([str(venv310), "-m", "pip", "install", "--dry-run", "--ignore-installed",
                          "-c", str(ROOT / "constraints.txt"), f".[{extra}]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    would = next(line for line in out.stdout.splitlines() if line.startswith("Would install"))
    assert "Pillow-12." in would or "pillow-12." in would, would  # the 3.10 pin, not 3.11's
