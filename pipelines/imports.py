"""The import graph of the segshift package, read from the source with `ast`, never by importing it.

Every `import` and `from ... import` counts wherever it stands, at module level or inside a
function: a lazy import still runs when the stage runs. Imports under `if TYPE_CHECKING:` never
run and do not count. Importing `a.b.c` runs the packages `a` and `a.b` first, so a module's
closure holds their `__init__.py` too.

The DVC deps of a stage are the files its module's closure holds (pipelines/dvc_yaml.py);
tests/pipelines/test_imports.py checks the graph for cycles and for private names taken from
another module.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# module prefix -> its folder in the repository (pyproject.toml's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"segshift": "segshift", "segshift.components": "components", "segshift.pipelines": "pipelines"}
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Import:
    """One segshift module that a statement imports, and what `from ... import` takes from it."""

    module: str
    names: tuple[str, ...]      # empty for `import module`
    line: int


class ImportGraph:
    """The segshift modules under `root`, and which of them each one imports."""

    def __init__(self, root: Path = REPO, package_dirs: Mapping[str, str] = PACKAGE_DIRS):
        self.root = Path(root)
        self.package_dirs = dict(package_dirs)
        self._imports: dict[str, tuple[Import, ...]] = {}

    def file_of(self, module: str) -> Path | None:
        """The file that defines `module` (a package: its __init__.py), or None if it is no module."""
        # the longest prefix: segshift.components.x lives in components/, not in segshift/
        prefixes = [p for p in self.package_dirs if module == p or module.startswith(p + ".")]
        if not prefixes:
            return None
        prefix = max(prefixes, key=len)
        folder = self.root / self.package_dirs[prefix]
        rest = module[len(prefix) + 1:].split(".") if module != prefix else []
        if rest and folder.joinpath(*rest).with_suffix(".py").is_file():
            return folder.joinpath(*rest).with_suffix(".py")
        package = folder.joinpath(*rest, "__init__.py")
        return package if package.is_file() else None

    def modules(self) -> list[str]:
        """Every module of the package, by dotted name."""
        found = []
        for prefix, folder in self.package_dirs.items():
            for path in (self.root / folder).rglob("*.py"):
                parts = path.relative_to(self.root / folder).with_suffix("").parts
                name = ".".join((prefix, *(parts[:-1] if parts[-1] == "__init__" else parts)))
                if self.file_of(name) == path:      # not a file another prefix's folder claims
                    found.append(name)
        return sorted(found)

    def imports(self, module: str) -> tuple[Import, ...]:
        """The segshift modules `module`'s code imports, in the order of its lines."""
        if module not in self._imports:
            self._imports[module] = self._read_imports(module)
        return self._imports[module]

    def _read_imports(self, module: str) -> tuple[Import, ...]:
        path = self.file_of(module)
        if path is None:
            raise ValueError(f"{module}: no such module under {self.root}")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = []
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(alias.name, (), node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                names = tuple(alias.name for alias in node.names)
                found.append(Import(base, names, node.lineno))
                # `from package import submodule` runs the submodule as well
                found += [Import(f"{base}.{name}", (), node.lineno) for name in names
                          if self.file_of(f"{base}.{name}") is not None]
        return tuple(sorted((i for i in found if self.file_of(i.module) is not None), key=lambda i: i.line))

    def imported(self, module: str) -> set[str]:
        """The modules whose code runs when `module`'s does: what it imports, and their packages."""
        return {run for i in self.imports(module) for run in self.with_packages(i.module)}

    def with_packages(self, module: str) -> list[str]:
        """`module` and the segshift packages above it (`a.b.c`: a, a.b, a.b.c), which run first."""
        parts = module.split(".")
        names = (".".join(parts[:n]) for n in range(1, len(parts) + 1))
        return [name for name in names if self.file_of(name) is not None]

    def closure(self, module: str) -> set[str]:
        """Every module whose code runs when `module` is imported and its functions are called."""
        if self.file_of(module) is None:
            raise ValueError(f"{module}: no such module under {self.root}")
        seen: set[str] = set()
        todo = self.with_packages(module)
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo += self.imported(current) - seen
        return seen

    def files(self, modules: set[str]) -> list[str]:
        """The modules' files, relative to the root, sorted."""
        return sorted(self.file_of(m).relative_to(self.root).as_posix() for m in modules)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from` import names, a relative one resolved against the importing package."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree except the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
