"""The package's layout rules: imports flow one way (import-linter's contracts in setup.cfg)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import-linter's own entry point, run by this interpreter (no reliance on PATH; its console output stays
# out of the test process)
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"


def test_imports_flow_one_way():
    out = subprocess.run([sys.executable, "-c", LINT, str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
