"""Module boundaries, read from the source with ``ast`` (nothing is imported).

- ``engine/`` stays pure: no Kafka, Faust or Redis client in it.
- Every name has one home. A first-party import (of ``engine`` or ``streams``) names the module
  that defines the name: a top-level ``def``, ``class``, assignment or annotated assignment
  there (inside a top-level ``if`` or ``try`` too), or a submodule of that name. Importing a
  name through a module that merely imports it fails, and so does an ``__all__`` entry that
  its module does not define. The importers checked are ``engine/``, ``streams/``, ``tests/``
  and ``bench/``, imports inside functions included.
- ``streams/settings.py`` is the only module of ``engine/`` and ``streams/`` that reads the
  environment (``os.environ``, ``os.getenv``); the others receive settings objects.
- Imports between the packages of ``streams/`` run one way (``LAYERS``): the command line
  over the processes (worker, learner, replay), over operations, over the Redis and Kafka
  adapters, over settings and errors, over ``engine/``. A process never imports another, and
  ``engine/`` never imports ``streams``. Imports inside functions count too.
- The import graph of ``engine/`` has no cycle. Every module-level import counts, those under
  ``if TYPE_CHECKING:`` included (mypy follows them too); imports inside functions do not. An
  import of ``a.b.c`` also imports the packages ``a.b`` and ``a``, except the importer's own.
- The core of ``engine/`` never imports the analysis tools (``engine.analysis``: backtests,
  reports, OPE, the simulated world), not even inside a function; they import the core.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"
FIRST_PARTY = ("engine", "streams")
IMPORTERS = ("engine", "streams", "tests", "bench")
FORBIDDEN = {"faust", "aiokafka", "redis", "mode", "kafka"}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    is_package: bool


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            modules[name] = Module(name, path, parse(path), path.name == "__init__.py")
    return modules


@cache
def first_party() -> Mapping[str, Module]:
    return load_modules(ROOT, FIRST_PARTY)


# -- engine/ stays pure --------------------------------------------------------------------------


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def engine_modules() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def test_engine_has_modules() -> None:
    assert len(engine_modules()) >= 5


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_engine_module_imports_no_io_client(path: Path) -> None:
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}; engine/ must stay free of I/O clients"


def test_detector_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import json\nfrom redis.asyncio import Redis\nimport aiokafka.admin\n")
    assert imported_roots(sample) & FORBIDDEN == {"redis", "aiokafka"}


# -- every name has one home ---------------------------------------------------------------------


def top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements run when the module is imported, those inside ``if`` and ``try`` too."""
    for node in body:
        if isinstance(node, ast.If):
            yield from top_level(node.body)
            yield from top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from top_level(block)
            yield from top_level(node.finalbody)
        else:
            yield node


def stored_names(target: ast.expr) -> Iterator[str]:
    for node in ast.walk(target):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id


