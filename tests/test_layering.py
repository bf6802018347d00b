"""The demo wing sits above the library: no module of gopd_fast outside gopd_fast/demo/ imports gopd_fast.demo."""
from __future__ import annotations

import ast
from pathlib import Path

import gopd_fast

PACKAGE = Path(gopd_fast.__file__).resolve().parent
WING = "gopd_fast.demo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in ``tree`` can load (``from a import b`` may load ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this module's package
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def _library_files() -> dict[Path, Path]:
    """{path as the package names it: path on disk}."""
    wing = PACKAGE / "demo"
    kernels = PACKAGE / "kernels"
    files = {p: p for p in PACKAGE.rglob("*.py") if wing not in p.parents and kernels not in p.parents}
    # gopd_fast.kernels lives in the repository's kernels/ folder (installed under that name, or a symlink in a
    # checkout): read it where the import system finds it, named as the package names it
    import gopd_fast.kernels

    folder = Path(next(iter(gopd_fast.kernels.__path__))).resolve()
    files.update({kernels / p.relative_to(folder): p for p in folder.rglob("*.py")})
    return files


def test_the_library_never_imports_the_wing() -> None:
    files = _library_files()
    for must in ("train.py", "train_setup.py", "rollout/expert.py", "kernels/fused_linear_kl.py"):
        assert PACKAGE / must in files, must
    offenders = {}
    for path, on_disk in files.items():
        module = _module_name(path)
        names = _imported(ast.parse(on_disk.read_text(), str(on_disk)), module, path.name == "__init__.py")
        bad = sorted(n for n in names if n == WING or n.startswith(WING + "."))
        if bad:
            offenders[module] = bad
    assert not offenders, f"library modules import the demo wing: {offenders}"


def test_the_check_sees_each_import_form() -> None:
    """The walker catches absolute, from-package and relative imports of the wing (so the test above can fail)."""
    for source, module in [("import gopd_fast.demo.run", "gopd_fast.train"),
                           ("from gopd_fast import demo", "gopd_fast.train"),
                           ("from gopd_fast.demo.sft import train_sft", "gopd_fast.train_setup"),
                           ("from ..demo import plots", "gopd_fast.rollout.expert"),
                           ("def f():\n    from gopd_fast.demo import run", "gopd_fast.loss")]:
        names = _imported(ast.parse(source), module, is_package=False)
        assert any(n == WING or n.startswith(WING + ".") for n in names), source
    assert not any(n.startswith(WING) for n in _imported(ast.parse("from gopd_fast import loss"),
                                                         "gopd_fast.train", False))
