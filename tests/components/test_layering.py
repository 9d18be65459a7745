"""components/ is the pure library: nothing in it imports the pipelines."""
import ast
from pathlib import Path

import segshift.components

COMPONENTS = Path(segshift.components.__file__).parent


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # relative: resolve against the file's package
                package = path.relative_to(COMPONENTS.parent).parent.parts
                base = ".".join(("segshift", *package[:len(package) - node.level + 1]))
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_components_never_import_the_pipelines():
    files = sorted(COMPONENTS.rglob("*.py"))
    assert len(files) > 20
    bad = {str(f.relative_to(COMPONENTS)): name for f in files for name in _imports(f)
           if name == "segshift.pipelines" or name.startswith("segshift.pipelines.")}
    assert not bad, f"components import the pipelines: {bad}"
