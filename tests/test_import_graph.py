"""The dependency direction of docs/INTERFACES.md, checked on every file that exists.

flows <- flowserve.modeldir <- training, export <- server.engine <- server (gRPC). flows/
imports only torch and the standard library; server/engine/ imports no grpc. Imports are read
with ast (every import statement, including those inside functions), and for flows and the
engine also checked at run time, which catches transitive imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
GRPC_PREFIXES = ("grpc",)


def python_files(package: str) -> list[Path]:
    """Every .py file under a package folder of the repository (none if it does not exist)."""
    folder = ROOT / package
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute dotted names of everything a file imports, relative imports resolved.

    `from a.b import c` yields both "a.b" and "a.b.c", since c may be a module.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from, for modules and __init__
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name}


def top(name: str) -> str:
    return name.split(".")[0]


def is_grpc(name: str) -> bool:
    return top(name).startswith(GRPC_PREFIXES) or name.endswith("_pb2_grpc")


def test_parser_sees_absolute_relative_and_nested_imports(tmp_path: Path) -> None:
    # The checker must be able to fail: feed it a file with every kind of import.
    module = tmp_path / "pkg" / "sub" / "mod.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "import grpc.aio\nfrom .. import server\nfrom .sibling import x\n"
        "def f():\n    from training.data import load\n",
        encoding="utf-8",
    )
    names = imported_modules(module, root=tmp_path)
    assert {"grpc.aio", "pkg.server", "pkg.sub.sibling", "training.data"} <= names
    assert is_grpc("grpc.aio") and is_grpc("protos.generator_pb2_grpc") and not is_grpc("torch")


def test_flows_imports_only_torch_stdlib_and_itself() -> None:
    files = python_files("flows")
    assert files, "flows/ must exist"
    for path in files:
        bad = {
            name for name in imported_modules(path) if top(name) not in STDLIB | {"torch", "flows"}
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_engine_imports_no_grpc() -> None:
    for path in python_files("server/engine"):
        bad = {name for name in imported_modules(path) if is_grpc(name)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("training", {"server", "grpc", "grpc_health", "grpc_reflection"}),
        ("export", {"server", "grpc", "grpc_health", "grpc_reflection"}),
        ("server/engine", {"grpc", "grpc_health", "grpc_reflection"}),
    ],
)
def test_lower_layers_do_not_import_upper_ones(package: str, forbidden: set[str]) -> None:
    for path in python_files(package):
        bad = {name for name in imported_modules(path) if top(name) in forbidden}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_model_directory_format_sits_below_training_export_and_server() -> None:
    path = ROOT / "flowserve" / "modeldir.py"
    if path.exists():
        names = imported_modules(path)
        bad = {n for n in names if top(n) in {"training", "export", "server"} or is_grpc(n)}
        assert not bad, f"flowserve/modeldir.py imports {sorted(bad)}"


def _module_names(package: str) -> list[str]:
    return [
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in python_files(package)
    ]


def test_importing_flows_and_engine_loads_no_grpc_or_upper_layer() -> None:
    # One interpreter (torch imports once): import flows, list sys.modules, then the engine.
    code = (
        "import importlib, sys\n"
        "for group in sys.argv[1:]:\n"
        "    for name in group.split(','):\n"
        "        if name:\n"
        "            importlib.import_module(name)\n"
        "    print(' '.join(sys.modules))\n"
    )
    groups = [",".join(_module_names("flows")), ",".join(_module_names("server/engine"))]
    result = subprocess.run(
        [sys.executable, "-c", code, *groups], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    after_flows, after_engine = (set(line.split()) for line in result.stdout.splitlines()[-2:])
    upper = {"server", "training", "export", "flowserve", "protos"}
    assert not {m for m in after_flows if top(m) in upper or is_grpc(m)}
    assert not {m for m in after_engine if is_grpc(m)}, "server.engine pulls in grpc transitively"
