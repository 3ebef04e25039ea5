"""The validate package's import structure: one way down, each module executed once.

``python -c "import validate"`` and the ``python -m validate.<script>`` entry points execute no
module twice; the modules' own imports form no cycle; no import hides inside a function except
of an optional dependency (so a cycle cannot be held together by a deferred import).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO as ROOT  # noqa: E402
PACKAGE = ROOT / "validate"
#: Imported where used, so that validate imports without them (pyproject's optional extras).
OPTIONAL = {"cvxpy", "hypothesis", "torch", "gguf", "safetensors", "ml_dtypes"}

#: Runs the code after it with every executed module's name and file counted; at exit prints
#: "TWICE [...]", the names and files executed more than once.
COUNT_EXECUTIONS = """
import collections, importlib.abc, sys
executed = collections.Counter()

class Counting(importlib.abc.Loader):
    def __init__(self, loader, keys):
        self.loader, self.keys = loader, keys
    def create_module(self, spec):
        return self.loader.create_module(spec)
    def exec_module(self, module):
        executed.update(self.keys)
        return self.loader.exec_module(module)
    def __getattr__(self, attr):
        return getattr(self.loader, attr)

class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = Counting(spec.loader, [name] + ([spec.origin] if spec.has_location else []))
                return spec
        return None

sys.meta_path.insert(0, Recorder())
import atexit
atexit.register(lambda: print("TWICE", sorted(k for k, n in executed.items() if n > 1)))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", COUNT_EXECUTIONS + code, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_validate_executes_no_module_twice():
    proc = _run("import validate\nassert 'validate.make_suite' not in sys.modules\n")
    assert proc.returncode == 0, proc.stderr
    assert "TWICE []" in proc.stdout, proc.stdout


@pytest.mark.parametrize("script", ["validate.make_suite", "validate.ggml_check"])
def test_script_modules_run_without_importing_themselves_twice(script):
    """``python -m validate.X`` imports the package first; were X among its imports, runpy
    would execute X a second time as __main__ (a RuntimeWarning, here an error)."""
    proc = _run(f"import runpy\nsys.argv = ['{script}', '--help']\n"
                f"try:\n    runpy.run_module('{script}', run_name='__main__', alter_sys=True)\n"
                "except SystemExit:\n    pass\n")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "TWICE []" in proc.stdout, proc.stdout


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_import_inside_a_function_but_optional_dependencies():
    hidden = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = ["." * node.level + (node.module or "")]
                else:
                    continue
                hidden += [f"validate/{name}.py:{node.lineno} {t}" for t in targets
                           if t.split(".")[0] not in OPTIONAL]
    assert hidden == [], "imports inside functions (move them to the module top): " + ", ".join(hidden)


def test_the_package_imports_run_one_way():
    """The graph of imports between validate's modules has no cycle."""
    graph: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("validate."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps - {name}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join(path + (name,))
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, path + (name,))
        done.add(name)

    for name in graph:
        visit(name, ())
