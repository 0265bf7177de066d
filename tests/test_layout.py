"""The layout's two rules (issue 28): the library never imports the CIFAR application, and no module imports
another's private names (the modules talk through public names only)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sgs_fx"
LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if "cifar" not in p.relative_to(PACKAGE).parts
                 and p.name != "cli.py")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_importing_every_library_module_imports_no_application_module():
    names = [_module(p) for p in LIBRARY]
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n"
            "    try:\n"
            "        importlib.import_module(n)\n"
            "    except ImportError:\n"  # an integration whose library is not installed says so
            "        assert n.startswith('sgs_fx.integrations.'), n\n"
            "print(sorted(m for m in sys.modules if m.startswith('sgs_fx.cifar') or m == 'sgs_fx.cli'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout  # (the last line: libraries may print on import)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("sgs_fx")):
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            assert not private, f"{path.name} imports {private} from {node.module}"