def defined_names(tree: ast.Module) -> set[str]:
    """Names the module defines itself: functions, classes and assigned names."""
    names: set[str] = set()
    for node in top_level(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(stored_names(target))
        elif isinstance(node, ast.AnnAssign):
            names.update(stored_names(node.target))
    return names


def source_module(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute name of the module ``node`` imports from."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def all_entries(tree: ast.Module) -> list[str]:
    """The names ``__all__`` lists; empty when the module has none."""
    for node in top_level(tree.body):
        if isinstance(node, ast.Assign) and "__all__" in stored_names(node.targets[0]):
            entries = ast.literal_eval(node.value)
            assert all(isinstance(entry, str) for entry in entries)
            return list(entries)
    return []


def homes(name: str, modules: Mapping[str, Module]) -> list[str]:
    return sorted(module.name for module in modules.values() if name in defined_names(module.tree))


def re_exported_imports(importer: Module, modules: Mapping[str, Module]) -> list[str]:
    """Every ``from M import name`` in ``importer`` where first-party ``M`` does not define it."""
    problems: list[str] = []
    for node in ast.walk(importer.tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = modules.get(source_module(node, importer.name, importer.is_package))
        if source is None:
            continue
        defined = defined_names(source.tree)
        for alias in node.names:
            if alias.name in defined or f"{source.name}.{alias.name}" in modules:
                continue
            where = ", ".join(homes(alias.name, modules)) or "nowhere first-party"
            problems.append(
                f"{importer.path}:{node.lineno}: {alias.name} is not defined in {source.name} "
                f"(defined in: {where})"
            )
    return problems


def undefined_exports(module: Module) -> list[str]:
    defined = defined_names(module.tree)
    return [name for name in all_entries(module.tree) if name not in defined]


def importers() -> list[Module]:
    return list(load_modules(ROOT, IMPORTERS).values())


def test_first_party_names_are_imported_from_their_home() -> None:
    modules = first_party()
    problems = [
        problem for module in importers() for problem in re_exported_imports(module, modules)
    ]
    assert not problems, "import these names from the module that defines them:\n" + "\n".join(
        problems
    )


def test_all_lists_only_names_its_module_defines() -> None:
    problems = {
        name: undefined
        for name, module in first_party().items()
        if (undefined := undefined_exports(module))
    }
    assert not problems, f"__all__ re-exports names defined elsewhere: {problems}"


def write_package(root: Path, files: Mapping[str, str]) -> dict[str, Module]:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return load_modules(root, ("pkg",))


def test_detector_catches_a_re_export(tmp_path: Path) -> None:
    home = """
        from typing import Final
        LIMIT: Final = 1
        def f() -> int:
            return 1
        """
    shim = """
        from pkg.home import LIMIT, f
        __all__ = ["LIMIT", "g"]
        def g() -> int:
            return f()
        """
    user = """
        from pkg import home
        from pkg.home import LIMIT
        from pkg.shim import LIMIT as SHIM_LIMIT, g
        def h() -> int:
            from .shim import f
            return f()
        """
    files = {"pkg/__init__.py": "", "pkg/home.py": home, "pkg/shim.py": shim, "pkg/user.py": user}
    modules = write_package(tmp_path, files)
    found = [p.split(": ", 1)[1] for m in modules.values() for p in re_exported_imports(m, modules)]
    assert found == [
        "LIMIT is not defined in pkg.shim (defined in: pkg.home)",
        "f is not defined in pkg.shim (defined in: pkg.home)",
    ]
    assert undefined_exports(modules["pkg.shim"]) == ["LIMIT"]


# -- one reader of the environment ---------------------------------------------------------------

ENVIRONMENT_READER = "streams.settings"


def reads_environment(tree: ast.Module) -> bool:
    """Whether the module names ``os.environ``, ``os.getenv`` or imports either from ``os``."""
    readers = ("environ", "environb", "getenv")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            named = node.value.id == "os" and node.attr in readers
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            named = any(alias.name in readers for alias in node.names)
        else:
            named = False
        if named:
            return True
    return False


def test_only_settings_reads_the_environment() -> None:
    readers = [
        name
        for name, module in first_party().items()
        if reads_environment(module.tree) and name != ENVIRONMENT_READER
    ]
    assert not readers, f"read the environment in {ENVIRONMENT_READER} only, not in {readers}"


def test_detector_catches_an_environment_read(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nX = os.environ.get('X')\n",
        "pkg/b.py": "from os import getenv\n",
        "pkg/c.py": "import os\nos.replace('a', 'b')\n",
    }
    modules = write_package(tmp_path, files)
    found = sorted(name for name, m in modules.items() if reads_environment(m.tree))
    assert found == ["pkg.a", "pkg.b"]


# -- imports run one way between the packages of streams/ ---------------------------------------

LAYERS: Mapping[str, int] = {
    "engine": 0,
    "streams.errors": 1,
    "streams.settings": 1,
    "streams.adapters": 2,
    "streams.operations": 3,
    "streams.worker": 4,
    "streams.learner": 4,
    "streams.replay": 4,
    "streams.cli": 5,
}
"""Lower layers never import higher ones; within a layer only settings and errors meet."""


def layer_of(module: str) -> str:
    """The ``LAYERS`` key a module belongs to (``streams.cli.main`` -> ``streams.cli``)."""
    parts = module.split(".")
    return parts[0] if parts[0] == "engine" else ".".join(parts[:2])


def upward_imports(modules: Mapping[str, Module]) -> list[str]:
    problems: list[str] = []
    for module in modules.values():
        own = layer_of(module.name)
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom):
                targets = [source_module(node, module.name, module.is_package)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                other = layer_of(target)
                if other == own or other not in LAYERS or own not in LAYERS:
                    continue
                same_layer_allowed = LAYERS[own] == LAYERS[other] == LAYERS["streams.settings"]
                if LAYERS[other] > LAYERS[own] or (
                    LAYERS[other] == LAYERS[own] and not same_layer_allowed
                ):
                    problems.append(f"{module.path}:{node.lineno}: {own} imports {target}")
    return problems


def test_streams_packages_import_one_way() -> None:
    problems = upward_imports(first_party())
    assert not problems, "imports against the layers (see LAYERS):\n" + "\n".join(problems)


def test_every_streams_package_has_a_layer() -> None:
    packages = {layer_of(name) for name in first_party() if name.startswith("streams.")}
    assert packages <= set(LAYERS), f"give these a layer in LAYERS: {packages - set(LAYERS)}"


def test_detector_catches_an_upward_import(tmp_path: Path) -> None:
    files = {
        "streams/__init__.py": "",
        "streams/adapters/__init__.py": "",
        "streams/adapters/store.py": "def f() -> None:\n    from streams.cli.main import main\n",
        "streams/worker/__init__.py": "",
        "streams/worker/run.py": "from streams.learner.process import run_learner\n",
        "streams/learner/__init__.py": "",
        "streams/learner/process.py": "from streams.adapters.store import f\n",
    }
    write_package(tmp_path, files)
    modules = load_modules(tmp_path, ("streams",))
    found = [p.split(": ", 1)[1] for p in upward_imports(modules)]
    assert found == [
        "streams.adapters imports streams.cli.main",
        "streams.worker imports streams.learner.process",
    ]


# -- engine/ has no import cycle -----------------------------------------------------------------


def ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:end])


def module_imports(module: Module, modules: Mapping[str, Module]) -> set[str]:
    """First-party modules that importing ``module`` imports (module-level imports only)."""
    found: set[str] = set()
    for node in top_level(module.tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = source_module(node, module.name, module.is_package)
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    found.update(parent for name in list(found) for parent in ancestors(name))
    own = {module.name, *ancestors(module.name)}
    return {name for name in found if name in modules and name not in own}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``; empty when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        path.append(node)
        for successor in sorted(graph.get(node, set())):
            if successor in path:
                return [*path[path.index(successor) :], successor]
            if successor not in done and (cycle := visit(successor)):
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return []


def import_graph(modules: Mapping[str, Module]) -> dict[str, set[str]]:
    return {name: module_imports(module, modules) for name, module in modules.items()}


def test_engine_has_no_import_cycle() -> None:
    engine = {name: m for name, m in first_party().items() if name.split(".")[0] == "engine"}
    cycle = find_cycle(import_graph(engine))
    assert not cycle, "import cycle in engine/: " + " -> ".join(cycle)


def test_detector_catches_a_cycle(tmp_path: Path) -> None:
    b = """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg.c import C
        B = 1
        def late() -> int:
            from pkg.a import A
            return A
        """
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import B\nA = B\n",
        "pkg/b.py": b,
        "pkg/c.py": "import pkg.a\nC = 1\n",
    }
    modules = write_package(tmp_path, files)
    assert find_cycle(import_graph(modules)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    del modules["pkg.c"]
    assert find_cycle(import_graph(modules)) == []


# -- the core never imports the analysis tools ---------------------------------------------------

ANALYSIS = "engine.analysis"


def imports_of(module: Module) -> Iterator[tuple[int, str]]:
    """Every module ``module`` imports, at any depth of its code (line, absolute name)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, source_module(node, module.name, module.is_package)


def core_imports_of_analysis(modules: Mapping[str, Module]) -> list[str]:
    problems: list[str] = []
    for name, module in modules.items():
        if name.split(".")[0] != "engine" or name == ANALYSIS or name.startswith(ANALYSIS + "."):
            continue
        for line, target in imports_of(module):
            if target == ANALYSIS or target.startswith(ANALYSIS + "."):
                problems.append(f"{module.path}:{line}: {name} imports {target}")
    return problems


def test_the_core_never_imports_the_analysis_tools() -> None:
    problems = core_imports_of_analysis(first_party())
    assert not problems, "engine/ core modules importing engine.analysis:\n" + "\n".join(problems)


def test_detector_catches_a_core_import_of_analysis(tmp_path: Path) -> None:
    files = {
        "engine/__init__.py": "",
        "engine/analysis/__init__.py": "",
        "engine/analysis/report.py": "from engine.core import X\n",
        "engine/core.py": "X = 1\ndef f() -> None:\n    from engine.analysis import report\n",
    }
    write_package(tmp_path, files)
    modules = load_modules(tmp_path, ("engine",))
    assert [p.split(": ", 1)[1] for p in core_imports_of_analysis(modules)] == [
        "engine.core imports engine.analysis"
    ]
