"""The package's layout rules: imports flow one way (import-linter's contracts in setup.cfg)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (pip install -e .[test])")
def test_imports_flow_one_way():
    out = subprocess.run(["lint-imports", "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
