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


def test_readers_import_no_training_stack():
    """The readers of a run (loading, generate, export, evaluate, the lm-eval model) import neither the train
    step, the optimizer (optax) nor Grain."""
    code = ("import importlib, sys\n"
            "for m in ('rlp_jax.runs.loading', 'rlp_jax.generate.cli', 'rlp_jax.export', 'rlp_jax.evaluate.cli'):\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('optax', 'grain') or m.startswith('rlp_jax.train'))\n"
            "print(bad[:5]); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_every_package_map_names_its_modules():
    """Each package's `__init__` docstring lists every module and subpackage in it (the package maps)."""
    import ast
    import re

    root = Path(__file__).resolve().parents[1] / "rlp_jax"
    missing = {}
    for init in root.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        here = init.parent
        names = [p.stem for p in here.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        names += [p.parent.name for p in here.glob("*/__init__.py")]
        if gone := [n for n in names if not re.search(rf"\b{re.escape(n)}\b", doc)]:
            missing[str(here.relative_to(root.parent))] = gone
    assert not missing, missing
