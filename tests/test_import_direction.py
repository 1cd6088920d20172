"""Imports flow one way: experiments -> dalle_jax -> clip_jax -> common (DESIGN.md, principle 10).

Every import in the library packages is read with `ast`: module-level and function-local,
absolute and relative, plus `importlib.import_module("...")` with a literal name.
"""
import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages it must never import
FORBIDDEN = {
    "common": {"clip_jax", "dalle_jax", "experiments"},
    "clip_jax": {"dalle_jax", "experiments"},
    "dalle_jax": {"experiments"},
}


def _imported_modules(tree: ast.AST, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `tree`; `package` is the file's package path."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from ..x import y` in package a.b.c resolves against a.b
                base = package[: max(len(package) - (node.level - 1), 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from pkg import name` may import the submodule pkg.name
            found += [(node.lineno, f"{module}.{alias.name}" if module else alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(root: Path) -> list[str]:
    """'path:line: package imports module' for each import against the allowed direction under `root`."""
    violations = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            file_package = list(relative.parts[:-1])  # a/b/c.py and a/b/__init__.py both live in a.b
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, module in sorted(_imported_modules(tree, file_package)):
                if module.split(".")[0] in banned:
                    violations.append(f"{relative}:{line}: {package} imports {module}")
    return violations


def test_library_imports_flow_one_way():
    violations = forbidden_imports(ROOT)
    assert not violations, (
        "imports must flow experiments -> dalle_jax -> clip_jax -> common; move the shared piece down "
        "(into common/ or the lower package) instead:\n" + "\n".join(violations)
    )


def test_checker_flags_every_kind_of_bad_import(tmp_path):
    files = {
        "common/__init__.py": "",
        "common/data/__init__.py": "",
        "common/data/bad.py": """
            import numpy as np
            from ..layers import LayerNorm  # allowed: common.layers
            from clip_jax.eval_data import DatasetNotFoundError

            def reader():
                import dalle_jax.sample
                return dalle_jax.sample
            """,
        "common/escape.py": "from .. import experiments\n",
        "clip_jax/__init__.py": "import importlib\nimportlib.import_module('dalle_jax.rerank')\n",
        "clip_jax/ok.py": "from common import layers\nfrom . import variants\n",
        "dalle_jax/run.py": "from experiments.run import main\nfrom clip_jax import api\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    assert forbidden_imports(tmp_path) == [
        "common/data/bad.py:4: common imports clip_jax.eval_data.DatasetNotFoundError",
        "common/data/bad.py:7: common imports dalle_jax.sample",
        "common/escape.py:1: common imports experiments",
        "clip_jax/__init__.py:2: clip_jax imports dalle_jax.rerank",
        "dalle_jax/run.py:1: dalle_jax imports experiments.run.main",
    ]
