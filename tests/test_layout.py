"""The package's layout rules: imports flow one way (import-linter's contracts in setup.cfg), modules stay small."""

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


MAX_MODULE_LINES = 420   # "no module over ~400 lines": split a module by concept before it grows past this


def test_no_module_outgrows_one_concept():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "rlp_jax").rglob("*.py")}
    assert len(sizes) > 30
    too_big = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_big, f"modules over {MAX_MODULE_LINES} lines: {too_big}"
